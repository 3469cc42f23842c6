"""Caffe's adaptive solvers: AdaGrad, RMSProp, AdaDelta, Adam.

Each keeps SGD's ApplyUpdate order (clip, normalize, regularize, then its own update value with
``local_rate = rate * lr_mult``) and Caffe's history blobs: one per param for AdaGrad/RMSProp,
two per param (appended after the first set, as Caffe orders them) for AdaDelta and Adam.
"""
from __future__ import annotations

import math

import torch

from ..blob import Blob
from .sgd import SGDSolver
from .solver import SolverError, register_solver


def _require_no_momentum(solver: SGDSolver) -> None:
    if solver.param.momentum != 0:
        raise SolverError(f"Momentum cannot be used with {solver.type} (momentum is {solver.param.momentum:g}; "
                          "remove it from the solver file)")


@register_solver("AdaGrad")
class AdaGradSolver(SGDSolver):
    """history += g^2; diff = local_rate * g / (sqrt(history) + delta)."""

    def pre_solve(self) -> None:
        super().pre_solve()
        _require_no_momentum(self)

    def compute_update_value(self, i: int, blob: Blob, local_rate: float) -> None:
        g = blob.diff_t
        h = self.history[i].data_t
        h.addcmul_(g, g)
        denom = h.sqrt().add_(self.param.delta)
        g.div_(denom).mul_(local_rate)

    def compute_update_values(self, idx: list[int], g: list[torch.Tensor], local_rate: float) -> None:
        h = self.histories(idx)
        torch._foreach_addcmul_(h, g, g)
        _divide_by_root(g, h, self.param.delta, local_rate)


@register_solver("RMSProp")
class RMSPropSolver(SGDSolver):
    """history = rms_decay*history + (1-rms_decay)*g^2; diff = local_rate * g / (sqrt(history) + delta)."""

    def pre_solve(self) -> None:
        super().pre_solve()
        _require_no_momentum(self)

    def compute_update_value(self, i: int, blob: Blob, local_rate: float) -> None:
        decay = self.param.rms_decay
        g = blob.diff_t
        h = self.history[i].data_t
        h.mul_(decay).addcmul_(g, g, value=1 - decay)
        denom = h.sqrt().add_(self.param.delta)
        g.div_(denom).mul_(local_rate)

    def compute_update_values(self, idx: list[int], g: list[torch.Tensor], local_rate: float) -> None:
        decay = self.param.rms_decay
        h = self.histories(idx)
        torch._foreach_mul_(h, decay)
        torch._foreach_addcmul_(h, g, g, value=1 - decay)
        _divide_by_root(g, h, self.param.delta, local_rate)


class _TwoHistorySolver(SGDSolver):
    """Solvers with a second set of history blobs, stored after the first (Caffe's layout)."""

    def pre_solve(self) -> None:
        super().pre_solve()
        self.history += [Blob(b.shape, b.dtype, b.device) for b in self.net.learnable_params]

    def second(self, i: int) -> torch.Tensor:
        return self.history[len(self.net.learnable_params) + i].data_t


@register_solver("AdaDelta")
class AdaDeltaSolver(_TwoHistorySolver):
    """Zeiler's AdaDelta with ``momentum`` as the decay and ``delta`` as epsilon:
    update = g * sqrt((E[dx^2] + delta) / (E[g^2] + delta)); diff = local_rate * update."""

    def compute_update_value(self, i: int, blob: Blob, local_rate: float) -> None:
        m, delta = self.param.momentum, self.param.delta
        g = blob.diff_t
        sq_grad = self.history[i].data_t
        sq_update = self.second(i)
        sq_grad.mul_(m).addcmul_(g, g, value=1 - m)
        update = (sq_update + delta).div_(sq_grad + delta).sqrt_().mul_(g)
        sq_update.mul_(m).addcmul_(update, update, value=1 - m)
        torch.mul(update, local_rate, out=g)

    def compute_update_values(self, idx: list[int], g: list[torch.Tensor], local_rate: float) -> None:
        m, delta = self.param.momentum, self.param.delta
        sq_grad = self.histories(idx)
        sq_update = self.histories(idx, len(self.net.learnable_params))
        torch._foreach_mul_(sq_grad, m)
        torch._foreach_addcmul_(sq_grad, g, g, value=1 - m)
        update = torch._foreach_add(sq_update, delta)
        torch._foreach_div_(update, torch._foreach_add(sq_grad, delta))
        torch._foreach_sqrt_(update)
        torch._foreach_mul_(update, g)
        torch._foreach_mul_(sq_update, m)
        torch._foreach_addcmul_(sq_update, update, update, value=1 - m)
        torch._foreach_mul_(update, local_rate)
        torch._foreach_copy_(g, update)


@register_solver("Adam")
class AdamSolver(_TwoHistorySolver):
    """Adam as Caffe computes it: ``delta`` is added to the *uncorrected* sqrt(v) and the bias
    correction sqrt(1-b2^t)/(1-b1^t) is folded into the rate (t = iter + 1).

    Caffe checks nothing; here momentum (beta1) and momentum2 (beta2) must lie in [0, 1) (with
    beta1 = 1 the correction divides by zero, with beta2 > 1 it is the root of a negative number)."""

    def pre_solve(self) -> None:
        super().pre_solve()
        for name in ("momentum", "momentum2"):
            value = getattr(self.param, name)
            if not 0 <= value < 1:
                raise SolverError(f"{self.source or '<solver>'}: Adam needs 0 <= {name} < 1, got {name}: "
                                  f"{value:g}")

    def compute_update_value(self, i: int, blob: Blob, local_rate: float) -> None:
        b1, b2, eps = self.param.momentum, self.param.momentum2, self.param.delta
        t = self.iter + 1
        correction = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        g = blob.diff_t
        m = self.history[i].data_t
        v = self.second(i)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        update = v.sqrt().add_(eps)
        torch.div(m, update, out=g)
        g.mul_(local_rate * correction)

    def compute_update_values(self, idx: list[int], g: list[torch.Tensor], local_rate: float) -> None:
        b1, b2, eps = self.param.momentum, self.param.momentum2, self.param.delta
        t = self.iter + 1
        correction = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        m = self.histories(idx)
        v = self.histories(idx, len(self.net.learnable_params))
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, g, alpha=1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1 - b2)
        update = torch._foreach_sqrt(v)
        torch._foreach_add_(update, eps)
        torch._foreach_copy_(g, m)
        torch._foreach_div_(g, update)
        torch._foreach_mul_(g, local_rate * correction)


def _divide_by_root(g: list[torch.Tensor], h: list[torch.Tensor], delta: float, local_rate: float) -> None:
    """AdaGrad's and RMSProp's ``g = g / (sqrt(h) + delta) * local_rate``, multi-tensor."""
    denom = torch._foreach_sqrt(h)
    torch._foreach_add_(denom, delta)
    torch._foreach_div_(g, denom)
    torch._foreach_mul_(g, local_rate)
