"""Neuron layers: forward against numpy formulas, gradient checks, in-place runs, bad params."""
import numpy as np
import pytest
import torch

from recaffe import rng
from recaffe.blob import Blob
from recaffe.gradient_check import check_gradient, forward_layer, layer_param, make_layer
from recaffe.layer import LayerError, create_layer
from recaffe.proto import caffe_pb2

SHAPE = (2, 3, 2, 2)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape or SHAPE)


def away_from(x, points, gap=0.05):
    """Move values within ``gap`` of any kink in ``points`` out of the way (finite differences)."""
    x = x.copy()
    for p in points:
        near = np.abs(x - p) < gap
        x[near] = p + np.where(x[near] >= p, gap, -gap) * 2
    return x


def run(text, x, *, in_place, top_diff, phase=caffe_pb2.TRAIN, seed=1701):
    """Setup, forward, backward (all bottoms and params); returns top data, bottom diff, param diffs."""
    rng.set_random_seed(seed)
    layer = create_layer(layer_param(text, phase), dtype=torch.float64)
    bottom = Blob(x.shape, torch.float64)
    bottom.data_t = torch.tensor(x)
    top = bottom if in_place else Blob((), torch.float64)
    layer.setup([bottom], [top])
    layer.run_forward([bottom], [top])
    y = top.data.copy()
    top.diff_t = torch.tensor(top_diff)
    for b in layer.blobs:
        b.diff_t.zero_()
    layer.backward([top], [True], [bottom])
    return y, bottom.diff.copy(), [b.diff.copy() for b in layer.blobs]


def assert_in_place_matches(text, x, phase=caffe_pb2.TRAIN):
    dy = randn(*x.shape, seed=7)
    y0, dx0, dp0 = run(text, x, in_place=False, top_diff=dy, phase=phase)
    y1, dx1, dp1 = run(text, x, in_place=True, top_diff=dy, phase=phase)
    np.testing.assert_allclose(y1, y0, rtol=0, atol=0)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-12, atol=1e-12)
    for a, b in zip(dp1, dp0):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def f32(v):
    """A float param as the layer sees it (caffe.proto stores float32)."""
    return float(np.float32(v))


def sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))  # 1 / (1 + exp(-x)) without overflow


# --------------------------------------------------------------------------- forward
FORWARD_CASES = [
    ('type: "ReLU"', lambda x: np.maximum(x, 0)),
    ('type: "ReLU" relu_param { negative_slope: 0.1 }',
     lambda x: np.where(x > 0, x, f32(0.1) * x)),
    ('type: "Sigmoid"', sigmoid),
    ('type: "TanH"', np.tanh),
    ('type: "ELU"', lambda x: np.where(x > 0, x, np.exp(x) - 1)),
    ('type: "ELU" elu_param { alpha: 0.5 }', lambda x: np.where(x > 0, x, 0.5 * (np.exp(x) - 1))),
    ('type: "AbsVal"', np.abs),
    ('type: "BNLL"', lambda x: np.log1p(np.exp(x))),
    ('type: "Exp"', np.exp),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', lambda x: 2.0 ** (1 + 0.5 * x)),
    ('type: "Exp" exp_param { scale: -1.5 shift: 0.25 }', lambda x: np.exp(0.25 - 1.5 * x)),
    ('type: "Log" log_param { shift: 4 }', lambda x: np.log(4 + x)),
    ('type: "Log" log_param { base: 10 scale: 2 shift: 5 }', lambda x: np.log10(5 + 2 * x)),
    ('type: "Power"', lambda x: x),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', lambda x: (1 + 0.5 * x) ** 2),
    ('type: "Power" power_param { power: 3 scale: -2 }', lambda x: (-2 * x) ** 3),
    ('type: "Power" power_param { power: 0.5 scale: 0.25 shift: 2 }', lambda x: np.sqrt(2 + 0.25 * x)),
    ('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', lambda x: np.ones_like(x)),
    ('type: "Power" power_param { power: 3 scale: 0 shift: 2 }', lambda x: np.full_like(x, 8.0)),
    ('type: "Threshold"', lambda x: (x > 0).astype(x.dtype)),
    ('type: "Threshold" threshold_param { threshold: 0.3 }', lambda x: (x > f32(0.3)).astype(x.dtype)),
    ('type: "Clip" clip_param { min: -0.5 max: 0.7 }', lambda x: np.clip(x, -0.5, f32(0.7))),
    ('type: "Swish"', lambda x: x * sigmoid(x)),
    ('type: "Swish" swish_param { beta: 1.5 }', lambda x: x * sigmoid(1.5 * x)),
]


