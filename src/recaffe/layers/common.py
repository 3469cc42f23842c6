"""Common layers: InnerProduct, Split (and more routing/shape layers)."""
from __future__ import annotations

import torch

from ..fillers import fill
from ..layer import Layer, canonical_axis, register


@register("InnerProduct")
class InnerProductLayer(Layer):
    """y = x W^T + b over the axes from ``axis`` on (W is num_output x K, or K x num_output with
    ``transpose``)."""

    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.inner_product_param
        self.num_output = p.num_output
        self.bias_term = p.bias_term
        self.transpose = p.transpose
        self.axis = canonical_axis(p.axis, bottom[0].num_axes, self)
        k = bottom[0].count(self.axis)
        w_shape = (k, self.num_output) if self.transpose else (self.num_output, k)
        shapes = [w_shape] + ([(self.num_output,)] if self.bias_term else [])
        if not self.check_blobs(shapes):
            self.blobs = [self.new_blob(s) for s in shapes]
            fill(self.blobs[0], p.weight_filler)
            if self.bias_term:
                fill(self.blobs[1], p.bias_filler)
        self.param_propagate_down = [True] * len(self.blobs)
        self.k = k

    def reshape(self, bottom, top):
        k = bottom[0].count(self.axis)
        if k != self.k:
            raise self.error(f"input size incompatible with inner product parameters: bottom "
                             f"{bottom[0].shape} gives {k} inputs per row from axis {self.axis}, "
                             f"the weights expect {self.k}")
        top[0].reshape(bottom[0].shape[:self.axis] + (self.num_output,))

    def _weight(self) -> torch.Tensor:
        w = self.blobs[0].data_t
        return w if self.transpose else w.t()  # (K, N)

    def forward(self, bottom, top):
        x = bottom[0].data_t.reshape(-1, self.k)
        if self.bias_term:
            y = torch.addmm(self.blobs[1].data_t, x, self._weight())
        else:
            y = x @ self._weight()
        top[0].data_t = y.reshape(top[0].shape)

    def backward(self, top, propagate_down, bottom):
        dy = top[0].diff_t.reshape(-1, self.num_output)
        if self.param_propagate_down[0]:
            x = bottom[0].data_t.reshape(-1, self.k)
            wd = self.blobs[0].diff_t
            if self.transpose:
                wd.addmm_(x.t(), dy)  # (K, N) += x^T dy
            else:
                wd.addmm_(dy.t(), x)  # (N, K) += dy^T x
        if self.bias_term and self.param_propagate_down[1]:
            self.blobs[1].diff_t.add_(dy.sum(0))
        if propagate_down[0]:
            dx = dy @ self._weight().t()
            bottom[0].diff_t = dx.reshape(bottom[0].shape)


@register("Split")
class SplitLayer(Layer):
    """Copies its bottom to every top (sharing memory); backward sums the tops' diffs.

    The net inserts these automatically where one blob feeds several layers.
    """

    exact_num_bottom_blobs = 1
    min_top_blobs = 1

    def reshape(self, bottom, top):
        for t in top:
            if t is not bottom[0]:
                t.reshape_like(bottom[0])

    def forward(self, bottom, top):
        x = bottom[0].data_t
        for t in top:
            t.data_t = x

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        if len(top) == 1:
            bottom[0].diff_t = top[0].diff_t
            return
        total = top[0].diff_t + top[1].diff_t
        for t in top[2:]:
            total += t.diff_t
        bottom[0].diff_t = total
