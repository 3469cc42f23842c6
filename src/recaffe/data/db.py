"""Key-value databases as Caffe's ``caffe::db``: an LMDB backend and a LevelDB backend.

The interface mirrors Caffe's so data tools and layers read both the same way::

    db = open_db("lmdb", "mnist_train_lmdb", READ)
    cur = db.new_cursor()            # positioned on the first record
    while cur.valid():
        use(cur.key(), cur.value())
        cur.next()

    db = open_db("lmdb", "out_lmdb", NEW)
    txn = db.new_transaction()
    txn.put(b"00000000", datum.SerializeToString())
    txn.commit()

Modes as Caffe's: ``READ`` (read only, the database must exist), ``WRITE`` (create if missing),
``NEW`` (the database must not exist yet). Problems raise :class:`DBError` naming the backend and
path. LMDBs are read in child processes (see lmdb_child.py): no database content, however corrupt,
can crash the reading process.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator

from ..errors import RecaffeError
from ..log import get_logger
from .lmdb_check import LMDBFileError, check_lmdb_file
from .lmdb_child import ChildDBError, ChildReader
from ..proto import caffe_pb2

log = get_logger(__name__)

READ, WRITE, NEW = "read", "write", "new"
_MODES = (READ, WRITE, NEW)


class DBError(RecaffeError, RuntimeError):
    """A database that cannot be opened, read or written; the message names backend and path."""


# ---------------------------------------------------------------------------- interface
class Cursor:
    """Iterates over a database's records in key order (bytes keys and values)."""

    def seek_to_first(self) -> None:
        raise NotImplementedError

    def next(self) -> None:
        raise NotImplementedError

    def key(self) -> bytes:
        raise NotImplementedError

    def value(self) -> bytes:
        raise NotImplementedError

    def valid(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        """Every record from the current position to the end."""
        while self.valid():
            yield self.key(), self.value()
            self.next()


class Transaction:
    """Buffered writes; nothing reaches the database before :meth:`commit`."""

    def put(self, key: bytes | str, value: bytes) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError


class DB:
    backend = ""

    def open(self, source: str | os.PathLike, mode: str = READ) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def new_cursor(self) -> Cursor:
        raise NotImplementedError

    def new_transaction(self) -> Transaction:
        raise NotImplementedError

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn modules down
            pass

    def __enter__(self) -> DB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_mode(self, mode: str) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown database mode {mode!r}; use one of {', '.join(_MODES)}")


def _key_bytes(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


class _SharedHandles:
    """Read handles shared per path within the process, reference-counted.

    LevelDB locks its folder (LMDB readers each have their own child process), yet two nets
    (train and test, or two pycaffe Nets from one prototxt) may read the same database. Each gets
    its own cursor on one shared handle.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, list] = {}  # real path -> [handle, users]

    def acquire(self, source: str, opener):
        key = os.path.realpath(source)
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                entry = self._open[key] = [opener(), 0]
            entry[1] += 1
            return entry[0]

    def release(self, source: str, handle) -> None:
        key = os.path.realpath(source)
        with self._lock:
            entry = self._open.get(key)
            if entry is None or entry[0] is not handle:
                handle.close()
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._open[key]
                handle.close()


_leveldb_readers = _SharedHandles()


# --------------------------------------------------------------------------------- LMDB
class LMDB(DB):
    """Reads go through child processes (data/lmdb_child.py): a corrupt database cannot crash
    this process, it raises :class:`DBError`. Writes are made here, after the same file checks."""

    backend = "LMDB"
    # Writers start with a 1 GiB map (sparse on disk) and double it whenever a commit finds it full.
    INITIAL_MAP_SIZE = 1 << 30

    def __init__(self) -> None:
        self.env = None
        self.source = ""
        self._spare: ChildReader | None = None  # the reader started by open(), for the first cursor

    def open(self, source, mode=READ):
        import lmdb

        self._check_mode(mode)
        source = os.fspath(source)
        self.source = source
        what = f"cannot open LMDB {source!r}"
        if mode == NEW:
            try:
                os.mkdir(source, 0o744)
            except FileExistsError:
                raise DBError(f"cannot create LMDB {source!r}: it already exists "
                              f"(remove it or choose another path)") from None
            except OSError as e:
                raise DBError(f"cannot create LMDB {source!r}: {e.strerror}") from None
        elif mode == READ:
            if not os.path.exists(source):
                raise DBError(f"{what}: no such directory")
            if not os.path.isdir(source):
                raise DBError(f"{what}: not a directory (an LMDB is a folder holding data.mdb)")
            if not os.path.exists(os.path.join(source, "data.mdb")):
                raise DBError(f"{what}: the directory holds no data.mdb")
        else:
            os.makedirs(source, exist_ok=True)
        data_file = os.path.join(source, "data.mdb")
        if mode != NEW and os.path.exists(data_file):
            try:
                check_lmdb_file(data_file)
            except LMDBFileError as e:
                raise DBError(f"{what}: {e}") from None
        if mode == READ:
            # Opening is the child's first step: its errors are the open's.
            self._spare = self._reader(what)
        else:
            try:
                self.env = lmdb.open(source, map_size=self.INITIAL_MAP_SIZE, create=True, subdir=True)
            except lmdb.Error as e:
                raise DBError(f"{what}: {e}") from None
        log.info("Opened lmdb %s", source)

    def _reader(self, what: str) -> ChildReader:
        try:
            return ChildReader(self.source)
        except ChildDBError as e:
            raise DBError(f"{what}: {e}") from None

    def close(self):
        if self._spare is not None:
            self._spare.close()
            self._spare = None
        if self.env is not None:
            self.env.close()
            self.env = None

    def _env(self):
        if self.env is None:
            raise DBError(f"LMDB {self.source!r} is not open for writing")
        return self.env

    def new_cursor(self):
        if self.env is not None:
            raise DBError(f"LMDB {self.source!r} is open for writing; open it with mode READ to read it")
        if not self.source:
            raise DBError("LMDB is not open")
        reader, self._spare = self._spare, None
        return _LMDBCursor(reader or self._reader(f"cannot read LMDB {self.source!r}"), self.source, self)

    def new_transaction(self):
        return _LMDBTransaction(self._env(), self.source, self)

    def __len__(self) -> int:
        if self.env is not None:
            return self._env().stat()["entries"]
        cursor = self.new_cursor()
        try:
            return cursor.entries
        finally:
            cursor.close()


class _LMDBCursor(Cursor):
    """A child process's cursor (data/lmdb_child.py) holding one read transaction for its whole
    life (a consistent snapshot), as Caffe's; its failures raise DBError naming the database."""

    def __init__(self, reader: ChildReader, source: str, owner: DB):
        self.source = source
        self._owner = owner  # keeps the database open while the cursor lives
        self._reader = reader
        self.entries = reader.entries

    def _call(self, method):
        try:
            return method()
        except ChildDBError as e:
            raise DBError(f"cannot read LMDB {self.source!r}: {e}") from None

    def seek_to_first(self):
        self._call(self._reader.seek_to_first)

    def next(self):
        self._call(self._reader.next)

    def key(self):
        return self._reader.key()

    def value(self):
        return self._reader.value()

    def valid(self):
        return self._reader.valid()

    def close(self):
        self._reader.close()


class _LMDBTransaction(Transaction):
    def __init__(self, env, source: str, owner: DB):
        self.env = env
        self.source = source
        self._owner = owner  # keeps the database open while the transaction lives
        self._pending: list[tuple[bytes, bytes]] = []

    def put(self, key, value):
        self._pending.append((_key_bytes(key), bytes(value)))

    def commit(self):
        import lmdb

        while True:
            try:
                with self.env.begin(write=True) as txn:
                    cur = txn.cursor()
                    cur.putmulti(self._pending)
                break
            except lmdb.MapFullError:
                # Same as Caffe: grow the map and redo the whole batch in a fresh transaction.
                size = self.env.info()["map_size"] * 2
                log.info("Doubling LMDB map size to %dMB ...", size >> 20)
                self.env.set_mapsize(size)
            except lmdb.Error as e:
                raise DBError(f"cannot write to LMDB {self.source!r}: {e}") from None
        self._pending = []


# ------------------------------------------------------------------------------ LevelDB
class LevelDB(DB):
    backend = "LevelDB"

    def __init__(self) -> None:
        self.db = None
        self.source = ""
        self._shared = False

    def open(self, source, mode=READ):
        try:
            import plyvel
        except ImportError:
            raise DBError(f"cannot open LevelDB {os.fspath(source)!r}: the LevelDB backend needs the "
                          f"'plyvel' package (pip install plyvel), or use backend LMDB") from None
        self._check_mode(mode)
        source = os.fspath(source)
        self.source = source
        what = f"cannot open LevelDB {source!r}"
        if mode == READ and not os.path.exists(source):
            raise DBError(f"{what}: no such directory")
        if mode == NEW and os.path.exists(source):
            raise DBError(f"cannot create LevelDB {source!r}: it already exists "
                          f"(remove it or choose another path)")
        def opener():
            # Caffe's options: 64 KiB blocks, 256 MiB write buffer, 100 open files.
            return plyvel.DB(source, create_if_missing=mode != READ, error_if_exists=mode == NEW,
                             block_size=65536, write_buffer_size=268435456, max_open_files=100)

        try:
            if mode == READ:
                self.db = _leveldb_readers.acquire(source, opener)
                self._shared = True
            else:
                self.db = opener()
        except plyvel.Error as e:
            raise DBError(f"{what}: {e}") from None
        except OSError as e:
            raise DBError(f"{what}: {e}") from None
        log.info("Opened leveldb %s", source)

    def close(self):
        if self.db is not None:
            if self._shared:
                _leveldb_readers.release(self.source, self.db)
            else:
                self.db.close()
            self.db = None

    def _db(self):
        if self.db is None:
            raise DBError(f"LevelDB {self.source!r} is not open")
        return self.db

    def new_cursor(self):
        return _LevelDBCursor(self._db(), self)

    def new_transaction(self):
        return _LevelDBTransaction(self._db(), self)


class _LevelDBCursor(Cursor):
    """LevelDB reports corruption as exceptions (plyvel.Error): raised as DBError naming the database."""

    def __init__(self, db, owner: DB):
        self._owner = owner  # keeps the database open while the cursor lives
        self._snapshot = db.snapshot()
        self._it = self._snapshot.raw_iterator()
        self.seek_to_first()

    def _call(self, method):
        import plyvel

        try:
            return method()
        except plyvel.Error as e:
            raise DBError(f"cannot read LevelDB {self._owner.source!r}: {e}") from None

    def seek_to_first(self):
        self._call(self._it.seek_to_first)

    def next(self):
        self._call(self._it.next)

    def key(self):
        return self._it.key()

    def value(self):
        return self._call(self._it.value)

    def valid(self):
        return self._it.valid()

    def close(self):
        self._it.close()
        self._snapshot.close()


class _LevelDBTransaction(Transaction):
    def __init__(self, db, owner: DB):
        self.db = db
        self._owner = owner  # keeps the database open while the transaction lives
        self._batch = db.write_batch()

    def put(self, key, value):
        self._batch.put(_key_bytes(key), bytes(value))

    def commit(self):
        self._batch.write()
        self._batch = self.db.write_batch()


# ------------------------------------------------------------------------------ factory
def get_db(backend: str | int) -> DB:
    """A closed database object for ``backend``: "lmdb"/"leveldb" or ``DataParameter.DB`` values."""
    if isinstance(backend, int):
        if backend == caffe_pb2.DataParameter.LMDB:
            return LMDB()
        if backend == caffe_pb2.DataParameter.LEVELDB:
            return LevelDB()
        raise DBError(f"Unknown db backend {backend}")
    name = str(backend).lower()
    if name == "lmdb":
        return LMDB()
    if name == "leveldb":
        return LevelDB()
    raise DBError(f"Unknown db backend {backend!r}: use lmdb or leveldb")


def open_db(backend: str | int, source: str | os.PathLike, mode: str = READ) -> DB:
    db = get_db(backend)
    db.open(source, mode)
    return db
