"""SSD's layers (Normalize, Permute, PriorBox, DetectionOutput) and SmoothL1Loss (SSD's and Faster
R-CNN's forms): forward against numpy written from the forks' definitions, finite-difference
gradients, and the parameter/shape errors."""
import math

import numpy as np
import pytest

from recaffe.gradient_check import check_gradient, forward_layer, make_layer
from recaffe.layer import LayerError


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: torch's thread pool only adds latency (a lot on a loaded machine)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- Normalize
def np_normalize(x, scale, across_spatial, eps=1e-10):
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    if across_spatial:
        norm = np.sqrt((x3 ** 2).sum(axis=(1, 2), keepdims=True) + eps)
    else:
        norm = np.sqrt((x3 ** 2).sum(axis=1, keepdims=True) + eps)
    s = np.asarray(scale).reshape(1, -1, 1) if np.ndim(scale) else scale
    return (x3 / norm * s).reshape(x.shape), norm


@pytest.mark.parametrize("across", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_normalize_forward(across, shared):
    x = rng(1).standard_normal((2, 3, 4, 5))
    text = (f'type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} '
            f'channel_shared: {str(shared).lower()} scale_filler {{ type: "constant" value: 2.5 }} }}')
    layer, bottom, top = make_layer(text, [x])
    assert layer.blobs[0].shape == (() if shared else (3,))
    layer.run_forward(bottom, top)
    ref, _ = np_normalize(x, 2.5 if shared else np.full(3, 2.5), across)
    np.testing.assert_allclose(top[0].data, ref, rtol=1e-12)


@pytest.mark.parametrize("across", [True, False])
def test_normalize_gradient_exact_cases(across):
    x = rng(2).standard_normal((2, 3, 2, 3))
    # channel_shared: the fork's backward is the exact gradient (scale's too)
    check_gradient(f'type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} '
                   'scale_filler { type: "constant" value: 1.7 } }', [x])
    # per-channel scale with equal values: still exact
    check_gradient(f'type: "Normalize" norm_param {{ across_spatial: {str(across).lower()} channel_shared: false '
                   'scale_filler { type: "constant" value: 0.8 } }', [x])


def test_normalize_per_channel_backward_is_the_forks():
    """channel_shared false, differing scales: project top_diff, then multiply by the scale."""
    x = rng(3).standard_normal((2, 4, 3, 3))
    layer, bottom, top = make_layer('type: "Normalize" norm_param { across_spatial: false channel_shared: false '
                                    'scale_filler { type: "uniform" min: 0.5 max: 3 } }', [x])
    s = layer.blobs[0].data.copy()
    layer.run_forward(bottom, top)
    g = rng(4).standard_normal(x.shape)
    top[0].diff[...] = g
    layer.blobs[0].diff[...] = 0
    layer.backward(top, [True], bottom)
    y, norm = np_normalize(x, s, False)
    x3, g3 = x.reshape(2, 4, -1), g.reshape(2, 4, -1)
    a = (x3 * g3).sum(axis=1, keepdims=True)
    ref = ((g3 - x3 * a / norm ** 2) / norm * s.reshape(1, -1, 1)).reshape(x.shape)
    np.testing.assert_allclose(bottom[0].diff, ref, rtol=1e-10)
    ref_scale = (y * g).sum(axis=(0, 2, 3)) / s
    np.testing.assert_allclose(layer.blobs[0].diff, ref_scale, rtol=1e-10)


def test_normalize_errors():
    with pytest.raises(LayerError, match=r"Normalize layer 'L'.*2 to 4 axes.*\(6,\)"):
        make_layer('type: "Normalize"', [np.ones(6)])
    layer, bottom, top = make_layer('type: "Normalize" norm_param { channel_shared: false }', [np.ones((1, 3, 2, 2))])
    with pytest.raises(LayerError, match=r"\(1, 4, 2, 2\).*4 channels.*\(3,\)"):
        bottom[0].reshape((1, 4, 2, 2))
        layer.reshape(bottom, top)


# --------------------------------------------------------------------------- Permute
def test_permute_forward_completes_order_and_gradient():
    x = rng(5).standard_normal((2, 3, 4, 5))
    (y,) = forward_layer('type: "Permute" permute_param { order: 0 order: 2 }', [x])
    np.testing.assert_array_equal(y, x.transpose(0, 2, 1, 3))
    (y,) = forward_layer('type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }', [x])
    np.testing.assert_array_equal(y, x.transpose(0, 2, 3, 1))
    (y,) = forward_layer('type: "Permute" permute_param { order: 0 order: 1 }', [x])
    np.testing.assert_array_equal(y, x)
    check_gradient('type: "Permute" permute_param { order: 3 order: 0 order: 2 order: 1 }', [x[:, :2, :3, :2]])


def test_permute_errors():
    x = np.ones((1, 2, 3))
    with pytest.raises(LayerError, match="Permute layer 'L'.*order 3.*\\(1, 2, 3\\)"):
        make_layer('type: "Permute" permute_param { order: 3 }', [x])
    with pytest.raises(LayerError, match="duplicate"):
        make_layer('type: "Permute" permute_param { order: 1 order: 1 }', [x])


# --------------------------------------------------------------------------- PriorBox
def np_priors(fh, fw, ih, iw, mins, maxs=(), ars=(), flip=True, clip=False, var=(0.1,), step=0, offset=0.5,
              widths=None, heights=None, offsets=None):
    """The fork's loops, written out (float64; the layer matches to float32 precision)."""
    ratios = [1.0]
    for a in ars:
        if all(abs(a - r) >= 1e-6 for r in ratios):
            ratios.append(a)
            if flip:
                ratios.append(1 / a)
    if widths is None:
        sizes = []
        for s, m in enumerate(mins):
            m = int(m)
            sizes.append((m, m))
            if maxs:
                sizes.append((math.sqrt(m * int(maxs[s])),) * 2)
            sizes += [(m * math.sqrt(r), m / math.sqrt(r)) for r in ratios if abs(r - 1) >= 1e-6]
    else:
        sizes = list(zip(widths, heights))
    offsets = offsets or [(offset, offset)]
    sh, sw = (step, step) if step else (ih / fh, iw / fw)
    out = []
    for h in range(fh):
        for w in range(fw):
            for bw, bh in sizes:
                for oh, ow in offsets:
                    cx, cy = (w + ow) * sw, (h + oh) * sh
                    out += [(cx - bw / 2) / iw, (cy - bh / 2) / ih, (cx + bw / 2) / iw, (cy + bh / 2) / ih]
    out = np.array(out)
    if clip:
        out = np.clip(out, 0, 1)
    v = np.tile(np.array(var if len(var) == 4 else var * 4), len(out) // 4)
    return np.stack([out, v])[None]


def prior_layer(params, feat=(1, 2, 3, 4), img=(1, 3, 24, 32)):
    return forward_layer(f'type: "PriorBox" prior_box_param {{ {params} }}', [np.zeros(feat), np.zeros(img)])[0]


def test_priorbox_forward_ssd_params():
    got = prior_layer("min_size: 8 max_size: 16 aspect_ratio: 2 aspect_ratio: 3 aspect_ratio: 2 flip: true")
    ref = np_priors(3, 4, 24, 32, [8], [16], [2, 3])
    assert got.shape == (1, 2, 3 * 4 * 6 * 4)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    got = prior_layer("min_size: 10.7 min_size: 5 max_size: 12 max_size: 20 aspect_ratio: 2 flip: false clip: true "
                      "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 7 offset: 0.25 img_h: 40 img_w: 30")
    ref = np_priors(3, 4, 40, 30, [10.7, 5], [12, 20], [2], flip=False, clip=True, var=(0.1, 0.1, 0.2, 0.2),
                    step=7, offset=0.25)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_priorbox_opencv_explicit_sizes_and_offsets():
    got = prior_layer("width: 10 width: 20 height: 15 height: 5 offset_h: 0 offset_h: 0.5 offset_w: 0 offset_w: 0.5 "
                      "variance: 0.1")
    ref = np_priors(3, 4, 24, 32, [], widths=[10, 20], heights=[15, 5], offsets=[(0, 0), (0.5, 0.5)])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("params, message", [
    ("aspect_ratio: 2", "must provide min_size"),
    ("min_size: 8 max_size: 8", r"max_size \(8.0\) must be greater than min_size \(8.0\)"),
    ("min_size: 8 variance: 0.1 variance: 0.2", "variance must have 1 or 4 values, got 2"),
    ("min_size: 8 step: 4 step_h: 4 step_w: 4", "either step or step_h/step_w"),
    ("min_size: 8 img_size: 4 img_h: 4 img_w: 4", "either img_size or img_h/img_w"),
    ("min_size: 8 width: 3 height: 3", "exclude min_size"),
    ("width: 3 width: 4 height: 3", "same number of values"),
])
def test_priorbox_errors(params, message):
    with pytest.raises(LayerError, match="PriorBox layer 'L': .*" + message):
        prior_layer(params)


# --------------------------------------------------------------------------- DetectionOutput
def np_iou(a, b, normalized=True):
    o = 0.0 if normalized else 1.0
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0]) + o
    ih = min(a[3], b[3]) - max(a[1], b[1]) + o
    if iw <= 0 or ih <= 0:
        return 0.0

    def area(x):
        return 0.0 if x[2] < x[0] or x[3] < x[1] else (x[2] - x[0] + o) * (x[3] - x[1] + o)
    return iw * ih / (area(a) + area(b) - iw * ih)


