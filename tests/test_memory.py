"""What a net keeps in memory: old tensors go before new ones are computed, nothing a backward
never needs is allocated, and what layers keep for backward is no bigger than Caffe's.
(Peak memory itself is measured by benchmarks/memory_bench.py, never asserted here.)"""
import weakref

import numpy as np
import torch

from helpers import make_net
from recaffe.proto import caffe_pb2

NET = (
    'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 9 dim: 9 } } }\n'
    'layer { name: "conv" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 20 '
    '  kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }\n'
    'layer { name: "pool" type: "Pooling" bottom: "c" top: "p" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
    'layer { name: "relu" type: "ReLU" bottom: "p" top: "r" }\n'
    'layer { name: "fc" type: "InnerProduct" bottom: "r" top: "y" inner_product_param { num_output: 4 '
    '  weight_filler { type: "gaussian" std: 0.3 } } }\n')


def _net(force_backward=True):
    net = make_net(("force_backward: true\n" if force_backward else "") + NET, caffe_pb2.TEST)
    net.blobs["x"].data[...] = np.random.default_rng(0).standard_normal((2, 3, 9, 9))
    return net


def _fwd_bwd(net):
    """Forward and backward without reading any array from Python (which would pin the memory)."""
    net.forward_loss()
    net.blobs["y"].diff_t = torch.linspace(-1, 1, 8).reshape(2, 4)
    net.backward_from_to()


def _on_call(layer, method, check):
    """Run ``check()`` each time ``layer.<method>`` is called, before the method itself."""
    original = getattr(layer, method)

    def wrapped(*args):
        check()
        return original(*args)
    setattr(layer, method, wrapped)


def test_a_layer_top_data_is_freed_before_the_layer_computes_the_new_one():
    net = _net()
    net.forward_loss()
    seen = {}
    for layer, top in (("conv", "c"), ("pool", "p"), ("relu", "r"), ("fc", "y")):
        old = weakref.ref(net.blobs[top].data_t)
        _on_call(net.layer_dict[layer], "forward", lambda layer=layer, old=old: seen.setdefault(layer, old()))
    before = {b: net.blobs[b].data_t.clone() for b in ("c", "p", "r", "y")}
    net.forward_loss()
    assert seen == {"conv": None, "pool": None, "relu": None, "fc": None}
    for b, v in before.items():  # same input, same values
        assert torch.equal(net.blobs[b].data_t, v)


def test_a_bottom_diff_is_freed_before_the_layer_writes_the_new_one():
    net = _net()
    _fwd_bwd(net)
    seen = {}
    for layer, bottom in (("fc", "r"), ("relu", "p"), ("pool", "c"), ("conv", "x")):
        old = weakref.ref(net.blobs[bottom].diff_t)
        _on_call(net.layer_dict[layer], "backward", lambda layer=layer, old=old: seen.setdefault(layer, old()))
    before = {b: net.blobs[b].diff_t.clone() for b in ("x", "c", "p", "r")}
    _fwd_bwd(net)
    assert seen == {"fc": None, "relu": None, "pool": None, "conv": None}
    for b, v in before.items():
        assert torch.equal(net.blobs[b].diff_t, v)


def test_arrays_python_holds_stay_live_through_the_early_frees():
    net = _net()
    _fwd_bwd(net)
    data, diff = net.blobs["c"].data, net.blobs["c"].diff
    net.blobs["x"].data[...] *= -2
    _fwd_bwd(net)
    assert np.shares_memory(data, net.blobs["c"].data) and np.shares_memory(diff, net.blobs["c"].diff)
    c = net.layer_dict["conv"]
    expected = torch.nn.functional.conv2d(net.blobs["x"].data_t, c.blobs[0].data_t, c.blobs[1].data_t)
    np.testing.assert_allclose(data, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_diffs_that_no_backward_needs_are_never_allocated():
    net = _net(force_backward=False)  # no loss: no layer needs backward
    _fwd_bwd(net)
    assert all(net.blobs[b]._diff.tensor is None for b in ("x", "c", "p", "r"))
    net = _net(force_backward=True)  # the input's diff only with force_backward
    _fwd_bwd(net)
    assert net.blobs["x"]._diff.tensor is not None


def test_max_pooling_keeps_caffes_int32_mask_and_drops_the_last_one_first():
    net = _net()
    pool = net.layer_dict["pool"]
    net.forward_loss()
    assert pool._idx.dtype == torch.int32 and pool._idx.is_contiguous()
    old = weakref.ref(pool._idx)
    seen = []
    _on_call(pool, "_max_forward", lambda: seen.append(old()))
    net.forward_loss()
    assert seen == [None]


def test_max_pooling_backward_through_the_int32_mask_matches_torch():
    for pad, ceil in ((0, True), (1, False)):  # torch's kernel, and the padded path Caffe's windows need
        net = make_net(
            'force_backward: true\n'
            'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 17 dim: 7 dim: 7 } } }\n'
            f'layer {{ name: "pool" type: "Pooling" bottom: "x" top: "p" pooling_param {{ pool: MAX '
            f'kernel_size: 3 stride: 2 pad: {pad} }} }}\n', caffe_pb2.TEST)
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 17, 7, 7)).astype(np.float32))
        net.blobs["x"].data[...] = x.numpy()
        net.forward()
        dy = np.random.default_rng(2).standard_normal(net.blobs["p"].shape).astype(np.float32)
        net.blobs["p"].diff[...] = dy
        net.backward()
        xt = x.clone().requires_grad_(True)
        y = torch.nn.functional.max_pool2d(xt, 3, 2, pad, ceil_mode=True)
        y.backward(torch.from_numpy(dy))
        np.testing.assert_array_equal(net.blobs["p"].data, y.detach().numpy())
        np.testing.assert_array_equal(net.blobs["x"].diff, xt.grad.numpy())
