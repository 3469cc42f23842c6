"""The published SSD deploy nets (../shared/reference/forks/models: MobileNet-SSD, OpenCV's res10
face detector, SSD300 VGG) build, run forward with random weights and export: ONNX (onnxruntime)
and the generated torch module against recaffe, on the heads (loc, conf, priors) and on the
detections."""
import numpy as np
import pytest
import torch

from conftest import require_reference
from recaffe.export import build_graph, load_torch_module, to_onnx, write_torch
from recaffe.io.netfiles import read_net_text
from recaffe.net import Net
from recaffe.proto import caffe_pb2
from test_export import _random_weights, _session

MODELS = ["mobilenet_ssd", "res10_face_ssd", "ssd300_vgg"]


@pytest.fixture(autouse=True)
def torch_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(4, threads))
    yield
    torch.set_num_threads(threads)


def _nets(name):
    """The deploy net with random weights, and the same net without its DetectionOutput (whose
    outputs are then the heads: loc, conf, priors)."""
    param = read_net_text(require_reference("forks", "models", f"{name}.prototxt"))
    net = Net(param, caffe_pb2.TEST)
    _random_weights(net)
    heads = caffe_pb2.NetParameter()
    heads.CopyFrom(param)
    del heads.layer[:]
    heads.layer.extend(lp for lp in param.layer if lp.type != "DetectionOutput")
    head_net = Net(heads, caffe_pb2.TEST)
    for lname, blobs in net.params.items():
        for i, b in enumerate(blobs):
            head_net.params[lname][i].data[...] = b.data
    x = np.random.default_rng(5).uniform(-1, 1, net.blobs["data"].shape).astype(np.float32)
    for n in (net, head_net):
        n.blobs["data"].data[...] = x
    return net, head_net, x


def _run_exports(net, x, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    graph = build_graph(net)
    onnx_out = _session(to_onnx(graph)).run(None, {"data": x})
    py, _ = write_torch(graph, tmp_path / "exported")
    with torch.no_grad():
        t = load_torch_module(py)(torch.from_numpy(x))
    t = t if isinstance(t, tuple) else (t,)
    return graph, onnx_out, [v.numpy() for v in t]


@pytest.mark.parametrize("name", MODELS)
def test_ssd_model_builds_runs_and_exports(name, tmp_path):
    net, head_net, x = _nets(name)
    types = {layer.type for layer in net.layers}
    assert {"PriorBox", "Permute", "DetectionOutput"} <= types
    det = net.forward()["detection_out"].copy()
    assert det.shape[:2] == (1, 1) and det.shape[3] == 7 and det.shape[2] >= 1
    rows = det[0, 0]
    assert np.all(np.diff(rows[:, 1]) >= 0)  # one image: labels ascending ...
    for label in np.unique(rows[:, 1]):      # ... then scores descending
        assert np.all(np.diff(rows[rows[:, 1] == label, 2]) <= 0)

    # the heads: every exported value within float tolerance
    heads = {k: v.copy() for k, v in head_net.forward().items()}
    graph, onnx_out, torch_out = _run_exports(head_net, x, tmp_path / "heads")
    assert len(heads) == 3
    for blob, o, t in zip(graph.output_blobs, onnx_out, torch_out):
        scale = np.abs(heads[blob]).max()
        np.testing.assert_allclose(o, heads[blob], rtol=1e-4, atol=1e-4 * scale, err_msg=f"onnx {blob}")
        np.testing.assert_allclose(t, heads[blob], rtol=1e-4, atol=1e-4 * scale, err_msg=f"torch {blob}")

    # the detections: the torch module runs recaffe's own code on the same kernels; onnxruntime
    # computes the convolutions differently but the decisions are far from the thresholds here
    _, onnx_out, torch_out = _run_exports(net, x, tmp_path / "full")
    np.testing.assert_allclose(torch_out[0], det, rtol=1e-5, atol=1e-6)
    assert onnx_out[0].shape == det.shape
    np.testing.assert_allclose(onnx_out[0], det, rtol=1e-3, atol=1e-4)
