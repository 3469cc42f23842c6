"""The segmentation forks' layers: Interp (DeepLab v2 / PSPNet), Upsample (SegNet's unpooling by
mask and the YOLOv3 ports' nearest form), BN (SegNet's and PSPNet's), SegAccuracy (DeepLab v2).

Forward values are checked against numpy loops written from the forks' C++ definitions,
gradients by finite differences, bad parameters must raise a LayerError naming the layer."""
import numpy as np
import pytest
import torch

from recaffe.gradient_check import check_gradient, forward_layer, make_layer
from recaffe.layer import LayerError
from recaffe.layers.normalization import bn_flavour
from recaffe.proto import caffe_pb2
from recaffe.io.protofiles import parse_text


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def raises(text, bottoms, match, num_tops=1):
    with pytest.raises(LayerError, match=match) as info:
        make_layer(text, bottoms, num_tops)
    assert "'L'" in str(info.value)


def backward(layer, bottom, top, top_diffs, propagate=None):
    for t, d in zip(top, top_diffs):
        t.diff_t = torch.as_tensor(d, dtype=torch.float64).clone()
    for b in layer.blobs:
        b.diff_t.zero_()
    layer.backward(top, propagate or [True] * len(bottom), bottom)
    return [b.diff.copy() for b in bottom]


# ----------------------------------------------------------------------------- Interp
def np_interp(x, pad_beg, pad_end, oh, ow):
    """caffe_cpu_interp2 as the fork writes it: per output pixel, float32 positions and weights."""
    n, c, h, w = x.shape
    h1, w1 = h + pad_beg + pad_end, w + pad_beg + pad_end
    y0 = x0 = -pad_beg
    out = np.zeros((n, c, oh, ow))
    if (h1, w1) == (oh, ow):
        return x[:, :, y0:y0 + h1, x0:x0 + w1].copy()
    rh = np.float32(h1 - 1) / np.float32(oh - 1) if oh > 1 else np.float32(0)
    rw = np.float32(w1 - 1) / np.float32(ow - 1) if ow > 1 else np.float32(0)
    for i in range(oh):
        hr = np.float32(rh * np.float32(i))
        hi = int(hr)
        hp = 1 if hi < h1 - 1 else 0
        l1 = float(np.float32(hr - np.float32(hi)))
        for j in range(ow):
            wr = np.float32(rw * np.float32(j))
            wi = int(wr)
            wp = 1 if wi < w1 - 1 else 0
            m1 = float(np.float32(wr - np.float32(wi)))
            p = x[:, :, y0 + hi, x0 + wi]
            out[:, :, i, j] = ((1 - l1) * ((1 - m1) * p + m1 * x[:, :, y0 + hi, x0 + wi + wp])
                               + l1 * ((1 - m1) * x[:, :, y0 + hi + hp, x0 + wi]
                                       + m1 * x[:, :, y0 + hi + hp, x0 + wi + wp]))
    return out


@pytest.mark.parametrize("param, shape, out_hw, pads", [
    ("zoom_factor: 3", (1, 2, 4, 5), (10, 13), (0, 0)),
    ("shrink_factor: 3", (2, 1, 10, 8), (4, 3), (0, 0)),
    ("height: 9 width: 4", (1, 2, 5, 7), (9, 4), (0, 0)),
    ("height: 1 width: 1", (1, 1, 5, 7), (1, 1), (0, 0)),
    ("shrink_factor: 2 zoom_factor: 4", (1, 2, 9, 6), (17, 9), (0, 0)),
    ("zoom_factor: 2 pad_beg: -1 pad_end: -2", (1, 2, 8, 7), (9, 7), (-1, -2)),
    ("height: 6 width: 5 pad_beg: -1", (1, 1, 7, 6), (6, 5), (-1, 0)),  # same size: a copy
    ("zoom_factor: 1", (1, 1, 3, 4), (3, 4), (0, 0)),
])
def test_interp_forward(param, shape, out_hw, pads):
    x = randn(*shape)
    (y,) = forward_layer(f'type: "Interp" interp_param {{ {param} }}', [x])
    assert y.shape == shape[:2] + out_hw
    np.testing.assert_allclose(y, np_interp(x, *pads, *out_hw), rtol=1e-12, atol=1e-12)


