"""Blob: Caffe's N-d array with a ``data`` and a ``diff`` of the same shape.

Layers compute on torch tensors (``data_t``/``diff_t``) on the net's device; Python users see
writable numpy arrays (``data``/``diff``) exactly as in pycaffe: writing into them changes what
the next forward/backward/update uses.

A numpy array handed to Python stays live, as pycaffe's arrays over Caffe's memory do: the first
``.data``/``.diff`` access pins the tensor as the blob's *live buffer*, and from then on a layer's
``blob.data_t = t`` is copied into that buffer instead of replacing it (blobs nobody looked at
still take the layer's tensor without a copy). ``reshape`` follows Caffe's Blob::Reshape capacity
rule: a live buffer is kept (and viewed with the new shape) while the element count does not
exceed the largest count it held; a larger count allocates a new buffer and old arrays go stale.
So a layer that keeps a blob's tensor across a forward that rewrites the same blob (in place)
must clone it when ``data_is_live`` (see NeuronLayer._keep_input).

On CUDA a host buffer is kept with a "head" flag, as Caffe's SyncedMemory does: reading ``.data``
copies device to host (into the same host buffer, so arrays taken earlier see the new values
too) and marks the host as possibly newer; the next ``data_t`` read by a layer copies it back.
bfloat16 blobs (mixed precision, recaffe/precision.py) work the same way on CPU, as numpy has no
bfloat16: Python sees a float32 mirror. A tensor of another type given to ``data_t``/``diff_t`` is
converted to the blob's type.

Memory is allocated lazily: ``reshape`` records the shape, and the first access allocates zeros.
Parameters are always updated in place.
"""
from __future__ import annotations

import mmap
from typing import Iterable, Sequence

import numpy as np
import torch

from .errors import RecaffeError
from .proto import caffe_pb2

MAX_BLOB_AXES = 32
MAX_BLOB_COUNT = 2**31 - 1  # Caffe's Blob::Reshape: "blob size exceeds INT_MAX"


# Blob memory of at least this size is its own anonymous mapping, as Caffe's SyncedMemory is one
# allocation per blob: it stays out of the heap that kernels' temporaries churn (so it cannot be
# fragmented by them, and goes back to the system when the blob lets go of it), and its pages are
# the system's zero pages until written (a diff only read, as `caffe time`'s, costs nothing).
MAPPED_MIN_BYTES = 1 << 20


def _blob_memory(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new zero tensor for a blob's data or diff (see MAPPED_MIN_BYTES)."""
    count = _prod(shape)
    if device.type != "cpu" or count * dtype.itemsize < MAPPED_MIN_BYTES or torch.compiler.is_compiling():
        return torch.zeros(shape, dtype=dtype, device=device)
    flat = torch.frombuffer(mmap.mmap(-1, count * dtype.itemsize), dtype=dtype)
    # the storage alone (not a view of ``flat``): nothing else references it (Blob._writable)
    return torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, shape)


