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

M = TypeVar("M", bound=_message.Message)


class ProtoFileError(ValueError):
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


def read_text(path: str | os.PathLike, msg: M) -> M:
    """Parse a text-format proto file into ``msg`` (merged), errors as ``file:line:col: ...``."""
    path = os.fspath(path)
    try:
        text = read_regular(path).decode("utf-8")
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open() reads
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
        data = read_regular(path, what)
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
