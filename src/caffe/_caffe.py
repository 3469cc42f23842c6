"""pycaffe's compiled module ``caffe._caffe``, here in Python on recaffe: the Net and solver
classes, logging, mode/device/seed, multi-solver settings (solver_count, solver_rank, NCCL) and
Timer. Scripts import from it directly (``from caffe._caffe import ...``) as well as from ``caffe``.
"""
from __future__ import annotations

import math
import os
import time

import recaffe
from recaffe import (device, layer_type_list, set_deterministic, set_device, set_mode_cpu,  # noqa: F401
                     set_mode_gpu, set_random_seed)
from recaffe import solvers as _solvers
from recaffe.layers.python_layer import Layer  # noqa: F401
from recaffe.log import get_logger, set_log_level
from recaffe.net import TEST, TRAIN  # noqa: F401
from recaffe.net import Net as _Net
from recaffe.parallel import NCCL, set_solver_count, solver_rank_and_count  # noqa: F401
from recaffe.parallel import set_solver_rank as _set_solver_rank
from recaffe.solvers import get_solver

__version__ = recaffe.__version__
_log = get_logger("caffe")


def solver_count() -> int:
    """How many solvers train together (Caffe::solver_count); 1 alone."""
    return solver_rank_and_count()[1]


def solver_rank() -> int:
    """This process's solver's rank (Caffe::solver_rank); 0 alone or for the root."""
    return solver_rank_and_count()[0]


def set_solver_rank(rank: int) -> None:
    """pycaffe's caffe.set_solver_rank (set with caffe.set_solver_count before building the solver)."""
    _set_solver_rank(rank)


class Net(_Net):
    """``caffe.Net(model, phase, weights=None, level=0, stages=())`` or the legacy
    ``caffe.Net(model, weights, phase)``."""

    def __init__(self, model, *args, weights=None, phase=None, level: int = 0, stages=(), **kwargs):
        args = list(args)
        if args and isinstance(args[0], (str, os.PathLike)):  # legacy Net(model, weights, phase)
            weights = args.pop(0)
        if args:
            phase = args.pop(0)
        if args:
            raise TypeError("caffe.Net(model, phase[, weights=...]) or caffe.Net(model, weights, phase)")
        if phase is None:
            raise TypeError("caffe.Net needs a phase: caffe.TRAIN or caffe.TEST")
        if weights is not None and not os.path.exists(weights):
            raise FileNotFoundError(f"weights file {weights!r} not found")
        super().__init__(model, phase, level=level, stages=stages, weights=weights, **kwargs)


def _solver_constructor(cls):
    def construct(filename):
        solver = get_solver(filename)
        if type(solver) is not cls:
            raise TypeError(f"{filename}: the solver file's type is {solver.type!r}, not {cls.type!r}; "
                            "use caffe.get_solver to build whichever type the file names")
        return solver
    construct.__name__ = cls.__name__
    construct.__doc__ = f"pycaffe's ``caffe.{cls.__name__}('solver.prototxt')`` (the file's type must be {cls.type})."
    return construct


SGDSolver = _solver_constructor(_solvers.SGDSolver)
NesterovSolver = _solver_constructor(_solvers.NesterovSolver)
AdaGradSolver = _solver_constructor(_solvers.AdaGradSolver)
RMSPropSolver = _solver_constructor(_solvers.RMSPropSolver)
AdaDeltaSolver = _solver_constructor(_solvers.AdaDeltaSolver)
AdamSolver = _solver_constructor(_solvers.AdamSolver)


def init_log(level: int | None = None, stderr: bool = True) -> None:
    """pycaffe's init_log([level[, stderr]]): with ``level``, show log lines of at least that
    severity (0 INFO, 1 WARNING, 2 ERROR), as FLAGS_minloglevel. recaffe always logs to stderr."""
    if level is not None:
        set_log_level(level)


def log(message: str) -> None:
    """pycaffe's caffe.log: one INFO line in glog's format (LOG(INFO) << message)."""
    _log.info("%s", message)


def has_nccl() -> bool:
    """Whether torch has its NCCL backend (the GPU transport Caffe's NCCL names). caffe.NCCL works
    either way: on CPU its solvers exchange gradients over gloo."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_nccl_available()


def set_multiprocess(multiprocess: bool) -> None:
    """pycaffe's caffe.set_multiprocess: Caffe's flag that solvers run one per process (as with
    caffe.NCCL), which is the only way recaffe runs several; kept for scripts that set it."""
    global _multiprocess
    _multiprocess = bool(multiprocess)


def multiprocess() -> bool:
    return _multiprocess


_multiprocess = False


class Timer:
    """pycaffe's caffe.Timer (Caffe's Timer): ``start()``, ``stop()``, ``ms``. Reading ``ms`` stops
    a running timer; a timer never started reads 0 with a warning. In CPU mode the time is in
    whole milliseconds, as Caffe's; in GPU mode CUDA work is waited for (Caffe times with CUDA
    events) and the time is fractional."""

    def __init__(self):
        self._start = self._stop = 0.0
        self.running = False
        self.has_run_at_least_once = False

    def _now(self) -> float:
        if device.mode() == "gpu":
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        if not self.running:
            self._start = self._now()
            self.running = True
            self.has_run_at_least_once = True

    def stop(self) -> None:
        if self.running:
            self._stop = self._now()
            self.running = False

    @property
    def ms(self) -> float:
        if not self.has_run_at_least_once:
            _log.warning("Timer has never been run before reading time.")
            return 0.0
        self.stop()
        elapsed = (self._stop - self._start) * 1000.0
        return elapsed if device.mode() == "gpu" else float(math.floor(elapsed))


