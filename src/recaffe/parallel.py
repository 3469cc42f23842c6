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

Two launchers: ``train_data_parallel`` (``caffe train -gpu 0,1``) spawns one process per device
on this machine and initializes the group from a file in a temporary folder (no TCP port); an
error in any rank stops all ranks and is raised in the launching process (Caffe would hang or
abort). ``train_distributed`` (``caffe train`` under torchrun, docs/distributed.md) is one rank of
a group that may span machines, with the global RANK as the solver rank; a ``PeerWatchdog``
stops it when a peer dies. Both use "nccl" for CUDA devices and "gloo" for CPU.
"""
from __future__ import annotations

import datetime
import glob
import logging
import os
import sys
import tempfile
import threading
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


class CollectiveError(DataParallelError):
    """A collective operation failed: usually another rank died or its node became unreachable."""


def _collective(fn, /, *args, **kwargs):
    """Run a torch.distributed collective; its failure (gloo raises a plain RuntimeError, NCCL a
    DistBackendError) becomes a CollectiveError that says what probably happened."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        import torch.distributed as dist
        where = f"rank {dist.get_rank()} of {dist.get_world_size()}" if dist.is_initialized() else "this rank"
        raise CollectiveError(f"{where}: the collective operation {fn.__name__} failed, most likely because "
                              f"another rank died or its node became unreachable: {e}") from None


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
        _collective(dist.broadcast, blob.data_t, src=0)


def average_diffs(params, world: int) -> None:
    """Sum the params' diffs over the ranks and divide by their number, in one all-reduce."""
    import torch.distributed as dist
    diffs = [b.diff_t for b in params]
    flat = torch.cat([d.reshape(-1) for d in diffs])
    _collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
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
        _collective(dist.all_reduce, code, op=dist.ReduceOp.MAX)
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
    """One rank's training: build the solver (seeded random_seed + rank), restore or finetune,
    join the group's averaging, train (the root with solve(), the others with step()), then wait
    for all ranks."""
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
    _collective(dist.barrier)


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


# ---------------------------------------------------------------------------------------------
# Multi-node training: `caffe train` started by torchrun (or any launcher that sets torch's env://
# variables), one process per solver, the processes possibly on several machines.

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PEER_TIMEOUT_ENV = "RECAFFE_PEER_TIMEOUT"  # seconds without a heartbeat before a peer counts as dead
COLLECTIVE_TIMEOUT_ENV = "RECAFFE_COLLECTIVE_TIMEOUT"  # seconds one collective may wait (slow root tests)
DEFAULT_PEER_TIMEOUT_S = 15.0
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
EXIT_PEER_LOST = 3  # the exit code of a rank stopped by its watchdog


def launched_by_torchrun(environ=None) -> bool:
    """True when the env:// rendezvous variables are set (torchrun, or a Slurm script that sets
    them) for a group of more than one process."""
    env = os.environ if environ is None else environ
    if not all(env.get(v) for v in TORCHRUN_VARS):
        return False
    try:
        return int(env["WORLD_SIZE"]) > 1
    except ValueError:
        raise DataParallelError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not a number") from None


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise DataParallelError(f"{name}={value!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise DataParallelError(f"{name}={value!r}: expected a positive number of seconds")
    return seconds


class PeerWatchdog:
    """Notices a rank that died, was stopped, or lost its network, instead of waiting in the next
    collective until its timeout (NCCL can wait forever; gloo notices a closed connection but not a
    stopped process).

    Each rank writes a counter to ``hb/<rank>`` in the rendezvous store every ``interval_s``
    from a thread; a peer whose counter has not moved for ``timeout_s`` (or that wrote
    ``failed: <reason>``), or a store that stays unreachable that long, calls
    ``on_failure(message)`` once. A rank that finished writes ``done`` and is no longer watched.
    The heartbeat runs in its own thread, so a rank busy in a long computation or waiting in a
    collective still counts as alive; only a dead or frozen process stops it.
    """

    def __init__(self, store, rank: int, world: int, timeout_s: float, on_failure,
                 interval_s: float | None = None):
        self.store, self.rank, self.world = store, rank, world
        self.timeout_s = float(timeout_s)
        self.interval_s = min(1.0, self.timeout_s / 5) if interval_s is None else interval_s
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recaffe-peer-watchdog", daemon=True)
        self.failure: str | None = None

    def start(self) -> "PeerWatchdog":
        self.store.set(f"hb/{self.rank}", "0")
        self._thread.start()
        return self

    def stop(self, status: str = "done") -> None:
        """Stop watching and tell the peers this rank left (``done``, or ``failed: <reason>``)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            self.store.set(f"hb/{self.rank}", status)
        except Exception:  # noqa: BLE001 - the store may be gone already; the peers notice that too
            pass

    def _run(self) -> None:
        now = time.monotonic()
        seen = {r: (None, now) for r in range(self.world) if r != self.rank}  # last value, since when
        store_ok = now
        beat = 0
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            beat += 1
            try:
                self.store.set(f"hb/{self.rank}", str(beat))
                for r in list(seen):
                    key = f"hb/{r}"
                    value = self.store.get(key).decode() if self.store.check([key]) else None
                    if value == "done":
                        del seen[r]
                    elif value is not None and value.startswith("failed"):
                        return self._fail(f"rank {r} {value}")
                    elif value != seen[r][0]:
                        seen[r] = (value, now)
                    elif now - seen[r][1] > self.timeout_s:
                        what = "has sent no heartbeat" if value is not None else "never started its heartbeat"
                        return self._fail(f"rank {r} {what} for {self.timeout_s:g} s: it died, was "
                                          "stopped, or its node became unreachable")
                store_ok = now
            except Exception as e:  # noqa: BLE001 - the store's host (rank 0 or torchrun's agent) left
                if now - store_ok > self.timeout_s:
                    return self._fail(f"the rendezvous store has been unreachable for {self.timeout_s:g} s "
                                      f"(its host, rank 0's node, probably died): {e}")

    def _fail(self, message: str) -> None:
        self.failure = message
        self.on_failure(message)


def _exit_on_peer_failure(rank: int, world: int):
    def on_failure(message: str) -> None:
        text = (f"rank {rank} of {world}: stopping: {message}. The other ranks cannot go on without it; "
                "restart the job (from the last snapshot with -snapshot).")
        log.error("%s", text)
        print(f"caffe train: error: {text}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_PEER_LOST)  # the main thread may be blocked in a collective: leave now
    return on_failure


def _store_client(timeout_s: float):
    """A connection of its own to the rendezvous store (torchrun's agent or rank 0 hosts it)."""
    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s))
    run = os.environ.get("TORCHELASTIC_RUN_ID", "") + "/" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"recaffe/{run}/", store)


