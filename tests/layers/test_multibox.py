"""MultiBoxLoss (SSD fork): matching and mining on crafted boxes, the loss against a numpy reading
of the fork's definition, gradient checks, and errors. The fork's own outputs are checked by the
reference cases in ../shared/reference/forks/ssd (tests/test_reference_cases.py::test_fork_case)."""
import numpy as np
import pytest
import torch

from recaffe.gradient_check import check_gradient, forward_layer, make_layer
from recaffe.layer import LayerError
from recaffe.layers.multibox import match_boxes
from recaffe.proto import caffe_pb2

P = caffe_pb2.MultiBoxLossParameter
VAR = [0.1, 0.1, 0.2, 0.2]


def grid_priors(n=5, size=0.25):
    """n x n boxes of side ``size`` whose centres step by size/2: neighbours overlap with IoU 1/3."""
    step = size / 2
    boxes = [[x * step, y * step, x * step + size, y * step + size] for y in range(n) for x in range(n)]
    return np.array(boxes)


def prior_blob(boxes):
    return np.stack([boxes.reshape(-1), np.tile(VAR, len(boxes))])[None]


def gt_blob(rows):
    return np.array(rows, dtype=float).reshape(1, 1, -1, 8)


def text(**kw):
    opts = dict(num_classes=3, code_type="CENTER_SIZE")
    opts.update(kw)
    body = " ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in opts.items())
    return f'type: "MultiBoxLoss" propagate_down: true propagate_down: true propagate_down: false ' \
           f'propagate_down: false multibox_loss_param {{ {body} }}'


def test_match_bipartite_then_per_prediction():
    priors = torch.tensor(grid_priors(3), dtype=torch.float64)  # 9 priors
    gt = priors[[4]] + torch.tensor([0.02, 0.0, 0.02, 0.0], dtype=torch.float64)  # near prior 4
    gt = torch.cat([gt, priors[[0]]])  # and exactly prior 0
    m, ov = match_boxes(gt, priors, P.BIPARTITE, 0.5, False)
    assert m.tolist() == [1, -1, -1, -1, 0, -1, -1, -1, -1]
    assert ov[0] == pytest.approx(1.0) and ov[4] > 0.8
    # overlaps of unmatched priors: their best IoU with any ground truth (neighbours of prior 4: < 0.5)
    assert 0 < float(ov[5]) < 0.5
    # a threshold low enough lets the neighbours match their best ground truth too
    m2, _ = match_boxes(gt, priors, P.PER_PREDICTION, 0.25, False)
    assert m2[4] == 0 and m2[0] == 1 and (m2[[1, 3, 5, 7]] >= 0).all()
    m3, _ = match_boxes(gt, priors, P.PER_PREDICTION, 0.5, False)
    assert m3.tolist() == m.tolist()


def test_bipartite_ties_go_to_the_lowest_prior():
    priors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    m, _ = match_boxes(priors[:1].clone(), priors, P.BIPARTITE, 0.5, False)
    assert m.tolist() == [0, -1]