def np_decode(loc, prior, var, code, normalized=True):
    out = np.empty_like(loc)
    for i, (l, p, v) in enumerate(zip(loc, prior, var)):
        if code == "CORNER":
            out[i] = p + v * l
        elif code == "CORNER_SIZE":
            pw, ph = p[2] - p[0], p[3] - p[1]
            out[i] = p + v * l * np.array([pw, ph, pw, ph])
        else:
            pw, ph = p[2] - p[0], p[3] - p[1]
            if normalized:
                pcx, pcy = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
            else:
                pw, ph = pw + 1, ph + 1
                pcx, pcy = p[0] + pw / 2, p[1] + ph / 2
            cx, cy = v[0] * l[0] * pw + pcx, v[1] * l[1] * ph + pcy
            w, h = math.exp(v[2] * l[2]) * pw, math.exp(v[3] * l[3]) * ph
            out[i] = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    return out


def np_nms_fast(boxes, scores, thr, nms, eta, top_k, normalized=True):
    cand = sorted([(s, i) for i, s in enumerate(scores) if s > thr], key=lambda t: -t[0])  # stable
    if top_k > -1:
        cand = cand[:top_k]
    kept, t = [], nms
    for s, i in cand:
        keep = all(np_iou(boxes[i], boxes[k], normalized) <= t for k in kept)
        if keep:
            kept.append(i)
            if eta < 1 and t > 0.5:
                t *= eta
    return kept


