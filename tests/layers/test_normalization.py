"""Normalization layers (BatchNorm, Scale, Bias, MVN): forward against numpy, gradient checks,
running statistics, in-place runs, bad params."""
import numpy as np
import pytest
import torch

from recaffe import rng
from recaffe.blob import Blob
from recaffe.gradient_check import check_gradient, forward_layer, layer_param, make_layer
from recaffe.layer import LayerError, create_layer
from recaffe.proto import caffe_pb2


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def f32(v):
    """A float param as the layer sees it (caffe.proto stores float32)."""
    return float(np.float32(v))


def raises_named(text, bottoms, match=None, phase=caffe_pb2.TRAIN):
    with pytest.raises(LayerError) as info:
        forward_layer(text, bottoms, phase=phase)
    assert "'L'" in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)


def run(text, bottoms, top_diff, *, in_place=False, phase=caffe_pb2.TRAIN, blobs=None):
    """Setup (optionally setting the param values), forward, backward on every bottom and param."""
    rng.set_random_seed(1701)  # same filler draws in every run
    layer = create_layer(layer_param(text, phase), dtype=torch.float64)
    bottom = []
    for a in bottoms:
        b = Blob(a.shape, torch.float64)
        b.data_t = torch.tensor(a)
        bottom.append(b)
    top = [bottom[0] if in_place else Blob((), torch.float64)]
    layer.setup(bottom, top)
    for blob, value in zip(layer.blobs, blobs or []):
        blob.data[...] = value
    layer.run_forward(bottom, top)
    y = top[0].data.copy()
    top[0].diff_t = torch.tensor(top_diff)
    for b in layer.blobs:
        b.diff_t.zero_()
    layer.backward(top, [True] * len(bottom), bottom)
    return layer, y, [b.diff.copy() for b in bottom], [b.diff.copy() for b in layer.blobs]


def assert_in_place_matches(text, bottoms, phase=caffe_pb2.TRAIN, blobs=None):
    dy = randn(*bottoms[0].shape, seed=9)
    _, y0, dx0, dp0 = run(text, bottoms, dy, phase=phase, blobs=blobs)
    _, y1, dx1, dp1 = run(text, bottoms, dy, in_place=True, phase=phase, blobs=blobs)
    np.testing.assert_allclose(y1, y0, rtol=0, atol=0)
    for a, b in zip(dx1 + dp1, dx0 + dp0):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- BatchNorm
BN = 'type: "BatchNorm" %s'


def np_batch_norm(x, eps):
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps), mean.reshape(-1), var.reshape(-1)


def test_batch_norm_train_forward_and_running_stats():
    x = randn(4, 3, 2, 2) * 2 + 1
    layer, bottom, top = make_layer(BN % "", [x])
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,)]
    assert not layer.use_global_stats
    layer.run_forward(bottom, top)
    y, mean, var = np_batch_norm(x, f32(1e-5))
    np.testing.assert_allclose(top[0].data, y, rtol=1e-10)
    m = x.size // 3
    np.testing.assert_allclose(layer.blobs[2].data, [1.0])
    np.testing.assert_allclose(layer.blobs[0].data, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].data, var * m / (m - 1), rtol=1e-12)
    # A second forward: blob = maf * blob + stat.
    maf = f32(0.999)
    x2 = randn(4, 3, 2, 2, seed=1)
    bottom[0].data[...] = x2
    layer.run_forward(bottom, top)
    _, mean2, var2 = np_batch_norm(x2, f32(1e-5))
    np.testing.assert_allclose(layer.blobs[2].data, [maf + 1], rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[0].data, maf * mean + mean2, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].data, maf * var * m / (m - 1) + var2 * m / (m - 1),
                               rtol=1e-12)


def test_batch_norm_params_eps_and_2d_bottom():
    x = randn(5, 3)
    text = BN % "batch_norm_param { eps: 0.5 moving_average_fraction: 0.5 }"
    layer, bottom, top = make_layer(text, [x])
    layer.blobs[0].data[...] = [1, 2, 3]
    layer.blobs[2].data[...] = [2]
    layer.run_forward(bottom, top)
    y, mean, _ = np_batch_norm(x, 0.5)
    np.testing.assert_allclose(top[0].data, y, rtol=1e-10)
    np.testing.assert_allclose(layer.blobs[2].data, [2.0])  # 2 * 0.5 + 1
    np.testing.assert_allclose(layer.blobs[0].data, 0.5 * np.array([1, 2, 3]) + mean, rtol=1e-12)


