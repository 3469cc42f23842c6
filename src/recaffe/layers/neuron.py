"""Neuron layers: elementwise activations (one bottom, one top, most may run in place).

In place (``top[0] is bottom[0]``) a forward replaces the blob's data with the output. Where
Caffe's backward reads the bottom data, a layer that may run in place keeps a reference to the
input tensor it was given (Caffe copies it into ``bottom_memory_``); forward hands the blob a
fresh tensor, so the kept one is not overwritten, except on a blob whose array Python holds (the
result is then written over its memory): there the input is kept as a copy.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import rng
from ..fillers import fill
from ..layer import Layer, register
from ..proto import caffe_pb2


class NeuronLayer(Layer):
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1
    _kept_input: torch.Tensor | None = None

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def _keep_input(self, bottom, top, x: torch.Tensor) -> None:
        """Remember the input when running in place (forward is about to replace it; a live blob
        gets the result written over its memory, so keep a copy then)."""
        if top[0] is not bottom[0]:
            self._kept_input = None
        else:
            self._kept_input = x.clone() if bottom[0].data_is_live else x

    def _input(self, top, bottom) -> torch.Tensor:
        """The forward's input for backward: the kept one in place, else the bottom's data."""
        if top[0] is bottom[0] and self._kept_input is not None:
            return self._kept_input
        return bottom[0].data_t


@register("ReLU")
class ReLULayer(NeuronLayer):
    """max(0, x) + negative_slope * min(0, x); the gradient at x == 0 is negative_slope, as Caffe.

    It writes into the blobs' own memory where it may (Blob.mutable_data_t): in place, as
    Caffe's ReLU, over the bottom's data and the top's diff; otherwise into last pass's top data
    and bottom diff. So a ReLU allocates nothing after the first pass."""

    def layer_setup(self, bottom, top):
        self.negative_slope = self.layer_param.relu_param.negative_slope

    def forward(self, bottom, top):
        x = bottom[0].data_t
        slope = self.negative_slope
        if top[0] is bottom[0]:
            if not bottom[0].data_writable:  # another tensor views it: a new one
                top[0].data_t = torch.relu(x) if slope == 0 else F.leaky_relu(x, slope)
            elif slope == 0:
                torch.relu_(x)
            else:
                F.leaky_relu_(x, slope)
            return
        y = top[0].mutable_data_t()
        if slope == 0:
            torch.clamp_min(x, 0, out=y)
        else:
            torch.ops.aten.leaky_relu.out(x, slope, out=y)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # In place, bottom data is the top data: same sign for any slope >= 0, so the mask holds
        # (with a negative slope Caffe reads the overwritten data too; we do the same).
        x = bottom[0].data_t
        dy = top[0].diff_t
        if top[0] is bottom[0] and not bottom[0].diff_writable:
            dx = None
        else:
            dx = dy if top[0] is bottom[0] else bottom[0].mutable_diff_t()
        if self.negative_slope == 0:
            if dx is None:
                bottom[0].diff_t = torch.ops.aten.threshold_backward(dy, x, 0)
            else:
                torch.ops.aten.threshold_backward.grad_input(dy, x, 0, grad_input=dx)
        elif dx is None:
            bottom[0].diff_t = torch.ops.aten.leaky_relu_backward(dy, x, self.negative_slope, False)
        else:
            torch.ops.aten.leaky_relu_backward.grad_input(dy, x, self.negative_slope, False,
                                                          grad_input=dx)


@register("Sigmoid")
class SigmoidLayer(NeuronLayer):
    """y = 1 / (1 + exp(-x)); the gradient dy * y * (1 - y) needs only the top, so in place is safe."""

    replaces_tops = replaces_bottom_diffs = True

    def forward(self, bottom, top):
        top[0].data_t = torch.sigmoid(bottom[0].data_t)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff_t = torch.ops.aten.sigmoid_backward(top[0].diff_t, top[0].data_t)


@register("TanH")
class TanHLayer(NeuronLayer):
    """y = tanh(x); the gradient dy * (1 - y^2) needs only the top."""

    replaces_tops = replaces_bottom_diffs = True

    def forward(self, bottom, top):
        top[0].data_t = torch.tanh(bottom[0].data_t)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff_t = torch.ops.aten.tanh_backward(top[0].diff_t, top[0].data_t)


@register("Dropout")
class DropoutLayer(NeuronLayer):
    """TRAIN: y = x * mask / (1 - ratio), mask ~ Bernoulli(1 - ratio), kept for backward.
    TEST: identity (the top shares the bottom's tensor, as Split does).

    Faster R-CNN's fork adds ``scale_train`` (default true, the above). With ``scale_train: false``
    TRAIN keeps the unscaled mask (y = x * mask) and TEST multiplies by (1 - ratio) instead, in
    backward too; the factor is the fork's float 1 / scale with scale = 1 / (1 - ratio)."""

    replaces_tops = replaces_bottom_diffs = True

    def layer_setup(self, bottom, top):
        p = self.layer_param.dropout_param
        ratio = p.dropout_ratio
        # Caffe only DCHECKs this; ratio 1 would scale by infinity.
        if not 0.0 <= ratio < 1.0:
            raise self.error(f"dropout_ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio
        self.scale = 1.0 / (1.0 - ratio)
        self.scale_train = p.scale_train
        # the fork keeps scale_ as a float and multiplies TEST outputs by 1 / scale_
        self.test_factor = float(np.float32(1.0 / float(np.float32(self.scale))))
        self.mask: torch.Tensor | None = None

    def forward(self, bottom, top):
        x = bottom[0].data_t
        if self.phase == caffe_pb2.TRAIN:
            self.mask = None  # the last forward's, not kept beside the new one
            keep = torch.empty_like(x).bernoulli_(1.0 - self.ratio, generator=rng.generator(x.device))
            # scaled mask: values in {0, scale}; unscaled with scale_train false: {0, 1}
            self.mask = keep.mul_(self.scale) if self.scale_train else keep
            top[0].data_t = x * self.mask
        elif not self.scale_train:
            top[0].data_t = x * self.test_factor
        elif top[0] is not bottom[0]:
            top[0].take_data(bottom[0])  # identity: the same memory, as Split's tops

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff_t
        if self.phase == caffe_pb2.TRAIN:
            if self.mask is None or self.mask.shape != dy.shape:
                raise self.error("backward called without a matching TRAIN forward (no dropout mask)")
            bottom[0].diff_t = dy * self.mask
        elif not self.scale_train:
            bottom[0].diff_t = dy * self.test_factor
        elif top[0] is not bottom[0]:
            bottom[0].take_diff(top[0])


@register("ReLU6")
class ReLU6Layer(NeuronLayer):
    """y = min(max(x, 0) + negative_slope * min(x, 0), 6) (MobileNet-YOLO's and NVCaffe's ReLU6;
    ``relu_param.negative_slope``, default 0). The gradient is 1 where 0 < x < 6, negative_slope
    where x <= 0 and 0 where x >= 6 (MobileNet-YOLO's backward: x == 0 takes the slope, x == 6
    gets 0). In place the top carries the same masks (its sign is the input's; 6 only from x >= 6)."""

    def layer_setup(self, bottom, top):
        self.negative_slope = self.layer_param.relu_param.negative_slope

    def forward(self, bottom, top):
        x = bottom[0].data_t
        y = torch.clamp(x, 0.0, 6.0)
        if self.negative_slope != 0:
            y = y + self.negative_slope * torch.clamp(x, max=0.0)
        top[0].data_t = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0].data_t
        dy = top[0].diff_t
        zero = torch.zeros((), dtype=dy.dtype, device=dy.device)
        dx = torch.where((x > 0) & (x < 6), dy, zero)
        if self.negative_slope != 0:
            dx = dx + torch.where(x <= 0, dy * self.negative_slope, zero)
        bottom[0].diff_t = dx


@register("PReLU")
class PReLULayer(NeuronLayer):
    """y = max(0, x) + a_c * min(0, x) with a learnable slope per channel (axis 1), or one shared
    slope (``channel_shared``, a 0-axis blob). Default filler: constant 0.25."""

    def layer_setup(self, bottom, top):
        if bottom[0].num_axes < 2:
            raise self.error(f"bottom must have at least 2 axes, got shape {bottom[0].shape}")
        p = self.layer_param.prelu_param
        self.channel_shared = p.channel_shared
        channels = bottom[0].shape[1]
        if not self.blobs:
            self.blobs = [self.new_blob(() if self.channel_shared else (channels,))]
            if p.HasField("filler"):
                fill(self.blobs[0], p.filler)
            else:
                fill(self.blobs[0], caffe_pb2.FillerParameter(type="constant", value=0.25))
        elif len(self.blobs) != 1:
            raise self.error(f"expected 1 param blob (the slopes), found {len(self.blobs)}")
        # Caffe checks only the count of a given slope blob, not its shape.
        want = 1 if self.channel_shared else channels
        if self.blobs[0].count() != want:
            raise self.error(f"negative slope size is inconsistent with prototxt config: slope blob "
                             f"has {self.blobs[0].count()} values, expected {want} "
                             f"({'channel_shared' if self.channel_shared else 'one per channel'})")
        self.param_propagate_down = [True]

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) < 2:
            raise self.error(f"bottom must have at least 2 axes, got shape {shape}")
        if not self.channel_shared and shape[1] != self.blobs[0].count():
            raise self.error(f"bottom has {shape[1]} channels but the layer has "
                             f"{self.blobs[0].count()} slopes")
        super().reshape(bottom, top)

    def _slope(self, ndim: int) -> torch.Tensor:
        """The slopes shaped to broadcast over the bottom (1, C, 1, ...)."""
        a = self.param_t(0).reshape(-1)
        return a.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom, top):
        x = bottom[0].data_t
        self._keep_input(bottom, top, x)
        top[0].data_t = torch.prelu(x, self.param_t(0).reshape(-1))

    def backward(self, top, propagate_down, bottom):
        need_param = self.param_propagate_down[0]
        if not (need_param or propagate_down[0]):
            return
        x = self._input(top, bottom)
        dy = top[0].diff_t
        dx, da = torch.ops.aten._prelu_kernel_backward(dy, x, self._slope(x.dim()))
        if need_param:
            # da holds x * dy where x <= 0, elementwise: sum over all but the channel axis.
            if self.channel_shared:
                self.blobs[0].diff_t.add_(da.sum().reshape(self.blobs[0].shape))
            else:
                dims = [0] + list(range(2, da.dim()))
                self.blobs[0].diff_t.add_(da.sum(dim=dims).reshape(self.blobs[0].shape))
        if propagate_down[0]:
            bottom[0].diff_t = dx