def _use_count(t: torch.Tensor) -> int:
    """How many tensors reference ``t``'s memory (plus one, the storage object asked for); a
    large number where this torch has no way to tell, so nothing is written in place."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(t.untyped_storage()._cdata) if count is not None else 1 << 30


def _sharing_views(s: "_Synced", storage: int) -> int:
    """How many blobs that shared from ``s`` (and from them, in turn) still view ``storage``."""
    n = 0
    for other in s.sharers:
        t = other.tensor
        if other.shared_from is not None and other.shared_from[1] is s and t is not None \
                and t.untyped_storage().data_ptr() == storage:
            n += 1 + _sharing_views(other, storage)
    return n


def _own_alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor object of the blob's own over ``t``'s memory, so that Blob._writable's count of
    references to that memory sees every holder: a layer may hand the same tensor to two blobs
    (Eltwise SUM gives its top diff to each bottom: an in-place backward on one must not change
    the other), and a view (a result reshaped to the top's shape) would keep its base alive, a
    reference that nothing else holds."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


class BlobError(RecaffeError, ValueError):
    """A shape a blob cannot take, or a BlobProto whose values do not fit its shape."""


class _Synced:
    """One tensor (data or diff); ``live`` is the flat buffer Python's arrays view (a tensor on
    CPU, the host mirror on other devices), None until Python asks for an array."""

    __slots__ = ("tensor", "live", "shared_from", "host", "host_newer", "own", "sharers")

    def __init__(self, tensor: torch.Tensor | None = None):
        self.tensor = tensor
        # the tensor object is the blob's own (allocated, or aliased by _set, eagerly): set only
        # there; any other assignment (a reshape's view, sharing, a compiled graph's side effect)
        # clears it, and Blob._writable then refuses to write into the memory in place
        self.own = False
        self.live: torch.Tensor | np.ndarray | None = None
        self.shared_from: tuple[Blob, _Synced] | None = None  # after share_data/share_diff
        self.sharers: set[_Synced] = set()  # the ones that shared from this one
        self.host: np.ndarray | None = None
        self.host_newer = False


class Blob:
    __slots__ = ("_shape", "_data", "_diff", "dtype", "device", "_direct")

    def __init__(self, shape: Sequence[int] = (), dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.dtype = dtype
        self.device = torch.device(device)
        self._direct = _numpy_views(self.device, dtype)
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
            if self._direct and s.live is not None:
                # Caffe reallocates only when the count exceeds the capacity.
                if count <= s.live.numel():
                    s.tensor = s.live[:count].view(shape)
                else:
                    s.live = s.tensor = None
                continue
            if s.tensor is not None and same_count:
                self._pull(s)
                s.tensor = s.tensor.reshape(shape)
            else:
                s.tensor = None
            s.own = False
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
        return _blob_memory(self._shape, self.dtype, self.device)

    def _pull(self, s: _Synced) -> None:
        """Bring host edits (non-CPU devices) back to the device tensor."""
        if s.host_newer:
            s.tensor.copy_(torch.from_numpy(s.host))
            s.host_newer = False

    def _tensor(self, s: _Synced) -> torch.Tensor:
        if s.tensor is None:
            s.tensor = self._alloc()
            s.own = True
        elif s.host_newer:
            self._pull(s)
        return s.tensor

    def _set(self, s: _Synced, t: torch.Tensor) -> None:
        if t.shape != self._shape:
            raise ValueError(f"tensor of shape {tuple(t.shape)} given to a blob of shape {self._shape}")
        if t.dtype != self.dtype:  # a float32 result stored in a bfloat16 blob, or the reverse
            t = t.to(self.dtype)
        if s.live is None or not self._direct:
            s.own = not torch.compiler.is_compiling()
            s.tensor = _own_alias(t) if s.own else t
            s.shared_from = None
            s.host = None
            s.host_newer = False
            return
        # Python holds arrays over the live buffer: write the result there.
        cur = s.tensor
        if t.data_ptr() == cur.data_ptr() and t.stride() == cur.stride() and t.dtype == cur.dtype:
            return  # the layer computed in the live buffer itself
        if t.untyped_storage().data_ptr() == cur.untyped_storage().data_ptr():
            t = t.clone()  # a view of the same memory (copy_ refuses partial overlaps)
        cur.copy_(t)

    def _numpy(self, s: _Synced) -> np.ndarray:
        t = self._tensor(s)
        if self._direct:
            if s.live is None:
                if s.shared_from is not None:
                    # Pin the owner's memory too, so this array stays live across forwards.
                    owner, owner_s = s.shared_from
                    owner._numpy(owner_s)
                    s.tensor = t = owner_s.tensor.reshape(self._shape)
                if not t.is_contiguous():
                    s.tensor = t = t.contiguous()
                s.live = t.view(-1)
            return t.numpy()
        if s.host is None or not s.host_newer:
            # Refresh the host buffer in place, so arrays handed out before see the new values.
            src = t.detach().to("cpu", _host_dtype(self.dtype)).numpy()
            if s.live is None or s.live.size < src.size or s.live.dtype != src.dtype:
                s.live = np.empty(src.size, src.dtype)
            s.host = s.live[:src.size].reshape(src.shape)
            s.host[...] = src
        s.host_newer = True
        return s.host

    @property
    def data_is_live(self) -> bool:
        """Whether Python holds (or held) arrays over this blob's data memory: a ``data_t = t``
        then writes into that memory rather than replacing it."""
        return self._data.live is not None and self._direct

    @property
    def data_t(self) -> torch.Tensor:
        s = self._data
        if self._direct and s.tensor is not None:
            return s.tensor
        return self._tensor(s)

    @data_t.setter
    def data_t(self, t: torch.Tensor) -> None:
        self._set(self._data, t)

    @property
    def diff_t(self) -> torch.Tensor:
        s = self._diff
        if self._direct and s.tensor is not None:
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

    def _writable(self, s: _Synced) -> bool:
        """Whether a layer may overwrite ``s``'s tensor in place: the blob's own contiguous
        memory, which Python's arrays view (results belong there) or nothing else references
        (no other blob's, no view's, no tensor a layer kept). Never while torch.compile traces."""
        t = s.tensor
        if t is None or s.shared_from is not None or not t.is_contiguous() or torch.compiler.is_compiling():
            return False
        if self._direct and s.live is not None:
            return True
        if not s.own or s.host is not None:
            return False
        # 2: the tensor and the storage object asked; any other tensor over it adds one, except
        # the blobs that share this memory (Caffe's ShareData: Split's tops, Flatten's, ...),
        # which see what is written here in Caffe too
        storage = t.untyped_storage().data_ptr()
        return _use_count(t) == 2 + _sharing_views(s, storage)

    def _mutable(self, s: _Synced) -> torch.Tensor:
        if self._writable(s):
            return s.tensor
        self._set(s, _blob_memory(self._shape, self.dtype, self.device))
        return s.tensor

    @property
    def data_writable(self) -> bool:
        """Whether the data tensor may be overwritten in place (see _writable)."""
        return self._writable(self._data)

    @property
    def diff_writable(self) -> bool:
        return self._writable(self._diff)

    def mutable_data_t(self) -> torch.Tensor:
        """Memory to write the blob's whole new data into, as Caffe's mutable_cpu_data: the
        current tensor when it may be overwritten (its old values are then still there), else a
        new one, which becomes the blob's. Layers that write with ``out=`` reuse one buffer
        across iterations this way, as Caffe does, instead of allocating a result each time."""
        return self._mutable(self._data)

    def mutable_diff_t(self) -> torch.Tensor:
        """As mutable_data_t, for the diff."""
        return self._mutable(self._diff)

    def release_data(self) -> None:
        """Let go of the data tensor, which a layer is about to replace (Net frees memory early
        this way): kept while Python holds arrays over it or it is another blob's (shared)."""
        self._release(self._data)

    def release_diff(self) -> None:
        """As release_data, for the diff."""
        self._release(self._diff)

    @staticmethod
    def _release(s: _Synced) -> None:
        if s.live is None and s.shared_from is None:
            s.tensor = s.host = None
            s.host_newer = False
            s.own = False

    def share_data(self, other: "Blob") -> None:
        """Use ``other``'s data tensor (same count), as Caffe's ShareData."""
        if other.count() != self.count():
            raise ValueError(f"cannot share data: counts {other.count()} and {self.count()} differ")
        self._share(self._data, other, other._data, other.data_t)

    def set_data_memory(self, t: torch.Tensor) -> None:
        """Point the data at ``t`` itself, as Caffe's set_cpu_data: the blob's memory becomes
        ``t``, so arrays taken from the old memory go stale (MemoryData serves the user's arrays)."""
        if t.shape != self._shape:
            raise ValueError(f"tensor of shape {tuple(t.shape)} given to a blob of shape {self._shape}")
        s = self._data
        s.tensor = t
        s.own = False
        s.live = s.shared_from = s.host = None
        s.host_newer = False

    def take_data(self, other: "Blob") -> None:
        """This blob's data becomes ``other``'s values (same count): shared, as Caffe's ShareData,
        unless Python holds arrays over this data, which then get the values copied in."""
        if self._holds_arrays(self._data):
            self.data_t = other.data_t.reshape(self._shape)
        else:
            self.share_data(other)

    def take_diff(self, other: "Blob") -> None:
        """As take_data, for the diff (an identity layer's backward: Caffe's ShareDiff or copy)."""
        if self._holds_arrays(self._diff):
            self.diff_t = other.diff_t.reshape(self._shape)
        else:
            self.share_diff(other)

    def _holds_arrays(self, s: _Synced) -> bool:
        return self._direct and s.live is not None and s.shared_from is None

    def share_diff(self, other: "Blob") -> None:
        if other.count() != self.count():
            raise ValueError(f"cannot share diff: counts {other.count()} and {self.count()} differ")
        self._share(self._diff, other, other._diff, other.diff_t)

    def _share(self, s: _Synced, other: "Blob", other_s: _Synced, t: torch.Tensor) -> None:
        if self._direct:
            if s.live is not None and s.tensor is not None and s.tensor.data_ptr() == t.data_ptr():
                return  # already sharing this memory (a layer re-sharing at every forward)
            s.live = None  # arrays over our old memory go stale, as in Caffe
        s.tensor = t.reshape(self._shape)
        s.own = False
        s.shared_from = (other, other_s)
        other_s.sharers.add(s)
        s.host = None
        s.host_newer = False

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Move this blob's storage to another device and/or dtype (in place)."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        for s in (self._data, self._diff):
            if s.tensor is not None:
                self._pull(s)
                s.tensor = s.tensor.to(device=device, dtype=dtype)
            s.own = False
            s.live = s.host = s.shared_from = None
            s.host_newer = False
        self.device, self.dtype, self._direct = device, dtype, _numpy_views(device, dtype)

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
        host = _host_dtype(self.dtype)
        set_packed_values(proto, prefix + "data", self.data_t.detach().to("cpu", host).numpy())
        if write_diff:
            set_packed_values(proto, prefix + "diff", self.diff_t.detach().to("cpu", host).numpy())
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


