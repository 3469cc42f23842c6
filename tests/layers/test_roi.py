"""ROIPooling, PSROIPooling and Proposal against numpy loops written from the forks' kernels
(caffe-fast-rcnn's roi_pooling_layer.cu, caffe-rfcn's psroi_pooling_layer.cu, py-faster-rcnn's
proposal_layer.py / generate_anchors.py / bbox_transform.py / nms), gradient checks, errors."""
import math

import numpy as np
import pytest
import torch

from recaffe.gradient_check import check_gradient, forward_layer, make_layer
from recaffe.layer import LayerError
from recaffe.layers.roi import generate_anchors

FLT_MAX = float(np.finfo(np.float32).max)


def c_round(v):
    return math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)


# ------------------------------------------------------------------------------ ROIPooling
def np_roi_pool(x, rois, ph_, pw_, scale, dy=None):
    """The fork's forward loop (and its GPU backward, per bottom element) in float64."""
    _, c, h, w = x.shape
    out = np.zeros((len(rois), c, ph_, pw_))
    arg = -np.ones((len(rois), c, ph_, pw_), dtype=int)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        sw, sh, ew, eh = (c_round(v * scale) for v in roi[1:])
        rh, rw = max(eh - sh + 1, 1), max(ew - sw + 1, 1)
        bh, bw = rh / ph_, rw / pw_
        for ph in range(ph_):
            for pw in range(pw_):
                hs = min(max(math.floor(ph * bh) + sh, 0), h)
                he = min(max(math.ceil((ph + 1) * bh) + sh, 0), h)
                ws = min(max(math.floor(pw * bw) + sw, 0), w)
                we = min(max(math.ceil((pw + 1) * bw) + sw, 0), w)
                for ch in range(c):
                    if he <= hs or we <= ws:
                        continue
                    best, idx = -FLT_MAX, -1
                    for hh in range(hs, he):
                        for ww in range(ws, we):
                            if x[b, ch, hh, ww] > best:
                                best, idx = x[b, ch, hh, ww], hh * w + ww
                    out[r, ch, ph, pw], arg[r, ch, ph, pw] = best, idx
    if dy is None:
        return out
    dx = np.zeros_like(x)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        sw, sh, ew, eh = (c_round(v * scale) for v in roi[1:])
        for ch in range(c):
            for ph in range(ph_):
                for pw in range(pw_):
                    a = arg[r, ch, ph, pw]
                    if a >= 0 and sw <= a % w <= ew and sh <= a // w <= eh:
                        dx[b, ch, a // w, a % w] += dy[r, ch, ph, pw]
    return out, dx


def roi_text(ph=3, pw=2, scale=0.5):
    return f'type: "ROIPooling" roi_pooling_param {{ pooled_h: {ph} pooled_w: {pw} spatial_scale: {scale} }}'


ROIS = np.array([
    [0, 0, 0, 15, 11],      # the whole map (scale 0.5)
    [1, 3, 2.9, 9.2, 7.6],  # fractional corners
    [0, 5, 5, 5, 5],        # one pixel
    [1, 9, 7, 2, 3],        # malformed: end < start (forced 1x1; no gradient)
    [0, -6, -4, 4, 3],      # partly outside (clipped)
    [1, 3, 1, 21, 19],      # partly beyond the bottom/right
    [0, 1, 1, 2.9, 1],      # round-half cases: 2.9*0.5 = 1.45, 1*0.5 = 0.5 -> 1
])


def test_roi_pooling_forward_and_backward_match_the_fork():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 8))
    layer, bottom, top = make_layer(roi_text(), [x, ROIS])
    layer.run_forward(bottom, top)
    dy = rng.standard_normal(top[0].shape)
    ref, ref_dx = np_roi_pool(x, ROIS, 3, 2, 0.5, dy)
    np.testing.assert_allclose(top[0].data, ref, rtol=0, atol=0)
    top[0].diff_t = torch.tensor(dy)
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, ref_dx, rtol=1e-12, atol=1e-12)


def test_roi_pooling_ties_empty_bins_and_block_sizes():
    x = np.round(np.random.default_rng(1).standard_normal((2, 2, 11, 13)))  # many ties
    # bins of 1 to 11 pixels a side: every power-of-two block level, overlapping blocks
    rois = np.array([[0, 0, 0, 4, 4], [0, 20, 20, 24, 24], [1, 2, 1, 4, 3], [1, 0, 0, 12, 10],
                     [0, 1, 2, 11, 9], [1, 3, 0, 10, 10], [0, -3, -2, 30, 30]], dtype=float)
    layer, bottom, top = make_layer(roi_text(2, 3, 1.0), [x, rois])
    layer.run_forward(bottom, top)
    dy = np.random.default_rng(2).standard_normal(top[0].shape)
    ref, ref_dx = np_roi_pool(x, rois, 2, 3, 1.0, dy)
    np.testing.assert_array_equal(top[0].data, ref)
    assert (top[0].data[1] == 0).all()  # outside the map: every bin empty -> 0
    top[0].diff_t = torch.tensor(dy)
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, ref_dx, rtol=1e-12)


