"""Loss layers and Accuracy: values against numpy formulas, numerical gradients, loss-weight
scaling, and Caffe's parameter/shape checks."""
import numpy as np
import pytest
import torch

from recaffe.gradient_check import check_gradient, forward_layer, make_layer
from recaffe.io.protofiles import write_binary
from recaffe.layer import LayerError
from recaffe.proto import caffe_pb2

FLT_MIN = float(np.finfo(np.float32).tiny)


def rng(seed=0):
    return np.random.default_rng(seed)


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def rows(x, axis):
    """(positions, classes) with positions in Caffe's outer*inner order."""
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def normalizer(mode, outer, inner, valid):
    n = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, float(n))


def backward(layer, bottom, top, propagate_down):
    layer.backward(top, propagate_down, bottom)
    return [b.diff.copy() for b in bottom]


# --------------------------------------------------------------------------- SoftmaxWithLoss
def np_softmax_loss(x, labels, axis=1, ignore=None, mode="VALID"):
    p = rows(np_softmax(x, axis), axis)
    lab = labels.reshape(-1).astype(int)
    keep = np.ones(len(lab), bool) if ignore is None else lab != ignore
    picked = p[np.arange(len(lab))[keep], lab[keep]]
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1:]))
    return -np.log(np.maximum(picked, FLT_MIN)).sum() / normalizer(mode, outer, inner, keep.sum())


SPATIAL_X = rng(1).standard_normal((2, 3, 2, 2))
SPATIAL_LAB = np.array([[[[0, 2], [1, 2]]], [[[2, 1], [0, 0]]]], dtype=float)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_softmax_loss_normalization_with_ignore(mode):
    text = f'type: "SoftmaxWithLoss" loss_param {{ ignore_label: 2 normalization: {mode} }}'
    (loss,) = forward_layer(text, [SPATIAL_X, SPATIAL_LAB])
    assert loss.shape == ()
    assert loss == pytest.approx(np_softmax_loss(SPATIAL_X, SPATIAL_LAB, 1, 2, mode), rel=1e-12)


@pytest.mark.parametrize("normalize, mode", [("true", "VALID"), ("false", "BATCH_SIZE")])
def test_softmax_loss_deprecated_normalize(normalize, mode):
    text = f'type: "SoftmaxWithLoss" loss_param {{ ignore_label: 2 normalize: {normalize} }}'
    (loss,) = forward_layer(text, [SPATIAL_X, SPATIAL_LAB])
    assert loss == pytest.approx(np_softmax_loss(SPATIAL_X, SPATIAL_LAB, 1, 2, mode), rel=1e-12)


def test_softmax_loss_default_is_valid_without_ignore():
    (loss,) = forward_layer('type: "SoftmaxWithLoss"', [SPATIAL_X, SPATIAL_LAB])
    assert loss == pytest.approx(np_softmax_loss(SPATIAL_X, SPATIAL_LAB, 1, None, "FULL"), rel=1e-12)


def test_softmax_loss_axis_and_prob_top():
    x = rng(2).standard_normal((2, 3, 4))
    lab = rng(3).integers(0, 4, (2, 3)).astype(float)
    loss, prob = forward_layer('type: "SoftmaxWithLoss" softmax_param { axis: -1 }', [x, lab], num_tops=2)
    assert loss == pytest.approx(np_softmax_loss(x, lab, axis=2), rel=1e-12)
    np.testing.assert_allclose(prob, np_softmax(x, 2), rtol=1e-12)


def test_softmax_loss_clamps_at_flt_min_and_truncates_labels():
    x = np.array([[0.0, 1000.0], [0.0, 0.0]])
    lab = np.array([0.9, 1.7])  # static_cast<int>: 0 and 1
    (loss,) = forward_layer('type: "SoftmaxWithLoss"', [x, lab])
    assert loss == pytest.approx((-np.log(FLT_MIN) + np.log(2)) / 2, rel=1e-12)


