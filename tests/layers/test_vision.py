"""Vision layers: Convolution, Deconvolution, Pooling, LRN, SPP, Im2col, Crop.

Forward values are checked against straightforward numpy versions of Caffe's loops written here;
gradients by finite differences; bad parameters must raise a LayerError naming the layer.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from recaffe import layer as layer_mod
from recaffe.gradient_check import check_gradient, forward_layer, make_layer
from recaffe.layer import LayerError
from recaffe.proto import caffe_pb2

FLT_MAX = float(np.finfo(np.float32).max)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def distinct(*shape, seed=0):
    """Values at least 0.05 apart (no ties, so max pooling's gradient is well defined)."""
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n) * 0.05 - n * 0.025).reshape(shape)


def run(text, bottoms, num_tops=1, phase=caffe_pb2.TRAIN):
    layer, bottom, top = make_layer(text, bottoms, num_tops, phase=phase)
    layer.run_forward(bottom, top)
    return layer, bottom, top


def backward(layer, bottom, top, top_diffs):
    for t, d in zip(top, top_diffs):
        t.diff_t = torch.as_tensor(d, dtype=torch.float64).clone()
    for b in layer.blobs:
        b.diff_t.zero_()
    layer.backward(top, [True] * len(bottom), bottom)
    return [b.diff.copy() for b in bottom]


def raises(text, bottoms, match, num_tops=1):
    with pytest.raises(LayerError, match=match) as info:
        make_layer(text, bottoms, num_tops)
    assert "'L'" in str(info.value)