def test_roi_pooling_float32_and_no_rois():
    x = np.random.default_rng(3).standard_normal((1, 4, 7, 7)).astype(np.float32)
    rois = np.array([[0, 1.5, 2.5, 10.5, 12.5]], dtype=np.float32)
    (y,) = forward_layer(roi_text(2, 2, 0.5), [x, rois], dtype=torch.float32)
    np.testing.assert_array_equal(y, np_roi_pool(x.astype(np.float64), rois, 2, 2, 0.5))
    (y,) = forward_layer(roi_text(2, 2, 0.5), [x, np.zeros((0, 5))])
    assert y.shape == (0, 4, 2, 2)


def test_roi_pooling_gradient():
    x = np.random.default_rng(4).permutation(2 * 1 * 4 * 5).reshape(2, 1, 4, 5) / 10.0  # no ties
    check_gradient(roi_text(2, 3, 1.0), [x, ROIS[[0, 1, 4]] * [1, 0.4, 0.4, 0.4, 0.4]],
                   check_bottoms=[0])


@pytest.mark.parametrize("text,bottoms,match", [
    ('type: "ROIPooling" roi_pooling_param { pooled_h: 0 pooled_w: 2 }', None, "pooled_h and pooled_w must be > 0"),
    (roi_text(), [np.zeros((1, 2, 4, 4)), np.zeros((3, 4))], r"'L'.*\(R, 5\).*\(3, 4\).*\(1, 2, 4, 4\)"),
    (roi_text(), [np.zeros((2, 4, 4)), np.zeros((3, 5))], r"'L'.*4-D.*\(2, 4, 4\)"),
    (roi_text(), [np.zeros((1, 2, 4, 4)), np.array([[1, 0, 0, 1, 1]])], r"'L'.*batch index out of range"),
])
def test_roi_pooling_errors(text, bottoms, match):
    bottoms = bottoms or [np.zeros((1, 2, 4, 4)), np.zeros((1, 5))]
    with pytest.raises(LayerError, match=match):
        forward_layer(text, bottoms)


# ------------------------------------------------------------------------------ PSROIPooling
def np_psroi_pool(x, rois, dim, g, scale, dy=None):
    _, _, h, w = x.shape
    out = np.zeros((len(rois), dim, g, g))
    dx = np.zeros_like(x)
    for r, roi in enumerate(rois):
        b = int(roi[0])
        sw, sh = c_round(roi[1]) * scale, c_round(roi[2]) * scale
        ew, eh = (c_round(roi[3]) + 1) * scale, (c_round(roi[4]) + 1) * scale
        bh, bw = max(eh - sh, 0.1) / g, max(ew - sw, 0.1) / g
        for k in range(dim):
            for ph in range(g):
                for pw in range(g):
                    hs = min(max(math.floor(ph * bh + sh), 0), h)
                    he = min(max(math.ceil((ph + 1) * bh + sh), 0), h)
                    ws = min(max(math.floor(pw * bw + sw), 0), w)
                    we = min(max(math.ceil((pw + 1) * bw + sw), 0), w)
                    if he <= hs or we <= ws:
                        continue
                    ch = (k * g + ph) * g + pw
                    area = (he - hs) * (we - ws)
                    out[r, k, ph, pw] = x[b, ch, hs:he, ws:we].sum() / area
                    if dy is not None:
                        dx[b, ch, hs:he, ws:we] += dy[r, k, ph, pw] / area
    return out if dy is None else (out, dx)


def psroi_text(dim=2, g=3, scale=0.25):
    return (f'type: "PSROIPooling" psroi_pooling_param {{ spatial_scale: {scale} output_dim: {dim} '
            f'group_size: {g} }}')


PS_ROIS = np.array([
    [0, 0, 0, 31, 23], [1, 4.5, 6.2, 20.7, 17.5], [0, 10, 10, 10, 10], [1, 20, 12, 3, 2],
    [0, -9, -5, 7, 9], [1, 13, 7, 60, 50],
])


def test_psroi_pooling_forward_and_backward_match_the_fork():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 18, 6, 8))
    layer, bottom, top = make_layer(psroi_text(), [x, PS_ROIS])
    layer.run_forward(bottom, top)
    dy = rng.standard_normal(top[0].shape)
    ref, ref_dx = np_psroi_pool(x, PS_ROIS, 2, 3, 0.25, dy)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-12, atol=1e-12)
    top[0].diff_t = torch.tensor(dy)
    layer.backward(top, [True, False], bottom)
    np.testing.assert_allclose(bottom[0].diff, ref_dx, rtol=1e-12, atol=1e-12)