@register("ELU")
class ELULayer(NeuronLayer):
    """y = x if x > 0 else alpha * (exp(x) - 1); gradient 1 or y + alpha.

    As Caffe, the mask reads the bottom data (the output in place: same sign for alpha >= 0)."""

    def layer_setup(self, bottom, top):
        self.alpha = self.layer_param.elu_param.alpha

    def forward(self, bottom, top):
        x = bottom[0].data_t
        # Caffe's exp(x) - 1 (not expm1): matches its outputs bit for bit in float32.
        neg = torch.exp(torch.clamp(x, max=0)).sub_(1).mul_(self.alpha)
        top[0].data_t = torch.where(x > 0, x, neg)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = bottom[0].data_t
        dy = top[0].diff_t
        bottom[0].diff_t = torch.where(x > 0, dy, dy * (top[0].data_t + self.alpha))


@register("AbsVal")
class AbsValLayer(NeuronLayer):
    """y = |x|; gradient sign(x) * dy (0 at x == 0). Caffe forbids running it in place."""

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("does not allow in-place computation (top and bottom are the same blob)")

    def forward(self, bottom, top):
        top[0].data_t = torch.abs(bottom[0].data_t)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff_t = torch.sign(bottom[0].data_t) * top[0].diff_t


BNLL_THRESHOLD = 50.0


