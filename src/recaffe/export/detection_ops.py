"""Export of SSD's layers (weiliu89/caffe): Permute, Normalize, PriorBox, DetectionOutput.

Registered into the shared tables (lowering.LOWERINGS, onnx_export.EMITTERS, torch_export.EMITTERS)
when ``recaffe.export`` is imported. See docs/export.md ("SSD layers").

* Permute: ONNX Transpose / ``permute``.
* Normalize: the L2 norm (over C*H*W or over C) plus eps, the division, the scale.
* PriorBox: a constant (its values depend only on shapes and params), computed by the layer itself.
* SmoothL1Loss, MultiBoxLoss, DetectionEvaluate: refused with the reason (losses, scoring).
* DetectionOutput: the decode as explicit ops; per-class candidate selection (TopK of ``top_k``),
  ONNX NonMaxSuppression on each (image, class) row, ``keep_top_k`` per image through a TopK
  threshold, NonZero for the fork's row order, and the fork's empty-output rows. ONNX's NMS has no
  ``eta``: a net with ``eta < 1`` is refused for ONNX (the torch module runs the fork's adaptive
  NMS exactly). The torch module copies recaffe's own torch-only functions
  (layers/detection.py), so it computes exactly what the layer does.
"""
from __future__ import annotations

import inspect

import numpy as np

from .. import boxes
from ..layers import detection as det
from . import torch_export
from .graph import ALIAS, REFUSED, Lowered, Param
from .lowering import FLT_MAX, lowers
from .onnx_export import _reshape_to, _x, _y, emits as onnx_emits
from .torch_export import _num, _tup, emits as torch_emits


# ------------------------------------------------------------------------------ refused
REFUSED["SmoothL1Loss"] = ("SmoothL1Loss is a training loss with no inference equivalent: export a deploy "
                           "net (without losses)")
REFUSED["MultiBoxLoss"] = ("MultiBoxLoss is SSD's training loss with no inference equivalent: export the deploy "
                           "net (DetectionOutput instead)")
REFUSED["DetectionEvaluate"] = ("DetectionEvaluate scores detections against ground truth (test-time mAP): it "
                                "has no inference equivalent; export the deploy net")


# ------------------------------------------------------------------------------ lowerings
@lowers("Permute")
def _lower_permute(v):
    lay = v.layer
    return Lowered({"order": list(lay.order)}) if lay.need_permute else ALIAS


@lowers("Normalize")
def _lower_normalize(v):
    lay = v.layer
    c = v.bottom_shapes[0][1]
    scale = v.blob(0).reshape(-1)
    shape = [1] * len(v.bottom_shapes[0])
    shape[1] = 1 if lay.channel_shared else c
    return Lowered({"across_spatial": lay.across_spatial, "eps": float(lay.eps)},
                   {"scale": Param(scale.reshape(shape))})


@lowers("PriorBox")
def _lower_prior_box(v):
    lay = v.layer
    feat, img = v.bottom_shapes

    def hw(shape):
        return (shape[2] if len(shape) > 2 else 1), (shape[3] if len(shape) > 3 else 1)

    values = lay.priors(*hw(feat), *hw(img))
    return Lowered({}, {"priors": Param(values.astype(np.float32), learnable=False)})


@lowers("DetectionOutput")
def _lower_detection_output(v):
    lay = v.layer
    if lay.need_save:
        raise v.error("save_output_param writes result files; export a deploy net without it")
    opts = lay.options()
    per_image = int(np.prod(v.bottom_shapes[0][1:]))
    opts["num_priors"] = per_image // ((1 if lay.share_location else lay.num_classes) * 4)
    opts["batch"] = v.bottom_shapes[0][0]
    opts["dynamic_axis"] = 2  # the number of rows depends on the data
    return Lowered(opts)


# ------------------------------------------------------------------------------ ONNX
@onnx_emits("Permute")
def _onnx_permute(b, n):
    b.op(n, "Transpose", [_x(n)], _y(n), perm=n.attrs["order"])


@onnx_emits("Normalize")
def _onnx_normalize(b, n):
    a, shape = n.attrs, n.input_shapes[0]
    x = _x(n)
    sq = b.op(n, "Mul", [x, x])
    axes = list(range(1, len(shape))) if a["across_spatial"] else [1]
    total = b.op(n, "ReduceSum", [sq, b.ints(axes, f"{n.layer}_axes")], keepdims=1)
    norm = b.op(n, "Sqrt", [b.op(n, "Add", [total, b.scalar(a["eps"], f"{n.layer}_eps")])])
    b.op(n, "Mul", [b.op(n, "Div", [x, norm]), b.param(n, "scale")], _y(n))


