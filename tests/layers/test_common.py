"""Common (routing/shape) layers: forward against numpy, gradient checks, bad params."""
import numpy as np
import pytest
import torch

from recaffe.blob import Blob
from recaffe.gradient_check import check_gradient, forward_layer, layer_param, make_layer
from recaffe.layer import LayerError, create_layer


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def raises_named(text, bottoms, num_tops=1, match=None):
    """Setting up and running the layer named L raises a LayerError naming it."""
    with pytest.raises(LayerError) as info:
        forward_layer(text, bottoms, num_tops=num_tops)
    assert "'L'" in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    return str(info.value)


def forward_backward(text, bottoms, top_diffs, num_tops=1, propagate=None):
    """Forward then backward with the given top diffs; returns (tops, bottom diffs, param diffs)."""
    layer, bottom, top = make_layer(text, bottoms, num_tops)
    layer.run_forward(bottom, top)
    tops = [t.data.copy() for t in top]
    for t, d in zip(top, top_diffs):
        t.diff_t = torch.tensor(d)
    for b in layer.blobs:
        b.diff_t.zero_()
    layer.backward(top, propagate or [True] * len(bottom), bottom)
    return tops, [b.diff.copy() for b in bottom], [b.diff.copy() for b in layer.blobs]


# ------------------------------------------------------------------------------ InnerProduct
IP = 'type: "InnerProduct" inner_product_param { num_output: 3 weight_filler { type: "gaussian" } ' \
     'bias_filler { type: "gaussian" } %s }'


def test_inner_product_forward_axis_and_transpose():
    x = randn(2, 3, 4)
    for extra, k_shape in (("", 12), ("axis: 2", 4), ("axis: -1 transpose: true", 4)):
        layer, bottom, top = make_layer(IP % extra, [x])
        layer.run_forward(bottom, top)
        w, b = layer.blobs[0].data, layer.blobs[1].data
        axis = 1 if not extra else 2
        rows = x.reshape(int(np.prod(x.shape[:axis])), k_shape)
        wt = w if "transpose" in extra else w.T
        expect = (rows @ wt + b).reshape(x.shape[:axis] + (3,))
        np.testing.assert_allclose(top[0].data, expect, rtol=1e-12)
    y = forward_layer(IP % "bias_term: false", [x])[0]
    layer, _, _ = make_layer(IP % "bias_term: false", [x])
    assert len(layer.blobs) == 1
    np.testing.assert_allclose(y, x.reshape(2, 12) @ layer.blobs[0].data.T, rtol=1e-12)


@pytest.mark.parametrize("extra", ["", "axis: 2 transpose: true"])
def test_inner_product_gradient(extra):
    check_gradient(IP % extra, [randn(2, 2, 3)])


def test_inner_product_errors():
    layer, bottom, top = make_layer(IP % "", [randn(2, 3)])
    bottom[0].reshape(2, 4)
    with pytest.raises(LayerError, match="'L'.*incompatible"):
        layer.reshape(bottom, top)
    raises_named(IP % "axis: 3", [randn(2, 3)], match="axis")


# ---------------------------------------------------------------------------------- Split
def test_split_forward_and_backward_sum():
    x = randn(2, 3)
    d0, d1, d2 = randn(2, 3, seed=1), randn(2, 3, seed=2), randn(2, 3, seed=3)
    tops, dx, _ = forward_backward('type: "Split"', [x], [d0, d1, d2], num_tops=3)
    for t in tops:
        np.testing.assert_array_equal(t, x)
    np.testing.assert_allclose(dx[0], d0 + d1 + d2, rtol=1e-14)
    check_gradient('type: "Split"', [randn(2, 2)], num_tops=2)


def test_split_needs_a_top():
    raises_named('type: "Split"', [randn(2)], num_tops=0)