def test_softmax_loss_all_ignored_is_zero_with_zero_gradient():
    lab = np.full(SPATIAL_LAB.shape, 2.0)
    layer, bottom, top = make_layer('type: "SoftmaxWithLoss" loss_param { ignore_label: 2 }', [SPATIAL_X, lab])
    layer.run_forward(bottom, top)
    assert top[0].data == 0
    diff, _ = backward(layer, bottom, top, [True, False])
    assert not diff.any()


def test_softmax_loss_gradient_matches_formula():
    layer, bottom, top = make_layer('type: "SoftmaxWithLoss" loss_param { ignore_label: 2 }',
                                    [SPATIAL_X, SPATIAL_LAB])
    layer.run_forward(bottom, top)
    diff, _ = backward(layer, bottom, top, [True, False])
    p = np_softmax(SPATIAL_X, 1)
    onehot = np.moveaxis(np.eye(3)[SPATIAL_LAB[:, 0].astype(int)], -1, 1)
    keep = (SPATIAL_LAB != 2)
    expected = (p - onehot) * keep / keep.sum()
    np.testing.assert_allclose(diff, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_softmax_loss_gradient_check(mode):
    check_gradient(f'type: "SoftmaxWithLoss" loss_param {{ ignore_label: 2 normalization: {mode} }}',
                   [SPATIAL_X, SPATIAL_LAB], check_bottoms=[0])


def test_softmax_loss_gradient_check_axis():
    x = rng(4).standard_normal((2, 2, 3))
    lab = rng(5).integers(0, 3, (2, 2)).astype(float)
    check_gradient('type: "SoftmaxWithLoss" softmax_param { axis: 2 }', [x, lab], check_bottoms=[0])


def test_softmax_loss_errors():
    with pytest.raises(LayerError, match=r"'L'.*\(2, 3, 2, 2\).*\(2, 3\)"):
        make_layer('type: "SoftmaxWithLoss"', [SPATIAL_X, np.zeros((2, 3))])
    with pytest.raises(LayerError, match="'L'.*same first dimension"):
        make_layer('type: "SoftmaxWithLoss"', [SPATIAL_X, np.zeros((8,))])
    with pytest.raises(LayerError, match="'L'.*axis 4"):
        make_layer('type: "SoftmaxWithLoss" softmax_param { axis: 4 }', [SPATIAL_X, SPATIAL_LAB])
    layer, bottom, top = make_layer('type: "SoftmaxWithLoss"', [SPATIAL_X, SPATIAL_LAB * 2])
    with pytest.raises(LayerError, match="'L'.*label value 4"):
        layer.run_forward(bottom, top)
    layer, bottom, top = make_layer('type: "SoftmaxWithLoss"', [SPATIAL_X, SPATIAL_LAB])
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="'L'.*label"):
        layer.backward(top, [True, True], bottom)


def test_loss_layer_contract():
    layer, bottom, top = make_layer('type: "SoftmaxWithLoss"', [SPATIAL_X, SPATIAL_LAB], num_tops=2)
    assert layer.loss_weights == [1.0, 0.0]
    assert layer.auto_top_blobs
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    assert top[0].shape == () and top[1].shape == SPATIAL_X.shape


# ------------------------------------------------------------------------------- Accuracy
def test_accuracy_matches_argsort_without_ties():
    x = rng(6).standard_normal((10, 5))
    lab = rng(7).integers(0, 5, 10).astype(float)
    for k in (1, 2, 3):
        topk = np.argsort(-x, axis=1)[:, :k]
        expected = np.mean([lab[i] in topk[i] for i in range(10)])
        (acc,) = forward_layer(f'type: "Accuracy" accuracy_param {{ top_k: {k} }}', [x, lab])
        assert acc.shape == () and acc == pytest.approx(expected)


