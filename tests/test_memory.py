"""What a net keeps in memory: old tensors go before new ones are computed, nothing a backward
never needs is allocated, and what layers keep for backward is no bigger than Caffe's.
(Peak memory itself is measured by benchmarks/memory_bench.py, never asserted here.)"""
import os
import weakref

import numpy as np
import pytest
import torch

from helpers import make_net
from recaffe import layer as layer_mod
from recaffe.blob import Blob
from recaffe.gradient_check import make_layer
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


def test_a_layer_top_data_is_freed_before_the_layer_computes_the_new_one_or_written_into():
    net = _net()
    net.forward_loss()
    seen = {}
    for layer, top in (("conv", "c"), ("pool", "p")):
        old = weakref.ref(net.blobs[top].data_t)
        _on_call(net.layer_dict[layer], "forward", lambda layer=layer, old=old: seen.setdefault(layer, old()))
    before = {b: net.blobs[b].data_t.clone() for b in ("c", "p", "r", "y")}
    reused = {b: net.blobs[b].data_t.data_ptr() for b in ("r", "y")}  # ReLU, InnerProduct
    net.forward_loss()
    assert seen == {"conv": None, "pool": None}
    assert {b: net.blobs[b].data_t.data_ptr() for b in ("r", "y")} == reused
    for b, v in before.items():  # same input, same values
        assert torch.equal(net.blobs[b].data_t, v)


def test_a_bottom_diff_is_freed_before_the_layer_writes_the_new_one_or_written_into():
    net = _net()
    _fwd_bwd(net)
    seen = {}
    for layer, bottom in (("pool", "c"), ("conv", "x")):
        old = weakref.ref(net.blobs[bottom].diff_t)
        _on_call(net.layer_dict[layer], "backward", lambda layer=layer, old=old: seen.setdefault(layer, old()))
    before = {b: net.blobs[b].diff_t.clone() for b in ("x", "c", "p", "r")}
    reused = {b: net.blobs[b].diff_t.data_ptr() for b in ("r", "p")}  # InnerProduct, ReLU
    _fwd_bwd(net)
    assert seen == {"pool": None, "conv": None}
    assert {b: net.blobs[b].diff_t.data_ptr() for b in ("r", "p")} == reused
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


# ---------------------------------------------------------------- writing into the blobs' memory
def _ptrs(net, datas, diffs):
    return ([net.blobs[b]._data.tensor.data_ptr() for b in datas]
            + [net.blobs[b]._diff.tensor.data_ptr() for b in diffs])


def test_relu_concat_and_split_write_into_last_passes_memory_with_fresh_values():
    # r = relu(c) (not in place), c2 = relu(c2) in place, Concat of both, a Split (c feeds two)
    net = make_net(
        'force_backward: true\n'
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } } }\n'
        'layer { name: "conv" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 4 '
        '  kernel_size: 3 weight_filler { type: "gaussian" std: 0.5 } } }\n'
        'layer { name: "relu" type: "ReLU" bottom: "c" top: "r" }\n'
        'layer { name: "conv2" type: "Convolution" bottom: "c" top: "c2" convolution_param { num_output: 4 '
        '  kernel_size: 1 weight_filler { type: "gaussian" std: 0.5 } } }\n'
        'layer { name: "relu2" type: "ReLU" bottom: "c2" top: "c2" relu_param { negative_slope: 0.1 } }\n'
        'layer { name: "cat" type: "Concat" bottom: "r" bottom: "c2" top: "y" }\n', caffe_pb2.TEST)
    # the small convolutions' tops are new tensors each pass; the rest is written in place
    datas, diffs = ("r", "y"), ("r", "c2", "c")
    rng = np.random.default_rng(0)
    ptrs = None
    for _ in range(3):
        x = torch.from_numpy(rng.standard_normal((2, 3, 5, 5)))
        dy = torch.from_numpy(rng.standard_normal((2, 8, 3, 3))).float()
        net.blobs["x"].data_t = x.float()
        net.forward_loss()
        net.blobs["y"].diff_t = dy.clone()
        net.backward_from_to()
        if ptrs is None:
            ptrs = _ptrs(net, datas, diffs)
        assert _ptrs(net, datas, diffs) == ptrs  # the same memory every pass
        # the values of this pass, by autograd
        conv, conv2 = net.layer_dict["conv"], net.layer_dict["conv2"]
        xg = x.float().requires_grad_(True)
        c = torch.nn.functional.conv2d(xg, conv.blobs[0].data_t, conv.blobs[1].data_t)
        c2 = torch.nn.functional.leaky_relu(
            torch.nn.functional.conv2d(c, conv2.blobs[0].data_t, conv2.blobs[1].data_t), 0.1)
        y = torch.cat([torch.relu(c), c2], 1)
        y.backward(dy)
        torch.testing.assert_close(net.blobs["y"].data_t, y.detach())
        torch.testing.assert_close(net.blobs["x"].diff_t, xg.grad)