def test_cross_boundary_priors_are_ignored():
    priors = torch.tensor([[-0.1, 0.0, 0.4, 0.5], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    m, _ = match_boxes(priors[1:].clone(), priors, P.PER_PREDICTION, 0.5, True)
    assert m.tolist() == [-2, 0]


def encode_center_size(prior, box):
    pw, ph = prior[2] - prior[0], prior[3] - prior[1]
    pcx, pcy = (prior[0] + prior[2]) / 2, (prior[1] + prior[3]) / 2
    bw, bh = box[2] - box[0], box[3] - box[1]
    bcx, bcy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return np.array([(bcx - pcx) / pw / VAR[0], (bcy - pcy) / ph / VAR[1],
                     np.log(bw / pw) / VAR[2], np.log(bh / ph) / VAR[3]])


def smooth_l1(d):
    return np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5).sum()


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_without_mining_matches_the_definition():
    priors = grid_priors(3)
    rng = np.random.default_rng(0)
    loc = rng.normal(0, 0.5, (2, 9 * 4))
    conf = rng.normal(0, 1, (2, 9 * 3))
    # image 0: a box near prior 4 (label 1); image 1: exactly prior 8 (label 2), and a difficult one
    gt_box = priors[4] + [0.01, 0.02, 0.03, 0.0]
    gt = gt_blob([[0, 1, 0, *gt_box, 0], [1, 2, 0, *priors[8], 0], [-1, 0, 0, 0, 0, 0, 0, 0]])
    (loss,) = forward_layer(text(mining_type="NONE"), [loc, conf, prior_blob(priors), gt])
    want_loc = smooth_l1(loc[0].reshape(9, 4)[4] - encode_center_size(priors[4], gt_box)) + \
        smooth_l1(loc[1].reshape(9, 4)[8] - encode_center_size(priors[8], priors[8]))
    labels = np.zeros((2, 9), int)
    labels[0, 4], labels[1, 8] = 1, 2
    lsm = log_softmax(conf.reshape(2, 9, 3))
    want_conf = -np.take_along_axis(lsm, labels[..., None], -1).sum()
    assert float(loss) == pytest.approx((want_loc + want_conf) / 2, rel=1e-10)  # VALID: 2 matches


def test_max_negative_mining_picks_the_hardest_background_priors():
    priors = grid_priors(3)
    loc = np.full((1, 36), 0.1)
    conf = np.zeros((1, 9, 3))
    conf[0, :, 0] = np.arange(9) * 0.1  # background logit: prior 0 is the hardest negative
    gt = gt_blob([[0, 1, 0, *priors[8], 0]])  # one positive (prior 8) -> 3 negatives
    layer, bottom, top = make_layer(text(), [loc, conf.reshape(1, 27), prior_blob(priors), gt])
    layer.run_forward(bottom, top)
    top[0].diff_t = torch.ones((), dtype=torch.float64)
    layer.backward(top, [True, True, False, False], bottom)
    touched = np.nonzero(np.abs(bottom[1].diff.reshape(9, 3)).sum(1))[0].tolist()
    # eligible negatives are unmatched priors whose best overlap is below 0.5: all but 8; the
    # three with the lowest background logit are 0, 1, 2
    assert touched == [0, 1, 2, 8]
    assert np.nonzero(np.abs(bottom[0].diff.reshape(9, 4)).sum(1))[0].tolist() == [8]


def test_no_ground_truth_gives_zero_loss_and_zero_diffs():
    priors = grid_priors(2)
    loc, conf = np.ones((1, 16)), np.ones((1, 12))
    layer, bottom, top = make_layer(text(), [loc, conf, prior_blob(priors), gt_blob([[-1] * 8])])
    layer.run_forward(bottom, top)
    assert float(top[0].data) == 0.0
    top[0].diff_t = torch.ones((), dtype=torch.float64)
    layer.backward(top, [True, True, False, False], bottom)
    assert not bottom[0].diff.any() and not bottom[1].diff.any()


CONFIGS = [
    dict(mining_type="NONE"),
    dict(mining_type="MAX_NEGATIVE"),
    dict(mining_type="NONE", conf_loss_type="LOGISTIC", loc_loss_type="L2"),
    dict(mining_type="NONE", share_location=False, match_type="BIPARTITE"),
    dict(mining_type="MAX_NEGATIVE", code_type="CORNER", loc_weight=2.0),
    dict(mining_type="HARD_EXAMPLE", sample_size=3),
    dict(mining_type="NONE", use_prior_for_matching=False, overlap_threshold=0.3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_gradients(cfg):
    priors = grid_priors(2)  # 4 priors: small enough for finite differences on every element
    rng = np.random.default_rng(3)
    loc_classes = 1 if cfg.get("share_location", True) else 3
    loc = rng.normal(0, 0.3, (2, 4 * loc_classes * 4))
    conf = rng.normal(0, 1, (2, 12))
    gt = gt_blob([[0, 1, 0, *(priors[3] + [0.01, 0.0, 0.02, 0.01]), 0], [0, 2, 1, *priors[0], 0],
                  [1, 2, 0, *(priors[2] + [0.0, 0.01, 0.0, 0.0]), 0]])
    check_gradient(text(**cfg), [loc, conf, prior_blob(priors), gt], check_bottoms=[0, 1])


def test_variance_in_target_keeps_the_forks_gradient():
    # the fork divides predictions and targets by the variance and copies the diff back unscaled
    priors = grid_priors(2)
    loc = np.full((1, 16), 0.01)
    gt = gt_blob([[0, 1, 0, *priors[0], 0]])
    layer, bottom, top = make_layer(text(mining_type="NONE", code_type="CORNER", encode_variance_in_target=True),
                                    [loc, np.zeros((1, 12)), prior_blob(priors), gt])
    layer.run_forward(bottom, top)
    top[0].diff_t = torch.ones((), dtype=torch.float64)
    layer.backward(top, [True, True, False, False], bottom)
    d = 0.01 / np.array(VAR)  # (pred - target) / variance, target 0
    np.testing.assert_allclose(bottom[0].diff.reshape(4, 4)[0], d, rtol=1e-12)


def test_errors():
    priors = grid_priors(2)
    good = [np.zeros((1, 16)), np.zeros((1, 12)), prior_blob(priors), gt_blob([[0, 1, 0, *priors[0], 0]])]
    with pytest.raises(LayerError, match="num_classes"):
        forward_layer('type: "MultiBoxLoss"', good)
    with pytest.raises(LayerError, match="confidence"):
        forward_layer(text(), [good[0], np.zeros((1, 13)), good[2], good[3]])
    with pytest.raises(LayerError, match="background label"):
        forward_layer(text(), good[:3] + [gt_blob([[0, 0, 0, *priors[0], 0]])])
    with pytest.raises(LayerError, match="share_location"):
        forward_layer(text(share_location=False), [np.zeros((1, 48))] + good[1:])


def test_logistic_without_mining_leaves_unmatched_targets_at_zero():
    # the fork fills the logistic targets with background_label_id (0) and marks only the matched
    # priors' labels: an unmatched prior is pushed towards 0 on every class, background included
    priors = grid_priors(2)
    rng = np.random.default_rng(4)
    conf = rng.normal(0, 1, (1, 4 * 3))
    loc = np.zeros((1, 16))
    gt = gt_blob([[0, 2, 0, *priors[1], 0]])  # exactly prior 1, label 2: no location error
    (loss,) = forward_layer(text(mining_type="NONE", conf_loss_type="LOGISTIC", code_type="CORNER"),
                            [loc, conf, prior_blob(priors), gt])
    x = conf.reshape(4, 3)
    target = np.zeros((4, 3))
    target[1, 2] = 1.0
    want = (np.logaddexp(0, x) - x * target).sum()  # sigmoid cross-entropy, summed (normalizer 1)
    assert float(loss) == pytest.approx(want / 1, rel=1e-10)  # VALID: one match