def test_batch_norm_global_stats():
    x = randn(2, 3, 2)
    stats = [np.array([1.0, -2.0, 0.5]), np.array([4.0, 1.0, 9.0]), np.array([2.0])]
    for text, phase in ((BN % "", caffe_pb2.TEST),
                        (BN % "batch_norm_param { use_global_stats: true }", caffe_pb2.TRAIN)):
        layer, y, _, _ = run(text, [x], np.zeros_like(x), phase=phase, blobs=stats)
        assert layer.use_global_stats
        mean, var = stats[0] / 2, stats[1] / 2
        expect = (x - mean[None, :, None]) / np.sqrt(var[None, :, None] + f32(1e-5))
        np.testing.assert_allclose(y, expect, rtol=1e-10)
        np.testing.assert_allclose(layer.blobs[0].data, stats[0])  # untouched
    # A zero scale factor makes the statistics zero (no division by zero).
    layer, y, _, _ = run(BN % "", [x], np.zeros_like(x), phase=caffe_pb2.TEST,
                         blobs=[stats[0], stats[1], np.array([0.0])])
    np.testing.assert_allclose(y, x / np.sqrt(f32(1e-5)), rtol=1e-10)


def test_batch_norm_backward_formulas():
    x, dy = randn(3, 2, 2), randn(3, 2, 2, seed=1)
    _, y, (dx,), dparams = run(BN % "", [x], dy)
    axes = (0, 2)
    std = np.sqrt(x.var(axis=axes, keepdims=True) + f32(1e-5))
    expect = (dy - dy.mean(axis=axes, keepdims=True)
              - (dy * y).mean(axis=axes, keepdims=True) * y) / std
    np.testing.assert_allclose(dx, expect, rtol=1e-9)
    for d in dparams:  # the statistics get no gradient
        assert not d.any()


def test_batch_norm_gradient():
    check_gradient(BN % "", [randn(3, 2, 2, 2)], check_params=False)
    check_gradient(BN % "batch_norm_param { eps: 0.1 }", [randn(4, 3)], check_params=False)

    def set_stats(layer):
        layer.blobs[0].data[...] = [0.5, -1.0]
        layer.blobs[1].data[...] = [2.0, 3.0]
        layer.blobs[2].data[...] = [1.5]

    check_gradient(BN % "", [randn(2, 2, 3)], check_params=False, phase=caffe_pb2.TEST,
                   layer_setup_hook=set_stats)


def test_batch_norm_in_place():
    assert_in_place_matches(BN % "", [randn(3, 2, 2)])
    assert_in_place_matches(BN % "", [randn(3, 2, 2)], phase=caffe_pb2.TEST,
                            blobs=[np.array([1.0, 2.0]), np.array([3.0, 1.0]), np.array([1.0])])


def test_batch_norm_masks_statistics_from_the_solver():
    layer, _, _ = make_layer(BN % "", [randn(2, 3)])
    assert [p.lr_mult for p in layer.layer_param.param] == [0, 0, 0]
    assert layer.param_propagate_down == [False, False, False]
    layer, _, _ = make_layer(BN % "param { lr_mult: 0 decay_mult: 0 }", [randn(2, 3)])
    assert [p.lr_mult for p in layer.layer_param.param] == [0, 0, 0]


# NVCaffe's BatchNorm (any of scale_bias, scale_filler, bias_filler, engine): moving averages,
# biased variance, eps >= 1e-5, optional learned scale and bias (NVCaffe's batch_norm_layer.cpp).
NV_BN = BN % "batch_norm_param { scale_bias: true moving_average_fraction: 0.75 eps: 1e-6 %s }"


def test_nvcaffe_batch_norm_forward_statistics_and_scale_bias():
    x = randn(4, 3, 2, 2) * 2 + 1
    text = NV_BN % 'scale_filler { type: "constant" value: 1.5 } bias_filler { type: "constant" value: -0.25 }'
    layer, bottom, top = make_layer(text, [x])
    assert layer.nvcaffe and layer.scale_bias
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,), (3,), (3,)]
    assert layer.eps == 1e-5  # at least 1e-5, as NVCaffe
    layer.run_forward(bottom, top)
    y, mean, var = np_batch_norm(x, 1e-5)
    np.testing.assert_allclose(top[0].data, 1.5 * y - 0.25, rtol=1e-10)
    # the first two forwards copy the batch statistics (biased variance); blob2 stays 1
    np.testing.assert_allclose(layer.blobs[0].data, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].data, var, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[2].data, [1.0])
    x2, x3 = randn(4, 3, 2, 2, seed=1), randn(4, 3, 2, 2, seed=2)
    for xi in (x2, x3):
        bottom[0].data[...] = xi
        layer.run_forward(bottom, top)
    _, mean2, var2 = np_batch_norm(x2, 1e-5)
    _, mean3, var3 = np_batch_norm(x3, 1e-5)
    maf = f32(0.75)
    np.testing.assert_allclose(layer.blobs[0].data, maf * mean2 + (1 - maf) * mean3, rtol=1e-12)
    np.testing.assert_allclose(layer.blobs[1].data, maf * var2 + (1 - maf) * var3, rtol=1e-12)


