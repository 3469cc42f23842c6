"""LeNet training on a shared CPU: quiet speed vs. speed while another process keeps a core busy.

    python benchmarks/shared_cpu_bench.py [--seconds 2] [--rounds 3] [--batch 64] [--pin-busy CPU]

For each setting, a child process trains LeNet (solver.step on Input blobs, as lenet_bench.py)
and the same net in plain PyTorch (torch.optim.SGD), first on a quiet machine, then while this
script runs a busy process (a spinning Python loop; ``--pin-busy 1`` pins it to CPU 1), alternating
quiet and loaded phases ``--rounds`` times. It prints the median iter/s quiet and loaded and the
ratio loaded/quiet, for:

- recaffe's default: recaffe imported first, so OMP_WAIT_POLICY=PASSIVE (recaffe.threads), torch's
  default number of threads;
- the old behaviour: torch imported before recaffe with OMP_WAIT_POLICY unset (OpenMP's spinning
  waits), torch's default number of threads;
- one thread (``-threads 1``), with recaffe's default wait policy.

The PyTorch column runs in the same child process, so it shares the setting. Other load on the
machine (shown as the load average) makes all figures lower and noisier.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

SETTINGS = [
    ("recaffe default (PASSIVE)", {"RECAFFE_BENCH_IMPORT": "recaffe-first"}),
    ("old: torch defaults (spin)", {"RECAFFE_BENCH_IMPORT": "torch-first"}),
    ("-threads 1 (PASSIVE)", {"RECAFFE_BENCH_IMPORT": "recaffe-first", "RECAFFE_THREADS": "1"}),
]


def child(seconds: float, batch: int) -> None:
    """Train both nets for `seconds` each per phase; print a line per phase, wait for 'go' between."""
    if os.environ.get("RECAFFE_BENCH_IMPORT") == "torch-first":
        import torch  # noqa: F401  (OpenMP loads with the environment as it is: OMP_WAIT_POLICY unset)
    else:
        import recaffe  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
    sys.path.insert(0, HERE)
    import numpy as np
    import torch
    import torch.nn.functional as F

    import lenet_bench  # imports recaffe
    from recaffe import threads

    g = np.random.default_rng(0)
    data = g.random((batch, 1, 28, 28), dtype=np.float32)
    labels = g.integers(0, 10, batch)
    solver = lenet_bench.recaffe_solver(batch)
    solver.net.blobs["data"].data[...] = data
    solver.net.blobs["label"].data[...] = labels
    model = lenet_bench.TorchLeNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    x, y = torch.from_numpy(data), torch.from_numpy(labels)

    def pt_step():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()

    def rate(fn):
        for _ in range(3):
            fn()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
            n += 1
        return n / (time.perf_counter() - start)

    print("setting", threads.describe(), flush=True)
    for command in sys.stdin:  # "quiet" or "loaded": the parent has started or stopped the busy process
        phase = command.strip()
        print(phase, rate(lambda: solver.step(1)), rate(pt_step), flush=True)


def busy(pin: int | None) -> subprocess.Popen:
    code = "import os\n" + (f"os.sched_setaffinity(0, {{{pin}}})\n" if pin is not None else "") + "while True: pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def run_setting(extra_env: dict, args) -> dict:
    env = dict(os.environ, GLOG_minloglevel="2", **extra_env)
    for var in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):
        env.pop(var, None)  # each setting decides
    env.setdefault("RECAFFE_THREADS", "")
    if not env["RECAFFE_THREADS"]:
        del env["RECAFFE_THREADS"]
    proc = subprocess.Popen([sys.executable, __file__, "--child", "--seconds", str(args.seconds),
                             "--batch", str(args.batch)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    out = {"quiet": [], "loaded": []}
    spinner = None

    def measure(phase):
        proc.stdin.write(phase + "\n")
        proc.stdin.flush()
        key, *values = proc.stdout.readline().split()
        if key != phase:
            raise SystemExit(f"the benchmark child failed (exit code {proc.poll()})")
        out[phase].append(tuple(float(v) for v in values))

    try:
        key, _, out["setting"] = proc.stdout.readline().strip().partition(" ")
        if key != "setting":
            raise SystemExit(f"the benchmark child failed (exit code {proc.wait()})")
        for _ in range(args.rounds):  # alternate, so that other load on the machine hits both phases
            measure("quiet")
            spinner = busy(args.pin_busy)
            time.sleep(0.3)  # let it take its core
            measure("loaded")
            spinner.kill()
            spinner.wait()
            spinner = None
        proc.stdin.close()
        proc.wait()
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        if proc.poll() is None:
            proc.kill()
    for phase in ("quiet", "loaded"):
        out[phase] = tuple(statistics.median(r[i] for r in out[phase]) for i in range(2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per net, phase and round")
    ap.add_argument("--rounds", type=int, default=3, help="quiet/loaded alternations (medians are printed)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pin-busy", type=int, default=None, metavar="CPU", help="pin the busy process to this CPU")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.seconds, args.batch)
        return 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"LeNet training, batch {args.batch}, {os.cpu_count()} CPUs, load average {load:.2f} before the run; "
          f"busy process {'pinned to CPU %d' % args.pin_busy if args.pin_busy is not None else 'not pinned'}")
    print(f"{'setting':28s} {'':8s} {'quiet it/s':>10s} {'loaded it/s':>11s} {'loaded/quiet':>12s}")
    for name, extra in SETTINGS:
        r = run_setting(extra, args)
        for i, impl in enumerate(("recaffe", "PyTorch")):
            q, ld = r["quiet"][i], r["loaded"][i]
            print(f"{name if i == 0 else '':28s} {impl:8s} {q:10.1f} {ld:11.1f} {ld / q:11.2f}x")
        print(f"{'':28s} ({r['setting']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
