"""Normalization layers: BatchNorm, Scale, Bias, MVN, and SSD's Normalize."""
from __future__ import annotations

import math

import torch

from .. import blob as _blob
from ..fillers import fill
from ..layer import Layer, canonical_axis, register
from ..proto import caffe_pb2


@register("BatchNorm")
class BatchNormLayer(Layer):
    """Normalizes each channel (axis 1) by its batch statistics (TRAIN) or by the stored running
    statistics (``use_global_stats``, the default in TEST).

    The three param blobs are Caffe's: the running sums of the mean and of the variance (C,), and
    their common scale factor (1,); the statistics are ``blob / blob2``. They are not learned:
    setup gives them ``lr_mult: 0`` as Caffe does, and backward leaves their diffs alone.

    NVCaffe's BatchNorm (a layer with any of its fields: ``scale_bias``, ``scale_filler``,
    ``bias_filler``, ``engine``) follows NVCaffe's rules instead: the statistics are moving
    averages, ``blob = maf * blob + (1 - maf) * stat`` (copied outright at the layer's first two
    forwards), of the mean and the biased variance, used as they are (blob2 stays 1); eps is at
    least 1e-5; the statistics get ``lr_mult: 0 decay_mult: 0`` whatever the prototxt says; and with
    ``scale_bias`` (or a filler) ``y = x_norm * scale + bias`` with two more blobs, learned with
    ``lr_mult: 1 decay_mult: 1`` (NVCaffe forces these too). Its weights load either way: NVCaffe
    stores blob2 = 1, so BVLC's ``blob / blob2`` reads them the same.
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1
    _x_norm: torch.Tensor | None = None

    def layer_setup(self, bottom, top):
        p = self.layer_param.batch_norm_param
        self.maf = p.moving_average_fraction
        self.use_global_stats = p.use_global_stats if p.HasField("use_global_stats") \
            else self.phase == caffe_pb2.TEST
        self.eps = p.eps
        self.channels = 1 if bottom[0].num_axes == 1 else bottom[0].shape[1]
        c = self.channels
        self.nvcaffe = any(p.HasField(f) for f in ("scale_bias", "scale_filler", "bias_filler", "engine"))
        self.scale_bias = p.scale_bias or p.HasField("scale_filler") or p.HasField("bias_filler")
        if self.nvcaffe:
            self._nvcaffe_setup(p, c)
            return
        if not self.check_blobs([(c,), (c,), (1,)]):
            self.blobs = [self.new_blob((c,)), self.new_blob((c,)), self.new_blob((1,))]
        # The statistics are masked from the solver, as Caffe does: missing ParamSpecs are added
        # with lr_mult 0 (the net reads them from this same LayerParameter), and a non-zero one is an
        # error.
        for i in range(len(self.blobs)):
            if len(self.layer_param.param) == i:
                self.layer_param.param.add().lr_mult = 0.0
            elif self.layer_param.param[i].lr_mult != 0:
                raise self.error(f"Cannot configure batch normalization statistics as layer parameters "
                                 f"(param {i} has lr_mult {self.layer_param.param[i].lr_mult}; it "
                                 f"must be 0)")
        self.param_propagate_down = [False] * len(self.blobs)

    def _nvcaffe_setup(self, p, c):
        self.eps = max(p.eps, 1e-5)
        self.forwards = 0  # NVCaffe's iter_: the first two forwards copy the batch statistics
        shapes = [(c,), (c,), (1,)] + ([(c,), (c,)] if self.scale_bias else [])
        if not self.check_blobs(shapes):
            self.blobs = [self.new_blob(s) for s in shapes]
            self.blobs[2].data_t.fill_(1)
            if self.scale_bias:
                if p.HasField("scale_filler"):
                    fill(self.blobs[3], p.scale_filler)
                else:
                    self.blobs[3].data_t.fill_(1)
                if p.HasField("bias_filler"):
                    fill(self.blobs[4], p.bias_filler)
        for i in range(len(shapes)):  # NVCaffe sets these whatever the prototxt says
            spec = self.layer_param.param[i] if i < len(self.layer_param.param) else self.layer_param.param.add()
            spec.lr_mult = spec.decay_mult = 0.0 if i < 3 else 1.0
        self.param_propagate_down = [i >= 3 for i in range(len(shapes))]

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes >= 2 and b.shape[1] != self.channels:
            raise self.error(f"bottom {b.shape} has {b.shape[1]} channels, the layer was set up "
                             f"for {self.channels}")
        if top[0] is not b:
            top[0].reshape_like(b)

    def _stats_view(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] if x.dim() else 1
        spatial = math.prod(x.shape[2:]) if x.dim() >= 2 else -1  # explicit: -1 is ambiguous for 0 values
        return x.reshape(n, self.channels, spatial)  # (N, C, spatial)

    def forward(self, bottom, top):
        # (mixed precision: statistics and normalization in float32, the param type, whatever
        # the blobs' type; the top is stored back in it)
        out = self._output_memory(bottom, top) if self.use_global_stats and not self.nvcaffe else None
        x = self._stats_view(bottom[0].data_t.to(self.param_dtype))
        if self.nvcaffe:
            self._nvcaffe_forward(x, top)
            return
        if self.use_global_stats:
            s = self.blobs[2].data_t[0]
            inv = torch.where(s == 0, torch.zeros_like(s), 1 / s)  # a zero scale factor gives 0
            mean = self.blobs[0].data_t * inv
            var = self.blobs[1].data_t * inv
            if out is not None:
                # Backward then needs only the std (Caffe keeps x_norm_ too: never read here)
                self._x_norm = None
                self._std = torch.sqrt(var + self.eps).reshape(1, -1, 1)
                xo = self._stats_view(out)
                torch.sub(x, mean.reshape(1, -1, 1), out=xo).div_(self._std)
                return
            xc = x - mean.reshape(1, -1, 1)
        else:
            mean = x.mean(dim=(0, 2))
            xc = x - mean.reshape(1, -1, 1)
            var = (xc * xc).mean(dim=(0, 2))
            # Running sums: blob = maf * blob + stat, the variance with the m/(m-1) correction.
            m = bottom[0].count() // self.channels
            correction = m / (m - 1) if m > 1 else 1.0
            self.blobs[2].data_t.mul_(self.maf).add_(1)
            self.blobs[0].data_t.mul_(self.maf).add_(mean)
            self.blobs[1].data_t.mul_(self.maf).add_(var, alpha=correction)
        std = torch.sqrt(var + self.eps).reshape(1, -1, 1)
        y = xc / std
        self._std = std
        # kept for backward (the top may be overwritten by a later in-place layer), in the blobs' type
        self._x_norm = y.to(self.dtype)
        top[0].data_t = y.reshape(top[0].shape)

    def _output_memory(self, bottom, top) -> torch.Tensor | None:
        """Where a global-statistics forward may write: the blob's own data in place, or last
        pass's top (Blob.mutable_data_t); None in mixed precision (a float32 result) or when
        another tensor views the in-place blob."""
        if bottom[0].dtype != self.param_dtype:
            return None
        if top[0] is bottom[0]:
            return bottom[0].data_t if bottom[0].data_writable else None
        return top[0].mutable_data_t()

    def _nvcaffe_forward(self, x, top):
        if self.use_global_stats:
            mean, var = self.blobs[0].data_t, self.blobs[1].data_t
            xc = x - mean.reshape(1, -1, 1)
        else:
            mean = x.mean(dim=(0, 2))
            xc = x - mean.reshape(1, -1, 1)
            var = (xc * xc).mean(dim=(0, 2))
            if self.forwards > 1:
                self.blobs[0].data_t.mul_(self.maf).add_(mean, alpha=1 - self.maf)
                self.blobs[1].data_t.mul_(self.maf).add_(var, alpha=1 - self.maf)
            else:
                self.blobs[0].data_t.copy_(mean)
                self.blobs[1].data_t.copy_(var)
            self.forwards += 1
        std = torch.sqrt(var + self.eps).reshape(1, -1, 1)
        y = xc / std
        self._std = std
        self._x_norm = y.to(self.dtype)
        if self.scale_bias:
            y = y * self.blobs[3].data_t.reshape(1, -1, 1) + self.blobs[4].data_t.reshape(1, -1, 1)
        top[0].data_t = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if self.nvcaffe and self.scale_bias:
            dy = self._stats_view(top[0].diff_t.to(self.param_dtype))
            y = self._x_norm.to(self.param_dtype)
            if self.param_propagate_down[3]:
                self.blobs[3].diff_t.add_((dy * y).sum(dim=(0, 2)))
            if self.param_propagate_down[4]:
                self.blobs[4].diff_t.add_(dy.sum(dim=(0, 2)))
            if propagate_down[0]:
                self._normalization_backward(dy * self.blobs[3].data_t.reshape(1, -1, 1), bottom)
            return
        if not propagate_down[0]:
            return
        if self._x_norm is None:  # a global-statistics forward that wrote into the blobs' memory
            if top[0] is not bottom[0]:
                dx = self._stats_view(bottom[0].mutable_diff_t())
                torch.div(self._stats_view(top[0].diff_t), self._std, out=dx)
                return
            if bottom[0].diff_writable:
                self._stats_view(top[0].diff_t).div_(self._std)
                return
        self._normalization_backward(self._stats_view(top[0].diff_t.to(self.param_dtype)), bottom)

    def _normalization_backward(self, dy, bottom):
        """dE/dx from dE/d(x_norm) (N, C, spatial)."""
        if self.use_global_stats:
            dx = dy / self._std
        else:
            y = self._x_norm.to(self.param_dtype)
            mean_dy = dy.mean(dim=(0, 2), keepdim=True)
            mean_dy_y = (dy * y).mean(dim=(0, 2), keepdim=True)
            dx = (dy - mean_dy - mean_dy_y * y) / self._std
        bottom[0].diff_t = dx.reshape(bottom[0].shape)


def _param_shape(layer: Layer, bottom, axis_param: int, num_axes: int, what: str) -> tuple[int, ...]:
    """Shape of a learned scale/bias: bottom[0]'s axes from ``axis`` (``num_axes`` of them, -1 = all)."""
    b = bottom[0]
    axis = canonical_axis(axis_param, b.num_axes, layer) if b.num_axes else 0
    if num_axes < -1:
        raise layer.error(f"num_axes must be non-negative, or -1 to extend to the end of bottom[0]; "
                          f"got {num_axes}")
    if num_axes >= 0 and b.num_axes < axis + num_axes:
        raise layer.error(f"{what} blob's shape extends past bottom[0]'s shape {b.shape} when applied "
                          f"starting with bottom[0] axis = {axis} (num_axes {num_axes})")
    end = b.num_axes if num_axes == -1 else axis + num_axes
    return tuple(b.shape[axis:end])


