"""Caffe's seven learning-rate policies, evaluated at the solver's current iteration.

The rate is computed in double and returned as float32, as Caffe stores it (``Dtype rate``).
``multistep`` advances its step counter at most once per call, as Caffe's GetLearningRate does.

Overflow saturates as C's pow/exp do (``sigmoid`` with a huge exponent gives 0, ``exp`` gives 0 or
inf), where Python's math module would raise. Settings for which Caffe's formula has no real value
(``poly`` past max_iter with a fractional power, ``inv`` once 1 + gamma*iter < 0 with a fractional
power) raise a LearningRateError naming the policy, the iteration and the settings, instead of
training on with a NaN rate as Caffe 1.0 does; ``check_policy`` rejects at solver init the settings
that reach that point within max_iter.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import RecaffeError
from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger(__name__)

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


class LearningRateError(RecaffeError, ValueError):
    pass


def _pow(base: float, exponent: float, what: str) -> float:
    """C's pow: overflow gives inf, underflow 0; a negative base with a fractional exponent (NaN in
    C) is an error naming ``what``."""
    try:
        return math.pow(base, exponent)
    except OverflowError:
        return math.inf
    except (ValueError, ZeroDivisionError):
        if base == 0:  # 0 ** negative: C gives inf
            return math.inf
        raise LearningRateError(f"{what}: the rate is {base:g} ** {exponent:g}, which has no real value "
                                "(Caffe would train on with a NaN learning rate)") from None


def _sigmoid(x: float) -> float:
    """1 / (1 + exp(-x)) without overflow: exp(-x) past the double range gives 0."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # never overflows here
    return e / (1.0 + e)


def check_policy(p: caffe_pb2.SolverParameter) -> None:
    """Reject at solver init the settings whose rate has no real value before max_iter."""
    if p.lr_policy == "inv" and p.gamma < 0 and not float(p.power).is_integer():
        last = 1.0 + p.gamma * p.max_iter
        if last < 0:
            raise LearningRateError(
                f"lr_policy 'inv' with gamma {p.gamma:g} and power {p.power:g}: 1 + gamma * iter is negative "
                f"from iteration {math.floor(-1 / p.gamma) + 1} on (max_iter {p.max_iter}), where "
                "(1 + gamma * iter) ** -power has no real value; use gamma >= 0")


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
        rate = base * _pow(p.gamma, current_step, f"lr_policy 'step' at iteration {it}")
    elif policy == "exp":
        rate = base * _pow(p.gamma, it, f"lr_policy 'exp' at iteration {it}")
    elif policy == "inv":
        rate = base * _pow(1.0 + p.gamma * it, -p.power,
                           f"lr_policy 'inv' at iteration {it} (gamma {p.gamma:g}, power {p.power:g})")
    elif policy == "multistep":
        if current_step < len(p.stepvalue) and it >= p.stepvalue[current_step]:
            current_step += 1
            log.info("MultiStep Status: Iteration %d, step = %d", it, current_step)
        rate = base * _pow(p.gamma, current_step, f"lr_policy 'multistep' at iteration {it}")
    elif policy == "poly":
        if p.max_iter <= 0:
            raise LearningRateError("lr_policy 'poly' needs max_iter > 0")
        rate = base * _pow(1.0 - it / p.max_iter, p.power, f"lr_policy 'poly' at iteration {it}, past "
                           f"max_iter {p.max_iter} (power {p.power:g})")
    elif policy == "sigmoid":
        rate = base * _sigmoid(p.gamma * (it - p.stepsize))
    else:
        known = ", ".join(POLICIES)
        raise LearningRateError(f"Unknown learning rate policy: {policy!r} (known: {known})")
    return float(np.float32(rate)), current_step
