"""Export of the segmentation forks' layers (DeepLab v2, PSPNet, SegNet, the YOLOv3 ports):
their lowerings and their ONNX and torch emitters, registered into the shared tables
(``lowering.LOWERINGS``, ``onnx_export.EMITTERS``, ``torch_export.EMITTERS``) when
``recaffe.export`` is imported. docs/export.md lists the constructions.

* ``Interp``: the crop (``pad_beg``/``pad_end`` <= 0) as a slice, then align-corners bilinear
  resizing (ONNX ``Resize`` linear/``align_corners``; ``F.interpolate(..., align_corners=True)``).
  An output axis of size 1 samples the first row/column, as the fork (r = 0).
* ``Upsample`` with one bottom (YOLOv3): nearest-neighbour by an integer scale (``Resize``
  nearest/asymmetric/floor; ``F.interpolate(mode="nearest")``).
* ``Upsample`` with a mask (SegNet): ``ScatterElements`` of the data into a zero plane at the
  mask's indices (``Tensor.scatter`` in torch). The mask comes from a MAX ``Pooling`` with two
  tops, which is exported here too: ``MaxPool``'s indices (``max_pool2d(return_indices=True)``)
  over the explicitly padded bottom, mapped back to Caffe's ``h * W + w`` in the unpadded plane.
* ``BN``: SegNet's INFERENCE mode is ``x * scale + shift``; PSPNet's in TEST or ``frozen`` is
  ``(x - mean) * (slope / sqrt(var + eps)) + bias`` with the factor computed in float32. Modes
  that normalize with batch statistics (SegNet's LEARN, PSPNet's TRAIN) are refused.
* ``SegAccuracy`` (a metric against labels) and ``MatWrite`` (writes files) are refused.
"""
from __future__ import annotations

import numpy as np

from ..proto import caffe_pb2
from . import onnx_export, torch_export
from .graph import REFUSED, LayerView, Lowered, Param
from .lowering import LOWERINGS, lowers

_pooling_lowering = LOWERINGS["Pooling"]
_onnx_pooling = onnx_export.EMITTERS["Pooling"]
_torch_pooling = torch_export.EMITTERS["Pooling"]
onnx_emits = onnx_export.emits
torch_emits = torch_export.emits


# ------------------------------------------------------------------------------ lowerings
@lowers("Interp")
def _interp(v: LayerView):
    n, c, h, w = v.bottom_shapes[0]
    lay = v.layer
    beg, end = -lay.pad_beg, -lay.pad_end
    return Lowered({"crop": [beg, h - end, beg, w - end], "size": list(v.top_shapes[0][2:])})


@lowers("Upsample")
def _upsample(v: LayerView):
    lay = v.layer
    if not lay.unpool:
        return Lowered({"mode": "nearest", "scale": lay.scale})
    return Lowered({"mode": "unpool"})


@lowers("Pooling")
def _pooling_with_mask(v: LayerView):
    """Caffe's Pooling; with a mask top (MAX only), the geometry needed to rebuild the mask."""
    if len(v.top_shapes) == 1:
        return _pooling_lowering(v)
    lay = v.layer
    if lay.pool != caffe_pb2.PoolingParameter.MAX:
        raise v.error("only MAX pooling has a mask top")
    one = LayerView(lay, v.bottom_shapes, v.top_shapes[:1])
    lowered = _pooling_lowering(one)
    ph, pw, rh, rw = lowered.attrs["pads"]
    h, w = v.bottom_shapes[0][2:]
    lowered.attrs.update(mask=True, padded=[ph + h + rh, pw + w + rw], plane=[h, w])
    return lowered


