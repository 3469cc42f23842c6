"""Net and solver definitions read from disk, upgraded to the current format (V0/V1 layers, data
transformation fields, input fields, old BatchNorm params, solver_type: see upgrade.py)."""
from __future__ import annotations

import os

from ..proto import caffe_pb2
from .fork_fields import remap_fork_fields
from .large_proto import read_binary_any_size
from .protofiles import read_text
from .upgrade import upgrade_net, upgrade_solver


def read_net_text(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    path = os.fspath(path)
    return upgrade_net(read_text(path, caffe_pb2.NetParameter()), path)


def read_net_binary(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """A ``.caffemodel`` (binary NetParameter with weights), of any size (over 2 GB too)."""
    path = os.fspath(path)
    param = read_binary_any_size(path, caffe_pb2.NetParameter(), "NetParameter (.caffemodel)")
    return remap_fork_fields(upgrade_net(param, path))


def read_solver_text(path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    path = os.fspath(path)
    return upgrade_solver(read_text(path, caffe_pb2.SolverParameter()), path)
