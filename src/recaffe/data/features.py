"""Features of a net's blobs -> databases of Datums, as Caffe's ``extract_features`` writes them.

The net runs forward ``num_mini_batches`` times (its data layers supply the inputs). After each
pass, every item ``n`` of each named blob becomes a Datum with ``channels``, ``height`` and
``width`` the blob's legacy shape (axes 1, 2, 3; missing axes are 1) and ``float_data`` the
item's values, stored under the key ``"%010d"`` of the item's running index, one database per
blob, committed every 1,000 items.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..errors import RecaffeError
from ..log import get_logger
from ..proto import caffe_pb2
from .db import NEW, open_db

log = get_logger(__name__)

COMMIT_EVERY = 1000


class FeatureError(RecaffeError, ValueError):
    """Blob names or databases that do not fit the net; the message says which."""


def extract_features(net, blob_names: Sequence[str], db_paths: Sequence[str | os.PathLike],
                     num_mini_batches: int, backend: str = "lmdb", source: str = "the network") -> list[int]:
    """Run ``net`` and write each blob's features to its database (which must not exist yet).

    Returns the number of items written per blob. ``source`` names the net in error messages.
    """
    blob_names, db_paths = list(blob_names), [os.fspath(p) for p in db_paths]
    if len(blob_names) != len(db_paths):
        raise FeatureError(f"the number of blob names ({len(blob_names)}) and dataset names "
                           f"({len(db_paths)}) must be equal")
    for name in blob_names:
        if not net.has_blob(name):
            raise FeatureError(f"Unknown feature blob name {name} in the network {source} "
                               f"(blobs: {', '.join(net.blobs)})")
        axes = net.blob_by_name(name).num_axes
        if axes > 4:
            # Caffe's legacy num/channels/height/width accessors stop here (CHECK_LE 4 axes).
            raise FeatureError(f"feature blob {name} of the network {source} has {axes} axes; a Datum "
                               f"holds at most 4 (num, channels, height, width)")
    dbs, txns = [], []
    try:
        for path in db_paths:
            log.info("Opening dataset %s", path)
            db = open_db(backend, path, NEW)
            dbs.append(db)
            txns.append(db.new_transaction())
        log.info("Extracting Features")
        counts = [0] * len(blob_names)
        for _ in range(num_mini_batches):
            net.forward_from_to()
            for i, name in enumerate(blob_names):
                blob = net.blob_by_name(name)
                items = np.asarray(blob.data, dtype=np.float32).reshape(blob.legacy_shape(0), -1)
                datum = caffe_pb2.Datum(channels=blob.legacy_shape(1), height=blob.legacy_shape(2),
                                        width=blob.legacy_shape(3))
                for values in items:
                    del datum.float_data[:]
                    datum.float_data.extend(values.tolist())
                    txns[i].put(b"%010d" % counts[i], datum.SerializeToString())
                    counts[i] += 1
                    if counts[i] % COMMIT_EVERY == 0:
                        txns[i].commit()
                        log.info("Extracted features of %d query images for feature blob %s", counts[i], name)
        for i, name in enumerate(blob_names):
            if counts[i] % COMMIT_EVERY != 0:
                txns[i].commit()
            log.info("Extracted features of %d query images for feature blob %s", counts[i], name)
    finally:
        for db in dbs:
            db.close()
    log.info("Successfully extracted the features!")
    return counts
