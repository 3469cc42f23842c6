"""SSD's training loss (weiliu89/caffe, branch ssd): ``MultiBoxLoss``.

Bottoms: location predictions ``[N, P*L*4]`` (L = 1 with ``share_location``, else num_classes),
confidences ``[N, P*C]``, priors ``[1, 2, P*4]`` (boxes, then variances, as PriorBox writes them) and
ground truth ``[1, 1, G, 8]`` rows ``[image, label, instance, xmin, ymin, xmax, ymax, difficult]``.
The forward follows the fork step by step: match priors (or decoded predictions) to ground truth
(bipartite, then per prediction), mine negatives (MAX_NEGATIVE by confidence loss, or HARD_EXAMPLE),
encode the matched boxes, and add a SmoothL1/L2 location loss and a softmax/logistic confidence loss,
both divided by the normalizer (VALID: the number of matches). Backward writes the fork's gradients:
each loss's gradient at the selected rows, scattered back to the predictions (with
``encode_variance_in_target`` the fork divides predictions and targets by the variance and does *not*
apply that factor again in backward; we follow it).

Matching runs on tensors, one round per ground-truth box (the bipartite step is greedy and
sequential by definition), with the fork's tie rules: the lowest prior index, then the lowest
ground-truth index.
"""
from __future__ import annotations

import torch

from ..boxes import box_areas, iou_matrix, nms
from ..layer import register
from ..proto import caffe_pb2
from .detection import decode_boxes
from .loss import FLT_MIN, LossLayer, _normalization_mode

_P = caffe_pb2.MultiBoxLossParameter
_Code = caffe_pb2.PriorBoxParameter
_Norm = caffe_pb2.LossParameter
SHARED = -1  # the label key of shared locations (the fork's -1)


def encode_boxes(priors, variances, boxes, code_type, variance_in_target):
    """SSD's EncodeBBox for matched pairs: ``boxes`` relative to ``priors`` (both ``[M, 4]``)."""
    if code_type == _Code.CORNER:
        out = boxes - priors
        return out if variance_in_target else out / variances
    pw = priors[:, 2] - priors[:, 0]
    ph = priors[:, 3] - priors[:, 1]
    if code_type == _Code.CORNER_SIZE:
        out = (boxes - priors) / torch.stack([pw, ph, pw, ph], 1)
        return out if variance_in_target else out / variances
    if code_type != _Code.CENTER_SIZE:
        raise ValueError(f"unknown code_type {code_type}")
    pcx, pcy = (priors[:, 0] + priors[:, 2]) / 2, (priors[:, 1] + priors[:, 3]) / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bcx, bcy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    out = torch.stack([(bcx - pcx) / pw, (bcy - pcy) / ph, torch.log(bw / pw), torch.log(bh / ph)], 1)
    return out if variance_in_target else out / variances


def match_boxes(gt, preds, match_type, overlap_threshold, ignore_cross_boundary):
    """SSD's MatchBBox: for each of ``preds [P, 4]`` the index of its ground truth in ``gt [G, 4]``
    (-1 none, -2 ignored cross-boundary box) and its overlap."""
    num_pred = preds.shape[0]
    match = torch.full((num_pred,), -1, dtype=torch.long, device=preds.device)
    if gt.shape[0] == 0:
        return match, torch.zeros(num_pred, dtype=preds.dtype, device=preds.device)
    ov = iou_matrix(preds, gt)
    ov = torch.where(ov > 1e-6, ov, torch.full_like(ov, -1.0))  # the fork keeps overlaps > 1e-6 only
    if ignore_cross_boundary:
        cross = ((preds[:, :2] < 0) | (preds[:, 2:] > 1)).any(1)
        match[cross] = -2
        ov[cross] = -1.0
    best = ov.max(1).values.clamp(min=0)
    overlap = best.clone()
    # Bipartite: repeatedly the globally best (prior, gt) pair among unmatched priors and gts.
    free_gt = torch.ones(gt.shape[0], dtype=torch.bool, device=preds.device)
    work = ov.clone()
    for _ in range(gt.shape[0]):
        flat = int(torch.argmax(work))  # row-major: ties go to the lowest prior, then the lowest gt
        i, j = divmod(flat, gt.shape[0])
        if work[i, j] <= 0:
            break
        match[i] = j
        overlap[i] = ov[i, j]
        work[i, :] = -1.0
        work[:, j] = -1.0
        free_gt[j] = False
    if match_type == _P.PER_PREDICTION:
        cand = torch.where(ov >= overlap_threshold, ov, torch.full_like(ov, -1.0))
        val, arg = cand.max(1)  # first maximum: the lowest gt index, as the fork's strict '>'
        take = (match == -1) & (val > 0)
        match[take] = arg[take]
        overlap[take] = val[take]
    elif match_type != _P.BIPARTITE:
        raise ValueError(f"unknown match_type {match_type}")
    return match, overlap


