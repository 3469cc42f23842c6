"""pycaffe's API, unchanged, on recaffe: ``import caffe`` and run your pycaffe scripts.

    net = caffe.Net('deploy.prototxt', caffe.TEST, weights='model.caffemodel')
    solver = caffe.SGDSolver('solver.prototxt'); solver.step(100)
"""
from __future__ import annotations

import os

import recaffe
from recaffe import (layer_type_list, set_compile, set_deterministic, set_device, set_mode_cpu,
                     set_mode_gpu, set_random_seed)
from recaffe.net import TEST, TRAIN
from recaffe.net import Net as _Net
from recaffe import solvers as _solvers
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


def init_log(level: int = 0) -> None:
    """Show log lines of at least ``level`` (0 INFO, 1 WARNING, 2 ERROR), like pycaffe's init_log."""
    from recaffe.log import set_log_level
    set_log_level(level)


__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "Net", "NesterovSolver", "RMSPropSolver",
           "SGDSolver", "TEST", "TRAIN", "get_solver", "init_log", "layer_type_list", "set_compile",
           "set_deterministic", "set_device", "set_mode_cpu", "set_mode_gpu", "set_random_seed"]

# pycaffe's net specification (caffe.NetSpec, caffe.layers, caffe.params, caffe.to_proto,
# caffe.net_spec) and the base class of Python layers (caffe.Layer).
import sys as _sys  # noqa: E402

from recaffe import net_spec  # noqa: E402
from recaffe.layers.python_layer import Layer  # noqa: E402
from recaffe.net_spec import NetSpec, layers, params, to_proto  # noqa: E402

_sys.modules[__name__ + ".net_spec"] = net_spec  # `import caffe.net_spec` works, as in pycaffe
__all__ += ["Layer", "NetSpec", "layers", "params", "to_proto"]

# pycaffe's preprocessing and image helpers (caffe.io) and its Net subclasses for images.
from . import io  # noqa: E402
from .classifier import Classifier  # noqa: E402
from .detector import Detector  # noqa: E402

__all__ += ["Classifier", "Detector", "io"]
