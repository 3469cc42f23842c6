"""torch.nn.Sequential → Caffe deploy net + weights (recaffe.import_torch): the imported net computes
what ``model.eval()`` computes, blob by blob, with torch's shapes; the pooling rounding is chosen
right; what Caffe cannot express is refused with the module named."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from google.protobuf import text_format

import caffe
from recaffe.import_torch import TorchImportError, from_torch_sequential, save_torch_sequential
from recaffe.net import TEST, Net
from recaffe.proto import caffe_pb2

PoolP = caffe_pb2.PoolingParameter


def _randomize_batch_norms(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


def _torch_outputs(model: nn.Sequential, x: torch.Tensor) -> list[np.ndarray]:
    """Every leaf module's output in model.eval(), in order (nested Sequentials walked)."""
    outs = []

    def walk(seq, x):
        for m in seq:
            if type(m) is nn.Sequential:
                x = walk(m, x)
            else:
                x = m(x)
                if type(m) is not nn.Identity:
                    outs.append(x.numpy())
        return x

    model.eval()
    with torch.no_grad():
        walk(model, x)
    return outs


def _import_and_run(model, shape, seed=0, tmp_path=None):
    """The imported net (through files when tmp_path is given) after a forward pass on random data,
    and torch's outputs for the same data."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if tmp_path is None:
        net_param, weights = from_torch_sequential(model, shape)
        net = Net(net_param, TEST)
        net.copy_trained_layers_from(weights)
    else:
        save_torch_sequential(model, shape, tmp_path / "m.prototxt", tmp_path / "m.caffemodel")
        net = caffe.Net(str(tmp_path / "m.prototxt"), caffe.TEST, weights=str(tmp_path / "m.caffemodel"))
    net.forward(data=x.numpy())
    return net, _torch_outputs(model, x)


def _assert_close(ours, theirs):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def _layer_tops(net: Net) -> list[str]:
    """The top of each imported layer after Input (one per module; BatchNorm+Scale count once, at
    the Scale)."""
    names = [n for n in net.layer_names if net.layer_dict[n].type != "Input"]
    tops = []
    for n in names:
        top = net.top_names[n][0]
        if net.layer_dict[n].type == "Scale" and tops and net.layer_dict[tops[-1][0]].type == "BatchNorm":
            tops[-1] = (n, top)
        else:
            tops.append((n, top))
    return [t for _, t in tops]


def _mixed_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(8, 8, (3, 1), stride=2, padding=(1, 0), groups=2, bias=False),
                      nn.BatchNorm2d(8, affine=False, eps=1e-3), nn.LeakyReLU(0.1)),
        nn.AvgPool2d(3, stride=2, padding=1), nn.Flatten(), nn.Linear(32, 10), nn.Dropout(0.3), nn.Tanh(),
        nn.Linear(10, 5), nn.Softmax(dim=1))


def test_mixed_model_matches_torch_blob_by_blob(tmp_path):
    torch.manual_seed(1)
    model = _mixed_model()
    _randomize_batch_norms(model, torch.Generator().manual_seed(2))
    net, expected = _import_and_run(model, (2, 3, 11, 13), tmp_path=tmp_path)
    tops = _layer_tops(net)
    assert len(tops) == len(expected) == 14
    for top, want in zip(tops, expected):
        assert net.blobs[top].shape == want.shape, top
        _assert_close(net.blobs[top].data, want)
    assert net.outputs == [tops[-1]]
    assert net.blobs["pool3"].shape == (2, 8, 5, 6)  # floor((11-2)/2)+1, floor((13-2)/2)+1


def test_more_modules_match_torch():
    """Dilation, 'same' padding, Sigmoid, Identity, Linear on a 4-D blob (torch: the last axis),
    Softmax over another axis, named and nested modules."""
    torch.manual_seed(3)
    model = nn.Sequential(OrderedDict(
        stem=nn.Conv2d(2, 6, 3, dilation=2, padding="same"),
        act=nn.Sigmoid(),
        skip=nn.Identity(),
        block=nn.Sequential(nn.Conv2d(6, 4, (1, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2)),
                            nn.Tanh()),
        head=nn.Linear(4, 7),
        norm=nn.Softmax(dim=2),
    ))
    net, expected = _import_and_run(model, (3, 2, 9, 10), seed=4)
    assert net.layer_names == ["data", "stem", "act", "block_0", "block_1", "head", "norm"]
    assert net.layer_dict["head"].layer_param.inner_product_param.axis == 3
    for top, want in zip(_layer_tops(net), expected):
        assert net.blobs[top].shape == want.shape, top
        _assert_close(net.blobs[top].data, want)


def _random_block(rng: np.random.Generator, channels: int) -> tuple[list[nn.Module], int]:
    """Conv2d (random geometry, groups, bias), maybe BatchNorm2d, an activation, maybe a pooling
    (ceil_mode only where Caffe can follow it: with padding, or a kernel no smaller than the stride)."""
    out = int(rng.choice([2, 4, 6]))
    groups = int(rng.choice([g for g in (1, 2) if channels % g == 0 and out % g == 0]))
    k = int(rng.choice([1, 2, 3]))
    layers = [nn.Conv2d(channels, out, k, stride=int(rng.integers(1, 3)), padding=int(rng.integers(0, 2)),
                        dilation=int(rng.integers(1, 3)), groups=groups, bias=bool(rng.integers(2)))]
    if rng.integers(2):
        layers.append(nn.BatchNorm2d(out, affine=bool(rng.integers(2))))
    layers.append([nn.ReLU(), nn.LeakyReLU(0.2), nn.Sigmoid(), nn.Tanh()][rng.integers(4)])
    if rng.integers(2):
        k, s = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        pad = int(rng.integers(0, k // 2 + 1))
        ceil = bool(rng.integers(2)) and (pad > 0 or k >= s)
        pool = nn.MaxPool2d if rng.integers(2) else nn.AvgPool2d
        layers.append(pool(k, s, pad, ceil_mode=ceil))
    return layers, out


def _random_model(seed: int, shape) -> nn.Sequential:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    layers, channels = [], shape[1]
    while len(layers) < 6:
        block, out = _random_block(rng, channels)
        try:
            with torch.no_grad():
                nn.Sequential(*layers, *block).eval()(torch.zeros(shape))
        except RuntimeError:  # the input got too small for this block: draw another
            continue
        layers += block
        channels = out
    with torch.no_grad():
        features = nn.Sequential(*layers).eval()(torch.zeros(shape)).shape
    head = [nn.Flatten(), nn.Linear(int(np.prod(features[1:])), 5), nn.Dropout(0.5), nn.Softmax(dim=1)]
    model = nn.Sequential(nn.Sequential(*layers), *head)
    _randomize_batch_norms(model, torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("seed", range(6))
def test_random_models_match_torch(seed):
    model = _random_model(seed, (2, 3, 12, 11))
    net, expected = _import_and_run(model, (2, 3, 12, 11), seed=seed)
    tops = _layer_tops(net)
    assert len(tops) == len(expected)
    for top, want in zip(tops, expected):
        assert net.blobs[top].shape == want.shape, top
        _assert_close(net.blobs[top].data, want)


def test_weights_file_holds_torch_params(tmp_path):
    """The .caffemodel, read with protobuf alone: Caffe's blob order and shapes for each layer."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    _randomize_batch_norms(model, torch.Generator().manual_seed(6))
    save_torch_sequential(model, (1, 3, 6, 6), tmp_path / "m.prototxt", tmp_path / "m.caffemodel")
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString((tmp_path / "m.caffemodel").read_bytes())
    blobs = {lp.name: [np.asarray(b.data, np.float32).reshape(tuple(b.shape.dim)) for b in lp.blobs]
             for lp in saved.layer}
    conv, bn, fc = model[0], model[1], model[3]
    want = {"data": [], "conv0": [conv.weight, conv.bias],
            "bn1": [bn.running_mean, bn.running_var, torch.ones(1)],  # Caffe's scale factor: 1
            "scale1": [bn.weight, bn.bias], "flatten2": [], "fc3": [fc.weight, fc.bias]}
    assert list(blobs) == list(want)
    for name, tensors in want.items():
        assert len(blobs[name]) == len(tensors), name
        for got, t in zip(blobs[name], tensors):
            assert np.array_equal(got, t.detach().numpy()), name
    deploy = caffe_pb2.NetParameter()
    text_format.Parse((tmp_path / "m.prototxt").read_text(), deploy)
    assert deploy.layer[0].type == "Input" and list(deploy.layer[0].input_param.shape[0].dim) == [1, 3, 6, 6]
    assert all(len(lp.blobs) == 0 for lp in deploy.layer)


