"""pycaffe's API, unchanged, on recaffe: ``import caffe`` and run your pycaffe scripts.

    net = caffe.Net('deploy.prototxt', caffe.TEST, weights='model.caffemodel')
    solver = caffe.SGDSolver('solver.prototxt'); solver.step(100)
"""
from __future__ import annotations

# The names pycaffe's __init__ imports, from the same modules.
from . import proto  # noqa: F401  (caffe.proto.caffe_pb2)
from ._caffe import (Layer, __version__, get_solver, has_nccl, init_log, layer_type_list, log,  # noqa: F401
                     set_deterministic, set_device, set_mode_cpu, set_mode_gpu, set_multiprocess,
                     set_random_seed, set_solver_count, set_solver_rank, solver_count, solver_rank)
from .pycaffe import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NCCL, Net, NesterovSolver,  # noqa: F401
                      RMSPropSolver, SGDSolver, Timer)
from .proto.caffe_pb2 import TEST, TRAIN  # noqa: F401

__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "Layer", "NCCL", "Net", "NesterovSolver",
           "RMSPropSolver", "SGDSolver", "TEST", "TRAIN", "Timer", "get_solver", "has_nccl", "init_log",
           "layer_type_list", "log", "set_deterministic", "set_device", "set_mode_cpu", "set_mode_gpu",
           "set_multiprocess", "set_random_seed", "set_solver_count", "set_solver_rank", "solver_count",
           "solver_rank", "set_compile", "set_num_threads", "set_precision"]

from recaffe import set_compile, set_num_threads, set_precision  # noqa: E402  (recaffe: -compile, -threads, -precision)

# pycaffe's net specification (caffe.NetSpec, caffe.layers, caffe.params, caffe.to_proto,
# caffe.net_spec) and the base class of Python layers (caffe.Layer).
import sys as _sys  # noqa: E402

from recaffe import net_spec  # noqa: E402
from recaffe.net_spec import NetSpec, layers, params, to_proto  # noqa: E402

_sys.modules[__name__ + ".net_spec"] = net_spec  # `import caffe.net_spec` works, as in pycaffe
__all__ += ["NetSpec", "layers", "params", "to_proto"]

# pycaffe's preprocessing and image helpers (caffe.io) and its Net subclasses for images.
from . import io  # noqa: E402
from .classifier import Classifier  # noqa: E402
from .detector import Detector  # noqa: E402

__all__ += ["Classifier", "Detector", "io"]

# Modules the forks shipped inside their pycaffe (the SSD fork's model_libs), from the user's copy.
from .fork_modules import install as _install_fork_modules  # noqa: E402

_install_fork_modules()