# ----------------------------------------------------------------- numpy references
def np_conv(x, w, b, stride, pad, dil, group):
    """Direct convolution, any number of spatial axes: sum over kernel offsets of shifted slices."""
    n, c = x.shape[:2]
    d = x.ndim - 2
    o, k = w.shape[0], w.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    out = [(x.shape[2 + i] + 2 * pad[i] - dil[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(d)]
    y = np.zeros((n, o, *out))
    cg, og = c // group, o // group
    for off in itertools.product(*[range(kk) for kk in k]):
        sl = tuple(slice(off[i] * dil[i], off[i] * dil[i] + stride[i] * (out[i] - 1) + 1, stride[i])
                   for i in range(d))
        patch = xp[(slice(None), slice(None)) + sl]
        for g in range(group):
            wg = w[(slice(g * og, (g + 1) * og), slice(None)) + off]
            y[:, g * og:(g + 1) * og] += np.einsum("oc,nc...->no...", wg, patch[:, g * cg:(g + 1) * cg])
    if b is not None:
        y += b.reshape((1, -1) + (1,) * d)
    return y


def np_deconv(x, w, b, stride, pad, dil, group):
    """Transposed convolution: every input pixel scatters its kernel-weighted copy."""
    n, c = x.shape[:2]
    d = x.ndim - 2
    og, k = w.shape[1], w.shape[2:]
    cg = c // group
    size = x.shape[2:]
    full = [stride[i] * (size[i] - 1) + dil[i] * (k[i] - 1) + 1 for i in range(d)]
    y = np.zeros((n, og * group, *full))
    for off in itertools.product(*[range(kk) for kk in k]):
        sl = tuple(slice(off[i] * dil[i], off[i] * dil[i] + stride[i] * (size[i] - 1) + 1, stride[i])
                   for i in range(d))
        for g in range(group):
            wg = w[(slice(g * cg, (g + 1) * cg), slice(None)) + off]
            y[(slice(None), slice(g * og, (g + 1) * og)) + sl] += np.einsum(
                "co,nc...->no...", wg, x[:, g * cg:(g + 1) * cg])
    y = y[(slice(None), slice(None)) + tuple(slice(p, f - p) for p, f in zip(pad, full))]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * d)
    return y


def np_pool(x, method, k, s, p, ceil=True, dy=None):
    """Caffe's CPU pooling loops (MAX / AVE), vectorized over num and channels only.

    Returns (top, argmax mask or None, bottom diff for ``dy`` or None)."""
    n, c, h, w = x.shape
    any_pad = p[0] > 0 or p[1] > 0

    def pooled(size, kk, ss, pp):
        o = (math.ceil if ceil else math.floor)((size + 2 * pp - kk) / ss) + 1
        if any_pad and (o - 1) * ss >= size + pp:
            o -= 1
        return o

    oh, ow = pooled(h, k[0], s[0], p[0]), pooled(w, k[1], s[1], p[1])
    top = np.zeros((n, c, oh, ow))
    mask = np.full((n, c, oh, ow), -1.0)
    dx = np.zeros_like(x) if dy is not None else None
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * s[0] - p[0], j * s[1] - p[1]
            if method == "MAX":
                he, we = min(hs + k[0], h), min(ws + k[1], w)
                hs, ws = max(hs, 0), max(ws, 0)
                if he <= hs or we <= ws:
                    top[:, :, i, j] = -FLT_MAX
                    continue
                win = x[:, :, hs:he, ws:we].reshape(n, c, -1)
                a = win.argmax(-1)  # the first maximum, as Caffe's strict '>'
                top[:, :, i, j] = win.max(-1)
                hh, ww = hs + a // (we - ws), ws + a % (we - ws)
                mask[:, :, i, j] = hh * w + ww
                if dy is not None:
                    for ni in range(n):
                        for ci in range(c):
                            dx[ni, ci, hh[ni, ci], ww[ni, ci]] += dy[ni, ci, i, j]
            else:
                he, we = min(hs + k[0], h + p[0]), min(ws + k[1], w + p[1])
                size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                total = x[:, :, hs:he, ws:we].sum((2, 3)) if he > hs and we > ws else np.zeros((n, c))
                with np.errstate(divide="ignore", invalid="ignore"):
                    top[:, :, i, j] = total / np.float64(size)
                if dy is not None and he > hs and we > ws:
                    dx[:, :, hs:he, ws:we] += (dy[:, :, i, j] / size)[:, :, None, None]
    return top, (mask if method == "MAX" else None), dx


def np_lrn_across(x, size, alpha, beta, k):
    c = x.shape[1]
    half = (size - 1) // 2
    scale = np.empty_like(x)
    for ci in range(c):
        lo, hi = max(0, ci - half), min(c, ci + half + 1)
        scale[:, ci] = k + alpha / size * (x[:, lo:hi] ** 2).sum(1)
    return x * scale ** -beta


def np_lrn_within(x, size, alpha, beta):
    h, w = x.shape[2:]
    half = (size - 1) // 2
    scale = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            win = x[:, :, max(0, i - half):i + half + 1, max(0, j - half):j + half + 1]
            scale[:, :, i, j] = 1 + alpha / size ** 2 * (win ** 2).sum((2, 3))
    return x * scale ** -beta


# ----------------------------------------------------------------------- Convolution
CONV = ('type: "Convolution" convolution_param {{ {} weight_filler {{ type: "gaussian" std: 0.5 }} '
        'bias_filler {{ type: "gaussian" std: 0.5 }} }}')


@pytest.mark.parametrize("params, shape, geom", [
    ("num_output: 4 kernel_size: 3 pad: 1", (2, 3, 6, 5), ((1, 1), (1, 1), (1, 1), 1)),
    ("num_output: 4 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1 group: 2 dilation: 2",
     (2, 4, 9, 8), ((2, 1), (1, 0), (2, 2), 2)),
    ("num_output: 3 kernel_size: 2 kernel_size: 3 stride: 3 stride: 2 pad: 0 pad: 2 dilation: 1 dilation: 2",
     (1, 2, 8, 7), ((3, 2), (0, 2), (1, 2), 1)),
    ("num_output: 2 kernel_size: 1 bias_term: false", (2, 3, 4, 5), ((1, 1), (0, 0), (1, 1), 1)),
    ("num_output: 2 kernel_size: 3 stride: 2 pad: 1", (2, 3, 7), ((2,), (1,), (1,), 1)),
    ("num_output: 4 kernel_size: 2 stride: 1 pad: 1 group: 2", (1, 2, 3, 4, 3),
     ((1,) * 3, (1,) * 3, (1,) * 3, 2)),
    ("num_output: 2 kernel_size: 2 stride: 2 pad: 1 dilation: 1", (1, 2, 3, 3, 4, 3),
     ((2,) * 4, (1,) * 4, (1,) * 4, 1)),
])
def test_convolution_forward(params, shape, geom):
    stride, pad, dil, group = geom
    x = randn(*shape)
    layer, _, top = run(CONV.format(params), [x])
    w = layer.blobs[0].data
    b = layer.blobs[1].data if len(layer.blobs) > 1 else None
    assert w.shape[:2] == (layer.num_output, shape[1] // group)
    expected = np_conv(x, w, b, stride, pad, dil, group)
    assert top[0].shape == expected.shape
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-10, atol=1e-10)


def test_convolution_axis_and_multiple_bottoms():
    # axis 2 of (2, 3, 4, 6): 6 images (2 x 3) of 4 channels, one spatial axis of 6
    x, x2 = randn(2, 3, 4, 6), randn(2, 3, 4, 6, seed=1)
    layer, _, top = run(CONV.format("num_output: 5 kernel_size: 3 axis: 2"), [x, x2], num_tops=2)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    assert w.shape == (5, 4, 3)
    for t, inp in zip(top, (x, x2)):
        expected = np_conv(inp.reshape(6, 4, 6), w, b, (1,), (0,), (1,), 1).reshape(2, 3, 5, 4)
        np.testing.assert_allclose(t.data, expected, rtol=1e-10, atol=1e-10)


def test_convolution_no_spatial_axes_is_a_matrix_product():
    x = randn(3, 4)
    layer, _, top = run(CONV.format("num_output: 2 kernel_size: 1 group: 2"), [x])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    assert w.shape == (2, 2)
    expected = np.stack([x[:, :2] @ w[0], x[:, 2:] @ w[1]], 1) + b
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12)


