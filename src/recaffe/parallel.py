"""Data-parallel training: one solver per device, as Caffe's multi-GPU training (NCCL/P2PSync).

What Caffe does (parallel.cpp, solver.cpp, data_layer.cpp, tools/caffe.cpp) and we repeat:

- every solver builds the same net; the root's weights (after ``-weights`` or a restored
  ``-snapshot``, which every solver restores) are broadcast to the others before training;
- each solver seeds its generators with ``random_seed + rank``;
- each solver runs its own ``iter_size`` forward/backward passes on its own data; then the
  diffs of all learnable params are summed across solvers and multiplied by 1/N (on
  ``on_gradients_ready``, before ``apply_update``, which still divides by ``iter_size``), so N
  solvers with ``iter_size: k`` equal one solver with ``iter_size: N*k`` on the same batches;
- a Data layer of solver r of N reads the records at positions r, r+N, r+2N... (per record, as
  Caffe 1.0's DataLayer::Skip); TEST nets read everything;
- only the root solver tests, displays, snapshots and logs; the others only ``step``.

Choices: the process group is initialized from a file in a temporary folder (no TCP port), with
"nccl" for CUDA devices and "gloo" for CPU; an error in any rank stops all ranks and is raised
in the launching process (Caffe would hang or abort).
"""
from __future__ import annotations

import datetime
import glob
import os
import tempfile
import time
import traceback

import torch

from .errors import RecaffeError
from .log import get_logger, set_log_level
from .signals import ACTIONS, SignalHandler

log = get_logger(__name__)

_solver_rank = 0
_solver_count = 1


class DataParallelError(RecaffeError, RuntimeError):
    pass


def solver_rank_and_count() -> tuple[int, int]:
    """(rank, count) of this process's solver (Caffe::solver_rank / solver_count); (0, 1) alone."""
    return _solver_rank, _solver_count


def set_solver_rank(rank: int, count: int | None = None) -> None:
    """Set before building the solver: Data layers take their share of records from it.
    Without ``count`` only the rank changes (pycaffe's caffe.set_solver_rank; scripts set the
    count and the rank in either order, so the pair is checked when NCCL joins the group)."""
    global _solver_rank, _solver_count
    if count is not None:
        if not 0 <= rank < count:
            raise ValueError(f"solver rank {rank} is outside 0..{count - 1}")
        _solver_count = int(count)
    elif rank < 0:
        raise ValueError(f"set_solver_rank({rank}): the solver rank must be at least 0")
    _solver_rank = int(rank)


def set_solver_count(count: int) -> None:
    """pycaffe's caffe.set_solver_count: how many solvers train together."""
    global _solver_count
    if count < 1:
        raise ValueError(f"set_solver_count({count}): the solver count must be at least 1")
    _solver_count = int(count)


def make_data_parallel(solver, rank: int | None = None, world: int | None = None) -> None:
    """Wire ``solver`` (already built) into the initialized torch.distributed group: broadcast
    rank 0's params, all-reduce and average the diffs before each update, and silence tests,
    display and snapshots on the non-root ranks (their ``step`` then only trains)."""
    import torch.distributed as dist
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    params = solver.net.learnable_params
    broadcast_params(params)
    solver.add_callback(None, lambda: average_diffs(params, world))
    _agree_on_actions(solver, rank)
    if rank != 0:
        _make_non_root(solver)


def broadcast_params(params) -> None:
    """Give every rank the root's param values."""
    import torch.distributed as dist
    for blob in params:
        dist.broadcast(blob.data_t, src=0)


