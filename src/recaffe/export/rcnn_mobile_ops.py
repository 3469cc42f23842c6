"""Export of the Faster R-CNN / R-FCN and mobile / YOLO fork types: lowerings, ONNX emitters and
torch emitters, registered in the shared tables (docs/export.md lists the constructions).

ReLU6, ShuffleChannel, ConvolutionDepthwise / DepthwiseConvolution, Axpy, Reorg, Region,
ROIPooling, PSROIPooling and Dropout with ``scale_train: false`` are exported; Proposal is not
(its number of outputs depends on the data, and its NMS has no ONNX equivalent with
py-faster-rcnn's pixel IoU): it is in graph.REFUSED with the reason.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import onnx_export, torch_export
from .graph import REFUSED, LayerView, Lowered
from .lowering import _convolution as _lower_convolution
from .lowering import lowers
from .onnx_export import emits as onnx_emits
from .torch_export import _HELPERS
from .torch_export import emits as torch_emits

_FLOAT = 1   # onnx.TensorProto.FLOAT
_INT64 = 7   # onnx.TensorProto.INT64
_DOUBLE = 11  # onnx.TensorProto.DOUBLE


# ------------------------------------------------------------------------------ lowerings
@lowers("ReLU6")
def _relu6(v: LayerView):
    return Lowered({"negative_slope": float(v.layer.negative_slope)})


@lowers("ShuffleChannel")
def _shuffle_channel(v):
    return Lowered({"group": v.layer.group})


@lowers("ConvolutionDepthwise", "DepthwiseConvolution")
def _depthwise(v):
    return _lower_convolution(v)  # a Convolution whose group is the channel count


@lowers("Axpy")
def _axpy(v):
    x = v.bottom_shapes[1]
    return Lowered({"scale_shape": list(x[:2]) + [1] * (len(x) - 2)})


@lowers("Reorg")
def _reorg(v):
    return Lowered({"stride": v.layer.stride, "reverse": v.layer.reverse})


@lowers("Region")
def _region(v):
    lay = v.layer
    return Lowered({"boxes": lay.boxes, "softmax": lay.softmax})


@lowers("ROIPooling")
def _roi_pooling(v):
    lay = v.layer
    return Lowered({"pooled": [lay.pooled_h, lay.pooled_w], "spatial_scale": float(lay.spatial_scale)})


@lowers("PSROIPooling")
def _psroi_pooling(v):
    lay = v.layer
    return Lowered({"output_dim": lay.output_dim, "group_size": lay.group_size,
                    "spatial_scale": float(lay.spatial_scale)})


REFUSED["Proposal"] = (
    "not exportable: its number of proposals depends on the data, and its greedy NMS (py-faster-rcnn's "
    "pixel IoU, with + 1 on widths and heights) has no ONNX or fixed-shape torch equivalent. Export the "
    "net up to the RPN outputs and run the proposal step outside the exported graph.")


# ------------------------------------------------------------------------------ ONNX
def _x(n):
    return n.inputs[0]


def _y(n):
    return n.outputs[0]


# Dropout in TEST with the Faster R-CNN fork's scale_train: false multiplies by (1 - ratio):
# lowering.py lowers it to a "Dropout" node with that factor
@onnx_emits("Dropout")
def _onnx_dropout(b, n):
    b.op(n, "Mul", [_x(n), b.scalar(n.attrs["factor"], f"{n.layer}_factor")], _y(n))


@onnx_emits("ReLU6")
def _onnx_relu6(b, n):
    slope = n.attrs["negative_slope"]
    clipped = b.op(n, "Clip", [_x(n), b.scalar(0.0, f"{n.layer}_zero"), b.scalar(6.0, f"{n.layer}_six")],
                   None if slope else _y(n))
    if slope:
        neg = b.op(n, "Min", [_x(n), b.scalar(0.0, f"{n.layer}_zero")])
        b.op(n, "Add", [clipped, b.op(n, "Mul", [neg, b.scalar(slope, f"{n.layer}_slope")])], _y(n))


@onnx_emits("ShuffleChannel")
def _onnx_shuffle(b, n):
    shape = n.input_shapes[0]
    g = n.attrs["group"]
    grid = onnx_export._reshape_to(b, n, _x(n), [shape[0], g, shape[1] // g, -1])
    t = b.op(n, "Transpose", [grid], perm=[0, 2, 1, 3])
    onnx_export._reshape_to(b, n, t, shape, _y(n))


@onnx_emits("ConvolutionDepthwise", "DepthwiseConvolution")
def _onnx_depthwise(b, n):
    onnx_export.EMITTERS["Convolution"](b, dataclasses.replace(n, type="Convolution"))


@onnx_emits("Axpy")
def _onnx_axpy(b, n):
    a = onnx_export._reshape_to(b, n, n.inputs[0], n.attrs["scale_shape"])
    b.op(n, "Add", [b.op(n, "Mul", [a, n.inputs[1]]), n.inputs[2]], _y(n))


def _reorg_views(shape, stride, reverse):
    """(view, perm) of darknet's reorg in the bottom's shape (see layers/yolo.py), forward direction."""
    n, c, h, w = shape
    s = stride
    if not reverse:
        return [n, c // (s * s), h, s, w, s], [0, 3, 5, 1, 2, 4]
    return [n, s, s, c // (s * s), h, w], [0, 3, 4, 1, 5, 2]


@onnx_emits("Reorg")
def _onnx_reorg(b, n):
    view, perm = _reorg_views(n.input_shapes[0], n.attrs["stride"], n.attrs["reverse"])
    t = b.op(n, "Transpose", [onnx_export._reshape_to(b, n, _x(n), view)], perm=perm)
    onnx_export._reshape_to(b, n, t, n.output_shapes[0], _y(n))


@onnx_emits("Region")
def _onnx_region(b, n):
    shape = n.input_shapes[0]
    num, c, h, w = shape
    boxes = n.attrs["boxes"]
    cells = onnx_export._reshape_to(b, n, _x(n), [num, c, h * w])
    flat = b.op(n, "Transpose", [cells], perm=[0, 2, 1])
    grid = onnx_export._reshape_to(b, n, flat, [num, h * w, boxes, c // boxes])

    def part(start, end):
        return b.op(n, "Slice", [grid, b.ints([start], f"{n.layer}_starts"), b.ints([end], f"{n.layer}_ends"),
                                 b.ints([3], f"{n.layer}_axes")])

    coords = part(0, 4)
    obj = b.op(n, "Sigmoid", [part(4, 5)])
    classes = part(5, c // boxes)
    if n.attrs["softmax"]:
        classes = b.op(n, "Softmax", [classes], axis=3)
    out = b.op(n, "Concat", [coords, obj, classes], axis=3)
    onnx_export._reshape_to(b, n, out, shape, _y(n))


@onnx_emits("ROIPooling")
def _onnx_roi_pooling(b, n):
    # onnxruntime's MaxRoiPool is the fork's kernel: C's round of the scaled corners, size
    # max(end - start + 1, 1), floor/ceil bins clipped to the map, 0 for an empty bin, strict > max
    rois = onnx_export._reshape_to(b, n, n.inputs[1], [-1, 5])
    b.op(n, "MaxRoiPool", [_x(n), rois], _y(n), pooled_shape=n.attrs["pooled"],
         spatial_scale=n.attrs["spatial_scale"])


def _onnx_c_round(b, n, v):
    """C's round (halves away from zero): Round (halves to even) except where |v - trunc(v)| = 0.5."""
    sign = b.op(n, "Sign", [v])
    trunc = b.op(n, "Mul", [sign, b.op(n, "Floor", [b.op(n, "Abs", [v])])])
    half = b.op(n, "Equal", [b.op(n, "Abs", [b.op(n, "Sub", [v, trunc])]), b.scalar(0.5, f"{n.layer}_half")])
    return b.op(n, "Where", [half, b.op(n, "Add", [trunc, sign]), b.op(n, "Round", [v])])