@register("BNLL")
class BNLLLayer(NeuronLayer):
    """Binomial normal log likelihood: y = log(1 + exp(x)), computed stably as
    max(x, 0) + log(1 + exp(-|x|)); gradient dy * sigmoid(min(x, 50)) as Caffe."""

    def forward(self, bottom, top):
        x = bottom[0].data_t
        self._keep_input(bottom, top, x)
        top[0].data_t = torch.clamp(x, min=0) + torch.log1p(torch.exp(-torch.abs(x)))

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        x = self._input(top, bottom)
        bottom[0].diff_t = top[0].diff_t * torch.sigmoid(torch.clamp(x, max=BNLL_THRESHOLD))


def _log_base(layer: Layer, base: float) -> float:
    """log(base), with base == -1 meaning e (log exactly 1), and Caffe's checks."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise layer.error(f"base must be strictly positive (or -1 for e), got {base}")
    log_base = math.log(base)
    if math.isinf(log_base) or math.isnan(log_base):
        raise layer.error(f"log(base) = log({base}) = {log_base} is not finite")
    return log_base


@register("Exp")
class ExpLayer(NeuronLayer):
    """y = base^(shift + scale * x) (base -1 = e), computed as outer * exp(inner * x) with
    inner = log(base) * scale and outer = base^shift; gradient dy * y * inner (needs only the top)."""

    def layer_setup(self, bottom, top):
        p = self.layer_param.exp_param
        log_base = _log_base(self, p.base)
        self.inner_scale = log_base * p.scale
        if p.shift == 0:
            self.outer_scale = 1.0
        else:
            self.outer_scale = math.exp(p.shift) if p.base == -1 else math.pow(p.base, p.shift)

    def forward(self, bottom, top):
        x = bottom[0].data_t
        y = torch.exp(x) if self.inner_scale == 1 else torch.exp(x * self.inner_scale)
        if self.outer_scale != 1:
            y.mul_(self.outer_scale)
        top[0].data_t = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = top[0].data_t * top[0].diff_t
        if self.inner_scale != 1:
            dx.mul_(self.inner_scale)
        bottom[0].diff_t = dx


@register("Log")
class LogLayer(NeuronLayer):
    """y = log_base(shift + scale * x) (base -1 = e);
    gradient dy * scale / (log(base) * (shift + scale * x))."""

    def layer_setup(self, bottom, top):
        p = self.layer_param.log_param
        log_base = _log_base(self, p.base)
        if log_base == 0:
            raise self.error(f"1/log(base) is infinite for base {p.base}")
        self.base_scale = 1.0 / log_base
        self.input_scale = p.scale
        self.input_shift = p.shift
        self.backward_num_scale = p.scale / log_base

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        v = x * self.input_scale if self.input_scale != 1 else x
        return v + self.input_shift if self.input_shift != 0 else v

    def forward(self, bottom, top):
        x = bottom[0].data_t
        self._keep_input(bottom, top, x)
        y = torch.log(self._affine(x))
        if self.base_scale != 1:
            y.mul_(self.base_scale)
        top[0].data_t = y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        inv = torch.reciprocal(self._affine(self._input(top, bottom)))
        if self.backward_num_scale != 1:
            inv.mul_(self.backward_num_scale)
        bottom[0].diff_t = inv.mul_(top[0].diff_t)


@register("Power")
class PowerLayer(NeuronLayer):
    """y = (shift + scale * x)^power, with Caffe's special cases (constant output when
    power * scale == 0; gradient forms for power 1, power 2 and shift 0)."""

    def layer_setup(self, bottom, top):
        p = self.layer_param.power_param
        self.power, self.scale, self.shift = p.power, p.scale, p.shift
        self.diff_scale = self.power * self.scale

    def forward(self, bottom, top):
        x = bottom[0].data_t
        if self.diff_scale == 0:
            # The input is ignored: y = 1 for power 0, else shift^power.
            if self.power == 0:
                top[0].data_t = torch.ones_like(x)
            else:
                top[0].data_t = torch.full_like(x, self.shift).pow_(self.power)
            return
        self._keep_input(bottom, top, x)
        y = x * self.scale if self.scale != 1 else x
        if self.shift != 0:
            y = y + self.shift
        if self.power != 1:
            y = torch.pow(y, self.power)
        top[0].data_t = y.clone() if y is x else y

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff_t
        if self.diff_scale == 0:
            bottom[0].diff_t = torch.zeros_like(dy)
            return
        if self.power == 1:
            bottom[0].diff_t = dy * self.diff_scale
            return
        x = self._input(top, bottom)
        if self.power == 2:
            # dy/dx = 2 * scale * (shift + scale * x) = diff_scale * scale * x + diff_scale * shift
            g = x * (self.diff_scale * self.scale)
            if self.shift != 0:
                g.add_(self.diff_scale * self.shift)
        elif self.shift == 0:
            # dy/dx = power * y / x (Caffe's form: NaN/inf where x == 0, as in Caffe)
            g = (top[0].data_t / x).mul_(self.power)
        else:
            base = x * self.scale if self.scale != 1 else x.clone()
            base.add_(self.shift)
            g = torch.div(top[0].data_t, base)
            if self.diff_scale != 1:
                g.mul_(self.diff_scale)
        bottom[0].diff_t = g.mul_(dy)


@register("Threshold")
class ThresholdLayer(NeuronLayer):
    """y = 1 if x > threshold else 0. Not differentiable: Caffe's backward is NOT_IMPLEMENTED."""

    def layer_setup(self, bottom, top):
        self.threshold = self.layer_param.threshold_param.threshold

    def forward(self, bottom, top):
        x = bottom[0].data_t
        top[0].data_t = (x > self.threshold).to(x.dtype)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("backward is not implemented (the threshold function is not "
                             "differentiable); set propagate_down: false on its bottom")


