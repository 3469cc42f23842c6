"""Old formats upgraded on read (V0, V1, data transformation, input fields, BatchNorm, solver_type),
old .caffemodel files loaded by layer name, and the upgrade tools.

The expected nets are written by hand from what Caffe's upgrade_proto.cpp does, and compared
field by field (protobuf message equality, explicitly-set defaults included).
"""
import numpy as np
import pytest

from conftest import ROOT, require_reference
from helpers import capture_log, net_param, write
from recaffe.cli.main import main as caffe_main
from recaffe.cli.upgrade_tools import (main_upgrade_net_proto_binary, main_upgrade_net_proto_text,
                                       main_upgrade_solver_proto_text)
from recaffe.io.netfiles import read_net_binary, read_net_text, read_solver_text
from recaffe.io.protofiles import parse_text, write_binary
from recaffe.io.upgrade import UpgradeError, upgrade_net, upgrade_net_as_needed, upgrade_solver
from recaffe.net import Net
from recaffe.proto import caffe_pb2

LENET_DEPLOY = ROOT / "examples" / "mnist" / "lenet.prototxt"

# Caffe's old examples/mnist/lenet_train_test.prototxt style (V1), with every V1 feature in use.
V1_LENET = """
name: "LeNet"
layers {
  name: "mnist"
  type: DATA
  top: "data"
  top: "label"
  data_param { source: "mnist_train_lmdb" backend: LMDB batch_size: 64 scale: 0.00390625 mirror: false }
  include: { phase: TRAIN }
}
layers {
  name: "mnist"
  type: DATA
  top: "data"
  top: "label"
  data_param { source: "mnist_test_lmdb" backend: LMDB batch_size: 100 scale: 0.00390625 }
  include: { phase: TEST }
}
layers {
  name: "conv1"
  type: CONVOLUTION
  bottom: "data"
  top: "conv1"
  blobs_lr: 1
  blobs_lr: 2
  convolution_param { num_output: 20 kernel_size: 5 stride: 1 weight_filler { type: "xavier" }
                      bias_filler { type: "constant" } }
}
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers {
  name: "conv2"
  type: CONVOLUTION
  bottom: "pool1"
  top: "conv2"
  blobs_lr: 1
  blobs_lr: 2
  weight_decay: 1
  weight_decay: 0
  convolution_param { num_output: 50 kernel_size: 5 stride: 1 weight_filler { type: "xavier" }
                      bias_filler { type: "constant" } }
}
layers { name: "pool2" type: POOLING bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers {
  name: "ip1"
  type: INNER_PRODUCT
  bottom: "pool2"
  top: "ip1"
  blobs_lr: 1
  blobs_lr: 2
  param: "ip1_w"
  param: "ip1_b"
  blob_share_mode: STRICT
  blob_share_mode: PERMISSIVE
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layers { name: "relu1" type: RELU bottom: "ip1" top: "ip1" relu_param { negative_slope: 0.1 } }
layers {
  name: "ip2"
  type: INNER_PRODUCT
  bottom: "ip1"
  top: "ip2"
  blobs_lr: 1
  blobs_lr: 2
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layers { name: "accuracy" type: ACCURACY bottom: "ip2" bottom: "label" top: "accuracy" include: { phase: TEST } }
layers {
  name: "loss" type: SOFTMAX_LOSS bottom: "ip2" bottom: "label" top: "loss" loss_weight: 1
  exclude { stage: "deploy" } loss_param { normalize: false }
}
"""

V1_LENET_UPGRADED = """
name: "LeNet"
layer {
  name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 mirror: false }
  data_param { source: "mnist_train_lmdb" backend: LMDB batch_size: 64 }
}
layer {
  name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 }
  data_param { source: "mnist_test_lmdb" backend: LMDB batch_size: 100 }
}
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 stride: 1 weight_filler { type: "xavier" }
                      bias_filler { type: "constant" } }
}
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer {
  name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 50 kernel_size: 5 stride: 1 weight_filler { type: "xavier" }
                      bias_filler { type: "constant" } }
}
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer {
  name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { name: "ip1_w" share_mode: STRICT lr_mult: 1 } param { name: "ip1_b" share_mode: PERMISSIVE lr_mult: 2 }
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" relu_param { negative_slope: 0.1 } }
layer {
  name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } bias_filler { type: "constant" } }
}
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include { phase: TEST } }
layer {
  name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" loss_weight: 1
  exclude { stage: "deploy" } loss_param { normalize: false }
}
"""

