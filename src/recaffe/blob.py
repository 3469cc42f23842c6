"""Blob: Caffe's N-d array with a ``data`` and a ``diff`` of the same shape.

Layers compute on torch tensors (``data_t``/``diff_t``) on the net's device; Python users see
writable numpy arrays (``data``/``diff``) exactly as in pycaffe: writing into them changes what
the next forward/backward/update uses.

On CPU the numpy array is a zero-copy view of the tensor. On CUDA a host copy is kept with a
"head" flag, as Caffe's SyncedMemory does: reading ``.data`` copies device to host and marks the
host as possibly newer; the next ``data_t`` read by a layer copies it back.

Memory is allocated lazily: ``reshape`` records the shape, and the first access allocates zeros.
A layer that computes a fresh tensor hands it over with ``blob.data_t = t`` (no copy), so an
activation's buffer may change from one forward to the next; parameters are always updated in
place, so arrays taken from ``net.params`` stay live across solver steps.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from .errors import RecaffeError
from .proto import caffe_pb2

MAX_BLOB_AXES = 32
MAX_BLOB_COUNT = 2**31 - 1  # Caffe's Blob::Reshape: "blob size exceeds INT_MAX"


class BlobError(RecaffeError, ValueError):
    """A shape a blob cannot take, or a BlobProto whose values do not fit its shape."""


class _Synced:
    """One tensor (data or diff) with an optional host mirror for non-CPU devices."""

    __slots__ = ("tensor", "host", "host_newer")

    def __init__(self, tensor: torch.Tensor | None = None):
        self.tensor = tensor
        self.host: np.ndarray | None = None
        self.host_newer = False


class Blob:
    __slots__ = ("_shape", "_data", "_diff", "dtype", "device", "_on_cpu")

    def __init__(self, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.dtype = dtype
        self.device = torch.device(device)
        self._on_cpu = self.device.type == "cpu"
        self._shape: tuple[int, ...] = ()
        self._data = _Synced()
        self._diff = _Synced()
        self.reshape(shape)

    # ----------------------------------------------------------------- shape
    def reshape(self, *shape) -> None:
        """Change the shape; contents survive when the element count is unchanged (as a view)."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if shape == self._shape:
            return
        if len(shape) > MAX_BLOB_AXES:
            raise BlobError(f"blob shape {shape} has more than {MAX_BLOB_AXES} axes")
        if any(d < 0 for d in shape):
            raise BlobError(f"blob shape {shape} has a negative dimension")
        count = _prod(shape)
        if count > MAX_BLOB_COUNT:
            raise BlobError(f"blob shape {shape} holds {count} values: blob size exceeds INT_MAX (as in Caffe)")
        if not count and _prod(d for d in shape if d) > MAX_BLOB_COUNT:
            # Caffe checks only until an axis is 0; but layers size their work by the other axes
            # (pooling windows, masks), so a (0, C, 50000, 50000) blob is refused as well
            raise BlobError(f"blob shape {shape}: its non-zero axes hold more than INT_MAX values")
        same_count = count == _prod(self._shape)
        self._shape = shape
        for s in (self._data, self._diff):
            if s.tensor is not None and same_count:
                self._pull(s)
                s.tensor = s.tensor.reshape(shape)
            else:
                s.tensor = None
            s.host = None
            s.host_newer = False

    def reshape_like(self, other: "Blob") -> None:
        self.reshape(other._shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def num_axes(self) -> int:
        return len(self._shape)

    def count(self, start: int = 0, end: int | None = None) -> int:
        return _prod(self._shape[start:end])

    def canonical_axis_index(self, axis: int) -> int:
        n = len(self._shape)
        if not -n <= axis < max(n, 1):
            raise IndexError(f"axis {axis} out of range for a {n}-D blob of shape {self._shape}")
        return axis + n if axis < 0 else axis

    def legacy_shape(self, index: int) -> int:
        """Caffe's num/channels/height/width accessors: missing axes count as 1."""
        if not -4 <= index < 4:
            raise IndexError(index)
        if index >= len(self._shape) or index < -len(self._shape):
            return 1
        return self._shape[index]

    num = property(lambda self: self.legacy_shape(0))
    channels = property(lambda self: self.legacy_shape(1))
    height = property(lambda self: self.legacy_shape(2))
    width = property(lambda self: self.legacy_shape(3))

    # ------------------------------------------------------------- tensors
    def _alloc(self) -> torch.Tensor:
        return torch.zeros(self._shape, dtype=self.dtype, device=self.device)

    def _pull(self, s: _Synced) -> None:
        """Bring host edits (non-CPU devices) back to the device tensor."""
        if s.host_newer:
            s.tensor.copy_(torch.from_numpy(s.host))
            s.host_newer = False

    def _tensor(self, s: _Synced) -> torch.Tensor:
        if s.tensor is None:
            s.tensor = self._alloc()
        elif s.host_newer:
            self._pull(s)
        return s.tensor

    def _set(self, s: _Synced, t: torch.Tensor) -> None:
        if t.shape != self._shape:
            raise ValueError(f"tensor of shape {tuple(t.shape)} given to a blob of shape {self._shape}")
        s.tensor = t
        s.host = None
        s.host_newer = False

    def _numpy(self, s: _Synced) -> np.ndarray:
        t = self._tensor(s)
        if self._on_cpu:
            return t.numpy()
        if s.host is None or not s.host_newer:
            s.host = t.detach().cpu().numpy()
        s.host_newer = True
        return s.host

    @property
    def data_t(self) -> torch.Tensor:
        s = self._data
        if self._on_cpu and s.tensor is not None:
            return s.tensor
        return self._tensor(s)

    @data_t.setter
    def data_t(self, t: torch.Tensor) -> None:
        self._set(self._data, t)

    @property
    def diff_t(self) -> torch.Tensor:
        s = self._diff
        if self._on_cpu and s.tensor is not None:
            return s.tensor
        return self._tensor(s)

    @diff_t.setter
    def diff_t(self, t: torch.Tensor) -> None:
        self._set(self._diff, t)

    @property
    def data(self) -> np.ndarray:
        return self._numpy(self._data)

    @data.setter
    def data(self, value) -> None:
        self.data[...] = value

    @property
    def diff(self) -> np.ndarray:
        return self._numpy(self._diff)

    @diff.setter
    def diff(self, value) -> None:
        self.diff[...] = value

    def share_data(self, other: "Blob") -> None:
        """Use ``other``'s data tensor (same count), as Caffe's ShareData."""
        if other.count() != self.count():
            raise ValueError(f"cannot share data: counts {other.count()} and {self.count()} differ")
        self._data.tensor = other.data_t.reshape(self._shape)

    def share_diff(self, other: "Blob") -> None:
        if other.count() != self.count():
            raise ValueError(f"cannot share diff: counts {other.count()} and {self.count()} differ")
        self._diff.tensor = other.diff_t.reshape(self._shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Move this blob's storage to another device and/or dtype (in place)."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        for s in (self._data, self._diff):
            if s.tensor is not None:
                self._pull(s)
                s.tensor = s.tensor.to(device=device, dtype=dtype)
            s.host = None
            s.host_newer = False
        self.device, self.dtype, self._on_cpu = device, dtype, device.type == "cpu"

    # -------------------------------------------------------------- proto
    def shape_equals(self, proto: caffe_pb2.BlobProto) -> bool:
        if proto.HasField("num") or proto.HasField("channels") or proto.HasField("height") \
                or proto.HasField("width"):
            # Legacy 4-D shapes match a blob of up to 4 axes padded with leading 1s.
            return (len(self._shape) <= 4 and self.legacy_shape(-4) == proto.num
                    and self.legacy_shape(-3) == proto.channels and self.legacy_shape(-2) == proto.height
                    and self.legacy_shape(-1) == proto.width)
        return tuple(proto.shape.dim) == self._shape

    def from_proto(self, proto: caffe_pb2.BlobProto, reshape: bool = True, where: str = "") -> None:
        """Load data (and diff, when present) from a BlobProto, float or double. As Caffe's
        Blob::FromProto, the data must hold exactly one value per element (and so must the diff
        when it is present); ``where`` (file, layer, param index) starts the error message."""
        where = f"{where}: " if where else ""
        shape = proto_shape(proto)
        if reshape:
            try:
                self.reshape(shape)
            except BlobError as e:
                raise BlobError(f"{where}{e}") from None
        elif not self.shape_equals(proto):
            raise BlobError(f"{where}cannot copy a blob of shape {shape} into one of shape {self._shape}")
        n = self.count()
        values = _proto_values(proto, "data")
        got = 0 if values is None else values.size
        if got != n:
            raise BlobError(f"{where}the blob holds {got} data values for its shape {shape} ({n} values): "
                            "the file is truncated or corrupt")
        # Copy into the existing tensors: numpy views users hold and shared params stay live.
        if values is not None:
            self.data_t.copy_(_to_tensor(values.reshape(self._shape), self))
        diff = _proto_values(proto, "diff")
        if diff is not None:
            if diff.size != n:
                raise BlobError(f"{where}the blob holds {diff.size} diff values for its shape {shape} "
                                f"({n} values): the file is truncated or corrupt")
            self.diff_t.copy_(_to_tensor(diff.reshape(self._shape), self))

    def to_proto(self, write_diff: bool = False) -> caffe_pb2.BlobProto:
        proto = caffe_pb2.BlobProto()
        proto.shape.dim.extend(self._shape)
        prefix = "double_" if self.dtype == torch.float64 else ""
        set_packed_values(proto, prefix + "data", self.data_t.detach().cpu().numpy())
        if write_diff:
            set_packed_values(proto, prefix + "diff", self.diff_t.detach().cpu().numpy())
        return proto

    def __repr__(self) -> str:
        return f"Blob(shape={self._shape}, dtype={self.dtype}, device={self.device})"


def set_packed_values(proto: caffe_pb2.BlobProto, field: str, values) -> None:
    """Append ``values`` to the packed float/double field ``field`` (data, diff, double_data,
    double_diff) as one wire-format chunk: protobuf parses it in one copy, where extending the
    repeated field element by element costs about a microsecond per value."""
    dtype = "<f8" if field.startswith("double_") else "<f4"
    raw = np.ascontiguousarray(values, dtype=dtype).tobytes()
    if not raw:
        return
    n, length = len(raw), bytearray()
    while True:  # the byte length as a varint
        length.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    number = caffe_pb2.BlobProto.DESCRIPTOR.fields_by_name[field].number  # 5, 6, 8, 9: one-byte tags
    proto.MergeFromString(bytes([number << 3 | 2]) + bytes(length) + raw)


def proto_shape(proto: caffe_pb2.BlobProto) -> tuple[int, ...]:
    """The shape a BlobProto describes: ``shape.dim``, or the legacy num/channels/height/width."""
    if proto.HasField("num") or proto.HasField("channels") or proto.HasField("height") \
            or proto.HasField("width"):
        return (proto.num, proto.channels, proto.height, proto.width)
    return tuple(proto.shape.dim)


def _proto_values(proto: caffe_pb2.BlobProto, which: str) -> np.ndarray | None:
    doubles = getattr(proto, "double_" + which)
    if len(doubles):
        return np.asarray(doubles, dtype=np.float64)
    floats = getattr(proto, which)
    if len(floats):
        return np.asarray(floats, dtype=np.float32)
    return None


def _to_tensor(values: np.ndarray, blob: Blob) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values)).to(device=blob.device, dtype=blob.dtype)


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
