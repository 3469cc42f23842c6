"""The ``caffe`` (= ``recaffe``) command: ``caffe <command> <args>`` as Caffe's tools/caffe.cpp.

commands: train, test, time, device_query, and Caffe's tools under their own names
(see TOOLS).
"""
from __future__ import annotations

import os
import sys
import time as _time

from .. import device as _device
from ..errors import RecaffeError
from .. import threads as _threads
from ..io.netfiles import read_solver_text
from ..log import get_logger
from ..parallel import launched_by_torchrun
from ..proto import caffe_pb2
from ..signals import SignalHandler
from .flags import FlagError, FlagSet

log = get_logger("caffe")

USAGE = """usage: caffe <command> <args>

commands:
  train           train or finetune a model
  test            score a model
  time            benchmark model execution time
  device_query    show GPU diagnostic information

Caffe's tools (each prints its own usage with -help):
  convert_imageset, convert_mnist_data, convert_cifar_data, compute_image_mean,
  extract_features, upgrade_net_proto_text, upgrade_net_proto_binary,
  upgrade_solver_proto_text, parse_log, plot_training_log, draw_net,
  export (a net to ONNX or a PyTorch module);
  the SSD fork's convert_annoset and get_image_size

Errors in what you give (files, settings, flags) are printed as one line, exit status 1;
RECAFFE_TRACEBACK=1 in the environment adds their Python traceback.

Flags (Caffe's spellings: -flag=value, --flag=value, -flag value):
"""


def _flags() -> FlagSet:
    f = FlagSet()
    f.add("gpu", "", "Optional; run in GPU mode on given device IDs separated by ','. Use '-gpu all' to "
          "run on all available GPUs.")
    f.add("solver", "", "The solver definition protocol buffer text file.")
    f.add("model", "", "The model definition protocol buffer text file.")
    f.add("phase", "", "Optional; network phase (TRAIN or TEST). Only used for 'time'.")
    f.add("level", 0, "Optional; network level.")
    f.add("stage", "", "Optional; network stages (not to be confused with phase), separated by ','.")
    f.add("snapshot", "", "Optional; the snapshot solver state to resume training.")
    f.add("weights", "", "Optional; the pretrained weights to initialize finetuning, separated by ','. "
          "Cannot be set simultaneously with snapshot.")
    f.add("iterations", 50, "The number of iterations to run.")
    f.add("sigint_effect", "stop", "Optional; action to take when a SIGINT signal is received: "
          "snapshot, stop or none.")
    f.add("sighup_effect", "snapshot", "Optional; action to take when a SIGHUP signal is received: "
          "snapshot, stop or none.")
    f.add("threads", 0, "Optional (recaffe); CPU threads for torch's kernels (0: $RECAFFE_THREADS, else "
          "torch's default, one per physical core). Fewer threads share a busy machine better.")
    f.add("compile", False, "Optional (recaffe); run train/test/time through the compiled fast path "
          "(torch.compile per segment of capturable layers, kept where it measures faster than eager; "
          "see docs/performance.md).")
    f.add("precision", "", "Optional (recaffe); fp32, bf16 or fp16: compute in bfloat16/float16 with "
          "float32 master weights (fp16 scales the loss); empty: as the prototxt says (NVCaffe's "
          "default_forward_type), else fp32. See docs/precision.md.")
    f.add("deterministic", False, "Optional (recaffe); deterministic kernels only, meant to make a "
          "seeded run repeat bit for bit on GPU too (slower on GPU; untested on GPU, see docs/gpu.md).")
    return f


def _parse_gpu_ids(gpu: str) -> list[int]:
    try:
        return [int(x) for x in gpu.split(",") if x]
    except ValueError:
        raise FlagError(f"-gpu: expected device ids separated by ',' or 'all', got {gpu!r}") from None


def _gpu_ids(gpu: str) -> list[int]:
    ids = list(range(_torch_device_count())) if gpu == "all" else _parse_gpu_ids(gpu)
    if not ids:
        raise _device.DeviceError("-gpu all: no CUDA device is available")
    return ids


def _set_mode(gpu: str) -> None:
    """CPU, or the first of the -gpu ids (test and time use one GPU, as Caffe)."""
    if not gpu:
        log.info("Use CPU.")
        _device.set_mode_cpu()
        return
    ids = _gpu_ids(gpu)
    log.info("Use GPU with device ID %d", ids[0])
    _device.set_device(ids[0])
    _device.set_mode_gpu()


