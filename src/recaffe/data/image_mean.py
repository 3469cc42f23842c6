"""The mean image of a database of Datums, as Caffe's ``compute_image_mean`` computes it.

Every record is decoded when it is an encoded image (with the file's own channels, as
``DecodeDatumNative``); its ``data`` bytes (or ``float_data``) are added to a running sum kept
in float32, as Caffe keeps it in the BlobProto's float ``data``, and the sum is divided by
the number of records. The result is a BlobProto with ``num`` 1 and the first record's
``channels``, ``height`` and ``width``. Every record must hold as many values as the first.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import RecaffeError
from ..log import get_logger
from ..proto import caffe_pb2
from .db import READ, open_db
from .transformer import TransformError, decode_image

log = get_logger(__name__)

LOG_EVERY = 10000


class ImageMeanError(RecaffeError, ValueError):
    """A database whose mean cannot be computed; the message names the database (and record)."""


def _values(datum: caffe_pb2.Datum, where: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The datum's values (flat; uint8 or float32) and its shape, decoding encoded images."""
    if datum.encoded:
        try:
            chw = decode_image(datum.data)
        except TransformError as e:
            raise ImageMeanError(f"{where}: {e}") from None
        return chw.reshape(-1), chw.shape
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8), shape
    return np.asarray(datum.float_data, dtype=np.float32), shape


def compute_image_mean(db_path: str | os.PathLike, backend: str = "lmdb") -> caffe_pb2.BlobProto:
    """The mean of every record of the database as a (1, C, H, W) BlobProto."""
    db_path = os.fspath(db_path)
    db = open_db(backend, db_path, READ)
    try:
        cursor = db.new_cursor()
        if not cursor.valid():
            raise ImageMeanError(f"{db.backend} {db_path!r} holds no records: there is no mean to compute")
        total: np.ndarray | None = None
        shape = (0, 0, 0)
        count = 0
        for key, value in cursor:
            where = f"{db.backend} {db_path!r}, record {key.decode('utf-8', 'replace')!r}"
            try:
                datum = caffe_pb2.Datum.FromString(value)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
                raise ImageMeanError(f"{where}: not a Datum ({e})") from None
            values, datum_shape = _values(datum, where)
            if total is None:
                if datum.encoded:
                    log.info("Decoding Datum")
                shape = datum_shape
                total = np.zeros(values.size, dtype=np.float32)
                log.info("Starting Iteration")
            expected = shape[0] * shape[1] * shape[2]
            if values.size != expected:
                raise ImageMeanError(
                    f"{where}: Incorrect data field size {values.size}: the record is "
                    f"{'x'.join(map(str, datum_shape))}, the first record {'x'.join(map(str, shape))} "
                    f"({expected} values)")
            total += values  # float32 running sum, as Caffe's
            count += 1
            if count % LOG_EVERY == 0:
                log.info("Processed %d files.", count)
        cursor.close()
    finally:
        db.close()
    if count % LOG_EVERY != 0:
        log.info("Processed %d files.", count)
    mean = total / np.float32(count)
    c, h, w = shape
    return caffe_pb2.BlobProto(num=1, channels=c, height=h, width=w, data=mean.tolist())


def channel_means(blob: caffe_pb2.BlobProto) -> list[float]:
    """Each channel's mean value, summed in float32 as Caffe's tool logs them."""
    data = np.asarray(blob.data, dtype=np.float32)
    dim = blob.height * blob.width
    means = []
    for c in range(blob.channels):
        plane = data[c * dim:(c + 1) * dim]
        acc = np.add.accumulate(plane, dtype=np.float32)[-1] if dim else np.float32(0)
        means.append(float(acc / np.float32(dim)) if dim else 0.0)
    return means