@onnx_emits("PriorBox")
def _onnx_prior_box(b, n):
    b.op(n, "Identity", [b.param(n, "priors")], _y(n))


def _last(b, n, x, i):
    """x[..., i:i+1]"""
    return b.op(n, "Slice", [x, b.ints([i], f"{n.layer}_s{i}"), b.ints([i + 1], f"{n.layer}_e{i}"),
                             b.ints([-1], f"{n.layer}_lastaxis")])


def _onnx_decode(b, n, loc, pb, pv):
    """Decoded boxes from loc [..., P, 4] and priors pb, pv [P, 4] (layers/detection.decode_boxes)."""
    a = n.attrs
    d = loc if a["variance_encoded_in_target"] else b.op(n, "Mul", [loc, pv])
    if a["code_type"] == 1:  # CORNER
        return b.op(n, "Add", [pb, d])
    x0, y0, x1, y1 = (_last(b, n, pb, i) for i in range(4))
    pw, ph = b.op(n, "Sub", [x1, x0]), b.op(n, "Sub", [y1, y0])
    if a["code_type"] == 3:  # CORNER_SIZE
        return b.op(n, "Add", [pb, b.op(n, "Mul", [d, b.op(n, "Concat", [pw, ph, pw, ph], axis=-1)])])
    two = b.scalar(2.0, f"{n.layer}_two")
    if a["normalized"]:
        pcx = b.op(n, "Div", [b.op(n, "Add", [x0, x1]), two])
        pcy = b.op(n, "Div", [b.op(n, "Add", [y0, y1]), two])
    else:
        one, half = b.scalar(1.0, f"{n.layer}_one"), b.scalar(0.5, f"{n.layer}_half")
        pw, ph = b.op(n, "Add", [pw, one]), b.op(n, "Add", [ph, one])
        pcx = b.op(n, "Add", [x0, b.op(n, "Mul", [pw, half])])
        pcy = b.op(n, "Add", [y0, b.op(n, "Mul", [ph, half])])
    d0, d1, d2, d3 = (_last(b, n, d, i) for i in range(4))
    cx = b.op(n, "Add", [b.op(n, "Mul", [d0, pw]), pcx])
    cy = b.op(n, "Add", [b.op(n, "Mul", [d1, ph]), pcy])
    hw = b.op(n, "Div", [b.op(n, "Mul", [b.op(n, "Exp", [d2]), pw]), two])
    hh = b.op(n, "Div", [b.op(n, "Mul", [b.op(n, "Exp", [d3]), ph]), two])
    return b.op(n, "Concat", [b.op(n, "Sub", [cx, hw]), b.op(n, "Sub", [cy, hh]),
                              b.op(n, "Add", [cx, hw]), b.op(n, "Add", [cy, hh])], axis=-1)


def _nms_boxes(b, n, boxes):
    """The boxes as ONNX NonMaxSuppression should see them to measure SSD's IoU: a box with
    xmax < xmin (or ymax < ymin) has area 0 in SSD (ONNX would swap the corners): its max corner is
    moved onto its min corner; OpenCV's pixel boxes (``+ 1`` in widths) get xmax + 1, ymax + 1."""
    lo = b.op(n, "Slice", [boxes, b.ints([0], f"{n.layer}_lo0"), b.ints([2], f"{n.layer}_lo1"),
                           b.ints([-1], f"{n.layer}_lo2")])
    hi = b.op(n, "Slice", [boxes, b.ints([2], f"{n.layer}_hi0"), b.ints([4], f"{n.layer}_hi1"),
                           b.ints([-1], f"{n.layer}_hi2")])
    grown = hi if n.attrs["normalized"] else b.op(n, "Add", [hi, b.scalar(1.0, f"{n.layer}_pixel")])
    hi = b.op(n, "Where", [b.op(n, "Less", [hi, lo]), lo, grown])
    return b.op(n, "Concat", [lo, hi], axis=-1)