@register("MultiBoxLoss")
class MultiBoxLossLayer(LossLayer):
    exact_num_bottom_blobs = 4

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index < 2  # never the priors or the ground truth

    def layer_setup(self, bottom, top):
        p = self.layer_param.multibox_loss_param
        if not p.HasField("num_classes"):
            raise self.error("multibox_loss_param.num_classes must be given")
        if p.num_classes < 1:
            raise self.error(f"num_classes should be at least 1, got {p.num_classes}")
        self.p = p
        self.num_classes = p.num_classes
        self.loc_classes = 1 if p.share_location else p.num_classes
        self.mining = p.mining_type
        if p.HasField("do_neg_mining") and p.do_neg_mining != (p.mining_type != _P.NONE):
            raise self.error("do_neg_mining (deprecated) contradicts mining_type")
        if self.mining != _P.NONE and not p.share_location:
            raise self.error("negative mining needs share_location: true (as in the SSD fork)")
        if p.conf_loss_type == _P.SOFTMAX and not 0 <= p.background_label_id < p.num_classes:
            raise self.error(f"background_label_id {p.background_label_id} must be within "
                             f"[0, {p.num_classes}) for the SOFTMAX confidence loss")
        if p.map_object_to_agnostic:
            raise self.error("map_object_to_agnostic is not supported")
        self.normalization = _normalization_mode(self.layer_param.loss_param, _Norm.VALID)
        # The fork adds propagate_down true, true, false, false when none is given, and counts a
        # loss term only when its bottom propagates.
        pd = list(self.layer_param.propagate_down) or [True, True, False, False]
        self.use_loc, self.use_conf = bool(pd[0]), bool(pd[1])

    def reshape(self, bottom, top):
        loc, conf, prior, gt = bottom
        if prior.num_axes < 3 or prior.shape[-1] % 4 or gt.num_axes < 3:
            raise self.error(f"priors must be [1, 2, P*4] and ground truth [1, 1, G, 8]: got "
                             f"{prior.shape} and {gt.shape}")
        self.num = loc.shape[0]
        self.num_priors = prior.shape[2] // 4
        if conf.shape[0] != self.num:
            raise self.error(f"location and confidence batches differ: {loc.shape} vs {conf.shape}")
        if loc.count(1) != self.num_priors * self.loc_classes * 4:
            raise self.error(f"number of priors ({self.num_priors}) must match the location "
                             f"predictions: {loc.shape} holds {loc.count(1)} values per image, expected "
                             f"{self.num_priors * self.loc_classes * 4}")
        if conf.count(1) != self.num_priors * self.num_classes:
            raise self.error(f"number of priors ({self.num_priors}) must match the confidence "
                             f"predictions: {conf.shape} holds {conf.count(1)} values per image, expected "
                             f"{self.num_priors * self.num_classes}")
        top[0].reshape(())

    # ------------------------------------------------------------------ forward
    def _ground_truth(self, gt):
        """Per image: ``(boxes [g, 4], labels [g])`` of the rows kept (the fork's GetGroundTruth)."""
        rows = gt.reshape(-1, 8)
        rows = rows[rows[:, 0] != -1]
        labels = rows[:, 1].to(torch.long)
        if (labels == self.p.background_label_id).any():
            raise self.error("found the background label in the ground truth")
        if not self.p.use_difficult_gt:
            rows = rows[rows[:, 7] == 0]
            labels = rows[:, 1].to(torch.long)
        items = rows[:, 0].to(torch.long)
        # all boxes in one table (rows of image i start at offset[i]) for indexing matched pairs
        order = torch.sort(items, stable=True).indices
        self.gt_boxes, self.gt_labels = rows[order, 3:7], labels[order]
        gts, start = {}, 0
        for i in torch.unique(items).tolist():
            k = int((items == i).sum())
            gts[int(i)] = (self.gt_boxes[start:start + k], self.gt_labels[start:start + k], start)
            start += k
        return gts

    def _match_image(self, gt_boxes, gt_labels, priors, variances, loc_i):
        """{label: (match [P], overlap [P])} for one image, as the fork's FindMatches."""
        p = self.p
        out = {}
        if p.use_prior_for_matching:
            match, overlap = match_boxes(gt_boxes, priors, p.match_type, p.overlap_threshold,
                                         p.ignore_cross_boundary_bbox)
            if p.share_location:
                out[SHARED] = (match, overlap)
            else:
                for c in range(self.loc_classes):
                    if c == p.background_label_id:
                        continue
                    same = (match > -1) & (gt_labels[match.clamp(min=0)] == c)
                    out[c] = (torch.where(same, match, torch.full_like(match, -1)), overlap)
            return out
        for c in range(self.loc_classes):
            label = SHARED if p.share_location else c
            if not p.share_location and c == p.background_label_id:
                continue
            decoded = decode_boxes(loc_i[:, c], priors, variances, code_type=p.code_type,
                                   variance_encoded_in_target=p.encode_variance_in_target)
            keep = torch.arange(gt_boxes.shape[0], device=gt_boxes.device)
            if label != SHARED:
                keep = keep[gt_labels == label]
            match, overlap = match_boxes(gt_boxes[keep], decoded, p.match_type, p.overlap_threshold,
                                         p.ignore_cross_boundary_bbox)
            match = torch.where(match > -1, keep[match.clamp(min=0)] if keep.numel() else match, match)
            out[label] = (match, overlap)
        return out

    def _conf_loss_per_prior(self, conf_i, label_of_prior):
        """The fork's ComputeConfLoss: each prior's loss for its label (background if unmatched)."""
        if self.p.conf_loss_type == _P.SOFTMAX:
            shifted = conf_i - conf_i.max(1, keepdim=True).values
            e = torch.exp(shifted)
            prob = e.gather(1, label_of_prior[:, None])[:, 0] / e.sum(1)
            return -torch.log(prob.clamp(min=FLT_MIN))
        target = torch.zeros_like(conf_i)
        target.scatter_(1, label_of_prior[:, None], 1.0)
        return _logistic_loss(conf_i, target).sum(1)

    def forward(self, bottom, top):
        p = self.p
        loc_b, conf_b, prior_b, gt_b = bottom
        n, np_, nc = self.num, self.num_priors, self.num_classes
        loc = loc_b.data_t.reshape(n, np_, self.loc_classes, 4)
        conf = conf_b.data_t.reshape(n, np_, nc)
        priors = prior_b.data_t.reshape(-1, np_ * 4)[0].reshape(np_, 4)
        variances = prior_b.data_t.reshape(-1, np_ * 4)[1].reshape(np_, 4)
        gts = self._ground_truth(gt_b.data_t)

        matches = []  # per image: {label: (match, overlap)}
        for i in range(n):
            if i not in gts:
                matches.append({})
                continue
            matches.append(self._match_image(gts[i][0], gts[i][1], priors, variances, loc[i]))

        num_matches = sum(int((m > -1).sum()) for mi in matches for m, _ in mi.values())
        negatives = [torch.zeros(0, dtype=torch.long, device=loc.device) for _ in range(n)]
        if self.mining != _P.NONE:
            num_matches, negatives = self._mine(matches, gts, loc, conf, priors, variances, num_matches)
        self.num_matches = num_matches

        # Location loss over the matched priors, in the fork's order: image, label, prior.
        sel = self._matched_rows(matches, gts)
        self.loc_rows = sel
        loss = loc_b.data_t.new_zeros(())
        norm = self._normalizer(num_matches)
        self.norm = norm
        if sel is not None:
            pred, target = self._encode_matched(sel, gts, loc, priors, variances)
            d = pred - target
            if p.loc_loss_type == _P.SMOOTH_L1:
                ad = d.abs()
                loc_loss = torch.where(ad < 1, 0.5 * d * d, ad - 0.5).sum()
                self.loc_grad = torch.where(ad < 1, d, torch.sign(d)) * p.loc_weight
            elif p.loc_loss_type == _P.L2:
                loc_loss = (d * d).sum() / 2
                self.loc_grad = d * p.loc_weight
            else:
                raise self.error(f"unknown loc_loss_type {p.loc_loss_type}")
            if self.use_loc:
                loss = loss + p.loc_weight * loc_loss / norm

        # Confidence loss: matched priors and mined negatives, or every prior without mining.
        rows, labels = self._conf_rows(matches, gts, negatives, conf)
        self.conf_rows = rows
        if rows is not None:
            pred = conf[rows[0], rows[1]] if self.mining != _P.NONE else conf.reshape(n * np_, nc)
            if p.conf_loss_type == _P.SOFTMAX:
                prob = torch.softmax(pred, 1)
                picked = prob.gather(1, labels[:, None])[:, 0]
                conf_loss = -torch.log(picked.clamp(min=FLT_MIN)).sum()
                grad = prob.clone()
                grad[torch.arange(grad.shape[0], device=grad.device), labels] -= 1
            else:
                # The fork fills every target with background_label_id (0 in practice), then sets 1 at
                # the label of matched priors and, when mining, at the background of the negatives;
                # without mining an unmatched prior's targets keep the fill value.
                target = torch.full_like(pred, float(p.background_label_id))
                hot = self.conf_hot & (labels >= 0) & (labels < nc)
                target[hot.nonzero()[:, 0], labels[hot]] = 1.0
                conf_loss = _logistic_loss(pred, target).sum()
                grad = torch.sigmoid(pred) - target
            self.conf_grad = grad
            if self.use_conf:
                loss = loss + conf_loss / norm
        top[0].data_t = loss.to(loc_b.dtype).reshape(())

    def _normalizer(self, num_matches: int) -> float:
        mode = self.normalization
        if mode == _Norm.FULL:
            v = self.num * self.num_priors
        elif mode == _Norm.VALID:
            v = num_matches
        elif mode == _Norm.BATCH_SIZE:
            v = self.num
        else:
            v = 1
        return float(max(1, v))

    def _matched_rows(self, matches, gts):
        """(image, loc column, prior, gt row in the table) of every matched prior, in the fork's
        order (image, label, prior); None when nothing matched."""
        parts = []
        for i, mi in enumerate(matches):
            for label in sorted(mi):
                m = mi[label][0]
                j = (m > -1).nonzero()[:, 0]
                if j.numel():
                    column = 0 if label == SHARED else label
                    parts.append(torch.stack([torch.full_like(j, i), torch.full_like(j, column), j,
                                              m[j] + gts[i][2]], 1))
        return torch.cat(parts) if parts else None

    def _encode_matched(self, sel, gts, loc, priors, variances):
        p = self.p
        img, column, j, g = sel.unbind(1)
        target = encode_boxes(priors[j], variances[j], self.gt_boxes[g], p.code_type,
                              p.encode_variance_in_target)
        pred = loc[img, j, column]
        if p.bp_inside:
            box = priors[j] if p.use_prior_for_matching else decode_boxes(
                pred, priors[j], variances[j], code_type=p.code_type,
                variance_encoded_in_target=p.encode_variance_in_target)
            outside = (box < 0) | (box > 1)
            pred = torch.where(outside, target, pred)
        if p.encode_variance_in_target:
            pred = pred / variances[j]
            target = target / variances[j]
        return pred, target

    def _conf_rows(self, matches, gts, negatives, conf):
        """(rows as (image, prior) index tensors, labels) of the confidence loss, or (None, None)."""
        p = self.p
        n, np_ = self.num, self.num_priors
        if self.mining == _P.NONE:
            labels = torch.full((n, np_), p.background_label_id, dtype=torch.long, device=conf.device)
            matched = torch.zeros((n, np_), dtype=torch.bool, device=conf.device)
            for i, mi in enumerate(matches):
                for label in sorted(mi):
                    m = mi[label][0]
                    hit = m > -1
                    labels[i, hit] = gts[i][1][m[hit]]
                    matched[i] |= hit
            # the LOGISTIC targets of unmatched priors stay at the fill value (see forward)
            self.conf_hot = matched.reshape(-1)
            return (torch.arange(n * np_, device=conf.device),), labels.reshape(-1)
        imgs, priors_idx, labels = [], [], []
        for i, mi in enumerate(matches):
            if i not in gts:
                continue
            for label in sorted(mi):
                m = mi[label][0]
                j = (m > -1).nonzero()[:, 0]
                imgs.append(torch.full_like(j, i))
                priors_idx.append(j)
                labels.append(gts[i][1][m[j]])
            neg = negatives[i]
            imgs.append(torch.full_like(neg, i))
            priors_idx.append(neg)
            labels.append(torch.full_like(neg, p.background_label_id))
        if not imgs or sum(t.numel() for t in imgs) == 0:
            return None, None
        labels = torch.cat(labels)
        self.conf_hot = torch.ones_like(labels, dtype=torch.bool)
        return (torch.cat(imgs), torch.cat(priors_idx)), labels

    def _mine(self, matches, gts, loc, conf, priors, variances, num_matches):
        """The fork's MineHardExamples: negatives per image (ascending prior index); HARD_EXAMPLE
        also drops matches that were not selected."""
        p = self.p
        negatives = []
        loc_loss_all = None
        if self.mining == _P.HARD_EXAMPLE:
            loc_loss_all = self._loc_loss_per_prior(matches, gts, loc, priors, variances)
        for i, mi in enumerate(matches):
            label_of_prior = torch.full((self.num_priors,), p.background_label_id, dtype=torch.long,
                                        device=conf.device)
            for label in sorted(mi, reverse=True):  # the first matching label wins, as the fork
                m = mi[label][0]
                hit = m > -1
                label_of_prior[hit] = gts[i][1][m[hit]]
            loss = self._conf_loss_per_prior(conf[i], label_of_prior)
            if loc_loss_all is not None:
                loss = loss + loc_loss_all[i]
            neg = []
            for label in sorted(mi):
                match, overlap = mi[label]
                if self.mining == _P.MAX_NEGATIVE:
                    eligible = (match == -1) & (overlap < p.neg_overlap)
                    num_sel = min(int(int((match > -1).sum()) * p.neg_pos_ratio), int(eligible.sum()))
                else:
                    if p.sample_size <= 0:
                        raise self.error("HARD_EXAMPLE mining needs sample_size > 0")
                    eligible = torch.ones_like(match, dtype=torch.bool)
                    num_sel = min(p.sample_size, int(eligible.sum()))
                cand = eligible.nonzero()[:, 0]
                if p.HasField("nms_param") and p.nms_param.nms_threshold > 0:
                    boxes = priors if p.use_prior_for_nms else decode_boxes(
                        loc[i][:, 0], priors, variances, code_type=p.code_type,
                        variance_encoded_in_target=p.encode_variance_in_target)
                    order = _apply_nms(boxes[cand], loss[cand], p.nms_param.nms_threshold,
                                       p.nms_param.top_k)  # the fork reads top_k even when unset (0)
                    chosen = cand[order[:num_sel]]
                else:
                    order = torch.sort(loss[cand], descending=True, stable=True).indices
                    chosen = cand[order[:num_sel]]
                selected = torch.zeros_like(eligible)
                selected[chosen] = True
                if self.mining == _P.HARD_EXAMPLE:
                    dropped = (match > -1) & ~selected
                    num_matches -= int(dropped.sum())
                    match[dropped] = -1
                neg.append(((match == -1) & selected).nonzero()[:, 0])
            negatives.append(torch.cat(neg) if neg else torch.zeros(0, dtype=torch.long, device=conf.device))
        return num_matches, negatives

    def _loc_loss_per_prior(self, matches, gts, loc, priors, variances):
        """The fork's ComputeLocLoss: each matched prior's location loss (HARD_EXAMPLE mining)."""
        p = self.p
        out = [torch.zeros(self.num_priors, dtype=loc.dtype, device=loc.device) for _ in matches]
        sel = self._matched_rows(matches, gts)
        if sel is None:
            return out
        pred, target = self._encode_matched(sel, gts, loc, priors, variances)
        d = pred - target
        per = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5) if p.loc_loss_type == _P.SMOOTH_L1 \
            else 0.5 * d * d
        table = torch.stack(out)
        table[sel[:, 0], sel[:, 2]] = per.sum(1)
        return table

    # ------------------------------------------------------------------ backward
    def backward(self, top, propagate_down, bottom):
        if len(propagate_down) > 2 and propagate_down[2]:
            raise self.error("cannot backpropagate to prior inputs (bottom 2)")
        if len(propagate_down) > 3 and propagate_down[3]:
            raise self.error("cannot backpropagate to label inputs (bottom 3)")
        scale = top[0].diff_t.reshape(()) / self.norm
        loc_b, conf_b = bottom[0], bottom[1]
        n, np_ = self.num, self.num_priors
        if propagate_down[0]:
            diff = torch.zeros(n, np_, self.loc_classes, 4, dtype=loc_b.dtype, device=loc_b.device)
            if self.loc_rows is not None:
                img, column, j, _ = self.loc_rows.unbind(1)
                diff[img, j, column] = self.loc_grad * scale
            loc_b.diff_t = diff.reshape(loc_b.shape)
        if propagate_down[1]:
            if self.conf_rows is None:
                conf_b.diff_t = torch.zeros(conf_b.shape, dtype=conf_b.dtype, device=conf_b.device)
            elif self.mining == _P.NONE:
                conf_b.diff_t = (self.conf_grad * scale).reshape(conf_b.shape)
            else:
                diff = torch.zeros(n, np_, self.num_classes, dtype=conf_b.dtype, device=conf_b.device)
                diff[self.conf_rows[0], self.conf_rows[1]] = self.conf_grad * scale
                conf_b.diff_t = diff.reshape(conf_b.shape)


def _logistic_loss(x, target):
    """SigmoidCrossEntropyLoss's stable per-element loss, as the fork writes it."""
    pos = (x >= 0).to(x.dtype)
    return -(x * (target - pos) - torch.log1p(torch.exp(x - 2 * x * pos)))


def _apply_nms(boxes, scores, threshold, top_k):
    """The fork's older ApplyNMS (hard-example mining): candidates by descending score cut to top_k,
    boxes smaller than 1e-5 skipped; the kept positions in ``boxes``, by descending score."""
    order = torch.sort(scores, descending=True, stable=True).indices
    if top_k > -1:
        order = order[:top_k]
    order = order[box_areas(boxes[order]) >= 1e-5]
    kept = nms(boxes[order], torch.arange(order.numel(), 0, -1, dtype=scores.dtype, device=scores.device),
               threshold)
    return order[kept]