def test_import_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Dropout())
    model.train()
    model[2].eval()
    before = model[1].running_mean.clone()
    from_torch_sequential(model, (4, 1, 3, 3))
    assert [m.training for m in model.modules()] == [True, True, True, False]
    assert torch.equal(model[1].running_mean, before) and model[1].num_batches_tracked.item() == 0


# ------------------------------------------------------------------------------------ pooling
POOL_CASES = [
    # module, input H x W, the round_mode Caffe needs (None: the default CEIL is left implicit)
    (nn.MaxPool2d(3, 2), (8, 8), PoolP.FLOOR),  # floor(5/2)+1 = 3 where Caffe's ceil gives 4
    (nn.MaxPool2d(3, 1), (6, 5), None),  # stride 1: floor and ceil agree
    (nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), (8, 9), None),  # both drop a window in the padding
    (nn.AvgPool2d(3, 2, padding=1, ceil_mode=True), (8, 9), None),  # divisor: window clipped to H+pad
    (nn.MaxPool2d(1, 3, ceil_mode=True), (5, 5), PoolP.FLOOR),  # torch drops the window at 6 >= 5
    (nn.AvgPool2d(3, 2, padding=1), (7, 6), PoolP.FLOOR),
    (nn.AvgPool2d(3, 2, ceil_mode=True, count_include_pad=False), (8, 8), None),  # clipped last window
    (nn.AvgPool2d((2, 3), stride=(2, 1), padding=(1, 0)), (7, 6), PoolP.FLOOR),
    (nn.AvgPool2d(2), (5, 4), PoolP.FLOOR),
]


