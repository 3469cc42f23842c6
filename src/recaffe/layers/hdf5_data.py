"""HDF5Data (rows of HDF5 datasets as tops) and HDF5Output (bottoms written to an HDF5 file),
with Caffe's semantics, through h5py."""
from __future__ import annotations

import os

import numpy as np
import torch

from .. import rng
from ..errors import RecaffeError
from ..io.hdf5_weights import HDF5FormatError, check_dataset, import_h5py, is_hdf5, write_hdf5_atomically
from ..io.protofiles import NotRegularFileError, check_regular_file, open_regular
from ..layer import Layer, register
from ..log import get_logger
from ..parallel import solver_rank_and_count
from ..proto import caffe_pb2

log = get_logger(__name__)


class HDF5DataError(RecaffeError, ValueError):
    """An HDF5 list file, file or dataset that cannot be used; the message names it."""


def read_hdf5_list(source: str) -> list[str]:
    """The HDF5 file names of a list file: whitespace-separated, as Caffe reads them (so names
    cannot contain spaces); relative names are relative to the working directory, as in Caffe."""
    try:
        with open_regular(source, "HDF5 list file", mode="r", encoding="utf-8",
                          errors="surrogateescape") as f:
            names = f.read().split()
    except OSError as e:
        raise HDF5DataError(f"Failed to open source file {source!r}: {e.strerror or e}") from None
    if not names:
        raise HDF5DataError(f"Must have at least 1 HDF5 filename listed in {source!r}")
    return names


# deflate, the strongest filter h5py reads without plugins, compresses at most about 1032:1
_MAX_COMPRESSION = 1032


def _filtered(ds) -> bool:
    return ds.id.get_create_plist().get_nfilters() > 0


def _check_storage(ds, where: str) -> None:
    """A dataset must store the data it declares: a few bytes of file cannot stand for gigabytes
    (unwritten chunks read as fill values; only compression may make the file smaller)."""
    stored = ds.id.get_storage_size()
    needed = ds.size * ds.dtype.itemsize
    if stored * (_MAX_COMPRESSION if _filtered(ds) else 1) < needed:
        raise HDF5DataError(f"{where}: declares shape {ds.shape} ({needed} bytes) but the file stores "
                            f"{stored} bytes of it (a truncated or crafted file)")


def load_hdf5_file(filename: str, dataset_names, np_dtype, row_shapes=None) -> list[np.ndarray]:
    """The named datasets of one file, read as ``np_dtype`` (float and integer datasets, as
    Caffe's ``hdf5_load_nd_dataset``). All must have at least one axis and the same row count,
    and rows of ``row_shapes`` when given. Everything is checked before any data is read."""
    h5py = import_h5py()
    try:
        check_regular_file(filename, "HDF5 data file")
        f = h5py.File(filename, "r")
    except NotRegularFileError as e:
        raise HDF5DataError(f"Failed opening HDF5 file {filename!r}: {e}") from None
    except (OSError, ValueError) as e:
        reason = "no such file" if not os.path.exists(filename) else str(e)
        raise HDF5DataError(f"Failed opening HDF5 file {filename!r}: {reason}") from None
    with f:
        datasets = []
        for i, name in enumerate(dataset_names):
            where = f"{filename}: dataset {name!r}"
            link = f.get(name, getlink=True)
            if link is not None and not isinstance(link, h5py.HardLink):
                raise HDF5DataError(f"{where} is a {type(link).__name__}; only plain datasets are read")
            ds = f.get(name)
            if not isinstance(ds, h5py.Dataset):
                raise HDF5DataError(f"{filename}: Failed to find HDF5 dataset {name!r} "
                                    f"(the file has: {', '.join(sorted(f.keys())) or 'nothing'})")
            try:
                check_dataset(ds, where)
            except HDF5FormatError as e:
                raise HDF5DataError(str(e)) from None
            if ds.dtype.kind not in "fiu":
                raise HDF5DataError(f"{where} has type {ds.dtype}; HDF5Data reads float or integer datasets")
            if ds.ndim < 1:
                raise HDF5DataError(f"{where} is a scalar; rows need a first axis")
            if row_shapes is not None and tuple(ds.shape[1:]) != tuple(row_shapes[i]):
                raise HDF5DataError(f"{where} has rows of shape {tuple(ds.shape[1:])}, but the top was "
                                    f"shaped {tuple(row_shapes[i])} from the first file")
            if ds.shape[0] != (datasets[0].shape[0] if datasets else ds.shape[0]):
                raise HDF5DataError(f"{where} has {ds.shape[0]} rows but {dataset_names[0]!r} has "
                                    f"{datasets[0].shape[0]}")
            _check_storage(ds, where)
            datasets.append(ds)
        if datasets[0].shape[0] == 0:
            raise HDF5DataError(f"{filename}: the datasets have no rows")
        return [np.asarray(ds[...], dtype=np_dtype) for ds in datasets]