def _broadcast_dims(layer: Layer, bottom, operand_shape: tuple[int, ...], axis_param: int,
                    what: str) -> tuple[int, int, int]:
    """(outer, dim, inner) so that bottom[0] is viewed as (outer, dim, inner) against the operand."""
    b = bottom[0]
    # A scalar operand applies everywhere; Caffe then ignores the axis.
    axis = 0 if len(operand_shape) == 0 else canonical_axis(axis_param, b.num_axes, layer)
    if b.num_axes < axis + len(operand_shape):
        raise layer.error(f"{what} blob's shape {operand_shape} extends past bottom[0]'s shape {b.shape} "
                          f"when applied starting with bottom[0] axis = {axis}")
    if tuple(b.shape[axis:axis + len(operand_shape)]) != tuple(operand_shape):
        raise layer.error(f"dimension mismatch between bottom[0] {b.shape} (from axis {axis}) and "
                          f"{what} {operand_shape}")
    dim = 1
    for d in operand_shape:
        dim *= d
    return b.count(0, axis), dim, b.count(axis + len(operand_shape))


@register("Bias")
class BiasLayer(Layer):
    """y = x + b, b broadcast over bottom[0]'s axes from ``axis``: a learned param (one bottom,
    shape from ``num_axes``, filled by ``filler``) or bottom[1]."""

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.bias_param
        if len(bottom) == 1:
            shape = _param_shape(self, bottom, p.axis, p.num_axes, "bias")
            if not self.check_blobs([shape]):
                self.blobs = [self.new_blob(shape)]
                fill(self.blobs[0], p.filler)
        self.param_propagate_down = [True] * len(self.blobs)

    def _bias(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        self.dims = _broadcast_dims(self, bottom, self._bias(bottom).shape,
                                    self.layer_param.bias_param.axis, "bias")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        outer, dim, inner = self.dims
        x = bottom[0].data_t.reshape(outer, dim, inner)
        b = self._bias(bottom).data_t.reshape(1, dim, 1)
        top[0].data_t = (x + b).reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        outer, dim, inner = self.dims
        dy = top[0].diff_t
        if len(bottom) == 1:
            if self.param_propagate_down[0]:
                self.blobs[0].diff_t.add_(dy.reshape(outer, dim, inner).sum(dim=(0, 2)).reshape(
                    self.blobs[0].shape))
        elif propagate_down[1]:
            bottom[1].diff_t = dy.reshape(outer, dim, inner).sum(dim=(0, 2)).reshape(bottom[1].shape)
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].take_diff(top[0])  # dy itself (Caffe's ShareDiff)


