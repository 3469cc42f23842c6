"""caffe export: every mapped layer type through ONNX (run by onnxruntime) and through the
generated PyTorch module, against recaffe's own forward; the zoo nets; errors; the CLI."""
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import require_reference
from export_cases_rcnn_mobile import cases as rcnn_mobile_cases
from helpers import make_net, net_param, write
from recaffe.cli.main import main
from recaffe.export import ExportError, build_graph, load_torch_module, to_onnx, write_torch
from recaffe.export.lowering import LOWERINGS
from recaffe.export.onnx_export import EMITTERS as ONNX_EMITTERS
from recaffe.export.torch_export import EMITTERS as TORCH_EMITTERS
from recaffe.io.netfiles import read_net_text
from recaffe.net import Net
from recaffe.proto import caffe_pb2

RTOL, ATOL = 1e-5, 1e-6
FILL = ('weight_filler { type: "gaussian" std: 0.3 } '
        'bias_filler { type: "gaussian" std: 0.3 }')


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The reference runs and the torch modules on one thread: the machine's cores are shared
    (onnxruntime runs on one thread too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _inputs_text(shapes) -> str:
    return "".join(f'layer {{ name: "in{i}" type: "Input" top: "x{i}" input_param {{ shape {{ '
                   + " ".join(f"dim: {d}" for d in shape) + " } } }\n" for i, shape in enumerate(shapes))


def _close(out, ref, what, rtol=RTOL, atol=ATOL):
    assert out.shape == ref.shape, f"{what}: shape {out.shape} vs recaffe {ref.shape}"
    np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol, err_msg=what)


def check_exports(net, tmp_path, feed=None, rtol=RTOL, atol=ATOL):
    """Run recaffe, the ONNX model and the torch module on the same inputs; compare all outputs."""
    graph = build_graph(net)
    rng = np.random.default_rng(0)
    for name, _ in graph.inputs:
        if feed and name in feed:
            net.blobs[name].data[...] = feed[name]
        else:
            net.blobs[name].data[...] = rng.standard_normal(net.blobs[name].shape)
    fed = {name: net.blobs[name].data.copy() for name, _ in graph.inputs}
    ref = {k: v.copy() for k, v in net.forward().items()}
    # Input blobs as fed (a layer may overwrite one in place); data layers' tops as they produced them
    values = {name: fed[name] if name in net.inputs else net.blobs[name].data.copy()
              for name, _ in graph.inputs}
    onnx_out = _session(to_onnx(graph)).run(None, values)
    py, _ = write_torch(graph, tmp_path / "exported")
    module = load_torch_module(py)
    with torch.no_grad():
        torch_out = module(*[torch.from_numpy(values[n]) for n in module.INPUTS])
    torch_out = torch_out if isinstance(torch_out, tuple) else (torch_out,)
    for name, o, t in zip(graph.output_blobs, onnx_out, torch_out):
        _close(o, ref[name], f"onnx output {name}", rtol, atol)
        _close(t.numpy(), ref[name], f"torch output {name}", rtol, atol)
    return graph


def _pos(shape):
    return np.random.default_rng(1).uniform(0.2, 3.0, shape)


def _ties(shape):
    return np.round(np.random.default_rng(3).standard_normal(shape))  # integers: many ties


def _indices(shape):
    return np.random.default_rng(4).integers(0, 6, shape)


def _large(shape):
    return np.random.default_rng(2).standard_normal(shape) * 40


def L(type_: str, params: str = "", bottom=("x0",), top=("y",), name=None) -> str:
    """One layer's prototxt text."""
    links = "".join(f' bottom: "{b}"' for b in bottom) + "".join(f' top: "{t}"' for t in top)
    name = name or (top[0] if top else type_)
    return f'layer {{ name: "{name}" type: "{type_}"{links} {params} }}\n'


@dataclasses.dataclass
class Case:
    layers: str
    shapes: tuple = ((2, 3, 7, 6),)
    feed: tuple = ()  # an input generator per Input, else standard normal


def _conv(params, **kw):
    return L("Convolution", f"convolution_param {{ {params} }}", **kw)


def _pool(params, **kw):
    return L("Pooling", f"pooling_param {{ {params} }}", **kw)