@register("HDF5Data")
class HDF5DataLayer(Layer):
    """Rows of HDF5 datasets; each top is the dataset of the same name.

    ``hdf5_data_param.source`` lists the .h5 files. Each file is loaded whole; ``batch_size``
    rows are copied per forward, moving on to the next file at the end of one and wrapping around
    after the last. With ``shuffle``, the file order is shuffled at setup and at each wrap-around,
    and the row order within a file each time it is started, as in Caffe. Data are read as the
    net's float type; every file must give each top the same shape past the first axis. In
    data-parallel training (recaffe.parallel) a TRAIN layer of solver r of N reads rows r, r+N, ...
    """

    exact_num_bottom_blobs = 0
    min_top_blobs = 1

    def layer_setup(self, bottom, top):
        if self.layer_param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data (remove transform_param)")
        p = self.layer_param.hdf5_data_param
        if p.batch_size <= 0:
            raise self.error("hdf5_data_param.batch_size must be positive")
        self._names = list(self.layer_param.top)
        if len(self._names) != len(top):
            raise self.error("every top must be named: the names are the datasets read")
        self._np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        self._shuffle = bool(p.shuffle)
        self._rng = rng.layer_generator(self.name, self.phase, 0)
        log.info("Loading list of HDF5 filenames from: %s", p.source)
        try:
            self._files = read_hdf5_list(p.source)
        except HDF5DataError as e:
            raise self.error(str(e)) from None
        log.info("Number of HDF5 files: %d", len(self._files))
        self._file_order = np.arange(len(self._files))
        if self._shuffle:
            self._rng.shuffle(self._file_order)
        self._current_file = 0
        # Data parallelism (Caffe 1.0's HDF5DataLayer::Skip): solver r of N keeps the rows at
        # stream positions r, r+N, ...; TEST layers keep every row.
        self._rank, self._world = (0, 1) if self.phase == caffe_pb2.TEST else solver_rank_and_count()
        self._offset = 0
        self._shapes = None
        self._load_current_file()
        self._shapes = [a.shape[1:] for a in self._arrays]
        for t, shape in zip(top, self._shapes):
            t.reshape((p.batch_size, *shape))

    def _load_current_file(self) -> None:
        filename = self._files[self._file_order[self._current_file]]
        try:
            arrays = load_hdf5_file(filename, self._names, self._np_dtype, self._shapes)
        except HDF5DataError as e:
            raise self.error(str(e)) from None
        self._arrays = arrays
        self._rows = np.arange(arrays[0].shape[0])
        if self._shuffle:
            self._rng.shuffle(self._rows)
        self._current_row = 0
        log.debug("Successfully loaded %d rows", arrays[0].shape[0])

    def _next(self) -> None:
        """Caffe's HDF5DataLayer::Next: one row on; the next file (or the first) at a file's end."""
        self._current_row += 1
        if self._current_row == len(self._rows):
            if len(self._files) > 1:
                self._current_file += 1
                if self._current_file == len(self._files):
                    self._current_file = 0
                    if self._shuffle:
                        self._rng.shuffle(self._file_order)
                    log.debug("Looping around to first file.")
                self._load_current_file()
            self._current_row = 0
            if self._shuffle:
                self._rng.shuffle(self._rows)

    def reshape(self, bottom, top):
        pass  # shapes are fixed at setup

    def forward(self, bottom, top):
        batch = self.layer_param.hdf5_data_param.batch_size
        picks = [[] for _ in top]
        for _ in range(batch):
            while self._offset % self._world != self._rank:  # another solver's row
                self._offset += 1
                self._next()
            self._offset += 1
            row = self._rows[self._current_row]
            for j, a in enumerate(self._arrays):
                picks[j].append(a[row])
            self._next()
        for t, rows in zip(top, picks):
            t.data_t = torch.from_numpy(np.stack(rows)).to(self.device)


