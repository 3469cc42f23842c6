"""Box arithmetic shared by the detection layers: areas, IoU and greedy non-maximum suppression.

Boxes are ``[..., 4]`` tensors ``(xmin, ymin, xmax, ymax)``. Two conventions exist in the forks:
*normalized* boxes (SSD: coordinates in [0, 1], width = xmax - xmin) and *pixel* boxes
(py-faster-rcnn, and SSD with ``normalized_bbox: false``: width = xmax - xmin + 1). ``pixel``
selects the second. A box with xmax < xmin or ymax < ymin has area 0, as SSD's ``BBoxSize``.

Greedy NMS is sequential by definition (a box is kept when no *kept* box before it overlaps it too
much). Here it is computed without a per-box Python loop: with ``S[j, i]`` = "box j would suppress
box i" (j before i in score order, IoU above the threshold), the kept set is the unique fixed point
of ``keep[i] = not any(S[j, i] and keep[j])``, reached by iterating a matrix-vector product; the
number of rounds is the length of the longest suppression chain (a few in practice, at most n).
SSD's adaptive threshold (``eta < 1``) makes the threshold depend on how many boxes were kept
before, so that case runs the plain sequential loop.
"""
from __future__ import annotations

import torch


def box_areas(boxes: torch.Tensor, pixel: bool = False) -> torch.Tensor:
    """Areas of ``[..., 4]`` boxes; 0 for boxes whose max is below their min."""
    one = 1.0 if pixel else 0.0
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    valid = (w >= 0) & (h >= 0)
    return torch.where(valid, (w + one) * (h + one), torch.zeros_like(w))


def iou_matrix(a: torch.Tensor, b: torch.Tensor, pixel: bool = False) -> torch.Tensor:
    """``[n, m]`` Jaccard overlaps of boxes ``a [n, 4]`` and ``b [m, 4]`` (SSD's JaccardOverlap)."""
    one = 1.0 if pixel else 0.0
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = rb - lt + one
    # boxes that do not intersect (SSD tests xmin > xmax of the other, strictly) overlap 0
    disjoint = ((b[None, :, 0] > a[:, None, 2]) | (b[None, :, 2] < a[:, None, 0])
                | (b[None, :, 1] > a[:, None, 3]) | (b[None, :, 3] < a[:, None, 1]))
    inter = torch.where(disjoint, torch.zeros_like(wh[..., 0]), wh[..., 0] * wh[..., 1])
    union = box_areas(a, pixel)[:, None] + box_areas(b, pixel)[None, :] - inter
    return torch.where(inter > 0, inter / union, torch.zeros_like(inter))


def score_order(scores: torch.Tensor, score_threshold: float | None = None, top_k: int = -1) -> torch.Tensor:
    """Indices of ``scores`` above the threshold, by descending score (ties keep index order, as
    SSD's stable sort), cut to ``top_k`` when it is non-negative."""
    idx = torch.arange(scores.numel(), device=scores.device)
    if score_threshold is not None:
        idx = idx[scores > score_threshold]
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    idx = idx[order]
    return idx[:top_k] if top_k >= 0 else idx


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, *,
        score_threshold: float | None = None, top_k: int = -1, eta: float = 1.0,
        pixel: bool = False) -> torch.Tensor:
    """Greedy NMS as SSD's ApplyNMSFast: the indices of the kept boxes, by descending score.

    A candidate is kept when its overlap with every kept box is ``<= threshold``; after each keep,
    with ``eta < 1`` and a threshold above 0.5, the threshold is multiplied by ``eta``.
    """
    cand = score_order(scores, score_threshold, top_k)
    n = cand.numel()
    if n == 0:
        return cand
    overlaps = iou_matrix(boxes[cand], boxes[cand], pixel)
    if eta < 1.0:
        return cand[_sequential_keep(overlaps, iou_threshold, eta)]
    suppresses = torch.triu(overlaps > iou_threshold, diagonal=1)  # [j, i]: j before i
    s = suppresses.to(torch.float32)
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    while True:
        new = (keep.to(torch.float32) @ s) == 0
        if torch.equal(new, keep):
            return cand[keep]
        keep = new


def _sequential_keep(overlaps: torch.Tensor, threshold: float, eta: float) -> torch.Tensor:
    """SSD's adaptive-threshold NMS, box by box (only for eta < 1)."""
    ov = overlaps.tolist()
    kept: list[int] = []
    for i in range(len(ov)):
        if all(ov[i][k] <= threshold for k in kept):
            kept.append(i)
            if threshold > 0.5:
                threshold *= eta
    return torch.tensor(kept, dtype=torch.long, device=overlaps.device)