def test_convolution_backward_matches_numpy_adjoint():
    # <conv(x), r> = <x, conv^T(r)>: compare backward with an explicit sum over kernel offsets
    x = randn(2, 4, 6, 5)
    text = CONV.format("num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2")
    layer, bottom, top = run(text, [x])
    r = randn(*top[0].shape, seed=3)
    (dx,) = backward(layer, bottom, top, [r])
    w = layer.blobs[0].data
    # the data gradient is the transposed convolution of r with the same weight array, shifted
    # by the padding (the last input row and column are reached by the unpadded full result)
    full = np_deconv(r, w, None, (2, 2), (0, 0), (1, 1), 2)
    np.testing.assert_allclose(dx, full[:, :, 1:7, 1:6], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.blobs[1].diff, r.sum((0, 2, 3)), rtol=1e-10)


def test_convolution_param_diffs_accumulate():
    layer, bottom, top = run(CONV.format("num_output: 2 kernel_size: 2"), [randn(1, 2, 3, 3)])
    r = randn(*top[0].shape, seed=1)
    backward(layer, bottom, top, [r])
    once = layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy()
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * once[0])
    np.testing.assert_allclose(layer.blobs[1].diff, 2 * once[1])


@pytest.mark.parametrize("params, shape", [
    ("num_output: 2 kernel_h: 3 kernel_w: 2 stride: 2 pad_h: 1 dilation: 2 group: 2", (1, 2, 5, 4)),
    ("num_output: 2 kernel_size: 3 stride: 2 pad: 1", (2, 2, 5)),
    ("num_output: 2 kernel_size: 2 pad: 1 bias_term: false", (1, 2, 3, 3, 3)),
    ("num_output: 2 kernel_size: 2 stride: 2", (1, 2, 3, 2, 3, 2)),
])
def test_convolution_gradient(params, shape):
    check_gradient(CONV.format(params), [randn(*shape)])


@pytest.mark.parametrize("params, match", [
    ("num_output: 2", "kernel_size must be specified once"),
    ("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3", "not both"),
    ("num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3", "once per spatial dimension"),
    ("num_output: 2 kernel_h: 3", "filter dimensions must be nonzero"),
    ("num_output: 2 kernel_size: 3 stride: 0", "stride dimensions must be nonzero"),
    ("num_output: 2 kernel_size: 3 stride_h: 2", "stride dimensions must be nonzero"),
    ("num_output: 2 kernel_size: 3 pad: 1 pad: 1 pad: 1", "pad must be specified once"),
    ("num_output: 2 kernel_size: 3 dilation: 1 dilation: 1 dilation: 1", "dilation must be specified"),
    ("kernel_size: 3", "num_output must be positive"),
    ("num_output: 2 kernel_size: 3 group: 2", "multiple of group"),
    ("num_output: 2 kernel_size: 1 group: 3", "output \\(2\\) should be multiples of group"),
    ("num_output: 4 kernel_size: 1 group: 0", "group must be positive"),
    ("num_output: 2 kernel_size: 9", "kernel extent"),
    ("num_output: 2 kernel_size: 3 axis: 4", "axis 4 out of range"),
])
def test_convolution_bad_params(params, match):
    raises(f'type: "Convolution" convolution_param {{ {params} }}', [randn(1, 3, 5, 5)], match)


