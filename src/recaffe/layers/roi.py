"""Region layers of the two-stage detectors: Faster R-CNN's ROIPooling, R-FCN's PSROIPooling and
the built-in Proposal layer (OpenCV's type for py-faster-rcnn's Python proposal layer).

ROIs are ``(R, 5)`` rows ``(batch_index, x1, y1, x2, y2)`` in image pixels. Everything runs on
whole tensors: a window per (ROI, bin) is an integer range, and

* max pooling reads each bin's max from a sparse table of block maxima (with their argmax):
  a bin is the union of four 2^a x 2^b blocks, so four gathers of C values per bin, whatever
  the bin's size;
* average pooling reads window sums from an integral image (float64), and its backward writes
  the four corners of each window into a difference image whose cumulative sums are the diff.

Arithmetic the forks do in the net's float type (coordinates times spatial_scale, bin sizes) is
done in the layer's dtype; C's ``round`` (half away from zero) is :func:`c_round`.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import boxes
from ..layer import Layer, register

FLT_MAX = 3.4028234663852886e38


def c_round(v: torch.Tensor) -> torch.Tensor:
    """C's round(): to the nearest integer, halves away from zero (torch.round goes to even)."""
    r = torch.round(v)
    t = torch.trunc(v)
    half = (v - t).abs() == 0.5
    return torch.where(half, t + torch.sign(v), r)


def _check_rois(layer: Layer, rois_shape, data_shape) -> None:
    if len(data_shape) != 4:
        raise layer.error(f"the data bottom must be 4-D (N, C, H, W), got shape {data_shape}")
    if len(rois_shape) < 2 or rois_shape[1] != 5 or any(d != 1 for d in rois_shape[2:]):
        raise layer.error(f"the rois bottom must be (R, 5) rows (batch_index, x1, y1, x2, y2), "
                          f"got shape {rois_shape} (data shape {data_shape})")


def _batch_indices(layer: Layer, rois: torch.Tensor, num: int) -> torch.Tensor:
    """The ROIs' batch indices as the forks read them (C's int conversion: truncation)."""
    b = torch.trunc(rois[:, 0]).long()
    bad = (b < 0) | (b >= num)
    if bool(bad.any()):
        raise layer.error(f"roi batch index out of range [0, {num}): {rois[bad, 0][:5].tolist()}")
    return b


