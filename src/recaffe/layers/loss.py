"""Loss layers (SoftmaxWithLoss, EuclideanLoss, SmoothL1Loss, SigmoidCrossEntropyLoss,
MultinomialLogisticLoss, InfogainLoss, HingeLoss, ContrastiveLoss) and Accuracy.

Loss layers take (prediction, label/target) bottoms and write a scalar (0-D) top whose default loss
weight is 1. Backward scales by the loss weight that the base class stores in the top's diff.
Labels are float blobs read as Caffe's ``static_cast<int>`` does (truncation toward zero).
"""
from __future__ import annotations

import torch

from ..blob import Blob
from ..io.protofiles import ProtoFileError, read_binary
from ..layer import Layer, canonical_axis, register
from ..proto import caffe_pb2

FLT_MIN = 1.1754943508222875e-38  # C's FLT_MIN: SoftmaxWithLoss clamps probabilities here
LOG_THRESHOLD = 1e-20             # Caffe's kLOG_THRESHOLD

_Norm = caffe_pb2.LossParameter


def _normalization_mode(loss_param, default: int) -> int:
    """``normalization`` if given, else the deprecated ``normalize`` (true: VALID, false:
    BATCH_SIZE), else the layer's default."""
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return _Norm.VALID if loss_param.normalize else _Norm.BATCH_SIZE
    return default


class LossLayer(Layer):
    """Caffe's LossLayer: two bottoms with the same first dimension, one scalar top."""

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1
    auto_top_blobs = True

    def default_loss_weight(self, top_index: int) -> float:
        return 1.0 if top_index == 0 else 0.0

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1

    def reshape(self, bottom, top):
        pred, label = bottom[0], bottom[1]
        if pred.num_axes == 0 or label.num_axes == 0 or pred.shape[0] != label.shape[0]:
            raise self.error(f"the data and label should have the same first dimension: bottom[0] "
                             f"has shape {pred.shape}, bottom[1] has shape {label.shape}")
        top[0].reshape(())

    def check_no_label_backward(self, propagate_down, index: int = 1, what: str = "label") -> None:
        if len(propagate_down) > index and propagate_down[index]:
            raise self.error(f"cannot backpropagate to {what} inputs (bottom {index})")

    def normalizer(self, mode: int, outer: int, inner: int, valid_count=None):
        """Caffe's get_normalizer, at least 1. ``valid_count`` is None (all valid) or a 0-D tensor,
        which keeps the result on the device (no host sync)."""
        if mode == _Norm.FULL:
            n = outer * inner
        elif mode == _Norm.VALID:
            n = outer * inner if valid_count is None else valid_count
        elif mode == _Norm.BATCH_SIZE:
            n = outer
        elif mode == _Norm.NONE:
            n = 1
        else:
            raise self.error(f"unknown normalization mode {mode}")
        if isinstance(n, torch.Tensor):
            return n.to(self.dtype).clamp_min(1.0)
        return float(max(1, n))


def _class_labels(layer: Layer, label: Blob, shape, num_classes: int, ignore_label: int | None):
    """Integer labels reshaped to ``shape`` and the mask of non-ignored positions (None when
    there is no ignore_label). Ignored positions get class 0 so they can index safely."""
    lab = label.data_t.reshape(shape).long()  # truncates toward zero, as static_cast<int>
    valid = None
    if ignore_label is not None:
        valid = lab != ignore_label
        lab = lab.masked_fill(~valid, 0)
    if lab.numel():
        lo, hi = (int(v) for v in torch.aminmax(lab))
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise layer.error(f"label value {bad} outside the valid range [0, {num_classes - 1}]"
                              + ("" if ignore_label is None else f" (ignore_label is {ignore_label})"))
    return lab, valid


def _count_mismatch(layer: Layer, bottom, axis: int, outer: int, inner: int) -> Exception:
    return layer.error(
        f"number of labels must match number of predictions: bottom[0] of shape {bottom[0].shape} with "
        f"axis {axis} needs {outer * inner} labels (outer {outer} x inner {inner}), bottom[1] of shape "
        f"{bottom[1].shape} holds {bottom[1].count()}; labels are integers in "
        f"{{0, ..., {bottom[0].shape[axis] - 1}}}")


