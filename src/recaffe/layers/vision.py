"""Vision layers: Convolution, Deconvolution, Pooling, LRN, SPP, Im2col, Crop; and the forks'
resampling layers Interp (DeepLab v2, PSPNet) and Upsample (SegNet's unpooling by mask, the
YOLOv3 ports' nearest-neighbour form).

Shapes, defaults, parameter checks and numbers follow Caffe; the arithmetic runs on torch's
kernels (conv1d/2d/3d, max/avg pooling and their backward kernels). Everything derivable from the
params is computed once at setup, and per-shape geometry once per bottom shape.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import blob as _blob
from .. import layer as _layer
from .. import rng
from ..blob import Blob
from ..layer import Layer, LayerError, batch_chunks, canonical_axis, register
from ..proto import caffe_pb2

FLT_MAX = 3.4028234663852886e38   # Caffe's -FLT_MAX marks a max-pooling window with no pixel
FLT_MIN = 1.1754943508222875e-38  # Caffe starts stochastic pooling's test-time sum at FLT_MIN

_PoolMethod = caffe_pb2.PoolingParameter
_Norm = caffe_pb2.LRNParameter

_CHANNELS_LAST_MIN = 16  # from this many channels on, CPU max pooling runs channels-last
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= v
    return n


# ------------------------------------------------------------------ convolution-like geometry
def _spatial_values(layer: Layer, p, name: str, num_spatial: int, default: int | None):
    """One value per spatial axis from ``name`` (repeated: once or once per axis) or the
    ``name_h``/``name_w`` pair, with Caffe's checks. ``default`` None: the field is required."""
    has_h, has_w = p.HasField(name + "_h"), p.HasField(name + "_w")
    # Caffe names the kernel's repeated field kernel_size, the others by their own name.
    values = list(getattr(p, "kernel_size" if name == "kernel" else name))
    what = "kernel_size" if name == "kernel" else name
    if has_h or has_w:
        if num_spatial != 2:
            raise layer.error(f"{name}_h & {name}_w can only be used for 2D convolution "
                              f"(the bottom has {num_spatial} spatial axes)")
        if values:
            raise layer.error(f"either {what} or {name}_h/w should be specified; not both")
        return (getattr(p, name + "_h"), getattr(p, name + "_w"))
    n = len(values)
    allowed = (1, num_spatial) if default is None else (0, 1, num_spatial)
    if n not in allowed:
        raise layer.error(f"{what} must be specified once, or once per spatial dimension "
                          f"({what} specified {n} times; {num_spatial} spatial dims)")
    if n == 0:
        return (default,) * num_spatial
    return tuple(values[0 if n == 1 else i] for i in range(num_spatial))


def _conv_geometry(layer: Layer, p, num_spatial: int):
    """(kernel, stride, pad, dilation) tuples from a ConvolutionParameter, as Caffe reads them."""
    kernel = _spatial_values(layer, p, "kernel", num_spatial, None)
    if any(k <= 0 for k in kernel):
        raise layer.error(f"filter dimensions must be nonzero (kernel {list(kernel)})")
    stride = _spatial_values(layer, p, "stride", num_spatial, 1)
    if any(s <= 0 for s in stride):
        raise layer.error(f"stride dimensions must be nonzero (stride {list(stride)})")
    pad = _spatial_values(layer, p, "pad", num_spatial, 0)
    n = len(p.dilation)
    if n not in (0, 1, num_spatial):
        raise layer.error(f"dilation must be specified once, or once per spatial dimension "
                          f"(dilation specified {n} times; {num_spatial} spatial dims)")
    dilation = tuple(1 if n == 0 else p.dilation[0 if n == 1 else i] for i in range(num_spatial))
    if any(d <= 0 for d in dilation):
        raise layer.error(f"dilation must be positive (dilation {list(dilation)})")
    return kernel, stride, pad, dilation


def _conv_out(layer: Layer, size: int, k: int, s: int, p: int, d: int) -> int:
    extent = d * (k - 1) + 1
    if size + 2 * p < extent:
        raise layer.error(f"kernel extent {extent} exceeds the padded input size {size + 2 * p}")
    return (size + 2 * p - extent) // s + 1