# --------------------------------------------------------------------------------- Concat
@pytest.mark.parametrize("param,axis", [("", 1), ("concat_param { axis: 0 }", 0),
                                        ("concat_param { axis: -1 }", 2),
                                        ("concat_param { concat_dim: 2 }", 2)])
def test_concat_forward(param, axis):
    a = randn(2, 3, 4)
    shape_b = list(a.shape)
    shape_b[axis] = 2
    b = randn(*shape_b, seed=1)
    y = forward_layer(f'type: "Concat" {param}', [a, b])[0]
    np.testing.assert_array_equal(y, np.concatenate([a, b], axis=axis))


def test_concat_backward_splits_the_diff():
    a, b = randn(2, 1, 2), randn(2, 3, 2, seed=1)
    dy = randn(2, 4, 2, seed=2)
    _, (da, db), _ = forward_backward('type: "Concat"', [a, b], [dy])
    np.testing.assert_array_equal(da, dy[:, :1])
    np.testing.assert_array_equal(db, dy[:, 1:])
    check_gradient('type: "Concat" concat_param { axis: 2 }', [randn(2, 2, 1), randn(2, 2, 2, seed=1)])


def test_concat_single_bottom_passes_through():
    x = randn(2, 3)
    tops, (dx,), _ = forward_backward('type: "Concat"', [x], [x * 2])
    np.testing.assert_array_equal(tops[0], x)
    np.testing.assert_array_equal(dx, x * 2)


def test_concat_errors():
    msg = raises_named('type: "Concat"', [randn(2, 3, 4), randn(2, 3, 5)], match="(2, 3, 5)")
    assert "(2, 3, 4)" in msg
    raises_named('type: "Concat"', [randn(2, 3), randn(2, 3, 1)], match="#axes")
    raises_named('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [randn(2, 3), randn(2, 3)],
                 match="not both")
    raises_named('type: "Concat" concat_param { concat_dim: 2 }', [randn(2, 3), randn(2, 3)],
                 match="out of range")
    raises_named('type: "Concat" concat_param { axis: 2 }', [randn(2, 3), randn(2, 3)], match="axis")


# -------------------------------------------------------------------------------- Flatten
@pytest.mark.parametrize("param,shape", [("", (2, 24)), ("flatten_param { axis: 2 }", (2, 3, 8)),
                                         ("flatten_param { axis: 0 end_axis: 1 }", (6, 2, 4)),
                                         ("flatten_param { axis: -3 end_axis: -2 }", (2, 6, 4))])
def test_flatten_forward(param, shape):
    x = randn(2, 3, 2, 4)
    y = forward_layer(f'type: "Flatten" {param}', [x])[0]
    np.testing.assert_array_equal(y, x.reshape(shape))


def test_flatten_aliases_bottom_and_gradient():
    x = randn(2, 3, 2)
    layer, bottom, top = make_layer('type: "Flatten"', [x])
    layer.run_forward(bottom, top)
    bottom[0].data[0, 0, 0] = 42.0
    assert top[0].data[0, 0] == 42.0
    check_gradient('type: "Flatten"', [randn(2, 2, 2)])


def test_flatten_errors():
    raises_named('type: "Flatten" flatten_param { axis: 4 }', [randn(2, 3)], match="axis")
    layer = create_layer(layer_param('type: "Flatten"'), dtype=torch.float64)
    b = Blob((2, 3), torch.float64)
    with pytest.raises(LayerError, match="'L'.*in-place"):
        layer.setup([b], [b])