def test_convolution_hw_fields_need_2d():
    raises('type: "Convolution" convolution_param { num_output: 1 kernel_h: 1 kernel_w: 1 }',
           [randn(1, 1, 4)], "2D convolution")


def test_convolution_given_blobs_checked_and_reshape_checks():
    raises('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 } '
           'blobs { shape { dim: 1 } data: 0 }', [randn(1, 3, 5, 5)], "weight blobs")
    layer, bottom, top = run('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
                             [randn(1, 3, 5, 5)])
    bottom[0].reshape(1, 4, 5, 5)
    with pytest.raises(LayerError, match="'L'.*incompatible"):
        layer.reshape(bottom, top)


# --------------------------------------------------------------------- Deconvolution
DECONV = CONV.replace("Convolution", "Deconvolution")


@pytest.mark.parametrize("params, shape, geom", [
    ("num_output: 3 kernel_size: 4 stride: 2 pad: 1", (2, 2, 4, 4), ((2, 2), (1, 1), (1, 1), 1)),
    ("num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 2 pad_w: 0 dilation: 2 group: 2",
     (1, 4, 3, 4), ((2, 3), (2, 0), (2, 2), 2)),
    ("num_output: 2 kernel_size: 3 stride: 2 bias_term: false", (2, 3, 4), ((2,), (0,), (1,), 1)),
    ("num_output: 2 kernel_size: 2 stride: 2 pad: 1", (1, 2, 2, 3, 2), ((2,) * 3, (1,) * 3, (1,) * 3, 1)),
    ("num_output: 2 kernel_size: 2 stride: 2 pad: 1 group: 2", (1, 2, 2, 2, 2, 2),
     ((2,) * 4, (1,) * 4, (1,) * 4, 2)),
])
def test_deconvolution_forward(params, shape, geom):
    stride, pad, dil, group = geom
    x = randn(*shape)
    layer, _, top = run(DECONV.format(params), [x])
    w = layer.blobs[0].data
    b = layer.blobs[1].data if len(layer.blobs) > 1 else None
    assert w.shape[:2] == (shape[1], layer.num_output // group)  # Caffe: (channels, out / group, ...)
    expected = np_deconv(x, w, b, stride, pad, dil, group)
    assert top[0].shape == expected.shape
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("params, shape", [
    ("num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 dilation: 2", (1, 2, 2, 3)),
    ("num_output: 2 kernel_size: 3 stride: 2 pad: 1", (1, 2, 2, 1, 2, 1)),
])
def test_deconvolution_gradient(params, shape):
    check_gradient(DECONV.format(params), [randn(*shape)])


def test_deconvolution_bad_params():
    raises(DECONV.format("num_output: 2 kernel_size: 1 pad: 1"), [randn(1, 2, 1, 1)], "not positive")
    raises(DECONV.format("kernel_size: 2"), [randn(1, 2, 3, 3)], "num_output")


# --------------------------------------------------------------------------- Pooling
POOL_CASES = [
    # pool, params, kernel, stride, pad, ceil
    ("MAX", "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True),
    ("AVE", "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True),
    ("MAX", "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True),
    ("AVE", "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0",
     (3, 2), (2, 3), (1, 0), True),
    ("MAX", "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 0 pad_w: 1",
     (2, 3), (1, 2), (0, 1), True),
    # pad above half the kernel: torch's kernels refuse it, Caffe allows pad < kernel
    ("AVE", "kernel_size: 3 stride: 2 pad: 2", (3, 3), (2, 2), (2, 2), True),
    ("MAX", "kernel_size: 3 stride: 2 pad: 2", (3, 3), (2, 2), (2, 2), True),
    # no padding, stride above kernel, ceil: Caffe keeps windows that start past the image
    ("MAX", "kernel_size: 1 stride: 3", (1, 1), (3, 3), (0, 0), True),
    ("AVE", "kernel_size: 1 stride: 3", (1, 1), (3, 3), (0, 0), True),
    ("AVE", "kernel_size: 2 stride: 4", (2, 2), (4, 4), (0, 0), True),
    ("MAX", "kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR", (3, 3), (2, 2), (1, 1), False),
    ("AVE", "kernel_size: 2 stride: 2 pad: 1 round_mode: FLOOR", (2, 2), (2, 2), (1, 1), False),
    # kernel larger than the bottom (a window clipped on both sides)
    ("AVE", "kernel_size: 6 stride: 3", (6, 6), (3, 3), (0, 0), True),
]


@pytest.mark.parametrize("pool, params, k, s, p, ceil", POOL_CASES)
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 16, 6, 7)])  # 16 channels: the channels-last path
def test_pooling_matches_caffe_loops(pool, params, k, s, p, ceil, shape):
    x = distinct(*shape)
    text = f'type: "Pooling" pooling_param {{ pool: {pool} {params} }}'
    layer, bottom, top = run(text, [x], num_tops=2 if pool == "MAX" else 1)
    dy = randn(*top[0].shape, seed=2)
    expected, mask, dx = np_pool(x, pool, k, s, p, ceil, dy)
    assert top[0].shape == expected.shape
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    if pool == "MAX":
        np.testing.assert_array_equal(top[1].data, mask)
    (ours,) = backward(layer, bottom, top, [dy] + ([np.zeros(dy.shape)] if pool == "MAX" else []))
    np.testing.assert_allclose(ours, dx, rtol=1e-12, atol=1e-12)
    if pool == "MAX":  # the same gradient through the saved argmax, without the mask top
        layer, bottom, top = run(text, [x])
        np.testing.assert_allclose(backward(layer, bottom, top, [dy])[0], dx, rtol=1e-12, atol=1e-12)


def test_pooling_output_sizes():
    # Caffe: ceil((H + 2p - k) / s) + 1, minus one when padded and the last window starts at H + p
    def shape(params, hw):
        return forward_layer(f'type: "Pooling" pooling_param {{ {params} }}', [randn(1, 1, *hw)])[0].shape[2:]
    assert shape("kernel_size: 3 stride: 2", (8, 8)) == (4, 4)
    assert shape("kernel_size: 1 stride: 3", (5, 4)) == (3, 2)  # torch's ceil mode gives (2, 2)
    assert shape("kernel_size: 2 stride: 2", (5, 5)) == (3, 3)
    assert shape("kernel_size: 2 stride: 2 pad: 1", (4, 4)) == (3, 3)
    assert shape("kernel_size: 3 stride: 3 pad: 1", (4, 4)) == (2, 2)  # ceil 3, last starts at 5 >= 4+1
    assert shape("kernel_size: 3 stride: 2 round_mode: FLOOR", (8, 8)) == (3, 3)
    assert shape("global_pooling: true", (5, 6)) == (1, 1)


def test_max_pooling_ties_take_the_first_maximum():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = x[0, 0, 0, 1] = 2.0  # both in the first window: (0, 1) comes first
    top = forward_layer('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 }',
                        [x], num_tops=2)
    np.testing.assert_array_equal(top[1][0, 0], [[1, 2], [8, 10]])
    np.testing.assert_array_equal(top[0][0, 0], [[2, 0], [0, 0]])


def test_global_pooling():
    x = randn(2, 3, 5, 6)
    ave = forward_layer('type: "Pooling" pooling_param { pool: AVE global_pooling: true }', [x])[0]
    np.testing.assert_allclose(ave[:, :, 0, 0], x.mean((2, 3)), rtol=1e-12)
    mx = forward_layer('type: "Pooling" pooling_param { pool: MAX global_pooling: true }', [x])[0]
    np.testing.assert_allclose(mx[:, :, 0, 0], x.max((2, 3)))


@pytest.mark.parametrize("params", [
    "pool: MAX kernel_size: 3 stride: 2",
    "pool: MAX kernel_size: 3 stride: 2 pad: 2",
    "pool: AVE kernel_h: 3 kernel_w: 2 stride: 2 pad_h: 1 pad_w: 1",
    "pool: AVE kernel_size: 3 stride: 2 pad: 2",
    "pool: AVE global_pooling: true",
])
def test_pooling_gradient(params):
    check_gradient(f'type: "Pooling" pooling_param {{ {params} }}', [distinct(2, 2, 6, 5)])


@pytest.mark.parametrize("text, shape", [
    (CONV.format("num_output: 3 kernel_size: 3 stride: 2 pad: 1 group: 1"), (3, 2, 5, 4)),
    (CONV.format("num_output: 2 kernel_size: 2 pad: 1"), (3, 2, 3, 3, 3)),
    (DECONV.format("num_output: 2 kernel_size: 3 stride: 2"), (3, 2, 3, 3)),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }', (3, 2, 6, 5)),
    ('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }', (3, 2, 6, 5)),
    ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }', (3, 4, 3, 3)),
    ('type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }',
     (3, 2, 4, 4)),
])
def test_gradient_in_batch_chunks(monkeypatch, text, shape):
    # large batches run a few items a call into the blobs' own memory (layer.batch_chunks):
    # forced here with a tiny chunk size, one item a call
    monkeypatch.setattr(layer_mod, "CHUNK_BYTES", 1)
    layer = check_gradient(text, [distinct(*shape)])
    assert layer._chunks is not None and len(layer._chunks) == shape[0]
    if layer.type in ("Convolution", "Deconvolution"):
        assert len(layer._backward_chunks) == shape[0]