def test_accuracy_ties_count_against_the_true_class():
    x = np.array([[1.0, 2.0, 2.0, 0.0],
                  [1.0, 2.0, 2.0, 0.0],
                  [3.0, 3.0, 3.0, 3.0]])
    lab = np.array([1.0, 2.0, 3.0])
    # Each true class ties with other classes: with top_k 1 none is correct, with top_k 2 the first
    # two are (one tying class), with top_k 4 all are.
    for k, expected in ((1, 0.0), (2, 2 / 3), (3, 2 / 3), (4, 1.0)):
        (acc,) = forward_layer(f'type: "Accuracy" accuracy_param {{ top_k: {k} }}', [x, lab])
        assert acc == pytest.approx(expected), k


def test_accuracy_ignore_label_axis_and_per_class():
    # (N=2, C=3, inner=2) scores; argmax per position: n0: [2, 0], n1: [1, 1]
    x = np.array([[[0.1, 0.9], [0.2, 0.0], [0.7, 0.1]],
                  [[0.0, 0.2], [0.8, 0.5], [0.2, 0.3]]])
    lab = np.array([[2.0, 1.0], [1.0, 5.0]])  # correct, wrong, correct, ignored
    acc, per = forward_layer('type: "Accuracy" accuracy_param { ignore_label: 5 }', [x, lab], num_tops=2)
    assert acc == pytest.approx(2 / 3)
    np.testing.assert_allclose(per, [0.0, 0.5, 1.0])  # class 0 has no samples: 0
    acc_t, = forward_layer('type: "Accuracy" accuracy_param { axis: -1 }',
                           [np.moveaxis(x, 1, 2), np.array([[2.0, 1.0], [1.0, 1.0]])])
    assert acc_t == pytest.approx(3 / 4)


def test_accuracy_all_ignored_is_zero():
    (acc,) = forward_layer('type: "Accuracy" accuracy_param { ignore_label: 0 }', [np.ones((3, 2)), np.zeros(3)])
    assert acc == 0


def test_accuracy_errors():
    x = np.zeros((4, 3))
    with pytest.raises(LayerError, match="'L'.*top_k"):
        make_layer('type: "Accuracy" accuracy_param { top_k: 4 }', [x, np.zeros(4)])
    with pytest.raises(LayerError, match=r"'L'.*\(4, 3\).*\(5,\)"):
        make_layer('type: "Accuracy"', [x, np.zeros(5)])
    layer, bottom, top = make_layer('type: "Accuracy"', [x, np.full(4, 3.0)])
    with pytest.raises(LayerError, match="'L'.*label value 3"):
        layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="'L'.*no backward"):
        layer.backward(top, [True, False], bottom)
    assert layer.default_loss_weight(0) == 0


# ---------------------------------------------------------------------------- EuclideanLoss
def test_euclidean_loss_forward_and_backward():
    a, b = rng(8).standard_normal((4, 3)), rng(9).standard_normal((4, 3, 1, 1))
    layer, bottom, top = make_layer('type: "EuclideanLoss"', [a, b])
    layer.run_forward(bottom, top)
    d = a - b.reshape(4, 3)
    assert top[0].data == pytest.approx((d ** 2).sum() / 8, rel=1e-12)
    da, db = backward(layer, bottom, top, [True, True])
    np.testing.assert_allclose(da, d / 4, rtol=1e-12)
    np.testing.assert_allclose(db, -d.reshape(b.shape) / 4, rtol=1e-12)
    assert layer.allow_force_backward(1)


def test_euclidean_loss_gradient_check():
    check_gradient('type: "EuclideanLoss"', [rng(10).standard_normal((3, 2, 2)), rng(11).standard_normal((3, 4))])


def test_euclidean_loss_errors():
    with pytest.raises(LayerError, match=r"'L'.*same dimension.*\(4, 3\).*\(4, 2\)"):
        make_layer('type: "EuclideanLoss"', [np.zeros((4, 3)), np.zeros((4, 2))])
    with pytest.raises(LayerError, match="'L'.*first dimension"):
        make_layer('type: "EuclideanLoss"', [np.zeros((4, 3)), np.zeros((3, 4))])


