"""NetSpec (caffe.NetSpec, caffe.layers, caffe.params, caffe.to_proto) against the text the real
pycaffe printed, and pycaffe's naming/parameter rules worked out by hand."""
import difflib
import importlib.util
import pathlib

import numpy as np
import pytest
from google.protobuf import text_format

import caffe
from caffe import layers as L
from caffe import params as P
from conftest import require_reference
from recaffe.net_spec import message_to_text, param_name_dict
from recaffe.proto import caffe_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_module(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------- the real pycaffe's text
def test_reference_programs_print_pycaffes_text_byte_for_byte():
    folder = require_reference("netspec")
    programs = load_module(folder / "netspec_programs.py", "_reference_netspec_programs").PROGRAMS
    references = sorted(p.stem for p in folder.glob("*.prototxt"))
    assert references and sorted(programs) == references
    for name in references:
        expected = (folder / f"{name}.prototxt").read_text()
        got = str(programs[name]())
        diff = "".join(difflib.unified_diff(expected.splitlines(True), got.splitlines(True),
                                            "pycaffe", "recaffe"))
        assert got == expected, f"{name}:\n{diff}"


def test_reference_deploy_net_builds_and_runs():
    folder = require_reference("netspec")
    net = caffe.Net(str(folder / "lenet_deploy.prototxt"), caffe.TEST)
    assert net.layer_names == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "prob"]
    out = net.forward()
    assert out["prob"].shape == (1, 10)


# ------------------------------------------------------------------------------ text format
def test_text_lists_fields_in_declaration_order_with_c_style_floats():
    n = caffe.NetSpec()
    n.data = L.DummyData(shape=dict(dim=[2, 3, 8, 8]), transform_param=dict(scale=1. / 255))
    n.conv = L.Convolution(n.data, group=1, stride=2, kernel_size=3, num_output=4, pad=1)
    n.norm = L.LRN(n.conv, alpha=1e-4, beta=0.75, k=2.5e-7)
    text = str(n.to_proto())
    assert text == (
        'layer {\n  name: "data"\n  type: "DummyData"\n  top: "data"\n'
        '  transform_param {\n    scale: 0.00392156886\n  }\n'
        '  dummy_data_param {\n    shape {\n      dim: 2\n      dim: 3\n      dim: 8\n      dim: 8\n'
        '    }\n  }\n}\n'
        'layer {\n  name: "conv"\n  type: "Convolution"\n  bottom: "data"\n  top: "conv"\n'
        '  convolution_param {\n    num_output: 4\n    pad: 1\n    kernel_size: 3\n    stride: 2\n'
        '    group: 1\n  }\n}\n'
        'layer {\n  name: "norm"\n  type: "LRN"\n  bottom: "conv"\n  top: "norm"\n'
        '  lrn_param {\n    alpha: 0.0001\n    beta: 0.75\n    k: 2.5e-07\n  }\n}\n')


def test_text_parses_back_to_the_same_message():
    proto = caffe.NetSpec()
    proto.x = L.Input(shape=dict(dim=[1, 2]), name='in "quoted"\tname')
    proto.y = L.Power(proto.x, power=1 / 3., scale=-0.0, shift=float("inf"))
    proto.z = L.Python(proto.y, module="m", layer="C", param_str="a\nb 'c' \\ é")
    net = proto.to_proto()
    assert text_format.Parse(str(net), caffe_pb2.NetParameter()) == net
    assert 'power: 0.333333343\n' in str(net) and "shift: inf\n" in str(net) and "scale: -0\n" in str(net)
    assert r'name: "in \"quoted\"\tname"' in str(net)
    assert r'param_str: "a\nb \'c\' \\ é"' in str(net)


def test_message_to_text_prints_doubles_with_17_digits_only_when_needed():
    blob = caffe_pb2.BlobProto()
    blob.double_data.extend([0.1, 1 / 3.])
    assert message_to_text(blob) == "double_data: 0.1\ndouble_data: 0.33333333333333331\n"
    assert message_to_text(caffe_pb2.NetParameter()) == ""


# ------------------------------------------------------------------------------------ naming
def test_anonymous_tops_and_layers_are_numbered_per_type():
    data, label = L.DummyData(shape=[dict(dim=[2, 3]), dict(dim=[2])], ntop=2)
    ip1 = L.InnerProduct(data, num_output=4)
    ip2 = L.InnerProduct(ip1, num_output=2)
    loss = L.SoftmaxWithLoss(ip2, label)
    net = loss.to_proto()
    assert [(lay.name, lay.type, list(lay.bottom), list(lay.top)) for lay in net.layer] == [
        ("DummyData1", "DummyData", [], ["DummyData1", "DummyData2"]),
        ("InnerProduct1", "InnerProduct", ["DummyData1"], ["InnerProduct1"]),
        ("InnerProduct2", "InnerProduct", ["InnerProduct1"], ["InnerProduct2"]),
        ("SoftmaxWithLoss1", "SoftmaxWithLoss", ["InnerProduct2", "DummyData2"], ["SoftmaxWithLoss1"]),
    ]
    assert caffe.to_proto(loss) == net


