"""pycaffe's ``caffe.pycaffe`` module: the Net and solver classes (and NCCL, Timer) with
pycaffe's Python interface (``net.blobs``, ``net.params``, ``net.forward``, ``forward_all``,
``forward_backward_all``, ...), for scripts that write ``from caffe.pycaffe import Net``.
recaffe's Net has that interface itself, so this module only names the classes."""
from ._caffe import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NCCL, Net, NesterovSolver,  # noqa: F401
                     RMSPropSolver, SGDSolver, Timer)
