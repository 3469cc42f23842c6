"""The published zoo nets (../shared/reference/zoo/) build, run forward and backward at batch 1,
and have the blob shapes Caffe gives them.

Expected shapes come from two sources independent of recaffe: the shapes published for these
models (papers, BVLC's model pages), and a small shape calculator below that applies Caffe's
output-size formulas layer by layer to the prototxt as written (legacy ``input:`` fields included).
"""
import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from conftest import require_reference
from recaffe.io.netfiles import read_net_text
from recaffe.net import TEST, Net
from recaffe.proto import caffe_pb2

ZOO = ("bvlc_reference_caffenet", "bvlc_alexnet", "bvlc_googlenet", "squeezenet_v1.0", "squeezenet_v1.1",
       "mobilenet_v1", "mobilenet_v2", "resnet_50")

# Shapes (without the batch axis) published for these models (papers, model pages), worked by hand
# where a release differs from its paper.
PUBLISHED = {
    "bvlc_reference_caffenet": {
        "conv1": (96, 55, 55), "pool1": (96, 27, 27), "conv2": (256, 27, 27), "pool2": (256, 13, 13),
        "conv3": (384, 13, 13), "conv5": (256, 13, 13), "pool5": (256, 6, 6), "fc6": (4096,),
        "fc8": (1000,), "prob": (1000,)},
    "bvlc_alexnet": {
        "conv1": (96, 55, 55), "pool1": (96, 27, 27), "conv2": (256, 27, 27), "pool2": (256, 13, 13),
        "conv3": (384, 13, 13), "conv5": (256, 13, 13), "pool5": (256, 6, 6), "fc6": (4096,),
        "fc8": (1000,), "prob": (1000,)},
    "bvlc_googlenet": {
        "conv1/7x7_s2": (64, 112, 112), "pool1/3x3_s2": (64, 56, 56), "pool2/3x3_s2": (192, 28, 28),
        "inception_3a/output": (256, 28, 28), "inception_3b/output": (480, 28, 28),
        "pool3/3x3_s2": (480, 14, 14), "inception_4e/output": (832, 14, 14), "pool4/3x3_s2": (832, 7, 7),
        "inception_5b/output": (1024, 7, 7), "pool5/7x7_s1": (1024, 1, 1), "prob": (1000,)},
    "squeezenet_v1.0": {
        "conv1": (96, 111, 111), "pool1": (96, 55, 55), "fire2/concat": (128, 55, 55),
        "fire4/concat": (256, 55, 55), "pool4": (256, 27, 27), "fire9/concat": (512, 13, 13),
        # the released v1.0 prototxt pads its 1x1 conv10 by 1 (the paper's table says 13x13)
        "conv10": (1000, 15, 15), "pool10": (1000, 1, 1), "prob": (1000, 1, 1)},
    "squeezenet_v1.1": {
        "conv1": (64, 113, 113), "pool1": (64, 56, 56), "fire2/concat": (128, 56, 56),
        "pool3": (128, 28, 28), "pool5": (256, 14, 14), "fire9/concat": (512, 14, 14),
        "conv10": (1000, 14, 14), "pool10": (1000, 1, 1), "prob": (1000, 1, 1)},
    "mobilenet_v1": {
        "conv1": (32, 112, 112), "conv2_1/sep": (64, 112, 112), "conv2_2/sep": (128, 56, 56),
        "conv3_2/sep": (256, 28, 28), "conv4_2/sep": (512, 14, 14), "conv5_6/sep": (1024, 7, 7),
        "conv6/sep": (1024, 7, 7), "pool6": (1024, 1, 1), "fc7": (1000, 1, 1), "prob": (1000, 1, 1)},
    "mobilenet_v2": {
        "conv1": (32, 112, 112), "conv6_4": (1280, 7, 7), "pool6": (1280, 1, 1), "fc7": (1000, 1, 1),
        "prob": (1000, 1, 1)},
    "resnet_50": {
        "conv1": (64, 112, 112), "pool1": (64, 56, 56), "res2c": (256, 56, 56), "res3d": (512, 28, 28),
        "res4f": (1024, 14, 14), "res5c": (2048, 7, 7), "pool5": (2048, 1, 1), "fc1000": (1000,),
        "prob": (1000,)},
}


