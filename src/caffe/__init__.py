"""pycaffe's API, unchanged, on recaffe: ``import caffe`` and run your pycaffe scripts.

    net = caffe.Net('deploy.prototxt', caffe.TEST, weights='model.caffemodel')
    solver = caffe.SGDSolver('solver.prototxt'); solver.step(100)
"""
from __future__ import annotations

import os

import recaffe
from recaffe import layer_type_list, set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from recaffe.net import TEST, TRAIN
from recaffe.net import Net as _Net
from recaffe.solvers import SGDSolver as _SGDSolver
from recaffe.solvers import get_solver

from . import proto  # noqa: F401  (caffe.proto.caffe_pb2)

__version__ = recaffe.__version__


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


def SGDSolver(filename):
    """pycaffe's ``caffe.SGDSolver('solver.prototxt')`` (the file's ``type`` must be SGD)."""
    solver = get_solver(filename)
    if not isinstance(solver, _SGDSolver):
        raise TypeError(f"{filename}: solver type is {solver.type!r}, not SGD; use caffe.get_solver")
    return solver


def init_log(level: int = 0) -> None:
    """Show log lines of at least ``level`` (0 INFO, 1 WARNING, 2 ERROR), like pycaffe's init_log."""
    from recaffe.log import set_log_level
    set_log_level(level)


__all__ = ["Net", "SGDSolver", "TEST", "TRAIN", "get_solver", "init_log", "layer_type_list", "set_device",
           "set_mode_cpu", "set_mode_gpu", "set_random_seed"]
