"""Zoo nets' forward pass: recaffe against the plain PyTorch module of the same net (the one
``caffe export --format torch`` writes), in the same process, on a GPU or the CPU.

    python benchmarks/zoo_gpu_bench.py [--device cuda] [--batch 32] [--iters 20] [--nets a,b]

The nets are the published deploy prototxts in ../shared/reference/zoo/ (RECAFFE_SHARED
overrides ../shared), with random weights. Each timing is the median of ``--iters`` forward passes
after warm-up, synchronized on CUDA; runs of the two alternate. If the installed ``caffe`` has
a ``-compile`` flag (the compiled fast path), ``caffe time -compile`` is timed against plain
``caffe time`` for each net too; otherwise that column says so. Exits 1 when a net fails to run.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import recaffe  # noqa: E402
from recaffe.export import load_torch_module  # noqa: E402
from recaffe.export.torch_export import export_torch  # noqa: E402
from recaffe.net import TEST, Net  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("RECAFFE_SHARED", os.path.join(HERE, "..", "..", "shared"))
ZOO = os.path.join(SHARED, "reference", "zoo")
NETS = ("bvlc_alexnet", "bvlc_googlenet", "squeezenet_v1.1", "mobilenet_v2", "resnet_50")


def build(prototxt: str, batch: int, device: str, seed: int = 0) -> Net:
    if device == "cuda":
        recaffe.set_mode_gpu()
    else:
        recaffe.set_mode_cpu()
    try:
        net = Net(prototxt, TEST)
    finally:
        recaffe.set_mode_cpu()
    for name in net.inputs:
        net.blobs[name].reshape((batch, *net.blobs[name].shape[1:]))
    net.reshape()
    g = np.random.default_rng(seed)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = g.normal(0, 0.01, b.shape)
    return net


def timed(fn, sync, iters):
    out = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def compile_flag_available() -> bool:
    from recaffe.cli.main import _flags
    return "compile" in _flags().flags


def caffe_time_ms(prototxt: str, device: str, iters: int, extra: list[str]) -> float:
    """Average Forward pass of `caffe time` (TEST phase), in ms."""
    cmd = [sys.executable, "-m", "recaffe.cli.main", "time", f"-model={prototxt}", "-phase=TEST",
           f"-iterations={iters}"] + (["-gpu=0"] if device == "cuda" else []) + extra
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, GLOG_minloglevel="0"))
    m = re.search(r"Average Forward pass: ([0-9.e+-]+) ms", r.stderr)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return float(m.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--nets", default=",".join(NETS), help="comma-separated names in the zoo folder")
    ap.add_argument("--no-compile", action="store_true", help="skip the caffe time -compile column")
    args = ap.parse_args(argv)
    if not os.path.isdir(ZOO):
        print(f"zoo nets not found in {ZOO} (set RECAFFE_SHARED)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available to torch", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with_compile = not args.no_compile and compile_flag_available()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"Zoo forward pass, batch {args.batch}, {name}, torch {torch.__version__}, median of {args.iters}")
    print(f"{'net':18s} {'recaffe':>10s} {'PyTorch':>10s} {'ratio':>7s}  {'caffe time -compile / eager':>28s}")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for net_name in args.nets.split(","):
            prototxt = os.path.join(ZOO, net_name + ".prototxt")
            try:
                cpu_net = build(prototxt, 1, "cpu")
                py, _ = export_torch(cpu_net, os.path.join(tmp, net_name.replace(".", "_")))
                module = load_torch_module(py).to(args.device)
                net = build(prototxt, args.batch, args.device)
                g = np.random.default_rng(1)
                xs = [torch.as_tensor(g.standard_normal(net.blobs[n].shape), dtype=torch.float32,
                                      device=args.device) for n in net.inputs]
                for n, x in zip(net.inputs, xs):
                    net.blobs[n].data_t.copy_(x)

                def rc():
                    net.forward()

                def pt():
                    with torch.no_grad():
                        module(*xs)

                for fn in (rc, pt):
                    timed(fn, sync, 2)
                rc_t, pt_t = [], []
                for _ in range(max(1, args.iters // 5)):
                    rc_t += timed(rc, sync, 5)
                    pt_t += timed(pt, sync, 5)
                a, b = statistics.median(rc_t), statistics.median(pt_t)
                extra = "no -compile flag"
                if with_compile:
                    c = caffe_time_ms(prototxt, args.device, 5, ["-compile"])
                    e = caffe_time_ms(prototxt, args.device, 5, [])
                    extra = f"{c:.2f} / {e:.2f} ms (batch of the prototxt)"
                print(f"{net_name:18s} {a * 1e3:8.2f}ms {b * 1e3:8.2f}ms {a / b:6.2f}x  {extra:>28s}")
            except Exception as e:  # noqa: BLE001 - report the net and go on with the others
                failed = True
                print(f"{net_name:18s} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            finally:
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
