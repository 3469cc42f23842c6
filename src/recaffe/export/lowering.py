"""One lowering per Caffe type: the layer's Caffe semantics resolved into explicit attributes and
constants (geometry, divisor maps, folded statistics) that both exporters emit mechanically.

Every function takes a :class:`~recaffe.export.graph.LayerView` of a layer the net has set up and
returns a :class:`~recaffe.export.graph.Lowered` (or ``ALIAS``). Anything Caffe computes that an
ONNX runtime or torch would compute differently is decided here, once; docs/export.md lists the
constructions.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..proto import caffe_pb2
from .graph import ALIAS, LayerView, Lowered, Param, registrar

LOWERINGS: dict[str, Callable[[LayerView], Lowered]] = {}

_Pool = caffe_pb2.PoolingParameter
_Eltwise = caffe_pb2.EltwiseParameter
_Reduction = caffe_pb2.ReductionParameter
_LRN = caffe_pb2.LRNParameter

FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)  # Caffe's stochastic pooling (TEST) adds it to the sum


lowers = registrar(LOWERINGS)


def _weight_and_bias(v: LayerView, bias: bool) -> dict[str, Param]:
    params = {"weight": Param(v.blob(0))}
    if bias:
        params["bias"] = Param(v.blob(1))
    return params


def _test_phase(v: LayerView) -> bool:
    return v.layer.phase == caffe_pb2.TEST


# ------------------------------------------------------------------------------ routing
@lowers("Split")
def _split(v):
    return ALIAS


@lowers("Silence")
def _silence(v):
    return ALIAS  # no tops: its bottoms are simply consumed


@lowers("Dropout")
def _dropout(v):
    if not _test_phase(v):
        raise v.error("dropout in TRAIN phase is random; export the TEST phase (identity)")
    if not v.layer.scale_train:  # Faster R-CNN's fork: TEST multiplies by (1 - ratio)
        return Lowered({"factor": float(v.layer.test_factor)})
    return ALIAS


@lowers("Concat")
def _concat(v):
    if len(v.bottom_shapes) == 1:
        return ALIAS
    return Lowered({"axis": v.layer.axis})


@lowers("Slice")
def _slice(v):
    if len(v.top_shapes) == 1:
        return ALIAS
    return Lowered({"axis": v.layer.axis, "sizes": list(v.layer.sizes)})


@lowers("Flatten")
def _flatten(v):
    p = v.param.flatten_param
    n = len(v.bottom_shapes[0])
    start, end = p.axis % n, p.end_axis % n
    return Lowered({"start": start, "end": end})


@lowers("Reshape")
def _reshape(v):
    """Caffe's shape (0: copy the bottom dim, -1: infer) replaces axes [start, end)."""
    p = v.param.reshape_param
    n = len(v.bottom_shapes[0])
    start = p.axis if p.axis >= 0 else n + p.axis + 1
    end = n if p.num_axes == -1 else start + p.num_axes
    return Lowered({"start": start, "end": end, "dims": list(v.layer.dims)})


@lowers("Crop")
def _crop(v):
    """bottom[0] cut to the top's size on every axis from ``axis``, from ``offset`` (none: 0; one
    value: every axis; else one per axis)."""
    axis, offset = v.layer.axis, v.layer.offset
    ranges = []
    for i in range(axis, len(v.bottom_shapes[0])):
        off = 0 if not offset else offset[0 if len(offset) == 1 else i - axis]
        ranges.append((i, off, off + v.top_shapes[0][i]))
    return Lowered({"ranges": ranges})


@lowers("Tile")
def _tile(v):
    return Lowered({"axis": v.layer.axis, "tiles": v.layer.tiles})


# ------------------------------------------------------------------------------ inner product
@lowers("InnerProduct")
def _inner_product(v):
    lay = v.layer
    return Lowered({"axis": lay.axis, "transpose": lay.transpose, "bias": lay.bias_term},
                   _weight_and_bias(v, lay.bias_term))


@lowers("Embed")
def _embed(v):
    return Lowered({"bias": v.layer.bias_term}, _weight_and_bias(v, v.layer.bias_term))


@lowers("Parameter")
def _parameter(v):
    return Lowered({}, {"value": Param(v.blob(0))})


# ------------------------------------------------------------------------------ convolution
@lowers("Convolution", "Deconvolution")
def _convolution(v):
    lay = v.layer
    if lay.axis != 1:
        raise v.error(f"only axis 1 (channels) is exportable, got axis {lay.axis}")
    if not 1 <= lay.num_spatial <= 3:
        raise v.error(f"only 1 to 3 spatial axes are exportable, got {lay.num_spatial}")
    return Lowered({"kernel": list(lay.kernel), "stride": list(lay.stride), "pad": list(lay.pad),
                    "dilation": list(lay.dilation), "group": lay.group, "bias": lay.bias_term},
                   _weight_and_bias(v, lay.bias_term))


