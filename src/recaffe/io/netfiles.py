"""Net and solver definitions read from disk, upgraded to the current format."""
from __future__ import annotations

import os

from ..proto import caffe_pb2
from .protofiles import read_binary, read_text
from .upgrade import upgrade_net, upgrade_solver


def read_net_text(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    path = os.fspath(path)
    return upgrade_net(read_text(path, caffe_pb2.NetParameter()), path)


def read_net_binary(path: str | os.PathLike) -> caffe_pb2.NetParameter:
    """A ``.caffemodel`` (binary NetParameter with weights)."""
    path = os.fspath(path)
    return upgrade_net(read_binary(path, caffe_pb2.NetParameter(), "NetParameter (.caffemodel)"), path)


def read_solver_text(path: str | os.PathLike) -> caffe_pb2.SolverParameter:
    path = os.fspath(path)
    return upgrade_solver(read_text(path, caffe_pb2.SolverParameter()), path)