def test_a_tensor_viewed_elsewhere_is_never_overwritten():
    b = Blob((2, 3))
    t = b.mutable_data_t()
    assert b.data_writable and b.mutable_data_t() is t
    other = Blob((6,))
    other.data_t = t.view(6)  # another blob's (as an alias layer's top)
    assert not b.data_writable
    assert b.mutable_data_t() is not t  # a new tensor instead: the view keeps its values
    del other
    held = b.data  # Python's arrays over the memory: results belong there (pycaffe)
    assert b.data_writable and b.mutable_data_t().data_ptr() == held.ctypes.data


def test_in_place_relu_on_a_shared_blob_leaves_the_sharer_alone():
    # Split tops share the bottom's data; an in-place ReLU on one of them must not change the other
    net = make_net(
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 } } }\n'
        'layer { name: "split" type: "Split" bottom: "x" top: "a" top: "b" }\n'
        'layer { name: "relu" type: "ReLU" bottom: "a" top: "a" }\n', caffe_pb2.TEST)
    net.blobs["x"].data_t = torch.tensor([-1.0, 2.0, -3.0, 4.0])
    net.forward_loss()
    assert net.blobs["a"].data_t.tolist() == [0, 2, 0, 4]
    assert net.blobs["b"].data_t.tolist() == [-1, 2, -3, 4]


@pytest.mark.parametrize("layer", [
    'type: "Convolution" convolution_param { num_output: 5 kernel_size: 3 pad: 1 stride: 2 '
    '  weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.2 } }',
    'type: "Deconvolution" convolution_param { num_output: 4 kernel_size: 3 stride: 2 group: 2 '
    '  weight_filler { type: "gaussian" std: 0.3 } }',
    'type: "Pooling" pooling_param { pool: MAX kernel_size: 3 stride: 2 }',
    'type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }',
    'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }',
    'type: "LRN" lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }',
])
def test_batch_chunks_give_the_whole_batchs_values_in_reused_memory(monkeypatch, layer):
    x = np.random.default_rng(3).permutation(5 * 6 * 7 * 7).reshape(5, 6, 7, 7) * 0.01
    dy = None
    results = []
    for chunked in (False, True):  # one call; two items (float64, 6x7x7 inputs) a call
        if chunked:
            monkeypatch.setattr(layer_mod, "CHUNK_BYTES", 2 * 6 * 7 * 7 * 8)
        lay, bottom, top = make_layer(layer, [x])
        assert (lay._chunks is not None) == chunked
        if dy is None:
            dy = np.random.default_rng(4).standard_normal(top[0].shape)
        ptrs = []
        for _ in range(2):
            lay.run_forward(bottom, top)
            top[0].diff_t = torch.from_numpy(dy).clone()
            for p in lay.blobs:
                p.diff_t.zero_()
            lay.backward(top, [True], bottom)
            ptrs.append((top[0].data_t.data_ptr(), bottom[0].diff_t.data_ptr()))
        if lay._chunks is not None:
            assert len(lay._chunks) >= 3 and ptrs[0] == ptrs[1]
        results.append([top[0].data_t.clone(), bottom[0].diff_t.clone()]
                       + [p.diff_t.clone() for p in lay.blobs])
    for whole, chunked in zip(*results):
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def _bn_scale_net(in_place: bool):
    # conv -> BatchNorm (global statistics) -> Scale -> ReLU, then Eltwise SUM with the conv's input
    names = ["c", "c", "c", "c"] if in_place else ["c", "b", "s", "r"]
    return make_net(
        'force_backward: true\n'
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n'
        f'layer {{ name: "conv" type: "Convolution" bottom: "x" top: "{names[0]}" convolution_param {{ '
        '  num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.5 } } }\n'
        f'layer {{ name: "bn" type: "BatchNorm" bottom: "{names[0]}" top: "{names[1]}" '
        '  batch_norm_param { use_global_stats: true } }\n'
        f'layer {{ name: "scale" type: "Scale" bottom: "{names[1]}" top: "{names[2]}" scale_param {{ '
        '  bias_term: true filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }\n'
        f'layer {{ name: "relu" type: "ReLU" bottom: "{names[2]}" top: "{names[3]}" }}\n'
        f'layer {{ name: "sum" type: "Eltwise" bottom: "{names[3]}" bottom: "x" top: "y" '
        '  eltwise_param { coeff: 2 coeff: -1 } }\n', caffe_pb2.TEST)


