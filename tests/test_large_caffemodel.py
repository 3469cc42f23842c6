""".caffemodel files over protobuf's 2 GiB limit: read piece by piece (recaffe.io.large_proto).

The fast tests run the same code path on small files by lowering the piece size. The test with a
real file over 2 GiB (a sparse file: no disk used, but measured at 7.5 GB peak RSS, 2 GB of it the
mapped file, and about 2 minutes on a loaded 2-core machine) is marked ``slow`` and runs only with
RECAFFE_SLOW=1:

    RECAFFE_SLOW=1 python -m pytest -q tests/test_large_caffemodel.py -p no:cacheprovider
"""
import os

import numpy as np
import pytest

from conftest import ROOT, require_reference
from recaffe.io import large_proto
from recaffe.io.large_proto import read_binary_any_size
from recaffe.io.netfiles import read_net_binary
from recaffe.io.protofiles import ProtoFileError
from recaffe.net import Net
from recaffe.proto import caffe_pb2

LENET_DEPLOY = ROOT / "examples" / "mnist" / "lenet.prototxt"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field, encoded by hand."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def sample_model() -> caffe_pb2.NetParameter:
    rng = np.random.default_rng(0)
    model = caffe_pb2.NetParameter(name="sample", force_backward=True)
    model.input.append("data")
    a = model.layer.add(name="a", type="InnerProduct", bottom=["data"], top=["a"])
    a.param.add(lr_mult=1)
    a.blobs.add(data=rng.standard_normal(1000).astype(np.float32)).shape.dim.extend([10, 100])
    a.blobs.add(double_data=rng.standard_normal(300), double_diff=rng.standard_normal(300)).shape.dim.append(300)
    model.layer.add(name="r", type="ReLU", bottom=["a"], top=["a"])
    v1 = model.layers.add(name="old", type=caffe_pb2.V1LayerParameter.CONVOLUTION, blobs_lr=[1, 2])
    v1.blobs.add(num=1, channels=2, height=3, width=50, data=rng.standard_normal(300).astype(np.float32))
    model.layer.add(name="last", type="Softmax")
    return model


@pytest.mark.parametrize("max_parse", [64, 100, 257, 1000, 5000, 1 << 20])
def test_read_in_pieces_equals_one_parse(tmp_path, max_parse):
    model = sample_model()
    path = tmp_path / "m.caffemodel"
    path.write_bytes(model.SerializeToString())
    got = read_binary_any_size(path, caffe_pb2.NetParameter(), max_parse=max_parse)
    assert got == model
    assert [layer.name for layer in got.layer] == ["a", "r", "last"]  # repeated fields keep their order
    np.testing.assert_array_equal(np.asarray(got.layer[0].blobs[1].double_diff),
                                  np.asarray(model.layer[0].blobs[1].double_diff))


def test_real_caffemodel_in_pieces_through_net_copy_from(monkeypatch):
    path = require_reference("lenet", "lenet_iter_2000.caffemodel")
    real = caffe_pb2.NetParameter()
    real.ParseFromString(path.read_bytes())
    monkeypatch.setattr(large_proto, "MAX_PARSE_BYTES", 4096)  # every layer, and ip1's 1.6 MB blob, split
    assert read_net_binary(path) == real
    net = Net(str(LENET_DEPLOY), 1, weights=str(path))
    for layer in real.layer:
        for blob, proto in zip(net.params.get(layer.name, ()), layer.blobs):
            np.testing.assert_array_equal(blob.data.ravel(), np.asarray(proto.data, np.float32))


def test_truncated_large_file_names_the_file(tmp_path):
    data = sample_model().SerializeToString()
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[:len(data) - 700])
    with pytest.raises(ProtoFileError, match=rf"^{path}: cannot be read as a binary NetParameter .*truncated"):
        read_binary_any_size(path, caffe_pb2.NetParameter(), "NetParameter", max_parse=256)


def test_packed_floats_of_odd_length_and_huge_strings_are_errors(tmp_path):
    odd_blob = field(7, field(5, b"\0" * 1001))  # LayerParameter.blobs { BlobProto.data: 1001 bytes }
    path = tmp_path / "odd.caffemodel"
    path.write_bytes(field(100, field(1, b"x") + odd_blob))
    with pytest.raises(ProtoFileError, match="packed field caffe.BlobProto.data .* not a whole number of 4-byte"):
        read_binary_any_size(path, caffe_pb2.NetParameter(), max_parse=256)
    path.write_bytes(field(100, field(1, b"n" * 1000)))  # a layer name bigger than one parse
    with pytest.raises(ProtoFileError, match="field caffe.LayerParameter.name holds 1000 bytes"):
        read_binary_any_size(path, caffe_pb2.NetParameter(), max_parse=256)


def test_missing_file(tmp_path):
    with pytest.raises(ProtoFileError, match="nothing.caffemodel: file not found"):
        read_binary_any_size(tmp_path / "nothing.caffemodel", caffe_pb2.NetParameter())


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RECAFFE_SLOW"), reason="over 2 GiB in memory; set RECAFFE_SLOW=1")
def test_sparse_caffemodel_over_2gib(tmp_path):
    """One layer holding a 2 GiB + 8 byte blob (protobuf alone reports 'Wire format was corrupt'),
    then a small layer: both read, by layer, into the upgraded NetParameter."""
    count = (1 << 29) + 2
    shape = field(7, varint(1 << 3) + varint(count))  # BlobProto.shape { dim: count } (unpacked dim)
    data_head = varint(5 << 3 | 2) + varint(4 * count)
    blob_len = len(shape) + len(data_head) + 4 * count
    name = field(1, b"big")
    blob_head = varint(7 << 3 | 2) + varint(blob_len) + shape + data_head
    layer_len = len(name) + len(blob_head) + 4 * count
    head = varint(100 << 3 | 2) + varint(layer_len) + name + blob_head
    small = caffe_pb2.NetParameter()
    small.layer.add(name="small").blobs.add(data=[1.5, -2.0, 3.25]).shape.dim.append(3)
    path = tmp_path / "big.caffemodel"
    with open(path, "wb") as f:
        f.write(head)
        f.seek(4 * count, os.SEEK_CUR)  # a hole: reads as zeros, takes no disk
        f.write(small.SerializeToString())
    assert os.path.getsize(path) > 1 << 31
    got = read_net_binary(path)
    assert [layer.name for layer in got.layer] == ["big", "small"]
    big = got.layer[0].blobs[0]
    assert list(big.shape.dim) == [count] and len(big.data) == count and big.data[count - 1] == 0
    assert list(got.layer[1].blobs[0].data) == [1.5, -2.0, 3.25]
