"""LMDB read in a child process, so that no database content can take the reader's process down.

liblmdb trusts the file it maps: a truncated ``data.mdb`` raises SIGBUS when a missing page is
touched, a zeroed page trips an ``assert`` that aborts the process. Caffe dies on such databases;
recaffe reads them in a child process instead, and a crash there becomes a :class:`ChildDBError`
naming the database. The child is this file run as a script (``python -S lmdb_child.py
LMDB_PACKAGE_FOLDER SOURCE``): it imports only the standard library and py-lmdb, skipping site
initialisation, so it starts in a few tens of milliseconds, and it exits when its parent closes the
pipe or dies.

Protocol (the child's stdin/stdout): the child answers its start with a frame ``O`` holding the
number of records, or ``E`` and a message. Then each command byte ``F`` (from the first record)
or ``N`` (from where the last chunk ended) is answered with one chunk: up to ``CHUNK_RECORDS``
records / ``CHUNK_BYTES`` bytes, with a flag saying the end of the database was reached. The parent
asks for the next chunk as soon as it receives one, so the child reads while the parent decodes.
A frame is a type byte, a little-endian uint32 payload length, then the payload.
"""
from __future__ import annotations

import os
import struct
import sys

# The child imports only the above and lmdb (subprocess and signal, for the parent, would double
# its start-up time); it runs in its own session, so terminal signals (Ctrl-C, SIGHUP) are the
# parent's to handle (-sigint_effect) and never kill the reader under it.

CHUNK_RECORDS = 1024
CHUNK_BYTES = 4 << 20
_HEAD = struct.Struct("<cI")
_CHUNK_HEAD = struct.Struct("<IB")  # record count, end-of-database flag


class ChildDBError(RuntimeError):
    """The child could not open or read the database (or died); the message says why."""


# ----------------------------------------------------------------------------- the child
def open_reader_env(source: str):
    """Open ``source`` read-only as Caffe does (MDB_RDONLY | MDB_NOTLS; py-lmdb always sets NOTLS)."""
    import lmdb

    try:
        return lmdb.open(source, readonly=True, create=False, lock=True, max_readers=126)
    except lmdb.Error as e:
        # A read-only folder cannot hold the lock file: read without locking, as Caffe built with
        # ALLOW_LMDB_NOLOCK does.
        if "ermission" not in str(e) and "read-only" not in str(e).lower():
            raise
        sys.stderr.write(f"LMDB {source}: cannot create its lock file ({e}); reading without locks\n")
        return lmdb.open(source, readonly=True, create=False, lock=False)


def _send(out, kind: bytes, payload: bytes = b"") -> None:
    out.write(_HEAD.pack(kind, len(payload)) + payload)
    out.flush()


def _chunk(cur, first: bool) -> bytes:
    keys, values, size = [], [], 0
    valid = cur.first() if first else cur.next()
    while valid:
        k, v = cur.key(), cur.value()
        keys.append(k)
        values.append(v)
        size += len(k) + len(v)
        if len(keys) == CHUNK_RECORDS or size >= CHUNK_BYTES:
            break
        valid = cur.next()
    lengths = [n for k, v in zip(keys, values) for n in (len(k), len(v))]
    return b"".join([_CHUNK_HEAD.pack(len(keys), not valid), struct.pack(f"<{len(lengths)}I", *lengths),
                     *(b for kv in zip(keys, values) for b in kv)])


def serve(source: str) -> int:
    import lmdb

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    try:
        env = open_reader_env(source)
        txn = env.begin(buffers=False)  # one read transaction: a consistent snapshot, as Caffe's cursor
        cur = txn.cursor()
        _send(out, b"O", struct.pack("<Q", txn.stat()["entries"]))
        first = True
        while True:
            command = inp.read(1)
            if command not in (b"F", b"N"):
                return 0  # b"Q", or the parent is gone
            if command == b"F":
                first = True
            _send(out, b"C", _chunk(cur, first))
            first = False
    except lmdb.Error as e:
        _send(out, b"E", f"{type(e).__name__}: {e}".encode("utf-8", "replace"))
        return 1
    except BrokenPipeError:
        return 0


