"""MemoryData and pycaffe's net.set_input_arrays; the complete list of Caffe's layer types."""
import numpy as np
import pytest

import caffe
from helpers import capture_log, make_net
from recaffe.layer import LayerError, layer_type_list

NET = """
name: "mem"
layer { name: "m" type: "MemoryData" top: "data" top: "label" %s
        memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def arrays(n=6):
    data = np.arange(n * 6, dtype=np.float32).reshape(n, 1, 2, 3)
    return data, np.arange(n, dtype=np.float32) % 2


def test_memory_data_serves_batches_and_wraps_around():
    net = make_net(NET % "")
    assert net.blobs["data"].shape == (2, 1, 2, 3) and net.blobs["label"].shape == (2,)
    data, labels = arrays()
    net.set_input_arrays(data, labels)
    for i in range(4):  # 3 batches, then the first again
        net.forward()
        rows = slice(2 * (i % 3), 2 * (i % 3) + 2)
        np.testing.assert_array_equal(net.blobs["data"].data, data[rows])
        np.testing.assert_array_equal(net.blobs["label"].data.reshape(2), labels[rows])
        assert net.blobs["label"].shape == (2, 1, 1, 1)  # Caffe's forward reshapes the label 4-D
    # The tops view the user's arrays (Caffe points its tops at them), and the net keeps them.
    assert np.shares_memory(net.blobs["data"].data, data)
    net.set_input_arrays(data * 2, labels)  # Reset: back to row 0
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data[:2] * 2)


def test_memory_data_labels_4d_and_backward_runs():
    net = make_net(NET % "")
    data, labels = arrays(4)
    net.set_input_arrays(data, labels.reshape(4, 1, 1, 1))
    net.forward()
    net.backward()
    assert np.isfinite(net.blobs["loss"].data).all()


def test_memory_data_does_not_transform_arrays():
    net = make_net(NET % "transform_param { scale: 10 }")
    data, labels = arrays(2)
    with capture_log() as lines:
        net.set_input_arrays(data, labels)
    assert "MemoryData does not transform array data on Reset()" in lines
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, data)


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((2, 1, 2, 3), np.float64), np.zeros(2, np.float32), "data array must be float32"),
    (np.zeros((2, 6), np.float32), np.zeros(2, np.float32), "data array must be 4-d"),
    (np.zeros((2, 1, 3, 2), np.float32)[..., ::-1], np.zeros(2, np.float32), "must be C contiguous"),
    (np.zeros((2, 2, 2, 3), np.float32), np.zeros(2, np.float32), "data array has wrong number of channels"),
    (np.zeros((2, 1, 3, 3), np.float32), np.zeros(2, np.float32), "data array has wrong height"),
    (np.zeros((2, 1, 2, 4), np.float32), np.zeros(2, np.float32), "data array has wrong width"),
    (np.zeros((2, 1, 2, 3), np.float32), np.zeros(2, np.int64), "labels array must be float32"),
    (np.zeros((2, 1, 2, 3), np.float32), np.zeros((2, 2, 1, 1), np.float32), "labels array has wrong number"),
    (np.zeros((2, 1, 2, 3), np.float32), np.zeros(4, np.float32), "same first dimension"),
    (np.zeros((3, 1, 2, 3), np.float32), np.zeros(3, np.float32), "multiple of batch size 2, got 3"),
])
def test_set_input_arrays_checks(data, labels, message):
    net = make_net(NET % "")
    with pytest.raises(LayerError, match="'m'.*" + message):
        net.set_input_arrays(data, labels)


def test_memory_data_errors():
    net = make_net(NET % "")
    with pytest.raises(LayerError, match="'m'.*initialized by calling Reset"):
        net.forward()
    with pytest.raises(LayerError, match="must be specified and positive"):
        make_net('layer { name: "m" type: "MemoryData" top: "d" top: "l" '
                 'memory_data_param { batch_size: 2 } }')
    other = make_net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 } } }')
    with pytest.raises(RuntimeError, match="first layer is a MemoryDataLayer"):
        other.set_input_arrays(*arrays(2))


def test_pycaffe_net_has_set_input_arrays(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET % "")
    net = caffe.Net(str(path), caffe.TEST)
    data, labels = arrays(2)
    net.set_input_arrays(data, labels)
    np.testing.assert_array_equal(net.forward(blobs=["data"])["data"], data)


def test_layer_type_list_has_all_61_caffe_types():
    types = caffe.layer_type_list()
    assert types == layer_type_list()
    assert {"ImageData", "WindowData", "HDF5Data", "HDF5Output", "MemoryData"} <= set(types)
    # BVLC's 61 (test_layer_types.py names them); the forks' types come on top (docs/forks.md)
    from test_layer_types import CAFFE_LAYER_TYPES
    assert len(set(types) & set(CAFFE_LAYER_TYPES)) == 61
