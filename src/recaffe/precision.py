"""Mixed precision: nets that compute in bfloat16 or float16 with float32 master weights.

``caffe train|test|time ... -precision fp32|bf16|fp16``, ``caffe.set_precision("bf16")``, or
NVCaffe's own fields in the prototxt (``default_forward_type: FLOAT16``, a layer's
``forward_type``, ``global_grad_scale``, ``global_grad_scale_adaptive``).

The rules (docs/precision.md has the why and the measured tolerances):

* **Params stay float32.** Every layer's learnable blobs (and BatchNorm's statistics) are the
  float32 master weights: pycaffe, snapshots and the solver see float32, and Caffe's update math
  runs on them unchanged. A low-precision layer casts its weights to its compute type at use and
  accumulates its param gradients into the float32 diffs.
* **Each layer has a compute type.** Layers in ``LOW_PRECISION_TYPES`` (convolutions, inner
  products, pooling, activations, ...) compute in the low type; routing layers
  (``INHERIT_TYPES``: Split, Flatten, Reshape, ...) take their input's type; every other layer
  (data, loss, accuracy, normalization, softmax, detection, Python, recurrent) computes in
  float32. NVCaffe's per-layer ``forward_type`` overrides the choice.
* **Blobs are stored in their producer's compute type**, so activations between two bf16 layers
  take half the memory. Where a layer's compute type differs from a blob it reads (or computes in
  place on), the net gives the layer a converted copy (``LayerCast``) and converts the results
  back: at the boundaries of a low-precision region only.
* **float16 scales the loss.** float16 gradients underflow; the backward pass starts from
  ``loss_weight * S`` and the solver divides the float32 param diffs by ``S`` before Caffe's update
  (``LossScaler``). With dynamic scaling an update whose diffs are not finite is skipped and ``S``
  halves; ``S`` doubles after ``GROWTH_INTERVAL`` clean iterations. bfloat16 has float32's range and
  needs no scaling.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .blob import Blob
from .errors import RecaffeError
from .log import get_logger
from .proto import caffe_pb2

log = get_logger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Types that compute in the low type: their math is matmul/convolution, elementwise or a max, all of
# which keep float32 accumulation inside the kernels (or need none).
LOW_PRECISION_TYPES = frozenset({
    "Convolution", "Deconvolution", "DepthwiseConvolution", "ConvolutionDepthwise", "InnerProduct",
    "Pooling", "ReLU", "PReLU", "ReLU6", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp",
    "Log", "Swish", "Clip", "Threshold", "Concat", "Eltwise", "Scale", "Bias", "Crop", "Permute",
    "Interp", "Upsample", "ShuffleChannel", "Axpy", "Tile", "Reorg",
})
# Types that take their first bottom's type: those that only route or reshape their input (or drop
# it), and BatchNorm, which computes its statistics and normalization in float32 internally (so a
# BatchNorm in place on a bf16 convolution needs no converted copy).
INHERIT_TYPES = frozenset({"Split", "Flatten", "Reshape", "Dropout", "Silence", "Slice", "BatchNorm"})

# Dynamic loss scaling (float16): the first scale, its growth after clean iterations, and its bounds.
INITIAL_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 1000
MIN_SCALE, MAX_SCALE = 1.0, 2.0 ** 24

PRECISION_ENV = "RECAFFE_PRECISION"  # how -precision reaches the processes of multi-GPU training
_default: str | None = None


class PrecisionError(RecaffeError, ValueError):
    """An unknown precision name, or a precision setting a net cannot use."""


def set_precision(name: str | None) -> None:
    """The precision of the nets created from now on (and their solvers' nets): "fp32", "bf16",
    "fp16", or None to follow each prototxt (NVCaffe's ``default_forward_type``)."""
    global _default
    _default = check_name(name) if name is not None else None


def precision() -> str | None:
    return _default


def _from_env() -> str | None:
    value = os.environ.get(PRECISION_ENV, "").strip()
    return check_name(value) if value else None


def check_name(name: str) -> str:
    key = str(name).strip().lower()
    key = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}.get(key, key)
    if key not in PRECISIONS:
        raise PrecisionError(f"unknown precision {name!r}: expected one of {', '.join(PRECISIONS)}")
    return key


def _type_dtype(t: int, low: torch.dtype) -> torch.dtype | None:
    """NVCaffe's Type enum as a compute type: FLOAT16 is the net's low type, FLOAT/DOUBLE float32."""
    if t == caffe_pb2.FLOAT16:
        return low
    if t in (caffe_pb2.FLOAT, caffe_pb2.DOUBLE):
        return None
    raise PrecisionError(f"NVCaffe type {caffe_pb2.Type.Name(t)} is not a compute type (FLOAT16, FLOAT, DOUBLE)")


class Plan:
    """One net's precision: its low type (None: all float32) and loss scaling, from the process
    setting (``-precision``) over the prototxt's NVCaffe fields."""

    def __init__(self, param: caffe_pb2.NetParameter, requested: str | None, full: torch.dtype):
        self.full = full
        requested = requested if requested is not None else _default
        explicit = requested is not None
        nv_default_low = param.default_forward_type == caffe_pb2.FLOAT16
        nv_any_low = nv_default_low or any(
            lp.HasField("forward_type") and lp.forward_type == caffe_pb2.FLOAT16 for lp in param.layer)
        if requested is None:
            requested = "fp16" if nv_any_low else "fp32"
        self.name = requested
        low = PRECISIONS[requested]
        self.low = None if full == torch.float64 or low == torch.float32 else low  # (float64: gradient checks)
        # Which layers without a forward_type of their own are low: with -precision bf16/fp16 every
        # eligible one, unless the prototxt says default_forward_type: FLOAT; without the flag,
        # those of a prototxt whose default_forward_type is FLOAT16 (NVCaffe).
        if explicit:
            self.default_low = not (param.HasField("default_forward_type") and not nv_default_low)
        else:
            self.default_low = nv_default_low
        if param.HasField("default_backward_type") and param.default_backward_type != param.default_forward_type:
            log.info("default_backward_type %s: recaffe runs each layer's backward in its forward type",
                     caffe_pb2.Type.Name(param.default_backward_type))
        scale_default = INITIAL_SCALE if self.low == torch.float16 else 1.0
        fixed = param.global_grad_scale if param.HasField("global_grad_scale") else None
        if fixed is not None:
            self.loss_scale, self.dynamic = fixed, bool(param.global_grad_scale_adaptive)
        else:
            self.loss_scale, self.dynamic = scale_default, self.low == torch.float16

    def layer_dtype(self, lp: caffe_pb2.LayerParameter, bottoms: Sequence[Blob]) -> torch.dtype:
        """The compute type of layer ``lp`` reading ``bottoms``."""
        if self.low is None:
            return self.full
        if lp.HasField("forward_type"):
            return _type_dtype(lp.forward_type, self.low) or self.full
        if lp.type in INHERIT_TYPES and bottoms:
            return bottoms[0].dtype
        if lp.type in LOW_PRECISION_TYPES and self.default_low:
            return self.low
        return self.full

    def describe(self) -> str:
        if self.low is None:
            return "float32"
        scale = f"loss scale {self.loss_scale:g}{' (dynamic)' if self.dynamic else ''}" \
            if self.loss_scale != 1 or self.dynamic else "no loss scaling"
        return f"{_NAMES[self.low]} compute, float32 master weights, {scale}"


_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


class LayerCast:
    """A layer's blobs seen in its compute type: a converted copy of each bottom (and of each top it
    rewrites in place) whose type differs. The net runs the layer on these, copying values in
    before the layer and results back after it (data forward, diffs backward)."""

    def __init__(self, dtype: torch.dtype, bottoms: Sequence[Blob], tops: Sequence[Blob]):
        self.dtype = dtype
        copies: dict[int, Blob] = {}

        def view(b: Blob) -> Blob:
            if b.dtype == dtype:
                return b
            if id(b) not in copies:
                copies[id(b)] = Blob(b.shape, dtype, b.device)
            return copies[id(b)]

        self.bottoms = [view(b) for b in bottoms]
        self.tops = [view(t) for t in tops]
        self._in = [(i, b, c) for i, (b, c) in enumerate(zip(bottoms, self.bottoms)) if c is not b]
        self._out = [(t, c) for t, c in zip(tops, self.tops) if c is not t]
        self.converts = bool(self._in or self._out)

    def before_forward(self) -> None:
        for _, real, copy in self._in:
            copy.reshape_like(real)
            copy.data_t = real.data_t

    def reshape_tops(self) -> None:
        for real, copy in self._out:
            real.reshape_like(copy)

    def after_forward(self) -> None:
        for real, copy in self._out:
            real.reshape_like(copy)
            real.data_t = copy.data_t

    def before_backward(self) -> None:
        for real, copy in self._out:
            copy.diff_t = real.diff_t

    def after_backward(self, propagate_down: Sequence[bool]) -> None:
        for i, real, copy in self._in:
            if propagate_down[i]:
                real.diff_t = copy.diff_t


class LossScaler:
    """The loss scale S of a low-precision net: backward starts from ``loss_weight * S`` and the
    solver unscales the float32 param diffs before Caffe's update. Dynamic: a step whose diffs are
    not all finite is skipped and S halves; S doubles after GROWTH_INTERVAL clean steps."""

    def __init__(self, scale: float, dynamic: bool):
        if not scale > 0 or not math.isfinite(scale):
            raise PrecisionError(f"global_grad_scale must be a positive number, got {scale}")
        self.scale = float(scale)
        self.dynamic = dynamic
        self.clean_steps = 0
        self.skipped = 0

    def unscale_(self, diffs: list[torch.Tensor], iteration: int) -> bool:
        """Divide ``diffs`` by S; False (diffs untouched) when the step must be skipped."""
        if self.dynamic and diffs:
            finite = torch.stack([torch.isfinite(d).all() for d in diffs]).all()
            if not bool(finite):
                old = self.scale
                self.scale = max(MIN_SCALE, self.scale / 2)
                self.clean_steps = 0
                self.skipped += 1
                log.info("Iteration %d: float16 gradients overflowed: update skipped, loss scale %g -> %g",
                         iteration, old, self.scale)
                return False
            self.clean_steps += 1
        if self.scale != 1 and diffs:
            torch._foreach_mul_(diffs, 1.0 / self.scale)
        if self.dynamic and self.clean_steps >= GROWTH_INTERVAL and self.scale < MAX_SCALE:
            self.scale *= 2
            self.clean_steps = 0
        return True


_default = _from_env()
