"""recaffe: Caffe rebuilt in Python on PyTorch kernels, with Caffe's exact semantics.

``import caffe`` gives pycaffe's API on top of this package; ``recaffe`` is the engine.
"""
from . import threads as _threads

_threads.prepare_environment()  # before torch loads its OpenMP runtime (see recaffe.threads)

from .blob import Blob  # noqa: E402
from .device import set_deterministic, set_device, set_mode_cpu, set_mode_gpu  # noqa: E402
from .fastpath import set_compile  # noqa: E402
from .layer import Layer, LayerError, layer_type_list, register  # noqa: E402
from .net import TEST, TRAIN, Net  # noqa: E402
from .precision import set_precision  # noqa: E402
from .proto import caffe_pb2  # noqa: E402
from .rng import set_random_seed  # noqa: E402
from .solvers import SGDSolver, Solver, create_solver, get_solver  # noqa: E402
from .threads import get_num_threads, set_num_threads  # noqa: E402

_threads.apply_environment()

__version__ = "0.1.0"

__all__ = ["Blob", "Layer", "LayerError", "Net", "SGDSolver", "Solver", "TEST", "TRAIN", "caffe_pb2",
           "create_solver", "get_num_threads", "get_solver", "layer_type_list", "register", "set_compile",
           "set_deterministic", "set_precision", "set_device", "set_mode_cpu", "set_mode_gpu", "set_num_threads", "set_random_seed"]
