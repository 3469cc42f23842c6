"""Layers of the YOLOv2 Caffe ports: Reorg (darknet's reorg) and Region (the output activations).

Both follow darknet's memory order rather than a plain tensor operation:

* **Reorg** is darknet's ``reorg_cpu`` as gklz1982/caffe-yolov2 calls it (and as darknet's own
  reorg layer does): with the *bottom's* (C, H, W) and stride s, the bottom's memory is read as
  (C / s^2, H * s, W * s) and scattered into the bottom's (C, H, W) order, then the result is
  reinterpreted as the top's shape (C * s^2, H / s, W / s). This is not a space-to-depth of the
  bottom (the famous darknet quirk); ``reverse: true`` applies the inverse permutation (top
  (C / s^2, H * s, W * s)). Both directions are permutations of the elements, so backward is
  the inverse permutation of the diff.
* **Region** is the forward of the caffe_yolov2 ports that define ``boxes_of_each_grid`` and
  ``softmax`` (hustzxd's / lwplw's caffe_yolov2; old darknet's region layer): the top has the
  bottom's shape, its memory holds darknet's flattened layout (per image: H * W cells, then
  boxes_of_each_grid anchors, then coords + 1 + classes entries), the objectness entry goes
  through the logistic, and with ``softmax`` the classes through a softmax. x, y, w, h stay raw
  (old darknet applies the logistic to x, y when it decodes boxes). The ports have no backward.
"""
from __future__ import annotations

import torch

from ..layer import Layer, register


def reorg(x: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """darknet's reorg of a (N, C, H, W) tensor, returned in the bottom's (N, C, H, W) order
    (the caller reinterprets it as the top's shape)."""
    n, c, h, w = x.shape
    s = stride
    if not reverse:
        # memory read as (C / s^2, H, s, W, s); element (c2, h, dh, w, dw) goes to channel
        # (dh * s + dw) * C / s^2 + c2 at (h, w) of the bottom-shaped result
        y = x.reshape(n, c // (s * s), h, s, w, s).permute(0, 3, 5, 1, 2, 4)
    else:
        # the inverse: channel (dh * s + dw) * C / s^2 + c2 at (h, w) goes to (c2, h, dh, w, dw)
        y = x.reshape(n, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c, h, w)


@register("Reorg")
class ReorgLayer(Layer):
    """YOLOv2's passthrough reorg (darknet's element order, see the module docstring)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("does not allow in-place computation (top and bottom are the same blob)")
        p = self.layer_param.reorg_param
        if p.stride <= 0:
            raise self.error(f"stride must be positive, got {p.stride}")
        self.stride, self.reverse = p.stride, p.reverse

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        s = self.stride
        if len(shape) != 4:
            raise self.error(f"the bottom must be 4-D (N, C, H, W), got shape {shape}")
        n, c, h, w = shape
        if c % (s * s):
            raise self.error(f"channels ({c}, bottom shape {shape}) must be a multiple of stride^2 = "
                             f"{s * s}")
        if self.reverse:
            top[0].reshape(n, c // (s * s), h * s, w * s)
        else:
            if h % s or w % s:
                raise self.error(f"height and width (bottom shape {shape}) must be multiples of the "
                                 f"stride {s}")
            top[0].reshape(n, c * s * s, h // s, w // s)

    def forward(self, bottom, top):
        y = reorg(bottom[0].data_t, self.stride, self.reverse)
        top[0].data_t = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # the transpose of a permutation is its inverse: darknet's reorg in the other direction,
        # on the diff laid out in the bottom's shape
        dy = top[0].diff_t.reshape(bottom[0].shape)
        bottom[0].diff_t = _inverse_reorg(dy, self.stride, self.reverse)


def _inverse_reorg(y: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """The inverse of :func:`reorg` (x such that reorg(x) == y), both in the bottom's shape."""
    n, c, h, w = y.shape
    s = stride
    if not reverse:
        x = y.reshape(n, s, s, c // (s * s), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        x = y.reshape(n, c // (s * s), h, s, w, s).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(n, c, h, w).contiguous()


@register("Region")
class RegionLayer(Layer):
    """YOLOv2's region activations (forward only; see the module docstring)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        if top[0] is bottom[0]:
            raise self.error("does not allow in-place computation (top and bottom are the same blob)")
        p = self.layer_param.region_param
        if p.coords != 4:
            raise self.error(f"coords must be 4 (the ports read objectness at entry 4 and classes "
                             f"from entry 5), got {p.coords}")
        if p.boxes_of_each_grid <= 0 or p.classes <= 0:
            raise self.error(f"boxes_of_each_grid and classes must be positive, got "
                             f"{p.boxes_of_each_grid} and {p.classes}")
        self.classes, self.coords = p.classes, p.coords
        self.boxes, self.softmax = p.boxes_of_each_grid, p.softmax

    def reshape(self, bottom, top):
        shape = bottom[0].shape
        entries = self.coords + 1 + self.classes
        if len(shape) != 4 or shape[1] != self.boxes * entries:
            raise self.error(f"the bottom must be (N, boxes_of_each_grid * (coords + 1 + classes), H, W) "
                             f"= (N, {self.boxes} * {entries}, H, W), got shape {shape}")
        top[0].reshape(shape)

    def forward(self, bottom, top):
        x = bottom[0].data_t
        n, c, h, w = x.shape
        # darknet's flatten: (N, C, H * W) -> (N, H * W, C), read as cells x anchors x entries
        y = x.reshape(n, c, h * w).transpose(1, 2).reshape(n, h * w, self.boxes, -1)
        obj = torch.sigmoid(y[..., 4:5])
        classes = y[..., 5:]
        if self.softmax:
            classes = torch.softmax(classes, dim=-1)
        y = torch.cat([y[..., :4], obj, classes], dim=-1)
        top[0].data_t = y.reshape(x.shape).contiguous()

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            raise self.error("has no backward (the YOLOv2 ports' Region layer is forward only); set "
                             "propagate_down: false on its bottom")
