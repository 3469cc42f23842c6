"""recaffe: Caffe rebuilt in Python on PyTorch kernels, with Caffe's exact semantics.

``import caffe`` gives pycaffe's API on top of this package; ``recaffe`` is the engine.
"""
from .blob import Blob
from .device import set_deterministic, set_device, set_mode_cpu, set_mode_gpu
from .fastpath import set_compile
from .layer import Layer, LayerError, layer_type_list, register
from .net import TEST, TRAIN, Net
from .proto import caffe_pb2
from .rng import set_random_seed
from .solvers import SGDSolver, Solver, create_solver, get_solver

__version__ = "0.1.0"

__all__ = ["Blob", "Layer", "LayerError", "Net", "SGDSolver", "Solver", "TEST", "TRAIN", "caffe_pb2",
           "create_solver", "get_solver", "layer_type_list", "register", "set_compile", "set_deterministic",
           "set_device", "set_mode_cpu", "set_mode_gpu", "set_random_seed"]
