"""CIFAR-10's binary batches -> databases of Datums, as Caffe's ``convert_cifar_data`` writes them.

A batch file (``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``) is a run of
3,073-byte records: one label byte, then 3,072 pixel bytes, the 32x32 red plane, then green,
then blue. Caffe copies the pixel bytes as they are, so the Datums (channels 3, height 32,
width 32) hold the planes in R, G, B order, not OpenCV's BGR. The label is read as a C
``char``, as Caffe does. Keys are ``"%05d"`` of the record's index over the training files
(``file_index * 10000 + item``, the count of records before it for the real 10,000-record
files) or in the test file.

Where we differ: Caffe reads exactly 10,000 records per file; we read every whole record a
file holds (so small files work) and refuse a file whose size is not a whole number of
records. All input files are checked before a database is created, and the data are
committed every 1,000 records (Caffe commits each database once; the contents are the same).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import RecaffeError
from ..log import get_logger
from ..proto import caffe_pb2
from .db import NEW, DBError, open_db

log = get_logger(__name__)

SIZE = 32
IMAGE_BYTES = 3 * SIZE * SIZE
RECORD_BYTES = 1 + IMAGE_BYTES
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
COMMIT_EVERY = 1000


class CifarFormatError(RecaffeError, ValueError):
    """A CIFAR batch file that is missing or malformed; the message names the file."""


def read_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A batch file -> (labels as int8, images as uint8 (N, 3, 32, 32) in R, G, B plane order)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CifarFormatError(f"Unable to open file {path}: no such file") from None
    except OSError as e:
        raise CifarFormatError(f"Unable to open file {path}: {e.strerror}") from None
    if len(raw) % RECORD_BYTES:
        raise CifarFormatError(f"{path}: {len(raw)} bytes is not a whole number of {RECORD_BYTES}-byte "
                               f"CIFAR-10 records (1 label byte + {IMAGE_BYTES} pixel bytes)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    return records[:, 0].view(np.int8).copy(), records[:, 1:].reshape(-1, 3, SIZE, SIZE)


def _write(db_path: str, batches: list[tuple[np.ndarray, np.ndarray]], backend: str) -> int:
    db = open_db(backend, db_path, NEW)
    try:
        txn = db.new_transaction()
        datum = caffe_pb2.Datum(channels=3, height=SIZE, width=SIZE)
        index = 0
        for labels, images in batches:
            for label, image in zip(labels, images):
                datum.label = int(label)
                datum.data = image.tobytes()
                txn.put(b"%05d" % index, datum.SerializeToString())
                index += 1
                if index % COMMIT_EVERY == 0:
                    txn.commit()
        txn.commit()
    finally:
        db.close()
    return index


def convert_cifar(input_folder: str | os.PathLike, output_folder: str | os.PathLike,
                  db_type: str = "lmdb") -> tuple[int, int]:
    """Write ``cifar10_train_<db_type>`` and ``cifar10_test_<db_type>`` in ``output_folder``;
    returns the numbers of training and test records."""
    input_folder, output_folder = os.fspath(input_folder), os.fspath(output_folder)
    train = [read_batch(os.path.join(input_folder, name)) for name in TRAIN_FILES]
    test = read_batch(os.path.join(input_folder, TEST_FILE))
    outputs = [os.path.join(output_folder, f"cifar10_{part}_{db_type}") for part in ("train", "test")]
    for path in outputs:
        if os.path.exists(path):
            raise DBError(f"cannot create {path!r}: it already exists (remove it or choose another folder)")
    log.info("Writing Training data")
    for i, (labels, _) in enumerate(train, 1):
        log.info("Training Batch %d (%d images)", i, len(labels))
    n_train = _write(outputs[0], train, db_type)
    log.info("Writing Testing data")
    n_test = _write(outputs[1], [test], db_type)
    return n_train, n_test
