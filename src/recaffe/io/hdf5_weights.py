"""Caffe's HDF5 snapshot formats (``snapshot_format: HDF5``), written with h5py.

Weights (``.caffemodel.h5``): groups ``data/<layer>/<i>`` (and ``diff/<layer>/<i>`` with
``snapshot_diff``), one float dataset per param blob that owns its data (shared params are stored
once, under their owner). Solver state (``.solverstate.h5``): datasets ``iter``, ``learned_net``,
``current_step`` and group ``history/<i>``. Writes go to a temporary file renamed into place.

Reading trusts nothing in the file: only regular files are opened, only hard links followed (an
external link would open another file), datasets with external storage or virtual datasets (whose
"weights" would come from any other local file) are refused, and each dataset's shape is checked
against what the net expects before a byte of it is read (a tiny file can declare gigabytes).
"""
from __future__ import annotations

import os

import numpy as np

from ..blob import Blob
from ..errors import RecaffeError
from .protofiles import NotRegularFileError, atomic_target, check_regular_file


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
        check_regular_file(path)  # h5py would block on a FIFO
        return import_h5py().is_hdf5(path)
    except (OSError, HDF5FormatError):
        return False


def open_hdf5(path: str, what: str):
    """``h5py.File(path, "r")`` of a regular file; errors name the file."""
    h5py = import_h5py()
    try:
        check_regular_file(path, what)
        return h5py.File(path, "r")
    except NotRegularFileError as e:
        raise HDF5FormatError(str(e)) from None
    except FileNotFoundError:
        raise HDF5FormatError(f"{path}: file not found") from None
    except OSError as e:
        raise HDF5FormatError(f"{path}: cannot be read as HDF5 (the {what}): {e}") from None


def check_dataset(ds, where: str) -> None:
    """Refuse datasets whose data live outside the file: external storage or virtual datasets."""
    if ds.external:
        raise HDF5FormatError(f"{where}: the dataset's data are stored in external files "
                              f"({', '.join(repr(e[0]) for e in ds.external)}); refused")
    if ds.is_virtual:
        raise HDF5FormatError(f"{where}: a virtual dataset (its data are mapped from other datasets "
                              f"or files); refused")


def read_dataset(ds, where: str, shape: tuple | None = None, kinds: str = "fiu"):
    """The data of ``ds`` after checking where they live, their type and (if given) their shape."""
    check_dataset(ds, where)
    if ds.dtype.kind not in kinds:
        raise HDF5FormatError(f"{where}: has type {ds.dtype}, expected a numeric dataset")
    if shape is not None and tuple(ds.shape) != tuple(shape):
        raise HDF5FormatError(f"{where}: has shape {tuple(ds.shape)}, expected {tuple(shape)}")
    return ds[()]


def hard_links(h5py, group, where: str):
    """(name, item) of ``group``'s members, refusing soft and external links (Caffe writes none;
    an external link would open another file, a soft link may make a cycle)."""
    if not isinstance(group, h5py.Group):
        raise HDF5FormatError(f"{where}: is a {type(group).__name__}, expected a group")
    for key in group:
        link = group.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise HDF5FormatError(f"{where}/{key}: a {type(link).__name__}; only plain groups and "
                                  f"datasets are read")
        yield key, group[key]


def write_hdf5_atomically(path: str, write) -> None:
    """Create the HDF5 file `path` through write(h5py.File) on a temp file renamed into place."""
    h5py = import_h5py()
    with atomic_target(path) as tmp:
        # HDF5's own file lock would collide with atomic_target's flock on the temporary, which is
        # ours alone anyway.
        with h5py.File(tmp, "w", locking=False) as f:
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


_MAX_NESTING = 64  # groups within groups (layer names with '/'); more is a hard-link cycle


def _layer_groups(h5py, group, path: str, prefix: str = "", depth: int = 0):
    """(layer name, group) for every group under ``group``; nested groups are layers whose names
    hold '/' (their parent may be a layer too: MobileNet's conv1 and conv1/bn)."""
    if depth > _MAX_NESTING:
        raise HDF5FormatError(f"{path}: groups nested over {_MAX_NESTING} levels deep (a cycle?)")
    for key, item in hard_links(h5py, group, f"{path}: data/{prefix}".rstrip("/")):
        if isinstance(item, h5py.Group):
            yield prefix + key, item
            yield from _layer_groups(h5py, item, path, prefix + key + "/", depth + 1)


