"""The Layer contract and the registry of layer types.

A layer is built from its ``LayerParameter`` and implements, as in Caffe:

* ``layer_setup(bottom, top)``: read parameters, create and fill ``self.blobs`` (learnable params);
* ``reshape(bottom, top)``: shape the tops from the bottoms (called before every forward);
* ``forward(bottom, top)``: compute tops (``top[i].data_t = ...``);
* ``backward(top, propagate_down, bottom)``: write bottom diffs where ``propagate_down[i]``
  (overwriting them) and **add** into param diffs where ``self.param_propagate_down[i]``.

Layers compute with torch tensors on ``self.device`` in ``self.dtype`` (float32 in nets, float64 in
gradient checks, bfloat16/float16 in mixed precision) and never know about solvers. Params are kept
in ``self.param_dtype`` (float32 under mixed precision: the master weights): a layer reads them in
its compute type through ``param_t(i)`` and adds its param gradients into their diffs. A new type is one class with ``@register("Type")``.
"""
from __future__ import annotations

import difflib
from typing import Callable, Sequence

import torch

from .blob import Blob
from .errors import RecaffeError
from .fillers import fill
from .proto import caffe_pb2

_REGISTRY: dict[str, type["Layer"]] = {}


class LayerError(RecaffeError, ValueError):
    """A user-facing error about a layer's parameters or blobs; the message names the layer."""


def register(*type_names: str) -> Callable[[type["Layer"]], type["Layer"]]:
    """Class decorator adding a layer class to the registry under one or more type names."""

    def deco(cls: type[Layer]) -> type[Layer]:
        for name in type_names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise KeyError(f"layer type {name!r} registered twice")
            _REGISTRY[name] = cls
        if cls.__dict__.get("type") is None:
            cls.type = type_names[0]
        return cls

    return deco


def layer_type_list() -> list[str]:
    """Every registered layer type, sorted (pycaffe's ``caffe.layer_type_list()``)."""
    _load_builtin_layers()
    return sorted(_REGISTRY)