# -------------------------------------------------------------------------------- Reshape
@pytest.mark.parametrize("param,shape", [
    ("shape { dim: 0 dim: -1 dim: 2 }", (2, 6, 2)),
    ("shape { dim: -1 }", (24,)),
    ("shape { dim: 4 dim: 0 dim: 2 dim: 1 }", (4, 3, 2, 1)),
    ("axis: 1 num_axes: 1 shape { dim: 3 dim: 1 }", (2, 3, 1, 4)),
    ("axis: -1 shape { dim: 1 dim: 1 }", (2, 3, 4, 1, 1)),
    ("axis: 0 num_axes: 0 shape { dim: 1 }", (1, 2, 3, 4)),
    ("axis: 1 num_axes: 2 shape { dim: -1 }", (2, 12)),
])
def test_reshape_forward(param, shape):
    x = randn(2, 3, 4)
    y = forward_layer(f'type: "Reshape" reshape_param {{ {param} }}', [x])[0]
    np.testing.assert_array_equal(y, x.reshape(shape))


def test_reshape_shares_data_and_gradient():
    x = randn(2, 3, 4)
    layer, bottom, top = make_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [x])
    bottom[0].data[1, 2, 3] = 7.0  # aliased right after setup, as Caffe's ShareData in Reshape
    assert top[0].data[1, 11] == 7.0
    layer.run_forward(bottom, top)
    bottom[0].data[0, 0, 0] = -3.0
    assert top[0].data[0, 0] == -3.0
    check_gradient('type: "Reshape" reshape_param { shape { dim: -1 } }', [randn(2, 3)])


def test_reshape_errors():
    raises_named('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [randn(2, 3)],
                 match="-1")
    raises_named('type: "Reshape" reshape_param { shape { dim: 5 } }', [randn(2, 3)], match="count")
    raises_named('type: "Reshape" reshape_param { shape { dim: 4 dim: -1 } }', [randn(2, 3)],
                 match="divisible")
    raises_named('type: "Reshape" reshape_param { shape { dim: 0 dim: 0 dim: 0 } }', [randn(2, 3)],
                 match="no corresponding bottom axis")
    raises_named('type: "Reshape" reshape_param { axis: 3 shape { dim: 1 } }', [randn(2, 3)],
                 match="out of range")
    raises_named('type: "Reshape" reshape_param { num_axes: 3 shape { dim: 6 } }', [randn(2, 3)],
                 match="out of range")


# -------------------------------------------------------------------------------- Softmax
def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("param,axis", [("", 1), ("softmax_param { axis: 2 }", 2),
                                        ("softmax_param { axis: -3 }", 0)])
def test_softmax_forward(param, axis):
    x = randn(2, 3, 4) * 3
    y = forward_layer(f'type: "Softmax" {param}', [x])[0]
    np.testing.assert_allclose(y, np_softmax(x, axis), rtol=1e-12)


def test_softmax_is_stable_and_gradient():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]])
    y = forward_layer('type: "Softmax"', [x])[0]
    np.testing.assert_allclose(y, np_softmax(x, 1), rtol=1e-12)
    check_gradient('type: "Softmax" softmax_param { axis: 2 }', [randn(2, 2, 3)])


def test_softmax_errors():
    raises_named('type: "Softmax" softmax_param { axis: 2 }', [randn(2, 3)], match="axis")


# ---------------------------------------------------------------------------------- Slice
def test_slice_points_and_legacy_slice_dim():
    x = randn(2, 5, 3)
    tops = forward_layer('type: "Slice" slice_param { axis: 1 slice_point: 1 slice_point: 3 }', [x],
                         num_tops=3)
    for t, e in zip(tops, np.split(x, [1, 3], axis=1)):
        np.testing.assert_array_equal(t, e)
    tops = forward_layer('type: "Slice" slice_param { slice_dim: 2 slice_point: 2 }', [x], num_tops=2)
    for t, e in zip(tops, np.split(x, [2], axis=2)):
        np.testing.assert_array_equal(t, e)
    tops = forward_layer('type: "Slice" slice_param { axis: 0 }', [x], num_tops=2)
    for t, e in zip(tops, np.split(x, 2, axis=0)):
        np.testing.assert_array_equal(t, e)


