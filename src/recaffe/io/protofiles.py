"""Reading and writing protobuf messages as Caffe does, with errors a user can act on.

Text files (``.prototxt``) report problems as ``file:line:column: message``; binary files
(``.caffemodel``, ``.solverstate``, ``.binaryproto``) report truncation or a wrong file type.
Writes are atomic: a temporary file in the same folder, then a rename, so a kill never leaves a
corrupt snapshot behind.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import TypeVar

from google.protobuf import message as _message
from google.protobuf import text_format

from ..errors import RecaffeError

M = TypeVar("M", bound=_message.Message)


class ProtoFileError(RecaffeError, ValueError):
    """A file that cannot be read as the expected Caffe message; the text names the file."""


def check_path(path: str | os.PathLike, what: str = "file") -> str:
    """``path`` as a str, or a ProtoFileError when no file can have that name (a NUL byte)."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if "\0" in path:
        raise ProtoFileError(f"{path!r}: not a valid {what} name (it contains a NUL byte)")
    return path


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file, or a ProtoFileError naming it (missing, a folder, unreadable)."""
    path = check_path(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ProtoFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ProtoFileError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise ProtoFileError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_text(path: str | os.PathLike, msg: M) -> M:
    """Parse a text-format proto file into ``msg``, errors as ``file:line:col: ...``.

    As Caffe's text parser: a non-repeated field given twice is an error, and comments may hold
    any bytes (a Latin-1 comment is fine). String values must be UTF-8 (see decode_text)."""
    path = check_path(path)
    return parse_text(decode_text(read_bytes(path), path), msg, filename=path)


def decode_text(data: bytes, filename: str = "<string>") -> str:
    """The text of a prototxt. Caffe's protobuf reads text as bytes, so a comment in Latin-1 (or
    any other encoding) is accepted: bytes after a ``#`` outside a string that are not UTF-8 are
    replaced. Elsewhere (string values) they are an error naming line and column: Python's
    protobuf keeps strings as unicode, and guessing an encoding would silently change a path."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = []
    for number, line in enumerate(data.split(b"\n"), 1):
        code, comment = _split_comment(line)
        try:
            text = code.decode("utf-8")
        except UnicodeDecodeError as e:
            col = len(code[:e.start].decode("utf-8", "replace")) + 1
            raise ProtoFileError(f"{filename}:{number}:{col}: byte 0x{code[e.start]:02x} is not UTF-8 text "
                                 "(recaffe reads string values as UTF-8; save the file as UTF-8)") from None
        lines.append(text + comment.decode("utf-8", "replace"))
    return "\n".join(lines)


def _split_comment(line: bytes) -> tuple[bytes, bytes]:
    """(code, comment) of one line: the comment starts at the first ``#`` outside a quoted string."""
    quote = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote is not None:
            if c == 0x5C:  # backslash: the next byte is escaped
                i += 1
            elif c == quote:
                quote = None
        elif c in (0x22, 0x27):
            quote = c
        elif c == 0x23:
            return line[:i], line[i:]
        i += 1
    return line, b""


_DUPLICATE = re.compile(r'Message type "([\w.]+)" should not have multiple "(\w+)" fields\.')


def parse_text(text: str, msg: M, filename: str = "<string>") -> M:
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        detail = str(e)
        # protobuf prefixes "line:col : "; keep only the description.
        if line is not None and detail.startswith(f"{line}:"):
            detail = detail.split(" : ", 1)[-1]
        # Caffe's (C++) wording for a non-repeated field given twice
        detail = _DUPLICATE.sub(r'Non-repeated field "\2" is specified multiple times (in \1).', detail)
        where = f"{filename}:{line}:{col}" if line is not None else filename
        raise ProtoFileError(f"{where}: {detail}{_fork_hint(detail)}") from None
    return msg


def _fork_hint(detail: str) -> str:
    """For an unknown field that one of Caffe's forks defines, say which fork (docs/forks.md)."""
    if 'has no field named "' not in detail:
        return ""
    from .fork_fields import fork_of_field

    fork = fork_of_field(detail.split('has no field named "', 1)[1].split('"', 1)[0])
    return f" (a field of {fork}, which recaffe does not support; see docs/forks.md)" if fork else ""


def read_binary(path: str | os.PathLike, msg: M, what: str | None = None) -> M:
    """Parse a binary proto file into ``msg``; empty, truncated or foreign files give a clear error."""
    path = check_path(path)
    what = what or type(msg).__name__
    data = read_bytes(path)
    if not data:
        raise ProtoFileError(f"{path}: empty file (0 bytes), not a binary {what}")
    try:
        msg.ParseFromString(data)
    except _message.DecodeError as e:
        raise ProtoFileError(f"{path}: cannot be read as a binary {what} ({len(data)} bytes): the file is "
                             f"truncated or is not a {what} ({e})") from None
    return msg


def write_text(path: str | os.PathLike, msg: _message.Message) -> None:
    atomic_write(path, text_format.MessageToString(msg).encode("utf-8"))


def write_binary(path: str | os.PathLike, msg: _message.Message) -> None:
    atomic_write(path, msg.SerializeToString())


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; when the block succeeds the file written there is
    renamed onto ``path`` (readable as a plainly created file would be), else it is removed.
    A kill at any moment leaves either the old file or the new one, never a partial file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; snapshots are shared like Caffe's
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place."""
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