@pytest.mark.parametrize("text,expected", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward(text, expected):
    x = randn(seed=1)
    (y,) = forward_layer(text, [x])
    np.testing.assert_allclose(y, expected(x), rtol=1e-12, atol=1e-12)


def test_threshold_is_strict():
    x = np.array([[-1.0, 0.3, 0.30001, 2.0]])
    (y,) = forward_layer('type: "Threshold" threshold_param { threshold: 0.3 }', [x])
    np.testing.assert_array_equal(y, [[0, 0, 1, 1]])


def test_bnll_is_stable_for_large_inputs():
    x = np.array([[-800.0, -60.0, 0.0, 60.0, 800.0]])
    (y,) = forward_layer('type: "BNLL"', [x])
    np.testing.assert_allclose(y, [[0.0, np.exp(-60.0), np.log(2.0), 60.0, 800.0]], rtol=1e-12)
    layer, bottom, top = make_layer('type: "BNLL"', [x])
    layer.run_forward(bottom, top)
    top[0].diff_t = torch.ones(x.shape, dtype=torch.float64)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, sigmoid(np.minimum(x, 50.0)), rtol=1e-12)
    assert np.isfinite(bottom[0].diff).all()


def test_prelu_forward_per_channel_and_shared():
    x = randn(seed=2)
    slopes = np.array([0.1, -0.3, 2.0])
    layer, bottom, top = make_layer('type: "PReLU"', [x])
    np.testing.assert_array_equal(layer.blobs[0].data, [0.25, 0.25, 0.25])  # default filler
    layer.blobs[0].data[...] = slopes
    layer.run_forward(bottom, top)
    a = slopes.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(top[0].data, np.maximum(x, 0) + a * np.minimum(x, 0), rtol=1e-14)

    layer, bottom, top = make_layer(
        'type: "PReLU" prelu_param { channel_shared: true filler { type: "constant" value: 0.6 } }', [x])
    assert layer.blobs[0].shape == ()
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, np.where(x > 0, x, f32(0.6) * x), rtol=1e-14)


def test_prelu_two_axes():
    x = randn(4, 3, seed=3)
    text = 'type: "PReLU" prelu_param { filler { type: "constant" value: -0.5 } }'
    layer, bottom, top = make_layer(text, [x])
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, np.where(x > 0, x, -0.5 * x), rtol=1e-14)


def test_prelu_slope_gradient_accumulates():
    x = randn(seed=4)
    dy = randn(seed=5)
    layer, bottom, top = make_layer('type: "PReLU"', [x])
    layer.run_forward(bottom, top)
    top[0].diff_t = torch.tensor(dy)
    layer.blobs[0].diff_t.zero_()
    layer.backward(top, [False], bottom)
    expected = (dy * x * (x <= 0)).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(layer.blobs[0].diff, expected, rtol=1e-12)
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * expected, rtol=1e-12)


def test_power_special_case_gradients():
    x = randn(seed=6)
    dy = randn(seed=7)
    # power 1: dy * scale; scale 0 or power 0: zero gradient.
    text = 'type: "Power" power_param { power: 1 scale: -3 shift: 2 }'
    _, dx, _ = run(text, x, in_place=False, top_diff=dy)
    np.testing.assert_allclose(dx, -3 * dy, rtol=1e-14)
    for text in ('type: "Power" power_param { power: 0 scale: 2 }',
                 'type: "Power" power_param { power: 2 scale: 0 shift: 1 }'):
        _, dx, _ = run(text, x, in_place=False, top_diff=dy)
        np.testing.assert_array_equal(dx, np.zeros_like(x))