def test_slice_backward_and_gradient():
    x = randn(2, 4)
    d0, d1 = randn(2, 1, seed=1), randn(2, 3, seed=2)
    _, (dx,), _ = forward_backward('type: "Slice" slice_param { slice_point: 1 }', [x], [d0, d1],
                                   num_tops=2)
    np.testing.assert_array_equal(dx, np.concatenate([d0, d1], axis=1))
    check_gradient('type: "Slice" slice_param { axis: -1 }', [randn(2, 2, 4)], num_tops=2)
    check_gradient('type: "Slice"', [randn(2, 2)], num_tops=1)


def test_slice_errors():
    x = randn(2, 5)
    raises_named('type: "Slice" slice_param { slice_point: 3 slice_point: 2 }', [x], num_tops=3,
                 match="increasing")
    raises_named('type: "Slice" slice_param { slice_point: 0 }', [x], num_tops=2, match="increasing")
    raises_named('type: "Slice" slice_param { slice_point: 6 }', [x], num_tops=2, match="out of range")
    raises_named('type: "Slice" slice_param { slice_point: 2 }', [x], num_tops=3, match="slice_point")
    raises_named('type: "Slice"', [x], num_tops=2, match="evenly divide")
    raises_named('type: "Slice" slice_param { slice_dim: 2 }', [x], num_tops=1, match="out of range")


# ----------------------------------------------------------------------------------- Tile
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_tile_forward(axis):
    x = randn(2, 3, 2)
    reps = [1, 1, 1]
    reps[axis] = 3
    y = forward_layer(f'type: "Tile" tile_param {{ axis: {axis} tiles: 3 }}', [x])[0]
    np.testing.assert_array_equal(y, np.tile(x, reps))


def test_tile_gradient_and_errors():
    check_gradient('type: "Tile" tile_param { tiles: 2 }', [randn(2, 2, 2)])
    raises_named('type: "Tile"', [randn(2, 3)], match="tiles must be specified")
    raises_named('type: "Tile" tile_param { tiles: 0 }', [randn(2, 3)], match="positive")
    raises_named('type: "Tile" tile_param { axis: 2 tiles: 2 }', [randn(2, 3)], match="axis")


# -------------------------------------------------------------------------------- Eltwise
def test_eltwise_forward():
    a, b, c = randn(2, 3), randn(2, 3, seed=1), randn(2, 3, seed=2)
    y = forward_layer('type: "Eltwise" eltwise_param { operation: PROD }', [a, b, c])[0]
    np.testing.assert_allclose(y, a * b * c, rtol=1e-14)
    y = forward_layer('type: "Eltwise"', [a, b])[0]
    np.testing.assert_allclose(y, a + b, rtol=1e-14)
    y = forward_layer('type: "Eltwise" eltwise_param { coeff: 1.5 coeff: -0.5 coeff: 2 }', [a, b, c])[0]
    np.testing.assert_allclose(y, 1.5 * a - 0.5 * b + 2 * c, rtol=1e-14)
    y = forward_layer('type: "Eltwise" eltwise_param { operation: MAX }', [a, b, c])[0]
    np.testing.assert_array_equal(y, np.maximum(np.maximum(a, b), c))


def test_eltwise_backward_formulas():
    a, b, c = randn(2, 3), randn(2, 3, seed=1), randn(2, 3, seed=2)
    dy = randn(2, 3, seed=3)
    _, (da, db, dc), _ = forward_backward('type: "Eltwise" eltwise_param { operation: PROD }',
                                          [a, b, c], [dy])
    np.testing.assert_allclose(da, dy * b * c, rtol=1e-12)
    np.testing.assert_allclose(dc, dy * a * b, rtol=1e-12)
    _, (da, db, dc), _ = forward_backward(
        'type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }', [a, b, c], [dy])
    np.testing.assert_allclose(db, dy * (a * b * c) / b, rtol=1e-12)
    _, (da, db), _ = forward_backward('type: "Eltwise" eltwise_param { coeff: 3 coeff: -1 }', [a, b], [dy])
    np.testing.assert_allclose(da, 3 * dy, rtol=1e-14)
    np.testing.assert_allclose(db, -dy, rtol=1e-14)