def np_detection_output(loc, conf, prior, num_classes, share, bg, code, nms, top_k, eta, keep_top_k, thr,
                        normalized=True, clip=False):
    n, p = loc.shape[0], prior.shape[-1] // 4
    nl = 1 if share else num_classes
    loc = loc.reshape(n, p, nl, 4)
    conf = conf.reshape(n, p, num_classes)
    pb, pv = prior.reshape(2, p, 4)
    rows = []
    for i in range(n):
        dec = {c: np_decode(loc[i, :, c], pb, pv, code, normalized) for c in range(nl)}
        if clip:
            dec = {c: np.clip(b, 0, 1) for c, b in dec.items()}
        idx = {}
        for c in range(num_classes):
            if c == bg:
                continue
            idx[c] = np_nms_fast(dec[0 if share else c], conf[i, :, c], thr, nms, eta, top_k, normalized)
        total = sum(len(v) for v in idx.values())
        if keep_top_k > -1 and total > keep_top_k:
            pairs = sorted([(conf[i, j, c], c, j) for c, js in idx.items() for j in js], key=lambda t: -t[0])
            pairs = pairs[:keep_top_k]
            idx = {}
            for s, c, j in pairs:
                idx.setdefault(c, []).append(j)
        for c in sorted(idx):
            for j in idx[c]:
                rows.append([i, c, conf[i, j, c], *dec[0 if share else c][j]])
    if not rows:
        return np.array([[i, -1, -1, -1, -1, -1, -1] for i in range(n)], float).reshape(1, 1, -1, 7)
    return np.array(rows).reshape(1, 1, -1, 7)


def detection_inputs(n=2, p=30, num_classes=4, share=True, seed=0, spread=0.3):
    g = rng(seed)
    centers = g.uniform(0.2, 0.8, (p, 2))
    sizes = g.uniform(0.1, 0.4, (p, 2))
    prior = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
    var = np.tile([0.1, 0.1, 0.2, 0.2], (p, 1))
    prior_blob = np.stack([prior.reshape(-1), var.reshape(-1)])[None]
    nl = 1 if share else num_classes
    loc = g.normal(0, spread, (n, p * nl * 4))
    logits = g.normal(0, 2, (n, p, num_classes))
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return loc, conf.reshape(n, -1), prior_blob