# ------------------------------------------------------------------ SigmoidCrossEntropyLoss
XENT_X = np.array([[0.5, -1.2, 2.0], [-0.3, 0.8, -2.5], [1.1, 0.0, -0.7], [3.0, -0.1, 0.4]])
XENT_T = np.array([[1.0, 0.0, 1.0], [0.0, -1.0, 1.0], [0.3, 1.0, -1.0], [1.0, 0.0, 0.0]])


def np_xent(x, t, ignore=None, mode="BATCH_SIZE"):
    s = 1 / (1 + np.exp(-x))
    terms = -(t * np.log(s) + (1 - t) * np.log(1 - s))
    keep = np.ones(x.shape, bool) if ignore is None else t.astype(int) != ignore
    return terms[keep].sum() / normalizer(mode, x.shape[0], x[0].size, keep.sum())


@pytest.mark.parametrize("param, ignore, mode", [
    ("", None, "BATCH_SIZE"),  # Caffe's default for this layer
    ("loss_param { ignore_label: -1 }", -1, "BATCH_SIZE"),
    ("loss_param { ignore_label: -1 normalization: VALID }", -1, "VALID"),
    ("loss_param { ignore_label: -1 normalization: FULL }", -1, "FULL"),
    ("loss_param { ignore_label: -1 normalization: NONE }", -1, "NONE"),
    ("loss_param { ignore_label: -1 normalize: true }", -1, "VALID"),
    ("loss_param { normalize: false }", None, "BATCH_SIZE"),
])
def test_sigmoid_xent_loss_forward(param, ignore, mode):
    t = XENT_T if ignore is not None else np.abs(XENT_T)
    (loss,) = forward_layer(f'type: "SigmoidCrossEntropyLoss" {param}', [XENT_X, t])
    assert loss == pytest.approx(np_xent(XENT_X, t, ignore, mode), rel=1e-12)


def test_sigmoid_xent_loss_is_stable_for_large_inputs():
    (loss,) = forward_layer('type: "SigmoidCrossEntropyLoss"', [np.array([[200.0, -200.0]]), np.array([[0.0, 1.0]])])
    assert loss == pytest.approx(400.0)


def test_sigmoid_xent_loss_gradient_formula_and_ignore():
    layer, bottom, top = make_layer('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 '
                                    'normalization: VALID }', [XENT_X, XENT_T])
    layer.run_forward(bottom, top)
    diff, _ = backward(layer, bottom, top, [True, False])
    keep = XENT_T != -1
    np.testing.assert_allclose(diff, (1 / (1 + np.exp(-XENT_X)) - XENT_T) * keep / keep.sum(), rtol=1e-12)


@pytest.mark.parametrize("param", ["", "loss_param { ignore_label: -1 normalization: VALID }"])
def test_sigmoid_xent_loss_gradient_check(param):
    check_gradient(f'type: "SigmoidCrossEntropyLoss" {param}', [XENT_X, XENT_T], check_bottoms=[0])


def test_sigmoid_xent_loss_errors():
    with pytest.raises(LayerError, match=r"'L'.*same count.*\(4, 3\).*\(4, 2\)"):
        make_layer('type: "SigmoidCrossEntropyLoss"', [XENT_X, np.zeros((4, 2))])
    layer, bottom, top = make_layer('type: "SigmoidCrossEntropyLoss"', [XENT_X, XENT_T])
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="'L'.*label"):
        layer.backward(top, [False, True], bottom)


# ------------------------------------------------------------------ MultinomialLogisticLoss
PROB = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.25, 0.25, 0.5]])
PROB_LAB = np.array([1.0, 2.0, 0.0])


def test_multinomial_logistic_loss_forward_and_clamp():
    (loss,) = forward_layer('type: "MultinomialLogisticLoss"', [PROB, PROB_LAB])
    assert loss == pytest.approx(-(np.log(0.5) + np.log(0.3) + np.log(0.25)) / 3, rel=1e-12)
    (loss0,) = forward_layer('type: "MultinomialLogisticLoss"', [np.array([[0.0, 1.0]]), np.array([0.0])])
    assert loss0 == pytest.approx(-np.log(1e-20), rel=1e-12)