@onnx_emits("PSROIPooling")
def _onnx_psroi_pooling(b, n):
    """Window sums from an integral image (float64 CumSum), gathered at each bin's corners."""
    a = n.attrs
    _, c, h, w = n.input_shapes[0]
    g, dim, scale = a["group_size"], a["output_dim"], a["spatial_scale"]
    L = n.layer
    xd = b.op(n, "Cast", [_x(n)], to=_DOUBLE)
    cs = b.op(n, "CumSum", [b.op(n, "CumSum", [xd, b.ints(2, f"{L}_axis2")]), b.ints(3, f"{L}_axis3")])
    integral = b.op(n, "Pad", [cs, b.ints([0, 0, 1, 1, 0, 0, 0, 0], f"{L}_pads")])
    flat = onnx_export._reshape_to(b, n, integral, [-1])
    rois = onnx_export._reshape_to(b, n, n.inputs[1], [-1, 5])

    def cols(start, end):
        return b.op(n, "Slice", [rois, b.ints([start], f"{L}_starts"), b.ints([end], f"{L}_ends"),
                                 b.ints([1], f"{L}_axes")])

    batch = b.op(n, "Cast", [cols(0, 1)], to=_INT64)                              # (R, 1), truncated
    rounded = _onnx_c_round(b, n, cols(1, 5))                                     # (R, 4)
    start = b.op(n, "Mul", [b.op(n, "Slice", [rounded, b.ints([0], f"{L}_s0"), b.ints([2], f"{L}_e2"),
                                              b.ints([1], f"{L}_a1")]), b.scalar(scale, f"{L}_scale")])
    end_ = b.op(n, "Slice", [rounded, b.ints([2], f"{L}_s2"), b.ints([4], f"{L}_e4"), b.ints([1], f"{L}_a1")])
    end = b.op(n, "Mul", [b.op(n, "Add", [end_, b.scalar(1.0, f"{L}_one")]), b.scalar(scale, f"{L}_scale")])
    size = b.op(n, "Div", [b.op(n, "Max", [b.op(n, "Sub", [end, start]), b.scalar(0.1, f"{L}_min_size")]),
                           b.scalar(float(g), f"{L}_group")])
    axis2 = b.ints([2], f"{L}_unsqueeze")
    size3 = b.op(n, "Unsqueeze", [size, axis2])                                   # (R, 2, 1): x, y
    start3 = b.op(n, "Unsqueeze", [start, axis2])
    p = np.arange(g, dtype=np.float32)
    lo = b.op(n, "Floor", [b.op(n, "Add", [b.op(n, "Mul", [size3, b.const(p, f"{L}_bins")]), start3])])
    hi = b.op(n, "Ceil", [b.op(n, "Add", [b.op(n, "Mul", [size3, b.const(p + 1, f"{L}_bins1")]), start3])])
    limit = b.ints(np.array([w, h]).reshape(1, 2, 1), f"{L}_limit")
    zero = b.ints(0, f"{L}_zero")

    def clip(v):
        return b.op(n, "Min", [b.op(n, "Max", [b.op(n, "Cast", [v], to=_INT64), zero]), limit])

    lo, hi = clip(lo), clip(hi)                                                   # (R, 2, G) int64

    def pick(v, i, shape):
        return onnx_export._reshape_to(b, n, b.op(n, "Gather", [v, b.ints(i, f"{L}_which")], axis=1), shape)

    ws, we = pick(lo, 0, [-1, 1, 1, g]), pick(hi, 0, [-1, 1, 1, g])
    hs, he = pick(lo, 1, [-1, 1, g, 1]), pick(hi, 1, [-1, 1, g, 1])
    ch = ((np.arange(dim)[:, None, None] * g + np.arange(g)[:, None]) * g + np.arange(g)).reshape(1, dim, g, g)
    plane = b.op(n, "Mul", [b.op(n, "Add", [b.op(n, "Mul", [onnx_export._reshape_to(b, n, batch, [-1, 1, 1, 1]),
                                                            b.ints(c, f"{L}_channels")]),
                                            b.ints(ch, f"{L}_channel_map")]),
                            b.ints((h + 1) * (w + 1), f"{L}_plane")])            # (R, D, G, G)
    wp = b.ints(w + 1, f"{L}_row")

    def at(rows, columns):
        index = b.op(n, "Add", [b.op(n, "Add", [plane, b.op(n, "Mul", [rows, wp])]), columns])
        return b.op(n, "Gather", [flat, index], axis=0)

    total = b.op(n, "Add", [b.op(n, "Sub", [b.op(n, "Sub", [at(he, we), at(hs, we)]), at(he, ws)]), at(hs, ws)])
    area = b.op(n, "Mul", [b.op(n, "Sub", [he, hs]), b.op(n, "Sub", [we, ws])])  # (R, 1, G, G)
    one = b.ints(1, f"{L}_one_int")
    mean = b.op(n, "Div", [total, b.op(n, "Cast", [b.op(n, "Max", [area, one])], to=_DOUBLE)])
    empty = b.op(n, "Equal", [area, b.ints(0, f"{L}_zero_area")])
    zero_d = b.const(np.float64(0.0), f"{L}_zero_double", np.float64)
    out = b.op(n, "Where", [empty, zero_d, mean])
    b.op(n, "Cast", [out], _y(n), to=_FLOAT)