def test_named_tops_name_their_layers_and_unnamed_ones_are_numbered():
    n = caffe.NetSpec()
    n.data, _ = L.DummyData(shape=[dict(dim=[2, 3]), dict(dim=[2])], ntop=2)  # 2nd top unnamed
    hidden = L.InnerProduct(n.data, num_output=4)  # never assigned to n
    n.out = L.InnerProduct(hidden, num_output=2)
    net = n.to_proto()
    assert [(lay.name, list(lay.bottom), list(lay.top)) for lay in net.layer] == [
        ("data", [], ["data", "DummyData1"]),
        ("InnerProduct1", ["data"], ["InnerProduct1"]),
        ("out", ["InnerProduct1"], ["out"]),
    ]


def test_in_place_layers_write_to_their_bottom_and_take_their_own_name():
    n = caffe.NetSpec()
    n.x = L.Input(shape=dict(dim=[2, 3]))
    n.fc = L.InnerProduct(n.x, num_output=3)
    n.relu = L.ReLU(n.fc, in_place=True)
    n.drop = L.Dropout(n.relu, in_place=True, dropout_ratio=0.2)
    n.out = L.InnerProduct(n.drop, num_output=1)
    layers = n.to_proto().layer
    assert [(lay.name, list(lay.bottom), list(lay.top)) for lay in layers[2:]] == [
        ("relu", ["fc"], ["fc"]), ("drop", ["fc"], ["fc"]), ("out", ["fc"], ["out"])]
    assert layers[3].dropout_param.dropout_ratio == pytest.approx(0.2)


def test_name_keyword_renames_the_layer_but_not_its_top():
    n = caffe.NetSpec()
    n.x = L.Input(shape=dict(dim=[1]), name="input_layer")
    layer = n.to_proto().layer[0]
    assert (layer.name, list(layer.top)) == ("input_layer", ["x"])


def test_zero_top_layers_return_the_function_and_build(tmp_path):
    n = caffe.NetSpec()
    n.a, n.b = L.DummyData(shape=dict(dim=3), ntop=2)
    silence = L.Silence(n.a, n.b, ntop=0)
    assert isinstance(silence, caffe.net_spec.Function) and silence.tops == ()
    n.quiet = silence
    net = n.to_proto()
    assert (net.layer[1].name, list(net.layer[1].bottom), list(net.layer[1].top)) == ("quiet", ["a", "b"], [])
    path = tmp_path / "silent.prototxt"
    path.write_text(str(net))
    assert caffe.Net(str(path), caffe.TEST).forward() == {}


def test_multiple_tops_come_back_as_a_tuple():
    tops = L.Slice(L.Input(shape=dict(dim=[2, 4])), ntop=3, slice_point=[1, 3])
    assert isinstance(tops, tuple) and len(tops) == 3
    assert [t.n for t in tops] == [0, 1, 2]
    net = caffe.to_proto(*tops)
    assert list(net.layer[1].top) == ["Slice1", "Slice2", "Slice3"]
    assert list(net.layer[1].slice_param.slice_point) == [1, 3]


def test_a_top_assigned_twice_takes_the_last_name():
    n = caffe.NetSpec()
    top = L.Input(shape=dict(dim=[1]))
    n.first = top
    n.second = top
    net = n.to_proto()
    assert len(net.layer) == 1 and list(net.layer[0].top) == ["second"]


def test_inputs_must_be_tops():
    data = L.DummyData(ntop=2)
    with pytest.raises(TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$"):
        L.Silence(data, ntop=0)
    L.Silence(*data, ntop=0)


# -------------------------------------------------------------------------------- parameters
def test_keywords_go_to_the_type_param_then_to_the_layer():
    n = caffe.NetSpec()
    n.x = L.Input(shape=dict(dim=[4, 3]))
    n.y = L.Input(shape=dict(dim=[4]))
    n.fc = L.InnerProduct(n.x, num_output=5, bias_term=False,
                          weight_filler=dict(type="gaussian", std=0.01),
                          param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)],
                          propagate_down=True, include=dict(phase=caffe.TRAIN))
    n.loss = L.SoftmaxWithLoss(n.fc, n.y, loss_weight=0.5, loss_param=dict(ignore_label=-1, normalize=False))
    n.acc = L.Accuracy(n.fc, n.y, top_k=2, include=[dict(phase=caffe.TEST), dict(stage="val")])
    fc, loss, acc = n.to_proto().layer[2:]
    p = fc.inner_product_param
    assert (p.num_output, p.bias_term, p.weight_filler.type) == (5, False, "gaussian")
    assert p.weight_filler.std == pytest.approx(0.01)
    assert [(s.lr_mult, s.decay_mult) for s in fc.param] == [(1, 1), (2, 0)]
    assert list(fc.propagate_down) == [True]  # scalar given to a repeated field
    assert [r.phase for r in fc.include] == [caffe.TRAIN]
    assert list(loss.loss_weight) == [0.5]  # SoftmaxWithLoss has no *_param: set on the layer
    assert (loss.loss_param.ignore_label, loss.loss_param.normalize) == (-1, False)
    assert acc.accuracy_param.top_k == 2
    assert [r.phase for r in acc.include] == [caffe.TEST, caffe.TRAIN] and acc.include[1].stage == ["val"]