def test_psroi_pooling_gradient():
    x = np.random.default_rng(6).standard_normal((2, 8, 4, 5))
    check_gradient(psroi_text(2, 2, 0.25), [x, PS_ROIS[:4]], check_bottoms=[0])


@pytest.mark.parametrize("text,shape,match", [
    ('type: "PSROIPooling" psroi_pooling_param { spatial_scale: 1 output_dim: 0 group_size: 2 }',
     (1, 8, 4, 4), "output_dim must be > 0"),
    ('type: "PSROIPooling" psroi_pooling_param { spatial_scale: 1 output_dim: 2 }',
     (1, 8, 4, 4), "group_size must be > 0"),
    (psroi_text(2, 3), (1, 8, 4, 4), r"'L'.*\(1, 8, 4, 4\).*8 channels.*2 \* 3\^2 = 18"),
])
def test_psroi_pooling_errors(text, shape, match):
    with pytest.raises(LayerError, match=match):
        forward_layer(text, [np.zeros(shape), np.zeros((1, 5))])


# ------------------------------------------------------------------------------ Proposal
def np_anchors(base_size=16, ratios=(0.5, 1, 2), scales=(8, 16, 32)):
    """generate_anchors.py's construction, written out independently."""
    out = []
    w = h = float(base_size)
    cx, cy = 0.5 * (w - 1), 0.5 * (h - 1)
    for r in ratios:
        ws = np.round(np.sqrt(w * h / r))
        hs = np.round(ws * r)
        for s in scales:
            aw, ah = ws * s, hs * s
            out.append([cx - 0.5 * (aw - 1), cy - 0.5 * (ah - 1), cx + 0.5 * (aw - 1), cy + 0.5 * (ah - 1)])
    return np.array(out)


def test_generate_anchors_matches_py_faster_rcnn_table():
    # what generate_anchors() returns (the table in that file's comment differs by one pixel from
    # what its code computes)
    expected = np.array([[-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
                         [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
                         [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]], float)
    np.testing.assert_array_equal(generate_anchors(16, [0.5, 1, 2], [8, 16, 32]), expected)
    np.testing.assert_array_equal(generate_anchors(8, [0.7, 1.3], [2, 5]), np_anchors(8, (0.7, 1.3), (2, 5)))


def np_nms(dets, thresh):
    """py-faster-rcnn's cpu_nms."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0, xx2 - xx1 + 1) * np.maximum(0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][ovr <= thresh]
    return np.array(keep, dtype=int)


def np_proposal(prob, pred, info, stride, anchors, min_size, pre, post, thresh):
    """proposal_layer.py's TEST forward (float32 as it runs on Caffe blobs)."""
    a = anchors.shape[0]
    h, w = prob.shape[2:]
    sx, sy = np.meshgrid(np.arange(w) * stride, np.arange(h) * stride)
    shifts = np.vstack((sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel())).T
    all_anchors = (anchors.reshape(1, a, 4) + shifts.reshape(-1, 1, 4)).reshape(-1, 4).astype(np.float32)
    deltas = pred.transpose(0, 2, 3, 1).reshape(-1, 4)
    scores = prob[:, a:].transpose(0, 2, 3, 1).reshape(-1)
    bw = all_anchors[:, 2] - all_anchors[:, 0] + np.float32(1)
    bh = all_anchors[:, 3] - all_anchors[:, 1] + np.float32(1)
    cx = all_anchors[:, 0] + np.float32(0.5) * bw
    cy = all_anchors[:, 1] + np.float32(0.5) * bh
    pcx, pcy = deltas[:, 0] * bw + cx, deltas[:, 1] * bh + cy
    pw, ph = np.exp(deltas[:, 2]) * bw, np.exp(deltas[:, 3]) * bh
    boxes = np.stack([pcx - np.float32(0.5) * pw, pcy - np.float32(0.5) * ph,
                      pcx + np.float32(0.5) * pw, pcy + np.float32(0.5) * ph], 1)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, info[1] - 1)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, info[0] - 1)
    ms = min_size * info[2]
    keep = np.where((boxes[:, 2] - boxes[:, 0] + 1 >= ms) & (boxes[:, 3] - boxes[:, 1] + 1 >= ms))[0]
    boxes, scores = boxes[keep], scores[keep]
    order = scores.argsort(kind="stable")[::-1][:pre]
    boxes, scores = boxes[order], scores[order]
    keep = np_nms(np.hstack((boxes, scores[:, None])), thresh)[:post]
    return np.hstack((np.zeros((len(keep), 1), np.float32), boxes[keep])), scores[keep, None]


