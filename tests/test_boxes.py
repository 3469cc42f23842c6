"""recaffe.boxes: IoU and NMS against a plain box-by-box reading of SSD's ApplyNMSFast."""
import numpy as np
import pytest
import torch

from recaffe.boxes import box_areas, iou_matrix, nms, score_order


def jaccard(a, b, pixel):
    """SSD's JaccardOverlap for one pair, written out."""
    one = 1.0 if pixel else 0.0
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0]) + one
    ih = min(a[3], b[3]) - max(a[1], b[1]) + one
    inter = iw * ih

    def size(x):
        if x[2] < x[0] or x[3] < x[1]:
            return 0.0
        return (x[2] - x[0] + one) * (x[3] - x[1] + one)

    return inter / (size(a) + size(b) - inter) if inter > 0 else 0.0


def reference_nms(boxes, scores, thr, score_thr, top_k, eta, pixel):
    order = [i for i in sorted(range(len(scores)), key=lambda i: -scores[i])
             if score_thr is None or scores[i] > score_thr]
    if top_k >= 0:
        order = order[:top_k]
    kept = []
    for i in order:
        if all(jaccard(boxes[i], boxes[k], pixel) <= thr for k in kept):
            kept.append(i)
            if eta < 1 and thr > 0.5:
                thr *= eta
    return kept


def random_boxes(rng, n, pixel):
    scale = 50.0 if pixel else 1.0
    xy = rng.uniform(0, 0.8, (n, 2)) * scale
    wh = rng.uniform(0.02, 0.3, (n, 2)) * scale
    return np.concatenate([xy, xy + wh], 1)


@pytest.mark.parametrize("pixel", [False, True])
def test_iou_matrix_matches_pairwise(pixel):
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7, pixel), random_boxes(rng, 5, pixel)
    ours = iou_matrix(torch.tensor(a), torch.tensor(b), pixel).numpy()
    want = np.array([[jaccard(x, y, pixel) for y in b] for x in a])
    np.testing.assert_allclose(ours, want, rtol=1e-12)


def test_degenerate_box_has_zero_area():
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.9], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert box_areas(boxes).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pixel", [False, True])
@pytest.mark.parametrize("eta", [1.0, 0.9])
def test_nms_matches_sequential_definition(seed, pixel, eta):
    rng = np.random.default_rng(seed)
    n = 60
    boxes = random_boxes(rng, n, pixel)
    boxes[10:20] = boxes[0] + rng.normal(0, 0.01 * (50 if pixel else 1), (10, 4))  # a dense cluster
    scores = rng.uniform(0, 1, n).round(2)  # ties: the stable order decides
    for thr, score_thr, top_k in [(0.45, None, -1), (0.3, 0.2, 25), (0.7, 0.5, -1)]:
        ours = nms(torch.tensor(boxes), torch.tensor(scores), thr, score_threshold=score_thr,
                   top_k=top_k, eta=eta, pixel=pixel).tolist()
        assert ours == reference_nms(boxes, scores, thr, score_thr, top_k, eta, pixel)


def test_score_order_is_stable_and_cut():
    s = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9])
    assert score_order(s).tolist() == [1, 4, 0, 2, 3]
    assert score_order(s, 0.4, 3).tolist() == [1, 4, 0]


def test_nms_of_nothing():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


@pytest.mark.parametrize("eta", [1.0, 0.8])
@pytest.mark.parametrize("pixel", [False, True])
def test_batched_nms_matches_nms_per_row(eta, pixel):
    from recaffe.boxes import batched_nms
    rng = np.random.default_rng(11)
    rows = [random_boxes(rng, 30, pixel) for _ in range(5)]
    boxes = torch.tensor(np.stack(rows))
    scores = torch.tensor(rng.uniform(0, 1, (5, 30)))
    scores[2] = 0.0  # a row without candidates
    scores[3, :10] = 0.5  # ties keep index order
    keep, order, vals = batched_nms(boxes, scores, 0.6, score_threshold=0.1, top_k=20, eta=eta, pixel=pixel)
    assert keep.shape == order.shape == vals.shape
    for r in range(5):
        got = order[r][keep[r]].tolist()
        want = reference_nms(rows[r], scores[r].tolist(), 0.6, 0.1, 20, eta, pixel)
        assert got == want
        assert got == nms(boxes[r], scores[r], 0.6, score_threshold=0.1, top_k=20, eta=eta, pixel=pixel).tolist()


@pytest.mark.parametrize("pixel", [False, True])
def test_nms_across_blocks_matches_sequential_definition(pixel):
    # more candidates than one block (recaffe.boxes._NMS_BLOCK): kept boxes of earlier blocks
    # must suppress later ones
    rng = np.random.default_rng(11)
    boxes = random_boxes(rng, 700, pixel)
    scores = rng.uniform(0, 1, 700)
    ours = nms(torch.tensor(boxes), torch.tensor(scores), 0.3, pixel=pixel).tolist()
    assert ours == reference_nms(boxes, scores, 0.3, None, -1, 1.0, pixel)