# ------------------------------------------------------------ the independent shape calculator
def _spatial(values, h_value, w_value, default):
    """A Caffe 2-D geometry field: the repeated value (one for both axes or one per axis) or the
    _h/_w pair."""
    if h_value or w_value:
        return h_value, w_value
    if len(values) == 0:
        return default, default
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _conv_shape(bottom, p):
    kh, kw = _spatial(p.kernel_size, p.kernel_h, p.kernel_w, None)
    sh, sw = _spatial(p.stride, p.stride_h, p.stride_w, 1)
    ph, pw = _spatial(p.pad, p.pad_h, p.pad_w, 0)
    dh, dw = _spatial(p.dilation, 0, 0, 1)
    n, _, h, w = bottom
    out = [(size + 2 * pad - d * (k - 1) - 1) // s + 1
           for size, k, s, pad, d in ((h, kh, sh, ph, dh), (w, kw, sw, pw, dw))]
    return (n, p.num_output, *out)


def _pool_shape(bottom, p):
    n, c, h, w = bottom
    if p.global_pooling:
        return (n, c, 1, 1)
    kh, kw = _spatial([p.kernel_size] if p.HasField("kernel_size") else [], p.kernel_h, p.kernel_w, None)
    sh, sw = _spatial([p.stride] if p.HasField("stride") else [], p.stride_h, p.stride_w, 1)
    ph, pw = _spatial([p.pad] if p.HasField("pad") else [], p.pad_h, p.pad_w, 0)
    rounding = math.floor if p.round_mode == caffe_pb2.PoolingParameter.FLOOR else math.ceil
    out = []
    for size, k, s, pad in ((h, kh, sh, ph), (w, kw, sw, pw)):
        o = int(rounding((size + 2 * pad - k) / s)) + 1
        if (ph or pw) and (o - 1) * s >= size + pad:  # Caffe: the last window must start inside
            o -= 1
        out.append(o)
    return (n, c, *out)


def _input_shapes(param):
    shapes = {}
    if param.input:  # legacy net inputs
        if param.input_shape:
            dims = [tuple(s.dim) for s in param.input_shape]
        else:
            dims = [tuple(param.input_dim[4 * i:4 * i + 4]) for i in range(len(param.input))]
        shapes.update(zip(param.input, dims))
    for lp in param.layer:
        if lp.type == "Input":
            for i, top in enumerate(lp.top):
                shapes[top] = tuple(lp.input_param.shape[min(i, len(lp.input_param.shape) - 1)].dim)
    return shapes


def caffe_shapes(prototxt: str, batch: int) -> dict[str, tuple[int, ...]]:
    """Every top's shape by Caffe's formulas, from the prototxt as written, at the given batch size."""
    with open(prototxt) as f:
        param = text_format.Parse(f.read(), caffe_pb2.NetParameter())
    shapes = {name: (batch,) + dims[1:] for name, dims in _input_shapes(param).items()}
    for lp in param.layer:
        if lp.type == "Input":
            continue
        bottoms = [shapes[b] for b in lp.bottom]
        if lp.type == "Convolution":
            top = _conv_shape(bottoms[0], lp.convolution_param)
        elif lp.type == "Pooling":
            top = _pool_shape(bottoms[0], lp.pooling_param)
        elif lp.type == "InnerProduct":
            top = (bottoms[0][0], lp.inner_product_param.num_output)
        elif lp.type == "Concat":
            axis = lp.concat_param.axis
            top = list(bottoms[0])
            top[axis] = sum(b[axis] for b in bottoms)
            top = tuple(top)
        elif lp.type in ("ReLU", "LRN", "Dropout", "BatchNorm", "Scale", "Eltwise", "Softmax"):
            assert all(b == bottoms[0] for b in bottoms), lp.name
            top = bottoms[0]
        else:
            raise AssertionError(f"the shape calculator does not know {lp.type} (layer {lp.name})")
        shapes[lp.top[0]] = top
    return shapes


