"""A Euclidean loss written as a Python layer: L = sum((a - b)^2) / (2 N), N = a.shape[0].

It computes what the built-in EuclideanLoss computes (the difference is that a Python layer has
no default loss weight, so the prototxt gives ``loss_weight: 1``). Use it with
``python_param { module: "pyloss" layer: "EuclideanLossLayer" }`` and this folder on PYTHONPATH.
"""
import numpy as np

import caffe


class EuclideanLossLayer(caffe.Layer):

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise ValueError(f"EuclideanLossLayer needs 2 bottoms (prediction, target), got {len(bottom)}")
        if len(top) != 1:
            raise ValueError(f"EuclideanLossLayer produces 1 top (the loss), got {len(top)}")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise ValueError(f"EuclideanLossLayer inputs must have the same size: {bottom[0].shape} vs "
                             f"{bottom[1].shape}")
        # Kept between forward and backward; same dtype as the net's blobs.
        self.diff = np.zeros_like(bottom[0].data)
        top[0].reshape(1)

    def forward(self, bottom, top):
        # Same count, possibly different shapes (as the built-in layer allows): compare flat.
        self.diff[...] = bottom[0].data - bottom[1].data.reshape(self.diff.shape)
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        # top[0].diff holds the loss weight (times any gradient from above), as Caffe sets it.
        scale = top[0].diff[0] / bottom[0].num
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                bottom[i].diff[...] = (sign * scale * self.diff).reshape(bottom[i].diff.shape)