def test_repeated_fields_accept_lists_scalars_and_tuples():
    layer = L.Data(source="db", batch_size=2, backend=P.Data.LMDB,
                   transform_param=dict(mean_value=[104, 117, 123], mirror=True, crop_size=3),
                   ntop=2)[0].to_proto().layer[0]
    assert list(layer.transform_param.mean_value) == [104, 117, 123]
    assert layer.data_param.backend == caffe_pb2.DataParameter.LMDB
    conv = L.Convolution(L.Input(shape=dict(dim=(1, 1, 5, 5))), kernel_size=(3, 2), stride=1,
                         num_output=1).to_proto().layer[1]
    assert list(conv.convolution_param.kernel_size) == [3, 2]
    assert list(conv.convolution_param.stride) == [1]


def test_type_param_names_follow_the_schema():
    names = param_name_dict()
    assert names["Convolution"] == "convolution"
    assert names["InnerProduct"] == "inner_product"
    assert names["LRN"] == "lrn" and names["ReLU"] == "relu" and names["HDF5Data"] == "hdf5_data"
    assert names["Transformation"] == "transform" and names["Python"] == "python"
    layer = L.Python(module="pyloss", layer="EuclideanLossLayer", param_str="x", loss_weight=1,
                     ntop=1).to_proto().layer[0]
    assert (layer.python_param.module, layer.python_param.layer, layer.python_param.param_str) == \
        ("pyloss", "EuclideanLossLayer", "x")
    assert list(layer.loss_weight) == [1]


def test_unknown_keywords_and_bad_values_fail_like_pycaffe():
    with pytest.raises(AttributeError):
        L.ReLU(L.Input(shape=dict(dim=[1])), no_such_field=3).to_proto()
    with pytest.raises(AttributeError):
        L.Convolution(L.Input(shape=dict(dim=[1])), weight_filler=dict(typo="x")).to_proto()
    with pytest.raises(TypeError):
        L.InnerProduct(L.Input(shape=dict(dim=[1])), num_output="five").to_proto()


def test_params_give_enum_values_by_name():
    assert P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX == 0
    assert P.Pooling.AVE == 1 and P.Pooling.STOCHASTIC == 2
    assert P.Data.LMDB == 1 and P.Loss.VALID == caffe_pb2.LossParameter.VALID
    assert P.Eltwise.SUM == caffe_pb2.EltwiseParameter.SUM
    with pytest.raises(AttributeError, match="PoolingParameter has no constant 'MEDIAN'"):
        P.Pooling.MEDIAN
    with pytest.raises(AttributeError, match="no message NopeParameter"):
        P.Nope.X


# ------------------------------------------------------------------------------ NetSpec dict
def test_netspec_item_access_keys_update_and_delete():
    n = caffe.NetSpec()
    n["x"] = L.Input(shape=dict(dim=[2, 3]))
    n.fc = L.InnerProduct(n["x"], num_output=2)
    assert n.keys() == ["x", "fc"] and n.vals() == [n.x, n.fc]
    n.update("fc", dict(num_output=7, bias_term=False))
    assert n.to_proto().layer[1].inner_product_param.num_output == 7
    del n["fc"]
    assert n.keys() == ["x"] and len(n.to_proto().layer) == 1
    assert not hasattr(n, "fc")
    with pytest.raises(KeyError, match="no top named 'fc'"):
        n["fc"]


def test_netspec_nets_build_and_train_as_written():
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(shape=[dict(dim=[8, 5]), dict(dim=[8])],
                                  data_filler=[dict(type="gaussian"), dict(type="constant", value=1)], ntop=2)
    n.ip = L.InnerProduct(n.data, num_output=3, weight_filler=dict(type="xavier"))
    n.relu = L.ReLU(n.ip, in_place=True)
    n.loss = L.SoftmaxWithLoss(n.relu, n.label)
    solver_param = caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="fixed", max_iter=5, random_seed=3)
    solver_param.net_param.CopyFrom(n.to_proto())
    from recaffe.solvers import create_solver
    solver = create_solver(solver_param)
    assert list(solver.net.blobs) == ["data", "label", "ip", "loss"]
    assert solver.net.blob_loss_weights["loss"] == 1
    solver.step(5)
    assert np.isfinite(float(solver.net.blobs["loss"].data))


def test_example_netspec_program_writes_the_example_prototxt():
    example = ROOT / "examples" / "pycaffe"
    module = load_module(example / "linreg_netspec.py", "_linreg_netspec_example")
    written = text_format.Parse((example / "linreg.prototxt").read_text(), caffe_pb2.NetParameter())
    assert module.linreg() == written