def test_shape_calculator_on_hand_computed_cases():
    """The calculator itself, on cases worked by hand (the ceil and clipping rules of pooling)."""
    conv = caffe_pb2.ConvolutionParameter(num_output=8, kernel_size=[3], stride=[2], pad=[1], dilation=[2])
    assert _conv_shape((1, 3, 10, 9), conv) == (1, 8, 4, 4)  # (10+2-4-1)//2+1 = 4, (9+2-4-1)//2+1 = 4
    pool = caffe_pb2.PoolingParameter(kernel_size=3, stride=2)
    assert _pool_shape((1, 4, 6, 7), pool) == (1, 4, 3, 3)  # ceil(3/2)+1 = 3, ceil(4/2)+1 = 3
    pool = caffe_pb2.PoolingParameter(kernel_size=2, stride=2, pad=1)
    # height: ceil(4/2)+1 = 3; width: ceil(5/2)+1 = 4, but (4-1)*2 = 6 >= 5+1 starts in the padding: 3
    assert _pool_shape((1, 4, 4, 5), pool) == (1, 4, 3, 3)
    pool = caffe_pb2.PoolingParameter(kernel_size=2, stride=2)
    assert _pool_shape((1, 4, 4, 5), pool) == (1, 4, 2, 3)  # no padding, no clipping: ceil(3/2)+1 = 3
    pool = caffe_pb2.PoolingParameter(kernel_size=3, stride=2, round_mode=caffe_pb2.PoolingParameter.FLOOR)
    assert _pool_shape((1, 4, 6, 6), pool) == (1, 4, 2, 2)


# ------------------------------------------------------------------------ the nets, built once
def _fill_params(net: Net, seed: int) -> None:
    """Seeded random params that keep activations and gradients in a sane range: He-scaled weights,
    BatchNorm statistics with positive variances (scale factor 1), Scale multipliers near 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].type
        for i, blob in enumerate(blobs):
            r = torch.randn(blob.shape, generator=gen)
            if kind == "BatchNorm":
                r = [0.1 * r, 0.5 + torch.rand(blob.shape, generator=gen), torch.ones(blob.shape)][i]
            elif kind == "Scale" and i == 0:
                r = 1 + 0.1 * r
            elif len(blob.shape) > 1:
                r = r * math.sqrt(2.0 / np.prod(blob.shape[1:]))
            else:
                r = 0.1 * r
            blob.data[...] = r.numpy()


class ZooRun:
    """A zoo net at batch 1 after one forward pass and one backward pass from below its Softmax."""

    def __init__(self, name: str):
        self.prototxt = str(require_reference("zoo", name + ".prototxt"))
        param = read_net_text(self.prototxt)
        param.force_backward = True
        self.net = net = Net(param, TEST)
        data = net.blobs[net.inputs[0]]
        data.reshape(1, *data.shape[1:])
        net.reshape()
        _fill_params(net, seed=7)
        data.data[...] = np.random.RandomState(7).randn(*data.shape)
        net.forward()
        # prob = Softmax(logits): start backward from the logits with a random gradient (a constant
        # gradient on prob would give exactly zero diffs through the softmax).
        softmax = net.layer_names[-1]
        assert net.layer_dict[softmax].type == "Softmax"
        logits = net.bottom_names[softmax][0]
        net.blobs[logits].diff[...] = np.random.RandomState(8).randn(*net.blobs[logits].shape)
        net.backward(start=net.layer_names[-2])


@pytest.fixture(scope="module")
def zoo():
    built = {}

    def get(name: str) -> ZooRun:
        if name not in built:
            built[name] = ZooRun(name)
        return built[name]
    return get


@pytest.mark.parametrize("name", ZOO)
def test_published_shapes(zoo, name):
    net = zoo(name).net
    for blob, dims in PUBLISHED[name].items():
        assert net.blobs[blob].shape == (1,) + dims, blob


@pytest.mark.parametrize("name", ZOO)
def test_every_blob_has_caffes_shape(zoo, name):
    run = zoo(name)
    expected = caffe_shapes(run.prototxt, batch=1)
    got = {blob: run.net.blobs[blob].shape for blob in expected}
    assert got == expected
    convs_and_pools = [n for n, l in run.net.layer_dict.items() if l.type in ("Convolution", "Pooling")]
    assert len(convs_and_pools) >= 8


@pytest.mark.parametrize("name", ZOO)
def test_forward_and_backward_reach_the_first_conv(zoo, name):
    net = zoo(name).net
    prob = net.blobs["prob"].data
    assert np.isfinite(prob).all()
    np.testing.assert_allclose(prob.reshape(1, -1).sum(1), 1, rtol=1e-5)
    first_conv = next(n for n, l in net.layer_dict.items() if l.type == "Convolution")
    weight_diff = net.params[first_conv][0].diff
    assert np.isfinite(weight_diff).all()
    assert np.abs(weight_diff).max() > 1e-8
    assert np.count_nonzero(weight_diff) > weight_diff.size // 2
    assert np.abs(net.blobs[net.inputs[0]].diff).max() > 0  # force_backward reached the data
