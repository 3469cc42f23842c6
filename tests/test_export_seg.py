"""caffe export of the segmentation forks' layers (export/segmentation_ops.py): Interp, both
Upsample forms (with the MAX Pooling mask top SegNet feeds them), both BN forms, through ONNX
(onnxruntime) and the generated PyTorch module against recaffe's own forward; and the refusals."""
import numpy as np
import pytest

from helpers import make_net
from recaffe.export import ExportError, build_graph
from recaffe.export.lowering import LOWERINGS
from recaffe.proto import caffe_pb2
from test_export import L, _inputs_text, check_exports, one_torch_thread  # noqa: F401  (fixture)

TEST = caffe_pb2.TEST


def _net(shapes, layers, phase=TEST):
    return make_net(_inputs_text(shapes) + layers, phase)


@pytest.mark.parametrize("params, shape", [
    ("zoom_factor: 2", (2, 3, 4, 5)),
    ("shrink_factor: 2", (1, 2, 9, 8)),
    ("shrink_factor: 2 zoom_factor: 3", (1, 2, 9, 7)),
    ("height: 11 width: 7", (1, 2, 5, 6)),
    ("zoom_factor: 8 pad_beg: -1 pad_end: -1", (1, 2, 5, 6)),
    ("zoom_factor: 2 pad_end: -1", (1, 1, 6, 5)),
    ("height: 1 width: 4", (1, 2, 5, 6)),
    ("height: 4 width: 5 pad_beg: -1", (1, 1, 5, 6)),  # crop only
])
def test_interp_exports(params, shape, tmp_path):
    net = _net([shape], L("Interp", f"interp_param {{ {params} }}"))
    check_exports(net, tmp_path)


@pytest.mark.parametrize("scale", [2, 3])
def test_nearest_upsample_exports(scale, tmp_path):
    net = _net([(1, 3, 4, 5)], L("Upsample", f"upsample_param {{ scale: {scale} }}"))
    check_exports(net, tmp_path)


@pytest.mark.parametrize("shape, pool, up", [
    ((2, 3, 8, 8), "kernel_size: 2 stride: 2", "scale: 2"),
    ((1, 2, 7, 9), "kernel_size: 2 stride: 2", "upsample_h: 7 upsample_w: 9"),
    ((1, 2, 7, 8), "kernel_size: 2 stride: 2", "scale: 2 pad_out_h: true"),
    ((1, 2, 9, 9), "kernel_size: 3 stride: 3 pad: 1", "upsample_h: 9 upsample_w: 9"),
])
def test_segnet_unpooling_exports_with_the_pooling_mask(shape, pool, up, tmp_path):
    layers = (L("Pooling", f"pooling_param {{ pool: MAX {pool} }}", top=("p", "mask"), name="pool")
              + L("Upsample", f"upsample_param {{ {up} }}", bottom=("p", "mask"), top=("y",))
              + L("Pooling", f"pooling_param {{ pool: MAX {pool} }}", top=("p2", "mask2"), name="pool2"))
    net = _net([shape], layers)
    graph = check_exports(net, tmp_path)
    assert set(graph.output_blobs) == {"y", "p2", "mask2"}  # the mask itself is exported exactly


def _bn_stats(net):
    rng = np.random.default_rng(5)
    for layer in net.layers:
        if layer.type == "BN":
            for i, b in enumerate(layer.blobs):
                b.data[...] = rng.uniform(0.5, 1.5, b.shape) if i in (0, 3) else rng.standard_normal(b.shape)


@pytest.mark.parametrize("params, phase", [
    ("bn_param { bn_mode: INFERENCE }", caffe_pb2.TRAIN),
    ("bn_param { frozen: true eps: 1e-5 }", caffe_pb2.TRAIN),
    ("bn_param { slope_filler { value: 1 } momentum: 0.95 }", TEST),
])
def test_bn_exports(params, phase, tmp_path):
    net = _net([(2, 3, 4, 5)], L("BN", params), phase)
    _bn_stats(net)
    check_exports(net, tmp_path)


@pytest.mark.parametrize("layers, shapes, phase, match", [
    (L("BN", "bn_param { bn_mode: LEARN }"), [(1, 2, 3, 3)], TEST, "bn_mode LEARN normalizes"),
    (L("BN", "bn_param { frozen: false eps: 1e-5 }"), [(1, 2, 3, 3)], caffe_pb2.TRAIN, "TRAIN phase"),
    (L("SegAccuracy", "", bottom=("x0", "x1"), top=("acc",)), [(1, 2, 3, 3), (1, 1, 3, 3)], TEST,
     "SegAccuracy scores predictions"),
    (L("Interp", "interp_param { zoom_factor: 2 }", top=("z",))
     + L("MatWrite", 'mat_write_param { prefix: "/tmp/x" }', bottom=("z",), top=()), [(1, 2, 3, 3)], TEST,
     "MatWrite writes MATLAB files"),
])
def test_refusals_name_the_layer_and_say_why(layers, shapes, phase, match):
    net = _net(shapes, layers, phase)
    with pytest.raises(ExportError, match=match) as info:
        build_graph(net)
    assert "layer '" in str(info.value)


def test_every_type_of_segmentation_ops_is_checked_here():
    import pathlib
    ours = {t for t, fn in LOWERINGS.items() if fn.__module__ == "recaffe.export.segmentation_ops"}
    assert ours == {"Interp", "Upsample", "BN", "Pooling"}
    text = pathlib.Path(__file__).read_text()
    assert all(f'L("{t}"' in text for t in ours)