# ------------------------------------------------------------------------------ torch
_HELPERS["_caffe_round"] = '''
def _caffe_round(v):
    """C's round(): halves away from zero (torch.round rounds them to even)."""
    t = torch.trunc(v)
    return torch.where((v - t).abs() == 0.5, t + torch.sign(v), torch.round(v))
'''
_HELPERS["_caffe_roi_pool"] = '''
def _caffe_roi_pool(x, rois, pooled_h, pooled_w, scale):
    """Faster R-CNN's ROIPooling: per ROI (batch, x1, y1, x2, y2), corners times scale rounded
    (C's round), floor/ceil bins clipped to the map, the max of each bin (0 for an empty one).
    Readable form: a mask over the whole map per (ROI, bin)."""
    n, c, h, w = x.shape
    rois = rois.reshape(-1, 5)
    b = rois[:, 0].long()
    x1, y1, x2, y2 = _caffe_round(rois[:, 1:5] * scale).long().unbind(1)

    def bins(start, end, pooled, size):
        bin_size = (end - start + 1).clamp(min=1).to(x.dtype) / pooled
        p = torch.arange(pooled, dtype=x.dtype, device=x.device)
        lo = torch.floor(p * bin_size[:, None]).long() + start[:, None]
        hi = torch.ceil((p + 1) * bin_size[:, None]).long() + start[:, None]
        return lo.clamp(0, size), hi.clamp(0, size)

    hs, he = bins(y1, y2, pooled_h, h)
    ws, we = bins(x1, x2, pooled_w, w)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= hs[..., None]) & (rows < he[..., None])                # (R, PH, H)
    in_cols = (cols >= ws[..., None]) & (cols < we[..., None])                # (R, PW, W)
    mask = in_rows[:, :, None, :, None] & in_cols[:, None, :, None, :]       # (R, PH, PW, H, W)
    values = x[b][:, :, None, None].masked_fill(~mask[:, None], float("-inf"))
    best = values.amax(dim=(-2, -1)).clamp(min=-FLT_MAX)
    empty = ~mask.flatten(3).any(-1)
    return torch.where(empty[:, None], torch.zeros_like(best), best)
'''
_HELPERS["_caffe_psroi_pool"] = '''
def _caffe_psroi_pool(x, rois, output_dim, group, scale):
    """R-FCN's PSROIPooling: position-sensitive averages read from an integral image (float64)."""
    n, c, h, w = x.shape
    rois = rois.reshape(-1, 5)
    b = rois[:, 0].long()
    v = _caffe_round(rois[:, 1:5])
    start, end = v[:, :2] * scale, (v[:, 2:] + 1) * scale                    # (R, 2): x, y
    size = (end - start).clamp(min=0.1) / group
    p = torch.arange(group, dtype=x.dtype, device=x.device)
    limit = torch.tensor([w, h], device=x.device)[None, :, None]
    lo = torch.minimum(torch.floor(p * size[..., None] + start[..., None]).long().clamp(min=0), limit)
    hi = torch.minimum(torch.ceil((p + 1) * size[..., None] + start[..., None]).long().clamp(min=0), limit)
    ws, we = lo[:, 0, None, None, :], hi[:, 0, None, None, :]                 # (R, 1, 1, G)
    hs, he = lo[:, 1, None, :, None], hi[:, 1, None, :, None]                 # (R, 1, G, 1)
    flat = F.pad(x.double().cumsum(2).cumsum(3), (1, 0, 1, 0)).reshape(-1)
    k = torch.arange(output_dim, device=x.device)[:, None, None]
    g = torch.arange(group, device=x.device)
    plane = (b[:, None, None, None] * c + (k * group + g[:, None]) * group + g) * ((h + 1) * (w + 1))

    def at(r, q):
        return flat[plane + r * (w + 1) + q]

    total = at(he, we) - at(hs, we) - at(he, ws) + at(hs, ws)
    area = (he - hs) * (we - ws)
    mean = total / area.clamp(min=1)
    return torch.where(area > 0, mean, torch.zeros_like(mean)).to(x.dtype)
'''
_HELPERS["_caffe_region"] = '''
def _caffe_region(x, boxes, softmax):
    """The YOLOv2 ports' Region: darknet's flatten, logistic objectness, softmax classes."""
    n, c, h, w = x.shape
    y = x.reshape(n, c, h * w).transpose(1, 2).reshape(n, h * w, boxes, -1)
    classes = torch.softmax(y[..., 5:], -1) if softmax else y[..., 5:]
    return torch.cat([y[..., :4], torch.sigmoid(y[..., 4:5]), classes], -1).reshape(x.shape)
'''