@register("HDF5Output")
class HDF5OutputLayer(Layer):
    """Writes its two bottoms to ``hdf5_output_param.file_name`` as the float datasets ``data``
    and ``label``, each in Caffe's legacy 4-D shape (num, channels, height, width).

    The datasets are written by the first forward; Caffe's second forward fails because the
    datasets exist (BVLC/caffe#1726), and so does recaffe's, with an error instead of overwriting
    the rows already saved. Caffe truncates the file when the net is built, whatever it is; recaffe
    only checks at setup that it can be written, and writes it at the first forward (atomically: a
    temporary file renamed into place), refusing to replace an existing file that is not HDF5.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 0

    def layer_setup(self, bottom, top):
        self._file_name = self.layer_param.hdf5_output_param.file_name
        if not self._file_name:
            raise self.error("hdf5_output_param.file_name is required")
        self._written = False
        self._check_target()
        folder = os.path.dirname(os.path.abspath(self._file_name))
        if not os.path.isdir(folder):
            raise self.error(f"Failed to open HDF5 file {self._file_name!r}: the folder {folder!r} "
                             f"does not exist")

    def _check_target(self) -> None:
        """An existing file_name may only be replaced if it is an HDF5 file (a previous output)."""
        name = self._file_name
        if os.path.lexists(name) and not (os.path.isfile(name) and is_hdf5(name)):
            what = "a directory" if os.path.isdir(name) else "not an HDF5 file"
            raise self.error(f"hdf5_output_param.file_name {name!r} exists and is {what}; refusing to "
                             f"overwrite it (remove it or choose another file_name)")

    def reshape(self, bottom, top):
        pass

    def _legacy_4d(self, blob, which: str) -> np.ndarray:
        if blob.num_axes > 4:
            raise self.error(f"the {which} bottom has {blob.num_axes} axes; HDF5Output saves at most 4")
        shape = (blob.num, blob.channels, blob.height, blob.width)
        return blob.data_t.detach().cpu().numpy().reshape(shape)

    def forward(self, bottom, top):
        if self._written:
            raise self.error(f"{self._file_name}: the datasets 'data' and 'label' were written by the "
                             f"first forward; Caffe's HDF5Output cannot write a second batch to the same "
                             f"file (it fails there too)")
        if bottom[0].num != bottom[1].num:
            raise self.error(f"data blob and label blob must have the same batch size "
                             f"({bottom[0].num} vs {bottom[1].num})")
        data, label = self._legacy_4d(bottom[0], "data"), self._legacy_4d(bottom[1], "label")
        self._check_target()
        log.info("Saving HDF5 file %s", self._file_name)

        def write(f):
            f.create_dataset("data", data=data)
            f.create_dataset("label", data=label)
        try:
            write_hdf5_atomically(self._file_name, write)
        except OSError as e:
            raise self.error(f"Failed to write HDF5 file {self._file_name!r}: {e}") from None
        self._written = True
        log.info("Successfully saved %d rows", data.shape[0])
