"""The compiled fast path against eager recaffe and plain PyTorch, in one process.

    python benchmarks/compile_bench.py [--nets lenet,squeezenet_v1.1,...] [--iters 20] [--batch N]
                                       [--threads N] [--no-memory]

Per net:

* ``lenet``: a full training iteration (solver.step(1): clear diffs, forward, backward, SGD update
  with momentum and weight decay) at batch 64, against the same work in plain PyTorch (zero_grad,
  forward, backward, torch.optim.SGD.step, loss.item());
* the zoo nets (../shared/reference/zoo, deploy nets at batch 1 with force_backward): one forward
  and one backward of the whole net, against the module ``caffe export --format torch`` emits
  (forward, then backward from a random gradient on the output, input and params requiring grad).

Columns: eager recaffe, compiled recaffe (``set_compile("auto")``: each segment measured eagerly
and compiled at its first calls, then the faster kept; how many segments ended compiled), plain
torch eager, the ratios compiled/eager and compiled/torch (< 1: compiled is faster), the compile
time of the first run, and peak memory (peak RSS, VmHWM, of a child process running the variant
alone).
Timed calls alternate between the variants in chunks to share the machine's noise; medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from lenet_bench import TorchLeNet, recaffe_solver, timed  # noqa: E402
from recaffe.io.netfiles import read_net_text  # noqa: E402
from recaffe.net import Net  # noqa: E402
from recaffe.proto import caffe_pb2  # noqa: E402

ZOO_DIR = os.path.join(HERE, "..", "..", "shared", "reference", "zoo")
ZOO = ["squeezenet_v1.1", "mobilenet_v1", "mobilenet_v2", "resnet_50", "bvlc_reference_caffenet",
       "bvlc_googlenet"]
VARIANTS = ("eager", "compiled", "torch")


# ------------------------------------------------------------------------------ the workloads
def lenet(variant: str, batch: int):
    """A zero-argument function running one training iteration of ``variant``."""
    g = np.random.default_rng(0)
    data = g.random((batch, 1, 28, 28), dtype=np.float32)
    labels = g.integers(0, 10, batch)
    if variant == "torch":
        model = TorchLeNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
        x, y = torch.from_numpy(data), torch.from_numpy(labels)

        def step():
            opt.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            loss.item()
        return step, None
    solver = recaffe_solver(batch)
    if variant == "compiled":
        solver.net.set_compile("auto")
    solver.net.blobs["data"].data[...] = data
    solver.net.blobs["label"].data[...] = labels
    return (lambda: solver.step(1)), solver.net


def net_param_at_batch(name: str, batch: int) -> caffe_pb2.NetParameter:
    """A zoo deploy net's parameter with its input at batch ``batch``."""
    param = read_net_text(os.path.join(ZOO_DIR, name + ".prototxt"))
    for lp in param.layer:
        if lp.type == "Input":
            lp.input_param.shape[0].dim[0] = batch
    del param.input_dim[:1]
    if len(param.input_dim):
        param.input_dim.insert(0, batch)
    for s in param.input_shape:
        s.dim[0] = batch
    return param


def zoo_net(name: str, batch: int) -> Net:
    """A zoo deploy net at batch ``batch``, with force_backward (every blob gets a diff)."""
    param = net_param_at_batch(name, batch)
    param.force_backward = True
    return Net(param, caffe_pb2.TEST)


def zoo_arrays(net: Net) -> tuple[np.ndarray, np.ndarray]:
    """The input and the output's gradient fed to every variant (seeded)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(net.blobs[net.inputs[0]].shape).astype(np.float32)
    dy = rng.standard_normal(net.blobs[net.outputs[0]].shape).astype(np.float32)
    return x, dy


def torch_fwd_bwd(module: torch.nn.Module, x: np.ndarray, dy: np.ndarray):
    """One forward and backward of an exported module (input and params requiring grad)."""
    xt = torch.from_numpy(x).requires_grad_(True)
    dyt = torch.from_numpy(dy)

    def fwd_bwd():
        module.zero_grad(set_to_none=False)
        y = module(xt)
        y = y[0] if isinstance(y, tuple) else y
        y.reshape(dyt.shape).backward(dyt)
    return fwd_bwd


def recaffe_fwd_bwd(net: Net, x: np.ndarray, dy: np.ndarray):
    """One forward and backward of the whole net, the output's diff set to ``dy``."""
    net.blobs[net.inputs[0]].data[...] = x
    out = net.outputs[0]

    def fwd_bwd():
        net.clear_param_diffs()
        net.forward_loss()
        net.blobs[out].diff[...] = dy
        net.backward_from_to()
    return fwd_bwd


