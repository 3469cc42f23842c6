"""caffe export of SSD's layers (Permute, Normalize, PriorBox, DetectionOutput): ONNX through
onnxruntime and the generated torch module against recaffe's forward; what cannot be exported."""
import numpy as np
import pytest
import torch

from helpers import make_net
from recaffe.export import ExportError, build_graph, load_torch_module, to_onnx, write_torch
from test_export import L, _inputs_text, _session, check_exports

NORM_FILL = 'scale_filler { type: "uniform" min: 0.5 max: 2 }'


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(layers, shapes):
    return make_net('name: "t"\n' + _inputs_text(shapes) + layers)


@pytest.mark.parametrize("layers, shapes", [
    (L("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }"), ((2, 3, 4, 5),)),
    (L("Permute", "permute_param { order: 2 }"), ((2, 3, 4),)),
    (L("Permute", "permute_param { order: 0 order: 1 }"), ((2, 3, 4),)),  # identity: an alias
    (L("Normalize", f"norm_param {{ {NORM_FILL} }}"), ((2, 3, 4, 5),)),
    (L("Normalize", f"norm_param {{ across_spatial: false channel_shared: false {NORM_FILL} }}"), ((2, 3, 4, 5),)),
    (L("PriorBox", "prior_box_param { min_size: 8 max_size: 16 aspect_ratio: 2 aspect_ratio: 3 clip: true "
                   "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 }", bottom=("x0", "x1")),
     ((1, 2, 3, 4), (1, 3, 24, 32))),
])
def test_ssd_layers_export(layers, shapes, tmp_path):
    check_exports(_net(layers, shapes), tmp_path)


def _detection_feed(n, p, num_classes, share=True, seed=0):
    g = np.random.default_rng(seed)
    centers, sizes = g.uniform(0.2, 0.8, (p, 2)), g.uniform(0.1, 0.4, (p, 2))
    prior = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
    prior = np.stack([prior.reshape(-1), np.tile([0.1, 0.1, 0.2, 0.2], p)])[None]
    loc = g.normal(0, 0.3, (n, p * (1 if share else num_classes) * 4))
    logits = g.normal(0, 2, (n, p, num_classes))
    conf = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(n, -1)
    return {"x0": loc, "x1": conf, "x2": prior}


@pytest.mark.parametrize("params, share", [
    ("code_type: CENTER_SIZE keep_top_k: 12 confidence_threshold: 0.1 nms_param { nms_threshold: 0.45 top_k: 10 }",
     True),
    ("share_location: false code_type: CORNER_SIZE confidence_threshold: 0.05 nms_param { nms_threshold: 0.3 }",
     False),
    ("code_type: CORNER background_label_id: 2 keep_top_k: 30 nms_param { nms_threshold: 0.5 top_k: 7 }", True),
    ("code_type: CENTER_SIZE normalized_bbox: false clip: true confidence_threshold: 0.2 "
     "nms_param { nms_threshold: 0.45 }", True),
    ("code_type: CENTER_SIZE confidence_threshold: 0.999 nms_param { nms_threshold: 0.45 }", True),  # nothing found
])
def test_detection_output_export(params, share, tmp_path):
    n, p, c = 2, 40, 4
    feed = _detection_feed(n, p, c, share)
    layers = L("DetectionOutput", f"detection_output_param {{ num_classes: {c} {params} }}",
               bottom=("x0", "x1", "x2"))
    net = _net(layers, [v.shape for v in feed.values()])
    check_exports(net, tmp_path, feed=feed)


def test_mobilenet_like_head_exports_through_priorbox_and_permute(tmp_path):
    """A tiny SSD head: conv -> permute -> flatten for loc and conf, PriorBox, softmax, DetectionOutput."""
    fill = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 }'
    layers = (
        L("Convolution", f"convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 {fill} }}", top=("loc",)) +
        L("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }", bottom=("loc",), top=("locp",)) +
        L("Flatten", "", bottom=("locp",), top=("locf",)) +
        L("Convolution", f"convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 {fill} }}", top=("conf",)) +
        L("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }", bottom=("conf",), top=("confp",)) +
        L("Flatten", "", bottom=("confp",), top=("conff",)) +
        L("Reshape", "reshape_param { shape { dim: 0 dim: -1 dim: 3 } }", bottom=("conff",), top=("confr",)) +
        L("Softmax", "softmax_param { axis: 2 }", bottom=("confr",), top=("confs",)) +
        L("Flatten", "", bottom=("confs",), top=("confsf",)) +
        L("PriorBox", "prior_box_param { min_size: 10 aspect_ratio: 2 flip: false variance: 0.1 variance: 0.1 "
                      "variance: 0.2 variance: 0.2 }", bottom=("x0", "x1"), top=("prior",)) +
        L("DetectionOutput", "detection_output_param { num_classes: 3 code_type: CENTER_SIZE keep_top_k: 20 "
                             "confidence_threshold: 0.2 nms_param { nms_threshold: 0.45 top_k: 30 } }",
          bottom=("locf", "confsf", "prior"), top=("det",)))
    net = _net(layers, [(2, 4, 5, 6), (2, 3, 40, 48)])
    graph = check_exports(net, tmp_path)
    assert {n.type for n in graph.nodes} >= {"Permute", "PriorBox", "DetectionOutput"}