@onnx_emits("DetectionOutput")
def _onnx_detection_output(b, n):
    a = n.attrs
    if a["eta"] < 1:
        raise ValueError(f"DetectionOutput layer {n.layer!r}: nms_param.eta {a['eta']} < 1 (adaptive NMS) has no "
                         "ONNX equivalent (NonMaxSuppression has a fixed IoU threshold); export to torch instead")
    loc, conf, prior = n.inputs[:3]
    num, p, nc = a["batch"], a["num_priors"], a["num_classes"]
    nl = 1 if a["share_location"] else nc
    labels = a["labels"]
    c = len(labels)
    r = num * c
    k = p if a["top_k"] < 0 else min(a["top_k"], p)
    i64 = b.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64))
    f32 = b.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32))
    # decode: [N, L, P, 4]
    flat = _reshape_to(b, n, prior, [-1])

    def part(k):  # the k-th channel of the priors, [P, 4] (k = 1: the variances)
        return _reshape_to(b, n, b.op(n, "Slice", [flat, b.ints([k * p * 4], f"{n.layer}_p{k}s"),
                                                   b.ints([(k + 1) * p * 4], f"{n.layer}_p{k}e"),
                                                   b.ints([0], f"{n.layer}_p{k}a")]), [p, 4])

    pb = part(0)
    pv = None if a["variance_encoded_in_target"] else part(1)  # OpenCV's priors may have one channel
    l4 = b.op(n, "Transpose", [_reshape_to(b, n, loc, [num, p, nl, 4])], perm=[0, 2, 1, 3])
    boxes = _onnx_decode(b, n, l4, pb, pv)
    if a["clip"]:
        boxes = b.op(n, "Clip", [boxes, b.scalar(0.0, f"{n.layer}_lo"), b.scalar(1.0, f"{n.layer}_hi")])
    lab = b.ints(labels, f"{n.layer}_labels")
    if a["share_location"]:
        boxes = b.op(n, "Expand", [boxes, b.ints([num, c, p, 4], f"{n.layer}_bshape")])
    else:
        boxes = b.op(n, "Gather", [boxes, lab], axis=1)
    boxes = _reshape_to(b, n, boxes, [r, p, 4])
    scores = b.op(n, "Gather", [_reshape_to(b, n, conf, [num, p, nc]), lab], axis=2)
    scores = _reshape_to(b, n, b.op(n, "Transpose", [scores], perm=[0, 2, 1]), [r, p])
    # the fork's candidates: the top_k best scores of each (image, class), best first
    vals, idx = b.op(n, "TopK", [scores, b.ints([k], f"{n.layer}_topk")], n_out=2, axis=1, largest=1, sorted=1)
    cand = b.op(n, "GatherND", [boxes, b.op(n, "Unsqueeze", [idx, b.ints([2], f"{n.layer}_ax2")])], batch_dims=1)
    sel = b.op(n, "NonMaxSuppression", [_nms_boxes(b, n, cand), _reshape_to(b, n, vals, [r, 1, k]), b.ints([k], f"{n.layer}_maxout"),
                                        b.scalar(a["nms_threshold"], f"{n.layer}_iou"),
                                        b.scalar(max(a["confidence_threshold"], -FLT_MAX), f"{n.layer}_thr")])
    rk = b.op(n, "Gather", [sel, b.ints([0, 2], f"{n.layer}_cols")], axis=1)          # [M, 2] (row, k)
    hit = b.op(n, "ScatterND", [b.const(np.zeros((r, k)), f"{n.layer}_zeros"), rk,
                                b.op(n, "Expand", [b.scalar(1.0, f"{n.layer}_one1"),
                                                   b.op(n, "Slice", [b.op(n, "Shape", [rk]),
                                                                     b.ints([0], f"{n.layer}_z0"),
                                                                     b.ints([1], f"{n.layer}_z1")])])])
    neg = b.scalar(-np.inf, f"{n.layer}_neginf")
    dense = b.op(n, "Where", [b.op(n, "Greater", [hit, b.scalar(0.0, f"{n.layer}_zero")]), vals, neg])
    per_img = _reshape_to(b, n, dense, [num, c * k])
    keep = b.op(n, "Greater", [per_img, neg])
    if -1 < a["keep_top_k"] < c * k:
        # the keep_top_k best of each image (ties: the lower class and rank first, as the layer)
        _, best = b.op(n, "TopK", [per_img, b.ints([a["keep_top_k"]], f"{n.layer}_keeptopk")], n_out=2,
                       axis=1, largest=1, sorted=1)
        chosen = b.op(n, "ScatterElements", [b.const(np.zeros((num, c * k)), f"{n.layer}_zeros2"), best,
                                             b.const(np.ones((num, a["keep_top_k"])), f"{n.layer}_ones2")], axis=1)
        keep = b.op(n, "And", [keep, b.op(n, "Greater", [chosen, b.scalar(0.0, f"{n.layer}_zero2")])])
    where = b.op(n, "Transpose", [b.op(n, "NonZero", [_reshape_to(b, n, keep, [num, c, k])])], perm=[1, 0])
    score = b.op(n, "GatherND", [_reshape_to(b, n, dense, [num, c, k]), where])
    box = b.op(n, "GatherND", [_reshape_to(b, n, cand, [num, c, k, 4]), where])
    img = b.op(n, "Gather", [where, b.ints([0], f"{n.layer}_c0")], axis=1)
    cls = b.op(n, "Gather", [lab, b.op(n, "Gather", [where, b.ints(1, f"{n.layer}_c1")], axis=1)])
    one = b.ints([1], f"{n.layer}_ax1")
    rows = b.op(n, "Concat", [b.op(n, "Cast", [img], to=f32), b.op(n, "Cast", [b.op(n, "Unsqueeze", [cls, one])], to=f32),
                              b.op(n, "Unsqueeze", [score, one]), box], axis=1)
    # the fork's empty output: one row [i, -1, ..., -1] per image when nothing at all is detected
    empty = np.full((num, 7), -1.0, np.float32)
    empty[:, 0] = np.arange(num)
    both = b.op(n, "Concat", [rows, b.const(empty, f"{n.layer}_empty")], axis=0)
    m = b.op(n, "Slice", [b.op(n, "Shape", [rows]), b.ints([0], f"{n.layer}_m0"), b.ints([1], f"{n.layer}_m1")])
    none = b.op(n, "Cast", [b.op(n, "Equal", [m, b.ints([0], f"{n.layer}_m2")])], to=i64)
    end = b.op(n, "Add", [m, b.op(n, "Mul", [none, b.ints([num], f"{n.layer}_num")])])
    out = b.op(n, "Slice", [both, b.ints([0], f"{n.layer}_o0"), end, b.ints([0], f"{n.layer}_o1")])
    _reshape_to(b, n, out, [1, 1, -1, 7], _y(n))