@register("ROIPooling")
class ROIPoolingLayer(Layer):
    """Faster R-CNN's ROI max pooling (rbgirshick/caffe-fast-rcnn).

    Per ROI: its corners times spatial_scale, rounded (C's round); size max(end - start + 1, 1);
    bin (ph, pw) covers rows [floor(ph * h / pooled_h), ceil((ph + 1) * h / pooled_h)) from the
    start (likewise columns), clipped to the map. A bin with no pixel gives 0; otherwise the max,
    the first one in row-major order on ties (the fork's strict ``>``, starting from -FLT_MAX).

    Backward (the fork's GPU kernel; its CPU one is NOT_IMPLEMENTED) sends each output's diff to
    its argmax pixel, only where that pixel lies inside the rounded ROI (so a malformed ROI,
    end < start, passes nothing). The rois get no gradient (their diff is left untouched).
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def layer_setup(self, bottom, top):
        p = self.layer_param.roi_pooling_param
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise self.error(f"pooled_h and pooled_w must be > 0, got {p.pooled_h} x {p.pooled_w}")
        self.pooled_h, self.pooled_w = p.pooled_h, p.pooled_w
        self.spatial_scale = p.spatial_scale
        self._argmax: torch.Tensor | None = None

    def reshape(self, bottom, top):
        _check_rois(self, bottom[1].shape, bottom[0].shape)
        top[0].reshape(bottom[1].shape[0], bottom[0].shape[1], self.pooled_h, self.pooled_w)

    def _geometry(self, rois: torch.Tensor, height: int, width: int):
        """Rounded ROI corners (x1, y1, x2, y2) and each bin's clipped [start, end) rows/columns."""
        corners = c_round(rois[:, 1:5] * self.spatial_scale).long()
        x1, y1, x2, y2 = corners.unbind(1)
        rows = self._bins(y1, y2, self.pooled_h, height, rois.dtype)
        cols = self._bins(x1, x2, self.pooled_w, width, rois.dtype)
        return corners, rows, cols

    @staticmethod
    def _bins(start, end, pooled, size, dtype):
        extent = torch.clamp(end - start + 1, min=1).to(dtype)
        bin_size = extent / pooled
        p = torch.arange(pooled, dtype=dtype, device=start.device)
        lo = torch.floor(p[None, :] * bin_size[:, None]).long() + start[:, None]
        hi = torch.ceil((p[None, :] + 1) * bin_size[:, None]).long() + start[:, None]
        return lo.clamp(0, size), hi.clamp(0, size)

    def forward(self, bottom, top):
        x = bottom[0].data_t
        rois = bottom[1].data_t.reshape(-1, 5)
        n, c, h, w = x.shape
        r = rois.shape[0]
        b = _batch_indices(self, rois, n)
        _, (hs, he), (ws, we) = self._geometry(rois, h, w)
        lh, lw = he - hs, we - ws                                   # (R, PH), (R, PW)
        empty = (lh[:, :, None] <= 0) | (lw[:, None, :] <= 0)        # (R, PH, PW)
        if r == 0 or bool(empty.all()):
            top[0].data_t = torch.zeros(top[0].shape, dtype=x.dtype, device=x.device)
            self._argmax = torch.full(top[0].shape, -1, dtype=torch.long, device=x.device)
            return
        levels_h = _log2(int(lh.max()))
        levels_w = _log2(int(lw.max()))
        values, index = _range_max_table(x, levels_h, levels_w)    # (LH, LW, N, H, W, C)
        # each bin [hs, he) x [ws, we) is covered by four (possibly overlapping) blocks of
        # 2^kh x 2^kw pixels: kh = floor(log2(he - hs)), one at each corner
        kh = _floor_log2(lh.clamp(min=1))
        kw = _floor_log2(lw.clamp(min=1))
        top_rows = (hs, (he - (1 << kh)).clamp(min=0))
        left_cols = (ws, (we - (1 << kw)).clamp(min=0))
        level = (kh[:, :, None] * (levels_w + 1) + kw[:, None, :]) * n + b[:, None, None]
        best = arg = None
        for rows in top_rows:
            for cols in left_cols:
                pixel = rows.clamp(max=h - 1)[:, :, None] * w + cols.clamp(max=w - 1)[:, None, :]
                flat = (level * (h * w) + pixel).reshape(-1)       # (R * PH * PW)
                v = values.index_select(0, flat)                    # (R * PH * PW, C)
                i = index.index_select(0, flat)
                best, arg = (v, i) if best is None else _better(best, arg, v, i)
        shape = (r, self.pooled_h, self.pooled_w, c)
        best, arg = best.reshape(shape), arg.reshape(shape).long()
        found = best > -FLT_MAX  # the fork starts from -FLT_MAX and takes strictly greater values
        none = empty[..., None]
        out = torch.where(found, best, torch.full_like(best, -FLT_MAX)).masked_fill(none, 0)
        arg = torch.where(found, arg, torch.full_like(arg, -1)).masked_fill(none, -1)
        top[0].data_t = out.permute(0, 3, 1, 2).contiguous()
        self._argmax = arg.permute(0, 3, 1, 2).contiguous()

    def backward(self, top, propagate_down, bottom):
        # the rois get no gradient: the fork leaves their diff untouched, whatever propagate_down says
        if not propagate_down[0]:
            return
        x_shape = bottom[0].shape
        n, c, h, w = x_shape
        rois = bottom[1].data_t.reshape(-1, 5)
        dy = top[0].diff_t
        dx = torch.zeros(n * c * h * w, dtype=dy.dtype, device=dy.device)
        if rois.shape[0]:
            if self._argmax is None or self._argmax.shape != dy.shape:
                raise self.error("backward called without a matching forward (no argmax)")
            b = _batch_indices(self, rois, n)
            (x1, y1, x2, y2) = c_round(rois[:, 1:5] * self.spatial_scale).long().unbind(1)
            arg = self._argmax
            ah, aw = arg // w, arg % w
            view = (-1, 1, 1, 1)
            inside = ((arg >= 0) & (aw >= x1.view(view)) & (aw <= x2.view(view))
                      & (ah >= y1.view(view)) & (ah <= y2.view(view)))
            plane = (b.view(view) * c + torch.arange(c, device=dy.device).view(1, -1, 1, 1)) * (h * w)
            index = (plane + arg)[inside]
            dx.index_add_(0, index, dy[inside])
        bottom[0].diff_t = dx.reshape(x_shape)