CASES = {
    # convolution-like
    "conv": Case(_conv(f"num_output: 4 kernel_size: 3 pad: 1 stride: 2 {FILL}")),
    "conv_group_dilation_hw": Case(_conv(
        "num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 0 stride_h: 2 stride_w: 1 "
        'dilation: 2 bias_term: false weight_filler { type: "gaussian" std: 0.3 }'), ((2, 4, 9, 8),)),
    "conv_1d_two_bottoms": Case(_conv(f"num_output: 2 kernel_size: 3 stride: 2 {FILL}", bottom=("x0", "x1"),
                                      top=("y0", "y1")), ((2, 3, 10), (2, 3, 10))),
    "deconv_group_stride_pad": Case(L("Deconvolution", "convolution_param { num_output: 6 group: 2 "
                                      f"kernel_size: 3 stride: 2 pad: 1 {FILL} }}"), ((2, 4, 5, 4),)),
    "deconv_dilation_hw": Case(L("Deconvolution", "convolution_param { num_output: 3 kernel_h: 2 kernel_w: 3 "
                                 f"stride_h: 3 stride_w: 2 pad_w: 1 dilation: 2 {FILL} }}"), ((2, 2, 4, 5),)),
    "ip": Case(L("InnerProduct", f"inner_product_param {{ num_output: 5 {FILL} }}")),
    "ip_axis2_transpose": Case(L("InnerProduct", "inner_product_param { num_output: 4 axis: 2 "
                                 f"transpose: true {FILL} }}"), ((2, 3, 4, 5),)),
    "ip_2d_no_bias": Case(L("InnerProduct", "inner_product_param { num_output: 4 bias_term: false "
                            'weight_filler { type: "gaussian" std: 0.3 } }'), ((3, 6),)),
    "embed": Case(L("Embed", f"embed_param {{ num_output: 4 input_dim: 6 {FILL} }}"), ((2, 3),), (_indices,)),
    # pooling: Caffe's CEIL windows, divisors, padding
    "pool_max_ceil_partial": Case(_pool("pool: MAX kernel_size: 3 stride: 2")),
    "pool_max_pad": Case(_pool("pool: MAX kernel_size: 3 stride: 2 pad: 1")),
    # CEIL without pad, stride > kernel: the last window starts past the bottom (9 >= 9)
    "pool_max_empty_window": Case(_pool("pool: MAX kernel_size: 2 stride: 3"), ((2, 3, 7, 9),)),
    # AVE over empty windows: Caffe divides a zero sum by a divisor of -1 (H: 8 >= 7) or 0 (W: 6 == 6);
    # onnxruntime folds a zero Pad into AveragePool and refuses pads >= kernel
    "pool_ave_empty_windows": Case(_pool("pool: AVE kernel_size: 2 stride: 4")
                                   + _pool("pool: AVE kernel_size: 1 stride: 2", top=("z",)), ((2, 3, 7, 6),)),
    "pool_ave_ceil_partial": Case(_pool("pool: AVE kernel_size: 3 stride: 2")),
    "pool_ave_pad": Case(_pool("pool: AVE kernel_size: 3 stride: 2 pad: 1")),
    "pool_ave_big_pad": Case(_pool("pool: AVE kernel_size: 4 stride: 3 pad: 3"), ((2, 3, 9, 8),)),
    "pool_ave_rect": Case(_pool("pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 "
                                "pad_h: 1 pad_w: 1")),
    "pool_floor_crop": Case(_pool("pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR"), ((2, 3, 8, 8),)),
    "pool_global": Case(_pool("pool: AVE global_pooling: true")
                        + _pool("pool: MAX global_pooling: true", top=("z",))),
    "pool_stochastic_test": Case(_pool("pool: STOCHASTIC kernel_size: 3 stride: 2"), feed=(_pos,)),
    # neurons
    "relu": Case(L("ReLU", bottom=("x0",), top=("x0",))),
    "relu_leaky": Case(L("ReLU", "relu_param { negative_slope: 0.2 }")),
    "prelu": Case(L("PReLU", 'prelu_param { filler { type: "gaussian" std: 0.5 } }')),
    "prelu_shared": Case(L("PReLU", 'prelu_param { channel_shared: true '
                                    'filler { type: "constant" value: 0.3 } }'), ((2, 3),)),
    "sigmoid_tanh_abs": Case(L("Sigmoid", top=("a",)) + L("TanH", top=("b",)) + L("AbsVal", top=("c",))),
    "elu": Case(L("ELU", "elu_param { alpha: 0.5 }")),
    "bnll_large_inputs": Case(L("BNLL"), feed=(_large,)),
    "power": Case(L("Power", "power_param { power: 3 scale: -0.7 shift: 0.2 }")
                  + L("Power", "power_param { power: 2 scale: 0.5 }", top=("z",))),
    "power_constant": Case(L("Power", "power_param { power: 3 scale: 0 shift: 2 }")
                           + L("Power", "power_param { power: 0 }", top=("z",))),
    "exp": Case(L("Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }") + L("Exp", top=("z",))),
    "log": Case(L("Log", "log_param { base: 10 scale: 2 shift: 0.5 }") + L("Log", top=("z",)), feed=(_pos,)),
    "clip": Case(L("Clip", "clip_param { min: -0.5 max: 0.7 }")),
    # infinite constants: the torch module must spell them float('inf') (Python has no inf literal)
    "infinite_constants": Case(L("Clip", "clip_param { min: -inf max: 0.7 }")
                               + L("Power", "power_param { power: 2 scale: 0 shift: 1e30 }", top=("z",))),
    "swish": Case(L("Swish", "swish_param { beta: 1.5 }")),
    "threshold": Case(L("Threshold", "threshold_param { threshold: 0.2 }")),
    # normalization
    "lrn_across": Case(L("LRN", "lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 }"), ((2, 7, 4, 5),)),
    "lrn_within": Case(L("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.6 "
                                "norm_region: WITHIN_CHANNEL }"), ((2, 3, 5, 6),)),
    "scale_param_bias": Case(L("Scale", 'scale_param { filler { type: "gaussian" std: 1 } bias_term: true '
                                        'bias_filler { type: "gaussian" std: 1 } }')),
    "scale_two_bottoms": Case(L("Scale", 'scale_param { axis: 1 bias_term: true '
                                         'bias_filler { type: "gaussian" std: 1 } }', bottom=("x0", "x1")),
                              ((2, 3, 7, 6), (3, 7))),
    "scale_scalar_axis2": Case(
        L("Scale", 'scale_param { num_axes: 0 filler { type: "constant" value: 1.7 } }')
        + L("Scale", 'scale_param { axis: 2 num_axes: 2 filler { type: "gaussian" std: 1 } }', top=("z",))),
    "bias": Case(L("Bias", 'bias_param { filler { type: "gaussian" std: 1 } }')
                 + L("Bias", "bias_param { axis: 2 }", bottom=("x0", "x1"), top=("z",)),
                 ((2, 3, 7, 6), (7, 6))),
    "mvn": Case(L("MVN", top=("a",)) + L("MVN", "mvn_param { normalize_variance: false }", top=("b",))
                + L("MVN", "mvn_param { across_channels: true eps: 0.01 }", top=("c",))
                + L("MVN", bottom=("x1",), top=("d",)), ((2, 3, 7, 6), (4, 5))),
    "softmax": Case(L("Softmax") + L("Softmax", "softmax_param { axis: -2 }", top=("z",))),
    # routing and shapes
    "eltwise_sum_coeffs": Case(L("Eltwise", "eltwise_param { operation: SUM coeff: 0.5 coeff: -1.5 "
                                            "coeff: 2 }", bottom=("x0", "x1", "x2")), ((2, 3, 4),) * 3),
    "eltwise_prod_max": Case(L("Eltwise", "eltwise_param { operation: PROD }", bottom=("x0", "x1", "x2"))
                             + L("Eltwise", "eltwise_param { operation: MAX }", bottom=("x0", "x1", "x2"),
                                 top=("z",)), ((2, 3, 4),) * 3),
    "concat": Case(L("Concat", "concat_param { axis: 2 }", bottom=("x0", "x1")) + L("Concat", top=("z",)),
                   ((2, 3, 4), (2, 3, 2))),
    "slice": Case(L("Slice", "slice_param { axis: 1 slice_point: 1 slice_point: 3 }", top=("a", "b", "c"))
                  + L("Slice", "slice_param { axis: -1 }", top=("d", "e")), ((2, 5, 3, 4),)),
    "flatten": Case(L("Flatten", "flatten_param { axis: 1 end_axis: 2 }") + L("Flatten", top=("z",)),
                    ((2, 3, 4, 5),)),
    "reshape": Case(L("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 2 } }")
                    + L("Reshape", "reshape_param { shape { dim: -1 } axis: 1 num_axes: 2 }", top=("z",))
                    # a 0 inside the replaced axes copies the bottom's dim at the same index
                    + L("Reshape", "reshape_param { shape { dim: 2 dim: 0 dim: -1 } axis: 1 num_axes: 2 }",
                        top=("w",)), ((2, 4, 3, 5),)),
    "crop": Case(L("Crop", "crop_param { axis: 2 offset: 1 offset: 2 }", bottom=("x0", "x1"))
                 + L("Crop", "crop_param { axis: 1 offset: 1 }", bottom=("x0", "x1"), top=("z",)),
                 ((2, 3, 7, 6), (2, 2, 4, 3))),
    "split_dropout": Case(L("Split", top=("a", "b"), name="sp")
                          + L("Dropout", "dropout_param { dropout_ratio: 0.4 }", bottom=("a",), top=("a",),
                              name="drop")
                          + L("Sigmoid", bottom=("b",), top=("c",))
                          + L("Eltwise", bottom=("a", "c", "x0"))),
    "tile": Case(L("Tile", "tile_param { axis: 1 tiles: 3 }")),
    "silence": Case(L("Silence", bottom=("x1",), top=(), name="s") + L("TanH"), ((2, 3), (2, 2))),
    "parameter": Case(L("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }", bottom=(), top=("w",))
                      + L("Eltwise", bottom=("x0", "w")), ((2, 3),)),
    # reductions
    "reduction": Case(L("Reduction", "reduction_param { axis: 1 }", top=("a",))
                      + L("Reduction", "reduction_param { operation: ASUM axis: 2 coeff: 0.5 }", top=("b",))
                      + L("Reduction", "reduction_param { operation: SUMSQ axis: 0 }", top=("c",))
                      + L("Reduction", "reduction_param { operation: MEAN axis: -1 coeff: 2 }", top=("d",))),
    "argmax": Case(L("ArgMax", "argmax_param { top_k: 3 out_max_val: true }")
                   + L("ArgMax", "argmax_param { top_k: 2 axis: 1 }", top=("z",))
                   + L("ArgMax", top=("w",))
                   + L("ArgMax", "argmax_param { axis: 2 top_k: 2 out_max_val: true }", top=("v",)),
                   ((2, 4, 3, 2),), (_ties,)),
}