# ------------------------------------------------------------------------------ torch
_DETECTION_HELPER = "_ssd_detection_output"
torch_export._HELPERS[_DETECTION_HELPER] = "\n" + "\n\n".join(
    inspect.getsource(f) for f in (boxes.box_areas, boxes.iou_matrix, boxes.batched_nms, det.decode_boxes,
                                   det.ssd_detections, det.ssd_empty_convention)) + f'''

def {_DETECTION_HELPER}(loc, conf, prior, **options):
    """SSD's DetectionOutput (recaffe.layers.detection): [1, 1, D, 7] rows in the fork's order."""
    rows = ssd_detections(loc.reshape(loc.shape[0], -1), conf.reshape(conf.shape[0], -1), prior, **options)
    return ssd_empty_convention(rows, loc.shape[0])
'''


@torch_emits("Permute")
def _torch_permute(s, n, xs):
    return f"{xs[0]}.permute{_tup(n.attrs['order'])}.contiguous()"


@torch_emits("Normalize")
def _torch_normalize(s, n, xs):
    a, x = n.attrs, xs[0]
    dims = _tup(range(1, len(n.input_shapes[0]))) if a["across_spatial"] else "1"
    return (f"{x} / torch.sqrt(({x} * {x}).sum(dim={dims}, keepdim=True) + {_num(a['eps'])}) "
            f"* {s.param(n, 'scale')}")


@torch_emits("PriorBox")
def _torch_prior_box(s, n, xs):
    return s.param(n, "priors")


@torch_emits("DetectionOutput")
def _torch_detection_output(s, n, xs):
    keys = ("num_classes", "share_location", "labels", "code_type", "variance_encoded_in_target", "normalized",
            "clip", "nms_threshold", "confidence_threshold", "top_k", "eta", "keep_top_k")
    args = ", ".join(f"{key}={n.attrs[key]!r}" for key in keys)
    return f"{s.helper(_DETECTION_HELPER)}({xs[0]}, {xs[1]}, {xs[2]}, {args})"