# ------------------------------------------------------------------------------ pooling
@lowers("Pooling")
def _pooling(v):
    """Caffe's windows made explicit: pad the bottom by ``pad`` on the left and on the right by
    whatever makes the last (CEIL) window end exactly (negative: crop), then pool without padding
    in floor mode. MAX pads with -FLT_MAX (a window holding no pixel gives -FLT_MAX, as Caffe;
    the torch module pads with its type's lowest value, the same in float32);
    AVE pads with zeros and divides the window sums by Caffe's divisor map: the window clipped to
    the padded bottom (padding counts, what lies beyond it does not)."""
    lay = v.layer
    if len(v.top_shapes) > 1:
        raise v.error("the argmax mask top of MAX pooling is not exportable")
    (kh, kw), (sh, sw), (ph, pw) = lay.kernel, lay.stride, lay.pad
    h, w = v.bottom_shapes[0][2:]
    oh, ow = v.top_shapes[0][2:]
    right = ((oh - 1) * sh + kh - h - ph, (ow - 1) * sw + kw - w - pw)
    attrs = {"kernel": [kh, kw], "stride": [sh, sw], "pads": [ph, pw, right[0], right[1]]}
    params = {}
    if lay.pool == _Pool.MAX:
        attrs["method"] = "max"
    elif lay.pool == _Pool.AVE:
        attrs["method"] = "ave"
        rows = np.minimum(np.arange(oh) * sh - ph + kh, h + ph) - (np.arange(oh) * sh - ph)
        cols = np.minimum(np.arange(ow) * sw - pw + kw, w + pw) - (np.arange(ow) * sw - pw)
        divisor = (rows[:, None] * cols[None, :]).astype(np.float32)
        if np.any(divisor != kh * kw):
            params["divisor"] = Param(divisor.reshape(1, 1, oh, ow), learnable=False)
    else:
        if not _test_phase(v):
            raise v.error("STOCHASTIC pooling in TRAIN phase is random; export the TEST phase")
        attrs["method"] = "stochastic"  # TEST: sum x^2 / (sum x + FLT_MIN) over each window
    return Lowered(attrs, params)


# ------------------------------------------------------------------------------ neurons
@lowers("ReLU")
def _relu(v):
    return Lowered({"negative_slope": float(v.layer.negative_slope)})


@lowers("PReLU")
def _prelu(v):
    slope = v.blob(0).reshape(-1)
    return Lowered({"ndim": len(v.bottom_shapes[0])}, {"slope": Param(slope)})


@lowers("Sigmoid", "TanH", "AbsVal", "BNLL")
def _plain(v):
    return Lowered()


@lowers("ELU")
def _elu(v):
    return Lowered({"alpha": float(v.layer.alpha)})


@lowers("Power")
def _power(v):
    lay = v.layer
    return Lowered({"power": float(lay.power), "scale": float(lay.scale), "shift": float(lay.shift)})


@lowers("Exp")
def _exp(v):
    return Lowered({"inner": float(v.layer.inner_scale), "outer": float(v.layer.outer_scale)})


@lowers("Log")
def _log(v):
    lay = v.layer
    return Lowered({"scale": float(lay.input_scale), "shift": float(lay.input_shift),
                    "base_scale": float(lay.base_scale)})


@lowers("Clip")
def _clip(v):
    return Lowered({"min": float(v.layer.min), "max": float(v.layer.max)})


@lowers("Swish")
def _swish(v):
    return Lowered({"beta": float(v.layer.beta)})


@lowers("Threshold")
def _threshold(v):
    return Lowered({"threshold": float(v.layer.threshold)})


# ------------------------------------------------------------------------------ normalization
@lowers("LRN")
def _lrn(v):
    lay = v.layer
    region = "across" if lay.region == _LRN.ACROSS_CHANNELS else "within"
    return Lowered({"region": region, "size": lay.size, "alpha": float(lay.alpha),
                    "beta": float(lay.beta), "k": float(lay.k)})


def _channel_shape(v: LayerView) -> tuple[int, ...]:
    shape = v.bottom_shapes[0]
    return (shape[1],) + (1,) * (len(shape) - 2)