@register("Scale")
class ScaleLayer(Layer):
    """y = x * s (+ b with ``bias_term``), s broadcast over bottom[0]'s axes from ``axis``: a learned
    param (one bottom; shape from ``num_axes``, ``filler`` default constant 1) or bottom[1].

    Params: [scale, bias] with one bottom, [bias] with two (as Caffe orders them).
    """

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1
    _x: torch.Tensor | None = None

    def layer_setup(self, bottom, top):
        p = self.layer_param.scale_param
        shapes = []
        if len(bottom) == 1:
            shapes.append(_param_shape(self, bottom, p.axis, p.num_axes, "scale"))
        if p.bias_term:
            # The bias spans the same axes as the scale (Caffe's internal Bias layer).
            bias_axes = bottom[1].num_axes if len(bottom) > 1 else p.num_axes
            shapes.append(_param_shape(self, bottom, p.axis, bias_axes, "bias"))
        if not self.check_blobs(shapes):
            self.blobs = [self.new_blob(s) for s in shapes]
            if len(bottom) == 1:
                if p.HasField("filler"):
                    fill(self.blobs[0], p.filler)
                else:
                    self.blobs[0].data_t.fill_(1)  # identity by default
            if p.bias_term:
                fill(self.blobs[-1], p.bias_filler)
        self.bias_term = p.bias_term
        self.param_propagate_down = [True] * len(self.blobs)

    def _scale(self, bottom):
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom, top):
        p = self.layer_param.scale_param
        self.dims = _broadcast_dims(self, bottom, self._scale(bottom).shape, p.axis, "scale")
        if self.bias_term:
            self.bias_dims = _broadcast_dims(self, bottom, self.blobs[-1].shape, p.axis, "bias")
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])

    def forward(self, bottom, top):
        outer, dim, inner = self.dims
        x = bottom[0].data_t
        scale = self._scale(bottom).data_t.reshape(1, dim, 1)
        old = self._x
        if (top[0] is bottom[0] and not bottom[0].data_is_live and old is not None and old is not x
                and old.shape == x.shape and old.dtype == x.dtype == scale.dtype
                and old.is_contiguous() and not torch.compiler.is_compiling()
                and _blob._use_count(old) == 2):  # nothing else holds it
            # In place: the scale's gradient needs the input, so it is kept (as Caffe keeps a
            # copy in temp_) and the output goes into the input kept last pass, which nothing
            # reads any more (the two buffers swap each pass: no copy, nothing allocated)
            self._x = x
            y = torch.mul(x.view(outer, dim, inner), scale, out=old.view(outer, dim, inner))
            if self.bias_term:
                bo, bd, bi = self.bias_dims
                y.view(bo, bd, bi).add_(self.blobs[-1].data_t.reshape(1, bd, 1))
            top[0].data_t = old
            return
        # The scale's gradient needs x, which an in-place top replaces (or, on a live blob, overwrites).
        self._x = x.clone() if top[0] is bottom[0] and bottom[0].data_is_live else x
        y = x.reshape(outer, dim, inner) * scale
        if self.bias_term:
            bo, bd, bi = self.bias_dims
            y = y.reshape(bo, bd, bi) + self.blobs[-1].data_t.reshape(1, bd, 1)
        top[0].data_t = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        outer, dim, inner = self.dims
        dy = top[0].diff_t
        if self.bias_term and self.param_propagate_down[-1]:
            bo, bd, bi = self.bias_dims
            self.blobs[-1].diff_t.add_(dy.reshape(bo, bd, bi).sum(dim=(0, 2)).reshape(self.blobs[-1].shape))
        scale_param = len(bottom) == 1
        if (scale_param and self.param_propagate_down[0]) or (not scale_param and propagate_down[1]):
            g = (dy * self._x).reshape(outer, dim, inner).sum(dim=(0, 2))
            if scale_param:
                self.blobs[0].diff_t.add_(g.reshape(self.blobs[0].shape))
            else:
                bottom[1].diff_t = g.reshape(bottom[1].shape)
        if propagate_down[0]:
            s = self._scale(bottom).data_t.reshape(1, dim, 1)
            if top[0] is bottom[0] and bottom[0].diff_writable:
                dy.view(outer, dim, inner).mul_(s)  # in place, into the blob's own diff
            elif top[0] is not bottom[0] and dy.dtype == bottom[0].dtype:
                dx = bottom[0].mutable_diff_t()
                torch.mul(dy.reshape(outer, dim, inner), s, out=dx.view(outer, dim, inner))
            else:
                bottom[0].diff_t = (dy.reshape(outer, dim, inner) * s).reshape(bottom[0].shape)