def test_batchnorm_scale_relu_eltwise_in_place_equal_the_same_layers_apart():
    nets = [_bn_scale_net(False), _bn_scale_net(True)]
    rng = np.random.default_rng(5)
    stats = [rng.standard_normal(3), rng.random(3) + 0.5, np.array([2.0])]
    for net in nets:
        for dst, src in zip(net.layer_dict["bn"].blobs, stats):
            dst.data[...] = src
        for name in ("conv", "scale"):
            for dst, src in zip(net.layer_dict[name].blobs, nets[0].layer_dict[name].blobs):
                dst.data_t = src.data_t.clone()
    ptrs = []
    for _ in range(3):  # fresh values each pass, written into last pass's memory
        x = torch.from_numpy(rng.standard_normal((2, 3, 4, 4))).float()
        dy = torch.from_numpy(rng.standard_normal((2, 3, 4, 4))).float()
        for net in nets:
            net.blobs["x"].data_t = x.clone()
            net.clear_param_diffs()
            net.forward_loss()
            net.blobs["y"].diff_t = dy.clone()
            net.backward_from_to()
        apart, in_place = nets
        ptrs.append([apart.blobs[b]._data.tensor.data_ptr() for b in ("b", "y")]
                    + [apart.blobs[b]._diff.tensor.data_ptr() for b in ("c", "s")])
        # BatchNorm wrote in place (keeping no normalized copy), Scale kept its input and wrote
        # into the one it kept last pass, and so did the backward chain
        assert all(net.layer_dict["bn"]._x_norm is None for net in nets)
        scale = nets[1].layer_dict["scale"]
        assert scale._x is not None and scale._x.data_ptr() != nets[1].blobs["c"].data_t.data_ptr()
        torch.testing.assert_close(in_place.blobs["y"].data_t, apart.blobs["y"].data_t, rtol=0, atol=0)
        torch.testing.assert_close(in_place.blobs["x"].diff_t, apart.blobs["x"].diff_t, rtol=0, atol=0)
        for name in ("conv", "scale"):
            for a, b in zip(apart.layer_dict[name].blobs, in_place.layer_dict[name].blobs):
                torch.testing.assert_close(b.diff_t, a.diff_t, rtol=0, atol=0)
    assert ptrs[1] == ptrs[2]  # apart: BatchNorm's and Eltwise's tops, BatchNorm's and Scale's bottom diffs
    # and by autograd, for the in-place net's last pass
    conv, scale = (nets[1].layer_dict[n] for n in ("conv", "scale"))
    xg = x.clone().requires_grad_(True)
    mean, var = (torch.from_numpy(v / 2.0).float() for v in stats[:2])
    c = torch.nn.functional.conv2d(xg, conv.blobs[0].data_t, conv.blobs[1].data_t, padding=1)
    b = (c - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
    s = b * scale.blobs[0].data_t.view(1, -1, 1, 1) + scale.blobs[1].data_t.view(1, -1, 1, 1)
    y = 2 * torch.relu(s) - xg
    y.backward(dy)
    torch.testing.assert_close(nets[1].blobs["y"].data_t, y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nets[1].blobs["x"].diff_t, xg.grad, rtol=1e-5, atol=1e-5)


def test_a_diff_two_blobs_share_is_not_overwritten_in_place():
    # ResNet's shape: Eltwise SUM hands its top diff to both bottoms; each branch ends in an
    # in-place Scale whose backward must not scale the other branch's gradient through it
    net = make_net(
        'force_backward: true\n'
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 3 '
        '  weight_filler { type: "gaussian" std: 1 } } }\n'
        'layer { name: "b" type: "InnerProduct" bottom: "x" top: "b" inner_product_param { num_output: 3 '
        '  weight_filler { type: "gaussian" std: 1 } } }\n'
        'layer { name: "sa" type: "Scale" bottom: "a" top: "a" scale_param { filler { type: "constant" value: 3 } } }\n'
        'layer { name: "rb" type: "ReLU" bottom: "b" top: "b" }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "y" }\n', caffe_pb2.TEST)
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]])
    net.blobs["x"].data_t = x.clone()
    dy = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    for _ in range(2):
        net.forward_loss()
        net.blobs["y"].diff_t = dy.clone()
        net.backward_from_to()
    # Caffe: the Eltwise top keeps its diff; "a" gets dy * 3, "b" gets dy where b > 0
    torch.testing.assert_close(net.blobs["y"].diff_t, dy, rtol=0, atol=0)
    torch.testing.assert_close(net.blobs["a"].diff_t, dy * 3, rtol=0, atol=0)
    wb = net.layer_dict["b"].blobs[0].data_t
    b = x @ wb.t() + net.layer_dict["b"].blobs[1].data_t
    torch.testing.assert_close(net.blobs["b"].diff_t, dy * (b > 0), rtol=0, atol=0)