# NVCaffe's BlobProto.raw_data_type -> the little-endian numpy type of raw_data's bytes.
_RAW_DTYPES = {caffe_pb2.FLOAT16: "<f2", caffe_pb2.FLOAT: "<f4", caffe_pb2.DOUBLE: "<f8"}


def _proto_values(proto: caffe_pb2.BlobProto, which: str) -> np.ndarray | None:
    raw = getattr(proto, "raw_" + which)
    if raw:  # NVCaffe: fp16 (or fp32/fp64) bytes; widened to the blob's dtype by the caller
        kind = getattr(proto, f"raw_{which}_type")
        if kind not in _RAW_DTYPES:
            name = caffe_pb2.Type.Name(kind) if kind in caffe_pb2.Type.values() else str(kind)
            raise ValueError(f"blob proto stores raw_{which} of type {name}; only FLOAT16, FLOAT "
                             "and DOUBLE are weights")
        dtype = np.dtype(_RAW_DTYPES[kind])
        if len(raw) % dtype.itemsize:
            raise ValueError(f"blob proto's raw_{which} has {len(raw)} bytes, not a whole number of "
                             f"{caffe_pb2.Type.Name(kind)} values")
        return np.frombuffer(raw, dtype=dtype).astype(np.float64 if dtype.itemsize == 8 else np.float32)
    doubles = getattr(proto, "double_" + which)
    if len(doubles):
        return np.asarray(doubles, dtype=np.float64)
    floats = getattr(proto, which)
    if len(floats):
        return np.asarray(floats, dtype=np.float32)
    return None


def _to_tensor(values: np.ndarray, blob: Blob) -> torch.Tensor:
    # (ascontiguousarray alone would turn a 0-axis array, e.g. a channel_shared PReLU slope, into 1 axis)
    values = np.ascontiguousarray(values).reshape(values.shape)
    return torch.from_numpy(values).to(device=blob.device, dtype=blob.dtype)


def _numpy_views(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether numpy can view this blob's tensors directly (else Python gets a host mirror)."""
    return device.type == "cpu" and dtype != torch.bfloat16


def _host_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type of the numpy arrays Python sees: numpy has no bfloat16, so those read as float32."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