@register("PSROIPooling")
class PSROIPoolingLayer(Layer):
    """R-FCN's position-sensitive ROI average pooling (daijifeng001/caffe-rfcn).

    The bottom has output_dim * group_size^2 channels; the top is (R, output_dim, group_size,
    group_size), bin (ph, pw) of output channel k averaging input channel
    (k * group_size + ph) * group_size + pw. ROI corners are rounded (C's round) *before* the
    scale, the end gets + 1: start = round(x1) * scale, end = (round(x2) + 1) * scale; size
    max(end - start, 0.1); bin rows [floor(start + ph * size / G), ceil(start + (ph + 1) * size / G))
    clipped to the map; an empty bin gives 0. Backward spreads each output's diff evenly over its
    window (the fork's GPU kernel; the CPU one is NOT_IMPLEMENTED); the rois' diff is zeroed.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def allow_force_backward(self, bottom_index):
        return bottom_index == 0

    def layer_setup(self, bottom, top):
        p = self.layer_param.psroi_pooling_param
        if p.output_dim <= 0:
            raise self.error(f"output_dim must be > 0, got {p.output_dim}")
        if p.group_size <= 0:
            raise self.error(f"group_size must be > 0, got {p.group_size}")
        self.spatial_scale = p.spatial_scale
        self.output_dim, self.group_size = p.output_dim, p.group_size
        self._windows = None

    def reshape(self, bottom, top):
        _check_rois(self, bottom[1].shape, bottom[0].shape)
        channels = bottom[0].shape[1]
        g = self.group_size
        if channels != self.output_dim * g * g:
            raise self.error(f"input channel number does not match layer parameters: the data bottom "
                             f"(shape {bottom[0].shape}) has {channels} channels, output_dim * "
                             f"group_size^2 = {self.output_dim} * {g}^2 = {self.output_dim * g * g}")
        top[0].reshape(bottom[1].shape[0], self.output_dim, g, g)

    def _windows_of(self, rois: torch.Tensor, n: int, c: int, h: int, w: int):
        """Flat integral-image corner indices (R, D, G, G, 4: hs/ws, hs/we, he/ws, he/we) of every
        output's window, its area (0: empty) and the index of its input plane."""
        g = self.group_size
        b = _batch_indices(self, rois, n)
        rounded = c_round(rois[:, 1:5])
        x1, y1 = rounded[:, 0] * self.spatial_scale, rounded[:, 1] * self.spatial_scale
        x2, y2 = (rounded[:, 2] + 1) * self.spatial_scale, (rounded[:, 3] + 1) * self.spatial_scale
        p = torch.arange(g, dtype=rois.dtype, device=rois.device)

        def bins(start, end, size):
            bin_size = torch.clamp(end - start, min=0.1) / g
            lo = torch.floor(p[None, :] * bin_size[:, None] + start[:, None]).long().clamp(0, size)
            hi = torch.ceil((p[None, :] + 1) * bin_size[:, None] + start[:, None]).long().clamp(0, size)
            return lo, hi

        hs, he = bins(y1, y2, h)                                              # (R, G)
        ws, we = bins(x1, x2, w)
        area = ((he - hs)[:, :, None] * (we - ws)[:, None, :]).clamp(min=0)  # (R, G, G)
        area = torch.where((he > hs)[:, :, None] & (we > ws)[:, None, :], area, torch.zeros_like(area))
        ctop = torch.arange(self.output_dim, device=rois.device)
        gi = torch.arange(g, device=rois.device)
        channel = (ctop[:, None, None] * g + gi[None, :, None]) * g + gi[None, None, :]  # (D, G, G)
        plane = b[:, None, None, None] * c + channel[None]                             # (R, D, G, G)
        wp = w + 1
        rows = torch.stack([hs, hs, he, he], -1)[:, None, :, None, :]  # (R, 1, G, 1, 4)
        cols = torch.stack([ws, we, ws, we], -1)[:, None, None, :, :]  # (R, 1, 1, G, 4)
        corners = (plane[..., None] * (h + 1) + rows) * wp + cols       # (R, D, G, G, 4)
        return corners, area[:, None].expand(-1, self.output_dim, -1, -1)

    def forward(self, bottom, top):
        x = bottom[0].data_t
        rois = bottom[1].data_t.reshape(-1, 5)
        n, c, h, w = x.shape
        corners, area = self._windows_of(rois, n, c, h, w)
        integral = torch.zeros((n, c, h + 1, w + 1), dtype=torch.float64, device=x.device)
        integral[:, :, 1:, 1:] = x.double().cumsum(2).cumsum(3)
        s = integral.reshape(-1)[corners.reshape(-1)].reshape(corners.shape)
        total = s[..., 0] - s[..., 1] - s[..., 2] + s[..., 3]
        out = torch.where(area > 0, total / area.clamp(min=1), torch.zeros_like(total))
        top[0].data_t = out.to(x.dtype).reshape(top[0].shape)
        self._windows = (corners, area)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # the fork zeroes the rois' diff (they get no gradient)
        bottom[1].diff_t = torch.zeros(bottom[1].shape, dtype=bottom[1].dtype, device=bottom[1].diff_t.device)
        n, c, h, w = bottom[0].shape
        dy = top[0].diff_t
        if self._windows is None or self._windows[1].shape != dy.shape:
            raise self.error("backward called without a matching forward")
        corners, area = self._windows
        share = torch.where(area > 0, dy.double() / area.clamp(min=1), torch.zeros_like(dy, dtype=torch.float64))
        signed = torch.stack([share, -share, -share, share], -1)
        marks = torch.zeros(n * c * (h + 1) * (w + 1), dtype=torch.float64, device=dy.device)
        marks.index_add_(0, corners.reshape(-1), signed.reshape(-1))
        dx = marks.reshape(n, c, h + 1, w + 1).cumsum(2).cumsum(3)[:, :, :h, :w]
        bottom[0].diff_t = dx.to(dy.dtype).contiguous()