def test_nvcaffe_batch_norm_global_stats_use_the_blobs_as_they_are():
    x = randn(2, 2, 3)
    layer, bottom, top = make_layer(NV_BN % "", [x], phase=caffe_pb2.TEST)
    layer.blobs[0].data[...] = [0.5, -1.0]
    layer.blobs[1].data[...] = [2.0, 3.0]
    layer.blobs[2].data[...] = [7.0]  # NVCaffe does not divide by it
    layer.blobs[3].data[...] = [2.0, 0.5]
    layer.blobs[4].data[...] = [1.0, 0.0]
    layer.run_forward(bottom, top)
    mean, var = np.array([0.5, -1.0])[None, :, None], np.array([2.0, 3.0])[None, :, None]
    expected = (x - mean) / np.sqrt(var + 1e-5) * np.array([2.0, 0.5])[None, :, None] + \
        np.array([1.0, 0.0])[None, :, None]
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-10)


def test_nvcaffe_batch_norm_forces_its_learning_rates():
    layer, _, _ = make_layer(NV_BN % "" + " param { lr_mult: 3 } param { lr_mult: 2 }", [randn(2, 3)])
    assert [(p.lr_mult, p.decay_mult) for p in layer.layer_param.param] == [(0, 0)] * 3 + [(1, 1)] * 2
    assert layer.param_propagate_down == [False, False, False, True, True]
    plain = make_layer(BN % "batch_norm_param { engine: CUDNN }", [randn(2, 3)])[0]
    assert plain.nvcaffe and not plain.scale_bias and len(plain.blobs) == 3
    filler = make_layer(BN % 'batch_norm_param { bias_filler { type: "constant" value: 2 } }', [randn(2, 3)])[0]
    assert filler.scale_bias and filler.blobs[3].data.tolist() == [1, 1, 1] and filler.blobs[4].data.tolist() == [2, 2, 2]


def test_nvcaffe_batch_norm_gradient():
    text = NV_BN % 'scale_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 }'
    check_gradient(text, [randn(3, 2, 2, 2)])  # bottom, scale and bias (statistics: no gradient)

    def set_stats(layer):
        layer.blobs[0].data[...] = [0.5, -1.0]
        layer.blobs[1].data[...] = [2.0, 3.0]

    check_gradient(text, [randn(2, 2, 3)], check_params=False, phase=caffe_pb2.TEST,
                   layer_setup_hook=set_stats)


def test_nvcaffe_batch_norm_in_place():
    assert_in_place_matches(NV_BN % 'scale_filler { type: "gaussian" std: 1 }', [randn(3, 2, 2)])


def test_batch_norm_errors():
    raises_named(BN % "param { lr_mult: 0 } param { lr_mult: 1 }", [randn(2, 3)],
                 match="Cannot configure batch normalization statistics")
    layer, bottom, top = make_layer(BN % "", [randn(2, 3)])
    bottom[0].reshape(2, 4)
    with pytest.raises(LayerError, match="'L'.*channels"):
        layer.reshape(bottom, top)


# ----------------------------------------------------------------------------------- Scale
SCALE = 'type: "Scale" scale_param { %s }'


@pytest.mark.parametrize("param,shape,view", [
    ("", (3,), (1, 3, 1, 1)),
    ("axis: 1 num_axes: -1", (3, 2, 2), (1, 3, 2, 2)),
    ("axis: 0 num_axes: 2", (2, 3), (2, 3, 1, 1)),
    ("axis: -1", (2,), (1, 1, 1, 2)),
    ("num_axes: 0", (), ()),
])
def test_scale_one_bottom_forward(param, shape, view):
    x = randn(2, 3, 2, 2)
    text = SCALE % (param + ' filler { type: "gaussian" }')
    layer, bottom, top = make_layer(text, [x])
    assert layer.blobs[0].shape == shape
    layer.run_forward(bottom, top)
    s = layer.blobs[0].data.reshape(view) if view else layer.blobs[0].data
    np.testing.assert_allclose(top[0].data, x * s, rtol=1e-14)