class _Columns:
    """im2col / col2im for any number of spatial axes, as a gather / index_add through one
    precomputed index (per channel: kernel offsets row-major, then output positions row-major,
    which is Caffe's column layout)."""

    def __init__(self, spatial, kernel, stride, pad, dilation, out, device):
        d = len(spatial)
        self.spatial, self.out, self.pad = tuple(spatial), tuple(out), tuple(pad)
        self.padded = tuple(s + 2 * q for s, q in zip(spatial, pad))
        self.kernel_count = _prod(kernel)
        index = torch.zeros((1,) * (2 * d), dtype=torch.long)
        mult = 1
        for i in reversed(range(d)):
            pos = ((torch.arange(kernel[i]) * dilation[i])[:, None]
                   + (torch.arange(out[i]) * stride[i])[None, :])
            shape = [1] * (2 * d)
            shape[i], shape[d + i] = kernel[i], out[i]
            index = index + (pos * mult).view(shape)
            mult *= self.padded[i]
        self.index = index.reshape(-1).to(device)
        self.pad_arg = [q for q in reversed(pad) for _ in range(2)]
        self.crop = (slice(None), slice(None)) + tuple(slice(q, q + s) for q, s in zip(pad, spatial))

    def im2col(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *spatial) -> (N, C * prod(kernel), *out)."""
        n, c = x.shape[:2]
        if any(self.pad):
            x = F.pad(x, self.pad_arg)
        cols = x.reshape(n * c, -1).index_select(1, self.index)
        return cols.view(n, c * self.kernel_count, *self.out)

    def col2im(self, cols: torch.Tensor, n: int, c: int) -> torch.Tensor:
        """(N, C * prod(kernel), *out) -> (N, C, *spatial), summing overlapping windows."""
        x = torch.zeros(n * c, _prod(self.padded), dtype=cols.dtype, device=cols.device)
        x.index_add_(1, self.index, cols.reshape(n * c, -1))
        x = x.view(n, c, *self.padded)
        return x[self.crop].contiguous() if any(self.pad) else x


class _BaseConvolution(Layer):
    """What Convolution and Deconvolution share (Caffe's BaseConvolutionLayer)."""

    min_bottom_blobs = 1
    min_top_blobs = 1
    equal_num_bottom_top_blobs = True
    reverse = False  # Deconvolution: the weights map top channels to bottom channels
    replaces_tops = replaces_bottom_diffs = True
    # 2-D Convolution in channels-last layout (set by the compiled fast path where it measures faster)
    channels_last = False
    _backward_chunks: list[slice] | None = None

    def layer_setup(self, bottom, top):
        p = self.layer_param.convolution_param
        self.axis = canonical_axis(p.axis, bottom[0].num_axes, self)
        self.num_spatial = bottom[0].num_axes - self.axis - 1
        self.kernel, self.stride, self.pad, self.dilation = _conv_geometry(self, p, self.num_spatial)
        self.channels = bottom[0].shape[self.axis]
        self.num_output = p.num_output
        if self.num_output <= 0:
            raise self.error(f"num_output must be positive, got {self.num_output}")
        if self.channels <= 0:
            raise self.error(f"the input {self.layer_param.bottom[0]!r} has {self.channels} channels "
                             f"(shape {bottom[0].shape}): nothing to convolve")
        self.group = self._group(p)
        if self.group <= 0:
            raise self.error("group must be positive")
        if self.channels % self.group:
            raise self.error(f"the number of input channels ({self.channels}) must be a multiple "
                             f"of group ({self.group})")
        if self.num_output % self.group:
            raise self.error(f"number of output ({self.num_output}) should be multiples of "
                             f"group ({self.group})")
        out_ch, in_ch = ((self.channels, self.num_output) if self.reverse
                         else (self.num_output, self.channels))
        w_shape = (out_ch, in_ch // self.group) + self.kernel
        self.bias_term = p.bias_term
        shapes = [w_shape] + ([(self.num_output,)] if self.bias_term else [])
        if self.blobs and len(self.blobs) != len(shapes):
            raise self.error(f"incorrect number of weight blobs: {len(self.blobs)}, expected "
                             f"{len(shapes)}")
        self.init_weight_and_bias(shapes, p.weight_filler, p.bias_filler)
        # torch kernels take 1-3 spatial axes; no spatial axis runs as one of length 1
        d = max(self.num_spatial, 1)
        self._w_shape = w_shape if self.num_spatial else w_shape + (1,)
        self._k = self.kernel or (1,)
        self._s = list(self.stride or (1,))
        self._p = list(self.pad or (0,))
        self._d = list(self.dilation or (1,))
        self._torch = d <= 3
        self._bias_sizes = [self.num_output] if self.bias_term else None
        self._in_shape = None

    def _group(self, p) -> int:
        return p.group

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != self.axis + 1 + self.num_spatial:
            raise self.error(f"bottom num_axes may not change (now {shape})")
        if shape[self.axis] != self.channels:
            raise self.error(f"input size incompatible with convolution kernel: bottom {shape} has "
                             f"{shape[self.axis]} channels on axis {self.axis}, the weights "
                             f"expect {self.channels}")
        for b in bottom[1:]:
            if b.shape != shape:
                raise self.error(f"all inputs must have the same shape ({b.shape} vs {shape})")
        if shape != self._in_shape:
            spatial = shape[self.axis + 1:]
            out = self._output_spatial(spatial)
            self._in_shape = shape
            self._top_shape = shape[:self.axis] + (self.num_output,) + out
            num = _prod(shape[:self.axis])
            sp_in, sp_out = (spatial or (1,)), (out or (1,))
            self._x_shape = (num, self.channels) + sp_in
            self._y_shape = (num, self.num_output) + sp_out
            if not self._torch:
                # the "conv" direction runs from the bigger (deconv: top) to the smaller grid
                big, small = (sp_out, sp_in) if self.reverse else (sp_in, sp_out)
                self._cols = _Columns(big, self._k, self._s, self._p, self._d, small, self.device)
            item = max(_prod(self._x_shape[1:]), _prod(self._y_shape[1:])) * self.dtype.itemsize
            self.set_batch_chunks(batch_chunks(num, item, self.device) if self._torch else None)
            # backward in fewer, larger slices: mkldnn's backward loses more to small batches
            # than its forward (ResNet-50 at batch 10: +13% with 4 MiB slices; 8 MiB ones are
            # level with 16 MiB ones, which raise SqueezeNet's `caffe time` peak by 20-30 MiB)
            self._backward_chunks = None if self._chunks is None else (
                batch_chunks(num, item, self.device, 2 * _layer.CHUNK_BYTES) or [slice(0, num)])
        for t in top:
            t.reshape(self._top_shape)

    def _weight(self) -> torch.Tensor:
        return self.param_t(0).reshape(self._w_shape)

    def batch_slices(self) -> list[slice] | None:
        """Layer.batch_slices; none in channels-last layout either (the fast path's choice)."""
        return None if self.channels_last else super().batch_slices()

    def forward(self, bottom, top):
        w = self._weight()
        b = self.param_t(1) if self.bias_term else None
        chunks = self.batch_slices()
        for bt, tp in zip(bottom, top):
            x = bt.data_t.reshape(self._x_shape)
            if chunks is None:
                tp.data_t = self._forward(x, w, b).reshape(self._top_shape)
                continue
            y = tp.mutable_data_t().view(self._y_shape)
            for s in chunks:
                y[s] = self._forward(x[s], w, b)

    def backward(self, top, propagate_down, bottom):
        w = self._weight()
        need_w = self.param_propagate_down[0]
        need_b = self.bias_term and self.param_propagate_down[1]
        mask = [False, need_w, need_b]
        # in slices, into the bottom diff's own memory (kept by the net: replaces_bottom_diffs)
        chunks = self._backward_chunks if self.batch_slices() is not None else None
        whole = chunks is None
        chunks = chunks or [slice(None)]
        for tp, down, bt in zip(top, propagate_down, bottom):
            if not (down or need_w or need_b):
                continue
            dy = tp.diff_t.reshape(self._y_shape)
            x = bt.data_t.reshape(self._x_shape)
            mask[0] = down
            dx = None if (whole or not down) else bt.mutable_diff_t().view(self._x_shape)
            for s in chunks:
                gx, gw, gb = self._backward(dy[s], x[s], w, mask)
                if need_w:
                    self.blobs[0].diff_t.add_(gw.reshape(self.blobs[0].shape))
                if need_b:
                    self.blobs[1].diff_t.add_(gb)
                if down:
                    if whole:
                        bt.diff_t = gx.reshape(bt.shape)
                    else:
                        dx[s] = gx

    # ---- the generic path for more than 3 spatial axes: grouped matmuls over columns
    def _grouped_weight(self, w):
        g = self.group
        return w.reshape(g, w.shape[0] // g, -1)  # (G, out/G, in/G * K)

    def _nd_conv(self, x, wg, b, out_ch):
        """Columns of x (the bigger grid) times weights: the convolution direction."""
        n, g = x.shape[0], self.group
        cols = self._cols.im2col(x).reshape(n, g, wg.shape[2], -1)
        y = torch.matmul(wg, cols).reshape((n, out_ch) + self._cols.out)
        if b is not None:
            y = y + b.reshape((1, -1) + (1,) * len(self._cols.out))
        return y

    def _nd_conv_data(self, dy, wg, in_ch):
        """The transpose: columns from outputs, summed back into the bigger grid."""
        n, g = dy.shape[0], self.group
        cols = torch.matmul(wg.transpose(1, 2), dy.reshape(n, g, wg.shape[1], -1))
        return self._cols.col2im(cols, n, in_ch)

    def _nd_conv_weight(self, dy, x):
        n, g = x.shape[0], self.group
        cols = self._cols.im2col(x).reshape(n, g, -1, _prod(self._cols.out))
        dyg = dy.reshape(n, g, dy.shape[1] // g, -1)
        return torch.matmul(dyg, cols.transpose(2, 3)).sum(0)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@register("Convolution")
class ConvolutionLayer(_BaseConvolution):
    """Caffe's Convolution: weights (num_output, channels / group, *kernel), output size
    (in + 2 pad - dilation (kernel - 1) - 1) / stride + 1 rounded down, over the axes after
    ``axis``; several bottoms are convolved with the same weights."""

    def _output_spatial(self, spatial):
        return tuple(_conv_out(self, spatial[i], self.kernel[i], self.stride[i], self.pad[i],
                               self.dilation[i]) for i in range(self.num_spatial))

    def _forward(self, x, w, b):
        if self._torch:
            if self.channels_last and x.dim() == 4:
                x, w = _nhwc(x), _nhwc(w)
            return _CONV[x.dim() - 2](x, w, b, self._s, self._p, self._d, self.group)
        return self._nd_conv(x, self._grouped_weight(w), b, self.num_output)

    def _backward(self, dy, x, w, mask):
        if self._torch:
            if self.channels_last and x.dim() == 4:
                dy, x, w = _nhwc(dy), _nhwc(x), _nhwc(w)
            return torch.ops.aten.convolution_backward(
                dy, x, w, self._bias_sizes if mask[2] else None, self._s, self._p, self._d,
                False, [0] * len(self._s), self.group, mask)
        gx = self._nd_conv_data(dy, self._grouped_weight(w), self.channels) if mask[0] else None
        gw = self._nd_conv_weight(dy, x) if mask[1] else None
        gb = dy.sum((0,) + tuple(range(2, dy.dim()))) if mask[2] else None
        return gx, gw, gb


@register("ConvolutionDepthwise", "DepthwiseConvolution")
class DepthwiseConvolutionLayer(ConvolutionLayer):
    """The mobile nets' depthwise convolution (ConvolutionDepthwise: farmingyard's
    caffe-mobilenet, used by ShuffleNet; DepthwiseConvolution: yonghenglh6's): Convolution with
    group = the bottom's channels, whatever ``convolution_param.group`` says (a group other than 1
    or the channel count is an error). Same params and blobs as Convolution, weights
    (num_output, 1, *kernel); one grouped convolution kernel. num_output must be a multiple of the
    channels (the forks assume num_output == channels; a multiple is a depth multiplier)."""

    def _group(self, p) -> int:
        if p.group not in (1, self.channels):
            raise self.error(f"group is the channel count in a depthwise convolution: group "
                             f"{p.group} given, the bottom has {self.channels} channels")
        if p.num_output % self.channels:
            raise self.error(f"num_output ({p.num_output}) must be a multiple of the bottom's "
                             f"channels ({self.channels}) in a depthwise convolution")
        return self.channels


@register("Deconvolution")
class DeconvolutionLayer(_BaseConvolution):
    """Caffe's Deconvolution (the transpose of Convolution): weights (channels,
    num_output / group, *kernel), output size stride (in - 1) + dilation (kernel - 1) + 1 - 2 pad."""

    reverse = True

    def _output_spatial(self, spatial):
        out = []
        for i in range(self.num_spatial):
            extent = self.dilation[i] * (self.kernel[i] - 1) + 1
            o = self.stride[i] * (spatial[i] - 1) + extent - 2 * self.pad[i]
            if o <= 0:
                raise self.error(f"output size {o} on spatial axis {i} is not positive "
                                 f"(input {spatial[i]}, pad {self.pad[i]})")
            out.append(o)
        return tuple(out)

    def _forward(self, x, w, b):
        if self._torch:
            return _DECONV[x.dim() - 2](x, w, b, self._s, self._p, 0, self.group, self._d)
        y = self._nd_conv_data(x, self._grouped_weight(w), self.num_output)
        if b is not None:
            y = y + b.reshape((1, -1) + (1,) * (y.dim() - 2))
        return y

    def _backward(self, dy, x, w, mask):
        if self._torch:
            return torch.ops.aten.convolution_backward(
                dy, x, w, self._bias_sizes if mask[2] else None, self._s, self._p, self._d,
                True, [0] * len(self._s), self.group, mask)
        gx = self._nd_conv(dy, self._grouped_weight(w), None, self.channels) if mask[0] else None
        # the weights map top (dy) columns to bottom channels: the "input" of that conv is dy
        gw = self._nd_conv_weight(x, dy) if mask[1] else None
        gb = dy.sum((0,) + tuple(range(2, dy.dim()))) if mask[2] else None
        return gx, gw, gb


# ------------------------------------------------------------------------------ Im2col
@register("Im2col")
class Im2colLayer(Layer):
    """Caffe's Im2col: every kernel window as a column; top channels C * prod(kernel), ordered
    channel-major then kernel offset, with the convolution's output grid as spatial axes."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.convolution_param
        self.axis = canonical_axis(p.axis, bottom[0].num_axes, self)
        self.num_spatial = bottom[0].num_axes - self.axis - 1
        if self.num_spatial < 1:
            raise self.error(f"needs at least one spatial axis after axis {self.axis}")
        self.kernel, self.stride, self.pad, self.dilation = _conv_geometry(self, p, self.num_spatial)
        self._in_shape = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != self.axis + 1 + self.num_spatial:
            raise self.error(f"bottom num_axes may not change (now {shape})")
        if shape != self._in_shape:
            spatial = shape[self.axis + 1:]
            out = tuple(_conv_out(self, spatial[i], self.kernel[i], self.stride[i], self.pad[i],
                                  self.dilation[i]) for i in range(self.num_spatial))
            c = shape[self.axis]
            self._in_shape = shape
            self._x_shape = (_prod(shape[:self.axis]), c) + spatial
            self._top_shape = shape[:self.axis] + (c * _prod(self.kernel),) + out
            self._cols = (None if self.num_spatial == 2 else
                          _Columns(spatial, self.kernel, self.stride, self.pad, self.dilation, out,
                                   self.device))
        top[0].reshape(self._top_shape)

    def forward(self, bottom, top):
        x = bottom[0].data_t.reshape(self._x_shape)
        if self._cols is None:
            y = F.unfold(x, self.kernel, self.dilation, self.pad, self.stride)
        else:
            y = self._cols.im2col(x)
        top[0].data_t = y.reshape(self._top_shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        n, c = self._x_shape[:2]
        dy = top[0].diff_t
        if self._cols is None:
            dx = F.fold(dy.reshape(n, c * _prod(self.kernel), -1), self._x_shape[2:], self.kernel,
                        self.dilation, self.pad, self.stride)
        else:
            dx = self._cols.col2im(dy, n, c)
        bottom[0].diff_t = dx.reshape(bottom[0].shape)


# ----------------------------------------------------------------------------- Pooling
def _caffe_pooled(size: int, k: int, p: int, s: int, ceil: bool, any_pad: bool) -> int:
    """Caffe's pooled size: ceil (or floor) of (size + 2 pad - kernel) / stride, plus one; with
    padding on either axis, a last window starting at or beyond size + pad is dropped."""
    a = size + 2 * p - k
    o = (-(-a // s) if ceil else a // s) + 1
    if any_pad and (o - 1) * s >= size + p:
        o -= 1
    return o


def _torch_pooled(size: int, k: int, p: int, s: int, ceil: bool) -> int:
    """What torch's pooling kernels produce (their ceil mode always drops such a last window)."""
    o = (size + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
    if ceil and (o - 1) * s >= size + p:
        o -= 1
    return o


class _PoolGeometry:
    """Per-bottom-shape pooling geometry. ``fast``: torch's kernels with (pad, ceil_mode) give
    Caffe's windows, divisors and shape. Otherwise the bottom is padded explicitly, on the right by
    whatever makes exactly Caffe's windows fit (negative: cropped), and pooled without padding."""

    def __init__(self, layer: "PoolingLayer", h: int, w: int):
        k, s, p = layer.kernel, layer.stride, layer.pad
        ceil = layer.round_mode == _PoolMethod.CEIL
        any_pad = any(p)
        out = tuple(_caffe_pooled(n, k[i], p[i], s[i], ceil, any_pad) for i, n in enumerate((h, w)))
        if any(o <= 0 for o in out):
            raise layer.error(f"pooled output size {out} is not positive for a {h}x{w} input "
                              f"(kernel {list(k)}, pad {list(p)}, stride {list(s)})")
        if any_pad and any((o - 1) * s[i] >= n + p[i] for i, (o, n) in enumerate(zip(out, (h, w)))):
            raise layer.error("the last pooling window starts in the padding")
        self.out = out
        self.size = (h, w)
        self.fast = (layer.pool != _PoolMethod.STOCHASTIC
                     and all(2 * p[i] <= k[i] for i in range(2))
                     and out == tuple(_torch_pooled(n, k[i], p[i], s[i], ceil)
                                      for i, n in enumerate((h, w))))
        self.ceil = ceil
        # explicit padding (left = pad, right = r) so that unpadded floor-mode pooling gives `out`
        right = [(out[i] - 1) * s[i] + k[i] - n - p[i] for i, n in enumerate((h, w))]
        self.pad_arg = [p[1], right[1], p[0], right[0]]
        self.unpad_arg = [-v for v in self.pad_arg]
        self.padded = (h + p[0] + right[0], w + p[1] + right[1])
        # windows that start past the bottom (no padding, ceil mode, stride > kernel) hold no pixel
        starts = [torch.arange(out[i]) * s[i] - p[i] for i in range(2)]
        empty = (starts[0] >= h)[:, None] | (starts[1] >= w)[None, :]
        self.empty = empty.to(layer.device) if bool(empty.any()) else None
        if layer.pool == _PoolMethod.AVE and not self.fast:
            # Caffe divides by the window clipped to the padded bottom (it may reach 0 or below in
            # empty windows, where Caffe's 0 / size gives NaN or -0 and so do we)
            sizes = [torch.minimum(st + k[i], torch.tensor((h, w)[i] + p[i])) - st
                     for i, st in enumerate(starts)]
            self.divisor = (sizes[0][:, None] * sizes[1][None, :]).to(layer.device, layer.dtype)


@register("Pooling")
class PoolingLayer(Layer):
    """Caffe's Pooling over the last two axes of a 4-D bottom: MAX (an optional second top holds
    the argmax as float indices into each h x w plane), AVE (divisor: the window clipped to the
    padded bottom; the sum covers real pixels only) and STOCHASTIC (training: one pixel drawn with
    probability proportional to its value; testing: the value-weighted average sum x^2 / sum x)."""

    exact_num_bottom_blobs = 1
    min_top_blobs = 1
    max_top_blobs = 1
    replaces_tops = replaces_bottom_diffs = True

    def __init__(self, param, dtype=torch.float32, device="cpu"):
        super().__init__(param, dtype, device)
        if param.pooling_param.pool == _PoolMethod.MAX:
            self.max_top_blobs = 2  # the argmax mask

    def layer_setup(self, bottom, top):
        p = self.layer_param.pooling_param
        self.pool = p.pool
        if self.pool not in (_PoolMethod.MAX, _PoolMethod.AVE, _PoolMethod.STOCHASTIC):
            raise self.error(f"unknown pooling method {self.pool}")
        self.global_pooling = p.global_pooling
        has_k, has_kh, has_kw = p.HasField("kernel_size"), p.HasField("kernel_h"), p.HasField("kernel_w")
        if self.global_pooling:
            if has_k or has_kh or has_kw:
                raise self.error("with global_pooling: true, the filter size cannot be specified")
        else:
            if has_k and has_kh and has_kw:
                raise self.error("filter size is kernel_size OR kernel_h and kernel_w; not both")
            if not has_k and not (has_kh and has_kw):
                raise self.error("filter size is kernel_size, or (for non-square filters) both "
                                 "kernel_h and kernel_w")
        if not ((not p.HasField("pad") and p.HasField("pad_h") and p.HasField("pad_w"))
                or (not p.HasField("pad_h") and not p.HasField("pad_w"))):
            raise self.error("pad is pad OR pad_h and pad_w are required")
        if not ((not p.HasField("stride") and p.HasField("stride_h") and p.HasField("stride_w"))
                or (not p.HasField("stride_h") and not p.HasField("stride_w"))):
            raise self.error("stride is stride OR stride_h and stride_w are required")
        if self.global_pooling:
            kernel = tuple(bottom[0].shape[2:4]) if bottom[0].num_axes == 4 else (1, 1)
        elif has_k:
            kernel = (p.kernel_size, p.kernel_size)
        else:
            kernel = (p.kernel_h, p.kernel_w)
        if min(kernel) <= 0:
            raise self.error(f"filter dimensions cannot be zero (kernel {list(kernel)})")
        self.pad = (p.pad_h, p.pad_w) if p.HasField("pad_h") else (p.pad, p.pad)
        self.stride = (p.stride_h, p.stride_w) if p.HasField("stride_h") else (p.stride, p.stride)
        if min(self.stride) <= 0:
            raise self.error(f"stride must be positive (stride {list(self.stride)})")
        if self.global_pooling and (any(self.pad) or self.stride != (1, 1)):
            raise self.error("with global_pooling: true, only pad = 0 and stride = 1 are allowed")
        if any(self.pad):
            if self.pool == _PoolMethod.STOCHASTIC:
                raise self.error("padding is implemented only for average and max pooling")
            if self.pad[0] >= kernel[0] or self.pad[1] >= kernel[1]:
                raise self.error(f"pad {list(self.pad)} must be smaller than the kernel {list(kernel)}")
        self.kernel = kernel
        self.round_mode = p.round_mode
        if self.round_mode not in (_PoolMethod.CEIL, _PoolMethod.FLOOR):
            raise self.error(f"unknown rounding mode {self.round_mode}")
        self._geom = None
        self._idx = None

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"input must have 4 axes, corresponding to (num, channels, height, "
                             f"width); got shape {shape}")
        hw = shape[2:]
        if self._geom is None or self._geom.size != hw:
            if self.global_pooling:
                self.kernel = hw
            self._geom = _PoolGeometry(self, *hw)
        g = self._geom
        padded = shape[0] * shape[1] * g.padded[0] * g.padded[1]
        if not g.fast and padded > _blob.MAX_BLOB_COUNT:
            # windows far past the bottom (a stride much larger than the input): recaffe pads the
            # bottom to Caffe's windows, which would take more than a blob may hold
            raise self.error(f"kernel {list(self.kernel)}, stride {list(self.stride)} and pad {list(self.pad)} "
                             f"on a {hw[0]}x{hw[1]} input reach {g.padded[0]}x{g.padded[1]}: {padded} "
                             "values, over INT_MAX")
        top_shape = shape[:2] + self._geom.out
        for t in top:
            t.reshape(top_shape)
        # torch's MAX and AVE kernels, one top: large batches run in slices into the blobs' own
        # memory (layer.batch_chunks; the input's size bounds the kernels' scratch here)
        simple = g.fast and self.pool != _PoolMethod.STOCHASTIC and len(top) == 1
        self.set_batch_chunks(batch_chunks(shape[0], _prod(shape[1:]) * self.dtype.itemsize, self.device)
                              if simple else None)

    # ---------------------------------------------------------------- forward
    def forward(self, bottom, top):
        x = bottom[0].data_t
        g = self._geom
        chunks = self.batch_slices()
        if chunks is not None:
            self._forward_sliced(chunks, x, top[0].mutable_data_t(), g)
            return
        self._idx = self._test_total = None  # the last forward's, not kept beside the new ones
        if self.pool == _PoolMethod.MAX:
            y, idx = self._max_forward(x, g)
            self._idx = idx
            if len(top) > 1:
                top[1].data_t = idx.to(self.dtype)
        elif self.pool == _PoolMethod.AVE:
            if g.fast:
                y = F.avg_pool2d(x, self.kernel, self.stride, self.pad, g.ceil, True)
            else:
                y = self._sum_pool(F.pad(x, g.pad_arg)) / g.divisor
        elif self.phase == caffe_pb2.TRAIN:
            y = self._stochastic_train(x, g)
        else:
            y = self._stochastic_test(x, g)
        top[0].data_t = y

    def _forward_sliced(self, chunks, x, y, g):
        if self.pool == _PoolMethod.AVE:
            for s in chunks:
                y[s] = F.avg_pool2d(x[s], self.kernel, self.stride, self.pad, g.ceil, True)
            return
        if self._idx is None or self._idx.shape != y.shape:
            self._idx = torch.empty(y.shape, dtype=torch.int32, device=y.device)
        for s in chunks:
            y[s], self._idx[s] = self._max_forward(x[s], g)

    def _backward_sliced(self, chunks, dy, x, dx, g):
        for s in chunks:
            if self.pool == _PoolMethod.MAX:
                torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
                    dy[s], x[s], self.kernel, self.stride, self.pad, [1, 1], g.ceil,
                    self._idx[s].long(), grad_input=dx[s])
            else:
                torch.ops.aten.avg_pool2d_backward.grad_input(
                    dy[s], x[s], self.kernel, self.stride, self.pad, g.ceil, True, None,
                    grad_input=dx[s])

    def _sum_pool(self, xp):
        return F.avg_pool2d(xp, self.kernel, self.stride, 0, False, True, 1)

    def _max_forward(self, x, g):
        if g.fast:
            if x.device.type == "cpu" and x.shape[1] >= _CHANNELS_LAST_MIN:
                # torch's NCHW max pooling is scalar code on CPU; the channels-last kernel is
                # vectorized over channels and picks the same (first) maximum
                y, idx = torch.ops.aten.max_pool2d_with_indices(
                    x.contiguous(memory_format=torch.channels_last), self.kernel, self.stride,
                    self.pad, [1, 1], g.ceil)
                return y.contiguous(), _mask(idx)
            y, idx = torch.ops.aten.max_pool2d_with_indices(x, self.kernel, self.stride, self.pad,
                                                            [1, 1], g.ceil)
            return y, _mask(idx)
        xp = F.pad(x, g.pad_arg, value=-math.inf)
        y, ip = torch.ops.aten.max_pool2d_with_indices(xp, self.kernel, self.stride, [0, 0], [1, 1],
                                                       False)
        wp = g.padded[1]
        idx = (ip // wp - self.pad[0]) * g.size[1] + (ip % wp - self.pad[1])
        if g.empty is not None:
            y = y.masked_fill(g.empty, -FLT_MAX)
            idx = idx.masked_fill(g.empty, -1)
        return y, _mask(idx)

    def _windows(self, x, g):
        """(N, C, oh, ow, kh * kw): each window's values in Caffe's row-major order."""
        xp = F.pad(x, g.pad_arg)
        (kh, kw), (sh, sw) = self.kernel, self.stride
        win = xp.unfold(2, kh, sh).unfold(3, kw, sw)
        return win.reshape(win.shape[:4] + (kh * kw,))

    def _stochastic_train(self, x, g):
        win = self._windows(x, g)
        csum = win.cumsum(-1)
        u = torch.rand(csum.shape[:4], generator=rng.generator(self.device), dtype=self.dtype,
                       device=self.device)
        thres = u * csum[..., -1]
        # the first position whose running sum reaches the threshold; right-padding zeros never
        # win since the running sum at a zero equals the one just before it
        pick = (csum >= thres.unsqueeze(-1)).to(torch.uint8).argmax(-1, keepdim=True)
        y = win.gather(-1, pick).squeeze(-1)
        kw = self.kernel[1]
        oh = torch.arange(g.out[0], device=self.device).view(-1, 1) * self.stride[0]
        ow = torch.arange(g.out[1], device=self.device).view(1, -1) * self.stride[1]
        pick = pick.squeeze(-1)
        idx = (oh + pick // kw) * g.size[1] + (ow + pick % kw)
        if g.empty is not None:
            y = y.masked_fill(g.empty, 0)
            idx = idx.masked_fill(g.empty, -1)
        self._idx = _mask(idx)
        return y

    def _stochastic_test(self, x, g):
        xp = F.pad(x, g.pad_arg)
        total = self._sum_pool(xp) + FLT_MIN
        self._test_total = total
        return self._sum_pool(xp * xp) / total

    # --------------------------------------------------------------- backward
    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff_t
        x = bottom[0].data_t
        g = self._geom
        chunks = self.batch_slices()
        if chunks is not None:
            self._backward_sliced(chunks, dy, x, bottom[0].mutable_diff_t(), g)
            return
        if self.pool == _PoolMethod.MAX:
            if len(top) > 1:
                # Caffe routes the gradient through the mask top's values
                dx = self._scatter(dy, top[1].data_t.to(torch.long), x.shape)
            elif g.fast:
                dx = torch.ops.aten.max_pool2d_with_indices_backward(
                    dy, x, self.kernel, self.stride, self.pad, [1, 1], g.ceil, self._idx.long())
            else:
                dx = self._scatter(dy, self._idx, x.shape)
        elif self.pool == _PoolMethod.AVE:
            if g.fast:
                dx = torch.ops.aten.avg_pool2d_backward(dy, x, self.kernel, self.stride, self.pad,
                                                        g.ceil, True, None)
            else:
                dx = self._sum_pool_backward(dy / g.divisor, x, g)
        elif self.phase == caffe_pb2.TRAIN:
            dx = self._scatter(dy, self._idx, x.shape)
        else:
            # Caffe has no test-phase gradient (it reuses stale draws); we give the exact one of
            # y = sum x^2 / sum x, i.e. dy/dx = (2 x - y) / sum x.
            r = dy / self._test_total
            y = top[0].data_t
            dx = 2 * x * self._sum_pool_backward(r, x, g) - self._sum_pool_backward(r * y, x, g)
        bottom[0].diff_t = dx

    def _sum_pool_backward(self, dy, x, g):
        shape = x.shape[:2] + g.padded
        ref = torch.empty(shape, dtype=dy.dtype, device=dy.device)
        dxp = torch.ops.aten.avg_pool2d_backward(dy, ref, self.kernel, self.stride, [0, 0], False,
                                                 True, 1)
        return F.pad(dxp, g.unpad_arg).contiguous()

    @staticmethod
    def _scatter(dy, idx, shape):
        """Add each top diff into the pixel its index names (-1: none) of the same plane."""
        n, c, h, w = shape
        dy = dy.reshape(n * c, -1)
        idx = idx.reshape(n * c, -1).long()
        invalid = idx < 0
        if bool(invalid.any()):
            dy = dy.masked_fill(invalid, 0)
            idx = idx.masked_fill(invalid, 0)
        dx = torch.zeros(n * c, h * w, dtype=dy.dtype, device=dy.device)
        return dx.scatter_add_(1, idx, dy).view(shape)


def _mask(idx: torch.Tensor) -> torch.Tensor:
    """Pooling's argmax indices as kept for backward: int32 and NCHW, as Caffe's max_idx_ (an
    index within one plane fits; int64, torch's type, would double what pooling keeps)."""
    return idx.to(torch.int32, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------- LRN
@register("LRN")
class LRNLayer(Layer):
    """Caffe's local response normalization of a 4-D bottom.

    ACROSS_CHANNELS: y = x (k + alpha / n * sum of x^2 over n neighbouring channels)^-beta.
    WITHIN_CHANNEL: y = x (1 + alpha / n^2 * sum of x^2 over an n x n window)^-beta (Caffe composes
    it from an average pooling padded by (n - 1) / 2, whose divisor is always n^2; k is unused).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1
    replaces_tops = replaces_bottom_diffs = True
    _scale: torch.Tensor | None = None

    def layer_setup(self, bottom, top):
        p = self.layer_param.lrn_param
        self.size = p.local_size
        if self.size > _blob.MAX_BLOB_COUNT:  # Caffe's int size_ reads it as negative: not odd
            raise self.error(f"local_size {self.size} is too large (at most {_blob.MAX_BLOB_COUNT})")
        if self.size % 2 != 1:
            raise self.error(f"LRN only supports odd values for local_size (got {self.size})")
        self.pre_pad = (self.size - 1) // 2
        self.alpha, self.beta, self.k = p.alpha, p.beta, p.k
        self.region = p.norm_region
        if self.region not in (_Norm.ACROSS_CHANNELS, _Norm.WITHIN_CHANNEL):
            raise self.error(f"unknown normalization region {self.region}")

    def reshape(self, bottom, top):
        if bottom[0].num_axes != 4:
            raise self.error(f"input must have 4 axes, corresponding to (num, channels, height, "
                             f"width); got shape {bottom[0].shape}")
        n, c, h, w = bottom[0].shape
        if self.region == _Norm.ACROSS_CHANNELS and n * (c + self.size - 1) * h * w > _blob.MAX_BLOB_COUNT:
            # Caffe's padded_square blob (N, C + local_size - 1, H, W) fails its INT_MAX check
            raise self.error(f"local_size {self.size} over {c} channels: the padded squares would hold "
                             f"{n * (c + self.size - 1) * h * w} values, over INT_MAX")
        top[0].reshape_like(bottom[0])
        # large batches run in slices into the blobs' own memory and a kept scale buffer
        # (layer.batch_chunks): the temporaries are the window sums of a slice
        self.set_batch_chunks(batch_chunks(n, c * h * w * self.dtype.itemsize, self.device)
                              if top[0] is not bottom[0] else None)

    def _window_mean(self, v):
        """Mean over the window (zero padded): channels for ACROSS, h x w for WITHIN."""
        if self.region == _Norm.ACROSS_CHANNELS:
            n, c, h, w = v.shape
            m = F.avg_pool2d(v.reshape(n, 1, c, h * w), (self.size, 1), 1, (self.pre_pad, 0),
                             False, True)
            return m.view(n, c, h, w)
        return F.avg_pool2d(v, self.size, 1, self.pre_pad, False, True)

    def _scale_of(self, x):
        k = self.k if self.region == _Norm.ACROSS_CHANNELS else 1.0
        return self._window_mean(x * x).mul_(self.alpha).add_(k)

    def _bottom_diff(self, dy, x, y, scale):
        # y = x s^-beta with s = c + alpha * mean(x^2): dy/dx = s^-beta - 2 alpha beta x mean'(dy y / s)
        # (the window mean is its own adjoint: symmetric window, constant divisor)
        acc = self._window_mean(dy * y / scale)
        return dy * scale.pow(-self.beta) - (2 * self.alpha * self.beta) * x * acc

    def forward(self, bottom, top):
        x = bottom[0].data_t
        chunks = self.batch_slices()
        if chunks is None:
            self._scale = None  # the last forward's, not kept beside the new one
            scale = self._scale_of(x)
            self._scale = scale  # backward reads bottom and top data too: not in place, as in Caffe
            top[0].data_t = x * scale.pow(-self.beta)
            return
        y = top[0].mutable_data_t()
        if self._scale is None or self._scale.shape != x.shape:
            self._scale = torch.empty_like(x)
        for s in chunks:
            scale = self._scale[s]
            scale.copy_(self._scale_of(x[s]))
            torch.mul(x[s], scale.pow(-self.beta), out=y[s])

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy, x, y, scale = top[0].diff_t, bottom[0].data_t, top[0].data_t, self._scale
        chunks = self.batch_slices()
        if chunks is None:
            bottom[0].diff_t = self._bottom_diff(dy, x, y, scale)
            return
        dx = bottom[0].mutable_diff_t()
        for s in chunks:
            dx[s] = self._bottom_diff(dy[s], x[s], y[s], scale[s])


# --------------------------------------------------------------------------------- SPP
@register("SPP")
class SPPLayer(Layer):
    """Caffe's spatial pyramid pooling: level i pools the bottom into about 2^i x 2^i bins
    (kernel ceil(size / bins), stride = kernel, pad (kernel bins - size + 1) / 2); the levels are
    flattened and concatenated along axis 1. With pyramid_height 1 the top is that single
    pooling's (N, C, 1, 1) output, unflattened, as in Caffe."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.spp_param
        if not p.HasField("pyramid_height") or p.pyramid_height < 1:
            raise self.error("pyramid_height must be at least 1")
        self.height = p.pyramid_height
        self.pool = {caffe_pb2.SPPParameter.MAX: _PoolMethod.MAX,
                     caffe_pb2.SPPParameter.AVE: _PoolMethod.AVE,
                     caffe_pb2.SPPParameter.STOCHASTIC: _PoolMethod.STOCHASTIC}.get(p.pool)
        if self.pool is None:
            raise self.error(f"unknown pooling method {p.pool}")
        self._in_shape = None

    def _pooling_param(self, level: int, h: int, w: int) -> caffe_pb2.LayerParameter:
        bins = 2 ** level
        param = caffe_pb2.LayerParameter(name=self.name, type="Pooling")
        pp = param.pooling_param
        kh, kw = -(-h // bins), -(-w // bins)
        pp.kernel_h, pp.kernel_w = kh, kw
        pp.stride_h, pp.stride_w = kh, kw
        pp.pad_h, pp.pad_w = (kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2
        pp.pool = self.pool
        # Caffe builds its inner layers from a fresh LayerParameter, so they run in TRAIN phase.
        return param

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        if len(shape) != 4:
            raise self.error(f"input must have 4 axes, corresponding to (num, channels, height, "
                             f"width); got shape {shape}")
        if shape != self._in_shape:
            h, w = shape[2:]
            if h <= 0 or w <= 0:
                raise self.error(f"input dimensions cannot be zero ({shape})")
            self._proxy = Blob(shape, self.dtype, self.device)
            self._levels = []
            for i in range(self.height):
                layer = PoolingLayer(self._pooling_param(i, h, w), self.dtype, self.device)
                out = Blob((), self.dtype, self.device)
                try:
                    layer.setup([self._proxy], [out])
                except LayerError as e:
                    raise self.error(f"pyramid level {i}: {e}") from None
                self._levels.append((layer, out))
            self._in_shape = shape
            self._sizes = [out.count(1) for _, out in self._levels]
            if self.height == 1:
                self._top_shape = self._levels[0][1].shape
            else:
                self._top_shape = (shape[0], sum(self._sizes))
        top[0].reshape(self._top_shape)

    def forward(self, bottom, top):
        self._proxy.data_t = bottom[0].data_t
        outs = []
        for layer, out in self._levels:
            layer.forward([self._proxy], [out])
            outs.append(out.data_t.reshape(out.shape[0], -1))
        top[0].data_t = outs[0].reshape(self._top_shape) if self.height == 1 else torch.cat(outs, 1)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        self._proxy.data_t = bottom[0].data_t
        dy = top[0].diff_t.reshape(top[0].shape[0], -1)
        total = None
        start = 0
        for (layer, out), size in zip(self._levels, self._sizes):
            out.diff_t = dy[:, start:start + size].reshape(out.shape)
            start += size
            layer.backward([out], [True], [self._proxy])
            total = self._proxy.diff_t if total is None else total + self._proxy.diff_t
        bottom[0].diff_t = total


# -------------------------------------------------------------------------------- Crop
@register("Crop")
class CropLayer(Layer):
    """Caffe's Crop: bottom[0] cut to bottom[1]'s shape on every axis from ``axis`` on, starting at
    ``offset`` (none: 0; one value: all those axes; else one per axis). No gradient reaches
    bottom[1] (Caffe leaves its diff untouched)."""

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.crop_param
        n = bottom[0].num_axes
        self.axis = canonical_axis(p.axis, n, self)
        self.offset = list(p.offset)
        if len(self.offset) > 1 and self.axis + len(self.offset) != n:
            raise self.error(f"number of offset values specified ({len(self.offset)}) must be equal "
                             f"to the number of dimensions following axis {self.axis} "
                             f"({n - self.axis})")
        self._key = None

    def reshape(self, bottom, top):
        a, b = bottom[0].shape, bottom[1].shape
        key = (a, b)
        if key != self._key:
            if len(b) < len(a):
                raise self.error(f"bottom[1] {b} has fewer axes than bottom[0] {a}")
            slices, shape = [], []
            for i in range(len(a)):
                if i < self.axis:
                    slices.append(slice(None))
                    shape.append(a[i])
                    continue
                off = 0 if not self.offset else self.offset[0 if len(self.offset) == 1 else i - self.axis]
                if a[i] - off < b[i]:
                    raise self.error(f"the crop for dimension {i} is out-of-bounds with size {b[i]} "
                                     f"and offset {off} (bottom size {a[i]})")
                slices.append(slice(off, off + b[i]))
                shape.append(b[i])
            self._slices, self._shape, self._key = tuple(slices), tuple(shape), key
        top[0].reshape(self._shape)

    def forward(self, bottom, top):
        top[0].data_t = bottom[0].data_t[self._slices].contiguous()

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dx = torch.zeros(bottom[0].shape, dtype=self.dtype, device=self.device)
        dx[self._slices] = top[0].diff_t
        bottom[0].diff_t = dx


# ------------------------------------------------------------------ forks: Interp and Upsample
def interp_matrix(size_in: int, size_eff: int, offset: int, size_out: int) -> np.ndarray:
    """The (size_out, size_in) matrix of DeepLab's 1-D align-corners interpolation
    (``caffe_cpu_interp2``): output i samples the cropped input [offset, offset + size_eff) at
    ``r * i`` with ``r = (size_eff - 1) / (size_out - 1)`` in float32, the weights ``1 - l`` and
    ``l`` taken in float32 from the integer part; the last row/column has no right neighbour.
    Rows of the input outside the crop get no weight."""
    m = np.zeros((size_out, size_in), dtype=np.float64)
    if size_eff == size_out:
        m[np.arange(size_out), offset + np.arange(size_out)] = 1.0
        return m
    r = np.float32(size_eff - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0.0)
    pos = (r * np.arange(size_out, dtype=np.float32)).astype(np.float32)
    low = pos.astype(np.int64)  # truncation, as C's float -> int
    lam = (pos - low.astype(np.float32)).astype(np.float32).astype(np.float64)
    step = (low < size_eff - 1).astype(np.int64)
    rows = np.arange(size_out)
    np.add.at(m, (rows, offset + low), 1.0 - lam)
    np.add.at(m, (rows, offset + low + step), lam)
    return m


@register("Interp")
class InterpLayer(Layer):
    """DeepLab v2's (and PSPNet's, the same code) bilinear resize with aligned corners.

    The bottom is first cropped by ``pad_beg``/``pad_end`` (both <= 0: a negative pad_beg drops
    the first rows *and* columns, pad_end the last ones), giving ``in_eff = in + pad_beg +
    pad_end``. The output size, checked in this order: ``shrink_factor`` alone ->
    ``(in_eff - 1) / s + 1``; ``zoom_factor`` alone -> ``in_eff + (in_eff - 1)(z - 1)``; both
    ``height`` and ``width`` -> them; shrink and zoom -> shrink then zoom. Shrinking is the same
    point sampling (no averaging). Forward is ``Mh @ x @ Mw^T`` with the 1-D matrices of
    :func:`interp_matrix`; backward is its exact adjoint (cropped positions get diff 0).
    """

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.interp_param
        self.pad_beg, self.pad_end = p.pad_beg, p.pad_end
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error(f"only non-positive padding (cropping) is supported, got pad_beg "
                             f"{self.pad_beg}, pad_end {self.pad_end}")
        has = p.HasField
        if has("shrink_factor") and p.shrink_factor < 1:
            raise self.error(f"shrink_factor must be positive, got {p.shrink_factor}")
        if has("zoom_factor") and p.zoom_factor < 1:
            raise self.error(f"zoom_factor must be positive, got {p.zoom_factor}")
        if not (has("shrink_factor") or has("zoom_factor") or (has("height") and has("width"))):
            raise self.error("interp_param needs zoom_factor, shrink_factor, or both height and width")
        self._key = None

    def _output_size(self, size_eff: int, explicit: int) -> int:
        p = self.layer_param.interp_param
        shrink, zoom = p.HasField("shrink_factor"), p.HasField("zoom_factor")
        if shrink and not zoom:
            return (size_eff - 1) // p.shrink_factor + 1
        if zoom and not shrink:
            return size_eff + (size_eff - 1) * (p.zoom_factor - 1)
        if p.HasField("height") and p.HasField("width"):
            return explicit
        out = (size_eff - 1) // p.shrink_factor + 1
        return out + (out - 1) * (p.zoom_factor - 1)

    def reshape(self, bottom, top):
        b = bottom[0]
        if b.num_axes != 4:
            raise self.error(f"bottom must be 4-D (N, C, H, W), got shape {b.shape}")
        key = b.shape
        if key != self._key:
            p = self.layer_param.interp_param
            n, c, h, w = b.shape
            h_eff, w_eff = h + self.pad_beg + self.pad_end, w + self.pad_beg + self.pad_end
            if h_eff <= 0 or w_eff <= 0:
                raise self.error(f"cropping by pad_beg {self.pad_beg} and pad_end {self.pad_end} leaves "
                                 f"nothing of bottom shape {b.shape}")
            oh, ow = self._output_size(h_eff, p.height), self._output_size(w_eff, p.width)
            if oh <= 0 or ow <= 0:
                raise self.error(f"output size {oh}x{ow} must be positive (bottom shape {b.shape})")
            off = -self.pad_beg
            self._mh = torch.as_tensor(interp_matrix(h, h_eff, off, oh), dtype=self.dtype, device=self.device)
            self._mw = torch.as_tensor(interp_matrix(w, w_eff, off, ow), dtype=self.dtype, device=self.device)
            self._top_shape = (n, c, oh, ow)
            self._key = key
        top[0].reshape(self._top_shape)

    def forward(self, bottom, top):
        x = bottom[0].data_t
        top[0].data_t = torch.matmul(torch.matmul(self._mh, x), self._mw.t()).contiguous()

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff_t
        bottom[0].diff_t = torch.matmul(torch.matmul(self._mh.t(), dy), self._mw).contiguous()


@register("Upsample")
class UpsampleLayer(Layer):
    """``Upsample``, one type name for two forks, told apart by the number of bottoms:

    * **two bottoms (data, mask): SegNet's unpooling** (alexgkendall/caffe-segnet). The mask is
      the argmax top of a MAX Pooling (index ``h * W + w`` in each (n, c) plane of the pooling's
      input). The top, ``upsample_h`` x ``upsample_w`` when both are set, else ``H * scale_h -
      pad_out_h`` x ``W * scale_w - pad_out_w`` (``scale`` for both, default 2; ``pad_out_*`` only
      with scale 2), is zero except ``top[mask[i]] = data[i]``; backward gathers
      ``bottom_diff[i] = top_diff[mask[i]]``. No gradient goes to the mask. A mask index outside
      the top plane is an error.
    * **one bottom: the YOLOv3 ports' nearest-neighbour upsampling** (darknet2caffe's
      ``upsample_param { scale: 2 }``): every pixel repeated ``scale`` x ``scale`` times; backward
      sums each block. Only ``scale`` applies to this form.
    """

    min_bottom_blobs = 1
    max_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.upsample_param
        has = p.HasField
        self.unpool = len(bottom) == 2
        if not self.unpool:
            extra = [f for f in ("scale_h", "scale_w", "upsample_h", "upsample_w", "pad_out_h", "pad_out_w")
                     if has(f)]
            if extra:
                raise self.error(f"with one bottom (the YOLOv3 ports' nearest-neighbour Upsample) only "
                                 f"upsample_param.scale applies; {', '.join(extra)} need SegNet's "
                                 f"second bottom, the pooling mask")
            if p.scale < 1:
                raise self.error(f"scale must be positive, got {p.scale}")
            self.scale = p.scale
            return
        if not ((has("upsample_h") and has("upsample_w"))
                or (not has("scale") and has("scale_h") and has("scale_w"))
                or (not has("scale_h") and not has("scale_w"))):
            raise self.error("upsample_h and upsample_w are required, else (deprecated) scale or both "
                             "scale_h and scale_w")
        if has("upsample_h") and has("upsample_w"):
            self.size = (p.upsample_h, p.upsample_w)
            if p.upsample_h <= 1 or p.upsample_w <= 1:
                raise self.error(f"upsample_h and upsample_w must be > 1, got {p.upsample_h}x{p.upsample_w}")
            return
        self.size = None
        self.scale_hw = (p.scale_h, p.scale_w) if has("scale_h") else (p.scale, p.scale)
        if min(self.scale_hw) <= 1:
            raise self.error(f"the scale must be > 1, got {self.scale_hw[0]}x{self.scale_hw[1]}")
        self.pad_out = (int(p.pad_out_h), int(p.pad_out_w))
        for axis, pad, s in zip("hw", self.pad_out, self.scale_hw):
            if pad and s != 2:
                raise self.error(f"pad_out_{axis} requires scale_{axis} == 2 (got {s}): otherwise the "
                                 f"output size is ill-defined")

    def reshape(self, bottom, top):
        x = bottom[0]
        if x.num_axes != 4:
            raise self.error(f"bottom[0] must be 4-D (N, C, H, W), got shape {x.shape}")
        n, c, h, w = x.shape
        if not self.unpool:
            top[0].reshape((n, c, h * self.scale, w * self.scale))
            return
        if bottom[1].shape != x.shape:
            raise self.error(f"the mask bottom[1] {bottom[1].shape} must have the data bottom[0]'s shape "
                             f"{x.shape}")
        if self.size is not None:
            oh, ow = self.size
        else:
            oh = h * self.scale_hw[0] - self.pad_out[0]
            ow = w * self.scale_hw[1] - self.pad_out[1]
        top[0].reshape((n, c, oh, ow))

    def _mask_index(self, mask: torch.Tensor, plane: int) -> torch.Tensor:
        idx = mask.reshape(mask.shape[0], mask.shape[1], -1).to(torch.int64)  # C's static_cast<int>
        if idx.numel() and (int(idx.max()) >= plane or int(idx.min()) < 0):
            bad = int(idx.max()) if int(idx.max()) >= plane else int(idx.min())
            raise self.error(f"mask index {bad} out of range for the {plane}-pixel top plane: check that "
                             f"the upsample size matches the input of the pooling layer that made the mask")
        return idx

    def forward(self, bottom, top):
        x = bottom[0].data_t
        n, c, oh, ow = top[0].shape
        if not self.unpool:
            s = self.scale
            top[0].data_t = x.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
            return
        idx = self._mask_index(bottom[1].data_t, oh * ow)
        y = torch.zeros((n, c, oh * ow), dtype=x.dtype, device=x.device)
        y.scatter_(2, idx, x.reshape(n, c, -1))
        top[0].data_t = y.reshape(n, c, oh, ow)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        dy = top[0].diff_t
        n, c, h, w = bottom[0].shape
        if not self.unpool:
            s = self.scale
            bottom[0].diff_t = dy.reshape(n, c, h, s, w, s).sum(dim=(3, 5))
            return
        idx = self._mask_index(bottom[1].data_t, dy.shape[2] * dy.shape[3])
        bottom[0].diff_t = torch.gather(dy.reshape(n, c, -1), 2, idx).reshape(n, c, h, w)