def test_interp_float32_ratio():
    """The ratio is float32: 10 -> 91 gives r = 0.1f, whose products truncate differently than
    exact decimals would (index 30 * 0.1f = 3.0000001 -> integer part 3, not 2.999...)."""
    x = randn(1, 1, 10, 2)
    (y,) = forward_layer('type: "Interp" interp_param { height: 91 width: 2 }', [x])
    np.testing.assert_allclose(y, np_interp(x, 0, 0, 91, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("param, shape", [
    ("zoom_factor: 2", (1, 2, 3, 4)),
    ("shrink_factor: 2", (1, 1, 7, 6)),
    ("height: 5 width: 3 pad_beg: -1 pad_end: -1", (2, 1, 6, 6)),
])
def test_interp_gradient(param, shape):
    check_gradient(f'type: "Interp" interp_param {{ {param} }}', [randn(*shape)])


def test_interp_backward_is_adjoint_and_zero_where_cropped():
    x = randn(1, 1, 6, 6)
    layer, bottom, top = make_layer('type: "Interp" interp_param { zoom_factor: 2 pad_beg: -1 }', [x])
    layer.run_forward(bottom, top)
    g = randn(*top[0].shape, seed=3)
    (dx,) = backward(layer, bottom, top, [g])
    assert np.all(dx[:, :, 0, :] == 0) and np.all(dx[:, :, :, 0] == 0)
    # <interp(x), g> == <x, interp^T(g)>
    assert np.isclose((top[0].data * g).sum(), (x * dx).sum())


def test_interp_errors():
    x = randn(1, 1, 4, 4)
    raises('type: "Interp" interp_param { zoom_factor: 2 pad_beg: 1 }', [x], "non-positive padding")
    raises('type: "Interp" interp_param { zoom_factor: 0 }', [x], "zoom_factor must be positive")
    raises('type: "Interp" interp_param { shrink_factor: 0 }', [x], "shrink_factor must be positive")
    raises('type: "Interp" interp_param { height: 3 }', [x], "needs zoom_factor")
    raises('type: "Interp"', [x], "needs zoom_factor")
    raises('type: "Interp" interp_param { zoom_factor: 2 pad_beg: -2 pad_end: -2 }', [x], "leaves nothing")
    raises('type: "Interp" interp_param { zoom_factor: 2 }', [randn(4, 4)], r"4-D.*\(4, 4\)")


# ----------------------------------------------------------------------------- Upsample
def pool_mask(x):
    """A MAX 2x2/2 pooling with Caffe's ceil rounding: pooled values and flat indices h*W+w."""
    n, c, h, w = x.shape
    ph, pw = -(-h // 2), -(-w // 2)
    vals, idx = np.zeros((n, c, ph, pw)), np.zeros((n, c, ph, pw))
    for i in range(ph):
        for j in range(pw):
            win = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
            k = win.reshape(n, c, -1).argmax(-1)
            wh = win.shape[3]
            vals[:, :, i, j] = win.reshape(n, c, -1).max(-1)
            idx[:, :, i, j] = (2 * i + k // wh) * w + 2 * j + k % wh
    return vals, idx


def np_unpool(data, mask, oh, ow):
    n, c = data.shape[:2]
    out = np.zeros((n, c, oh * ow))
    for a in range(n):
        for b in range(c):
            for v, m in zip(data[a, b].ravel(), mask[a, b].ravel()):
                out[a, b, int(m)] = v
    return out.reshape(n, c, oh, ow)


@pytest.mark.parametrize("param, in_hw, out_hw", [
    ("scale: 2", (6, 8), (6, 8)),
    ("upsample_h: 7 upsample_w: 9", (7, 9), (7, 9)),
    ("scale: 2 pad_out_h: true pad_out_w: true", (7, 9), (7, 9)),
    ("scale_h: 2 scale_w: 2 pad_out_w: true", (6, 7), (6, 7)),
])
def test_upsample_segnet_forward_backward(param, in_hw, out_hw):
    x = randn(2, 3, *in_hw)
    data, mask = pool_mask(x)
    data = randn(*data.shape, seed=5)  # the decoder's features, not the pooled values
    layer, bottom, top = make_layer(f'type: "Upsample" upsample_param {{ {param} }}', [data, mask])
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, np_unpool(data, mask, *out_hw))
    g = randn(*top[0].shape, seed=7)
    dx, dmask = backward(layer, bottom, top, [g], [True, False])
    index = mask.reshape(2, 3, -1).astype(int)
    expect = np.take_along_axis(g.reshape(2, 3, -1), index, 2).reshape(data.shape)
    np.testing.assert_array_equal(dx, expect)


def test_upsample_segnet_gradient():
    x = randn(1, 2, 4, 6)
    data, mask = pool_mask(x)
    check_gradient('type: "Upsample" upsample_param { scale: 2 }', [data, mask], check_bottoms=[0])


def test_upsample_nearest_forward_and_gradient():
    x = randn(2, 3, 3, 4)
    (y,) = forward_layer('type: "Upsample" upsample_param { scale: 3 }', [x])
    np.testing.assert_array_equal(y, np.repeat(np.repeat(x, 3, axis=2), 3, axis=3))
    layer, bottom, top = make_layer('type: "Upsample" upsample_param { scale: 2 }', [x])
    layer.run_forward(bottom, top)
    g = randn(*top[0].shape, seed=2)
    (dx,) = backward(layer, bottom, top, [g])
    np.testing.assert_allclose(dx, g.reshape(2, 3, 3, 2, 4, 2).sum(axis=(3, 5)))
    check_gradient('type: "Upsample" upsample_param { scale: 2 }', [randn(1, 2, 2, 3)])


def test_upsample_errors():
    x = randn(1, 1, 4, 4)
    data, mask = pool_mask(x)
    raises('type: "Upsample" upsample_param { scale: 3 pad_out_h: true }', [data, mask], "pad_out_h requires")
    raises('type: "Upsample" upsample_param { scale: 1 }', [data, mask], "scale must be > 1")
    raises('type: "Upsample" upsample_param { scale: 2 scale_h: 2 }', [data, mask],
           "upsample_h and upsample_w")
    raises('type: "Upsample" upsample_param { upsample_h: 1 upsample_w: 4 }', [data, mask], "must be > 1")
    raises('type: "Upsample" upsample_param { scale: 2 }', [data, mask[:, :, :1]],
           r"mask bottom\[1\] \(1, 1, 1, 2\).*\(1, 1, 2, 2\)")
    layer, bottom, top = make_layer('type: "Upsample" upsample_param { upsample_h: 2 upsample_w: 2 }',
                                    [data, mask + 8])
    with pytest.raises(LayerError, match=r"'L'.*mask index \d+ out of range for the 4-pixel"):
        layer.run_forward(bottom, top)
    raises('type: "Upsample" upsample_param { upsample_h: 8 upsample_w: 8 }', [x],
           "only upsample_param.scale")
    raises('type: "Upsample" upsample_param { scale: 0 }', [x], "scale must be positive")


# ----------------------------------------------------------------------------- BN
def test_bn_flavour_rule():
    def lp(text):
        return parse_text('name: "b" type: "BN" ' + text, caffe_pb2.LayerParameter())
    assert bn_flavour(lp("")) == "segnet"
    assert bn_flavour(lp("bn_param { bn_mode: INFERENCE }")) == "segnet"
    assert bn_flavour(lp("bn_param { frozen: true }")) == "pspnet"
    assert bn_flavour(lp("param {} param {} param {} param {}")) == "pspnet"
    with pytest.raises(ValueError, match="mixes SegNet's fields"):
        bn_flavour(lp("bn_param { bn_mode: LEARN eps: 1e-5 }"))


SEG_FILL = "scale_filler { type: 'gaussian' std: 1 } shift_filler { type: 'gaussian' std: 1 }"
PSP_FILL = "slope_filler { type: 'gaussian' std: 1 } bias_filler { type: 'gaussian' std: 1 }"


def test_bn_segnet_learn_forward():
    x = randn(2, 3, 4, 5) * 2 + 1
    layer, bottom, top = make_layer(f'type: "BN" bn_param {{ bn_mode: LEARN {SEG_FILL} }}', [x], num_tops=3)
    layer.run_forward(bottom, top)
    s, b = layer.blobs[0].data, layer.blobs[1].data
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = (x ** 2).mean(axis=(0, 2, 3), keepdims=True) - mean ** 2
    np.testing.assert_allclose(top[0].data, s * (x - mean) / np.sqrt(var + 1e-9) + b, rtol=1e-10)
    np.testing.assert_allclose(top[1].data, mean, rtol=1e-12)
    np.testing.assert_allclose(top[2].data, var, rtol=1e-10)


def test_bn_segnet_inference_forward_in_train_phase():
    x = randn(2, 3, 2, 2)
    layer, bottom, top = make_layer(f'type: "BN" bn_param {{ bn_mode: INFERENCE {SEG_FILL} }}', [x])
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, layer.blobs[0].data * x + layer.blobs[1].data)


@pytest.mark.parametrize("mode", ["LEARN", "INFERENCE"])
def test_bn_segnet_gradient(mode):
    check_gradient(f'type: "BN" bn_param {{ bn_mode: {mode} {SEG_FILL} }}', [randn(2, 3, 3, 2)])


def test_bn_segnet_param_diffs_are_written_not_added():
    x = randn(2, 2, 2, 2)
    layer, bottom, top = make_layer(f'type: "BN" bn_param {{ bn_mode: LEARN {SEG_FILL} }}', [x])
    layer.run_forward(bottom, top)
    top[0].diff_t = torch.ones_like(top[0].data_t)
    layer.blobs[1].diff_t.fill_(100.0)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(layer.blobs[1].diff.ravel(), [8.0, 8.0])


def test_bn_pspnet_train_forward_and_running_stats():
    x = randn(3, 2, 4, 3) + 2
    layer, bottom, top = make_layer(f'type: "BN" bn_param {{ {PSP_FILL} momentum: 0.9 eps: 1e-4 }}', [x])
    assert len(layer.blobs) == 4 and all(b.shape == (1, 2, 1, 1) for b in layer.blobs)
    assert [p.lr_mult for p in layer.layer_param.param][2:] == [0, 0]
    layer.blobs[2].data[...] = 0.5
    layer.blobs[3].data[...] = 2.0
    layer.run_forward(bottom, top)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    s, b = layer.blobs[0].data, layer.blobs[1].data
    eps = float(np.float32(1e-4))
    np.testing.assert_allclose(top[0].data, s * (x - mean) / np.sqrt(var + eps) + b, rtol=1e-10)
    np.testing.assert_allclose(layer.blobs[2].data, 0.1 * mean + 0.9 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[3].data, 0.1 * var + 0.9 * 2.0, rtol=1e-6)


@pytest.mark.parametrize("how", ["test phase", "frozen"])
def test_bn_pspnet_running_stats_forward(how):
    x = randn(2, 2, 3, 3)
    frozen = "frozen: true" if how == "frozen" else ""
    phase = caffe_pb2.TEST if how == "test phase" else caffe_pb2.TRAIN
    layer, bottom, top = make_layer(f'type: "BN" bn_param {{ {PSP_FILL} eps: 1e-3 {frozen} }}', [x],
                                    phase=phase)
    if frozen:
        assert [p.lr_mult for p in layer.layer_param.param] == [0, 0, 0, 0]
        np.testing.assert_array_equal(layer.blobs[3].data, 1.0)
    layer.blobs[2].data[...] = np.array([0.3, -0.2]).reshape(1, 2, 1, 1)
    layer.blobs[3].data[...] = np.array([1.5, 0.5]).reshape(1, 2, 1, 1)
    layer.run_forward(bottom, top)
    m, v = layer.blobs[2].data, layer.blobs[3].data
    expect = layer.blobs[0].data * (x - m) / np.sqrt(v + float(np.float32(1e-3))) + layer.blobs[1].data
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-10)
    np.testing.assert_array_equal(layer.blobs[2].data.ravel(), [0.3, -0.2])  # not updated


def test_bn_pspnet_gradients():
    check_gradient(f'type: "BN" bn_param {{ {PSP_FILL} }}', [randn(2, 3, 2, 3)])

    def running(layer):
        layer.blobs[3].data[...] = 0.7
    check_gradient(f'type: "BN" bn_param {{ {PSP_FILL} frozen: true }}', [randn(2, 3, 2, 3)],
                   check_params=False, layer_setup_hook=running)


def test_bn_errors():
    x = randn(2, 3, 2, 2)
    raises('type: "BN" bn_param { bn_mode: LEARN frozen: true }', [x], "mixes SegNet's fields")
    raises('type: "BN" bn_param { frozen: true }', [x], "exactly one top", num_tops=2)
    raises('type: "BN"', [randn(2, 3)], r"4-D.*\(2, 3\)")
    layer, bottom, top = make_layer('type: "BN"', [x])
    bottom[0].reshape((2, 4, 2, 2))
    with pytest.raises(LayerError, match=r"\(2, 4, 2, 2\).*3 channels"):
        layer.reshape(bottom, top)


# ----------------------------------------------------------------------------- SegAccuracy
def np_seg_accuracy(score, label, ignore):
    c = score.shape[1]
    pred = score.argmax(1).ravel()
    lab = label[:, 0].astype(int).ravel()
    keep = ~np.isin(lab, ignore)
    m = np.zeros((c, c))
    for t, p in zip(lab[keep], pred[keep]):
        m[t, p] += 1
    acc = np.trace(m) / m.sum() if m.sum() else 0.0
    rows = m.sum(1)
    recall = np.mean([m[i, i] / rows[i] for i in range(c) if rows[i] > 0])
    jac = []
    for i in range(c):
        union = rows[i] + m[:, i].sum() - m[i, i]
        jac.append(1.0 if union == m[i, i] else m[i, i] / union)
    return np.array([acc, recall, np.mean(jac)])


def test_seg_accuracy_forward():
    score = randn(2, 5, 4, 3)
    label = np.random.default_rng(1).integers(0, 4, (2, 1, 4, 3)).astype(float)  # class 4 never labelled
    label[0, 0, 0, :] = 255
    label[1, 0, 2, 1] = 7
    (y,) = forward_layer('type: "SegAccuracy" seg_accuracy_param { ignore_label: 255 ignore_label: 7 }',
                         [score, label])
    assert y.shape == (1, 1, 1, 3)
    np.testing.assert_allclose(y.ravel(), np_seg_accuracy(score, label, [255, 7]), rtol=1e-12)


def test_seg_accuracy_ties_go_to_the_higher_class_and_reset():
    score = np.zeros((1, 3, 1, 2))
    label = np.array([2.0, 0.0]).reshape(1, 1, 1, 2)
    layer, bottom, top = make_layer('type: "SegAccuracy" seg_accuracy_param { reset: false }', [score, label])
    layer.run_forward(bottom, top)
    assert top[0].data.ravel()[0] == 0.5  # both pixels predict class 2
    layer.run_forward(bottom, top)
    assert layer.confusion.sum() == 4  # accumulated
    layer2, bottom2, top2 = make_layer('type: "SegAccuracy"', [score, label])
    layer2.run_forward(bottom2, top2)
    layer2.run_forward(bottom2, top2)
    assert layer2.confusion.sum() == 2


def test_seg_accuracy_errors():
    score = randn(1, 3, 2, 2)
    raises('type: "SegAccuracy"', [score, np.zeros((1, 1, 2, 3))], r"\(1, 1, 2, 3\).*\(1, 3, 2, 2\)")
    raises('type: "SegAccuracy"', [score, np.zeros((1, 2, 2, 2))], r"labels \(1, 2, 2, 2\)")
    layer, bottom, top = make_layer('type: "SegAccuracy" seg_accuracy_param { ignore_label: 255 }',
                                    [score, np.full((1, 1, 2, 2), 3.0)])
    with pytest.raises(LayerError, match="unexpected label 3"):
        layer.run_forward(bottom, top)
