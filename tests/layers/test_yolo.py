"""Reorg and Region (the YOLOv2 Caffe ports) against numpy loops written from darknet's
reorg_cpu / flatten / region forward as gklz1982's and the caffe_yolov2 ports call them."""
import numpy as np
import pytest

from recaffe.gradient_check import check_gradient, forward_layer, make_layer
from recaffe.layer import LayerError


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def np_reorg_cpu(x, w, h, c, batch, stride, forward):
    """darknet's reorg_cpu on flat memory (w, h, c: the bottom's sizes)."""
    out = np.zeros_like(x)
    out_c = c // (stride * stride)
    for b in range(batch):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * b))
                    c2, offset = k % out_c, k // out_c
                    w2, h2 = i * stride + offset % stride, j * stride + offset // stride
                    out_index = w2 + w * stride * (h2 + h * stride * (c2 + out_c * b))
                    if forward:
                        out[out_index] = x[in_index]
                    else:
                        out[in_index] = x[out_index]
    return out


@pytest.mark.parametrize("shape,stride,reverse", [
    ((2, 8, 4, 6), 2, False), ((1, 18, 6, 3), 3, False), ((2, 8, 3, 2), 2, True), ((1, 4, 2, 2), 1, False),
])
def test_reorg_forward_is_darknets(shape, stride, reverse):
    x = randn(*shape)
    n, c, h, w = shape
    text = f'type: "Reorg" reorg_param {{ stride: {stride} reverse: {str(reverse).lower()} }}'
    (y,) = forward_layer(text, [x])
    s2 = stride * stride
    expected_shape = (n, c // s2, h * stride, w * stride) if reverse else (n, c * s2, h // stride, w // stride)
    assert y.shape == expected_shape
    # the port's Forward_cpu: reorg_cpu(bottom, W, H, C, N, stride, reverse, top)
    ref = np_reorg_cpu(x.reshape(-1), w, h, c, n, stride, reverse).reshape(expected_shape)
    np.testing.assert_array_equal(y, ref)
    check_gradient(text, [x])


def test_reorg_is_not_space_to_depth():
    x = np.arange(16.0).reshape(1, 4, 2, 2)
    (y,) = forward_layer('type: "Reorg" reorg_param { stride: 2 }', [x])
    plain = x.reshape(1, 4, 1, 2, 1, 2).transpose(0, 3, 5, 1, 2, 4).reshape(1, 16, 1, 1)
    assert not np.array_equal(y, plain)


def test_reorg_errors():
    with pytest.raises(LayerError, match=r"'L'.*\(1, 6, 4, 4\).*stride\^2 = 4"):
        forward_layer('type: "Reorg" reorg_param { stride: 2 }', [np.zeros((1, 6, 4, 4))])
    with pytest.raises(LayerError, match=r"'L'.*\(1, 4, 3, 4\).*multiples of the stride 2"):
        forward_layer('type: "Reorg" reorg_param { stride: 2 }', [np.zeros((1, 4, 3, 4))])
    with pytest.raises(LayerError, match="stride must be positive"):
        forward_layer('type: "Reorg" reorg_param { stride: 0 }', [np.zeros((1, 4, 4, 4))])
    with pytest.raises(LayerError, match="in-place"):
        layer, bottom, _ = make_layer('type: "Reorg"', [np.zeros((1, 4, 4, 4))])
        layer.setup(bottom, bottom)


def np_region(x, boxes, classes, softmax):
    """The port's Forward_cpu: darknet's flatten, logistic on entry 4, softmax on the classes."""
    n, c, h, w = x.shape
    size = 4 + 1 + classes
    flat = x.reshape(n, c, h * w)
    out = np.zeros((n, h * w, c))
    for b in range(n):
        for ch in range(c):
            for i in range(h * w):
                out[b, i, ch] = flat[b, ch, i]  # flatten(..., forward=1): swap[i2] = x[i1]
    out = out.reshape(-1)
    for b in range(n):
        for i in range(h * w * boxes):
            index = size * i + b * h * w * c
            out[index + 4] = 1 / (1 + np.exp(-out[index + 4]))
            if softmax:
                z = out[index + 5:index + 5 + classes]
                e = np.exp(z - z.max())
                out[index + 5:index + 5 + classes] = e / e.sum()
    return out.reshape(x.shape)


@pytest.mark.parametrize("softmax", [True, False])
def test_region_forward(softmax):
    x = randn(2, 2 * (5 + 3), 3, 4) * 2
    text = f'type: "Region" region_param {{ classes: 3 coords: 4 boxes_of_each_grid: 2 softmax: {str(softmax).lower()} }}'
    (y,) = forward_layer(text, [x])
    np.testing.assert_allclose(y, np_region(x, 2, 3, softmax), rtol=1e-12, atol=1e-15)


def test_region_errors():
    with pytest.raises(LayerError, match=r"'L'.*\(N, 2 \* 8, H, W\).*\(1, 15, 2, 2\)"):
        forward_layer('type: "Region" region_param { classes: 3 boxes_of_each_grid: 2 }', [np.zeros((1, 15, 2, 2))])
    with pytest.raises(LayerError, match="coords must be 4"):
        forward_layer('type: "Region" region_param { classes: 3 coords: 5 boxes_of_each_grid: 2 }',
                      [np.zeros((1, 18, 2, 2))])
    layer, bottom, top = make_layer('type: "Region" region_param { classes: 1 boxes_of_each_grid: 1 }',
                                    [np.zeros((1, 6, 2, 2))])
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="'L'.*no backward"):
        layer.backward(top, [True], bottom)
