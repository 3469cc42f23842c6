"""Faster R-CNN's Python layers, short Python 3 versions following py-faster-rcnn's published
algorithm (Ren et al. 2015; rpn/anchor_target_layer.py, rpn/proposal_target_layer.py), for the
example in this folder. They are *user* code, as in py-faster-rcnn: recaffe runs them through its
Python layer (type "Python") next to the built-in Proposal, ROIPooling and SmoothL1Loss layers.

- ShapesData: one synthetic image per forward (shapes on texture, examples/ssd/make_shapes.py) ->
  data (1, 3, S, S) mean-subtracted BGR, im_info (1, 3), gt_boxes (G, 5) = (x1, y1, x2, y2, class).
- AnchorTarget: RPN training labels and box targets for every anchor.
- ProposalTarget: samples RoIs among the proposals (+ the ground truth) and gives their class
  labels and class-specific box targets.
"""
from __future__ import annotations

import ast
import importlib.util
import os

import numpy as np

import caffe
from recaffe.layers.roi import generate_anchors

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN = np.array([104, 117, 123], dtype=np.float32).reshape(3, 1, 1)
CLASSES = ("__background__", "circle", "square", "triangle")
BBOX_STDS = np.array([0.1, 0.1, 0.2, 0.2])  # py-faster-rcnn's BBOX_NORMALIZE_STDS


def _params(layer) -> dict:
    return ast.literal_eval(layer.param_str) if layer.param_str else {}


def overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, K) IoU of pixel boxes (+1 widths), as py-faster-rcnn's bbox_overlaps."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def bbox_transform(ex: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(dx, dy, dw, dh) taking boxes ``ex`` to ``gt`` (py-faster-rcnn's bbox_transform)."""
    ew, eh = ex[:, 2] - ex[:, 0] + 1.0, ex[:, 3] - ex[:, 1] + 1.0
    ex_x, ex_y = ex[:, 0] + 0.5 * ew, ex[:, 1] + 0.5 * eh
    gw, gh = gt[:, 2] - gt[:, 0] + 1.0, gt[:, 3] - gt[:, 1] + 1.0
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return np.stack([(gx - ex_x) / ew, (gy - ex_y) / eh, np.log(gw / ew), np.log(gh / eh)], 1)


class ShapesData(caffe.Layer):
    def setup(self, bottom, top):
        p = _params(self)
        self.size = int(p.get("size", 128))
        self.rng = np.random.default_rng(int(p.get("seed", 0)))
        spec = importlib.util.spec_from_file_location("make_shapes", os.path.join(HERE, "..", "ssd", "make_shapes.py"))
        self.shapes = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.shapes)
        top[0].reshape(1, 3, self.size, self.size)
        top[1].reshape(1, 3)
        top[2].reshape(1, 5)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        img, objects = self.shapes.make_image(self.rng, self.size)
        rgb = np.asarray(img, dtype=np.float32)
        top[0].data[...] = rgb[..., ::-1].transpose(2, 0, 1)[None] - MEAN
        top[1].data[...] = [[self.size, self.size, 1.0]]
        boxes = [[x0, y0, x1 - 1, y1 - 1, CLASSES.index(kind)] for kind, (x0, y0, x1, y1) in objects]
        top[2].reshape(len(boxes), 5)
        top[2].data[...] = np.array(boxes, dtype=np.float32)

    def backward(self, top, propagate_down, bottom):
        pass


class AnchorTarget(caffe.Layer):
    """py-faster-rcnn's AnchorTargetLayer (RPN_POSITIVE_OVERLAP 0.7, RPN_NEGATIVE_OVERLAP 0.3,
    RPN_FG_FRACTION 0.5, RPN_BATCHSIZE 256, uniform outside weights)."""

    def setup(self, bottom, top):
        p = _params(self)
        self.stride = int(p.get("feat_stride", 16))
        self.anchors = generate_anchors(16, [0.5, 1.0, 2.0], p.get("scales", [8, 16, 32]))
        self.a = len(self.anchors)
        self.rng = np.random.default_rng(int(p.get("seed", 0)))
        h, w = bottom[0].data.shape[-2:]
        top[0].reshape(1, 1, self.a * h, w)
        for t in top[1:]:
            t.reshape(1, 4 * self.a, h, w)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        h, w = bottom[0].data.shape[-2:]
        gt = bottom[1].data[:, :4].astype(np.float64)
        im_h, im_w = bottom[2].data[0, :2]
        sx, sy = np.meshgrid(np.arange(w) * self.stride, np.arange(h) * self.stride)
        shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], 1)
        anchors = (self.anchors[None] + shifts[:, None]).reshape(-1, 4)  # (h, w, a) order
        inside = np.where((anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < im_w)
                          & (anchors[:, 3] < im_h))[0]
        ex = anchors[inside]
        labels = np.full(len(inside), -1.0)
        ov = overlaps(ex, gt)
        best = ov.argmax(1)
        best_ov = ov[np.arange(len(inside)), best]
        gt_best = ov.max(0)
        labels[best_ov < 0.3] = 0
        labels[np.where(ov == gt_best)[0]] = 1  # the best anchor(s) of every ground-truth box
        labels[best_ov >= 0.7] = 1
        fg = np.where(labels == 1)[0]
        if len(fg) > 128:
            labels[self.rng.choice(fg, len(fg) - 128, replace=False)] = -1
        bg = np.where(labels == 0)[0]
        num_bg = 256 - int((labels == 1).sum())
        if len(bg) > num_bg:
            labels[self.rng.choice(bg, len(bg) - num_bg, replace=False)] = -1
        targets = bbox_transform(ex, gt[best])
        inside_w = np.zeros((len(inside), 4))
        inside_w[labels == 1] = 1.0
        outside_w = np.zeros((len(inside), 4))
        outside_w[labels >= 0] = 1.0 / max(1, int((labels >= 0).sum()))

        def unmap(x, fill):
            out = np.full((len(anchors),) + x.shape[1:], fill, dtype=np.float64)
            out[inside] = x
            return out

        a = self.a
        top[0].data[...] = unmap(labels, -1).reshape(1, h, w, a).transpose(0, 3, 1, 2).reshape(1, 1, a * h, w)
        for t, x in zip(top[1:], (targets, inside_w, outside_w)):
            t.data[...] = unmap(x, 0).reshape(1, h, w, 4 * a).transpose(0, 3, 1, 2)

    def backward(self, top, propagate_down, bottom):
        pass


class ProposalTarget(caffe.Layer):
    """py-faster-rcnn's ProposalTargetLayer (BATCH_SIZE 64, FG_FRACTION 0.25, FG_THRESH 0.5,
    BG_THRESH [0, 0.5), targets normalized by BBOX_NORMALIZE_STDS)."""

    def setup(self, bottom, top):
        p = _params(self)
        self.k = int(p.get("num_classes", len(CLASSES)))
        self.rng = np.random.default_rng(int(p.get("seed", 0)))
        top[0].reshape(1, 5)
        top[1].reshape(1)
        for t in top[2:]:
            t.reshape(1, 4 * self.k)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        gt = bottom[1].data.astype(np.float64)
        rois = np.vstack([bottom[0].data[:, 1:5].astype(np.float64), gt[:, :4]])
        ov = overlaps(rois, gt[:, :4])
        best = ov.argmax(1)
        best_ov = ov.max(1)
        fg = np.where(best_ov >= 0.5)[0]
        n_fg = min(16, len(fg))
        fg = self.rng.choice(fg, n_fg, replace=False) if len(fg) else fg
        bg = np.where(best_ov < 0.5)[0]
        n_bg = min(64 - n_fg, len(bg))
        bg = self.rng.choice(bg, n_bg, replace=False) if len(bg) else bg
        keep = np.concatenate([fg, bg]).astype(int)
        labels = gt[best[keep], 4].copy()
        labels[n_fg:] = 0
        targets = bbox_transform(rois[keep], gt[best[keep], :4]) / BBOX_STDS
        n = len(keep)
        full = np.zeros((n, 4 * self.k))
        weights = np.zeros((n, 4 * self.k))
        for i in range(n_fg):  # class-specific targets of the foreground RoIs
            c = int(labels[i])
            full[i, 4 * c:4 * c + 4] = targets[i]
            weights[i, 4 * c:4 * c + 4] = 1.0
        out = [np.hstack([np.zeros((n, 1)), rois[keep]]), labels, full, weights, (weights > 0).astype(float)]
        for t, x in zip(top, out):
            t.reshape(*x.shape)
            t.data[...] = x

    def backward(self, top, propagate_down, bottom):
        pass