def create_layer(param: caffe_pb2.LayerParameter, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> "Layer":
    """Instantiate the registered class for ``param.type``; unknown types list close matches."""
    _load_builtin_layers()
    cls = _REGISTRY.get(param.type)
    if cls is None:
        close = difflib.get_close_matches(param.type, _REGISTRY, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise LayerError(f"Unknown layer type: {param.type!r} (layer {param.name!r}).{hint} "
                         f"Known types: {', '.join(sorted(_REGISTRY))}")
    return cls(param, dtype=dtype, device=device)


def _load_builtin_layers() -> None:
    from . import layers  # noqa: F401  (importing the package registers every built-in type)


class Layer:
    type: str | None = None

    # Blob-count constraints (-1: unconstrained), checked by setup() as Caffe's CheckBlobCounts.
    exact_num_bottom_blobs = -1
    min_bottom_blobs = -1
    max_bottom_blobs = -1
    exact_num_top_blobs = -1
    min_top_blobs = -1
    max_top_blobs = -1
    equal_num_bottom_top_blobs = False
    # Data layers create their tops; the net adds anonymous tops up to the minimum if missing.
    auto_top_blobs = False
    # A layer running the user's code (Python layers): its exceptions reach the caller as raised.
    runs_user_code = False
    # Memory: forward gives each top that is not also a bottom a new tensor (``top.data_t = t``)
    # without reading the top's previous data; backward likewise gives each bottom it propagates
    # to a new diff. The net then lets go of the old tensor before calling the layer, so the old
    # and the new never coexist (Blob.release_data: a blob whose arrays Python holds keeps its
    # memory). Values are never affected. A layer that writes into its blobs' own memory instead
    # (Blob.mutable_data_t, batch_chunks) sets these false, per instance, to keep it.
    replaces_tops = False
    replaces_bottom_diffs = False
    # The batch slices this layer runs in (batch_chunks; None: one call), chosen by its reshape
    # through set_batch_chunks.
    _chunks: list[slice] | None = None

    def __init__(self, param: caffe_pb2.LayerParameter, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.layer_param = param
        self.name = param.name
        self.phase = param.phase
        self.dtype = dtype
        self.param_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        self._param_casts: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}  # see param_t
        self.device = torch.device(device)
        self.blobs: list[Blob] = []
        self.param_propagate_down: list[bool] = []
        self.loss_weights: list[float] = []
        if len(param.blobs):
            for i, proto in enumerate(param.blobs):
                b = Blob((), self.param_dtype, self.device)
                b.from_proto(proto, where=f"layer {param.name!r} param {i}")
                self.blobs.append(b)

    # ------------------------------------------------------------ contract
    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.check_blob_counts(bottom, top)
        self.layer_setup(bottom, top)
        self.reshape(bottom, top)
        self.set_loss_weights(top)

    def layer_setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        pass

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        raise NotImplementedError

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        raise NotImplementedError

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]) -> None:
        pass

    def allow_force_backward(self, bottom_index: int) -> bool:
        """Whether ``force_backward`` may make this bottom need gradients (not for labels)."""
        return True

    # --------------------------------------------------------- net driver
    def run_forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> float:
        """Caffe's Layer::Forward: reshape, forward, and the weighted loss of the tops."""
        if self._param_casts:
            self._param_casts.clear()  # (mixed precision: cast the params afresh, see param_t)
        self.reshape(bottom, top)
        self.forward(bottom, top)
        if not self.loss_weights:
            return 0.0
        loss = 0.0
        for t, w in zip(top, self.loss_weights):
            if w:
                loss += float(torch.dot(t.data_t.reshape(-1), t.diff_t.reshape(-1)))
        return loss

    def set_loss_weights(self, top: Sequence[Blob]) -> None:
        """Store each top's loss weight in its diff, as Caffe does (backward reads it there)."""
        weights = list(self.layer_param.loss_weight)
        if weights and len(weights) != len(top):
            raise LayerError(f"layer {self.name!r}: loss_weight must be unspecified or given once per top "
                             f"({len(weights)} given for {len(top)} tops)")
        if not weights:
            weights = [self.default_loss_weight(i) for i in range(len(top))]
        self.loss_weights = weights if any(weights) else []
        for t, w in zip(top, weights):
            if w:
                t.diff_t.fill_(w)

    def default_loss_weight(self, top_index: int) -> float:
        return 0.0

    def check_blob_counts(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        def fail(what: str, n: int, want: str) -> None:
            raise LayerError(f"{self.type} layer {self.name!r} takes {want} {what} blob(s), got {n}")

        nb, nt = len(bottom), len(top)
        if self.exact_num_bottom_blobs >= 0 and nb != self.exact_num_bottom_blobs:
            fail("bottom", nb, f"exactly {self.exact_num_bottom_blobs}")
        if self.min_bottom_blobs >= 0 and nb < self.min_bottom_blobs:
            fail("bottom", nb, f"at least {self.min_bottom_blobs}")
        if self.max_bottom_blobs >= 0 and nb > self.max_bottom_blobs:
            fail("bottom", nb, f"at most {self.max_bottom_blobs}")
        if self.exact_num_top_blobs >= 0 and nt != self.exact_num_top_blobs:
            fail("top", nt, f"exactly {self.exact_num_top_blobs}")
        if self.min_top_blobs >= 0 and nt < self.min_top_blobs:
            fail("top", nt, f"at least {self.min_top_blobs}")
        if self.max_top_blobs >= 0 and nt > self.max_top_blobs:
            fail("top", nt, f"at most {self.max_top_blobs}")
        if self.equal_num_bottom_top_blobs and nb != nt:
            raise LayerError(f"{self.type} layer {self.name!r} needs as many tops as bottoms ({nb} vs {nt})")

    # ------------------------------------------------------------ helpers
    def error(self, message: str) -> LayerError:
        """A LayerError whose message names this layer and its type."""
        return LayerError(f"{self.type} layer {self.name!r}: {message}")

    def new_blob(self, shape: Sequence[int]) -> Blob:
        """A param blob (in the param type)."""
        return Blob(shape, self.param_dtype, self.device)

    def param_t(self, index: int) -> torch.Tensor:
        """Param ``index``'s data in this layer's compute type (the master itself when they agree).
        A cast made in a forward is reused by the backward after it while the master is unchanged
        in torch's eyes (an update or a load bumps its version); each forward casts afresh, so an
        edit through a numpy array before the forward is seen."""
        t = self.blobs[index].data_t
        if t.dtype == self.dtype:
            return t
        if torch.compiler.is_compiling():
            return t.to(self.dtype)
        key = (t.data_ptr(), t._version)
        hit = self._param_casts.get(index)
        if hit is not None and hit[0] == key:
            return hit[1]
        cast = t.to(self.dtype)
        self._param_casts[index] = (key, cast)
        return cast

    def set_batch_chunks(self, chunks: list[slice] | None) -> None:
        """Run in these batch slices (None: one call). In slices a layer writes into its blobs'
        own memory, so the net keeps their tensors rather than releasing them (replaces_*)."""
        self._chunks = chunks
        self.replaces_tops = self.replaces_bottom_diffs = chunks is None

    def batch_slices(self) -> list[slice] | None:
        """This pass's slices: None for one call, also while torch.compile traces (a graph takes
        the whole batch)."""
        if self._chunks is None or torch.compiler.is_compiling():
            return None
        return self._chunks

    def init_weight_and_bias(self, shapes: Sequence[Sequence[int]], weight_filler, bias_filler) -> None:
        """Create a weight (and bias, when two shapes are given) filled by their fillers, unless
        params came with the layer; all params then learn (param_propagate_down true)."""
        if not self.check_blobs(shapes):
            self.blobs = [self.new_blob(s) for s in shapes]
            fill(self.blobs[0], weight_filler)
            if len(shapes) > 1:
                fill(self.blobs[1], bias_filler)
        self.param_propagate_down = [True] * len(self.blobs)

    def check_blobs(self, shapes: Sequence[Sequence[int]]) -> bool:
        """True when params came from the prototxt/weights already; checks their shapes then."""
        if not self.blobs:
            return False
        if len(self.blobs) != len(shapes):
            raise self.error(f"expected {len(shapes)} param blobs, found {len(self.blobs)}")
        for i, (b, s) in enumerate(zip(self.blobs, shapes)):
            if b.shape != tuple(s):
                raise self.error(f"param blob {i} has shape {b.shape}, expected {tuple(s)}")
        return True


# A layer whose output for the whole batch would be larger than this runs a few items at a time
# into the blob's own memory, as Caffe runs image by image: the kernels' scratch (a blocked copy
# of a convolution's output, pooling's int64 indices) then stays small, and one buffer per blob is
# reused across iterations instead of a new one allocated and paged in each time (measured in
# benchmarks/memory_bench.py: peak memory; a large convolution's forward also runs faster).
CHUNK_BYTES = 4 << 20


def batch_chunks(num: int, item_bytes: int, device: torch.device, limit: int | None = None
                 ) -> list[slice] | None:
    """Slices of a batch of ``num`` items whose outputs take ``item_bytes`` each, at most
    ``limit`` (default CHUNK_BYTES) per slice (at least one item); None where one call does: the
    output is small, or the device is not the CPU (a GPU's kernels want the whole batch;
    unmeasured there)."""
    limit = CHUNK_BYTES if limit is None else limit
    if device.type != "cpu" or num < 2 or num * item_bytes <= limit:
        return None
    step = max(1, limit // max(item_bytes, 1))
    return [slice(i, min(i + step, num)) for i in range(0, num, step)]


def canonical_axis(axis: int, num_axes: int, layer: Layer) -> int:
    """Normalize a possibly negative axis, with an error naming the layer when out of range."""
    if not -num_axes <= axis < num_axes:
        raise layer.error(f"axis {axis} out of range for a {num_axes}-D bottom")
    return axis + num_axes if axis < 0 else axis