@pytest.mark.parametrize("share, code, eta, top_k, keep_top_k, thr", [
    (True, "CENTER_SIZE", 1.0, 10, 12, 0.1),
    (False, "CENTER_SIZE", 0.7, -1, -1, 0.05),
    (True, "CORNER", 1.0, 8, -1, 0.2),
    (False, "CORNER_SIZE", 0.9, 15, 5, 0.0),
])
def test_detection_output_matches_the_forks_algorithm(share, code, eta, top_k, keep_top_k, thr):
    loc, conf, prior = detection_inputs(share=share, seed=hash((share, code)) % 100)
    text = (f'type: "DetectionOutput" detection_output_param {{ num_classes: 4 share_location: {str(share).lower()} '
            f'background_label_id: 0 code_type: {code} keep_top_k: {keep_top_k} confidence_threshold: {thr} '
            f'nms_param {{ nms_threshold: 0.45 top_k: {top_k} eta: {eta} }} }}')
    (got,) = forward_layer(text, [loc, conf, prior])
    ref = np_detection_output(loc, conf, prior, 4, share, 0, code, 0.45, top_k, eta, keep_top_k, thr)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_detection_output_background_other_than_0_and_opencv_pixel_boxes():
    loc, conf, prior = detection_inputs(seed=7)
    prior = prior.copy()
    prior[0, 0] *= 300  # pixel priors
    text = ('type: "DetectionOutput" detection_output_param { num_classes: 4 background_label_id: 2 '
            'code_type: CENTER_SIZE confidence_threshold: 0.1 normalized_bbox: false clip: true '
            'nms_param { nms_threshold: 0.3 } }')
    (got,) = forward_layer(text, [loc, conf, prior])
    ref = np_detection_output(loc, conf, prior, 4, True, 2, "CENTER_SIZE", 0.3, -1, 1.0, -1, 0.1,
                              normalized=False, clip=True)
    assert 2 not in got[0, 0, :, 1]
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_detection_output_empty_is_one_row_of_minus_one_per_image():
    loc, conf, prior = detection_inputs(n=3)
    (got,) = forward_layer('type: "DetectionOutput" detection_output_param { num_classes: 4 '
                           'confidence_threshold: 0.999 }', [loc, conf, prior])
    ref = np.full((1, 1, 3, 7), -1.0)
    ref[0, 0, :, 0] = [0, 1, 2]
    np.testing.assert_array_equal(got, ref)


def test_detection_output_errors():
    loc, conf, prior = detection_inputs()
    with pytest.raises(LayerError, match="DetectionOutput layer 'L': must specify .*num_classes"):
        make_layer('type: "DetectionOutput"', [loc, conf, prior])
    with pytest.raises(LayerError, match=r"location predictions: priors \(1, 2, 120\) .*loc \(2, 116\)"):
        make_layer('type: "DetectionOutput" detection_output_param { num_classes: 4 }', [loc[:, :116], conf, prior])
    with pytest.raises(LayerError, match=r"confidence predictions: .*conf \(2, 80\) \(3 classes\)"):
        make_layer('type: "DetectionOutput" detection_output_param { num_classes: 3 }', [loc, conf[:, :80], prior])
    with pytest.raises(LayerError, match="eta must be in"):
        make_layer('type: "DetectionOutput" detection_output_param { num_classes: 4 nms_param { eta: 0 } }',
                   [loc, conf, prior])
    with pytest.raises(LayerError, match="failed to read label map file '/nonexistent'"):
        make_layer('type: "DetectionOutput" detection_output_param { num_classes: 4 save_output_param { '
                   'output_directory: "/tmp/recaffe_detout_test" label_map_file: "/nonexistent" } }',
                   [loc, conf, prior])