def test_adaptive_nms_is_exported_to_torch_but_not_onnx(tmp_path):
    feed = _detection_feed(2, 40, 4)
    layers = L("DetectionOutput", "detection_output_param { num_classes: 4 code_type: CENTER_SIZE "
                                  "nms_param { nms_threshold: 0.7 eta: 0.8 } }", bottom=("x0", "x1", "x2"))
    net = _net(layers, [v.shape for v in feed.values()])
    for k, v in feed.items():
        net.blobs[k].data[...] = v
    ref = net.forward()["y"].copy()
    graph = build_graph(net)
    with pytest.raises(ValueError, match="DetectionOutput layer 'y'.*eta 0.8.*no ONNX equivalent"):
        to_onnx(graph)
    py, _ = write_torch(graph, tmp_path / "m")
    with torch.no_grad():
        out = load_torch_module(py)(*[torch.from_numpy(feed[k]).float() for k in ("x0", "x1", "x2")])
    np.testing.assert_array_equal(out.numpy(), ref)


def test_save_output_is_not_exported(tmp_path):
    feed = _detection_feed(1, 10, 3)
    (tmp_path / "labels.prototxt").write_text('item { name: "a" label: 1 } item { name: "b" label: 2 }')
    (tmp_path / "sizes.txt").write_text("im 10 10\n")
    layers = L("DetectionOutput", "detection_output_param { num_classes: 3 save_output_param { "
                                  f'output_directory: "{tmp_path}/o" output_format: "VOC" '
                                  f'label_map_file: "{tmp_path}/labels.prototxt" '
                                  f'name_size_file: "{tmp_path}/sizes.txt" }} }}', bottom=("x0", "x1", "x2"))
    net = _net(layers, [v.shape for v in feed.values()])
    with pytest.raises(ExportError, match="DetectionOutput layer 'y': save_output_param writes result files"):
        build_graph(net)


def test_onnx_detection_output_declares_a_dynamic_row_count():
    feed = _detection_feed(1, 10, 3)
    layers = L("DetectionOutput", "detection_output_param { num_classes: 3 }", bottom=("x0", "x1", "x2"))
    model = to_onnx(build_graph(_net(layers, [v.shape for v in feed.values()])))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [1, 1, "y_rows", 7]
    out = _session(model).run(None, {k: v.astype(np.float32) for k, v in feed.items()})[0]
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7


def test_ssd_training_layers_are_refused_with_the_reason():
    layers = L("SmoothL1Loss", "", bottom=("x0", "x1"))
    with pytest.raises(ExportError, match="SmoothL1Loss layer 'y': SmoothL1Loss is a training loss"):
        build_graph(_net(layers, [(2, 3), (2, 3)]))


def test_opencv_faster_rcnn_form_priors_without_variances(tmp_path):
    """OpenCV's Faster R-CNN nets feed DetectionOutput proposals [1, 1, P*4] in pixels (no variance
    channel), share_location false, variance_encoded_in_target, normalized_bbox false."""
    g = np.random.default_rng(3)
    p, c = 12, 3
    xy = g.uniform(0, 150, (p, 2))
    prior = np.concatenate([xy, xy + g.uniform(20, 60, (p, 2))], 1).reshape(1, 1, -1)
    loc = g.normal(0, 0.2, (1, p * c * 4))
    logits = g.normal(0, 2, (p, c))
    conf = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).reshape(1, -1)
    layers = L("DetectionOutput", "detection_output_param { num_classes: 3 share_location: false "
                                  "code_type: CENTER_SIZE variance_encoded_in_target: true normalized_bbox: false "
                                  "keep_top_k: 10 nms_param { nms_threshold: 0.3 } }", bottom=("x0", "x1", "x2"))
    net = _net(layers, [loc.shape, conf.shape, prior.shape])
    feed = {"x0": loc, "x1": conf, "x2": prior}
    check_exports(net, tmp_path, feed=feed)
    rows = net.blobs["y"].data[0, 0]
    assert rows.shape == (10, 7) and set(rows[:, 1]) <= {1, 2}
