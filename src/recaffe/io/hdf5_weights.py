"""Caffe's HDF5 snapshot formats (``snapshot_format: HDF5``), written with h5py.

Weights (``.caffemodel.h5``): groups ``data/<layer>/<i>`` (and ``diff/<layer>/<i>`` with
``snapshot_diff``), one float dataset per param blob that owns its data (shared params are stored
once, under their owner). Solver state (``.solverstate.h5``): datasets ``iter``, ``learned_net``,
``current_step`` and group ``history/<i>``. Writes go to a temporary file renamed into place.
"""
from __future__ import annotations

import os

import numpy as np

from ..blob import Blob
from ..errors import RecaffeError
from .protofiles import atomic_target


class HDF5FormatError(RecaffeError, ValueError):
    pass


def import_h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a dependency
        raise HDF5FormatError("HDF5 files need the h5py package (pip install h5py)") from e
    return h5py


def is_hdf5(path: str) -> bool:
    try:
        return import_h5py().is_hdf5(path)
    except (OSError, HDF5FormatError):
        return False


def write_hdf5_atomically(path: str, write) -> None:
    """Create the HDF5 file `path` through write(h5py.File) on a temp file renamed into place."""
    h5py = import_h5py()
    with atomic_target(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write(f)


def _array(blob: Blob, diff: bool = False) -> np.ndarray:
    t = blob.diff_t if diff else blob.data_t
    return t.detach().cpu().numpy().astype(np.float32 if blob.dtype != np.float64 else np.float64)


def save_net(net, path: str, write_diff: bool = False) -> None:
    def write(f):
        data = f.create_group("data")
        diff = f.create_group("diff") if write_diff else None
        for layer_id, (name, layer) in enumerate(zip(net.layer_names, net.layers)):
            # A '/' in a layer name (GoogLeNet's conv1/7x7_s2) makes nested groups; load_net walks
            # them. (Caffe's own HDF5 writer aborts on such names.)
            g = data.require_group(name)
            gd = diff.require_group(name) if diff is not None else None
            for j, blob in enumerate(layer.blobs):
                net_param_id = net.param_id(layer_id, j)
                if net._param_owners[net_param_id] == -1:
                    g.create_dataset(str(j), data=_array(blob))
                if gd is not None:
                    gd.create_dataset(str(j), data=_array(blob, diff=True))
    write_hdf5_atomically(os.fspath(path), write)


def _layer_groups(h5py, group, prefix: str = ""):
    """(layer name, group) for every group under ``group``; nested groups are layers whose names
    hold '/' (their parent may be a layer too: MobileNet's conv1 and conv1/bn)."""
    for key, item in group.items():
        if isinstance(item, h5py.Group):
            yield prefix + key, item
            yield from _layer_groups(h5py, item, prefix + key + "/")


def load_net(net, path: str) -> None:
    from ..log import get_logger
    from ..net import WeightsError
    log = get_logger(__name__)
    h5py = import_h5py()
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise WeightsError(f"{path}: not a Caffe HDF5 weights file (no 'data' group)")
        for name, group in _layer_groups(h5py, f["data"]):
            if not net.has_layer(name):
                if any(isinstance(v, h5py.Dataset) for v in group.values()):
                    log.info("Ignoring source layer %s", name)
                continue
            layer_id = net.layer_names.index(name)
            target = net.layers[layer_id].blobs
            group = {k: v for k, v in group.items() if isinstance(v, h5py.Dataset)}
            if len(group) > len(target):
                raise WeightsError(f"{path}: incompatible number of blobs for layer {name!r}")
            for j, blob in enumerate(target):
                if str(j) not in group:
                    if net._param_owners[net.param_id(layer_id, j)] != -1:
                        continue  # a shared param: loaded with its owner
                    raise WeightsError(f"{path}: incompatible number of blobs for layer {name!r}")
                values = group[str(j)][()]
                if tuple(values.shape) != blob.shape:
                    raise WeightsError(f"{path}: cannot copy param {j} weights from layer '{name}'; shape "
                                       f"mismatch. Source param shape is {tuple(values.shape)}; target param "
                                       f"shape is {blob.shape}")
                blob.data[...] = values


def save_state(path: str, iteration: int, learned_net: str, current_step: int, history: list[Blob]) -> None:
    h5py = import_h5py()

    def write(f):
        f.create_dataset("iter", data=np.array([iteration], np.int32))
        f.create_dataset("learned_net", data=learned_net, dtype=h5py.string_dtype())
        f.create_dataset("current_step", data=np.array([current_step], np.int32))
        g = f.create_group("history")
        for i, h in enumerate(history):
            g.create_dataset(str(i), data=_array(h))
    write_hdf5_atomically(os.fspath(path), write)


def load_state(path: str) -> tuple[int, str | None, int, list[np.ndarray]]:
    """(iter, learned_net or None, current_step, history arrays) from a ``.solverstate.h5``."""
    h5py = import_h5py()
    try:
        with h5py.File(path, "r") as f:
            it = int(np.asarray(f["iter"][()]).reshape(-1)[0])
            step = int(np.asarray(f["current_step"][()]).reshape(-1)[0])
            learned = f["learned_net"][()] if "learned_net" in f else None
            hist = f["history"]
            history = [np.asarray(hist[str(i)][()]) for i in range(len(hist))]
        if isinstance(learned, np.ndarray) and learned.size == 1:
            learned = learned.reshape(-1)[0]
        if isinstance(learned, bytes):
            learned = learned.decode("utf-8")
        if learned is not None and not isinstance(learned, str):
            raise TypeError(f"learned_net is a {type(learned).__name__}, not a string")
    except FileNotFoundError:
        raise HDF5FormatError(f"{path}: file not found") from None
    except (KeyError, IndexError, ValueError, TypeError, OSError, OverflowError, UnicodeDecodeError) as e:
        # h5py reports a file that is not HDF5 as OSError, a wrong layout as KeyError/TypeError/...
        raise HDF5FormatError(f"{path}: not a Caffe HDF5 solver state ({type(e).__name__}: {e})") from None
    return it, learned, step, history