def test_eltwise_max_ties_and_backward():
    # Ties between bottoms 0 and 1 go to bottom 1; a later bottom must be strictly greater.
    a = np.array([[1.0, 2.0, 3.0, 0.0]])
    b = np.array([[1.0, 1.0, 4.0, 0.0]])
    c = np.array([[1.0, 0.0, 4.0, 5.0]])
    dy = np.array([[10.0, 20.0, 30.0, 40.0]])
    tops, (da, db, dc), _ = forward_backward('type: "Eltwise" eltwise_param { operation: MAX }',
                                             [a, b, c], [dy])
    np.testing.assert_array_equal(tops[0], [[1, 2, 4, 5]])
    np.testing.assert_array_equal(da, [[0, 20, 0, 0]])
    np.testing.assert_array_equal(db, [[10, 0, 30, 0]])
    np.testing.assert_array_equal(dc, [[0, 0, 0, 40]])


@pytest.mark.parametrize("param", ["operation: PROD", "operation: PROD stable_prod_grad: false",
                                   "operation: SUM coeff: 0.5 coeff: -2 coeff: 1",
                                   "operation: MAX"])
def test_eltwise_gradient(param):
    rs = np.random.default_rng(5)
    # Distinct values (for MAX, no near-ties) away from zero.
    xs = [(rs.permutation(12).reshape(2, 3, 2) + 1.0 + 0.3 * i) * rs.choice([-1, 1], (2, 3, 2))
          for i in range(3)]
    check_gradient(f'type: "Eltwise" eltwise_param {{ {param} }}', xs)


def test_eltwise_errors():
    a = randn(2, 3)
    msg = raises_named('type: "Eltwise"', [a, randn(3, 2)], match="(3, 2)")
    assert "(2, 3)" in msg
    raises_named('type: "Eltwise" eltwise_param { coeff: 1 }', [a, a], match="one coefficient per bottom")
    raises_named('type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }', [a, a],
                 match="summation")
    raises_named('type: "Eltwise"', [a], match="at least 2")


# --------------------------------------------------------------------------- BatchReindex
def test_batch_reindex_forward_backward_and_gradient():
    x = randn(3, 2, 2)
    idx = np.array([2.0, 0.0, 2.0, 1.0])
    dy = randn(4, 2, 2, seed=1)
    tops, (dx, _), _ = forward_backward('type: "BatchReindex"', [x, idx], [dy], propagate=[True, False])
    np.testing.assert_array_equal(tops[0], x[[2, 0, 2, 1]])
    np.testing.assert_allclose(dx, np.stack([dy[1], dy[3], dy[0] + dy[2]]), rtol=1e-14)
    check_gradient('type: "BatchReindex"', [randn(3, 2), np.array([1.0, 1.0, 0.0])], check_bottoms=[0])


def test_batch_reindex_errors():
    raises_named('type: "BatchReindex"', [randn(3, 2), np.array([0.0, 3.0])], match="out of range")
    raises_named('type: "BatchReindex"', [randn(3, 2), np.array([-1.0])], match="out of range")
    raises_named('type: "BatchReindex"', [randn(3, 2), np.zeros((2, 1))], match="1-D")
    layer, bottom, top = make_layer('type: "BatchReindex"', [randn(3, 2), np.array([0.0])])
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="'L'.*index"):
        layer.backward(top, [True, True], bottom)
    assert not layer.allow_force_backward(1)