def test_multinomial_logistic_loss_gradient():
    layer, bottom, top = make_layer('type: "MultinomialLogisticLoss"', [PROB, PROB_LAB])
    layer.run_forward(bottom, top)
    diff, _ = backward(layer, bottom, top, [True, False])
    expected = np.zeros_like(PROB)
    expected[[0, 1, 2], [1, 2, 0]] = -1 / (3 * PROB[[0, 1, 2], [1, 2, 0]])
    np.testing.assert_allclose(diff, expected, rtol=1e-12)
    check_gradient('type: "MultinomialLogisticLoss"', [PROB.reshape(3, 3, 1, 1), PROB_LAB.reshape(3, 1, 1, 1)],
                   check_bottoms=[0])


def test_multinomial_logistic_loss_errors():
    with pytest.raises(LayerError, match=r"'L'.*one label per item.*\(3, 2\)"):
        make_layer('type: "MultinomialLogisticLoss"', [PROB, np.zeros((3, 2))])
    layer, bottom, top = make_layer('type: "MultinomialLogisticLoss"', [PROB, np.array([0.0, 3.0, 1.0])])
    with pytest.raises(LayerError, match="'L'.*label value 3"):
        layer.run_forward(bottom, top)


# ------------------------------------------------------------------------------ InfogainLoss
H = np.array([[1.0, 0.5, 0.0], [0.2, 2.0, 0.1], [0.0, 0.3, 1.5]])


def np_infogain(x, lab, h, axis=1, ignore=None, mode="VALID"):
    logp = np.log(np.maximum(rows(np_softmax(x, axis), axis), 1e-20))
    lab = lab.reshape(-1).astype(int)
    keep = np.ones(len(lab), bool) if ignore is None else lab != ignore
    total = -sum((h[lab[r]] * logp[r]).sum() for r in range(len(lab)) if keep[r])
    outer, inner = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis + 1:]))
    return total / normalizer(mode, outer, inner, keep.sum())


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_infogain_loss_third_bottom(mode):
    text = f'type: "InfogainLoss" loss_param {{ ignore_label: 2 normalization: {mode} }}'
    loss, prob = forward_layer(text, [SPATIAL_X, SPATIAL_LAB, H], num_tops=2)
    assert loss == pytest.approx(np_infogain(SPATIAL_X, SPATIAL_LAB, H, 1, 2, mode), rel=1e-12)
    np.testing.assert_allclose(prob, np_softmax(SPATIAL_X, 1), rtol=1e-12)


def test_infogain_identity_equals_softmax_loss():
    x = rng(12).standard_normal((4, 3))
    lab = np.array([0.0, 2.0, 1.0, 1.0])
    (a,) = forward_layer('type: "InfogainLoss"', [x, lab, np.eye(3)])
    (b,) = forward_layer('type: "SoftmaxWithLoss"', [x, lab])
    assert a == pytest.approx(b, rel=1e-12)


def test_infogain_loss_from_file(tmp_path):
    proto = caffe_pb2.BlobProto(num=1, channels=1, height=3, width=3)
    proto.data.extend(H.ravel())
    path = tmp_path / "h.binaryproto"
    write_binary(path, proto)
    x = rng(13).standard_normal((2, 2, 3))
    lab = np.array([[0.0, 2.0], [1.0, 1.0]])
    text = f'type: "InfogainLoss" infogain_loss_param {{ source: "{path}" axis: 2 }}'
    (loss,) = forward_layer(text, [x, lab])
    h32 = H.astype(np.float32).astype(float)
    assert loss == pytest.approx(np_infogain(x, lab, h32, axis=2), rel=1e-12)
    check_gradient(text, [x, lab], check_bottoms=[0])


@pytest.mark.parametrize("mode", ["VALID", "BATCH_SIZE"])
def test_infogain_loss_gradient_check(mode):
    check_gradient(f'type: "InfogainLoss" loss_param {{ ignore_label: 2 normalization: {mode} }}',
                   [SPATIAL_X, SPATIAL_LAB, H], check_bottoms=[0])