def test_large_blob_memory_is_zero_writable_and_its_own():
    from recaffe import blob as blob_mod
    n = blob_mod.MAPPED_MIN_BYTES // 4 + 10  # float32 values past the mapping threshold
    b = Blob((n,))
    t = b.diff_t  # first read: zeros, in a mapping of its own
    assert t.dtype == torch.float32 and not bool(t.any())
    if os.path.exists("/proc/self/maps"):  # Linux: outside the heap kernels' temporaries churn
        with open("/proc/self/maps") as f:
            lines = [ln for ln in f if int(ln.split("-")[0], 16) <= t.data_ptr()
                     < int(ln.split("-")[1].split()[0], 16)]
        assert len(lines) == 1 and "[heap]" not in lines[0]
    assert b.diff_writable and b.mutable_diff_t() is t
    t.fill_(2.5)
    b.reshape(n + 1)  # a new size: new memory, zero again
    assert not bool(b.diff_t.any())
    small = Blob((3,))
    assert small.data_t.tolist() == [0, 0, 0]


def test_memory_split_tops_share_is_written_in_place_and_they_see_it():
    # Eltwise's top feeds two layers, so a Split shares its data (Caffe's ShareData): Eltwise
    # still writes into the same memory each pass, and the Split's tops read the new values
    net = make_net(
        'layer { name: "in" type: "Input" top: "x" top: "z" input_param { shape { dim: 2 dim: 300000 } '
        '  shape { dim: 2 dim: 300000 } } }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "z" top: "s" }\n'
        'layer { name: "r1" type: "ReLU" bottom: "s" top: "r1" }\n'
        'layer { name: "r2" type: "TanH" bottom: "s" top: "r2" }\n', caffe_pb2.TEST)
    assert any(t == "Split" for t in (layer.type for layer in net.layers))
    rng = np.random.default_rng(7)
    ptrs = set()
    for _ in range(3):
        x, z = (torch.from_numpy(rng.standard_normal((2, 300000))).float() for _ in range(2))
        net.blobs["x"].data_t, net.blobs["z"].data_t = x, z
        net.forward_loss()
        ptrs.add(net.blobs["s"]._data.tensor.data_ptr())
        torch.testing.assert_close(net.blobs["r1"].data_t, torch.relu(x + z), rtol=0, atol=0)
        torch.testing.assert_close(net.blobs["r2"].data_t, torch.tanh(x + z))
    assert len(ptrs) == 1  # large (its own mapping): written in place, not re-mapped each pass


def test_identity_backwards_share_the_diff_but_arrays_python_holds_stay_live():
    # Eltwise SUM (coeff 1) gives each bottom the top's diff: shared, unless Python holds the
    # bottom's diff array, which then keeps getting the new values (pycaffe's arrays stay live)
    net = make_net(
        'force_backward: true\n'
        'layer { name: "in" type: "Input" top: "x" top: "z" input_param { shape { dim: 4 } shape { dim: 4 } } }\n'
        'layer { name: "sum" type: "Eltwise" bottom: "x" bottom: "z" top: "y" }\n', caffe_pb2.TEST)
    held = net.blobs["z"].diff
    for k in (1.0, 2.0):
        net.forward_loss()
        net.blobs["y"].diff_t = torch.full((4,), k)
        net.backward_from_to()
        assert held.tolist() == [k] * 4 and net.blobs["x"].diff.tolist() == [k] * 4
    assert net.blobs["x"]._diff.shared_from is not None  # x holds no array: shared
