"""Solvers: the training loop (solver.py), the update rules (one module per family) and the
learning-rate policies. ``create_solver`` picks the class from the solver's ``type``."""
from __future__ import annotations

import os

from ..io.netfiles import read_solver_text
from ..io.upgrade import upgrade_solver
from ..proto import caffe_pb2
from .solver import Solver, SolverError, solver_registry
from .sgd import NesterovSolver, SGDSolver
from .adaptive import AdaDeltaSolver, AdaGradSolver, AdamSolver, RMSPropSolver

__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "NesterovSolver", "RMSPropSolver", "SGDSolver",
           "Solver", "SolverError", "create_solver", "get_solver"]


def create_solver(param: caffe_pb2.SolverParameter, source: str | None = None) -> Solver:
    upgraded = caffe_pb2.SolverParameter()
    upgraded.CopyFrom(param)
    param = upgrade_solver(upgraded, source or "<solver>")
    cls = solver_registry.get(param.type)
    if cls is None:
        raise SolverError(f"Unknown solver type: {param.type!r} (known types: {', '.join(sorted(solver_registry))})")
    return cls(param, source=source)


def get_solver(filename: str | os.PathLike) -> Solver:
    """Build the solver a ``solver.prototxt`` describes (pycaffe's ``caffe.get_solver``)."""
    filename = os.fspath(filename)
    return create_solver(read_solver_text(filename), source=filename)