@register("Normalize")
class NormalizeLayer(Layer):
    """SSD's L2 normalization (weiliu89/caffe, ``norm_param``) followed by a learned scale.

    ``across_spatial`` (default true): one norm per image over C*H*W, else one per position over C.
    The norm is ``sqrt(sum(x^2) + eps)``. The scale is one value (``channel_shared``, default true;
    a blob with 0 axes, as the fork stores it) or one per channel, filled by ``scale_filler``
    (default constant 1).

    Backward is the fork's: the bottom gradient projects ``top_diff`` and multiplies by the scale
    afterwards, which is the exact gradient only when the scale is channel-shared; the scale's diff
    is ``sum(top * top_diff) / scale`` (per channel when not shared).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.norm_param
        if not 2 <= bottom[0].num_axes <= 4:
            raise self.error(f"bottom must have 2 to 4 axes, got shape {bottom[0].shape}")
        self.across_spatial = p.across_spatial
        self.channel_shared = p.channel_shared
        self.eps = p.eps
        channels = bottom[0].shape[1]
        want = () if self.channel_shared else (channels,)
        if self.blobs:
            if len(self.blobs) != 1 or self.blobs[0].count() != (1 if self.channel_shared else channels):
                got = [b.shape for b in self.blobs]
                raise self.error(f"scale blob {got} is inconsistent with channel_shared "
                                 f"{str(self.channel_shared).lower()} and bottom shape {bottom[0].shape} "
                                 f"(expected shape {want})")
        else:
            self.blobs = [self.new_blob(want)]
            filler = p.scale_filler if p.HasField("scale_filler") else \
                caffe_pb2.FillerParameter(type="constant", value=1.0)
            fill(self.blobs[0], filler)
        self.param_propagate_down = [True]

    def reshape(self, bottom, top):
        if not 2 <= bottom[0].num_axes <= 4:
            raise self.error(f"bottom must have 2 to 4 axes, got shape {bottom[0].shape}")
        want = 1 if self.channel_shared else self.blobs[0].count()
        if not self.channel_shared and bottom[0].shape[1] != want:
            raise self.error(f"bottom shape {bottom[0].shape} has {bottom[0].shape[1]} channels but the "
                             f"scale blob has shape {self.blobs[0].shape}")
        top[0].reshape(bottom[0].shape)

    def _scale(self, c: int) -> torch.Tensor:
        s = self.blobs[0].data_t
        return s.reshape(1, 1, 1) if self.channel_shared else s.reshape(1, c, 1)

    def forward(self, bottom, top):
        n, c = bottom[0].shape[0], bottom[0].shape[1]
        x = bottom[0].data_t.reshape(n, c, -1)
        if self.across_spatial:
            norm = torch.sqrt((x * x).sum(dim=(1, 2), keepdim=True) + self.eps)
        else:
            norm = torch.sqrt((x * x).sum(dim=1, keepdim=True) + self.eps)
        self._norm = norm
        top[0].data_t = (x / norm * self._scale(c)).reshape(bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        n, c = bottom[0].shape[0], bottom[0].shape[1]
        g = top[0].diff_t.reshape(n, c, -1)
        if self.param_propagate_down[0]:
            y = top[0].data_t.reshape(n, c, -1)
            s = self.blobs[0]
            if self.channel_shared:
                s.diff_t.add_(((y * g).sum() / s.data_t).reshape(s.shape))
            else:
                s.diff_t.add_((y * g).sum(dim=(0, 2)) / s.data_t)
        if propagate_down[0]:
            x = bottom[0].data_t.reshape(n, c, -1)
            norm = self._norm
            dims = (1, 2) if self.across_spatial else (1,)
            a = (x * g).sum(dim=dims, keepdim=True)
            d = (g - x * a / (norm * norm)) / norm
            bottom[0].diff_t = (d * self._scale(c)).reshape(bottom[0].shape)


@register("MVN")
class MVNLayer(Layer):
    """Subtracts the mean of each (num, channel) item, or of each num with ``across_channels``, and
    with ``normalize_variance`` divides by (std + eps): Caffe adds eps to the standard deviation.

    As Caffe, the top takes the bottom's legacy 4-D shape (num, channels, height, width).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.mvn_param
        self.normalize_variance = p.normalize_variance
        self.across_channels = p.across_channels
        self.eps = p.eps

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes > 4:
            raise self.error(f"needs a bottom of at most 4 axes (legacy num/channels/height/width), "
                             f"got shape {b.shape}")
        top[0].reshape(b.num, b.channels, b.height, b.width)
        self.rows = b.num if self.across_channels else b.num * b.channels
        self.cols = (b.channels if self.across_channels else 1) * b.height * b.width

    def forward(self, bottom, top):
        x = bottom[0].data_t.reshape(self.rows, self.cols)
        y = x - x.mean(dim=1, keepdim=True)
        if self.normalize_variance:
            std = torch.sqrt((y * y).mean(dim=1, keepdim=True)) + self.eps
            y = y / std
            self._std = std
            self._y = y
        top[0].data_t = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff_t.reshape(self.rows, self.cols)
        dx = dy - dy.mean(dim=1, keepdim=True)
        if self.normalize_variance:
            # Caffe's formula (exact for eps = 0): (dy - mean(dy) - mean(dy * y) * y) / (std + eps)
            y = self._y
            dx = (dx - (dy * y).mean(dim=1, keepdim=True) * y) / self._std
        bottom[0].diff_t = dx.reshape(bottom[0].shape)