def _class_view(x: torch.Tensor, outer: int, channels: int, inner: int) -> torch.Tensor:
    """(outer, C, inner), or (outer, C) when inner == 1 so that reductions run on the last axis."""
    return x.reshape(outer, channels, inner) if inner > 1 else x.reshape(outer, channels)


def _index_view(lab: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """Labels shaped to gather along the class axis of ``_class_view``."""
    return lab.reshape(outer, 1, inner) if inner > 1 else lab.reshape(outer, 1)


@register("SoftmaxWithLoss")
class SoftmaxWithLossLayer(LossLayer):
    """Softmax over ``softmax_param.axis`` then -log of the true class's probability (clamped at
    FLT_MIN), summed over non-ignored positions and divided by the normalizer. An optional second
    top receives the probabilities."""

    exact_num_top_blobs = -1
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        lp = self.layer_param.loss_param
        self.ignore_label = lp.ignore_label if lp.HasField("ignore_label") else None
        self.normalization = _normalization_mode(lp, lp.normalization)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.axis = canonical_axis(self.layer_param.softmax_param.axis, bottom[0].num_axes, self)
        self.outer = bottom[0].count(0, self.axis)
        self.channels = bottom[0].shape[self.axis]
        self.inner = bottom[0].count(self.axis + 1)
        if self.outer * self.inner != bottom[1].count():
            raise _count_mismatch(self, bottom, self.axis, self.outer, self.inner)
        if len(top) >= 2:
            top[1].reshape_like(bottom[0])

    def forward(self, bottom, top):
        outer, inner = self.outer, self.inner
        x = _class_view(bottom[0].data_t, outer, self.channels, inner)
        prob = torch.softmax(x, dim=1)
        lab, valid = _class_labels(self, bottom[1], (outer, inner), self.channels, self.ignore_label)
        idx = _index_view(lab, outer, inner)
        p_true = prob.gather(1, idx)
        nll = p_true.clamp_min(FLT_MIN).log()
        if valid is None:
            count = None
            loss = -nll.sum()
        else:
            valid = _index_view(valid, outer, inner)
            count = valid.sum()
            loss = -torch.where(valid, nll, 0.0).sum()
        self._norm = self.normalizer(self.normalization, outer, inner, count)
        top[0].data_t = loss / self._norm
        self._prob, self._idx, self._p_true, self._valid = prob, idx, p_true, valid
        if len(top) >= 2:
            top[1].data_t = prob.reshape(bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        grad = self._prob.clone()
        grad.scatter_(1, self._idx, self._p_true - 1)  # p - onehot(label)
        grad.mul_(top[0].diff_t / self._norm)
        if self._valid is not None:
            grad.masked_fill_(~self._valid, 0)
        bottom[0].diff_t = grad.reshape(bottom[0].shape)


@register("Accuracy")
class AccuracyLayer(Layer):
    """Fraction of (non-ignored) positions whose true class is among the ``top_k`` scores along
    ``axis``. As Caffe, a class scoring *equal* to the true class counts as ranking above it. An
    optional second top holds the accuracy per class (0 for classes with no samples)."""

    exact_num_bottom_blobs = 2
    min_top_blobs = 1
    max_top_blobs = 2

    def layer_setup(self, bottom, top):
        p = self.layer_param.accuracy_param
        self.top_k = p.top_k
        self.ignore_label = p.ignore_label if p.HasField("ignore_label") else None

    def reshape(self, bottom, top):
        self.axis = canonical_axis(self.layer_param.accuracy_param.axis, bottom[0].num_axes, self)
        self.outer = bottom[0].count(0, self.axis)
        self.channels = bottom[0].shape[self.axis]
        self.inner = bottom[0].count(self.axis + 1)
        if self.outer * self.inner != bottom[1].count():
            raise _count_mismatch(self, bottom, self.axis, self.outer, self.inner)
        if self.top_k > self.channels:
            raise self.error(f"top_k ({self.top_k}) must be less than or equal to the number of "
                             f"classes ({self.channels})")
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom, top):
        outer, inner, c = self.outer, self.inner, self.channels
        x = _class_view(bottom[0].data_t, outer, c, inner)
        lab, valid = _class_labels(self, bottom[1], (outer, inner), c, self.ignore_label)
        idx = _index_view(lab, outer, inner)
        true_score = x.gather(1, idx)
        # Classes scoring at least the true class's score, the true class itself excluded.
        better = (x >= true_score).sum(1, keepdim=True) - 1
        correct = better < self.top_k
        if valid is not None:
            valid = _index_view(valid, outer, inner)
            correct &= valid
            count = valid.sum()
        else:
            count = torch.tensor(outer * inner, device=x.device)
        hits = correct.sum().to(torch.float64)
        acc = torch.where(count > 0, hits / count.clamp_min(1), 0.0)  # 0 when all are ignored
        top[0].data_t = acc.to(self.dtype)
        if len(top) > 1:
            flat = idx.reshape(-1)
            if valid is None:
                nums = torch.bincount(flat, minlength=c)
            else:
                nums = torch.bincount(flat, weights=valid.reshape(-1).to(torch.float64), minlength=c)
            per_hits = torch.bincount(flat, weights=correct.reshape(-1).to(torch.float64), minlength=c)
            per = torch.where(nums > 0, per_hits / nums.clamp_min(1), 0.0)
            top[1].data_t = per.to(self.dtype)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("Accuracy has no backward (it must not be used as a loss); "
                             "set propagate_down: false on its bottoms")


@register("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """sum((a - b)^2) / (2 N); gradients go to both bottoms."""

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count(1) != bottom[1].count(1):
            raise self.error(f"inputs must have the same dimension: bottom[0] has shape {bottom[0].shape}, "
                             f"bottom[1] has shape {bottom[1].shape}")

    def forward(self, bottom, top):
        self._diff = bottom[0].data_t.reshape(-1) - bottom[1].data_t.reshape(-1)
        top[0].data_t = torch.dot(self._diff, self._diff) / (2 * bottom[0].shape[0])

    def backward(self, top, propagate_down, bottom):
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = top[0].diff_t * (sign / bottom[i].shape[0])
                bottom[i].diff_t = (self._diff * alpha).reshape(bottom[i].shape)


@register("SmoothL1Loss")
class SmoothL1LossLayer(LossLayer):
    """Fast R-CNN's smooth L1 loss, in the form of either fork that ships it.

    * SSD (weiliu89/caffe): 2 bottoms (prediction, target); ``sum(f(b0 - b1)) / num`` with
      ``f(x) = 0.5 x^2`` if ``|x| < 1`` else ``|x| - 0.5``. (The fork declares a 3rd "weights"
      bottom but its LossLayer check refuses 3 bottoms; so do we.)
    * Faster R-CNN (rbgirshick/caffe-fast-rcnn): ``smooth_l1_loss_param.sigma`` and optionally
      4 bottoms (prediction, target, inside_weights, outside_weights):
      ``sum(w_out * f_sigma(w_in * (b0 - b1))) / num`` with ``f_sigma(x) = 0.5 (sigma x)^2`` if
      ``|x| < 1 / sigma^2`` else ``|x| - 0.5 / sigma^2``.

    With 2 bottoms and sigma 1 (the default) both forms are the same function, so one class
    serves both: the bottom count picks the weights, ``sigma`` the transition. Gradients go to
    bottoms 0 and 1 (the second with the opposite sign), never to the weights.
    """

    exact_num_bottom_blobs = -1
    min_bottom_blobs = 2
    max_bottom_blobs = 4

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True

    def layer_setup(self, bottom, top):
        if len(bottom) == 3:
            raise self.error("takes 2 bottoms (prediction, target) or 4 (with Faster R-CNN's "
                             "inside_weights and outside_weights), got 3")
        sigma = self.layer_param.smooth_l1_loss_param.sigma
        self.sigma2 = float(sigma) * float(sigma)
        if self.sigma2 <= 0:
            raise self.error(f"smooth_l1_loss_param.sigma must be non-zero, got {sigma}")

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        for i in range(1, len(bottom)):
            if bottom[i].count(1) != bottom[0].count(1) or bottom[i].count() != bottom[0].count():
                raise self.error(f"bottom[{i}] shape {bottom[i].shape} does not match bottom[0] shape "
                                 f"{bottom[0].shape}")

    def forward(self, bottom, top):
        d = bottom[0].data_t - bottom[1].data_t.reshape(bottom[0].shape)
        if len(bottom) == 4:
            d = d * bottom[2].data_t.reshape(d.shape)
        self._d = d
        a = d.abs()
        small = a < 1.0 / self.sigma2
        err = torch.where(small, 0.5 * d * d * self.sigma2, a - 0.5 / self.sigma2)
        if len(bottom) == 4:
            err = err * bottom[3].data_t.reshape(d.shape)
        top[0].data_t = err.sum() / bottom[0].shape[0]

    def backward(self, top, propagate_down, bottom):
        d = self._d
        grad = torch.where(d.abs() < 1.0 / self.sigma2, d * self.sigma2, torch.sign(d))
        if len(bottom) == 4:
            grad = grad * bottom[2].data_t.reshape(d.shape) * bottom[3].data_t.reshape(d.shape)
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = top[0].diff_t * (sign / bottom[i].shape[0])
                bottom[i].diff_t = (grad * alpha).reshape(bottom[i].shape)
        # Like both forks, nothing is written to the weights' diffs.


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """Cross-entropy of sigmoid(x) against targets in [0, 1], in the overflow-free form
    max(x, 0) - x t + log(1 + exp(-|x|)). Normalization defaults to BATCH_SIZE (as Caffe, for
    backward compatibility) when neither ``normalization`` nor ``normalize`` is given."""

    def layer_setup(self, bottom, top):
        lp = self.layer_param.loss_param
        self.ignore_label = lp.ignore_label if lp.HasField("ignore_label") else None
        self.normalization = _normalization_mode(lp, _Norm.BATCH_SIZE)

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[0].count() != bottom[1].count():
            raise self.error(f"inputs must have the same count: bottom[0] has shape {bottom[0].shape} "
                             f"({bottom[0].count()}), bottom[1] has shape {bottom[1].shape} "
                             f"({bottom[1].count()})")

    def forward(self, bottom, top):
        x = bottom[0].data_t.reshape(-1)
        t = bottom[1].data_t.reshape(-1)
        terms = x.clamp_min(0) - x * t + torch.log1p(torch.exp(-x.abs()))
        count = None
        self._valid = None
        if self.ignore_label is not None:
            self._valid = t.long() != self.ignore_label
            terms = torch.where(self._valid, terms, 0.0)
            count = self._valid.sum()
        self._norm = self.normalizer(self.normalization, bottom[0].shape[0], bottom[0].count(1), count)
        top[0].data_t = terms.sum() / self._norm

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        x = bottom[0].data_t
        grad = torch.sigmoid(x) - bottom[1].data_t.reshape(x.shape)
        grad.mul_(top[0].diff_t / self._norm)
        if self._valid is not None:
            grad.masked_fill_(~self._valid.reshape(x.shape), 0)
        bottom[0].diff_t = grad


def _check_one_label_per_item(layer: LossLayer, bottom) -> None:
    """Caffe's CHECKs that the label blob is N x 1 x 1 x 1 (legacy 4-D accessors)."""
    lab = bottom[1]
    if lab.num_axes > 4 or lab.count() != lab.shape[0]:
        raise layer.error(f"the label blob must hold one label per item (shape N, N x 1, ... or "
                          f"N x 1 x 1 x 1), got shape {lab.shape}")


@register("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(LossLayer):
    """-log(max(p[n, label_n], 1e-20)) averaged over N, for bottoms that already hold
    probabilities (N x dim, flattened from axis 1)."""

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        _check_one_label_per_item(self, bottom)

    def _setup_terms(self, bottom):
        num = bottom[0].shape[0]
        p = bottom[0].data_t.reshape(num, -1)
        lab, _ = _class_labels(self, bottom[1], (num, 1), p.shape[1], None)
        return num, p, lab

    def forward(self, bottom, top):
        num, p, lab = self._setup_terms(bottom)
        top[0].data_t = -p.gather(1, lab).clamp_min(LOG_THRESHOLD).log().sum() / num

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        num, p, lab = self._setup_terms(bottom)
        scale = top[0].diff_t * (-1.0 / num)
        grad = torch.zeros_like(p)
        grad.scatter_(1, lab, scale / p.gather(1, lab).clamp_min(LOG_THRESHOLD))
        bottom[0].diff_t = grad.reshape(bottom[0].shape)


@register("InfogainLoss")
class InfogainLossLayer(LossLayer):
    """Softmax over ``infogain_loss_param.axis``, then -sum_l H[label, l] log(max(p_l, 1e-20)) per
    non-ignored position, divided by the normalizer. H (K x K) comes from the third bottom or the
    BlobProto file ``infogain_loss_param.source``. An optional second top receives the probabilities."""

    exact_num_bottom_blobs = -1
    min_bottom_blobs = 2
    max_bottom_blobs = 3
    exact_num_top_blobs = -1
    min_top_blobs = 1
    max_top_blobs = 2

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0  # neither the labels nor H take gradients

    def layer_setup(self, bottom, top):
        lp = self.layer_param.loss_param
        self.ignore_label = lp.ignore_label if lp.HasField("ignore_label") else None
        if lp.HasField("normalize"):
            raise self.error('loss_param.normalize is deprecated for InfogainLoss; use "normalization"')
        self.normalization = lp.normalization
        self.infogain = None
        if len(bottom) < 3:
            p = self.layer_param.infogain_loss_param
            if not p.HasField("source"):
                raise self.error("the infogain matrix source must be specified "
                                 "(infogain_loss_param.source) when there is no third bottom")
            try:
                proto = read_binary(p.source, caffe_pb2.BlobProto())
            except ProtoFileError as e:
                raise self.error(f"cannot read the infogain matrix: {e}") from None
            h = Blob((), self.dtype, self.device)
            h.from_proto(proto, where=f"infogain matrix {p.source}")
            self.infogain = h

    def _matrix(self, bottom) -> Blob:
        return self.infogain if len(bottom) < 3 else bottom[2]

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        self.axis = canonical_axis(self.layer_param.infogain_loss_param.axis, bottom[0].num_axes, self)
        self.outer = bottom[0].count(0, self.axis)
        self.channels = bottom[0].shape[self.axis]
        self.inner = bottom[0].count(self.axis + 1)
        if self.outer * self.inner != bottom[1].count():
            raise _count_mismatch(self, bottom, self.axis, self.outer, self.inner)
        h = self._matrix(bottom)
        k = self.channels
        if h.count() != k * k:
            raise self.error(f"the infogain matrix H must be {k}x{k} ({k * k} values) for {k} classes, "
                             f"got shape {h.shape}")
        if len(top) >= 2:
            top[1].reshape_like(bottom[0])

    def _rows(self, h: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """H[label] laid out like the class view: (outer, K, inner) or (outer, K)."""
        k = self.channels
        rows = h.reshape(k, k)[lab]  # (outer, inner, K)
        return rows.permute(0, 2, 1) if self.inner > 1 else rows.reshape(self.outer, k)

    def forward(self, bottom, top):
        outer, inner, k = self.outer, self.inner, self.channels
        prob = torch.softmax(_class_view(bottom[0].data_t, outer, k, inner), dim=1)
        lab, valid = _class_labels(self, bottom[1], (outer, inner), k, self.ignore_label)
        h = self._matrix(bottom).data_t.to(prob.device, prob.dtype)
        terms = self._rows(h, lab) * prob.clamp_min(LOG_THRESHOLD).log()
        count = None
        if valid is not None:
            valid = _index_view(valid, outer, inner)
            terms = torch.where(valid, terms, 0.0)
            count = valid.sum()
        top[0].data_t = -terms.sum() / self.normalizer(self.normalization, outer, inner, count)
        self._prob, self._lab, self._valid, self._count = prob, lab, valid, count
        if len(top) >= 2:
            top[1].data_t = prob.reshape(bottom[0].shape)

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        self.check_no_label_backward(propagate_down, 2, "infogain matrix")
        if not propagate_down[0]:
            return
        outer, inner, k = self.outer, self.inner, self.channels
        h = self._matrix(bottom).data_t.to(self._prob.device, self._prob.dtype)
        row_sums = h.reshape(k, k).sum(1)[self._lab]  # (outer, inner)
        grad = self._prob * _index_view(row_sums, outer, inner) - self._rows(h, self._lab)
        grad.mul_(top[0].diff_t / self.normalizer(self.normalization, outer, inner, self._count))
        if self._valid is not None:
            grad.masked_fill_(~self._valid, 0)
        bottom[0].diff_t = grad.reshape(bottom[0].shape)


@register("HingeLoss")
class HingeLossLayer(LossLayer):
    """One-vs-all hinge loss: t = 1 + x * s with s = -1 at the true class and +1 elsewhere;
    loss = sum(max(0, t)) / N (L1) or sum(max(0, t)^2) / N (L2)."""

    def layer_setup(self, bottom, top):
        self.norm = self.layer_param.hinge_loss_param.norm
        if self.norm not in (caffe_pb2.HingeLossParameter.L1, caffe_pb2.HingeLossParameter.L2):
            raise self.error(f"unknown norm {self.norm}")

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        if bottom[1].count() != bottom[0].shape[0]:
            raise self.error(f"the label blob must hold one label per item: bottom[0] has shape "
                             f"{bottom[0].shape}, bottom[1] has shape {bottom[1].shape}")

    def forward(self, bottom, top):
        num = bottom[0].shape[0]
        x = bottom[0].data_t.reshape(num, -1)
        lab, _ = _class_labels(self, bottom[1], (num, 1), x.shape[1], None)
        sign = torch.ones_like(x).scatter_(1, lab, -1.0)
        margin = (1 + x * sign).clamp_min(0)
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            loss = margin.sum()
        else:
            loss = torch.dot(margin.reshape(-1), margin.reshape(-1))
        top[0].data_t = loss / num
        self._margin, self._sign = margin, sign

    def backward(self, top, propagate_down, bottom):
        self.check_no_label_backward(propagate_down)
        if not propagate_down[0]:
            return
        num = bottom[0].shape[0]
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            grad = torch.sign(self._margin) * self._sign * (top[0].diff_t / num)
        else:
            grad = self._margin * self._sign * (top[0].diff_t * (2.0 / num))
        bottom[0].diff_t = grad.reshape(bottom[0].shape)


@register("ContrastiveLoss")
class ContrastiveLossLayer(LossLayer):
    """Siamese loss on feature pairs (a, b) with similarity y (nonzero: similar):
    sum(y d^2 + (1 - y) max(margin - d, 0)^2) / 2N, d = ||a - b||; ``legacy_version`` uses
    max(margin - d^2, 0) for dissimilar pairs."""

    exact_num_bottom_blobs = 3

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def reshape(self, bottom, top):
        super().reshape(bottom, top)
        a, b, y = bottom
        for i in (0, 1):
            s = bottom[i].shape
            if len(s) > 4 or any(d != 1 for d in s[2:]):
                raise self.error(f"bottom[{i}] must be N x C (or N x C x 1 x 1), got shape {s}")
        if a.count(1) != b.count(1):
            raise self.error(f"the two feature bottoms must have the same channels: shapes {a.shape} "
                             f"and {b.shape}")
        if y.num_axes > 4 or y.count() != a.shape[0]:
            raise self.error(f"the similarity bottom must hold one value per pair ({a.shape[0]}), "
                             f"got shape {y.shape}")
        p = self.layer_param.contrastive_loss_param
        self.margin, self.legacy = p.margin, p.legacy_version

    def forward(self, bottom, top):
        num = bottom[0].shape[0]
        diff = bottom[0].data_t.reshape(num, -1) - bottom[1].data_t.reshape(num, -1)
        dist_sq = (diff * diff).sum(1)
        similar = bottom[2].data_t.reshape(-1).long() != 0
        if self.legacy:
            dissimilar = (self.margin - dist_sq).clamp_min(0)
        else:
            dissimilar = (self.margin - dist_sq.sqrt()).clamp_min(0).square()
        top[0].data_t = torch.where(similar, dist_sq, dissimilar).sum() / num / 2
        self._diff, self._dist_sq, self._similar = diff, dist_sq, similar

    def backward(self, top, propagate_down, bottom):
        if not (propagate_down[0] or propagate_down[1]):
            return
        dist_sq, similar = self._dist_sq, self._similar
        if self.legacy:
            mdist = self.margin - dist_sq
            coef = torch.full_like(dist_sq, -1.0)
        else:
            dist = dist_sq.sqrt()
            mdist = self.margin - dist
            coef = -mdist / (dist + 1e-4)  # Caffe's epsilon keeps d = 0 finite
        coef = torch.where(similar, 1.0, torch.where(mdist > 0, coef, 0.0))
        base = self._diff * coef.unsqueeze(1)
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                alpha = top[0].diff_t * (sign / bottom[i].shape[0])
                bottom[i].diff_t = (base * alpha).reshape(bottom[i].shape)


# ------------------------------------------------------------------ forks: SegAccuracy
@register("SegAccuracy")
class SegAccuracyLayer(Layer):
    """DeepLab v2's segmentation scores from a confusion matrix (label x prediction).

    bottom[0]: scores (N, C, H, W); bottom[1]: labels (N, 1, H, W). The prediction of a pixel is
    its argmax over channels (ties go to the higher class index, as the fork's sort of (score,
    class) pairs). Pixels whose label is one of ``ignore_label`` are skipped; any other label
    outside [0, C) is an error. Top [1, 1, 1, 3]: pixel accuracy (0 when nothing is counted), the
    mean recall over the classes present in the labels, and the mean Jaccard (IoU) over all C
    classes, a class absent from both labels and predictions counting as 1. The matrix is cleared
    on every forward unless ``reset: false``, which accumulates it across forwards. ``metric`` is
    parsed and ignored, as in the fork. No backward.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.seg_accuracy_param
        self.ignore = sorted(set(p.ignore_label))
        self.reset = p.reset
        self.channels = bottom[0].shape[1] if bottom[0].num_axes == 4 else 0
        self.confusion = torch.zeros((self.channels, self.channels), dtype=torch.float64)

    def reshape(self, bottom, top):
        s, lab = bottom[0].shape, bottom[1].shape
        if len(s) != 4 or len(lab) != 4:
            raise self.error(f"scores {s} and labels {lab} must both be 4-D (N, C, H, W) and (N, 1, H, W)")
        if lab[0] != s[0] or lab[1] != 1 or lab[2:] != s[2:]:
            raise self.error(f"labels {lab} must be (N, 1, H, W) for scores {s}")
        if s[1] != self.channels:
            raise self.error(f"scores {s} have {s[1]} classes, the layer was set up for {self.channels}")
        top[0].reshape((1, 1, 1, 3))

    def forward(self, bottom, top):
        c = self.channels
        scores = bottom[0].data_t.detach().cpu().double()
        # the argmax with ties to the higher index: search the reversed class axis
        pred = (c - 1) - scores.flip(1).argmax(dim=1)
        label = bottom[1].data_t.detach().cpu().double()[:, 0].to(torch.int64)  # C's static_cast<int>
        keep = torch.ones_like(label, dtype=torch.bool)
        for ig in self.ignore:
            keep &= label != ig
        label, pred = label[keep], pred[keep]
        bad = (label < 0) | (label >= c)
        if bool(bad.any()):
            raise self.error(f"unexpected label {int(label[bad][0])}: labels must lie in [0, {c}) or be "
                             f"one of ignore_label {self.ignore}")
        if self.reset:
            self.confusion.zero_()
        self.confusion += torch.bincount(label * c + pred, minlength=c * c).reshape(c, c).double()
        m = self.confusion
        total, diag = m.sum(), m.diagonal()
        rows, cols = m.sum(1), m.sum(0)
        accuracy = diag.sum() / total if total > 0 else torch.tensor(0.0, dtype=torch.float64)
        present = rows > 0
        recall = (diag[present] / rows[present]).mean() if bool(present.any()) \
            else torch.tensor(0.0, dtype=torch.float64)
        union = rows + cols - diag
        jaccard = torch.where(union == diag, torch.ones_like(diag), diag / union.clamp_min(1)).mean() \
            if c else torch.tensor(0.0, dtype=torch.float64)
        out = torch.stack([accuracy, recall, jaccard]).to(self.dtype).to(self.device)
        top[0].data_t = out.reshape(1, 1, 1, 3)

    def backward(self, top, propagate_down, bottom):
        if any(propagate_down):
            raise self.error("SegAccuracy has no backward (it must not be used as a loss); set "
                             "propagate_down: false on its bottoms")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False