def test_infogain_loss_errors(tmp_path):
    x, lab = np.zeros((2, 3)), np.zeros(2)
    with pytest.raises(LayerError, match="'L'.*source"):
        make_layer('type: "InfogainLoss"', [x, lab])
    with pytest.raises(LayerError, match="'L'.*normalize"):
        make_layer('type: "InfogainLoss" loss_param { normalize: true }', [x, lab, H])
    with pytest.raises(LayerError, match="'L'.*3x3"):
        make_layer('type: "InfogainLoss"', [x, lab, np.eye(2)])
    with pytest.raises(LayerError, match="'L'.*not found"):
        make_layer(f'type: "InfogainLoss" infogain_loss_param {{ source: "{tmp_path}/none" }}', [x, lab])
    layer, bottom, top = make_layer('type: "InfogainLoss"', [x, lab, H])
    layer.run_forward(bottom, top)
    assert not layer.allow_force_backward(2)
    with pytest.raises(LayerError, match="'L'.*infogain"):
        layer.backward(top, [True, False, True], bottom)


# -------------------------------------------------------------------------------- HingeLoss
HINGE_X = np.array([[0.3, -1.5, 0.8, 2.2], [-0.4, 0.6, -0.2, 1.4], [1.7, -0.7, 0.1, -1.3]])
HINGE_LAB = np.array([2.0, 0.0, 3.0])


def np_hinge(x, lab, norm):
    s = np.ones_like(x)
    s[np.arange(len(lab)), lab.astype(int)] = -1
    m = np.maximum(0, 1 + x * s)
    return (m.sum() if norm == "L1" else (m ** 2).sum()) / x.shape[0]


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(norm):
    text = f'type: "HingeLoss" hinge_loss_param {{ norm: {norm} }}'
    (loss,) = forward_layer(text, [HINGE_X, HINGE_LAB])
    assert loss == pytest.approx(np_hinge(HINGE_X, HINGE_LAB, norm), rel=1e-12)
    check_gradient(text, [HINGE_X, HINGE_LAB], check_bottoms=[0])


def test_hinge_loss_default_is_l1_and_errors():
    (loss,) = forward_layer('type: "HingeLoss"', [HINGE_X, HINGE_LAB])
    assert loss == pytest.approx(np_hinge(HINGE_X, HINGE_LAB, "L1"))
    with pytest.raises(LayerError, match=r"'L'.*one label per item.*\(3, 2\)"):
        make_layer('type: "HingeLoss"', [HINGE_X, np.zeros((3, 2))])


# -------------------------------------------------------------------------- ContrastiveLoss
CA = np.array([[0.1, 0.5, -0.2], [0.4, 0.3, 0.0], [-0.6, 0.2, 0.9], [0.3, -0.3, 0.2]])
CB = np.array([[0.0, 0.1, 0.3], [0.9, 0.6, -0.4], [0.4, -0.1, 0.1], [0.2, -0.2, 0.25]])
CY = np.array([1.0, 0.0, 0.0, 0.7])  # 0.7 truncates to 0: dissimilar


def np_contrastive(a, b, y, margin, legacy):
    d2 = ((a - b) ** 2).sum(1)
    sim = y.astype(int) != 0
    if legacy:
        dis = np.maximum(margin - d2, 0)
    else:
        dis = np.maximum(margin - np.sqrt(d2), 0) ** 2
    return np.where(sim, d2, dis).sum() / (2 * len(a))


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss(legacy):
    # margin 1.2: pair 2 (d ~ 1.36) is beyond the margin, pairs 1 and 3 inside it.
    text = f'type: "ContrastiveLoss" contrastive_loss_param {{ margin: 1.2 legacy_version: {str(legacy).lower()} }}'
    (loss,) = forward_layer(text, [CA, CB, CY])
    assert loss == pytest.approx(np_contrastive(CA, CB, CY, np.float32(1.2), legacy), rel=1e-7)
    # Caffe divides by (d + 1e-4) in the non-legacy gradient, hence the looser threshold.
    check_gradient(text, [CA, CB, CY], check_bottoms=[0, 1], threshold=1e-5 if legacy else 2e-3)


