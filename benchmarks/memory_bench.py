"""Peak memory of forward+backward on the zoo nets: recaffe against the plain torch module.

    python benchmarks/memory_bench.py [--nets squeezenet_v1.1,...] [--batch 10] [--iters 3] [--detail]
                                      [--no-slack]

Each variant runs alone in a child process (compile_bench's workloads): the zoo deploy net
(../shared/reference/zoo) at ``--batch`` with force_backward, ``--iters`` forward+backward
iterations (recaffe: Net.forward_loss, the output's diff set, Net.backward_from_to; torch: the
module ``caffe export --format torch`` emits, forward then backward from the same output gradient,
input and params requiring grad). Both children import the same modules (torch, numpy, recaffe)
and read the same input and output-gradient arrays, then note their RSS (the baseline) before
building anything; the figure is the child's peak RSS (VmHWM; not ``ru_maxrss``, which a child
inherits from a bigger parent) minus that baseline, so it counts the weights, the activations,
the gradients and the allocator's slack, as "peak RSS above the process baseline" does for
``caffe time``. No tracemalloc (it does not see torch's memory).

A third child runs recaffe's ``caffe time`` on the deploy prototxt as it is (no force_backward:
every layer's forward, then every layer's backward with the net's propagate_down flags, i.e.
param gradients only), the workload BVLC Caffe's figures were measured on.

Printed: the RSS of ``import torch`` and ``import caffe`` alone (clean children), then per net
the peak above baseline for recaffe and the torch module (fwd+bwd), their ratio, recaffe's
``caffe time`` peak, the figure BVLC Caffe measured (issue 13, ``caffe time``, same prototxts,
CPU) where the batch matches, and their ratio.
``--detail`` adds, for recaffe, what the net holds after its last backward (tensors reachable
from blobs and layers, each storage counted once): blob data, blob diffs, params, and the
tensors layers keep between forward and backward. ``--no-slack`` runs both children again with
glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): every large tensor is then
mapped on allocation and returned on free, so the peak shows live memory without the heap's
fragmentation (and runs about twice as slow: every page is faulted in again at every allocation).
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile

os.environ.setdefault("GLOG_minloglevel", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from google.protobuf import text_format  # noqa: E402

from compile_bench import (ZOO, child_report, net_param_at_batch, recaffe_fwd_bwd, status_kb,  # noqa: E402
                           torch_fwd_bwd, zoo_arrays, zoo_net)

# BVLC Caffe, `caffe time` on the same prototxts (CPU): peak RSS above the process baseline, MB,
# as issue 13 gives them: {net: (batch, MB)}
CAFFE = {"squeezenet_v1.1": (10, 418), "bvlc_googlenet": (10, 859), "resnet_50": (1, 600)}


# ------------------------------------------------------------------------------ children
def child_import(what: str) -> int:
    __import__(what)
    print("rss_kb", status_kb("VmRSS"))
    return 0


def census(net) -> dict[str, int]:
    """Bytes of the tensors ``net`` holds, by kind; a storage is counted once (first kind wins)."""
    seen: dict[int, tuple[str, int]] = {}

    def add(t, kind):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            if st.nbytes() and st.data_ptr() not in seen:
                seen[st.data_ptr()] = (kind, st.nbytes())

    for layer in net.layers:
        for b in layer.blobs:
            add(b._data.tensor, "params")
            add(b._diff.tensor, "params")
    for b in net._blobs:
        add(b._data.tensor, "blob data")
    for b in net._blobs:
        add(b._diff.tensor, "blob diffs")
    for layer in net.layers:
        for value in vars(layer).values():
            add(value, f"kept by {layer.type}")
    out: dict[str, int] = collections.Counter()
    for kind, n in seen.values():
        out[kind] += n
    return dict(out)


def child_run(variant: str, name: str, batch: int, iters: int, folder: str, detail: bool) -> int:
    x, dy = np.load(os.path.join(folder, "x.npy")), np.load(os.path.join(folder, "dy.npy"))
    base = status_kb("VmRSS")
    if variant == "torch":
        from recaffe.export.torch_export import load_torch_module
        net, fn = None, torch_fwd_bwd(load_torch_module(os.path.join(folder, "m.py")), x, dy)
    elif variant == "time":
        from recaffe.cli.main import main as caffe_main
        net = None

        def fn():  # one call runs them all: its first forward+backward, then `iters` timed ones
            caffe_main(["time", "-model", os.path.join(folder, "deploy.prototxt"), "-iterations", str(iters)])
    else:
        net = zoo_net(name, batch)
        fn = recaffe_fwd_bwd(net, x, dy)
    for _ in range(1 if variant == "time" else iters):
        fn()
    print("baseline_kb", base)
    print("maxrss_kb", status_kb("VmHWM"))
    print("end_kb", status_kb("VmRSS"))
    if detail and net is not None:
        for kind, n in census(net).items():
            print(f"held:{kind.replace(' ', '_')}", n)
    return 0


# ------------------------------------------------------------------------------ parent
def prepare(name: str, batch: int, folder: str) -> None:
    """The arrays both children read, and the exported torch module."""
    from recaffe.export.torch_export import export_torch
    net = zoo_net(name, batch)
    x, dy = zoo_arrays(net)
    np.save(os.path.join(folder, "x.npy"), x)
    np.save(os.path.join(folder, "dy.npy"), dy)
    export_torch(net, os.path.join(folder, "m"))
    param = net_param_at_batch(name, batch)  # `caffe time`'s: the deploy net as it is
    with open(os.path.join(folder, "deploy.prototxt"), "w") as f:
        f.write(text_format.MessageToString(param))


NO_SLACK = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")


def measure(variant: str, name: str, batch: int, iters: int, folder: str, detail: bool,
            env: dict | None = None) -> dict:
    report = child_report([sys.executable, __file__, "--child", variant, name, str(batch), str(iters),
                           folder] + (["--detail"] if detail else []), env)
    if "maxrss_kb" not in report:
        return {"peak": float("nan"), "held": {}}
    base = int(report["baseline_kb"])
    held = {k[5:].replace("_", " "): int(v) / 2**20 for k, v in report.items() if k.startswith("held:")}
    return {"peak": (int(report["maxrss_kb"]) - base) / 1024, "end": (int(report["end_kb"]) - base) / 1024,
            "held": held}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-import"]:
        return child_import(argv[1])
    if argv[:1] == ["--child"]:
        return child_run(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5], "--detail" in argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(ZOO + ["bvlc_alexnet", "squeezenet_v1.0"]))
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--iters", type=int, default=3, help="forward+backward iterations per child")
    ap.add_argument("--detail", action="store_true", help="what recaffe's net holds after backward")
    ap.add_argument("--no-slack", action="store_true", help="also measure with a fixed mmap threshold")
    args = ap.parse_args(argv)
    imports = {w: float(child_report([sys.executable, __file__, "--child-import", w]).get("rss_kb", "nan")) / 1024
               for w in ("torch", "caffe")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.iters} forward+backward iterations per child")
    print(f"import baseline RSS: import torch {imports['torch']:.0f} MiB, import caffe {imports['caffe']:.0f} MiB")
    print("peak RSS above the baseline, MiB (Caffe: MB as the issue gives them)")
    print("  fwd+bwd: every blob's gradient (force_backward), recaffe against the torch module")
    print("  caffe time: the deploy net as it is, `caffe time` (param gradients only), recaffe against Caffe")
    print(f"{'':24s} {'fwd+bwd':>26s} {'caffe time':>27s}")
    print(f"{'net':24s} {'recaffe':>8s} {'torch':>8s} {'r/torch':>8s} {'recaffe':>8s} {'Caffe':>8s} "
          f"{'r/Caffe':>8s}" + (f" {'no slack: recaffe':>18s} {'torch':>8s}" if args.no_slack else ""))
    for name in args.nets.split(","):
        folder = tempfile.mkdtemp(prefix="memory_bench_")
        try:
            prepare(name, args.batch, folder)
            r = measure("recaffe", name, args.batch, args.iters, folder, args.detail)
            t = measure("torch", name, args.batch, args.iters, folder, False)
            c = measure("time", name, args.batch, args.iters, folder, False)
            if args.no_slack:
                r["tight"] = measure("recaffe", name, args.batch, args.iters, folder, False, NO_SLACK)["peak"]
                t["tight"] = measure("torch", name, args.batch, args.iters, folder, False, NO_SLACK)["peak"]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        batch, caffe = CAFFE.get(name, (None, None))
        caffe_s = f"{caffe:8d} {c['peak'] / caffe:7.2f}x" if batch == args.batch else f"{'-':>8s} {'-':>8s}"
        tight = f" {r['tight']:18.0f} {t['tight']:8.0f}" if args.no_slack else ""
        print(f"{name:24s} {r['peak']:8.0f} {t['peak']:8.0f} {r['peak'] / t['peak']:7.2f}x "
              f"{c['peak']:8.0f} {caffe_s}{tight}", flush=True)
        if r["held"]:
            print("    recaffe holds after backward: " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(r["held"].items(), key=lambda kv: -kv[1])) +
                f" (total {sum(r['held'].values()):.1f}; RSS at the end {r['end']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