def average_diffs(params, world: int) -> None:
    """Sum the params' diffs over the ranks and divide by their number, in one all-reduce."""
    import torch.distributed as dist
    diffs = [b.diff_t for b in params]
    flat = torch.cat([d.reshape(-1) for d in diffs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.mul_(1.0 / world)
    offset = 0
    for d in diffs:
        d.copy_(flat[offset:offset + d.numel()].view_as(d))
        offset += d.numel()


def _make_non_root(solver) -> None:
    # Caffe's non-root solvers never test, display or snapshot (Caffe::root_solver()).
    p = solver.param
    p.test_interval = 0
    p.display = 0
    p.snapshot = 0
    p.snapshot_after_train = False


class NCCL:
    """pycaffe's ``caffe.NCCL(solver, uid)``: this process's solver joins the group of
    ``caffe.solver_count()`` solvers as rank ``caffe.solver_rank()``, as in Caffe's
    python/train.py::

        uid = caffe.NCCL.new_uid()                 # once, in the launching process
        # in each of N processes:
        caffe.set_solver_count(N); caffe.set_solver_rank(rank)
        solver = caffe.SGDSolver(solver_file)
        nccl = caffe.NCCL(solver, uid)
        nccl.bcast()                               # the root's weights to every solver
        solver.add_callback(nccl)                  # average the diffs before each update
        solver.step(solver.param.max_iter)

    In recaffe the group is a torch.distributed process group (backend "nccl" for CUDA nets,
    "gloo" on CPU) and ``uid`` names the file it meets at (``new_uid``: a fresh path in the
    temporary folder), so the processes must share a file system. The diffs of all learnable
    params are averaged in one all-reduce when the gradients are ready; ``net.after_backward(nccl)``
    (Caffe's layer-wise reduce) is accepted and changes nothing, the result being the same. With a
    solver count of 1 nothing is exchanged. Non-root solvers do not test, display or snapshot.
    """

    def __init__(self, solver, uid: bytes | str):
        import torch.distributed as dist
        rank, count = solver_rank_and_count()
        if not 0 <= rank < count:
            raise ValueError(f"caffe.NCCL: solver rank {rank} is outside 0..{count - 1} "
                             "(set caffe.set_solver_count and caffe.set_solver_rank first)")
        self.solver, self.rank, self.count = solver, rank, count
        path = uid.decode() if isinstance(uid, bytes) else str(uid)
        if count > 1:
            if not dist.is_initialized():
                backend = "nccl" if solver.net.device.type == "cuda" else "gloo"
                dist.init_process_group(backend, init_method="file://" + path, rank=rank, world_size=count)
            elif dist.get_world_size() != count or dist.get_rank() != rank:
                raise ValueError(f"caffe.NCCL: this process is already rank {dist.get_rank()} of "
                                 f"{dist.get_world_size()}, not rank {rank} of {count}")
            if rank != 0:
                _make_non_root(solver)

    @staticmethod
    def new_uid() -> bytes:
        """A new session id for NCCL(solver, uid): bytes, as pycaffe's under Python 3."""
        import uuid
        return os.path.join(tempfile.gettempdir(), f"recaffe-nccl-{uuid.uuid4().hex}").encode()

    def bcast(self) -> None:
        """Copy the root solver's weights into every solver (Caffe's NCCL::Broadcast)."""
        if self.count > 1:
            broadcast_params(self.solver.net.learnable_params)

    # Solver callback (solver.add_callback(nccl)).
    def on_start(self) -> None:
        pass

    def on_gradients_ready(self) -> None:
        if self.count > 1:
            average_diffs(self.solver.net.learnable_params, self.count)

    def __call__(self, layer: int) -> None:
        """Net callback (net.after_backward(nccl)): the diffs are averaged all at once instead."""


def _agree_on_actions(solver, rank: int) -> None:
    """Every rank takes the same signal action at the same iteration, or a rank would wait forever
    in the next all-reduce: each iteration, before the update, the ranks' requested actions
    (from their own ``solver.action_request``, e.g. a SignalHandler) are combined with MAX, stop
    winning over snapshot. Only the root snapshots."""
    import torch.distributed as dist
    own = solver.action_request
    decided = ["none"]

    def exchange():
        code = torch.tensor([ACTIONS.index(own() if own else "none")], dtype=torch.int32)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        decided[0] = ACTIONS[int(code)]

    def action():
        if rank != 0 and decided[0] == "snapshot":
            return "none"
        return decided[0]

    solver.add_callback(None, exchange)
    solver.action_request = action


def _device_of(d) -> torch.device:
    if isinstance(d, int):
        return torch.device("cuda", d)
    dev = torch.device(d)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return dev


def _worker(rank, world, devices, init_file, backend, solver_bytes, source, weights, snapshot,
            on_start, on_finish, timeout_s, effects):
    from . import device as _device
    import torch.distributed as dist

    if rank != 0:
        set_log_level(1)  # Caffe logs only from the root solver
    dev = _device_of(devices[rank])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        _device.set_device(dev.index)
        _device.set_mode_gpu()
    else:
        _device.set_mode_cpu()
    dist.init_process_group(backend, init_method="file://" + init_file, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        with SignalHandler(*effects) as handler:  # Ctrl-C reaches every rank of the process group
            _train_rank(rank, world, solver_bytes, source, weights, snapshot, on_start, on_finish,
                        handler.action)
    except BaseException:
        # Written before this rank leaves the group, so the first error (the cause) has the
        # earliest time; the others' "connection closed" errors follow it.
        with open(f"{init_file}.error{rank}", "w") as f:
            f.write(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _train_rank(rank, world, solver_bytes, source, weights, snapshot, on_start, on_finish, action_request):
    from .proto import caffe_pb2
    from .solvers import create_solver
    import torch.distributed as dist
    set_solver_rank(rank, world)
    param = caffe_pb2.SolverParameter()
    param.ParseFromString(solver_bytes)
    solver = create_solver(param, source=source)
    if snapshot:
        solver.restore(snapshot)
    elif weights and rank == 0:
        for w in weights.split(","):
            log.info("Finetuning from %s", w)
            solver.net.copy_from(w)
            for net in solver.test_nets:
                net.copy_from(w)
    solver.action_request = action_request
    make_data_parallel(solver, rank, world)
    if on_start is not None:
        on_start(rank, solver)
    if rank == 0:
        log.info("Starting Optimization")
        solver.solve()
    else:
        solver.step(solver.param.max_iter - solver.iter)
    if on_finish is not None:
        on_finish(rank, solver)
    dist.barrier()


def train_data_parallel(solver_file_or_param, devices, backend: str | None = None,
                        weights: str | None = None, snapshot: str | None = None,
                        on_start=None, on_finish=None, timeout_s: float = 1800,
                        source: str | None = None, sigint_effect: str = "stop",
                        sighup_effect: str = "snapshot") -> None:
    """Train with one process per entry of ``devices`` (CUDA ids, "cuda:i", or "cpu").

    ``solver_file_or_param``: a solver.prototxt path or a SolverParameter (``source``: the file
    it came from, for relative net paths and the default snapshot prefix). ``weights``
    (comma-separated .caffemodel files) initialize the root before the broadcast; ``snapshot``
    (a .solverstate) is restored by every rank. ``on_start(rank, solver)`` and
    ``on_finish(rank, solver)``, if given, must be picklable; they run in every rank before and
    after training (e.g. to add callbacks or save results). ``timeout_s`` bounds each collective
    operation. Raises DataParallelError with the traceback of the rank that failed first; the
    other ranks are stopped. ``sigint_effect``/``sighup_effect`` are Caffe's -sigint_effect and
    -sighup_effect: a signal to any rank makes all of them stop (or the root snapshot) at the same
    iteration; the launching process itself ignores them while the ranks run.
    """
    import torch.multiprocessing as mp
    from .io.netfiles import read_solver_text

    devices = list(devices)
    if len(devices) < 1:
        raise DataParallelError("data-parallel training needs at least one device")
    devs = [_device_of(d) for d in devices]
    cuda = [d.index for d in devs if d.type == "cuda"]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if any(i >= count for i in cuda):
        raise DataParallelError(f"devices {devices}: only {count} CUDA device(s) are present")
    if backend is None:
        backend = "nccl" if len(cuda) == len(devs) else "gloo"
    if isinstance(solver_file_or_param, (str, os.PathLike)):
        source = os.fspath(solver_file_or_param)
        param = read_solver_text(source)  # a bad path or file fails here, before any process starts
    else:
        param = solver_file_or_param
    if snapshot and weights:
        raise DataParallelError("Give a snapshot to resume training or weights to finetune but not both.")
    SignalHandler(sigint_effect, sighup_effect)  # checks the effects before any process starts
    log.info("Training on %d devices: %s (backend %s)", len(devices), ", ".join(map(str, devices)), backend)
    with tempfile.TemporaryDirectory(prefix="recaffe-dist-") as tmp:
        args = (len(devices), devices, os.path.join(tmp, "store"), backend, param.SerializeToString(),
                source, weights, snapshot, on_start, on_finish, timeout_s, (sigint_effect, sighup_effect))
        try:
            with SignalHandler("none", "none"):  # the ranks decide; the launcher waits for them
                mp.spawn(_worker, args=args, nprocs=len(devices), join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise DataParallelError(_first_error(args[2]) or str(e)) from None


def _first_error(init_file: str) -> str | None:
    """The message of the rank that failed first (the others fail because it left)."""
    errors = []
    for path in glob.glob(glob.escape(init_file) + ".error*"):
        with open(path) as f:
            when, _, trace = f.read().partition("\n")
        errors.append((float(when), int(path.rsplit("error", 1)[1]), trace))
    if not errors:
        return None
    _, rank, trace = min(errors)
    return f"data-parallel training failed in rank {rank}:\n{trace}"