# --------------------------------------------------------------------------------- Filter
def test_filter_forward_backward_and_gradient():
    x, z = randn(4, 3), randn(4, 2, 2, seed=1)
    sel = np.array([[0.0], [1.0], [0.0], [2.0]])
    dy0, dy1 = randn(2, 3, seed=2), randn(2, 2, 2, seed=3)
    tops, (dx, dz, _), _ = forward_backward('type: "Filter"', [x, z, sel], [dy0, dy1], num_tops=2,
                                            propagate=[True, True, False])
    np.testing.assert_array_equal(tops[0], x[[1, 3]])
    np.testing.assert_array_equal(tops[1], z[[1, 3]])
    np.testing.assert_array_equal(dx, [np.zeros(3), dy0[0], np.zeros(3), dy0[1]])
    np.testing.assert_array_equal(dz[[1, 3]], dy1)
    assert not dz[[0, 2]].any()
    check_gradient('type: "Filter"', [randn(3, 2), randn(3, 1, seed=1), np.array([1.0, 0.0, 1.0])],
                   num_tops=2, check_bottoms=[0, 1])


def test_filter_setup_keeps_batch_then_filters():
    x, sel = randn(3, 2), np.array([0.0, 1.0, 0.0])
    layer, bottom, top = make_layer('type: "Filter"', [x, sel])
    assert top[0].shape == (3, 2)  # Caffe's first reshape keeps the batch size
    layer.run_forward(bottom, top)
    assert top[0].shape == (1, 2)


def test_filter_errors():
    x = randn(3, 2)
    raises_named('type: "Filter"', [x, np.ones(3)], num_tops=2, match="one top per data bottom")
    raises_named('type: "Filter"', [x, np.ones((3, 2))], match="singletons")
    raises_named('type: "Filter"', [x, np.ones(4)], match="0th dimension")
    layer, bottom, top = make_layer('type: "Filter"', [x, np.ones(3)])
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="'L'"):
        layer.backward(top, [True, True], bottom)
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)


# ------------------------------------------------------------------------------ Reduction
@pytest.mark.parametrize("op,fn", [("SUM", lambda v: v.sum(-1)), ("ASUM", lambda v: np.abs(v).sum(-1)),
                                   ("SUMSQ", lambda v: (v * v).sum(-1)), ("MEAN", lambda v: v.mean(-1))])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reduction_forward(op, fn, axis):
    x = randn(2, 3, 4)
    a = axis % 3
    y = forward_layer(f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: -1.5 }}',
                      [x])[0]
    expect = -1.5 * fn(x.reshape(x.shape[:a] + (-1,)))
    assert y.shape == x.shape[:a]
    np.testing.assert_allclose(y, expect, rtol=1e-12)


def test_reduction_default_is_sum_to_scalar():
    x = randn(2, 3)
    y = forward_layer('type: "Reduction"', [x])[0]
    assert y.shape == ()
    np.testing.assert_allclose(y, x.sum(), rtol=1e-12)


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
def test_reduction_gradient(op):
    x = randn(2, 3, 2)
    x[np.abs(x) < 0.1] = 0.5
    check_gradient(f'type: "Reduction" reduction_param {{ operation: {op} axis: 1 coeff: 2 }}', [x],
                   kink=0.0, kink_range=0.01)


def test_reduction_errors():
    raises_named('type: "Reduction" reduction_param { axis: 3 }', [randn(2, 3)], match="axis")


# --------------------------------------------------------------------------------- ArgMax
def test_argmax_default_and_top_k():
    x = np.array([[[0.1, 0.7], [0.2, 0.5]], [[0.9, -1.0], [0.3, 0.0]]])  # (2, 2, 2): 4 per item
    y = forward_layer('type: "ArgMax"', [x])[0]
    assert y.shape == (2, 1, 1)
    np.testing.assert_array_equal(y.reshape(-1), [1, 0])
    y = forward_layer('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', [x])[0]
    assert y.shape == (2, 2, 2)
    np.testing.assert_array_equal(y[:, 0], [[1, 3], [0, 2]])  # indices
    np.testing.assert_allclose(y[:, 1], [[0.7, 0.5], [0.9, 0.3]])  # values