def zoo(name: str, variant: str, batch: int):
    net = zoo_net(name, batch)
    x, dy = zoo_arrays(net)
    if variant == "torch":
        from recaffe.export.torch_export import export_torch, load_torch_module
        tmp = tempfile.mkdtemp()
        py, _ = export_torch(net, os.path.join(tmp, "m"))
        return torch_fwd_bwd(load_torch_module(py), x, dy), None
    if variant == "compiled":
        net.set_compile("auto")
    return recaffe_fwd_bwd(net, x, dy), net


def workload(name: str, variant: str, batch: int | None):
    if name == "lenet":
        return lenet(variant, batch or 64)
    return zoo(name, variant, batch or 1)


# ------------------------------------------------------------------------------ measuring
def settle(fn, net) -> float:
    """Run ``fn`` until every compiled segment has made its choice and the whole-pass check is done;
    the seconds spent compiling."""
    for _ in range(80):
        fn()
        if net is None or net.fastpath is None or net.fastpath.settled:
            break
    return sum(s["compile_s"] for s in net.fastpath.summary()) if net is not None and net.fastpath else 0.0


def child_report(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, str]:
    """Run ``cmd`` (a child process) and collect its ``key value`` report lines (``maxrss_kb``: its
    max RSS); a child that failed reports nothing, and its stderr's tail is printed."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env or os.environ)
    if out.returncode:
        print(f"child {cmd[2:]} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return {}
    return dict(ln.split(" ", 1) for ln in out.stdout.splitlines() if " " in ln)


def peak_memory(name: str, variant: str, batch: int | None) -> float:
    """Max RSS (MiB) of a child process that builds and runs the variant alone."""
    report = child_report([sys.executable, __file__, "--child", name, variant, str(batch or 0)])
    return float(report["maxrss_kb"]) / 1024 if "maxrss_kb" in report else float("nan")


def status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now; VmHWM: its peak), kB.

    (Not ``ru_maxrss``: a child started by a bigger parent inherits the parent's RSS there, since
    Linux keeps the larger of the old and new address spaces' peaks across exec.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(name: str, variant: str, batch: int) -> int:
    fn, net = workload(name, variant, batch or None)
    settle(fn, net)
    timed(fn, 3)
    print("maxrss_kb", status_kb("VmHWM"))
    return 0


def bench(name: str, iters: int, batch: int | None, memory: bool) -> dict:
    fns, nets = {}, {}
    for v in VARIANTS:
        fns[v], nets[v] = workload(name, v, batch)
    t = time.perf_counter()
    compile_s = settle(fns["compiled"], nets["compiled"])
    settle_s = time.perf_counter() - t
    summary = nets["compiled"].fastpath.summary()
    for v in ("eager", "torch"):
        timed(fns[v], 2)
    times = {v: [] for v in VARIANTS}
    for _ in range(max(1, iters // 5)):
        for v in VARIANTS:
            times[v] += timed(fns[v], 5)
    med = {v: statistics.median(t) for v, t in times.items()}
    mem = {v: peak_memory(name, v, batch) for v in VARIANTS} if memory else {}
    return {"med": med, "compile_s": compile_s, "settle_s": settle_s, "mem": mem,
            "compiled_segments": sum(s["choice"] == "compiled" for s in summary), "segments": len(summary)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2], int(argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(["lenet"] + ZOO))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=0, help="0: 64 for LeNet, 1 for the zoo nets")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.iters} timed calls per "
          f"variant (medians); cache dir {os.environ.get('TORCHINDUCTOR_CACHE_DIR', '(default)')}")
    print(f"{'net':24s} {'eager':>9s} {'compiled':>9s} {'torch':>9s} {'comp/eager':>10s} {'comp/torch':>10s} "
          f"{'segments':>8s} {'compile':>8s} {'peak MiB e/c/t':>16s}")
    for name in args.nets.split(","):
        r = bench(name, args.iters, args.batch or None, not args.no_memory)
        m = r["med"]
        mem = "/".join(f"{r['mem'][v]:.0f}" for v in VARIANTS) if r["mem"] else "-"
        what = "train iter" if name == "lenet" else "fwd+bwd"
        print(f"{name + ' ' + what:24s} {m['eager'] * 1e3:7.1f}ms {m['compiled'] * 1e3:7.1f}ms "
              f"{m['torch'] * 1e3:7.1f}ms {m['compiled'] / m['eager']:9.2f}x {m['compiled'] / m['torch']:9.2f}x "
              f"{r['compiled_segments']:>3d}/{r['segments']:<4d} {r['compile_s']:7.1f}s {mem:>16s}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