def test_dropout_train_masks_and_scales():
    x = np.abs(randn(4, 50, 10, seed=8)) + 0.1
    layer, bottom, top = make_layer('type: "Dropout" dropout_param { dropout_ratio: 0.25 }', [x])
    layer.run_forward(bottom, top)
    y = top[0].data
    dropped = y == 0
    np.testing.assert_allclose(y[~dropped], x[~dropped] / 0.75, rtol=1e-14)
    assert abs(dropped.mean() - 0.25) < 0.03
    dy = randn(*x.shape, seed=9)
    top[0].diff_t = torch.tensor(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, np.where(dropped, 0, dy / 0.75), rtol=1e-14)


def test_dropout_seeded_and_test_phase():
    x = randn(seed=10)
    text = 'type: "Dropout"'
    a = forward_layer(text, [x], seed=3)[0]
    b = forward_layer(text, [x], seed=3)[0]
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a / np.where(x == 0, 1, x)).round(12)) <= {0.0, 2.0}
    (y,) = forward_layer(text, [x], phase=caffe_pb2.TEST)
    np.testing.assert_array_equal(y, x)
    dy = randn(seed=11)
    _, dx, _ = run(text, x, in_place=False, top_diff=dy, phase=caffe_pb2.TEST)
    np.testing.assert_array_equal(dx, dy)
    # ratio 0 keeps everything
    (y,) = forward_layer('type: "Dropout" dropout_param { dropout_ratio: 0 }', [x])
    np.testing.assert_array_equal(y, x)


# --------------------------------------------------------------------------- gradients
GRADIENT_CASES = [
    ('type: "ReLU"', randn(seed=20), dict(kink=0.0, kink_range=1e-2)),
    ('type: "ReLU" relu_param { negative_slope: 0.01 }', randn(seed=21), dict(kink=0.0, kink_range=1e-2)),
    ('type: "Sigmoid"', randn(seed=22), {}),
    ('type: "TanH"', randn(seed=23), {}),
    ('type: "ELU" elu_param { alpha: 0.5 }', randn(seed=24), dict(kink=0.0, kink_range=1e-2)),
    ('type: "AbsVal"', randn(seed=25), dict(kink=0.0, kink_range=1e-2)),
    ('type: "BNLL"', 3 * randn(seed=26), {}),
    ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', randn(seed=27), {}),
    ('type: "Exp" exp_param { shift: -0.5 scale: 0.7 }', randn(seed=28), {}),
    ('type: "Log" log_param { shift: 4 }', randn(seed=29), {}),
    ('type: "Log" log_param { base: 3 scale: 2 shift: 6 }', randn(seed=30), {}),
    ('type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', randn(seed=31), {}),
    ('type: "Power" power_param { power: 3 scale: -2 }', randn(seed=32), dict(kink=0.0, kink_range=1e-2)),
    ('type: "Power" power_param { power: 0.37 scale: 0.5 shift: 3 }', randn(seed=33), {}),
    ('type: "Power" power_param { power: -1.5 scale: 0.25 shift: 2 }', randn(seed=34), {}),
    ('type: "Power" power_param { power: 1 scale: 2.5 shift: -1 }', randn(seed=35), {}),
    ('type: "Clip" clip_param { min: -0.5 max: 0.7 }', away_from(randn(seed=36), [-0.5, 0.7]), {}),
    ('type: "Swish" swish_param { beta: 1.5 }', randn(seed=37), {}),
    ('type: "Swish"', randn(seed=38), {}),
    ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', randn(seed=39), {}),
    ('type: "PReLU" prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } }', randn(seed=40),
     dict(kink=0.0, kink_range=1e-2)),
    ('type: "PReLU" prelu_param { channel_shared: true }', randn(seed=41), dict(kink=0.0, kink_range=1e-2)),
]