@torch_emits("Dropout")
def _torch_dropout(s, n, xs):
    return f"{xs[0]} * {torch_export._num(n.attrs['factor'])}"


@torch_emits("ReLU6")
def _torch_relu6(s, n, xs):
    y = f"torch.clamp({xs[0]}, 0.0, 6.0)"
    slope = n.attrs["negative_slope"]
    return y if not slope else f"{y} + torch.clamp({xs[0]}, max=0.0) * {torch_export._num(slope)}"


@torch_emits("ShuffleChannel")
def _torch_shuffle(s, n, xs):
    shape = n.input_shapes[0]
    g = n.attrs["group"]
    return (f"{xs[0]}.reshape({shape[0]}, {g}, {shape[1] // g}, -1).transpose(1, 2)"
            f".reshape{torch_export._tup(shape)}")


@torch_emits("ConvolutionDepthwise", "DepthwiseConvolution")
def _torch_depthwise(s, n, xs):
    return torch_export.EMITTERS["Convolution"](s, dataclasses.replace(n, type="Convolution"), xs)


@torch_emits("Axpy")
def _torch_axpy(s, n, xs):
    return f"torch.addcmul({xs[2]}, {xs[0]}.reshape{torch_export._tup(n.attrs['scale_shape'])}, {xs[1]})"