def test_argmax_axis():
    x = randn(2, 4, 3)
    y = forward_layer('type: "ArgMax" argmax_param { axis: 1 }', [x])[0]
    assert y.shape == (2, 1, 3)
    np.testing.assert_array_equal(y[:, 0], x.argmax(1))
    y = forward_layer('type: "ArgMax" argmax_param { axis: -1 top_k: 2 out_max_val: true }', [x])[0]
    np.testing.assert_allclose(y, -np.sort(-x, axis=-1)[..., :2])


def test_argmax_ties_prefer_larger_index():
    x = np.array([[1.0, 3.0, 3.0, 0.0, 3.0]])
    y = forward_layer('type: "ArgMax" argmax_param { top_k: 3 }', [x])[0]
    np.testing.assert_array_equal(y.reshape(-1), [4, 2, 1])


def test_argmax_errors():
    x = randn(2, 3)
    raises_named('type: "ArgMax" argmax_param { top_k: 4 }', [x], match="top_k")
    raises_named('type: "ArgMax" argmax_param { top_k: 0 }', [x], match="top k")
    raises_named('type: "ArgMax" argmax_param { axis: 0 top_k: 3 }', [x], match="top_k")
    raises_named('type: "ArgMax" argmax_param { axis: 2 }', [x], match="axis")
    layer, bottom, top = make_layer('type: "ArgMax"', [x])
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="'L'"):
        layer.backward(top, [True], bottom)


# -------------------------------------------------------------------------------- Silence
def test_silence_zeroes_diffs():
    a, b = randn(2, 3), randn(4)
    layer, bottom, top = make_layer('type: "Silence"', [a, b], num_tops=0)
    layer.run_forward(bottom, top)
    for blob in bottom:
        blob.diff[...] = 5.0
    layer.backward(top, [True, False], bottom)
    assert not bottom[0].diff.any()
    assert (bottom[1].diff == 5.0).all()
    check_gradient('type: "Silence"', [randn(2, 2)], num_tops=0)
    raises_named('type: "Silence"', [a], num_tops=1, match="top")


# ------------------------------------------------------------------------------ Parameter
def test_parameter_outputs_its_blob():
    text = 'type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }'
    layer, bottom, top = make_layer(text, [])
    assert layer.blobs[0].shape == (2, 3) and not layer.blobs[0].data.any()
    layer.blobs[0].data[...] = randn(2, 3)
    layer.run_forward(bottom, top)
    np.testing.assert_array_equal(top[0].data, layer.blobs[0].data)
    layer.blobs[0].data[0, 0] = 9.0  # shares memory, as Caffe's ShareData
    assert top[0].data[0, 0] == 9.0
    check_gradient(text, [])
    raises_named(text, [randn(2)], match="bottom")


# ---------------------------------------------------------------------------------- Embed
EMBED = 'type: "Embed" embed_param { num_output: 3 input_dim: 5 %s ' \
        'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } }'


def test_embed_forward():
    idx = np.array([[0.0, 4.0], [2.0, 2.0]])
    layer, bottom, top = make_layer(EMBED % "", [idx])
    assert [b.shape for b in layer.blobs] == [(5, 3), (3,)]
    layer.run_forward(bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(top[0].data, w[idx.astype(int)] + b, rtol=1e-14)
    layer, bottom, top = make_layer(EMBED % "bias_term: false", [idx])
    layer.run_forward(bottom, top)
    assert len(layer.blobs) == 1
    np.testing.assert_array_equal(top[0].data, layer.blobs[0].data[idx.astype(int)])


def test_embed_gradient_params_only():
    idx = np.array([1.0, 3.0, 1.0, 0.0])
    check_gradient(EMBED % "", [idx], check_bottoms=[])
    _, _, (dw, db) = forward_backward(EMBED % "", [idx], [np.ones((4, 3))], propagate=[False])
    np.testing.assert_array_equal(dw[:, 0], [1, 2, 0, 1, 0])
    np.testing.assert_array_equal(db, [4, 4, 4])


def test_embed_errors():
    raises_named(EMBED % "", [np.array([5.0])], match="out of range")
    raises_named(EMBED % "", [np.array([-1.0])], match="out of range")
    raises_named(EMBED % "", [np.array([1.5])], match="non-integer")
    raises_named('type: "Embed" embed_param { input_dim: 5 }', [np.array([1.0])], match="num_output")
    raises_named('type: "Embed" embed_param { num_output: 2 }', [np.array([1.0])], match="input_dim")
    layer, bottom, top = make_layer(EMBED % "", [np.array([1.0])])
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="'L'"):
        layer.backward(top, [True], bottom)
    assert not layer.allow_force_backward(0)