def test_detection_output_saves_voc_files(tmp_path):
    loc, conf, prior = detection_inputs(n=2)
    (tmp_path / "labels.prototxt").write_text("".join(
        f'item {{ name: "c{i}" label: {i} display_name: "C{i}" }}\n' for i in range(4)))
    (tmp_path / "sizes.txt").write_text("img_a 100 200\nimg_b 50 60\n")
    text = ('type: "DetectionOutput" detection_output_param { num_classes: 4 confidence_threshold: 0.3 '
            f'nms_param {{ nms_threshold: 0.45 }} save_output_param {{ output_directory: "{tmp_path}/out" '
            f'output_name_prefix: "det_" output_format: "VOC" label_map_file: "{tmp_path}/labels.prototxt" '
            f'name_size_file: "{tmp_path}/sizes.txt" }} }}')
    (got,) = forward_layer(text, [loc, conf, prior])
    rows = got[0, 0]
    lines = (tmp_path / "out" / "det_c1.txt").read_text().splitlines()
    mine = rows[rows[:, 1] == 1]
    assert len(lines) == len(mine) > 0
    first = lines[0].split()
    r = mine[0]
    h, w = (100, 200) if r[0] == 0 else (50, 60)
    box = np.clip(r[3:], 0, 1) * [w, h, w, h]
    assert first[0] == ("img_a" if r[0] == 0 else "img_b")
    assert float(first[1]) == pytest.approx(r[2], rel=1e-5)
    assert int(first[2]) == int(round(box[0] * 100) / 100)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["det_c1.txt", "det_c2.txt", "det_c3.txt"]


# --------------------------------------------------------------------------- SmoothL1Loss
def np_smooth_l1(b0, b1, sigma=1.0, w_in=None, w_out=None):
    d = b0 - b1
    if w_in is not None:
        d = d * w_in
    s2 = sigma * sigma
    e = np.where(np.abs(d) < 1 / s2, 0.5 * d * d * s2, np.abs(d) - 0.5 / s2)
    if w_out is not None:
        e = e * w_out
    return e.sum() / b0.shape[0]


def test_smooth_l1_ssd_form():
    g = rng(8)
    b0, b1 = g.normal(0, 1.5, (4, 6)), g.normal(0, 1.5, (4, 6))
    (loss,) = forward_layer('type: "SmoothL1Loss"', [b0, b1])
    assert loss.shape == ()
    assert loss == pytest.approx(np_smooth_l1(b0, b1), rel=1e-12)
    d = b0 - b1
    ok = np.abs(np.abs(d) - 1) > 0.05
    b1 = np.where(ok, b1, b1 + 0.2)  # keep clear of the kink at |d| = 1
    check_gradient('type: "SmoothL1Loss"', [b0, b1])


def test_smooth_l1_faster_rcnn_form():
    g = rng(9)
    shape = (3, 4, 2, 2)
    b0, b1 = g.normal(0, 1, shape), g.normal(0, 1, shape)
    w_in, w_out = g.uniform(0, 2, shape), g.uniform(0, 2, shape)
    text = 'type: "SmoothL1Loss" smooth_l1_loss_param { sigma: 3 }'
    (loss,) = forward_layer(text, [b0, b1, w_in, w_out])
    assert loss == pytest.approx(np_smooth_l1(b0, b1, 3.0, w_in, w_out), rel=1e-12)
    (loss,) = forward_layer(text, [b0, b1])
    assert loss == pytest.approx(np_smooth_l1(b0, b1, 3.0), rel=1e-12)
    d = (b0 - b1) * w_in
    b0 = np.where(np.abs(np.abs(d) - 1 / 9) > 0.02, b0, b0 + 0.1)
    check_gradient(text, [b0, b1, w_in, w_out], check_bottoms=[0, 1])


def test_smooth_l1_errors():
    x = np.ones((2, 3))
    with pytest.raises(LayerError, match="SmoothL1Loss layer 'L'.*got 3"):
        make_layer('type: "SmoothL1Loss"', [x, x, x])
    with pytest.raises(LayerError, match=r"bottom\[1\] shape \(2, 4\) does not match bottom\[0\] shape \(2, 3\)"):
        make_layer('type: "SmoothL1Loss"', [x, np.ones((2, 4))])


def test_detection_output_opencv_faster_rcnn_form():
    """Proposals as priors: one channel (no variances) with variance_encoded_in_target, pixel boxes,
    a location per class."""
    loc, conf, prior = detection_inputs(n=1, share=False, seed=5)
    boxes = prior[0, 0] * 200
    text = ('type: "DetectionOutput" detection_output_param { num_classes: 4 share_location: false '
            'code_type: CENTER_SIZE variance_encoded_in_target: true normalized_bbox: false keep_top_k: 15 '
            'nms_param { nms_threshold: 0.3 } }')
    (got,) = forward_layer(text, [loc, conf, boxes.reshape(1, 1, -1)])
    with_ones = np.stack([boxes, np.ones_like(boxes)])[None]
    ref = np_detection_output(loc, conf, with_ones, 4, False, 0, "CENTER_SIZE", 0.3, -1, 1.0, 15, -3.4e38,
                              normalized=False)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
