"""Mixed precision on this machine: recaffe in fp32, bf16 and fp16 against plain PyTorch in fp32 and
under ``torch.autocast`` (bf16), in one process.

    python benchmarks/precision_bench.py [--nets lenet,squeezenet_v1.1,resnet_50] [--iters 10]
                                         [--batch N] [--fp16-zoo] [--no-memory]

Workloads as benchmarks/compile_bench.py: ``lenet`` is a full training iteration at batch 64
(solver.step(1) against zero_grad/forward/backward/torch.optim.SGD.step); a zoo net is one forward
and one backward of the deploy net (force_backward) against the module ``caffe export --format
torch`` emits. fp16 runs on the zoo nets only with ``--fp16-zoo`` (CPUs have no fast float16
kernels: it is for correctness there, for GPUs in speed). Columns: median ms per iteration of each
variant, bf16 / fp32 speed ratios for recaffe and for torch (> 1: bf16 is faster), and the peak
memory (max RSS of a child process running the variant alone).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

os.environ.setdefault("GLOG_minloglevel", "2")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from compile_bench import child_report, lenet, settle, status_kb, timed, zoo  # noqa: E402
from recaffe import precision  # noqa: E402

RECAFFE = ("fp32", "bf16", "fp16")
TORCH = ("torch-fp32", "torch-bf16")


def workload(name: str, variant: str, batch: int | None):
    """(a zero-argument function running one iteration, the net or None)."""
    make = (lambda v: lenet(v, batch or 64)) if name == "lenet" else (lambda v: zoo(name, v, batch or 1))
    if variant in RECAFFE:
        precision.set_precision(variant)
        try:
            return make("eager")
        finally:
            precision.set_precision(None)
    fn, _ = make("torch")
    if variant == "torch-fp32":
        return fn, None

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn()
    return autocast, None


def peak_memory(name: str, variant: str, batch: int | None) -> float:
    """Peak RSS (MiB, VmHWM) of a child process that builds and runs the variant alone."""
    report = child_report([sys.executable, __file__, "--child", name, variant, str(batch or 0)])
    return float(report["peak_kb"]) / 1024 if "peak_kb" in report else float("nan")


def child(name: str, variant: str, batch: int) -> int:
    fn, net = workload(name, variant, batch or None)
    settle(fn, net)
    timed(fn, 3)
    print("peak_kb", status_kb("VmHWM"))
    return 0


def bench(name: str, variants: list[str], iters: int, batch: int | None, memory: bool) -> dict:
    mem = {v: peak_memory(name, v, batch) for v in variants} if memory else {}
    fns = {v: workload(name, v, batch)[0] for v in variants}
    for fn in fns.values():
        timed(fn, 2)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(max(1, iters // 5)):  # alternate in chunks to share the machine's noise
        for v in variants:
            times[v] += timed(fns[v], 5)
    med = {v: statistics.median(t) for v, t in times.items()}
    return {"med": med, "mem": mem}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2], int(argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="lenet,squeezenet_v1.1,resnet_50")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=0, help="0: 64 for LeNet, 1 for the zoo nets")
    ap.add_argument("--fp16-zoo", action="store_true", help="also time fp16 on the zoo nets (slow on CPU)")
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"bf16 kernels: {'AVX512-BF16/AMX' if _cpu_has_bf16() else 'emulated'}")
    rows = []
    for name in args.nets.split(","):
        variants = [v for v in RECAFFE if v != "fp16" or name == "lenet" or args.fp16_zoo] + list(TORCH)
        r = bench(name, variants, args.iters, args.batch or None, not args.no_memory)
        rows.append((name, variants, r))
        med, mem = r["med"], r["mem"]
        cells = "  ".join(f"{v} {med[v] * 1e3:8.2f} ms" + (f" ({mem[v]:.0f} MiB)" if mem else "") for v in variants)
        print(f"{name:18s} {cells}")
        print(f"{'':18s} bf16/fp32 speed: recaffe {med['fp32'] / med['bf16']:.2f}x, "
              f"torch autocast {med['torch-fp32'] / med['torch-bf16']:.2f}x; "
              f"recaffe bf16 / torch autocast bf16 time {med['bf16'] / med['torch-bf16']:.2f}")
    return 0


def _cpu_has_bf16() -> bool:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


if __name__ == "__main__":
    sys.exit(main())