def test_stochastic_pooling_train_samples_by_value():
    # each window holds 1, 2, 3, 4: a pick frequency proportional to the value
    window = np.array([[1.0, 2.0], [3.0, 4.0]])
    x = np.tile(window, (1, 1, 40, 50))
    layer, bottom, top = run('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }',
                             [x])
    y = top[0].data
    assert y.shape == (1, 1, 40, 50)
    freq = np.array([(y == v).mean() for v in (1, 2, 3, 4)])
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)
    # the gradient goes to the sampled pixel (one per window here)
    (dx,) = backward(layer, bottom, top, [np.ones(y.shape)])
    assert dx.sum() == y.size
    np.testing.assert_array_equal(np.sort(x[dx == 1]), np.sort(y.reshape(-1)))


def test_stochastic_pooling_gradient_and_test_phase():
    x = np.abs(distinct(1, 2, 5, 5)) + 0.1
    text = 'type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }'
    check_gradient(text, [x])
    # TEST: sum(x^2) / sum(x) over each window (ceil mode: 3 x 3 windows clipped at the edge)
    y = forward_layer(text, [x], phase=caffe_pb2.TEST)[0]
    expected = np.empty((1, 2, 2, 2))
    for i, j in itertools.product(range(2), range(2)):
        win = x[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
        expected[:, :, i, j] = (win ** 2).sum((2, 3)) / win.sum((2, 3))
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    check_gradient(text, [x], phase=caffe_pb2.TEST)


@pytest.mark.parametrize("params, match", [
    ("kernel_size: 2 kernel_h: 2 kernel_w: 2", "not both"),
    ("kernel_h: 2", "both kernel_h and kernel_w"),
    ("stride: 1", "both kernel_h and kernel_w"),
    ("global_pooling: true kernel_size: 2", "cannot be specified"),
    ("global_pooling: true stride: 2", "only pad = 0 and stride = 1"),
    ("kernel_size: 2 pad: 1 pad_h: 1 pad_w: 1", "pad is pad OR"),
    ("kernel_size: 2 pad_h: 1", "pad is pad OR"),
    ("kernel_size: 2 stride_w: 1", "stride is stride OR"),
    ("kernel_size: 2 pad: 2", "smaller than the kernel"),
    ("kernel_size: 0", "cannot be zero"),
    ("kernel_size: 2 stride: 0", "stride must be positive"),
    ("pool: STOCHASTIC kernel_size: 3 pad: 1", "padding is implemented only"),
    ("kernel_size: 9", "not positive"),
])
def test_pooling_bad_params(params, match):
    raises(f'type: "Pooling" pooling_param {{ {params} }}', [randn(1, 1, 4, 4)], match)


def test_pooling_bad_blobs():
    raises('type: "Pooling" pooling_param { kernel_size: 2 }', [randn(1, 4, 4)], "4 axes")
    raises('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 }', [randn(1, 1, 4, 4)],
           "at most 1 top", num_tops=2)


# ------------------------------------------------------------------------------- LRN
def test_lrn_across_channels():
    x = randn(2, 7, 3, 2)
    y = forward_layer('type: "LRN" lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }', [x])[0]
    np.testing.assert_allclose(y, np_lrn_across(x, 5, 0.5, 0.75, 2.0), rtol=1e-6)  # float params
    y = forward_layer('type: "LRN"', [x])[0]  # defaults: 5, alpha 1, beta 0.75, k 1
    np.testing.assert_allclose(y, np_lrn_across(x, 5, 1.0, 0.75, 1.0), rtol=1e-12)


def test_lrn_within_channel():
    x = randn(2, 2, 5, 4)
    y = forward_layer('type: "LRN" lrn_param { local_size: 3 alpha: 2 beta: 0.5 k: 7 '
                      'norm_region: WITHIN_CHANNEL }', [x])[0]
    # Caffe's within-channel form ignores k and always divides by local_size^2
    np.testing.assert_allclose(y, np_lrn_within(x, 3, 2.0, 0.5), rtol=1e-12)


@pytest.mark.parametrize("params", [
    "local_size: 3 alpha: 0.5 beta: 0.75 k: 2",
    "local_size: 5 alpha: 2 beta: 0.6",
    "local_size: 3 alpha: 0.8 beta: 0.75 norm_region: WITHIN_CHANNEL",
    "local_size: 5 alpha: 2 beta: 0.3 norm_region: WITHIN_CHANNEL",
])
def test_lrn_gradient(params):
    check_gradient(f'type: "LRN" lrn_param {{ {params} }}', [randn(2, 6, 3, 3)])


def test_lrn_bad_params():
    raises('type: "LRN" lrn_param { local_size: 4 }', [randn(1, 5, 2, 2)], "odd values")
    raises('type: "LRN"', [randn(5, 2, 2)], "4 axes")


# ------------------------------------------------------------------------------- SPP
def test_spp_forward():
    x = randn(2, 3, 5, 7)
    y = forward_layer('type: "SPP" spp_param { pyramid_height: 2 pool: MAX }', [x])[0]
    assert y.shape == (2, 3 + 3 * 4)
    np.testing.assert_allclose(y[:, :3], x.max((2, 3)))
    # level 1: kernel 3 x 4, pad 1 x 1, stride 3 x 4 -> windows rows [0, 2) [2, 5), cols [0, 3) [3, 7)
    bins = np.stack([x[:, :, r, c].max((2, 3)) for r in (slice(0, 2), slice(2, 5))
                     for c in (slice(0, 3), slice(3, 7))], 2)
    np.testing.assert_allclose(y[:, 3:], bins.reshape(2, 12))
    # AVE divides by the window clipped to the padded bottom: 3 x 4 everywhere here
    y = forward_layer('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', [x])[0]
    bins = np.stack([x[:, :, r, c].sum((2, 3)) / 12 for r in (slice(0, 2), slice(2, 5))
                     for c in (slice(0, 3), slice(3, 7))], 2)
    np.testing.assert_allclose(y[:, 3:], bins.reshape(2, 12), rtol=1e-12)
    np.testing.assert_allclose(y[:, :3], x.mean((2, 3)), rtol=1e-12)


def test_spp_height_one_keeps_the_pooling_shape():
    x = randn(2, 3, 4, 4)
    y = forward_layer('type: "SPP" spp_param { pyramid_height: 1 }', [x])[0]
    assert y.shape == (2, 3, 1, 1)
    np.testing.assert_allclose(y[:, :, 0, 0], x.max((2, 3)))


@pytest.mark.parametrize("params", ["pyramid_height: 3 pool: MAX", "pyramid_height: 2 pool: AVE",
                                    "pyramid_height: 1 pool: AVE"])
def test_spp_gradient(params):
    check_gradient(f'type: "SPP" spp_param {{ {params} }}', [distinct(1, 2, 8, 7)])


def test_spp_bad_params():
    raises('type: "SPP"', [randn(1, 1, 4, 4)], "pyramid_height")
    # level 2 of a 2 x 2 bottom: kernel 1, pad 1 -> the pooling's pad < kernel check
    raises('type: "SPP" spp_param { pyramid_height: 3 }', [randn(1, 1, 2, 2)], "pyramid level 2")
    raises('type: "SPP" spp_param { pyramid_height: 2 }', [randn(1, 4, 4)], "4 axes")


# ---------------------------------------------------------------------------- Im2col
def np_im2col(x, k, s, p, d):
    n, c = x.shape[:2]
    sp = x.shape[2:]
    out = [(sp[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(len(sp))]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(q, q) for q in p])
    cols = np.zeros((n, c, int(np.prod(k)), *out))
    for ki, off in enumerate(itertools.product(*[range(kk) for kk in k])):
        for pos in itertools.product(*[range(o) for o in out]):
            src = tuple(pos[i] * s[i] + off[i] * d[i] for i in range(len(sp)))
            cols[(slice(None), slice(None), ki) + pos] = xp[(slice(None), slice(None)) + src]
    return cols.reshape(n, -1, *out)


@pytest.mark.parametrize("params, shape, geom", [
    ("kernel_size: 3 stride: 2 pad: 1", (2, 3, 5, 6), ((3, 3), (2, 2), (1, 1), (1, 1))),
    ("kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 dilation: 2", (1, 2, 5, 7),
     ((2, 3), (1, 2), (1, 0), (2, 2))),
    ("kernel_size: 2 stride: 2 pad: 1", (2, 2, 5), ((2,), (2,), (1,), (1,))),
    ("kernel_size: 2 kernel_size: 1 kernel_size: 2 pad: 1 dilation: 2", (1, 2, 3, 2, 4),
     ((2, 1, 2), (1, 1, 1), (1, 1, 1), (2, 2, 2))),
])
def test_im2col(params, shape, geom):
    x = randn(*shape)
    text = f'type: "Im2col" convolution_param {{ {params} }}'
    y = forward_layer(text, [x])[0]
    expected = np_im2col(x, *geom)
    assert y.shape == expected.shape
    np.testing.assert_array_equal(y, expected)
    check_gradient(text, [x])


def test_im2col_bad_params():
    raises('type: "Im2col" convolution_param { kernel_size: 2 }', [randn(3, 4)], "spatial axis")
    raises('type: "Im2col" convolution_param { stride: 2 }', [randn(1, 1, 4, 4)], "kernel_size")


# ------------------------------------------------------------------------------ Crop
def test_crop():
    x, ref = randn(2, 3, 6, 7), np.zeros((1, 2, 4, 3))
    y = forward_layer('type: "Crop" crop_param { axis: 2 offset: 1 offset: 3 }', [x, ref])[0]
    np.testing.assert_array_equal(y, x[:, :, 1:5, 3:6])
    y = forward_layer('type: "Crop" crop_param { axis: 1 offset: 1 }', [x, ref])[0]
    np.testing.assert_array_equal(y, x[:, 1:3, 1:5, 1:4])
    y = forward_layer('type: "Crop"', [x, ref])[0]  # defaults: axis 2, offset 0
    np.testing.assert_array_equal(y, x[:, :, :4, :3])
    y = forward_layer('type: "Crop" crop_param { axis: -3 offset: 0 offset: 2 offset: 1 }', [x, ref])[0]
    np.testing.assert_array_equal(y, x[:, 0:2, 2:6, 1:4])


def test_crop_gradient():
    layer = check_gradient('type: "Crop" crop_param { axis: 1 offset: 1 }',
                           [randn(2, 3, 4, 4), np.zeros((2, 1, 2, 3))], check_bottoms=[0])
    assert layer.type == "Crop"


def test_crop_bad_params():
    x, ref = randn(2, 3, 6, 7), np.zeros((1, 2, 4, 3))
    raises('type: "Crop" crop_param { axis: 2 offset: 1 offset: 1 offset: 1 }', [x, ref],
           "number of offset values")
    raises('type: "Crop" crop_param { axis: 2 offset: 3 }', [x, ref], "out-of-bounds")
    raises('type: "Crop" crop_param { axis: 4 }', [x, ref], "axis 4 out of range")
    raises('type: "Crop"', [x], "exactly 2 bottom")


# ------------------------------------------------------------------------------ depthwise
@pytest.mark.parametrize("type_", ["ConvolutionDepthwise", "DepthwiseConvolution"])
@pytest.mark.parametrize("params,num_output", [
    ("kernel_size: 3 stride: 2 pad: 1", 4),
    ("kernel_h: 3 kernel_w: 2 pad_w: 1 dilation: 2 bias_term: false group: 4", 4),
    ("kernel_size: 2", 8),  # a depth multiplier of 2
])
def test_depthwise_convolution(type_, params, num_output):
    x = randn(2, 4, 7, 6)
    text = (f'type: "{type_}" convolution_param {{ num_output: {num_output} {params} '
            'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }')
    layer, _, top = run(text, [x])
    assert layer.group == 4 and layer.blobs[0].shape[1] == 1
    plain = text.replace(type_, "Convolution").replace("group: 4", "").replace("num_output", "group: 4 num_output")
    ref_layer, ref_bottom, ref_top = make_layer(plain, [x])
    for mine, ref in zip(layer.blobs, ref_layer.blobs):
        ref.data[...] = mine.data
    ref_layer.run_forward(ref_bottom, ref_top)
    np.testing.assert_allclose(top[0].data, ref_top[0].data, rtol=1e-14, atol=1e-14)
    check_gradient(text, [randn(1, 4, 5, 4, seed=1)])


def test_depthwise_convolution_errors():
    raises('type: "ConvolutionDepthwise" convolution_param { num_output: 6 kernel_size: 3 }',
           [randn(1, 4, 5, 5)], r"num_output \(6\).*channels \(4\)")
    raises('type: "DepthwiseConvolution" convolution_param { num_output: 4 kernel_size: 3 group: 2 }',
           [randn(1, 4, 5, 5)], r"group 2.*4 channels")