# ------------------------------------------------------------------ forks: BN
_BN = caffe_pb2.BNParameter
_SEGNET_BN_FIELDS = ("bn_mode", "scale_filler", "shift_filler")
_PSPNET_BN_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen", "engine")


def bn_flavour(param: caffe_pb2.LayerParameter) -> str:
    """Which fork's ``BN`` a layer is: ``"pspnet"`` or ``"segnet"``.

    Decided by the bn_param fields it sets (SegNet: bn_mode, scale_filler, shift_filler; PSPNet:
    slope_filler, bias_filler, momentum, eps, frozen, engine; both kinds is an error), else by its
    param blobs or ParamSpecs (4: PSPNet's scale, shift, running mean, running variance), else
    SegNet's, the first fork to define the type.
    """
    p = param.bn_param
    segnet = [f for f in _SEGNET_BN_FIELDS if p.HasField(f)]
    pspnet = [f for f in _PSPNET_BN_FIELDS if p.HasField(f)]
    if segnet and pspnet:
        raise ValueError(f"BN layer {param.name!r}: bn_param mixes SegNet's fields ({', '.join(segnet)}) "
                         f"with PSPNet's ({', '.join(pspnet)}); a BN layer is one fork's or the other's")
    if segnet:
        return "segnet"
    if pspnet or len(param.blobs) == 4 or len(param.param) == 4:
        return "pspnet"
    return "segnet"


