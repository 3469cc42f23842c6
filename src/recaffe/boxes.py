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
:func:`nms` does this block by block (boxes kept in earlier blocks suppress first), so that its cost
grows with candidates x kept boxes rather than candidates squared.
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
    """``[..., n, m]`` Jaccard overlaps of boxes ``a [..., n, 4]`` and ``b [..., m, 4]`` (SSD's
    JaccardOverlap); leading dimensions broadcast (one matrix per image/class row)."""
    one = 1.0 if pixel else 0.0
    a, b = a[..., :, None, :], b[..., None, :, :]
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = rb - lt + one
    # boxes that do not intersect (SSD tests xmin > xmax of the other, strictly) overlap 0
    disjoint = ((b[..., 0] > a[..., 2]) | (b[..., 2] < a[..., 0])
                | (b[..., 1] > a[..., 3]) | (b[..., 3] < a[..., 1]))
    inter = torch.where(disjoint, torch.zeros_like(wh[..., 0]), wh[..., 0] * wh[..., 1])
    union = box_areas(a, pixel) + box_areas(b, pixel) - inter
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
    if eta < 1.0:
        return cand[_sequential_keep(iou_matrix(boxes[cand], boxes[cand], pixel), iou_threshold, eta)]
    # Blocks of candidates in score order: a block's boxes that a box kept in an earlier block
    # suppresses are out; the rest settle by the fixed point within the block. The cost grows with
    # n * kept instead of n * n (py-faster-rcnn's Proposal runs 6,000 candidates).
    ordered = boxes[cand]
    kept_boxes = ordered[:0]
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    for start in range(0, n, _NMS_BLOCK):
        block = ordered[start:start + _NMS_BLOCK]
        alive = torch.ones(block.shape[0], dtype=torch.bool, device=boxes.device)
        if kept_boxes.shape[0]:
            alive = ~(iou_matrix(block, kept_boxes, pixel) > iou_threshold).any(dim=1)
        s = torch.triu(iou_matrix(block, block, pixel) > iou_threshold, diagonal=1)  # [j, i]: j before i
        s = (s & alive[:, None]).to(torch.float32)
        mine = alive
        while True:
            new = alive & ((mine.to(torch.float32) @ s) == 0)
            if torch.equal(new, mine):
                break
            mine = new
        keep[start:start + block.shape[0]] = mine
        kept_boxes = torch.cat([kept_boxes, block[mine]])
    return cand[keep]


_NMS_BLOCK = 256


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


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, *,
                score_threshold: float | None = None, top_k: int = -1, eta: float = 1.0,
                pixel: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`nms` on R independent rows at once (SSD's per image and class NMS):
    ``boxes [R, P, 4]``, ``scores [R, P]``.

    Returns ``keep [R, K]`` (bool), ``order [R, K]`` (the candidates' indices into P, by descending
    score; ties keep index order) and their ``scores [R, K]``, K being the most candidates of any
    row (at most ``top_k``). With ``eta == 1`` the fixed point of :func:`nms` runs on all rows at
    once; with ``eta < 1`` the loop runs once per *kept* box of the busiest row (the next kept box of
    each row is its first candidate that no kept box suppresses at the current threshold).
    """
    r, p = scores.shape
    inf = float("inf")
    if score_threshold is not None:
        scores = torch.where(scores > score_threshold, scores, torch.full_like(scores, -inf))
    vals, order = torch.sort(scores, dim=1, descending=True, stable=True)
    k = int((vals > -inf).sum(dim=1).max()) if r and p else 0
    if top_k >= 0:
        k = min(k, top_k)
    vals, order = vals[:, :k], order[:, :k]
    valid = vals > -inf
    if k == 0:
        return valid, order, vals
    cand = boxes.gather(1, order.unsqueeze(-1).expand(r, k, 4))
    chunk = max(1, (1 << 25) // (k * k))  # IoU matrices of about 128 MiB at most at a time
    overlaps = torch.cat([iou_matrix(cand[i:i + chunk], cand[i:i + chunk], pixel) for i in range(0, r, chunk)])
    if eta >= 1.0:
        s = (torch.triu(overlaps > iou_threshold, diagonal=1) & valid[:, :, None]).to(overlaps.dtype)
        keep = valid
        while True:
            new = valid & ((keep.to(s.dtype).unsqueeze(1) @ s).squeeze(1) == 0)
            if torch.equal(new, keep):
                return keep, order, vals
            keep = new
    keep = torch.zeros_like(valid)
    remaining = valid.clone()
    threshold = torch.full((r,), iou_threshold, dtype=overlaps.dtype, device=overlaps.device)
    worst = torch.zeros((r, k), dtype=overlaps.dtype, device=overlaps.device)  # max overlap with a kept box
    rows = torch.arange(r, device=overlaps.device)
    while True:
        active = remaining.any(dim=1)
        if not bool(active.any()):
            return keep, order, vals
        first = remaining.to(torch.uint8).argmax(dim=1)
        keep[rows, first] |= active
        remaining[rows, first] = False
        worst = torch.where(active[:, None], torch.maximum(worst, overlaps[rows, first]), worst)
        threshold = torch.where(active & (threshold > 0.5), threshold * eta, threshold)
        remaining &= worst <= threshold[:, None]