CASES.update(rcnn_mobile_cases(Case, L))  # the Faster R-CNN / R-FCN / mobile / YOLO fork types


def _case_param(case: str) -> tuple[caffe_pb2.NetParameter, dict]:
    """One case's layers with their own Input layers, every name prefixed with ``case/``."""
    spec = CASES[case]
    param = net_param(_inputs_text(spec.shapes) + spec.layers)
    for lp in param.layer:
        lp.name = f"{case}/{lp.name}"
        lp.bottom[:] = [f"{case}/{b}" for b in lp.bottom]
        lp.top[:] = [f"{case}/{t}" for t in lp.top]
    feed = {f"{case}/x{i}": make(spec.shapes[i]) for i, make in enumerate(spec.feed)}
    return param, feed


def cases_net(cases, setup=None):
    """One TEST net holding several cases side by side (one net per family keeps the tests fast)."""
    param = caffe_pb2.NetParameter(name="cases")
    feed = {}
    for case in cases:
        p, f = _case_param(case)
        param.layer.extend(p.layer)
        feed.update(f)
    net = Net(param, caffe_pb2.TEST)
    if setup:
        setup(net)
    return net, feed


def _randomize_parameter(net):
    for layer in net.layers:
        if layer.type == "Parameter":
            layer.blobs[0].data[...] = np.random.default_rng(5).standard_normal(layer.blobs[0].shape)