# ---------------------------------------------------------------------------- the parent
class ChildReader:
    """A cursor over an LMDB read by a child process (Caffe's ``db::Cursor``: ``valid``, ``key``,
    ``value``, ``next``, ``seek_to_first``); ``entries`` is the database's record count."""

    def __init__(self, source: str):
        import subprocess

        import lmdb

        self.source = source
        # -S: no site initialisation (a third of the start-up); py-lmdb's folder is passed instead.
        args = [sys.executable, "-S"]
        if sys.version_info >= (3, 11):
            args.append("-P")  # do not put this folder (db.py, mnist.py, ...) on the child's path
        args += [os.path.abspath(__file__), os.path.dirname(os.path.dirname(lmdb.__file__)), source]
        self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, bufsize=0, start_new_session=True)
        self._pending = 0  # chunks asked for and not received yet
        self._records: list[tuple[int, int, int]] = []  # (key start, value start, value end) in _buf
        self._buf = memoryview(b"")
        self._i = 0
        self._end = True
        (self.entries,) = struct.unpack("<Q", self._receive(b"O"))
        self.seek_to_first()

    # -- Caffe's cursor
    def seek_to_first(self) -> None:
        while self._pending:  # a chunk asked for ahead: it starts elsewhere
            self._receive(b"C")
            self._pending -= 1
        self._ask(b"F")
        self._take_chunk()

    def next(self) -> None:
        self._i += 1
        if self._i == len(self._records) and not self._end:
            self._take_chunk()

    def valid(self) -> bool:
        return self._i < len(self._records)

    def key(self) -> bytes:
        k, v, _ = self._records[self._i]
        return bytes(self._buf[k:v])

    def value(self) -> bytes:
        _, v, e = self._records[self._i]
        return bytes(self._buf[v:e])

    def close(self) -> None:
        import subprocess

        proc, self._proc = self._proc, None
        if proc is None:
            return
        # Closing both pipes ends the child wherever it is: waiting for a command (end of input)
        # or writing a chunk read ahead (broken pipe).
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- the protocol
    def _ask(self, command: bytes) -> None:
        try:
            self._proc.stdin.write(command)
            self._pending += 1
        except (OSError, AttributeError):
            raise self._died() from None

    def _take_chunk(self) -> None:
        payload = self._receive(b"C")
        self._pending -= 1
        n, end = _CHUNK_HEAD.unpack_from(payload)
        lengths = struct.unpack_from(f"<{2 * n}I", payload, _CHUNK_HEAD.size)
        pos = _CHUNK_HEAD.size + 8 * n
        records = []
        for i in range(n):
            k, v = pos, pos + lengths[2 * i]
            pos = v + lengths[2 * i + 1]
            records.append((k, v, pos))
        self._buf, self._records, self._i, self._end = memoryview(payload), records, 0, bool(end)
        if not self._end:
            self._ask(b"N")  # the child reads the next chunk while this one is used

    def _receive(self, kind: bytes) -> bytes:
        head = self._read(_HEAD.size)
        got, size = _HEAD.unpack(head)
        payload = self._read(size)
        if got == b"E":
            self.close()
            raise ChildDBError(payload.decode("utf-8", "replace"))
        if got != kind:
            raise ChildDBError(f"unexpected reply {got!r} from the LMDB reader process")
        return payload

    def _read(self, n: int) -> bytes:
        if self._proc is None:
            raise ChildDBError("the database was closed")
        data = self._proc.stdout.read(n) if n else b""
        while len(data) < n:
            more = self._proc.stdout.read(n - len(data))
            if not more:
                raise self._died()
            data += more
        return data

    def _died(self) -> ChildDBError:
        """The error for a child that stopped answering: how it died and what it printed."""
        import signal
        import subprocess

        proc, self._proc = self._proc, None
        if proc is None:
            return ChildDBError("the database was closed")
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        said = proc.stderr.read().decode("utf-8", "replace").strip()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        detail = said.splitlines()[-1] if said else "no message"
        return ChildDBError(f"the database is corrupt or truncated: its reader process was {how} ({detail})")


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    sys.exit(serve(sys.argv[2]))
