"""What can be checked of an LMDB's ``data.mdb`` before liblmdb maps it.

liblmdb maps the file and trusts its two meta pages: a file shorter than the pages they name
raises SIGBUS when those pages are touched. The meta pages are read here with plain file reads
(layout of liblmdb 0.9, 64-bit: a 16-byte page header, then MDB_meta) and checked against the file:
magic and version, a page size that is a power of two, a file size that is a whole number of
pages and holds every page the current meta page names.
"""
from __future__ import annotations

import os
import struct

MAGIC = 0xBEEFC0DE
VERSION = 1
P_META = 0x08
P_INVALID = (1 << 64) - 1
# MDB_meta after the 16-byte page header: magic, version, address, mapsize, then two MDB_db
# (pad/psize u32, flags u16, depth u16, branch, leaf, overflow, entries, root: u64), last_pg, txnid.
_META = struct.Struct("<IIQQ" + "IHHQQQQQ" * 2 + "QQ")
_HEADER = 16
_MIN_PAGE, _MAX_PAGE = 256, 1 << 16


class LMDBFileError(ValueError):
    """``data.mdb`` is not an LMDB file, or not a whole one; the message says what is wrong."""


def _meta(raw: bytes, where: str) -> dict:
    if len(raw) < _HEADER + _META.size:
        raise LMDBFileError(f"{where}: too short for an LMDB meta page")
    flags = struct.unpack_from("<H", raw, 10)[0]
    f = _META.unpack_from(raw, _HEADER)
    if f[0] != MAGIC:
        raise LMDBFileError(f"{where}: not an LMDB file (bad magic number)")
    if f[1] != VERSION:
        raise LMDBFileError(f"{where}: LMDB version {f[1]}, this reader knows version {VERSION}")
    if not flags & P_META:
        raise LMDBFileError(f"{where}: not an LMDB meta page")
    return {"psize": f[4], "main_root": f[19], "main_entries": f[18], "last_pg": f[20], "txnid": f[21]}


def check_lmdb_file(path: str | os.PathLike) -> None:
    """Raise :class:`LMDBFileError` if ``path`` (a ``data.mdb``) cannot be a whole LMDB."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            first = f.read(_HEADER + _META.size)
            m0 = _meta(first, "data.mdb")
            psize = m0["psize"]
            if psize & (psize - 1) or not _MIN_PAGE <= psize <= _MAX_PAGE:
                raise LMDBFileError(f"data.mdb: page size {psize} is not a power of two between "
                                    f"{_MIN_PAGE} and {_MAX_PAGE}")
            size = st.st_size
            if size < 2 * psize:
                raise LMDBFileError(f"data.mdb: {size} bytes, shorter than its two {psize}-byte meta pages "
                                    f"(the file is truncated)")
            f.seek(psize)
            m1 = _meta(f.read(_HEADER + _META.size), "data.mdb, second meta page")
    except OSError as e:
        raise LMDBFileError(f"{path}: {e.strerror or e}") from None
    if size % psize:
        raise LMDBFileError(f"data.mdb: {size} bytes is not a whole number of {psize}-byte pages "
                            f"(the file is truncated)")
    meta = max(m0, m1, key=lambda m: m["txnid"])  # the newest commit, as liblmdb picks
    pages = meta["last_pg"] + 1
    if pages * psize > size:
        raise LMDBFileError(f"data.mdb: {size} bytes, but its last commit uses {pages} pages of {psize} "
                            f"bytes ({pages * psize} bytes): the file is truncated")
    root = meta["main_root"]
    if root != P_INVALID and root >= pages:
        raise LMDBFileError(f"data.mdb: its root page {root} is past its last page {pages - 1}")