def load_net(net, path: str) -> None:
    from ..log import get_logger
    from ..net import WeightsError
    log = get_logger(__name__)
    h5py = import_h5py()
    try:
        with open_hdf5(path, "HDF5 weights") as f:
            if "data" not in f:
                raise WeightsError(f"{path}: not a Caffe HDF5 weights file (no 'data' group)")
            for name, group in _layer_groups(h5py, f["data"], path):
                if not net.has_layer(name):
                    if any(isinstance(v, h5py.Dataset) for v in group.values()):
                        log.info("Ignoring source layer %s", name)
                    continue
                layer_id = net.layer_names.index(name)
                target = net.layers[layer_id].blobs
                group = {k: v for k, v in hard_links(h5py, group, f"{path}: data/{name}")
                         if isinstance(v, h5py.Dataset)}
                if len(group) > len(target):
                    raise WeightsError(f"{path}: incompatible number of blobs for layer {name!r}")
                for j, blob in enumerate(target):
                    if str(j) not in group:
                        if net._param_owners[net.param_id(layer_id, j)] != -1:
                            continue  # a shared param: loaded with its owner
                        raise WeightsError(f"{path}: incompatible number of blobs for layer {name!r}")
                    ds = group[str(j)]
                    if tuple(ds.shape) != blob.shape:  # before reading: the file may declare any size
                        raise WeightsError(f"{path}: cannot copy param {j} weights from layer '{name}'; "
                                           f"shape mismatch. Source param shape is {tuple(ds.shape)}; target "
                                           f"param shape is {blob.shape}")
                    blob.data[...] = read_dataset(ds, f"{path}: data/{name}/{j}", blob.shape)
    except HDF5FormatError as e:
        raise WeightsError(str(e)) from None


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


_MAX_NAME_BYTES = 1 << 16  # learned_net: a file name


def load_state(path: str, history_shapes: list[tuple] | None = None
               ) -> tuple[int, str | None, int, list[np.ndarray]]:
    """(iter, learned_net or None, current_step, history arrays) from a ``.solverstate.h5``;
    ``history_shapes`` (the solver's history blobs) are checked before any history is read."""
    h5py = import_h5py()
    try:
        with open_hdf5(path, "HDF5 solver state") as f:
            try:
                scalars = {}
                for key in ("iter", "current_step"):
                    ds = f[key]
                    if ds.size != 1:
                        raise HDF5FormatError(f"{path}: {key!r} holds {ds.size} values, expected 1")
                    scalars[key] = int(np.asarray(read_dataset(ds, f"{path}: {key}", kinds="iu")).reshape(-1)[0])
                learned = None
                if "learned_net" in f:
                    ds = f["learned_net"]
                    check_dataset(ds, f"{path}: learned_net")
                    if ds.size != 1 or ds.dtype.kind not in "OSU" or ds.id.get_storage_size() > _MAX_NAME_BYTES:
                        raise HDF5FormatError(f"{path}: 'learned_net' is not a file name")
                    learned = ds[()]
                hist = f["history"]
                items = dict(hard_links(h5py, hist, f"{path}: history"))
                names = [str(i) for i in range(len(items))]
                if sorted(items) != sorted(names):
                    raise HDF5FormatError(f"{path}: history holds {sorted(items)}, expected datasets "
                                          f"0..{len(items) - 1}")
                if history_shapes is not None and len(items) != len(history_shapes):
                    raise HDF5FormatError(f"{path}: incorrect length of history blobs: the state has "
                                          f"{len(items)}, this net's solver needs {len(history_shapes)} (does "
                                          f"the state belong to this net and solver type?)")
                history = []
                for i, name in enumerate(names):
                    ds = items[name]
                    if history_shapes is not None and tuple(ds.shape) != tuple(history_shapes[i]):
                        raise HDF5FormatError(f"{path}: history blob {i} has shape {tuple(ds.shape)}, this "
                                              f"net's param {i} has shape {tuple(history_shapes[i])}: the state "
                                              f"belongs to another net")
                    history.append(read_dataset(ds, f"{path}: history/{name}", kinds="f"))
            except KeyError as e:
                raise HDF5FormatError(f"{path}: not a Caffe HDF5 solver state ({e})") from None
    except HDF5FormatError:
        raise
    except (IndexError, ValueError, TypeError, OSError, OverflowError, AttributeError) as e:
        # h5py reports a file that is not HDF5 as OSError, a wrong layout as KeyError/TypeError/...
        raise HDF5FormatError(f"{path}: not a Caffe HDF5 solver state ({type(e).__name__}: {e})") from None
    if isinstance(learned, bytes):
        try:
            learned = learned.decode("utf-8")
        except UnicodeDecodeError:
            raise HDF5FormatError(f"{path}: learned_net is not a UTF-8 file name") from None
    return scalars["iter"], learned, scalars["current_step"], history
