"""Caffe's seven learning-rate policies, evaluated at the solver's current iteration.

The rate is computed in double and returned as float32, as Caffe stores it (``Dtype rate``).
``multistep`` advances its step counter at most once per call, as Caffe's GetLearningRate does.
"""
from __future__ import annotations

import math

import numpy as np

from ..log import get_logger
from ..proto import caffe_pb2
from ..errors import RecaffeError

log = get_logger(__name__)

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


class LearningRateError(RecaffeError, ValueError):
    pass


def learning_rate(p: caffe_pb2.SolverParameter, it: int, current_step: int) -> tuple[float, int]:
    """(rate, current_step) for iteration ``it``; ``current_step`` is only changed by step/multistep."""
    policy = p.lr_policy
    base = p.base_lr
    if policy == "fixed":
        rate = base
    elif policy == "step":
        if p.stepsize <= 0:
            raise LearningRateError("lr_policy 'step' needs stepsize > 0")
        current_step = it // p.stepsize
        rate = base * math.pow(p.gamma, current_step)
    elif policy == "exp":
        rate = base * math.pow(p.gamma, it)
    elif policy == "inv":
        rate = base * math.pow(1.0 + p.gamma * it, -p.power)
    elif policy == "multistep":
        if current_step < len(p.stepvalue) and it >= p.stepvalue[current_step]:
            current_step += 1
            log.info("MultiStep Status: Iteration %d, step = %d", it, current_step)
        rate = base * math.pow(p.gamma, current_step)
    elif policy == "poly":
        if p.max_iter <= 0:
            raise LearningRateError("lr_policy 'poly' needs max_iter > 0")
        rate = base * math.pow(1.0 - it / p.max_iter, p.power)
    elif policy == "sigmoid":
        rate = base * (1.0 / (1.0 + math.exp(-p.gamma * (it - p.stepsize))))
    else:
        known = ", ".join(POLICIES)
        raise LearningRateError(f"Unknown learning rate policy: {policy!r} (known: {known})")
    return float(np.float32(rate)), current_step
