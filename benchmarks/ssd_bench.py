"""MobileNet-SSD forward on CPU: recaffe against the same net as a plain PyTorch module.

    python benchmarks/ssd_bench.py [--iters 30] [--batch 1] [--threads N] [--model deploy.prototxt]

The net is chuanqi305's MobileNet-SSD deploy file (../shared/reference/forks/models/mobilenet_ssd.prototxt
by default) with random weights that keep activations O(1) (no trained weights offline; the number of
detections, and so DetectionOutput's NMS work, depends on them: the count is printed). The torch module
is what ``caffe export --format torch`` writes, loaded in the same process. Runs alternate between the
two in chunks to share the machine's noise; medians are reported, with DetectionOutput's share of each
forward (recaffe: the layer's own forward; torch module: its ``_ssd_detection_output`` call).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recaffe.export import build_graph, load_torch_module, write_torch  # noqa: E402
from recaffe.io.netfiles import read_net_text  # noqa: E402
from recaffe.net import Net  # noqa: E402
from recaffe.proto import caffe_pb2  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from lenet_bench import timed  # noqa: E402
DEFAULT_MODEL = os.path.join(HERE, "..", "..", "shared", "reference", "forks", "models", "mobilenet_ssd.prototxt")


def random_weights(net) -> None:
    """N(0, 2/fan_in) weights, small biases, unit BatchNorm statistics."""
    g = np.random.default_rng(8)
    for layer in net.layers:
        if layer.type == "BatchNorm":
            mean, var, factor = layer.blobs
            mean.data[...], var.data[...], factor.data[...] = 0, 1, 1
            continue
        for i, blob in enumerate(layer.blobs):
            if i == 0 and blob.num_axes > 1:
                blob.data[...] = g.standard_normal(blob.shape) * np.sqrt(2.0 / blob.count(1))
            else:
                blob.data[...] = g.standard_normal(blob.shape) * 0.1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    param = read_net_text(args.model)
    if param.layer and param.layer[0].type == "Input":
        param.layer[0].input_param.shape[0].dim[0] = args.batch
    elif len(param.input_shape):
        param.input_shape[0].dim[0] = args.batch
    net = Net(param, caffe_pb2.TEST)
    random_weights(net)
    x = np.random.default_rng(0).uniform(-1, 1, net.blobs["data"].shape).astype(np.float32)
    net.blobs["data"].data[...] = x
    (det_index,) = [i for i, layer in enumerate(net.layers) if layer.type == "DetectionOutput"]
    det_layer = net.layers[det_index]

    with tempfile.TemporaryDirectory() as tmp:
        py, _ = write_torch(build_graph(net), os.path.join(tmp, "mobilenet_ssd"))
        module = load_torch_module(py)
    helpers = type(module).forward.__globals__
    inner = helpers["_ssd_detection_output"]
    det_times: list[float] = []

    def timed_detection(*a, **kw):
        t = time.perf_counter()
        out = inner(*a, **kw)
        det_times.append(time.perf_counter() - t)
        return out

    helpers["_ssd_detection_output"] = timed_detection
    xt = torch.from_numpy(x)
    rc_det: list[float] = []

    def rc_forward():
        net.forward_from_to(0, det_index - 1)
        bottom = [net._blobs[i] for i in net.bottom_id_vecs[det_index]]
        top = [net._blobs[i] for i in net.top_id_vecs[det_index]]
        t = time.perf_counter()
        det_layer.run_forward(bottom, top)
        rc_det.append(time.perf_counter() - t)
        net.forward_from_to(det_index + 1, len(net.layers) - 1)

    def pt_forward():
        with torch.no_grad():
            module(xt)

    rc_forward()
    ref = net.blobs["detection_out"].data.copy()
    with torch.no_grad():
        out = module(xt).numpy()
    assert out.shape == ref.shape and np.allclose(out, ref, rtol=1e-4, atol=1e-5), "torch module differs"
    for fn in (rc_forward, pt_forward):
        timed(fn, 3)  # warm up
    rc_det.clear()
    det_times.clear()
    rc_t, pt_t = [], []
    for _ in range(max(1, args.iters // 5)):
        rc_t += timed(rc_forward, 5)
        pt_t += timed(pt_forward, 5)
    rc, pt = statistics.median(rc_t), statistics.median(pt_t)
    rd, pd = statistics.median(rc_det), statistics.median(det_times)
    rows = ref.shape[2] if ref[0, 0, 0, 1] != -1 else 0
    print(f"MobileNet-SSD 300x300, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{rows} detections, medians over {len(rc_t)} forwards")
    print(f"  recaffe Net.forward        {rc * 1e3:8.1f} ms   DetectionOutput {rd * 1e3:6.1f} ms ({rd / rc:5.1%})")
    print(f"  exported torch module      {pt * 1e3:8.1f} ms   DetectionOutput {pd * 1e3:6.1f} ms ({pd / pt:5.1%})")
    print(f"  ratio recaffe / torch      {rc / pt:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