# ------------------------------------------------------------------------------ Proposal
def generate_anchors(base_size: int, ratios, scales) -> np.ndarray:
    """py-faster-rcnn's reference anchors (A, 4) around the box (0, 0, base_size - 1,
    base_size - 1): for each ratio (outer) and each scale (inner), in float64 with numpy's round
    (halves to even), as generate_anchors.py computes them."""
    ratios = np.asarray(ratios, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    size = float(base_size)
    center = 0.5 * (size - 1)
    widths = np.round(np.sqrt(size * size / ratios))
    heights = np.round(widths * ratios)
    ws = (widths[:, None] * scales[None, :]).reshape(-1)
    hs = (heights[:, None] * scales[None, :]).reshape(-1)
    return np.stack([center - 0.5 * (ws - 1), center - 0.5 * (hs - 1),
                     center + 0.5 * (ws - 1), center + 0.5 * (hs - 1)], axis=1)


def bbox_transform_inv(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Boxes (x1, y1, x2, y2) from anchors and (dx, dy, dw, dh) deltas, pixel widths (+ 1)."""
    widths = anchors[:, 2] - anchors[:, 0] + 1.0
    heights = anchors[:, 3] - anchors[:, 1] + 1.0
    cx = anchors[:, 0] + 0.5 * widths
    cy = anchors[:, 1] + 0.5 * heights
    pcx = deltas[:, 0] * widths + cx
    pcy = deltas[:, 1] * heights + cy
    pw = torch.exp(deltas[:, 2]) * widths
    ph = torch.exp(deltas[:, 3]) * heights
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=1)


@register("Proposal")
class ProposalLayer(Layer):
    """Region proposals from an RPN, as py-faster-rcnn's ``rpn.proposal_layer`` at TEST time,
    configured by ``proposal_param`` (OpenCV's built-in form of that Python layer).

    Bottoms: rpn_cls_prob_reshape (1, 2A, H, W) (the last A channels are the object scores),
    rpn_bbox_pred (1, 4A, H, W), im_info (1, 3) = (height, width, scale). Anchors: A =
    len(ratio) * len(scale) boxes from base_size (defaults ratio 0.5, 1, 2 and scale 8, 16, 32),
    shifted by feat_stride over the H x W cells, in (h, w, anchor) order. Then: deltas applied,
    boxes clipped to the image, boxes narrower or shorter than min_size * im_info[2] dropped,
    the pre_nms_topn best kept, greedy NMS at nms_thresh (pixel IoU), the post_nms_topn first
    kept. Tops: rois (N, 5) = (0, x1, y1, x2, y2) and, optionally, their scores (N, 1).
    Forward only.
    """

    exact_num_bottom_blobs = 3
    min_top_blobs = 1
    max_top_blobs = 2

    def allow_force_backward(self, bottom_index):
        return False

    def layer_setup(self, bottom, top):
        p = self.layer_param.proposal_param
        ratios = list(p.ratio) or [0.5, 1.0, 2.0]
        scales = list(p.scale) or [8.0, 16.0, 32.0]
        if any(r <= 0 for r in ratios) or any(s <= 0 for s in scales):
            raise self.error(f"ratio and scale values must be positive, got ratio {ratios}, scale {scales}")
        if p.feat_stride <= 0 or p.base_size <= 0:
            raise self.error(f"feat_stride and base_size must be positive, got {p.feat_stride}, "
                             f"{p.base_size}")
        self.feat_stride = p.feat_stride
        self.min_size = p.min_size
        self.pre_nms_topn, self.post_nms_topn = p.pre_nms_topn, p.post_nms_topn
        self.nms_thresh = p.nms_thresh
        self.anchors = generate_anchors(p.base_size, ratios, scales)
        self.num_anchors = self.anchors.shape[0]

    def reshape(self, bottom, top):
        scores, deltas, info = (b.shape for b in bottom)
        a = self.num_anchors
        if len(scores) != 4 or scores[0] != 1 or scores[1] != 2 * a:
            raise self.error(f"rpn_cls_prob_reshape must be (1, 2A, H, W) with A = {a} anchors: "
                             f"got shape {scores} (only single-image batches are supported)")
        if len(deltas) != 4 or deltas[0] != 1 or deltas[1] != 4 * a or deltas[2:] != scores[2:]:
            raise self.error(f"rpn_bbox_pred must be (1, 4A, H, W) = (1, {4 * a}, {scores[2]}, "
                             f"{scores[3]}) to match the scores of shape {scores}: got shape {deltas}")
        if len(info) < 2 or info[0] != 1 or info[1] < 3:
            raise self.error(f"im_info must be (1, 3) = (height, width, scale), got shape {info}")
        # py-faster-rcnn's setup shape; forward gives the real number of proposals
        if len(top[0].shape) != 2:
            top[0].reshape(1, 5)
        if len(top) > 1 and len(top[1].shape) != 2:
            top[1].reshape(1, 1)

    def forward(self, bottom, top):
        prob, pred = bottom[0].data_t, bottom[1].data_t
        info = bottom[2].data_t.reshape(-1)
        dtype, device = prob.dtype, prob.device
        a = self.num_anchors
        height, width = prob.shape[2:]
        sx = torch.arange(width, device=device) * self.feat_stride
        sy = torch.arange(height, device=device) * self.feat_stride
        shift_y, shift_x = torch.meshgrid(sy, sx, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], -1).reshape(-1, 1, 4)
        anchors = torch.as_tensor(self.anchors, device=device)[None] + shifts  # float64, (K, A, 4)
        anchors = anchors.reshape(-1, 4).to(dtype)
        deltas = pred[0].permute(1, 2, 0).reshape(-1, 4)
        scores = prob[0, a:].permute(1, 2, 0).reshape(-1)
        proposals = bbox_transform_inv(anchors, deltas)
        im_h, im_w, im_scale = info[0], info[1], info[2]
        limit = torch.stack([im_w - 1, im_h - 1, im_w - 1, im_h - 1])
        proposals = torch.minimum(proposals, limit).clamp(min=0)
        min_size = self.min_size * im_scale
        ws = proposals[:, 2] - proposals[:, 0] + 1
        hs = proposals[:, 3] - proposals[:, 1] + 1
        keep = torch.nonzero((ws >= min_size) & (hs >= min_size)).reshape(-1)
        proposals, scores = proposals[keep], scores[keep]
        # numpy's argsort()[::-1]: descending, ties with the later proposal first
        order = torch.sort(scores, stable=True).indices.flip(0)
        if self.pre_nms_topn > 0:
            order = order[:self.pre_nms_topn]
        proposals, scores = proposals[order], scores[order]
        kept = boxes.nms(proposals, scores, self.nms_thresh, pixel=True)
        if self.post_nms_topn > 0:
            kept = kept[:self.post_nms_topn]
        proposals, scores = proposals[kept], scores[kept]
        rois = torch.cat([torch.zeros_like(proposals[:, :1]), proposals], dim=1)
        top[0].reshape(rois.shape)
        top[0].data_t = rois.contiguous()
        if len(top) > 1:
            top[1].reshape(scores.shape[0], 1)
            top[1].data_t = scores.reshape(-1, 1).contiguous()

    def backward(self, top, propagate_down, bottom):
        pass  # py-faster-rcnn's proposal layer does not propagate gradients


def _log2(length: int) -> int:
    """floor(log2(length)) for a positive int."""
    return max(length, 1).bit_length() - 1


def _floor_log2(t: torch.Tensor) -> torch.Tensor:
    """floor(log2(t)) of positive int64 values, exactly."""
    k = torch.floor(torch.log2(t.to(torch.float64))).long()
    k = torch.where((1 << (k + 1)) <= t, k + 1, k)  # guard the float log
    return torch.where((1 << k) > t, k - 1, k)


def _better(v1, i1, v2, i2):
    """The max of two (value, flat pixel index) candidates; on equal values the smaller index
    (the first pixel in row-major order, as the fork's scan keeps its first maximum)."""
    take = (v2 > v1) | ((v2 == v1) & (i2 < i1))
    return torch.where(take, v2, v1), torch.where(take, i2, i1)


def _range_max_table(x: torch.Tensor, levels_h: int, levels_w: int):
    """Sparse table of block maxima with their argmax: entry (a, b, n, h, w) holds the max over
    rows [h, h + 2^a) and columns [w, w + 2^b) of image n (valid where the block fits), per
    channel. Returned flattened to rows of C values: (LH * LW * N * H * W, C), index int32."""
    n, c, h, w = x.shape
    v = x.permute(0, 2, 3, 1)                                         # (N, H, W, C)
    i = (torch.arange(h * w, device=x.device, dtype=torch.int32).reshape(1, h, w, 1)
         .expand(n, h, w, c))
    columns = [(v, i)]
    for k in range(1, levels_w + 1):  # blocks along W: combine two halves 2^(k-1) apart
        pv, pi = columns[-1]
        step = 1 << (k - 1)
        sv, si = pv.clone(), pi.clone()
        if step < w:
            sv[:, :, :w - step], si[:, :, :w - step] = _better(pv[:, :, :w - step], pi[:, :, :w - step],
                                                              pv[:, :, step:], pi[:, :, step:])
        columns.append((sv, si))
    table_v = torch.empty((levels_h + 1, levels_w + 1, n, h, w, c), dtype=x.dtype, device=x.device)
    table_i = torch.empty((levels_h + 1, levels_w + 1, n, h, w, c), dtype=torch.int32, device=x.device)
    for kw, (cv, ci) in enumerate(columns):
        table_v[0, kw], table_i[0, kw] = cv, ci
        for kh in range(1, levels_h + 1):  # then along H
            pv, pi = table_v[kh - 1, kw], table_i[kh - 1, kw]
            step = 1 << (kh - 1)
            table_v[kh, kw], table_i[kh, kw] = pv, pi
            if step < h:
                table_v[kh, kw, :, :h - step], table_i[kh, kw, :, :h - step] = _better(
                    pv[:, :h - step], pi[:, :h - step], pv[:, step:], pi[:, step:])
    return table_v.reshape(-1, c), table_i.reshape(-1, c)
