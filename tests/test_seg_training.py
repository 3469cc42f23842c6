"""Segmentation nets of the forks' kinds train: a DeepLab-style net (a strided conv, Interp back to
the input size, SoftmaxWithLoss with ignore_label 255) and a SegNet-style net (MAX pooling with a mask
top, Upsample by the mask, SegNet's BN) learn synthetic masks, their loss falling."""
import numpy as np
import pytest

import caffe
from helpers import write

DEEPLAB = """
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 16 dim: 16 } shape { dim: 4 dim: 1 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 16 kernel_size: 3 pad: 2 dilation: 2 stride: 2 weight_filler { type: "msra" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "score" type: "Convolution" bottom: "conv2" top: "score"
        convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "msra" } } }
layer { name: "up" type: "Interp" bottom: "score" top: "score_up" interp_param { height: 16 width: 16 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score_up" bottom: "label" top: "loss"
        loss_param { ignore_label: 255 } }
"""

SEGNET = """
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 4 dim: 3 dim: 16 dim: 16 } shape { dim: 4 dim: 1 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "bn1" type: "BN" bottom: "conv1" top: "conv1" bn_param { bn_mode: LEARN
        scale_filler { type: "constant" value: 1 } shift_filler { type: "constant" value: 0 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" top: "mask1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 16 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "unpool1" type: "Upsample" bottom: "conv2" bottom: "mask1" top: "unpool1"
        upsample_param { scale: 2 } }
layer { name: "score" type: "Convolution" bottom: "unpool1" top: "score"
        convolution_param { num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
        loss_param { ignore_label: 255 } }
"""


def batch(rng):
    """Images with a bright square (class 1) and a dark disc (class 2) on noise; a 255 border."""
    x = rng.normal(0, 0.3, (4, 3, 16, 16))
    y = np.zeros((4, 1, 16, 16))
    yy, xx = np.mgrid[:16, :16]
    for i in range(4):
        a, b = rng.integers(1, 8, 2)
        x[i, :, a:a + 6, b:b + 6] += 2.0
        y[i, 0, a:a + 6, b:b + 6] = 1
        c, d = rng.integers(4, 12, 2)
        disc = (yy - c) ** 2 + (xx - d) ** 2 <= 6
        x[i, :, disc] -= 2.0
        y[i, 0, disc] = 2
    y[:, :, 0, :] = y[:, :, :, 0] = 255  # ignored pixels
    return x, y


@pytest.mark.parametrize("net", [DEEPLAB, SEGNET], ids=["deeplab_interp", "segnet_upsample"])
def test_loss_falls(tmp_path, net):
    write(tmp_path, "net.prototxt", net)
    path = write(tmp_path, "solver.prototxt", f'net: "{tmp_path}/net.prototxt" type: "Adam" base_lr: 0.01 '
                 f'lr_policy: "fixed" random_seed: 3 snapshot_prefix: "{tmp_path}/s"')
    solver = caffe.get_solver(path)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(60):
        x, y = batch(rng)
        solver.net.blobs["data"].data[...] = x
        solver.net.blobs["label"].data[...] = y
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"
