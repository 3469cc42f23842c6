"""Reading and writing protobuf messages as Caffe does, with errors a user can act on.

Text files (``.prototxt``) report problems as ``file:line:column: message``; binary files
(``.caffemodel``, ``.solverstate``, ``.binaryproto``) report truncation or a wrong file type.
Writes are atomic: a temporary file in the same folder, then a rename, so a kill never leaves a
corrupt snapshot behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TypeVar

from google.protobuf import message as _message
from google.protobuf import text_format
from ..errors import RecaffeError

M = TypeVar("M", bound=_message.Message)


class ProtoFileError(RecaffeError, ValueError):
    """A file that cannot be read as the expected Caffe message; the text names the file."""


def read_text(path: str | os.PathLike, msg: M) -> M:
    """Parse a text-format proto file into ``msg`` (merged), errors as ``file:line:col: ...``."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ProtoFileError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ProtoFileError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    return parse_text(text, msg, filename=path)


def parse_text(text: str, msg: M, filename: str = "<string>") -> M:
    try:
        text_format.Merge(text, msg)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        detail = str(e)
        # protobuf prefixes "line:col : "; keep only the description.
        if line is not None and detail.startswith(f"{line}:"):
            detail = detail.split(" : ", 1)[-1]
        where = f"{filename}:{line}:{col}" if line is not None else filename
        raise ProtoFileError(f"{where}: {detail}") from None
    return msg


def read_binary(path: str | os.PathLike, msg: M, what: str | None = None) -> M:
    """Parse a binary proto file into ``msg``; truncated or foreign files give a clear error."""
    path = os.fspath(path)
    what = what or type(msg).__name__
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ProtoFileError(f"{path}: file not found") from None
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
