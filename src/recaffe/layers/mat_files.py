"""MATLAB files: DeepLab v2's MatWrite layer, and the MAT v5 writer/reader it uses.

DeepLab writes its score maps with matio (``Mat_Create`` + ``Mat_VarWrite``, uncompressed MAT
version 5). recaffe writes the same layout itself, so it needs no scipy or matio: one variable
``data`` of class single (double for float64 nets) and dimensions [W, H, C, N], the blob's
row-major (N, C, H, W) bytes read in MATLAB's column-major order, so ``data(w, h, c, n)`` in
MATLAB is the blob's ``[n, c, h, w]``. :func:`read_mat` reads such files back (tests, tools).
"""
from __future__ import annotations

import os
import struct

import numpy as np

from ..layer import Layer, register
from ..log import get_logger

log = get_logger(__name__)

_MI_INT8, _MI_INT32, _MI_UINT32, _MI_SINGLE, _MI_DOUBLE, _MI_MATRIX = 1, 5, 6, 7, 9, 14
_MX_DOUBLE, _MX_SINGLE = 6, 7
_CLASS_OF = {np.dtype(np.float32): (_MX_SINGLE, _MI_SINGLE), np.dtype(np.float64): (_MX_DOUBLE, _MI_DOUBLE)}
_DTYPE_OF = {_MI_SINGLE: np.dtype("<f4"), _MI_DOUBLE: np.dtype("<f8")}


class MatFileError(ValueError):
    """A MAT file that cannot be written or read; the message names the file."""


def _element(mi_type: int, payload: bytes) -> bytes:
    """A MAT v5 data element: tag (type, byte count) and the payload padded to 8 bytes."""
    return struct.pack("<II", mi_type, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def mat_bytes(name: str, array: np.ndarray, dims) -> bytes:
    """A MAT v5 file holding one real numeric variable ``name``: ``array``'s bytes in C order,
    read by MATLAB column-major with dimensions ``dims`` (whose product must be its size)."""
    array = np.ascontiguousarray(array)
    if array.dtype not in _CLASS_OF:
        array = array.astype(np.float64)
    mx_class, mi_type = _CLASS_OF[array.dtype]
    dims = [int(d) for d in dims]
    if int(np.prod(dims)) != array.size:
        raise ValueError(f"dims {dims} do not hold {array.size} values")
    header = b"MATLAB 5.0 MAT-file, written by recaffe (Caffe's MatWrite)".ljust(116, b" ")
    header += b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    body = (_element(_MI_UINT32, struct.pack("<II", mx_class, 0))
            + _element(_MI_INT32, struct.pack(f"<{len(dims)}i", *dims))
            + _element(_MI_INT8, name.encode("ascii"))
            + _element(mi_type, array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()))
    return header + _element(_MI_MATRIX, body)


def write_blob_mat(path: str | os.PathLike, data: np.ndarray) -> None:
    """DeepLab's WriteBlobToMat: a 4-D (or fewer axes, padded as Caffe's legacy num/channels/
    height/width) blob as variable ``data`` with dimensions [W, H, C, N]."""
    shape = tuple(data.shape)
    if len(shape) > 4:
        raise MatFileError(f"{path}: a blob of {len(shape)} axes {shape} has no [W, H, C, N] layout")
    n, c, h, w = (shape + (1,) * 4)[:4] if len(shape) < 4 else shape
    try:
        with open(path, "wb") as f:
            f.write(mat_bytes("data", data, [w, h, c, n]))
    except OSError as e:
        raise MatFileError(f"cannot write the MAT file {os.fspath(path)!r}: {e.strerror or e}") from None


def read_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The real numeric variables of an uncompressed MAT v5 file, as numpy arrays in MATLAB's
    dimension order (``arr[i, j, ...]`` is MATLAB's ``x(i+1, j+1, ...)``)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 128 or raw[126:128] != b"IM":
        raise MatFileError(f"{os.fspath(path)!r} is not a little-endian MAT v5 file")
    out, pos = {}, 128
    while pos + 8 <= len(raw):
        mi_type, size = struct.unpack_from("<II", raw, pos)
        start, pos = pos + 8, pos + 8 + size + (-size % 8)
        if mi_type != _MI_MATRIX:
            raise MatFileError(f"{os.fspath(path)!r}: element type {mi_type} is not supported (only "
                               f"uncompressed numeric matrices)")
        subs, p = [], start
        while p < start + size:
            t, n = struct.unpack_from("<II", raw, p)
            if t >> 16:  # the small element format: 4 bytes of data inside the tag
                t, n = t & 0xFFFF, t >> 16
                subs.append((t, raw[p + 4:p + 4 + n]))
                p += 8
            else:
                subs.append((t, raw[p + 8:p + 8 + n]))
                p += 8 + n + (-n % 8)
        dims = np.frombuffer(subs[1][1], dtype="<i4")
        name = subs[2][1].decode("ascii")
        t, data = subs[3]
        if t not in _DTYPE_OF:
            raise MatFileError(f"{os.fspath(path)!r}: variable {name!r} has data type {t} "
                               f"(only single/double)")
        out[name] = np.frombuffer(data, dtype=_DTYPE_OF[t]).reshape(tuple(dims), order="F")
    return out


@register("MatWrite")
class MatWriteLayer(Layer):
    """DeepLab v2's MatWrite: every ``period``-th forward writes each bottom i to
    ``prefix + name + "_blob_<i>.mat"`` (a MAT v5 file, see :func:`write_blob_mat`), where name is
    the forward's line of ``source`` (its first token, less ``strip`` trailing characters) or
    ``iter_<k>`` without a source. The k-th forward counts from 0; running past the list is an
    error, as is a missing output folder (matio's ``Mat_Create`` fails there too). No tops, no
    backward.
    """

    min_bottom_blobs = 1
    exact_num_top_blobs = 0

    def layer_setup(self, bottom, top):
        p = self.layer_param.mat_write_param
        self.iter = 0
        self.prefix = p.prefix
        self.period = p.period
        if self.period <= 0:
            raise self.error(f"period must be positive, got {self.period}")
        self.names = None
        if p.HasField("source"):
            if p.strip < 0:
                raise self.error(f"strip cannot be negative, got {p.strip}")
            try:
                with open(p.source, encoding="utf-8", errors="surrogateescape") as f:
                    lines = f.read().split("\n")
            except OSError as e:
                raise self.error(f"failed to open source file {p.source!r}: {e.strerror or e}") from None
            self.names = []
            for lineno, line in enumerate(lines, 1):
                tokens = line.split()
                if not tokens:
                    continue  # blank lines are skipped (the fork aborts on them: "too much stripping")
                if len(tokens[0]) <= p.strip:
                    raise self.error(f"{p.source}:{lineno}: too much stripping ({p.strip} characters of "
                                     f"{tokens[0]!r})")
                self.names.append(tokens[0][:len(tokens[0]) - p.strip])
            log.info("MatWrite will save a maximum of %d files.", len(self.names))

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        if self.iter % self.period == 0:
            if self.names is not None:
                if self.iter >= len(self.names):
                    raise self.error(f"forward {self.iter} has no name: the source list holds "
                                     f"{len(self.names)} (the test ran for more iterations than listed)")
                name = self.names[self.iter]
            else:
                name = f"iter_{self.iter}"
            for i, b in enumerate(bottom):
                path = f"{self.prefix}{name}_blob_{i}.mat"
                try:
                    write_blob_mat(path, b.data)
                except MatFileError as e:
                    raise self.error(str(e)) from None
        self.iter += 1

    def backward(self, top, propagate_down, bottom):
        pass

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False