def test_scale_defaults_to_identity_and_bias():
    x = randn(2, 3, 2)
    layer, bottom, top = make_layer(SCALE % "", [x])
    assert len(layer.blobs) == 1
    np.testing.assert_array_equal(layer.blobs[0].data, [1, 1, 1])
    text = SCALE % 'bias_term: true filler { type: "gaussian" } bias_filler { type: "constant" value: 0.5 }'
    layer, bottom, top = make_layer(text, [x])
    assert [b.shape for b in layer.blobs] == [(3,), (3,)]
    np.testing.assert_array_equal(layer.blobs[1].data, [0.5] * 3)
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, x * layer.blobs[0].data[None, :, None] + 0.5, rtol=1e-14)


def test_scale_two_bottoms():
    x, s = randn(2, 3, 2, 2), randn(3, 2, seed=1)
    y = forward_layer(SCALE % "", [x, s])[0]
    np.testing.assert_allclose(y, x * s[None, :, :, None], rtol=1e-14)
    text = SCALE % 'bias_term: true bias_filler { type: "gaussian" }'
    layer, bottom, top = make_layer(text, [x, s])
    assert [b.shape for b in layer.blobs] == [(3, 2)]  # only the bias is a param
    layer.run_forward(bottom, top)
    b = layer.blobs[0].data
    np.testing.assert_allclose(top[0].data, x * s[None, :, :, None] + b[None, :, :, None], rtol=1e-14)
    y = forward_layer(SCALE % "axis: 0", [x, np.array(2.5)])[0]  # a scalar scale ignores the axis
    np.testing.assert_allclose(y, 2.5 * x, rtol=1e-14)


def test_scale_backward_formulas():
    x, dy = randn(2, 3, 2), randn(2, 3, 2, seed=1)
    s = np.array([0.5, -1.0, 2.0])
    _, _, (dx,), (ds, db) = run(SCALE % "bias_term: true", [x], dy, blobs=[s, np.zeros(3)])
    np.testing.assert_allclose(dx, dy * s[None, :, None], rtol=1e-14)
    np.testing.assert_allclose(ds, (dy * x).sum(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2)), rtol=1e-12)


@pytest.mark.parametrize("param", ['bias_term: true filler { type: "gaussian" } '
                                   'bias_filler { type: "gaussian" }',
                                   'axis: 0 num_axes: -1 filler { type: "gaussian" }',
                                   'num_axes: 0 bias_term: true filler { type: "gaussian" }',
                                   'axis: 2 filler { type: "gaussian" }'])
def test_scale_gradient_one_bottom(param):
    check_gradient(SCALE % param, [randn(2, 3, 2)])


def test_scale_gradient_two_bottoms():
    check_gradient(SCALE % 'bias_term: true bias_filler { type: "gaussian" }',
                   [randn(2, 3, 2), randn(3, seed=1)])
    check_gradient(SCALE % "axis: 0", [randn(2, 3), randn(2, 3, seed=1)])
    check_gradient(SCALE % "", [randn(2, 3), randn(seed=1)])


def test_scale_in_place():
    text = SCALE % 'bias_term: true filler { type: "gaussian" } bias_filler { type: "gaussian" }'
    assert_in_place_matches(text, [randn(2, 3, 2)])
    assert_in_place_matches(SCALE % "", [randn(2, 3, 2), randn(3, seed=1)])


def test_scale_errors():
    x = randn(2, 3, 2)
    raises_named(SCALE % "num_axes: -2", [x], match="num_axes")
    raises_named(SCALE % "axis: 2 num_axes: 2", [x], match="extends past")
    raises_named(SCALE % "axis: 3", [x], match="axis")
    raises_named(SCALE % "", [x, randn(2)], match="mismatch")
    raises_named(SCALE % "axis: 2", [x, randn(2, 2)], match="extends past")


# ------------------------------------------------------------------------------------ Bias
BIAS = 'type: "Bias" bias_param { %s }'


def test_bias_forward():
    x = randn(2, 3, 2)
    layer, bottom, top = make_layer(BIAS % "", [x])
    assert layer.blobs[0].shape == (3,) and not layer.blobs[0].data.any()  # default constant 0
    layer, bottom, top = make_layer(BIAS % 'axis: 1 num_axes: -1 filler { type: "gaussian" }', [x])
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, x + layer.blobs[0].data[None], rtol=1e-14)
    b = randn(2, 3, seed=1)
    y = forward_layer(BIAS % "axis: 0", [x, b])[0]
    np.testing.assert_allclose(y, x + b[:, :, None], rtol=1e-14)


