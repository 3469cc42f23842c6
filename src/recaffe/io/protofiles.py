"""Reading and writing protobuf messages as Caffe does, with errors a user can act on.

Text files (``.prototxt``) report problems as ``file:line:column: message``; binary files
(``.caffemodel``, ``.solverstate``, ``.binaryproto``) report truncation or a wrong file type.
Only regular files are read (``open_regular``): a FIFO would block forever and ``/dev/zero`` would
be read until memory runs out. Writes are atomic and durable (``atomic_target``): a temporary file
in the same folder, fsynced, renamed into place, then the folder fsynced, so a kill or a power
loss leaves the old file or the new one, never a partial one.
"""
from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from typing import TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, so stale temporaries are left alone
    fcntl = None

from google.protobuf import message as _message
from google.protobuf import text_format

from ..errors import RecaffeError

M = TypeVar("M", bound=_message.Message)


class ProtoFileError(RecaffeError, ValueError):
    """A file that cannot be read as the expected Caffe message; the text names the file."""


class NotRegularFileError(ProtoFileError, OSError):
    """A path to read that is not a regular file (a folder, FIFO, device, socket)."""

    def __str__(self) -> str:
        return self.args[0]


PROTO_READ_LIMIT = (1 << 31) - 1  # Caffe's kProtoReadBytesLimit (INT_MAX) for proto files read whole

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path: str, mode: int, what: str | None) -> NotRegularFileError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return NotRegularFileError(f"{path}: is {kind}, not a regular file" + (f" (the {what})" if what else ""))


def check_regular_file(path: str | os.PathLike, what: str | None = None) -> None:
    """Raise NotRegularFileError unless ``path`` is a regular file (for readers that open by name,
    such as h5py); a missing path raises FileNotFoundError."""
    path = os.fspath(path)
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode, what)


def open_regular(path: str | os.PathLike, what: str | None = None, mode: str = "rb", **kwargs):
    """``open(path, mode)`` for reading, refusing anything but a regular file. The check is made
    on the opened descriptor (opened non-blocking, so a FIFO without a writer does not block)."""
    path = os.fspath(path)
    nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX; elsewhere there are no FIFOs to open
    fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            raise _not_regular(path, st_mode, what)
        if nonblock:
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, what: str | None = None, limit: int = PROTO_READ_LIMIT) -> bytes:
    """The bytes of regular file ``path``, refusing files over ``limit`` bytes."""
    path = os.fspath(path)
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ProtoFileError(f"{path}: {size} bytes, more than the {limit} bytes this reader takes"
                                 + (f" (the {what})" if what else ""))
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while read
        raise ProtoFileError(f"{path}: more than the {limit} bytes this reader takes")
    return data


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
        return read_regular(path)
    except ProtoFileError:
        raise
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
    text = decode_text(read_bytes(path), path).replace("\r\n", "\n").replace("\r", "\n")  # as open() reads
    return parse_text(text, msg, filename=path)


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


# A temporary is "<target name>.<8 random characters>.tmp" (tempfile.mkstemp), held under an
# exclusive flock while its writer lives: remove_stale_temporaries removes only unlocked ones.
TEMP_SUFFIX = ".tmp"
TEMP_RANDOM = r"\.[A-Za-z0-9_]{8}" + re.escape(TEMP_SUFFIX)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def locked_temporary(target: str) -> tuple[int, str]:
    """(fd, path) of a new empty temporary next to ``target``, flocked by the returned fd."""
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=TEMP_SUFFIX, dir=folder)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, tmp


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; when the block succeeds the file written there is
    fsynced and renamed onto ``path`` (readable as a plainly created file would be) and the folder
    fsynced, else it is removed. A kill at any moment leaves either the old file or the new one,
    never a partial file; once this returns, the new file survives a power loss."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = locked_temporary(path)
    try:
        yield tmp
        _fsync_path(tmp)  # by path: the writer may have opened the file anew
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; snapshots are shared like Caffe's
        os.replace(tmp, path)
        _fsync_path(folder)  # the rename itself
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str, target_pattern: str) -> list[str]:
    """Remove the temporaries left in ``folder`` by killed writers of files whose names match
    ``target_pattern`` (a regular expression); temporaries still being written are locked and
    kept. Returns the names removed."""
    pattern = re.compile(target_pattern + TEMP_RANDOM)
    removed = []
    if fcntl is None:
        return removed
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return removed
    for name in names:
        if not pattern.fullmatch(name):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
            removed.append(name)
        except OSError:
            pass  # locked: its writer is alive
        finally:
            os.close(fd)
    return removed


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path`` and rename it into place."""
    with atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