@pytest.mark.parametrize("text,x,kw", GRADIENT_CASES, ids=[c[0] for c in GRADIENT_CASES])
def test_gradient(text, x, kw):
    check_gradient(text, [x], **kw)


def test_dropout_gradient_test_phase():
    check_gradient('type: "Dropout"', [randn(seed=42)], phase=caffe_pb2.TEST)


# --------------------------------------------------------------------------- in place
IN_PLACE_CASES = [
    'type: "ReLU"',
    'type: "ReLU" relu_param { negative_slope: 0.2 }',
    'type: "Sigmoid"',
    'type: "TanH"',
    'type: "ELU" elu_param { alpha: 0.7 }',
    'type: "BNLL"',
    'type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }',
    'type: "Log" log_param { base: 10 scale: 2 shift: 6 }',
    'type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }',
    'type: "Power" power_param { power: 3 scale: 2 }',
    'type: "Power" power_param { power: 0.5 scale: 0.5 shift: 3 }',
    'type: "Power"',
    'type: "Clip" clip_param { min: -0.5 max: 0.7 }',
    'type: "Swish" swish_param { beta: 0.8 }',
    'type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
    'type: "PReLU" prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } }',
    'type: "PReLU" prelu_param { channel_shared: true }',
]


@pytest.mark.parametrize("text", IN_PLACE_CASES)
def test_in_place(text):
    assert_in_place_matches(text, randn(seed=50))


def test_in_place_dropout_test_phase():
    assert_in_place_matches('type: "Dropout"', randn(seed=51), phase=caffe_pb2.TEST)


def test_in_place_threshold_forward():
    x = randn(seed=52)
    layer = create_layer(layer_param('type: "Threshold"'), dtype=torch.float64)
    blob = Blob(x.shape, torch.float64)
    blob.data_t = torch.tensor(x)
    layer.setup([blob], [blob])
    layer.run_forward([blob], [blob])
    np.testing.assert_array_equal(blob.data, (x > 0).astype(float))


# --------------------------------------------------------------------------- errors
def setup_error(text, x=None, in_place=False):
    x = randn(seed=60) if x is None else x
    layer = create_layer(layer_param(text), dtype=torch.float64)
    bottom = Blob(x.shape, torch.float64)
    bottom.data_t = torch.tensor(x)
    top = bottom if in_place else Blob((), torch.float64)
    with pytest.raises(LayerError) as info:
        layer.setup([bottom], [top])
    assert "'L'" in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_dropout_bad_ratio(ratio):
    msg = setup_error(f'type: "Dropout" dropout_param {{ dropout_ratio: {ratio} }}')
    assert "Dropout" in msg and "dropout_ratio" in msg


def test_clip_bad_params():
    assert "min" in setup_error('type: "Clip" clip_param { min: 1 max: 0.5 }')
    assert "required" in setup_error('type: "Clip" clip_param { min: 1 }')
    assert "required" in setup_error('type: "Clip"')


def test_clip_equal_bounds_allowed():
    (y,) = forward_layer('type: "Clip" clip_param { min: 0.5 max: 0.5 }', [randn(seed=61)])
    np.testing.assert_array_equal(y, np.full(SHAPE, 0.5))


def test_prelu_bad_params():
    # slope blob with the wrong count for the channels
    p = layer_param('type: "PReLU"')
    p.blobs.add().shape.dim.append(4)
    p.blobs[0].data.extend([0.1] * 4)
    layer = create_layer(p, dtype=torch.float64)
    bottom, top = Blob(SHAPE, torch.float64), Blob((), torch.float64)
    with pytest.raises(LayerError, match=r"PReLU layer 'L'.*inconsistent"):
        layer.setup([bottom], [top])
    # channel_shared with a per-channel blob
    p = layer_param('type: "PReLU" prelu_param { channel_shared: true }')
    p.blobs.add().shape.dim.append(3)
    p.blobs[0].data.extend([0.1] * 3)
    layer = create_layer(p, dtype=torch.float64)
    with pytest.raises(LayerError, match=r"PReLU layer 'L'.*inconsistent"):
        layer.setup([bottom], [top])
    # fewer than 2 axes
    assert "axes" in setup_error('type: "PReLU"', x=randn(5, seed=62))