def test_bias_backward_and_gradient():
    x, dy = randn(2, 3, 2), randn(2, 3, 2, seed=1)
    _, _, (dx,), (db,) = run(BIAS % "", [x], dy)
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2)), rtol=1e-12)
    _, _, (dx, db2), _ = run(BIAS % "axis: -1", [x, randn(2, seed=2)], dy)
    np.testing.assert_allclose(db2, dy.sum(axis=(0, 1)), rtol=1e-12)
    check_gradient(BIAS % 'filler { type: "gaussian" }', [randn(2, 3, 2)])
    check_gradient(BIAS % "num_axes: 0", [randn(2, 3)])
    check_gradient(BIAS % "", [randn(2, 3, 2), randn(3, seed=1)])
    assert_in_place_matches(BIAS % 'filler { type: "gaussian" }', [randn(2, 3, 2)])


def test_bias_errors():
    x = randn(2, 3)
    raises_named(BIAS % "num_axes: -3", [x], match="num_axes")
    raises_named(BIAS % "num_axes: 2", [x], match="extends past")
    raises_named(BIAS % "", [x, randn(4)], match="mismatch")


# ------------------------------------------------------------------------------------- MVN
def np_mvn(x, across=False, variance=True, eps=1e-9):
    rows = x.reshape(x.shape[0], -1) if across else x.reshape(x.shape[0] * x.shape[1], -1)
    y = rows - rows.mean(axis=1, keepdims=True)
    if variance:
        y = y / (np.sqrt((y ** 2).mean(axis=1, keepdims=True)) + eps)
    return y.reshape(x.shape)


@pytest.mark.parametrize("param,kw", [("", {}), ("across_channels: true", {"across": True}),
                                      ("normalize_variance: false", {"variance": False}),
                                      ("eps: 0.5", {"eps": f32(0.5)})])
def test_mvn_forward(param, kw):
    x = randn(2, 3, 2, 2) * 3 + 1
    y = forward_layer(f'type: "MVN" mvn_param {{ {param} }}', [x])[0]
    np.testing.assert_allclose(y, np_mvn(x, **kw), rtol=1e-10)


def test_mvn_eps_goes_on_the_std():
    x = np.array([[[0.0, 2.0]]])  # mean 1, std 1
    y = forward_layer('type: "MVN" mvn_param { eps: 1 }', [x])[0]
    np.testing.assert_allclose(y.reshape(-1), [-0.5, 0.5])  # /(std + eps), not /sqrt(var + eps)


def test_mvn_top_takes_the_legacy_4d_shape():
    x = randn(2, 3, 4)
    y = forward_layer('type: "MVN"', [x])[0]
    assert y.shape == (2, 3, 4, 1)
    np.testing.assert_allclose(y.reshape(x.shape), np_mvn(x[..., None]).reshape(x.shape), rtol=1e-10)


@pytest.mark.parametrize("param", ["", "across_channels: true", "normalize_variance: false",
                                   "normalize_variance: false across_channels: true"])
def test_mvn_gradient(param):
    check_gradient(f'type: "MVN" mvn_param {{ {param} }}', [randn(2, 2, 3)])


def test_mvn_in_place_and_errors():
    assert_in_place_matches('type: "MVN"', [randn(2, 2, 2, 2)])
    raises_named('type: "MVN"', [randn(1, 1, 1, 2, 2)], match="4 axes")


def test_nvcaffe_batch_norm_exports(tmp_path):
    """The learned scale and bias fold into the exported normalization (ONNX and torch)."""
    pytest.importorskip("onnxruntime")
    from helpers import make_net
    from recaffe.export.onnx_export import export_onnx
    from recaffe.export.torch_export import export_torch, load_torch_module
    import onnxruntime
    net = make_net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n'
                   'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" batch_norm_param { scale_bias: true '
                   'scale_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }',
                   caffe_pb2.TEST)
    bn = net.layer_by_name("bn")
    bn.blobs[0].data[...] = [0.5, -1.0, 0.0]
    bn.blobs[1].data[...] = [2.0, 3.0, 0.5]
    x = randn(2, 3, 4, 4).astype("f4")
    ref = net.forward(x=x)["y"].copy()
    path = str(tmp_path / "bn.onnx")
    export_onnx(net, path)
    out = onnxruntime.InferenceSession(path).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    module = load_torch_module(export_torch(net, str(tmp_path / "m"))[0])
    with torch.no_grad():
        y = module(torch.from_numpy(x))
    y = y[0] if isinstance(y, tuple) else y
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)