@lowers("BN")
def _bn(v: LayerView):
    lay = v.layer
    c = v.bottom_shapes[0][1]
    shape = (1, c, 1, 1)
    if lay.flavour == "segnet":
        if lay.learn:
            raise v.error("SegNet's bn_mode LEARN normalizes with each batch's statistics, in every phase: "
                          "not exportable. SegNet folds the population statistics into scale/shift "
                          "(compute_bn_statistics.py) and deploys bn_mode: INFERENCE")
        return Lowered({}, {"scale": Param(v.blob(0).reshape(shape)),
                            "shift": Param(v.blob(1).reshape(shape))})
    if not (lay.frozen or lay.phase == caffe_pb2.TEST):
        raise v.error("PSPNet's BN in TRAIN phase (not frozen) normalizes with batch statistics: export "
                      "the TEST phase or a frozen layer")
    slope, bias, mean, var = (v.blob(i).reshape(shape) for i in range(4))
    factor = (slope / np.sqrt(var + np.float32(lay.eps))).astype(np.float32)
    return Lowered({}, {"mean": Param(mean, learnable=False), "scale": Param(factor, learnable=False),
                        "shift": Param(bias)})


REFUSED["SegAccuracy"] = ("SegAccuracy scores predictions against labels: it has no inference "
                          "equivalent. Export a deploy net without it")
REFUSED["MatWrite"] = ("MatWrite writes MATLAB files, a side effect with no ONNX/torch equivalent: "
                       "remove it from the net (its bottoms then become the net's outputs)")


# ------------------------------------------------------------------------------ ONNX
def _onnx_slice_hw(b, n, x, crop):
    h0, h1, w0, w1 = crop
    h, w = n.input_shapes[0][2:]
    if (h0, h1, w0, w1) == (0, h, 0, w):
        return x
    return b.op(n, "Slice", [x, b.ints([h0, w0], f"{n.layer}_starts"), b.ints([h1, w1], f"{n.layer}_ends"),
                             b.ints([2, 3], f"{n.layer}_axes")])


@onnx_emits("Interp")
def _onnx_interp(b, n):
    a = n.attrs
    oh, ow = a["size"]
    h0, h1, w0, w1 = a["crop"]
    # an output axis of size 1 samples the first row/column (the fork's ratio is 0 there)
    crop = [h0, h0 + 1 if oh == 1 else h1, w0, w0 + 1 if ow == 1 else w1]
    x = _onnx_slice_hw(b, n, n.inputs[0], crop)
    if (crop[1] - crop[0], crop[3] - crop[2]) == (oh, ow):
        b.op(n, "Identity", [x], n.outputs[0])
        return
    sizes = b.ints(list(n.output_shapes[0]), f"{n.layer}_sizes")
    b.op(n, "Resize", [x, "", "", sizes], n.outputs[0], mode="linear",
         coordinate_transformation_mode="align_corners")


