"""MNIST's IDX files -> a database of Datums, as Caffe's ``convert_mnist_data`` writes it.

IDX files hold a big-endian header (magic 2051 for images, 2049 for labels, the item count, and
for images the rows and columns) followed by uint8 values. Files may be gzip-compressed.

Each digit becomes a Datum with channels 1, height rows, width cols, ``data`` the row-major
pixel bytes and ``label`` the label byte (a C ``char``, as Caffe stores it), under the key
``"%08d" % index``, committed every 1,000 records.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from ..errors import RecaffeError
from ..log import get_logger
from ..proto import caffe_pb2
from .db import NEW, open_db

log = get_logger(__name__)

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
COMMIT_EVERY = 1000


class MnistFormatError(RecaffeError, ValueError):
    """An IDX file that is not what it should be; the message names the file."""


def _read_bytes(path: str | os.PathLike) -> bytes:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise MnistFormatError(f"Unable to open file {path}: no such file") from None
    except OSError as e:
        raise MnistFormatError(f"Unable to open file {path}: {e.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise MnistFormatError(f"{path}: corrupt gzip file ({e})") from None
    return raw


def _header(raw: bytes, path, n_fields: int, magic: int, kind: str) -> tuple[int, ...]:
    if len(raw) < 4 * n_fields:
        raise MnistFormatError(f"{path}: too short for an IDX {kind} file ({len(raw)} bytes)")
    fields = struct.unpack(">" + "I" * n_fields, raw[:4 * n_fields])
    if fields[0] != magic:
        raise MnistFormatError(f"{path}: Incorrect {kind} file magic: {fields[0]} (expected {magic}, "
                               f"an IDX {kind} file)")
    return fields[1:]


def read_images(path: str | os.PathLike) -> np.ndarray:
    """An IDX image file -> uint8 array (N, rows, cols)."""
    raw = _read_bytes(path)
    n, rows, cols = _header(raw, path, 4, IMAGE_MAGIC, "image")
    need = n * rows * cols
    if len(raw) - 16 < need:
        raise MnistFormatError(f"{path}: truncated: {n} images of {rows}x{cols} need {need} bytes of "
                               f"pixels, the file holds {len(raw) - 16}")
    return np.frombuffer(raw, dtype=np.uint8, count=need, offset=16).reshape(n, rows, cols)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """An IDX label file -> uint8 array (N,)."""
    raw = _read_bytes(path)
    (n,) = _header(raw, path, 2, LABEL_MAGIC, "label")
    if len(raw) - 8 < n:
        raise MnistFormatError(f"{path}: truncated: {n} labels, the file holds {len(raw) - 8}")
    return np.frombuffer(raw, dtype=np.uint8, count=n, offset=8)


def convert_mnist(image_file: str | os.PathLike, label_file: str | os.PathLike,
                  db_path: str | os.PathLike, backend: str = "lmdb") -> int:
    """Write the database; returns the number of records. The database must not exist yet."""
    images = read_images(image_file)
    labels = read_labels(label_file)
    if len(images) != len(labels):
        raise MnistFormatError(f"{os.fspath(image_file)} holds {len(images)} images but "
                               f"{os.fspath(label_file)} holds {len(labels)} labels")
    n, rows, cols = images.shape
    # Caffe reads the label into a C char: bytes above 127 become negative.
    signed_labels = labels.view(np.int8)
    db = open_db(backend, db_path, NEW)
    try:
        txn = db.new_transaction()
        datum = caffe_pb2.Datum(channels=1, height=rows, width=cols)
        log.info("A total of %d items.", n)
        log.info("Rows: %d Cols: %d", rows, cols)
        count = 0
        for i in range(n):
            datum.data = images[i].tobytes()
            datum.label = int(signed_labels[i])
            txn.put(b"%08d" % i, datum.SerializeToString())
            count += 1
            if count % COMMIT_EVERY == 0:
                txn.commit()
        if count % COMMIT_EVERY != 0:
            txn.commit()
        log.info("Processed %d files.", count)
    finally:
        db.close()
    return count