# ------------------------------------------------------------------------------ ShuffleChannel
def np_shuffle(x, group):
    """farmingyard/ShuffleNet's Resize_cpu: input channel i * k + j -> output channel j * group + i."""
    c = x.shape[1]
    k = c // group
    y = np.empty_like(x)
    for i in range(group):
        for j in range(k):
            y[:, j * group + i] = x[:, i * k + j]
    return y


@pytest.mark.parametrize("shape,group", [((2, 6, 3, 2), 3), ((2, 6, 3, 2), 2), ((1, 12, 2), 4), ((3, 5), 1)])
def test_shuffle_channel_forward_backward(shape, group):
    x, dy = randn(*shape), randn(*shape, seed=1)
    text = f'type: "ShuffleChannel" shuffle_channel_param {{ group: {group} }}'
    (y,), (dx,), _ = forward_backward(text, [x], [dy])
    np.testing.assert_array_equal(y, np_shuffle(x, group))
    np.testing.assert_array_equal(np_shuffle(dx, group), dy)  # backward is the inverse permutation
    check_gradient(text, [x])


def test_shuffle_channel_errors():
    raises_named('type: "ShuffleChannel" shuffle_channel_param { group: 0 }', [randn(1, 4, 2, 2)],
                 match="group must be greater than 0")
    msg = raises_named('type: "ShuffleChannel" shuffle_channel_param { group: 3 }', [randn(1, 4, 2, 2)])
    assert "(1, 4, 2, 2)" in msg and "group 3" in msg


# ------------------------------------------------------------------------------ Axpy
@pytest.mark.parametrize("a_shape", [(2, 3, 1, 1), (2, 3)])
def test_axpy_forward_backward(a_shape):
    a, x, y = randn(*a_shape), randn(2, 3, 4, 5, seed=1), randn(2, 3, 4, 5, seed=2)
    dtop = randn(2, 3, 4, 5, seed=3)
    (top,), (da, dx, dy), _ = forward_backward('type: "Axpy"', [a, x, y], [dtop])
    a4 = a.reshape(2, 3, 1, 1)
    np.testing.assert_allclose(top, a4 * x + y, rtol=1e-14)
    np.testing.assert_allclose(da, (dtop * x).sum((2, 3)).reshape(a_shape), rtol=1e-12)
    np.testing.assert_allclose(dx, a4 * dtop, rtol=1e-14)
    np.testing.assert_array_equal(dy, dtop)
    check_gradient('type: "Axpy"', [a, x, y])


def test_axpy_errors():
    msg = raises_named('type: "Axpy"', [randn(2, 4, 1, 1), randn(2, 3, 4, 5), randn(2, 3, 4, 5)])
    assert "(2, 4, 1, 1)" in msg and "(2, 3, 4, 5)" in msg
    raises_named('type: "Axpy"', [randn(2, 3, 2, 1), randn(2, 3, 4, 5), randn(2, 3, 4, 5)], match="(2, 3, 2, 1)")
    msg = raises_named('type: "Axpy"', [randn(2, 3), randn(2, 3, 4, 5), randn(2, 3, 5, 4)])
    assert "(2, 3, 4, 5)" in msg and "(2, 3, 5, 4)" in msg