def _torch_device_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _stages(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def train(flags: dict) -> int:
    from ..solvers import create_solver
    if not flags["solver"]:
        raise FlagError("Need a solver definition to train (-solver).")
    if flags["snapshot"] and flags["weights"]:
        raise FlagError("Give a snapshot to resume training or weights to finetune but not both.")
    param = read_solver_text(flags["solver"])
    param.train_state.level = flags["level"]
    param.train_state.stage.extend(_stages(flags["stage"]))
    # As Caffe's train(): -snapshot ignores the solver's weights, -weights replaces them; the solver
    # loads them into its train and test nets when it is built.
    if flags["snapshot"] or flags["weights"]:
        del param.weights[:]
    if flags["weights"]:
        param.weights.append(flags["weights"])
    gpu = flags["gpu"]
    if not gpu and param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU \
            and _torch_device_count() > 0:
        gpu = str(param.device_id)
    if launched_by_torchrun():
        # Started by torchrun (one process per solver, maybe on several nodes): this process is
        # one rank; in GPU mode it uses its node's GPU LOCAL_RANK, whatever -gpu lists.
        from ..parallel import train_distributed
        train_distributed(param, gpu=bool(gpu), weights=flags["weights"] or None,
                          snapshot=flags["snapshot"] or None, source=flags["solver"],
                          sigint_effect=flags["sigint_effect"], sighup_effect=flags["sighup_effect"])
        log.info("Optimization Done.")
        return 0
    ids = _gpu_ids(gpu) if gpu else []
    if len(ids) > 1:
        # One solver per GPU, gradients averaged (Caffe's NCCL training): recaffe.parallel.
        from ..parallel import train_data_parallel
        log.info("Using GPUs %s", ", ".join(map(str, ids)))
        train_data_parallel(param, ids, snapshot=flags["snapshot"] or None, source=flags["solver"],
                            sigint_effect=flags["sigint_effect"], sighup_effect=flags["sighup_effect"])
        log.info("Optimization Done.")
        return 0
    _set_mode(gpu)
    with SignalHandler(flags["sigint_effect"], flags["sighup_effect"]) as handler:
        solver = create_solver(param, source=flags["solver"])
        solver.action_request = handler.action
        if flags["snapshot"]:
            log.info("Starting Optimization")
            log.info("Resuming from %s", flags["snapshot"])
            solver.solve(flags["snapshot"])
        else:
            log.info("Starting Optimization")
            solver.solve()
    log.info("Optimization Done.")
    return 0


def test(flags: dict) -> int:
    from ..net import Net
    if not flags["model"]:
        raise FlagError("Need a model definition to score (-model).")
    if not flags["weights"]:
        raise FlagError("Need model weights to score (-weights).")
    _set_mode(flags["gpu"])
    net = Net(flags["model"], caffe_pb2.TEST, level=flags["level"], stages=_stages(flags["stage"]))
    for w in flags["weights"].split(","):
        net.copy_from(w)
    iterations = flags["iterations"]
    log.info("Running for %d iterations.", iterations)
    scores: list[float] = []
    names: list[str] = []
    loss = 0.0
    for i in range(iterations):
        loss += net.forward_loss()
        idx = 0
        for name in net.outputs:
            for v in net.blobs[name].data.reshape(-1):
                v = float(v)
                if i == 0:
                    scores.append(v)
                    names.append(name)
                else:
                    scores[idx] += v
                log.info("Batch %d, %s = %g", i, name, v)
                idx += 1
    loss /= iterations
    log.info("Loss: %g", loss)
    weights = net.blob_loss_weights
    for name, total in zip(names, scores):
        mean = total / iterations
        w = weights[name]
        extra = f" (* {w:g} = {w * mean:g} loss)" if w else ""
        log.info("%s = %g%s", name, mean, extra)
    return 0


def time_(flags: dict) -> int:
    import torch

    from ..net import Net
    if not flags["model"]:
        raise FlagError("Need a model definition to time (-model).")
    phase_name = flags["phase"] or "TRAIN"
    if phase_name not in ("TRAIN", "TEST"):
        raise FlagError(f"-phase must be TRAIN or TEST, got {phase_name!r}")
    _set_mode(flags["gpu"])
    net = Net(flags["model"], caffe_pb2.Phase.Value(phase_name), level=flags["level"],
              stages=_stages(flags["stage"]))
    sync = torch.cuda.synchronize if net.device.type == "cuda" else (lambda: None)
    log.info("Performing Forward")
    log.info("Initial loss: %g", net.forward_loss())
    log.info("Performing Backward")
    net.backward_from_to()
    iterations = flags["iterations"]
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", iterations)
    if net.fastpath is not None:
        return _time_compiled(net, iterations, sync)
    n = len(net.layers)
    fwd = [0.0] * n
    bwd = [0.0] * n
    fwd_total = bwd_total = 0.0
    total_start = _time.perf_counter()
    for j in range(iterations):
        iter_start = _time.perf_counter()
        t0 = _time.perf_counter()
        for i in range(n):
            s = _time.perf_counter()
            net.forward_layer(i)  # (with its precision conversions, as in a whole-net forward)
            sync()
            fwd[i] += _time.perf_counter() - s
        fwd_total += _time.perf_counter() - t0
        t0 = _time.perf_counter()
        for i in range(n - 1, -1, -1):
            s = _time.perf_counter()
            # as Caffe's time: every layer's Backward, propagating where the net's analysis says
            # (a deploy net with no loss still computes its param gradients)
            net.backward_layer(i)
            sync()
            bwd[i] += _time.perf_counter() - s
        bwd_total += _time.perf_counter() - t0
        log.info("Iteration: %d forward-backward time: %g ms.", j + 1, (_time.perf_counter() - iter_start) * 1e3)
    total = _time.perf_counter() - total_start
    log.info("Average time per layer: ")
    for i, name in enumerate(net.layer_names):
        log.info("%10s\tforward: %g ms.", name, fwd[i] * 1e3 / iterations)
        log.info("%10s\tbackward: %g ms.", name, bwd[i] * 1e3 / iterations)
    return _log_averages(fwd_total, bwd_total, total, iterations)


def _log_averages(fwd_total: float, bwd_total: float, total: float, iterations: int) -> int:
    """caffe time's closing lines (seconds in, milliseconds out, as Caffe prints them)."""
    log.info("Average Forward pass: %g ms.", fwd_total * 1e3 / iterations)
    log.info("Average Backward pass: %g ms.", bwd_total * 1e3 / iterations)
    log.info("Average Forward-Backward: %g ms.", total * 1e3 / iterations)
    log.info("Total Time: %g ms.", total * 1e3)
    log.info("*** Benchmark ends ***")
    return 0


def _time_compiled(net, iterations: int, sync) -> int:
    """``caffe time -compile``: whole forward and backward passes (compiled segments have no
    per-layer times). The first iterations include the fast path's measuring and compiling; they
    are logged as such and left out of the averages."""
    warm = 0
    while not net.fastpath.settled and warm < 80:
        net.forward_loss()
        net.backward_from_to()
        warm += 1
    log.info("Compiled fast path: %d warm-up iterations (measuring eager vs compiled, compiling, checking "
             "whole passes); per-layer "
             "times are not available with -compile", warm)
    for s in net.fastpath.summary():
        log.info("%10s %s: %s", s["direction"], ",".join(s["layers"][:1] + s["layers"][-1:]), s["choice"])
    # the layers the net's backward skips run theirs eagerly after it, as in the per-layer timing
    # (Caffe's time calls every layer's Backward; on a deploy net that is all of them)
    skipped = [i for i in range(len(net.layers) - 1, -1, -1) if not net.layer_need_backward[i]]
    fwd_total = bwd_total = 0.0
    total_start = _time.perf_counter()
    for j in range(iterations):
        t0 = _time.perf_counter()
        net.forward_loss()
        sync()
        t1 = _time.perf_counter()
        net.backward_from_to()
        for i in skipped:
            net.backward_layer(i)
        sync()
        t2 = _time.perf_counter()
        fwd_total += t1 - t0
        bwd_total += t2 - t1
        log.info("Iteration: %d forward-backward time: %g ms.", j + 1, (t2 - t0) * 1e3)
    return _log_averages(fwd_total, bwd_total, _time.perf_counter() - total_start, iterations)


def device_query(flags: dict) -> int:
    gpus = flags["gpu"]
    if not gpus:
        raise FlagError("Need a -gpu device id (or 'all') to query.")
    ids = range(_torch_device_count()) if gpus == "all" else _parse_gpu_ids(gpus)
    for i in ids:
        log.info("Querying GPUs %d", i)
        for line in _device.device_query(i):
            log.info("%s", line)
    return 0


COMMANDS = {"train": train, "test": test, "time": time_, "device_query": device_query}


# Caffe's tools, run as `caffe <tool> ...` (and `recaffe <tool> ...`): name -> module in recaffe.cli
# whose main(argv) -> exit code implements it. Modules are imported only when their tool runs.
TOOLS = {
    "convert_mnist_data": "convert_mnist_data",
    "convert_cifar_data": "convert_cifar_data",
    "convert_imageset": "convert_imageset",
    "compute_image_mean": "compute_image_mean",
    "extract_features": "extract_features",
    "upgrade_net_proto_text": "upgrade_tools",
    "upgrade_net_proto_binary": "upgrade_tools",
    "upgrade_solver_proto_text": "upgrade_tools",
    "parse_log": "parse_log",
    "plot_training_log": "plot_training_log",
    "draw_net": "draw_net",
    "export": "export",
    "convert_annoset": "convert_annoset",
    "get_image_size": "get_image_size",
}


def _tool(name: str):
    """The main(argv) of Caffe's tool ``name``, or None when ``name`` is not a tool."""
    if name not in TOOLS:
        return None
    import importlib

    module = importlib.import_module(f".{TOOLS[name]}", __package__)
    # modules holding several tools (upgrade_tools) expose one main per tool name
    return getattr(module, f"main_{name}", None) or module.main


# Errors the user can fix: printed as one line ("caffe <command>: error: ..."), exit status 1.
# RecaffeError covers every recaffe error class (files, layers, weights, solvers, flags, databases,
# devices); OSError covers files and folders that cannot be opened. Anything else is a bug in
# recaffe and keeps its traceback. RECAFFE_TRACEBACK=1 prints the traceback of user errors too.
USER_ERRORS = (RecaffeError, OSError)


def _run(command: str, fn, *args) -> int:
    try:
        return fn(*args)
    except USER_ERRORS as e:
        if os.environ.get("RECAFFE_TRACEBACK", "") not in ("", "0"):
            raise
        text = str(e) or type(e).__name__
        log.error("%s", text)
        print(f"caffe {command}: error: {text}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"caffe {command}: error: out of memory", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help", "-help"):
        print(USAGE + _flags().usage())
        return 0 if argv else 1
    command, rest = argv[0], argv[1:]
    tool = _tool(command)
    if tool is not None:
        return _run(command, tool, rest)
    if command not in COMMANDS:
        print(f"caffe: unknown command {command!r}\n\n{USAGE}{_flags().usage()}", file=sys.stderr)
        return 1
    return _run(command, _command, command, rest)


def _command(command: str, rest: list[str]) -> int:
    flags, positional = _flags().parse(rest)
    if positional:
        raise FlagError(f"unexpected argument(s): {' '.join(positional)}")
    if flags["threads"] < 0:
        raise FlagError(f"-threads must be a positive number of threads (or 0 for the default), "
                        f"got {flags['threads']}")
    if flags["threads"]:
        _threads.set_num_threads(flags["threads"])
        os.environ[_threads.THREADS_ENV] = str(flags["threads"])  # for data-parallel ranks too
    if command in ("train", "test", "time"):
        log.info("CPU: %s", _threads.describe())
    if flags["deterministic"]:
        log.info("Using deterministic algorithms only.")
        _device.set_deterministic(True)
    if flags["precision"]:
        from .. import precision
        name = precision.check_name(flags["precision"])
        log.info("Precision: %s (float32 master weights)", name)
        precision.set_precision(name)
        os.environ[precision.PRECISION_ENV] = name  # also for the processes of multi-GPU training
    if flags["compile"]:
        from .. import fastpath
        log.info("Using the compiled fast path.")
        fastpath.set_compile(True)
        os.environ[fastpath.COMPILE_ENV] = "1"  # also for the processes of multi-GPU training
    return COMMANDS[command](flags)


if __name__ == "__main__":
    sys.exit(main())