@onnx_emits("Upsample")
def _onnx_upsample(b, n):
    a = n.attrs
    if a["mode"] == "nearest":
        s = float(a["scale"])
        b.op(n, "Resize", [n.inputs[0], "", b.const([1.0, 1.0, s, s], f"{n.layer}_scales")], n.outputs[0],
             mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        return
    bn, c, oh, ow = n.output_shapes[0]
    flat = b.ints([bn, c, -1], f"{n.layer}_flat")
    zeros = b.op(n, "ConstantOfShape", [b.ints([bn, c, oh * ow], f"{n.layer}_plane")],
                 value=b.numpy_helper.from_array(np.zeros(1, np.float32)))
    data = b.op(n, "Reshape", [n.inputs[0], flat])
    index = b.op(n, "Cast", [b.op(n, "Reshape", [n.inputs[1], flat])], to=7)  # INT64
    y = b.op(n, "ScatterElements", [zeros, index, data], axis=2)
    b.op(n, "Reshape", [y, b.ints(list(n.output_shapes[0]), f"{n.layer}_shape")], n.outputs[0])


@onnx_emits("Pooling")
def _onnx_pooling_with_mask(b, n):
    a = n.attrs
    if not a.get("mask"):
        _onnx_pooling(b, n)
        return
    x = onnx_export._pad_explicit(b, n, n.inputs[0], a["pads"], -onnx_export.FLT_MAX)
    pooled, idx = b.op(n, "MaxPool", [x], n_out=2, kernel_shape=a["kernel"], strides=a["stride"])
    b.op(n, "Identity", [pooled], n.outputs[0])
    (hp, wp), (_, w) = a["padded"], a["plane"]
    ph, pw = a["pads"][:2]
    plane = b.op(n, "Mod", [idx, b.ints(hp * wp, f"{n.layer}_padded_plane")])
    width = b.ints(wp, f"{n.layer}_padded_w")
    row = b.op(n, "Sub", [b.op(n, "Div", [plane, width]), b.ints(ph, f"{n.layer}_ph")])
    col = b.op(n, "Sub", [b.op(n, "Mod", [plane, width]), b.ints(pw, f"{n.layer}_pw")])
    flat = b.op(n, "Add", [b.op(n, "Mul", [row, b.ints(w, f"{n.layer}_w")]), col])
    b.op(n, "Cast", [flat], n.outputs[1], to=1)  # FLOAT


@onnx_emits("BN")
def _onnx_bn(b, n):
    x = n.inputs[0]
    if "mean" in n.params:
        x = b.op(n, "Sub", [x, b.param(n, "mean")])
    y = b.op(n, "Mul", [x, b.param(n, "scale")])
    b.op(n, "Add", [y, b.param(n, "shift")], n.outputs[0])


# ------------------------------------------------------------------------------ torch
torch_export._HELPERS["_caffe_max_pool_mask"] = '''
def _caffe_max_pool_mask(x, kernel, stride, pads, plane_w):
    """Caffe's MAX pooling with its mask top: the explicitly padded bottom pooled in floor mode,
    the argmax as the float index h * W + w in the unpadded (n, c) plane."""
    ph, pw, rh, rw = pads
    x = F.pad(x, (pw, rw, ph, rh), value=torch.finfo(x.dtype).min)
    y, idx = F.max_pool2d(x, kernel, stride, return_indices=True)
    wp = x.shape[3]
    return y, ((idx // wp - ph) * plane_w + idx % wp - pw).to(x.dtype)
'''

torch_export._HELPERS["_caffe_unpool"] = '''
def _caffe_unpool(x, mask, top_shape):
    """SegNet's Upsample: a zero top with top[mask[i]] = x[i] in each (n, c) plane."""
    n, c = x.shape[:2]
    y = x.new_zeros((n, c, top_shape[2] * top_shape[3]))
    y = y.scatter(2, mask.reshape(n, c, -1).long(), x.reshape(n, c, -1))
    return y.reshape(top_shape)
'''


@torch_emits("Interp")
def _torch_interp(s, n, xs):
    a = n.attrs
    oh, ow = a["size"]
    h0, h1, w0, w1 = a["crop"]
    h, w = n.input_shapes[0][2:]
    x = xs[0]
    if (h0, h1, w0, w1) != (0, h, 0, w):
        x = f"{x}[:, :, {h0}:{h1}, {w0}:{w1}]"
    if (h1 - h0, w1 - w0) == (oh, ow):
        return x
    return f"F.interpolate({x}, size=({oh}, {ow}), mode='bilinear', align_corners=True)"


@torch_emits("Upsample")
def _torch_upsample(s, n, xs):
    a = n.attrs
    if a["mode"] == "nearest":
        return f"F.interpolate({xs[0]}, scale_factor={a['scale']}, mode='nearest')"
    return f"{s.helper('_caffe_unpool')}({xs[0]}, {xs[1]}, {torch_export._tup(n.output_shapes[0])})"


@torch_emits("Pooling")
def _torch_pooling_with_mask(s, n, xs):
    a = n.attrs
    if not a.get("mask"):
        return _torch_pooling(s, n, xs)
    tup = torch_export._tup
    return (f"{s.helper('_caffe_max_pool_mask')}({xs[0]}, {tup(a['kernel'])}, {tup(a['stride'])}, "
            f"{tup(a['pads'])}, {a['plane'][1]})")


@torch_emits("BN")
def _torch_bn(s, n, xs):
    x = xs[0]
    if "mean" in n.params:
        x = f"({x} - {s.param(n, 'mean')})"
    return f"{x} * {s.param(n, 'scale')} + {s.param(n, 'shift')}"