def test_prelu_channel_change_after_setup():
    layer, bottom, top = make_layer('type: "PReLU"', [randn(seed=63)])
    bottom[0].reshape(2, 4, 2, 2)
    with pytest.raises(LayerError, match=r"PReLU layer 'L'.*channels"):
        layer.reshape(bottom, top)


@pytest.mark.parametrize("kind", ["Exp", "Log"])
@pytest.mark.parametrize("base", [0, -2])
def test_exp_log_bad_base(kind, base):
    msg = setup_error(f'type: "{kind}" {kind.lower()}_param {{ base: {base} }}')
    assert kind in msg and "base" in msg


def test_log_base_one():
    assert "base" in setup_error('type: "Log" log_param { base: 1 }')


def test_absval_in_place_refused():
    assert "in-place" in setup_error('type: "AbsVal"', in_place=True)


def test_threshold_backward_not_implemented():
    layer, bottom, top = make_layer('type: "Threshold"', [randn(seed=64)])
    layer.run_forward(bottom, top)
    layer.backward(top, [False], bottom)  # nothing asked: nothing to do
    with pytest.raises(LayerError, match=r"Threshold layer 'L'.*not implemented"):
        layer.backward(top, [True], bottom)


# --------------------------------------------------------------------------- fork neurons
def test_relu6_forward_gradient_and_boundaries():
    x = away_from(4 * randn(seed=60), (0.0, 6.0))
    (y,) = forward_layer('type: "ReLU6"', [x])
    np.testing.assert_array_equal(y, np.minimum(np.maximum(x, 0), 6))
    check_gradient('type: "ReLU6"', [x])
    check_gradient('type: "ReLU6" relu_param { negative_slope: 0.1 }', [x])
    # the forks' backward: 1 strictly inside (0, 6), the slope at x <= 0, 0 from 6 on
    edges = np.array([[-1.0, 0.0, 3.0, 6.0, 7.0]])
    for slope, expected in ((0, [0, 0, 1, 0, 0]), (0.1, [f32(0.1), f32(0.1), 1, 0, 0])):
        text = f'type: "ReLU6" relu_param {{ negative_slope: {slope} }}'
        for in_place in (False, True):
            y, dx, _ = run(text, edges, in_place=in_place, top_diff=np.ones_like(edges))
            np.testing.assert_allclose(y, np.minimum(np.maximum(edges, 0), 6) + f32(slope) * np.minimum(edges, 0))
            np.testing.assert_allclose(dx, [expected], rtol=1e-7)


def test_dropout_scale_train_false():
    """Faster R-CNN's fork: TRAIN masks without scaling, TEST multiplies by (1 - ratio)."""
    x = randn(4, 50, seed=61)
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.25 scale_train: false }'
    layer, bottom, top = make_layer(text, [x])
    layer.run_forward(bottom, top)
    dropped = top[0].data == 0
    np.testing.assert_array_equal(top[0].data[~dropped], x[~dropped])
    assert abs(dropped.mean() - 0.25) < 0.05
    dy = randn(4, 50, seed=62)
    top[0].diff_t = torch.tensor(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, np.where(dropped, 0, dy))
    factor = f32(1 / f32(1 / 0.75))
    for in_place in (False, True):
        y, dx, _ = run(text, x, in_place=in_place, top_diff=dy, phase=caffe_pb2.TEST)
        np.testing.assert_allclose(y, x * factor, rtol=1e-15)
        np.testing.assert_allclose(dx, dy * factor, rtol=1e-15)
    check_gradient(text, [randn(seed=63)])
    check_gradient(text, [randn(seed=64)], phase=caffe_pb2.TEST)