@register("BN")
class BNLayer(Layer):
    """``BN``, the per-channel batch normalization with its own scale and shift that two forks
    define differently; :func:`bn_flavour` tells which one a layer is.

    **SegNet's** (alexgkendall/caffe-segnet): blobs scale and shift, [1, C, 1, 1], filled by
    ``scale_filler``/``shift_filler``. ``bn_mode: LEARN`` normalizes with the batch statistics
    over (N, H, W) in *any* phase: mean, biased variance E[x^2] - E[x]^2, eps 1e-9 (fixed), top =
    scale * x_hat + shift; optional tops 2 and 3 are the batch mean and variance (without eps),
    [1, C, 1, 1]; their diffs are ignored. ``bn_mode: INFERENCE`` is top = scale * x + shift (SegNet
    folds the population statistics into scale/shift offline). Backward writes (does not add) the
    scale and shift diffs, as the fork does.

    **PSPNet's** (hszhao/PSPNet): blobs slope, bias, running mean, running variance, each
    [1, C, 1, 1] (``slope_filler``, ``bias_filler``; mean 0, variance 0, or 1 when ``frozen``). The
    running statistics get lr_mult/decay_mult 0, and with ``frozen`` slope and bias too. TRAIN (not
    frozen): batch mean and biased variance, and the running ones updated as ``(1 - momentum) *
    batch + momentum * running``; TEST or ``frozen``: the running statistics. top = slope * (x -
    mean) / sqrt(var + eps) + bias. Backward: frozen, ``dx = dy * slope / sqrt(var + eps)`` and no
    param diffs; otherwise the batch-norm gradient through the statistics it normalized with (in
    TEST too, as the fork), slope and bias diffs added.
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1
    max_top_blobs = 3

    def layer_setup(self, bottom, top):
        try:
            self.flavour = bn_flavour(self.layer_param)
        except ValueError as e:
            raise self.error(str(e).split(": ", 1)[1]) from None
        if bottom[0].num_axes != 4:
            raise self.error(f"bottom must be 4-D (N, C, H, W), got shape {bottom[0].shape}")
        c = bottom[0].shape[1]
        self.channels = c
        p = self.layer_param.bn_param
        shape = (1, c, 1, 1)
        if self.flavour == "segnet":
            self.learn = p.bn_mode == _BN.LEARN
            self.eps = 1e-9
            if not self.check_blobs([shape, shape]):
                self.blobs = [self.new_blob(shape), self.new_blob(shape)]
                fill(self.blobs[0], p.scale_filler)
                fill(self.blobs[1], p.shift_filler)
            self.param_propagate_down = [True, True]
            return
        if len(top) > 1:
            raise self.error(f"PSPNet's BN has exactly one top, got {len(top)} (the mean/variance tops "
                             f"are SegNet's, with bn_mode)")
        self.frozen = p.frozen
        self.momentum = p.momentum
        self.eps = p.eps
        if not self.check_blobs([shape] * 4):
            self.blobs = [self.new_blob(shape) for _ in range(4)]
            fill(self.blobs[0], p.slope_filler)
            fill(self.blobs[1], p.bias_filler)
            self.blobs[3].data_t.fill_(1.0 if self.frozen else 0.0)
        while len(self.layer_param.param) < 4:
            self.layer_param.param.add()
        for i in (0, 1, 2, 3) if self.frozen else (2, 3):
            self.layer_param.param[i].lr_mult = 0.0
            self.layer_param.param[i].decay_mult = 0.0
        self.param_propagate_down = [True] * 4

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes != 4 or b.shape[1] != self.channels:
            raise self.error(f"bottom {b.shape} must be 4-D with the {self.channels} channels the layer "
                             f"was set up for")
        if top[0] is not b:
            top[0].reshape_like(b)
        for t in top[1:]:
            t.reshape((1, self.channels, 1, 1))

    @staticmethod
    def _channel(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, -1, 1, 1)

    def forward(self, bottom, top):
        x = bottom[0].data_t
        scale, shift = self.blobs[0].data_t, self.blobs[1].data_t
        if self.flavour == "segnet":
            if not self.learn:
                top[0].data_t = x * scale + shift
                return
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = (x * x).mean(dim=(0, 2, 3), keepdim=True) - mean * mean
            if len(top) > 1:
                top[1].data_t = mean.clone()
            if len(top) > 2:
                top[2].data_t = var.clone()
            self._std = torch.sqrt(var + self.eps)
            self._x_hat = (x - mean) / self._std
            top[0].data_t = self._x_hat * scale + shift
            return
        if self.frozen or self.phase == caffe_pb2.TEST:
            mean, var = self.blobs[2].data_t, self.blobs[3].data_t
        else:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
            m = self.momentum
            self.blobs[2].data_t.mul_(m).add_((1 - m) * mean)
            self.blobs[3].data_t.mul_(m).add_((1 - m) * var)
        inv_std = 1.0 / torch.sqrt(var + self.eps)
        x_hat = (x - mean) * inv_std
        if not self.frozen:
            self._x_hat, self._inv_std = x_hat, inv_std
        top[0].data_t = x_hat * scale + shift

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff_t
        scale = self.blobs[0].data_t
        axes = (0, 2, 3)
        if self.flavour == "segnet":
            if not self.learn:
                self.blobs[0].diff_t = (bottom[0].data_t * dy).sum(dim=axes, keepdim=True)
                self.blobs[1].diff_t = dy.sum(dim=axes, keepdim=True)
                if propagate_down[0]:
                    bottom[0].diff_t = dy * scale
                return
            x_hat = self._x_hat
            self.blobs[0].diff_t = (x_hat * dy).sum(dim=axes, keepdim=True)
            self.blobs[1].diff_t = dy.sum(dim=axes, keepdim=True)
            if propagate_down[0]:
                bottom[0].diff_t = self._normalized_gradient(dy * scale, x_hat) / self._std
            return
        if self.frozen:
            if propagate_down[0]:
                bottom[0].diff_t = dy * scale / torch.sqrt(self.blobs[3].data_t + self.eps)
            return
        x_hat = self._x_hat
        if self.param_propagate_down[0]:
            self.blobs[0].diff_t.add_((x_hat * dy).sum(dim=axes, keepdim=True))
        if self.param_propagate_down[1]:
            self.blobs[1].diff_t.add_(dy.sum(dim=axes, keepdim=True))
        if propagate_down[0]:
            bottom[0].diff_t = self._normalized_gradient(dy * scale, x_hat) * self._inv_std

    @staticmethod
    def _normalized_gradient(g: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """g - mean(g) - x_hat * mean(g * x_hat), the means over (N, H, W)."""
        axes = (0, 2, 3)
        return g - g.mean(dim=axes, keepdim=True) - x_hat * (g * x_hat).mean(dim=axes, keepdim=True)