def train_distributed(param, gpu: bool = False, weights: str | None = None, snapshot: str | None = None,
                      source: str | None = None, sigint_effect: str = "stop",
                      sighup_effect: str = "snapshot", on_start=None, on_finish=None,
                      peer_timeout_s: float | None = None, timeout_s: float | None = None) -> None:
    """This process's share of a training started by torchrun (env:// rendezvous): the same
    semantics as ``caffe train -gpu 0,1`` (see the module's docstring) with the global RANK as
    the solver rank, so Data/HDF5Data layers split records across all processes of all nodes.

    ``gpu``: GPU mode on the GPU LOCAL_RANK of this node (backend nccl); otherwise CPU with gloo.
    A peer that dies or freezes stops this rank within ``peer_timeout_s`` (env
    RECAFFE_PEER_TIMEOUT, default 15 s) with exit code 3; ``timeout_s`` (env
    RECAFFE_COLLECTIVE_TIMEOUT, default 1800 s) bounds one collective, which must outlast the
    root's tests and snapshots. Errors are raised as DataParallelError naming the rank.
    """
    import torch.distributed as dist
    from . import device as _device

    if not launched_by_torchrun():
        missing = [v for v in TORCHRUN_VARS if not os.environ.get(v)]
        raise DataParallelError("train_distributed needs torchrun's environment (RANK, WORLD_SIZE > 1, "
                                f"MASTER_ADDR, MASTER_PORT); missing: {', '.join(missing) or 'none'}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    peer_timeout_s = peer_timeout_s or _env_seconds(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT_S)
    timeout_s = timeout_s or _env_seconds(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S)
    if snapshot and weights:
        raise DataParallelError("Give a snapshot to resume training or weights to finetune but not both.")
    SignalHandler(sigint_effect, sighup_effect)  # checks the effects before joining the group
    if gpu:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= count:
            raise DataParallelError(f"rank {rank} (LOCAL_RANK {local_rank}) needs GPU {local_rank}, but this "
                                    f"node has {count} CUDA device(s): start at most {count} processes "
                                    "per node")
        torch.cuda.set_device(local_rank)
        _device.set_device(local_rank)
        _device.set_mode_gpu()
        backend = "nccl"
    else:
        _device.set_mode_cpu()
        backend = "gloo"
    if rank != 0:
        set_log_level(1)  # Caffe logs only from the root solver
    log.info("Rank %d of %d (local rank %d) on %s, backend %s, rendezvous %s:%s", rank, world, local_rank,
             f"cuda:{local_rank}" if gpu else "cpu", backend, os.environ["MASTER_ADDR"],
             os.environ["MASTER_PORT"])
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    watchdog = None
    status = "done"
    try:
        watchdog = PeerWatchdog(_store_client(peer_timeout_s), rank, world, peer_timeout_s,
                                _exit_on_peer_failure(rank, world)).start()
        with SignalHandler(sigint_effect, sighup_effect) as handler:
            _train_rank(rank, world, param.SerializeToString(), source, weights, snapshot, on_start,
                        on_finish, handler.action)
    except BaseException as e:
        status = f"failed: {type(e).__name__}: {e}".splitlines()[0][:500]
        raise
    finally:
        if watchdog is not None:
            watchdog.stop(status)
        if status == "done":
            dist.destroy_process_group()