@pytest.mark.parametrize("module,size,round_mode", POOL_CASES, ids=[str(i) for i in range(len(POOL_CASES))])
def test_pooling_matches_torch(module, size, round_mode):
    model = nn.Sequential(module)
    net, (want,) = _import_and_run(model, (2, 3) + size, seed=7)
    p = net.layer_dict["pool0"].layer_param.pooling_param
    if round_mode is None:
        assert not p.HasField("round_mode")
    else:
        assert p.round_mode == round_mode
    assert net.blobs["pool0"].shape == want.shape
    _assert_close(net.blobs["pool0"].data, want)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("model,shape,match", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.GELU()), (1, 1, 5, 5),
     r"module 2 \('2', GELU\).*not supported"),
    (nn.Sequential(nn.ReLU(), nn.Sequential(nn.ReLU(), nn.ELU())), (1, 4), r"module 2 \('1\.1', ELU\)"),
    (nn.Sequential(nn.MaxPool2d((1, 2), stride=3, ceil_mode=True)), (1, 1, 5, 7),
     r"module 0 \('0', MaxPool2d\): no Caffe pooling gives its output size \(2, 3\)"),
    (nn.Sequential(nn.AvgPool2d(3, 2, padding=1, count_include_pad=False)), (1, 1, 6, 6),
     r"AvgPool2d\): count_include_pad=False with padding"),
    (nn.Sequential(nn.AvgPool2d(2, divisor_override=3)), (1, 1, 4, 4), r"AvgPool2d\): divisor_override"),
    (nn.Sequential(nn.MaxPool2d(2, dilation=2)), (1, 1, 6, 6), r"MaxPool2d\): dilated pooling"),
    (nn.Sequential(nn.MaxPool2d(2)), (1, 4, 4), r"MaxPool2d\): Caffe pools 4-D blobs"),
    (nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")), (1, 1, 4, 4),
     r"Conv2d\): padding_mode"),
    (nn.Sequential(nn.Conv2d(1, 1, 2, padding="same")), (1, 1, 4, 4),
     r"Conv2d\): padding='same' pads unevenly"),
    (nn.Sequential(nn.BatchNorm2d(2, track_running_stats=False)), (1, 2, 3, 3),
     r"BatchNorm2d\): track_running"),
    (nn.Sequential(nn.Flatten(), nn.Linear(5, 2)), (1, 2, 2),
     r"module 1 \('1', Linear\) fails on an input of shape \(1, 4\)"),
])
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_what_caffe_cannot_express_is_refused(model, shape, match):
    with pytest.raises(TorchImportError, match=match):
        from_torch_sequential(model, shape)


def test_only_sequentials_and_batched_shapes():
    with pytest.raises(TypeError, match="torch.nn.Sequential"):
        from_torch_sequential(nn.Linear(2, 2), (1, 2))
    with pytest.raises(ValueError, match="batch axis"):
        from_torch_sequential(nn.Sequential(nn.ReLU()), (5,))
