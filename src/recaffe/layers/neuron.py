"""Neuron layers: elementwise activations (one bottom, one top, may run in place)."""
from __future__ import annotations

import torch

from ..layer import Layer, register


class NeuronLayer(Layer):
    exact_num_bottom_blobs = 1
    exact_num_top_blobs = 1

    def reshape(self, bottom, top):
        if top[0] is not bottom[0]:
            top[0].reshape_like(bottom[0])


@register("ReLU")
class ReLULayer(NeuronLayer):
    """max(0, x) + negative_slope * min(0, x); the gradient at x == 0 is negative_slope, as Caffe."""

    def layer_setup(self, bottom, top):
        self.negative_slope = self.layer_param.relu_param.negative_slope

    def forward(self, bottom, top):
        x = bottom[0].data_t
        if self.negative_slope == 0:
            top[0].data_t = torch.relu(x)
        else:
            top[0].data_t = torch.where(x > 0, x, x * self.negative_slope)

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        # In place, bottom data is the top data: same sign for any slope >= 0, so the mask holds.
        x = bottom[0].data_t
        dy = top[0].diff_t
        if self.negative_slope == 0:
            bottom[0].diff_t = torch.where(x > 0, dy, torch.zeros((), dtype=dy.dtype, device=dy.device))
        else:
            bottom[0].diff_t = torch.where(x > 0, dy, dy * self.negative_slope)