@torch_emits("Reorg")
def _torch_reorg(s, n, xs):
    view, perm = _reorg_views(n.input_shapes[0], n.attrs["stride"], n.attrs["reverse"])
    return (f"{xs[0]}.reshape{torch_export._tup(view)}.permute{torch_export._tup(perm)}"
            f".reshape{torch_export._tup(n.output_shapes[0])}")


@torch_emits("Region")
def _torch_region(s, n, xs):
    return f"{s.helper('_caffe_region')}({xs[0]}, {n.attrs['boxes']}, {n.attrs['softmax']})"


@torch_emits("ROIPooling")
def _torch_roi_pooling(s, n, xs):
    s.helper("_caffe_round")
    ph, pw = n.attrs["pooled"]
    return (f"{s.helper('_caffe_roi_pool')}({xs[0]}, {xs[1]}, {ph}, {pw}, "
            f"{torch_export._num(n.attrs['spatial_scale'])})")


@torch_emits("PSROIPooling")
def _torch_psroi_pooling(s, n, xs):
    s.helper("_caffe_round")
    a = n.attrs
    return (f"{s.helper('_caffe_psroi_pool')}({xs[0]}, {xs[1]}, {a['output_dim']}, {a['group_size']}, "
            f"{torch_export._num(a['spatial_scale'])})")