# A V0 net: a padding layer folded into the conv it feeds, V0 flat fields, legacy input_dim.
V0_NET = """
name: "v0net"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 1 group: 1 biasterm: false
                 weight_filler { type: "gaussian" std: 0.01 } blobs_lr: 1 weight_decay: 1 }
         bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 } bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.0001 beta: 0.75 k: 2 } bottom: "pool1" top: "norm1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 5 biasterm: true bias_filler { type: "constant" value: 0.5 }
                 blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0 }
         bottom: "norm1" top: "fc" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.3 } bottom: "fc" top: "fc" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc" top: "prob" }
"""

V0_NET_UPGRADED = """
name: "v0net"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 decay_mult: 1 }
        convolution_param { num_output: 4 bias_term: false pad: 2 kernel_size: 3 group: 1 stride: 1
                            weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
        lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 k: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "norm1" top: "fc"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 5 bias_term: true bias_filler { type: "constant" value: 0.5 } } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" dropout_param { dropout_ratio: 0.3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

# V0 data layers: source/batchsize into each type's *_param, transformation fields into transform_param.
V0_DATA = """
layers { layer { name: "data" type: "data" source: "train_db" batchsize: 16 rand_skip: 3
                 scale: 0.5 meanfile: "mean.binaryproto" cropsize: 4 mirror: true } top: "data" top: "label" }
layers { layer { name: "img" type: "images" source: "list.txt" batchsize: 2 shuffle_images: true
                 new_height: 6 new_width: 7 rand_skip: 1 } top: "img" top: "img_label" }
layers { layer { name: "win" type: "window_data" source: "windows.txt" batchsize: 3 det_fg_threshold: 0.6
                 det_bg_threshold: 0.4 det_fg_fraction: 0.3 det_context_pad: 2 det_crop_mode: "square" }
         top: "win" top: "win_label" }
layers { layer { name: "h5" type: "hdf5_data" source: "h5.txt" batchsize: 5 } top: "h5" }
layers { layer { name: "cat" type: "concat" concat_dim: 1 } bottom: "data" bottom: "img" top: "cat" }
layers { layer { name: "loss" type: "infogain_loss" source: "H.binaryproto" } bottom: "cat" bottom: "label" }
layers { layer { name: "out" type: "hdf5_output" hdf5_output_param { file_name: "out.h5" } }
         bottom: "cat" bottom: "label" }
"""

V0_DATA_UPGRADED = """
layer { name: "data" type: "Data" top: "data" top: "label"
        transform_param { scale: 0.5 mean_file: "mean.binaryproto" crop_size: 4 mirror: true }
        data_param { source: "train_db" batch_size: 16 rand_skip: 3 } }
layer { name: "img" type: "ImageData" top: "img" top: "img_label"
        image_data_param { source: "list.txt" batch_size: 2 shuffle: true new_height: 6 new_width: 7 rand_skip: 1 } }
layer { name: "win" type: "WindowData" top: "win" top: "win_label"
        window_data_param { source: "windows.txt" batch_size: 3 fg_threshold: 0.6 bg_threshold: 0.4
                            fg_fraction: 0.3 context_pad: 2 crop_mode: "square" } }