@lowers("BatchNorm")
def _batch_norm(v):
    """Folded statistics, computed in float32 exactly as the layer does: mean = blob0 / s and
    std = sqrt(blob1 / s + eps), with s = blob2 (a zero scale factor gives zero statistics)."""
    lay = v.layer
    if not lay.use_global_stats:
        raise v.error("batch statistics (use_global_stats false) are not exportable; export the TEST "
                      "phase or set use_global_stats")
    if len(v.bottom_shapes[0]) < 2:
        raise v.error(f"needs a bottom with a channel axis, got shape {v.bottom_shapes[0]}")
    with torch.no_grad():
        s = lay.blobs[2].data_t.float()[0]
        inv = torch.where(s == 0, torch.zeros_like(s), 1 / s)
        if getattr(lay, "nvcaffe", False):
            inv = torch.ones_like(s)  # NVCaffe uses its statistics as they are
        mean = lay.blobs[0].data_t.float() * inv
        std = torch.sqrt(lay.blobs[1].data_t.float() * inv + lay.eps)
        if getattr(lay, "scale_bias", False):
            # NVCaffe's y = x_norm * scale + bias, folded: (x - (mean - bias * std / scale)) / (std / scale)
            scale, bias = lay.blobs[3].data_t.float(), lay.blobs[4].data_t.float()
            if bool((scale == 0).any()):
                raise v.error("NVCaffe's scale_bias with a zero scale cannot be folded into the exported "
                              "normalization")
            mean = mean - bias * std / scale
            std = std / scale
    shape = _channel_shape(v)
    return Lowered({}, {"mean": Param(mean.numpy().reshape(shape), learnable=False),
                        "std": Param(std.numpy().reshape(shape), learnable=False)})


def _broadcast_shape(v: LayerView, operand: tuple[int, ...], axis: int) -> list[int]:
    """The operand's shape padded with trailing 1s so that it broadcasts (numpy rules) over
    bottom[0] from ``axis``; a scalar operand applies everywhere (Caffe ignores the axis)."""
    n = len(v.bottom_shapes[0])
    if not operand:
        return [1]
    axis = axis % n
    return list(operand) + [1] * (n - axis - len(operand))


@lowers("Scale")
def _scale(v):
    lay = v.layer
    p = v.param.scale_param
    two = len(v.bottom_shapes) > 1
    operand = v.bottom_shapes[1] if two else tuple(lay.blobs[0].shape)
    attrs = {"shape": _broadcast_shape(v, operand, p.axis), "bias": lay.bias_term}
    params = {} if two else {"scale": Param(v.blob(0))}
    if lay.bias_term:
        attrs["bias_shape"] = _broadcast_shape(v, tuple(lay.blobs[-1].shape), p.axis)
        params["bias"] = Param(v.blob(len(lay.blobs) - 1))
    return Lowered(attrs, params)


@lowers("Bias")
def _bias(v):
    p = v.param.bias_param
    two = len(v.bottom_shapes) > 1
    operand = v.bottom_shapes[1] if two else tuple(v.layer.blobs[0].shape)
    return Lowered({"shape": _broadcast_shape(v, operand, p.axis)},
                   {} if two else {"bias": Param(v.blob(0))})


@lowers("MVN")
def _mvn(v):
    lay = v.layer
    return Lowered({"across_channels": lay.across_channels, "normalize_variance": lay.normalize_variance,
                    "eps": float(lay.eps)})


@lowers("Softmax")
def _softmax(v):
    return Lowered({"axis": v.layer.axis})


# ------------------------------------------------------------------------------ elementwise
@lowers("Eltwise")
def _eltwise(v):
    lay = v.layer
    op = {_Eltwise.SUM: "sum", _Eltwise.PROD: "prod", _Eltwise.MAX: "max"}[lay.op]
    return Lowered({"op": op, "coeffs": [float(c) for c in lay.coeffs]})


@lowers("Reduction")
def _reduction(v):
    lay = v.layer
    op = {_Reduction.SUM: "sum", _Reduction.ASUM: "asum", _Reduction.SUMSQ: "sumsq",
          _Reduction.MEAN: "mean"}[lay.op]
    return Lowered({"op": op, "axis": lay.axis, "coeff": float(lay.coeff)})


@lowers("ArgMax")
def _argmax(v):
    """Caffe orders ties by the larger index first: the exporters take the top k of the reversed
    axis and map the indices back."""
    lay = v.layer
    shape = v.bottom_shapes[0]
    axis = lay.axis if lay.has_axis else None
    dim = shape[axis] if axis is not None else int(np.prod(shape[1:]))
    return Lowered({"axis": axis, "top_k": lay.top_k, "out_max_val": lay.out_max_val, "dim": dim})