FAMILIES = {
    "convolution": ["conv", "conv_group_dilation_hw", "conv_1d_two_bottoms", "deconv_group_stride_pad",
                    "deconv_dilation_hw", "ip", "ip_axis2_transpose", "ip_2d_no_bias", "embed"],
    "pooling": [c for c in CASES if c.startswith("pool_")],
    "neurons": ["relu", "relu_leaky", "prelu", "prelu_shared", "sigmoid_tanh_abs", "elu", "bnll_large_inputs",
                "power", "power_constant", "exp", "log", "clip", "infinite_constants", "swish", "threshold"],
    "normalization": ["lrn_across", "lrn_within", "scale_param_bias", "scale_two_bottoms",
                      "scale_scalar_axis2", "bias", "mvn", "softmax"],
    "routing": ["eltwise_sum_coeffs", "eltwise_prod_max", "concat", "slice", "flatten", "reshape", "crop",
                "split_dropout", "tile", "silence", "parameter"],
    "reductions": ["reduction", "argmax"],
    "rcnn_mobile": list(rcnn_mobile_cases(Case, L)),
}


def test_families_cover_every_case():
    assert sorted(c for cases in FAMILIES.values() for c in cases) == sorted(CASES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_exports_match_recaffe(family, tmp_path):
    net, feed = cases_net(FAMILIES[family], setup=_randomize_parameter)
    check_exports(net, tmp_path, feed)


@pytest.mark.parametrize("scale_factor", [2.5, 0.0])
def test_batch_norm_global_stats_divided_by_scale_factor(scale_factor, tmp_path):
    def setup(net):
        mean, var, factor = net.params["bn"]
        rng = np.random.default_rng(6)
        mean.data[...] = rng.standard_normal(3) * scale_factor
        var.data[...] = rng.uniform(0.5, 2.0, 3) * max(scale_factor, 1)
        factor.data[...] = scale_factor

    net = make_net(_inputs_text([(2, 3, 7, 6)]) + 'layer { name: "bn" type: "BatchNorm" bottom: "x0" '
                   'top: "x0" batch_norm_param { eps: 0.001 } }', caffe_pb2.TEST)
    setup(net)
    graph = check_exports(net, tmp_path)
    mean = graph.nodes[0].params["mean"].array.reshape(-1)
    if scale_factor == 0:
        assert np.all(mean == 0)  # Caffe: a zero scale factor gives zero statistics


def test_data_layer_tops_become_inputs_and_unused_labels_are_dropped(tmp_path):
    net = make_net('name: "d" layer { name: "data" type: "DummyData" top: "data" top: "label" '
                   'dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 } '
                   'data_filler { type: "gaussian" std: 1 } } }'
                   'layer { name: "t" type: "TanH" bottom: "data" top: "y" }', caffe_pb2.TEST)
    graph = check_exports(net, tmp_path)
    assert graph.inputs == [("data", (2, 3))] and graph.outputs == [("y", (2, 3))]


def test_in_place_versions_keep_the_blob_name_for_the_last_one(tmp_path):
    net = make_net('name: "v"' + _inputs_text([(2, 3)]) +
                   'layer { name: "a" type: "TanH" bottom: "x0" top: "h" }'
                   'layer { name: "b" type: "ReLU" bottom: "h" top: "h" }'
                   'layer { name: "c" type: "Dropout" bottom: "h" top: "h" }', caffe_pb2.TEST)
    graph = check_exports(net, tmp_path)
    assert [(n.layer, n.inputs, n.outputs) for n in graph.nodes] == [
        ("a", ["x0"], ["h@a"]), ("b", ["h@a"], ["h"])]
    assert graph.outputs == [("h", (2, 3))]


def test_every_lowered_type_has_both_emitters():
    types = set(LOWERINGS) - {"Split", "Silence", "Dropout"}
    assert types <= set(ONNX_EMITTERS) and types <= set(TORCH_EMITTERS)
    covered = {t for spec in CASES.values() for t in LOWERINGS if f'type: "{t}"' in spec.layers}
    # the forks' export modules register their own types and test them in their own files
    covered |= {t for t, fn in LOWERINGS.items() if fn.__module__ != "recaffe.export.lowering"}
    assert set(LOWERINGS) - covered <= {"BatchNorm"}  # tested on its own above


# ------------------------------------------------------------------------------ errors
def test_loss_layer_is_named_in_the_error():
    net = make_net('name: "l"' + _inputs_text([(2, 3), (2,)]) +
                   'layer { name: "myloss" type: "SoftmaxWithLoss" bottom: "x0" bottom: "x1" top: "loss" }',
                   caffe_pb2.TEST)
    with pytest.raises(ExportError, match=r"SoftmaxWithLoss layer 'myloss'.*deploy net"):
        build_graph(net)


def test_python_layer_is_unsupported_with_its_name_and_type(tmp_path, monkeypatch):
    write(tmp_path, "export_pylayer.py", "import caffe\nclass Twice(caffe.Layer):\n"
          "    def setup(self, bottom, top): pass\n"
          "    def reshape(self, bottom, top): top[0].reshape(*bottom[0].shape)\n"
          "    def forward(self, bottom, top): top[0].data[...] = 2 * bottom[0].data\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = make_net('name: "p"' + _inputs_text([(2, 3)]) +
                   'layer { name: "twice" type: "Python" bottom: "x0" top: "y" '
                   'python_param { module: "export_pylayer" layer: "Twice" } }', caffe_pb2.TEST)
    with pytest.raises(ExportError, match=r"layer 'twice' of type 'Python'.*Supported types: .*Convolution"):
        build_graph(net)


def test_train_phase_dropout_and_batch_statistics_are_refused():
    net = make_net('name: "t"' + _inputs_text([(2, 3)]) +
                   'layer { name: "drop" type: "Dropout" bottom: "x0" top: "y" }', caffe_pb2.TRAIN)
    with pytest.raises(ExportError, match="Dropout layer 'drop'.*TRAIN"):
        build_graph(net)
    net = make_net('name: "t"' + _inputs_text([(2, 3)]) +
                   'layer { name: "bn" type: "BatchNorm" bottom: "x0" top: "y" }', caffe_pb2.TRAIN)
    with pytest.raises(ExportError, match="BatchNorm layer 'bn'.*use_global_stats"):
        build_graph(net)


def test_convolution_on_another_axis_is_refused():
    net = make_net('name: "c"' + _inputs_text([(2, 3, 4, 5)]) +
                   'layer { name: "c" type: "Convolution" bottom: "x0" top: "y" '
                   'convolution_param { num_output: 2 kernel_size: 1 axis: 2 } }', caffe_pb2.TEST)
    with pytest.raises(ExportError, match="Convolution layer 'c'.*axis 1"):
        build_graph(net)


# ------------------------------------------------------------------------------ the CLI
DEPLOY = 'name: "tiny"' + _inputs_text([(1, 2, 5, 5)]) + (
    f'layer {{ name: "conv" type: "Convolution" bottom: "x0" top: "c" convolution_param {{ num_output: 3 '
    f'kernel_size: 3 {FILL} }} }}'
    'layer { name: "prob" type: "Softmax" bottom: "c" top: "prob" }')


def test_cli_writes_both_formats(tmp_path, capsys):
    model = write(tmp_path, "deploy.prototxt", DEPLOY)
    net = Net(model, caffe_pb2.TEST)
    net.save(tmp_path / "w.caffemodel")
    onnx_path, torch_base = tmp_path / "m.onnx", tmp_path / "m_torch"
    assert main(["export", "--model", model, "--weights", str(tmp_path / "w.caffemodel"),
                 "--format", "onnx", "--out", str(onnx_path)]) == 0
    assert main(["export", "-model", model, "-weights", str(tmp_path / "w.caffemodel"),
                 "-format=torch", "-out", str(torch_base)]) == 0
    assert f"wrote {torch_base}.pth" in capsys.readouterr().out
    x = np.random.default_rng(7).standard_normal((1, 2, 5, 5)).astype(np.float32)
    net.blobs["x0"].data[...] = x
    ref = net.forward()["prob"]
    model_proto = onnx.load(str(onnx_path))
    assert model_proto.opset_import[0].version >= 17
    assert {i.name for i in model_proto.graph.initializer} == {"conv_weight", "conv_bias"}
    _close(_session(model_proto).run(None, {"x0": x})[0], ref, "cli onnx")
    source = (tmp_path / "m_torch.py").read_text()
    imports = [ln for ln in source.splitlines() if ln.startswith(("import ", "from "))]
    assert imports == ["import torch", "import torch.nn.functional as F"]  # depends only on torch
    assert "# conv (Convolution)" in source and "class tiny(torch.nn.Module):" in source
    module = load_torch_module(f"{torch_base}.py")
    assert isinstance(module.conv_weight, torch.nn.Parameter)
    _close(module(torch.from_numpy(x)).detach().numpy(), ref, "cli torch")


@pytest.mark.parametrize("argv, message", [
    (["--weights", "missing.caffemodel", "--format", "onnx"], "missing.caffemodel: file not found"),
    (["--weights", "W", "--format", "tflite"], "unknown format 'tflite'"),
    (["--weights", "W", "--phase", "VAL"], "-phase must be TRAIN or TEST"),
])
def test_cli_errors_are_clear(argv, message, tmp_path, capsys):
    model = write(tmp_path, "deploy.prototxt", DEPLOY)
    Net(model, caffe_pb2.TEST).save(tmp_path / "W")
    argv = [str(tmp_path / a) if a == "W" else a for a in argv]
    assert main(["export", "--model", model, "--out", str(tmp_path / "o")] + argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("caffe export: error:")


def test_cli_names_the_layer_that_cannot_be_exported(tmp_path, capsys):
    model = write(tmp_path, "net.prototxt", 'name: "l"' + _inputs_text([(2, 3), (2,)]) +
                  'layer { name: "loss" type: "EuclideanLoss" bottom: "x0" bottom: "x0" top: "l" }')
    Net(model, caffe_pb2.TEST).save(tmp_path / "w")
    argv = ["export", "-model", model, "-weights", str(tmp_path / "w"), "-out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert "EuclideanLoss layer 'loss'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ the zoo
def _random_weights(net):
    """Weights that keep activations O(1) through deep nets: N(0, 1/fan_in), small biases,
    BatchNorm statistics with a scale factor != 1."""
    rng = np.random.default_rng(8)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            mean, var, factor = layer.blobs
            mean.data[...] = rng.standard_normal(mean.shape) * 0.1 * 3
            var.data[...] = rng.uniform(0.5, 1.5, var.shape) * 3
            factor.data[...] = 3
            continue
        for i, blob in enumerate(layer.blobs):
            if i == 0 and blob.num_axes > 1:
                fan_in = blob.count(1)
                blob.data[...] = rng.standard_normal(blob.shape) * np.sqrt(2.0 / fan_in)
            elif layer.type == "Scale" and i == 0:
                blob.data[...] = rng.uniform(0.5, 1.5, blob.shape)
            else:
                blob.data[...] = rng.standard_normal(blob.shape) * 0.1


def _zoo_net(name: str) -> Net:
    """A zoo net from ../shared/reference/zoo at batch 1, full width (about 20 s each on 2 cores)."""
    param = read_net_text(require_reference("zoo", f"{name}.prototxt"))
    for lp in param.layer:
        if lp.type == "Input":
            lp.input_param.shape[0].dim[0] = 1
    return Net(param, caffe_pb2.TEST)


@pytest.mark.parametrize("name", ["bvlc_reference_caffenet", "bvlc_googlenet", "resnet_50"])
def test_zoo_nets_export_exactly(name, tmp_path):
    net = _zoo_net(name)
    _random_weights(net)
    types = {layer.type for layer in net.layers}
    assert {"Convolution", "Pooling", "InnerProduct", "Softmax"} <= types
    check_exports(net, tmp_path, rtol=1e-5, atol=1e-6)


def test_cli_without_the_onnx_package_says_which_extra_to_install(tmp_path, capsys, monkeypatch):
    import sys

    model = write(tmp_path, "deploy.prototxt", DEPLOY)
    Net(model, caffe_pb2.TEST).save(tmp_path / "w")
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    argv = ["export", "-model", model, "-weights", str(tmp_path / "w"), "-out", str(tmp_path / "o.onnx")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "needs the 'onnx' package" in err and "recaffe[export]" in err
    assert not (tmp_path / "o.onnx").exists()