layer { name: "h5" type: "HDF5Data" top: "h5" hdf5_data_param { source: "h5.txt" batch_size: 5 } }
layer { name: "cat" type: "Concat" bottom: "data" bottom: "img" top: "cat" concat_param { concat_dim: 1 } }
layer { name: "loss" type: "InfogainLoss" bottom: "cat" bottom: "label" infogain_loss_param { source: "H.binaryproto" } }
layer { name: "out" type: "HDF5Output" bottom: "cat" bottom: "label" hdf5_output_param { file_name: "out.h5" } }
"""


def assert_same_net(got: caffe_pb2.NetParameter, expected_text: str) -> None:
    expected = net_param(expected_text)
    assert len(got.layer) == len(expected.layer)
    assert not len(got.layers) and not len(got.input) and not len(got.input_dim)
    for g, e in zip(got.layer, expected.layer):
        assert g == e, f"layer {e.name!r}:\n{g}\n!=\n{e}"
    assert got == expected


# ---------------------------------------------------------------------------------- V1 -> V2
def test_v1_lenet_is_upgraded_field_by_field(tmp_path):
    path = write(tmp_path, "lenet_v1.prototxt", V1_LENET)
    with capture_log() as lines:
        got = read_net_text(path)
    assert_same_net(got, V1_LENET_UPGRADED)
    # the deprecated transformation fields left data_param
    assert not got.layer[0].data_param.HasField("scale") and got.layer[0].transform_param.HasField("mirror")
    assert f"Attempting to upgrade input file specified using deprecated V1LayerParameter: {path}" in lines
    assert "Successfully upgraded file specified using deprecated V1LayerParameter" in lines
    assert ("Attempting to upgrade input file specified using deprecated transformation parameters: "
            f"{path}") in lines


def test_every_v1_param_message_is_copied():
    v1 = caffe_pb2.NetParameter()
    layer = v1.layers.add(name="all", type=caffe_pb2.V1LayerParameter.POWER)
    names = [f.name for f in caffe_pb2.V1LayerParameter.DESCRIPTOR.fields if f.name.endswith("_param")]
    assert len(names) == 30  # Caffe's UpgradeV1LayerParameter copies these 30 messages
    for name in names:
        getattr(layer, name).SetInParent()
    layer.power_param.power = 3
    layer.threshold_param.threshold = 0.25
    layer.memory_data_param.batch_size = 7
    got = upgrade_net(v1).layer[0]
    assert got.type == "Power" and got.power_param.power == 3 and got.threshold_param.threshold == 0.25
    assert got.memory_data_param.batch_size == 7
    assert all(got.HasField(name) for name in names)


def test_v1_data_transformation_fields_move_for_each_data_layer_type():
    got = upgrade_net(net_param("""
        layers { name: "d" type: DATA top: "d"
                 data_param { source: "db" batch_size: 2 scale: 0.25 mean_file: "m" crop_size: 3 mirror: true } }
        layers { name: "i" type: IMAGE_DATA top: "i" image_data_param { source: "l" crop_size: 5 }
                 transform_param { scale: 2 } }
        layers { name: "w" type: WINDOW_DATA top: "w" window_data_param { source: "w" mirror: true } }
        layers { name: "c" type: CONVOLUTION bottom: "d" top: "c" convolution_param { num_output: 1 kernel_size: 1 } }
    """))
    assert_same_net(got, """
        layer { name: "d" type: "Data" top: "d" transform_param { scale: 0.25 mean_file: "m" crop_size: 3 mirror: true }
                data_param { source: "db" batch_size: 2 } }
        layer { name: "i" type: "ImageData" top: "i" transform_param { scale: 2 crop_size: 5 }
                image_data_param { source: "l" } }
        layer { name: "w" type: "WindowData" top: "w" transform_param { mirror: true } window_data_param { source: "w" } }
        layer { name: "c" type: "Convolution" bottom: "d" top: "c" convolution_param { num_output: 1 kernel_size: 1 } }
    """)


def test_v1_net_with_layer_entries_too_drops_them_as_caffe(tmp_path):
    param = net_param('layer { name: "new" type: "ReLU" }  layers { name: "old" type: RELU }')
    with capture_log() as lines:
        ok = upgrade_net_as_needed(param, "mixed.prototxt")
    assert not ok and [layer.name for layer in param.layer] == ["old"]
    assert any("already specifies 'layer' fields" in line and "mixed.prototxt" in line for line in lines)


# ---------------------------------------------------------------------------------- V0 -> V1
def test_v0_net_padding_folded_and_fields_moved(tmp_path):
    path = write(tmp_path, "v0.prototxt", V0_NET)
    with capture_log() as lines:
        got = read_net_text(path)
    assert_same_net(got, V0_NET_UPGRADED)
    assert f"Attempting to upgrade input file specified using deprecated V0LayerParameter: {path}" in lines
    assert "Successfully upgraded file specified using deprecated V0LayerParameter" in lines
    # The upgraded net runs: the pad of 2 makes conv1 10x10 from an 8x8 input with a 3x3 kernel.
    net = Net(path, caffe_pb2.TEST)
    assert net.blobs["conv1"].shape == (2, 4, 10, 10) and net.blobs["pool1"].shape == (2, 4, 5, 5)
    assert net.blobs["prob"].shape == (2, 5)
    net.forward()
    np.testing.assert_allclose(net.blobs["prob"].data.sum(axis=1), 1, rtol=1e-6)


def test_v0_data_layers():
    assert_same_net(upgrade_net(net_param(V0_DATA)), V0_DATA_UPGRADED)


def test_v0_field_that_does_not_apply_is_reported_and_dropped():
    param = net_param('input: "x" input_dim: 1 input_dim: 1 input_dim: 1 input_dim: 1 '
                      'layers { layer { name: "r" type: "relu" num_output: 3 kernelsize: 2 } bottom: "x" top: "r" }')
    with capture_log() as lines:
        ok = upgrade_net_as_needed(param, "odd.prototxt")
    assert not ok
    assert param.layer[1] == caffe_pb2.LayerParameter(name="r", type="ReLU", bottom=["x"], top=["r"])
    assert any("'r'" in line and "Unknown parameter num_output for layer type relu" in line for line in lines)
    assert any("Unknown parameter kernelsize for layer type relu" in line for line in lines)
    assert any("had one or more problems upgrading V0NetParameter" in line for line in lines)


@pytest.mark.parametrize("text, message", [
    ('layers { layer { name: "x" type: "bogus" } }', r"layer 'x': unknown layer type 'bogus'"),
    ('layers { layer { name: "c" type: "conv" } bottom: "nowhere" top: "c" }',
     r"layer 'c': unknown bottom blob 'nowhere'"),
    ('input: "d" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "d" top: "p" } '
     'layers { layer { name: "r" type: "relu" } bottom: "p" top: "r" }',
     r"layer 'r': a padding layer \('p'\) feeds a layer of type 'relu'"),
    ('input: "d" input: "e" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "d" top: "p" } '
     'layers { layer { name: "c" type: "conv" } bottom: "p" bottom: "e" top: "c" }',
     r"layer 'c': a layer fed by a padding layer must have exactly one bottom"),
    ('input: "d" input: "e" layers { layer { name: "p" type: "padding" pad: 1 } bottom: "d" bottom: "e" top: "p" } '
     'layers { layer { name: "c" type: "conv" } bottom: "p" top: "c" }',
     r"padding layer 'p' must have exactly one bottom and one top"),
])
def test_v0_fatal_cases_name_file_and_layer(tmp_path, text, message):
    path = write(tmp_path, "bad_v0.prototxt", text)
    with pytest.raises(UpgradeError, match=rf"^{path}: .*{message}"):
        read_net_text(path)


# ------------------------------------------------------------------------- inputs, BatchNorm
def test_inputs_without_shapes_are_dropped_as_in_legacy_caffemodels():
    got = upgrade_net(net_param('input: "data" layer { name: "r" type: "ReLU" bottom: "data" top: "r" }'))
    assert [layer.name for layer in got.layer] == ["r"] and not len(got.input)


def test_input_shape_becomes_input_layer_first():
    got = upgrade_net(net_param('input: "a" input: "b" input_shape { dim: 1 dim: 2 } input_shape { dim: 3 } '
                                'layer { name: "r" type: "ReLU" bottom: "a" top: "r" }'))
    assert_same_net(got, 'layer { name: "input" type: "Input" top: "a" top: "b" '
                         'input_param { shape { dim: 1 dim: 2 } shape { dim: 3 } } } '
                         'layer { name: "r" type: "ReLU" bottom: "a" top: "r" }')


def test_one_input_shape_for_two_inputs_is_refused():
    # Caffe reads input_shape(i) for every input (older Caffe: "Exactly one input_shape must be
    # specified per input"); one shape is not shared by every input.
    param = net_param('input: "a" input: "b" input_shape { dim: 1 dim: 2 } '
                      'layer { name: "r" type: "ReLU" bottom: "a" top: "r" }')
    with pytest.raises(UpgradeError, match=r"^two.prototxt: input_shape must be given exactly once per input "
                                           r"\(2 inputs, 1 input_shape\)"):
        upgrade_net(param, "two.prototxt")


def test_old_batch_norm_param_specs_get_zero_rates_and_the_net_builds():
    text = """input: "x" input_shape { dim: 2 dim: 3 }
      layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y"
              param { name: "m" lr_mult: 1 decay_mult: 1 } param { name: "v" } param { name: "c" lr_mult: 2 } }
      layer { name: "bn2" type: "BatchNorm" bottom: "y" top: "z" param { lr_mult: 0 } param { lr_mult: 0 } }"""
    with capture_log() as lines:
        got = upgrade_net(net_param(text), "bn.prototxt")
    assert list(got.layer[1].param) == [caffe_pb2.ParamSpec(name=n, lr_mult=0, decay_mult=0) for n in "mvc"]
    assert list(got.layer[2].param) == [caffe_pb2.ParamSpec(lr_mult=0)] * 2  # not 3 specs: untouched
    assert "Attempting to upgrade batch norm layers using deprecated params: bn.prototxt" in lines
    net = Net(net_param(text), caffe_pb2.TRAIN)  # without the upgrade: "Cannot configure ... statistics"
    assert len(net.params["bn"]) == 3


# ----------------------------------------------------------------------------------- solvers
def test_solver_type_enum_becomes_type_string(tmp_path):
    path = write(tmp_path, "solver.prototxt", 'base_lr: 0.1 solver_type: NESTEROV')
    with capture_log() as lines:
        got = read_solver_text(path)
    assert got.type == "Nesterov" and not got.HasField("solver_type")
    assert ("Attempting to upgrade input file specified using deprecated 'solver_type' field (enum)': "
            f"{path}") in lines


def test_solver_with_both_type_fields_is_refused_as_caffe():
    param = parse_text('type: "SGD" solver_type: SGD', caffe_pb2.SolverParameter())
    with pytest.raises(UpgradeError, match="^s.prototxt: Failed to upgrade solver: .*cannot be both specified"):
        upgrade_solver(param, "s.prototxt")


# --------------------------------------------------------------------------- old .caffemodels
_V1_TYPES = {"Convolution": caffe_pb2.V1LayerParameter.CONVOLUTION,
             "InnerProduct": caffe_pb2.V1LayerParameter.INNER_PRODUCT,
             "Pooling": caffe_pb2.V1LayerParameter.POOLING, "ReLU": caffe_pb2.V1LayerParameter.RELU,
             "Softmax": caffe_pb2.V1LayerParameter.SOFTMAX}
_LENET_LAYERS = [("conv1", "Convolution"), ("pool1", "Pooling"), ("conv2", "Convolution"), ("pool2", "Pooling"),
                 ("ip1", "InnerProduct"), ("relu1", "ReLU"), ("ip2", "InnerProduct"), ("prob", "Softmax")]


def _v1_blob(values: np.ndarray, legacy: bool, double: bool, diff: np.ndarray | None = None):
    """A BlobProto as old Caffe wrote it: num/channels/height/width (leading 1s) and/or doubles."""
    blob = caffe_pb2.BlobProto()
    if legacy:
        blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - values.ndim) + values.shape
    else:
        blob.shape.dim.extend(values.shape)
    (blob.double_data if double else blob.data).extend(values.ravel().tolist())
    if diff is not None:
        blob.double_diff.extend(diff.ravel().tolist())
    return blob


def _v1_caffemodel(weights: dict, styles: dict, diffs: dict = {}) -> caffe_pb2.NetParameter:
    model = caffe_pb2.NetParameter(name="LeNet")
    model.input.append("data")  # old caffemodels kept the input name, without dims
    model.layers.add(name="mnist", type=caffe_pb2.V1LayerParameter.DATA, top=["data", "label"])
    for name, kind in _LENET_LAYERS:
        layer = model.layers.add(name=name, type=_V1_TYPES[kind], blobs_lr=[1, 2] if name in weights else [])
        for i, values in enumerate(weights.get(name, ())):
            legacy, double = styles[name][i]
            layer.blobs.append(_v1_blob(values, legacy, double, diffs.get((name, i))))
    return model


_LENET_SHAPES = {"conv1": [(20, 1, 5, 5), (20,)], "conv2": [(50, 20, 5, 5), (50,)], "ip1": [(500, 800), (500,)],
                 "ip2": [(10, 500), (10,)]}


def _random_weights(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {n: [rng.standard_normal(s) for s in ss] for n, ss in _LENET_SHAPES.items()}


def test_v1_caffemodel_with_legacy_shapes_and_doubles_loads_by_name(tmp_path):
    rng = np.random.default_rng(5)
    weights = _random_weights(5)
    # (legacy 4-d shape?, double_data?) per blob: every combination appears
    styles = {"conv1": [(True, True), (True, False)], "conv2": [(False, False), (True, True)],
              "ip1": [(True, True), (False, True)], "ip2": [(False, True), (True, False)]}
    diff = rng.standard_normal((500,))
    path = str(tmp_path / "lenet_v1.caffemodel")
    write_binary(path, _v1_caffemodel(weights, styles, {("ip1", 1): diff}))
    with capture_log() as lines:
        net = Net(str(LENET_DEPLOY), caffe_pb2.TEST, weights=path)
    assert f"Attempting to upgrade input file specified using deprecated V1LayerParameter: {path}" in lines
    for name, values in weights.items():
        for blob, expected in zip(net.params[name], values):
            np.testing.assert_array_equal(blob.data, expected.astype(np.float32))
    np.testing.assert_array_equal(net.params["ip1"][1].diff, diff.astype(np.float32))
    # and the file itself upgrades to `layer` entries holding those blobs
    upgraded = read_net_binary(path)
    assert [layer.name for layer in upgraded.layer] == ["mnist"] + [n for n, _ in _LENET_LAYERS]
    assert upgraded.layer[1].type == "Convolution" and upgraded.layer[1].blobs[0].num == 20


def test_real_caffe_lenet_weights_through_v1_format_give_caffes_outputs(tmp_path):
    """lenet_iter_2000 (written by the real Caffe) rewritten as a V1 model with legacy shapes and doubles,
    loaded into the current LeNet: the deploy outputs are the ones Caffe computed."""
    real = caffe_pb2.NetParameter()
    real.ParseFromString(require_reference("lenet", "lenet_iter_2000.caffemodel").read_bytes())
    outputs = np.load(require_reference("lenet", "deploy_outputs.npz"))
    weights = {layer.name: [np.asarray(b.data, np.float32).reshape(tuple(b.shape.dim)) for b in layer.blobs]
               for layer in real.layer if len(layer.blobs)}
    styles = {name: [(True, True)] * len(blobs) for name, blobs in weights.items()}
    path = str(tmp_path / "lenet_iter_2000_v1.caffemodel")
    write_binary(path, _v1_caffemodel(weights, styles))
    net = Net(str(LENET_DEPLOY), caffe_pb2.TEST, weights=path)
    net.blobs["data"].data[...] = outputs["data"]
    net.forward()
    np.testing.assert_allclose(net.blobs["prob"].data, outputs["prob"], rtol=1e-4, atol=1e-5)


def test_real_caffe_caffemodel_still_loads():
    path = require_reference("lenet", "lenet_iter_2000.caffemodel")
    real = caffe_pb2.NetParameter()
    real.ParseFromString(path.read_bytes())
    with capture_log() as lines:
        net = Net(str(LENET_DEPLOY), caffe_pb2.TEST, weights=str(path))
    assert not any("Attempting to upgrade" in line for line in lines)
    for layer in real.layer:
        for blob, proto in zip(net.params.get(layer.name, ()), layer.blobs):
            np.testing.assert_array_equal(blob.data.ravel(), np.asarray(proto.data, np.float32))


# ------------------------------------------------------------------------------------- tools
def test_upgrade_net_proto_text_round_trip(tmp_path):
    src = write(tmp_path, "old.prototxt", V1_LENET)
    out = str(tmp_path / "new.prototxt")
    assert main_upgrade_net_proto_text([src, out]) == 0
    text = open(out).read()
    assert_same_net(parse_text(text, caffe_pb2.NetParameter()), V1_LENET_UPGRADED)
    assert "layers" not in text and text.index("name:") < text.index("type:") < text.index("top:")
    # already current: copied as is, with Caffe's note
    again = str(tmp_path / "again.prototxt")
    with capture_log() as lines:
        assert caffe_main(["upgrade_net_proto_text", out, again]) == 0
    assert f"File already in latest proto format: {out}" in lines
    assert open(again).read() == text
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave nothing behind


def test_upgrade_net_proto_text_v0_and_problem_exit_code(tmp_path):
    src = write(tmp_path, "v0.prototxt", V0_NET)
    out = str(tmp_path / "v2.prototxt")
    assert main_upgrade_net_proto_text([src, out]) == 0
    assert_same_net(read_net_text(out), V0_NET_UPGRADED)
    odd = write(tmp_path, "odd.prototxt", 'layers { layer { name: "r" type: "relu" num_output: 3 } }')
    assert main_upgrade_net_proto_text([odd, out]) == 1  # written anyway, as Caffe's tool does
    assert read_net_text(out).layer[0].type == "ReLU"


def test_upgrade_tools_usage_and_unreadable_input(tmp_path, capsys):
    assert main_upgrade_net_proto_text(["only_one"]) == 1
    assert "Usage: upgrade_net_proto_text v0_net_proto_file_in net_proto_file_out" in capsys.readouterr().err
    bad = write(tmp_path, "bad.prototxt", "layers { name: \n")
    assert main_upgrade_net_proto_text([bad, str(tmp_path / "o")]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert main_upgrade_net_proto_binary([bad, str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    fatal = write(tmp_path, "fatal.prototxt", 'layers { layer { name: "x" type: "bogus" } }')
    assert main_upgrade_net_proto_text([fatal, str(tmp_path / "o")]) == 1
    assert f"{fatal}: V0 layer 'x': unknown layer type 'bogus'" in capsys.readouterr().err


def test_upgrade_net_proto_binary_round_trip(tmp_path):
    weights = _random_weights(1)
    src = str(tmp_path / "old.caffemodel")
    write_binary(src, _v1_caffemodel(weights, {name: [(True, True), (True, False)] for name in weights}))
    out = str(tmp_path / "new.caffemodel")
    assert caffe_main(["upgrade_net_proto_binary", src, out]) == 0
    new = caffe_pb2.NetParameter()
    new.ParseFromString(open(out, "rb").read())
    assert not len(new.layers) and not len(new.input) and [l.type for l in new.layer][:2] == ["Data", "Convolution"]
    ip2 = next(layer for layer in new.layer if layer.name == "ip2")
    assert [p.lr_mult for p in ip2.param] == [1, 2]
    np.testing.assert_array_equal(np.asarray(ip2.blobs[0].double_data), weights["ip2"][0].ravel())
    assert (ip2.blobs[0].num, ip2.blobs[0].channels, ip2.blobs[0].height, ip2.blobs[0].width) == (1, 1, 10, 500)
    net = Net(str(LENET_DEPLOY), caffe_pb2.TEST, weights=out)
    np.testing.assert_array_equal(net.params["ip2"][1].data, weights["ip2"][1].astype(np.float32))


def test_upgrade_solver_proto_text_round_trip_in_declaration_order(tmp_path):
    src = write(tmp_path, "old_solver.prototxt",
                'solver_type: ADAGRAD max_iter: 10 base_lr: 0.01 net: "n.prototxt" snapshot_prefix: "s"')
    out = str(tmp_path / "solver.prototxt")
    assert main_upgrade_solver_proto_text([src, out]) == 0
    text = open(out).read()
    got = parse_text(text, caffe_pb2.SolverParameter())
    assert got == parse_text('type: "AdaGrad" max_iter: 10 base_lr: 0.01 net: "n.prototxt" snapshot_prefix: "s"',
                             caffe_pb2.SolverParameter())
    keys = [line.split(":")[0] for line in text.splitlines()]
    declared = [f.name for f in caffe_pb2.SolverParameter.DESCRIPTOR.fields]
    assert keys == sorted(keys, key=declared.index) == ["net", "base_lr", "max_iter", "snapshot_prefix", "type"]
