"""Solver update speed: Caffe's per-param loop vs recaffe's multi-tensor update vs torch.optim.

    python benchmarks/update_bench.py [--net resnet_50] [--type SGD] [--iters 50] [--threads N]

Builds the zoo net's params (ResNet-50 by default: ../shared/reference/zoo/resnet_50.prototxt, 161
learnable blobs with Caffe's lr_mult/decay_mult groups), fills the diffs, and times one update
(momentum 0.9, L2 weight decay 5e-4; Net::Update included) as:

* ``loop``: recaffe's per-param path (about six small ops per param, then data -= diff per param),
  the code before the multi-tensor update;
* ``foreach``: recaffe's default, torch._foreach_* ops per (lr_mult, decay_mult) group, in chunks
  of about 1 MB per tensor on CPU; ``foreach, one chunk``: the same without chunks (what runs on
  a GPU, where its "aten ops" column is the number of kernel launches);
* ``torch.optim``: torch.optim.SGD (or Adam for --type Adam) with foreach=True on tensors of the
  same shapes (and fused=True where torch supports it on this device).

Runs alternate in chunks to share the machine's noise; medians are printed with ratios to
torch.optim foreach, and the number of kernel launches (torch ops) each update issues.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("GLOG_minloglevel", "2")

import torch  # noqa: E402

from recaffe.io.netfiles import read_net_text  # noqa: E402
from recaffe.proto import caffe_pb2  # noqa: E402
from recaffe.solvers import create_solver  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ZOO = os.path.join(HERE, "..", "..", "shared", "reference", "zoo")

SETTINGS = {
    "SGD": dict(momentum=0.9),
    "Nesterov": dict(momentum=0.9),
    "AdaGrad": dict(delta=1e-8),
    "RMSProp": dict(rms_decay=0.98, delta=1e-8),
    "AdaDelta": dict(momentum=0.95, delta=1e-6),
    "Adam": dict(momentum=0.9, momentum2=0.999, delta=1e-8),
}


def make_solver(net_name: str, kind: str, device: str):
    net = read_net_text(os.path.join(ZOO, net_name + ".prototxt"))
    sp = caffe_pb2.SolverParameter(type=kind, base_lr=0.01, weight_decay=0.0005, lr_policy="fixed",
                                   random_seed=1, **SETTINGS[kind])
    sp.net_param.CopyFrom(net)
    if device != "cpu":
        sp.solver_mode = caffe_pb2.SolverParameter.GPU
    solver = create_solver(sp)
    g = torch.Generator().manual_seed(0)
    for b in solver.net.learnable_params:
        b.diff_t.copy_(torch.randn(b.shape, generator=g) * 1e-3)
    return solver


def count_ops(fn) -> int:
    """How many aten ops (kernel launches on a GPU) one call issues."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def timed(fn, n, sync):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="resnet_50")
    ap.add_argument("--type", default="SGD", choices=sorted(SETTINGS))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        from recaffe import device as rc_device
        rc_device.set_mode_gpu()
    sync = torch.cuda.synchronize if args.device != "cpu" else (lambda: None)
    solver = make_solver(args.net, args.type, args.device)
    params = solver.net.learnable_params
    rate = solver.lr

    def loop():  # the update before the multi-tensor path: per-param ops, then per-param data -= diff
        solver.clip_gradients()
        solver._apply_update_loop(rate)
        for b in params:
            b.data_t.sub_(b.diff_t)

    def foreach():
        solver.apply_update()

    def foreach_unchunked():  # what a GPU runs: one set of multi-tensor ops per group
        solver.CPU_CHUNK = 1 << 62
        try:
            solver.apply_update()
        finally:
            del solver.CPU_CHUNK

    tparams = [torch.nn.Parameter(b.data_t.detach().clone()) for b in params]
    for p, b in zip(tparams, params):
        p.grad = b.diff_t.detach().clone()
    variants = {"loop": loop, "foreach": foreach}
    if args.device == "cpu":
        variants["foreach, one chunk"] = foreach_unchunked
    for label, kw in (("torch.optim foreach", dict(foreach=True)), ("torch.optim fused", dict(fused=True))):
        try:
            if args.type == "Adam":
                opt = torch.optim.Adam(tparams, lr=0.01, weight_decay=0.0005, **kw)
            else:
                opt = torch.optim.SGD(tparams, lr=0.01, momentum=0.9, weight_decay=0.0005,
                                      nesterov=args.type == "Nesterov", **kw)
            opt.step()
        except (RuntimeError, ValueError) as e:
            print(f"({label}: not available here: {str(e).splitlines()[0]})")
            continue
        variants[label] = opt.step
    ops = {name: count_ops(fn) for name, fn in variants.items()}
    for fn in variants.values():
        timed(fn, 5, sync)
    times = {name: [] for name in variants}
    for _ in range(max(1, args.iters // 10)):
        for name, fn in variants.items():
            times[name] += timed(fn, 10, sync)
    med = {name: statistics.median(t) for name, t in times.items()}
    ref = med["torch.optim foreach"]
    numel = sum(b.count() for b in params)
    print(f"{args.type} update of {args.net}'s {len(params)} learnable blobs ({numel / 1e6:.1f}M values), "
          f"{len(solver.param_groups())} (lr_mult, decay_mult) groups, device {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.iters} updates each (medians)")
    print(f"{'':22s} {'time':>9s} {'aten ops':>9s} {'vs torch.optim foreach':>23s}")
    for name, t in med.items():
        print(f"{name:22s} {t * 1e3:7.2f}ms {ops[name]:9d} {t / ref:22.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
