"""Net and solver definitions read from disk, upgraded to the current format (V0/V1 layers, data
transformation fields, input fields, old BatchNorm params, solver_type: see upgrade.py)."""
from __future__ import annotations

import os

from ..log import get_logger
from ..proto import caffe_pb2
from .fork_fields import remap_fork_fields, weights_only_net_class, weights_only_to_net
from .large_proto import read_binary_any_size
from .protofiles import ProtoFileError, read_text
from .upgrade import upgrade_net, upgrade_solver

log = get_logger(__name__)


def read_net_text(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    path = os.fspath(path)
    return upgrade_net(read_text(path, caffe_pb2.NetParameter()), path)


def read_net_binary(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """A ``.caffemodel`` (binary NetParameter with weights), of any size (over 2 GB too)."""
    path = os.fspath(path)
    what = "NetParameter (.caffemodel)"
    try:
        param = read_binary_any_size(path, caffe_pb2.NetParameter(), what)
    except ProtoFileError as full_error:
        # A fork's param under a number BVLC gives to another message can make the full parse fail;
        # the weights (names, types, blobs) are still there: read only those (io/fork_fields.py).
        try:
            param = weights_only_to_net(read_binary_any_size(path, weights_only_net_class()(), what))
        except ProtoFileError:
            raise full_error from None
        log.warning("%s: read layer names, types and weights only; some layer params are not "
                    "BVLC Caffe's (a Caffe fork's file?)", path)
    return remap_fork_fields(upgrade_net(param, path))


def read_solver_text(path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    path = os.fspath(path)
    return upgrade_solver(read_text(path, caffe_pb2.SolverParameter()), path)
