"""SGD with momentum, exactly as Caffe's SGDSolver::ApplyUpdate.

Order per iteration: rate from the lr policy → ClipGradients (one global L2 norm, when
``clip_gradients >= 0``) → per param: Normalize (÷ iter_size) → Regularize (L2:
``diff += wd*decay_mult*data``; L1: ``diff += wd*decay_mult*sign(data)``) → ComputeUpdateValue
(``history = momentum*history + local_rate*diff; diff = history`` — the learning rate lives
inside the history, unlike torch.optim.SGD) → ``data -= diff``.
"""
from __future__ import annotations

import math
import os

import torch

from ..blob import Blob
from ..io.netfiles import read_net_binary
from ..io.protofiles import read_binary, write_binary
from ..log import get_logger
from ..proto import caffe_pb2
from .solver import Solver, SolverError, register_solver

log = get_logger(__name__)


@register_solver("SGD")
class SGDSolver(Solver):
    def pre_solve(self) -> None:
        # One history blob per learnable param (Caffe also keeps update_/temp_ scratch blobs).
        self.history = [Blob(b.shape, b.dtype, b.device) for b in self.net.learnable_params]
        self._check_regularization()

    def _check_regularization(self) -> None:
        if self.param.regularization_type not in ("L1", "L2"):
            raise SolverError(f"Unknown regularization type: {self.param.regularization_type!r} (L1 or L2)")

    def apply_update(self) -> None:
        p = self.param
        rate = self.lr
        if p.display and self.iter % p.display == 0:
            log.info("Iteration %d, lr = %g", self.iter, rate)
        self.clip_gradients()
        net = self.net
        for i, blob in enumerate(net.learnable_params):
            self.normalize(blob)
            self.regularize(blob, net.params_weight_decay[i])
            self.compute_update_value(i, blob, rate * net.params_lr[i])
        net.update()

    def clip_gradients(self) -> None:
        clip = self.param.clip_gradients
        if clip < 0:
            return
        params = self.net.learnable_params
        sumsq = sum(float(torch.dot(b.diff_t.reshape(-1), b.diff_t.reshape(-1))) for b in params)
        l2norm = math.sqrt(sumsq)
        if l2norm > clip:
            scale = clip / l2norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale factor %g",
                     l2norm, clip, scale)
            for b in params:
                b.diff_t.mul_(scale)

    def normalize(self, blob: Blob) -> None:
        if self.param.iter_size > 1:
            blob.diff_t.mul_(1.0 / self.param.iter_size)

    def regularize(self, blob: Blob, decay_mult: float) -> None:
        local_decay = self.param.weight_decay * decay_mult
        if not local_decay:
            return
        if self.param.regularization_type == "L2":
            blob.diff_t.add_(blob.data_t, alpha=local_decay)
        else:
            blob.diff_t.add_(torch.sign(blob.data_t), alpha=local_decay)

    def compute_update_value(self, i: int, blob: Blob, local_rate: float) -> None:
        history = self.history[i].data_t
        diff = blob.diff_t
        history.mul_(self.param.momentum).add_(diff, alpha=local_rate)
        diff.copy_(history)

    # -------------------------------------------------------------- state
    def history_blobs(self) -> list[Blob]:
        return self.history

    def snapshot_solver_state(self, model_filename: str) -> str:
        state = caffe_pb2.SolverState(iter=self.iter, learned_net=model_filename, current_step=self.current_step)
        for h in self.history_blobs():
            state.history.add().CopyFrom(h.to_proto())
        filename = self.snapshot_filename(".solverstate")
        log.info("Snapshotting solver state to binary proto file %s", filename)
        write_binary(filename, state)
        return filename

    def restore(self, state_file: str) -> None:
        state_file = os.fspath(state_file)
        if state_file.endswith(".h5"):
            raise SolverError(f"{state_file}: HDF5 solver states are not supported yet")
        state = read_binary(state_file, caffe_pb2.SolverState(), "SolverState (.solverstate)")
        self.iter = state.iter
        if state.learned_net:
            model = state.learned_net
            if not os.path.exists(model):  # snapshots moved together: look beside the state file
                alt = os.path.join(os.path.dirname(state_file), os.path.basename(model))
                model = alt if os.path.exists(alt) else model
            self.net.copy_trained_layers_from(read_net_binary(model), model)
        self.current_step = state.current_step
        hist = self.history_blobs()
        if len(state.history) != len(hist):
            raise SolverError(f"{state_file}: incorrect length of history blobs: the state has "
                              f"{len(state.history)}, this net's solver needs {len(hist)} (does the "
                              "state belong to this net and solver type?)")
        log.info("%s: restoring history", type(self).__name__)
        for i, (h, proto) in enumerate(zip(hist, state.history)):
            if not h.shape_equals(proto):
                from ..blob import proto_shape
                raise SolverError(f"{state_file}: history blob {i} has shape {proto_shape(proto)}, this net's "
                                  f"param {i} has shape {h.shape}: the state belongs to another net")
            h.from_proto(proto, reshape=False)


@register_solver("Nesterov")
class NesterovSolver(SGDSolver):
    """Nesterov's accelerated gradient as Caffe computes it: step back along the old history,
    then over-step along the new one: ``diff = (1+m)*history_new - m*history_old``."""

    def compute_update_value(self, i: int, blob: Blob, local_rate: float) -> None:
        m = self.param.momentum
        history = self.history[i].data_t
        diff = blob.diff_t
        old = history.clone()
        history.mul_(m).add_(diff, alpha=local_rate)
        torch.mul(history, 1 + m, out=diff)
        diff.add_(old, alpha=-m)