def proposal_text(extra=""):
    return f'type: "Proposal" proposal_param {{ {extra} }}'


@pytest.mark.parametrize("extra,anchors,im_info,pre,post,thresh", [
    ("feat_stride: 16 ratio: 0.5 ratio: 1 ratio: 2 scale: 8 scale: 16 scale: 32",
     np_anchors(), (200, 230, 1.0), 6000, 300, 0.7),
    ("", np_anchors(), (150, 260, 0.6), 6000, 300, 0.7),  # py-faster-rcnn's default ratios/scales
    (("feat_stride: 8 base_size: 8 min_size: 4 ratio: 1 ratio: 2 scale: 4 scale: 8 pre_nms_topn: 50 "
      "post_nms_topn: 10 nms_thresh: 0.5"), np_anchors(8, (1, 2), (4, 8)), (90, 100, 1.5), 50, 10, 0.5),
])
def test_proposal_matches_py_faster_rcnn(extra, anchors, im_info, pre, post, thresh):
    a = anchors.shape[0]
    rng = np.random.default_rng(7)
    h, w = 9, 11
    logits = rng.standard_normal((1, 2, a, h, w))
    prob = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).reshape(1, 2 * a, h, w).astype(np.float32)
    pred = (rng.standard_normal((1, 4 * a, h, w)) * 0.3).astype(np.float32)
    info = np.array([im_info], dtype=np.float32)
    rois, scores = forward_layer(proposal_text(extra), [prob, pred, info], num_tops=2, dtype=torch.float32)
    stride = 8 if "feat_stride: 8" in extra else 16
    min_size = 4 if "min_size: 4" in extra else 16
    ref_rois, ref_scores = np_proposal(prob, pred, info[0], stride, anchors, min_size, pre, post, thresh)
    assert rois.shape == ref_rois.shape and 0 < rois.shape[0] <= post
    np.testing.assert_allclose(rois, ref_rois, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(scores, ref_scores)


def test_proposal_one_top_and_no_backward():
    prob = np.full((1, 18, 2, 2), 0.5, dtype=np.float32)
    prob[0, 9:] = np.linspace(0.1, 0.9, 36).reshape(9, 2, 2)
    pred = np.zeros((1, 36, 2, 2), dtype=np.float32)
    info = np.array([[64, 64, 1]], dtype=np.float32)
    layer, bottom, top = make_layer(proposal_text("min_size: 1"), [prob, pred, info], dtype=torch.float32)
    layer.run_forward(bottom, top)
    assert top[0].shape[1] == 5 and (top[0].data[:, 0] == 0).all()
    assert not layer.allow_force_backward(0)


@pytest.mark.parametrize("bottoms,match", [
    ([(1, 16, 3, 3), (1, 36, 3, 3), (1, 3)], r"'L'.*\(1, 2A, H, W\).*A = 9.*\(1, 16, 3, 3\)"),
    ([(2, 18, 3, 3), (2, 36, 3, 3), (2, 3)], r"single-image"),
    ([(1, 18, 3, 3), (1, 36, 3, 4), (1, 3)], r"rpn_bbox_pred.*\(1, 36, 3, 3\).*\(1, 18, 3, 3\).*\(1, 36, 3, 4\)"),
    ([(1, 18, 3, 3), (1, 36, 3, 3), (1, 2)], r"im_info.*\(1, 2\)"),
])
def test_proposal_shape_errors(bottoms, match):
    with pytest.raises(LayerError, match=match):
        forward_layer(proposal_text(), [np.zeros(s) for s in bottoms])


def test_proposal_param_errors():
    with pytest.raises(LayerError, match="ratio and scale values must be positive"):
        forward_layer(proposal_text("ratio: 0"), [np.zeros((1, 6, 2, 2)), np.zeros((1, 12, 2, 2)),
                                                  np.ones((1, 3))])


@pytest.mark.parametrize("text,rois_diff", [(roi_text(), 7), (psroi_text(1, 2, 1.0), 0)])
def test_no_gradient_to_the_rois(text, rois_diff):
    """As the forks (a training net may ask for it: its rois come from learned layers): ROIPooling
    leaves the rois' diff as it was, PSROIPooling zeroes it."""
    rois = np.array([[0, 0, 0, 3, 3]])
    layer, bottom, top = make_layer(text, [np.ones((1, 4, 4, 4)), rois])
    layer.run_forward(bottom, top)
    bottom[1].diff_t = torch.full((1, 5), 7.0, dtype=torch.float64)
    top[0].diff_t = torch.ones(top[0].shape, dtype=torch.float64)
    layer.backward(top, [True, True], bottom)
    assert np.all(bottom[1].diff == rois_diff)
    assert bottom[0].diff.sum() > 0
