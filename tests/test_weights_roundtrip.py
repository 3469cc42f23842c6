"""Weights survive a round trip, bit for bit: zoo nets with random params through ``.caffemodel``
(net.save / net.copy_from) and Caffe's HDF5 format (net.save_hdf5 / net.load_hdf5), and the real
Caffe's LeNet weights through recaffe's writers.

The files are also read back without recaffe (protobuf, h5py) and compared with the params, so a
writer and reader that agree on a wrong layout would still fail. (LeNet's deploy outputs with
Caffe's weights are checked in test_lenet_reference.py.)
"""
import h5py
import numpy as np
import pytest
import torch

from conftest import require_reference
from helpers import make_net
from recaffe.net import TEST, Net
from recaffe.proto import caffe_pb2


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _random_params(net: Net, seed: int) -> dict[str, list[np.ndarray]]:
    """Fill every param blob with seeded random values; returns copies of them."""
    gen = torch.Generator().manual_seed(seed)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = torch.randn(blob.shape, generator=gen).numpy()
    return {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items()}


def _zero_params(net: Net) -> None:
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = 0


def _assert_params_equal(net: Net, expected: dict[str, list[np.ndarray]]) -> None:
    assert list(net.params) == list(expected)
    for name, arrays in expected.items():
        got = net.params[name]
        assert len(got) == len(arrays), name
        for blob, want in zip(got, arrays):
            assert blob.shape == want.shape, name
            assert np.array_equal(_bits(blob.data), _bits(want)), name


class Pair:
    """A zoo net with random params and a second, fresh instance of it to load them into."""

    def __init__(self, name: str, seed: int):
        prototxt = str(require_reference("zoo", name + ".prototxt"))
        self.source = Net(prototxt, TEST)
        self.target = Net(prototxt, TEST)
        self.params = _random_params(self.source, seed)


@pytest.fixture(scope="module")
def pairs():
    built = {}

    def get(name: str) -> Pair:
        if name not in built:
            built[name] = Pair(name, seed=len(built) + 1)
        return built[name]
    return get


NETS = ("bvlc_reference_caffenet", "bvlc_googlenet", "resnet_50")


@pytest.mark.parametrize("name", NETS)
def test_caffemodel_round_trip(pairs, name, tmp_path):
    pair = pairs(name)
    path = tmp_path / "w.caffemodel"
    pair.source.save(str(path))
    # the file, read with protobuf alone: one entry per layer, the params in order, shapes in shape.dim
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString(path.read_bytes())
    in_file = {lp.name: lp.blobs for lp in saved.layer if len(lp.blobs)}
    assert list(in_file) == list(pair.params)
    for layer, arrays in pair.params.items():
        for proto, want in zip(in_file[layer], arrays):
            assert tuple(proto.shape.dim) == want.shape
            assert np.array_equal(_bits(np.asarray(proto.data, np.float32)), _bits(want.ravel()))
    _zero_params(pair.target)
    pair.target.copy_from(str(path))
    _assert_params_equal(pair.target, pair.params)


def _hdf5_round_trip(pair: Pair, path) -> None:
    pair.source.save_hdf5(str(path))
    with h5py.File(path, "r") as f:  # Caffe's layout: data/<layer name>/<param index>
        for layer, arrays in pair.params.items():
            group = f["data"][layer]  # a '/' in the name (GoogLeNet) is a nested group
            blobs = [k for k in group if isinstance(group[k], h5py.Dataset)]
            assert sorted(blobs) == [str(i) for i in range(len(arrays))]
            for i, want in enumerate(arrays):
                assert group[str(i)].dtype == np.float32
                assert np.array_equal(_bits(group[str(i)][()]), _bits(want))
    _zero_params(pair.target)
    pair.target.load_hdf5(str(path))
    _assert_params_equal(pair.target, pair.params)


@pytest.mark.parametrize("name", NETS)
def test_hdf5_round_trip(pairs, name, tmp_path):
    _hdf5_round_trip(pairs(name), tmp_path / "w.caffemodel.h5")


def test_hdf5_layer_names_nest_under_a_layer_of_the_same_prefix(tmp_path):
    """MobileNet names a layer conv1 and another conv1/bn: the group conv1 holds conv1's blobs
    and the group bn of conv1/bn; both load."""
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "c"
            convolution_param { num_output: 3 kernel_size: 3 } }
    layer { name: "conv1/bn" type: "BatchNorm" bottom: "c" top: "c" }
    layer { name: "conv1/scale" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } }
    """
    src, dst = make_net(text), make_net(text)
    rng = np.random.default_rng(3)
    for layer in src.layers:
        for blob in layer.blobs:
            blob.data[...] = rng.standard_normal(blob.shape)
    path = str(tmp_path / "w.caffemodel.h5")
    src.save_hdf5(path)
    dst.load_hdf5(path)
    for a, b in zip(src.layers, dst.layers):
        for x, y in zip(a.blobs, b.blobs):
            assert np.array_equal(x.data, y.data), a.name


def test_caffes_lenet_weights_survive_recaffes_writers(tmp_path):
    """Caffe's own .caffemodel → recaffe → .caffemodel and .caffemodel.h5: the params Caffe wrote,
    bit for bit (read from Caffe's file with protobuf alone)."""
    d = require_reference("lenet")
    original = caffe_pb2.NetParameter()
    original.ParseFromString((d / "lenet_iter_2000.caffemodel").read_bytes())
    expected = {lp.name: [np.asarray(b.data, np.float32).reshape(tuple(b.shape.dim)) for b in lp.blobs]
                for lp in original.layer if len(lp.blobs)}
    assert list(expected) == ["conv1", "conv2", "ip1", "ip2"]
    net = Net(str(d / "lenet.prototxt"), TEST, weights=str(d / "lenet_iter_2000.caffemodel"))
    _assert_params_equal(net, expected)
    fresh = Net(str(d / "lenet.prototxt"), TEST)
    for path, save, load in ((tmp_path / "lenet.caffemodel", net.save, fresh.copy_from),
                             (tmp_path / "lenet.caffemodel.h5", net.save_hdf5, fresh.load_hdf5)):
        save(str(path))
        _zero_params(fresh)
        load(str(path))
        _assert_params_equal(fresh, expected)