@register("Clip")
class ClipLayer(NeuronLayer):
    """y = max(min, min(x, max)); the gradient passes where min <= x <= max (both inclusive)."""

    def layer_setup(self, bottom, top):
        p = self.layer_param.clip_param
        # Both are `required` in caffe.proto: Caffe refuses to parse a Clip param without them.
        if not (self.layer_param.HasField("clip_param") and p.HasField("min") and p.HasField("max")):
            raise self.error("clip_param with both min and max is required")
        if p.min > p.max:
            raise self.error(f"clip_param.min ({p.min}) must not exceed clip_param.max ({p.max})")
        self.min, self.max = p.min, p.max
        self._mask: torch.Tensor | None = None

    def _pass(self, x: torch.Tensor) -> torch.Tensor:
        return (x >= self.min) & (x <= self.max)

    def forward(self, bottom, top):
        x = bottom[0].data_t
        # In place the clipped output would let every gradient through: keep the mask instead.
        self._mask = self._pass(x) if top[0] is bottom[0] else None
        top[0].data_t = torch.clamp(x, self.min, self.max)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if top[0] is bottom[0] and self._mask is not None:
            mask = self._mask
        else:
            mask = self._pass(bottom[0].data_t)
        dy = top[0].diff_t
        bottom[0].diff_t = torch.where(mask, dy, torch.zeros((), dtype=dy.dtype, device=dy.device))


@register("Swish")
class SwishLayer(NeuronLayer):
    """y = x * sigmoid(beta * x); keeps the sigmoid for backward:
    dx = dy * (beta * y + s * (1 - beta * y))."""

    def layer_setup(self, bottom, top):
        self.beta = self.layer_param.swish_param.beta
        self.sigmoid: torch.Tensor | None = None

    def forward(self, bottom, top):
        x = bottom[0].data_t
        self.sigmoid = torch.sigmoid(x * self.beta if self.beta != 1 else x)
        top[0].data_t = x * self.sigmoid

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        by = top[0].data_t * self.beta
        s = self.sigmoid
        bottom[0].diff_t = (by + s * (1 - by)).mul_(top[0].diff_t)