def test_contrastive_loss_errors():
    with pytest.raises(LayerError, match=r"'L'.*N x C.*\(4, 3, 2\)"):
        make_layer('type: "ContrastiveLoss"', [np.zeros((4, 3, 2)), np.zeros((4, 3, 2)), CY])
    with pytest.raises(LayerError, match=r"'L'.*channels.*\(4, 3\).*\(4, 2\)"):
        make_layer('type: "ContrastiveLoss"', [CA, np.zeros((4, 2)), CY])
    with pytest.raises(LayerError, match="'L'.*similarity"):
        make_layer('type: "ContrastiveLoss"', [CA, CB, np.zeros(3)])
    layer, *_ = make_layer('type: "ContrastiveLoss"', [CA, CB, CY])
    assert layer.allow_force_backward(1) and not layer.allow_force_backward(2)


# ------------------------------------------------------------------- loss weight, all types
LOSS_CASES = [
    ('type: "SoftmaxWithLoss" loss_param { ignore_label: 2 }', [SPATIAL_X, SPATIAL_LAB], [0]),
    ('type: "EuclideanLoss"', [CA, CB], [0, 1]),
    ('type: "SigmoidCrossEntropyLoss" loss_param { ignore_label: -1 }', [XENT_X, XENT_T], [0]),
    ('type: "MultinomialLogisticLoss"', [PROB, PROB_LAB], [0]),
    ('type: "InfogainLoss"', [SPATIAL_X, SPATIAL_LAB, H], [0]),
    ('type: "HingeLoss" hinge_loss_param { norm: L2 }', [HINGE_X, HINGE_LAB], [0]),
    ('type: "ContrastiveLoss"', [CA, CB, CY], [0, 1]),
]


@pytest.mark.parametrize("text, bottoms, checked", LOSS_CASES, ids=[c[0].split('"')[1] for c in LOSS_CASES])
def test_loss_weight_scales_gradient_not_top(text, bottoms, checked):
    def run(extra):
        layer, bottom, top = make_layer(text + extra, bottoms)
        loss = layer.run_forward(bottom, top)
        prop = [i in checked for i in range(len(bottom))]
        diffs = backward(layer, bottom, top, prop)
        return loss, top[0].data.copy(), [diffs[i] for i in checked]

    loss1, top1, g1 = run("")
    loss3, top3, g3 = run(" loss_weight: 2.5")
    assert top1.shape == () and top3 == pytest.approx(top1)
    assert loss1 == pytest.approx(float(top1)) and loss3 == pytest.approx(2.5 * float(top1))
    for a, b in zip(g1, g3):
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, 2.5 * a, rtol=1e-12)


@pytest.mark.parametrize("text, bottoms, checked", LOSS_CASES[:6], ids=[c[0].split('"')[1] for c in LOSS_CASES[:6]])
def test_label_backward_is_refused(text, bottoms, checked):
    layer, bottom, top = make_layer(text, bottoms)
    if layer.type == "EuclideanLoss":
        return  # both bottoms are predictions
    layer.run_forward(bottom, top)
    assert not layer.allow_force_backward(1)
    with pytest.raises(LayerError, match=f"{layer.type} layer 'L'.*label"):
        layer.backward(top, [True, True] + [False] * (len(bottom) - 2), bottom)


def test_float32_matches_float64():
    x32 = SPATIAL_X.astype(np.float32)
    (a,) = forward_layer('type: "SoftmaxWithLoss"', [x32, SPATIAL_LAB], dtype=torch.float32)
    assert a.dtype == np.float32
    assert a == pytest.approx(np_softmax_loss(x32.astype(float), SPATIAL_LAB), rel=1e-6)
