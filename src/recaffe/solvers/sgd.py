"""SGD with momentum, exactly as Caffe's SGDSolver::ApplyUpdate.

Order per iteration: rate from the lr policy → ClipGradients (one global L2 norm, when
``clip_gradients >= 0``) → per param: Normalize (÷ iter_size) → Regularize (L2:
``diff += wd*decay_mult*data``; L1: ``diff += wd*decay_mult*sign(data)``) → ComputeUpdateValue
(``history = momentum*history + local_rate*diff; diff = history`` — the learning rate lives
inside the history, unlike torch.optim.SGD) → ``data -= diff``.

``regularization_type: "decoupled"`` (recaffe's option, for every solver type) skips Regularize and
instead adds ``local_rate * weight_decay * decay_mult * data`` to the final update: Adam becomes
AdamW, SGD becomes SGDW (see docs/semantics.md).
"""
from __future__ import annotations

import math
import os

import torch

from ..blob import Blob, proto_shape
from ..io import hdf5_weights
from ..io.protofiles import read_binary, write_binary
from ..log import get_logger
from ..proto import caffe_pb2
from .solver import Solver, SolverError, register_solver

log = get_logger(__name__)

# regularization_type value for decoupled weight decay (beyond Caffe; AdamW/SGDW):
# data -= local_rate * weight_decay * decay_mult * data, applied next to the update, never through
# the gradient, so momentum and adaptive scaling do not see it.
DECOUPLED = "decoupled"


@register_solver("SGD")
class SGDSolver(Solver):
    def pre_solve(self) -> None:
        # One history blob per learnable param (Caffe also keeps update_/temp_ scratch blobs).
        self.history = [Blob(b.shape, b.dtype, b.device) for b in self.net.learnable_params]
        self._check_regularization()

    def _check_regularization(self) -> None:
        if self.param.regularization_type not in ("L1", "L2", DECOUPLED):
            raise SolverError(f"Unknown regularization type: {self.param.regularization_type!r} "
                              f"(L1, L2, or {DECOUPLED!r} for decoupled weight decay)")

    # Multi-tensor update (torch._foreach_*): the params are grouped by (lr_mult, decay_mult) so
    # that each group's rate and decay are single scalars, and each group runs the very op sequence
    # of the per-param methods below, so every param sees the same float ops in the same order
    # (bit-exact; tests/test_foreach_update.py). Set False to run the per-param loop instead.
    foreach = True

    def apply_update(self) -> None:
        p = self.param
        rate = self.lr
        if p.display and self.iter % p.display == 0:
            log.info("Iteration %d, lr = %g", self.iter, rate)
        scaler = self.loss_scaler
        if scaler is not None and not scaler.unscale_([b.diff_t for b in self.net.learnable_params], self.iter):
            return  # float16 gradients overflowed: no update (precision.LossScaler)
        self.clip_gradients()
        if self.foreach and self._has_foreach_rule():
            self._apply_update_foreach(rate)
        else:
            self._apply_update_loop(rate)
        self.net.update()

    def _apply_update_loop(self, rate: float) -> None:
        """Caffe's loop, one param at a time."""
        net, p = self.net, self.param
        decoupled = p.regularization_type == DECOUPLED
        for i, blob in enumerate(net.learnable_params):
            local_rate = rate * net.params_lr[i]
            self.normalize(blob)
            if not decoupled:
                self.regularize(blob, net.params_weight_decay[i])
            self.compute_update_value(i, blob, local_rate)
            if decoupled:
                # Decay the weights directly, outside the gradient and the solver's history.
                local_decay = p.weight_decay * net.params_weight_decay[i]
                if local_decay:
                    blob.diff_t.add_(blob.data_t, alpha=local_rate * local_decay)

    def _has_foreach_rule(self) -> bool:
        """A subclass that overrides only the per-param ``compute_update_value`` keeps the loop."""
        cls = type(self)
        return _owner(cls, "compute_update_values") is _owner(cls, "compute_update_value")

    def param_groups(self) -> list[tuple[float, float, list[int]]]:
        """(lr_mult, decay_mult, indices into learnable_params), in order of first appearance."""
        net = self.net
        groups: dict[tuple[float, float], list[int]] = {}
        for i, key in enumerate(zip(net.params_lr, net.params_weight_decay)):
            groups.setdefault(key, []).append(i)
        return [(lr, decay, idx) for (lr, decay), idx in groups.items()]

    def _apply_update_foreach(self, rate: float) -> None:
        """The loop above as multi-tensor ops, one group of equal multipliers at a time."""
        net, p = self.net, self.param
        params = net.learnable_params
        decoupled = p.regularization_type == DECOUPLED
        for lr_mult, decay_mult, group in self.param_groups():
            local_rate = rate * lr_mult
            local_decay = p.weight_decay * decay_mult
            for idx in self._chunks(group):
                datas = [params[i].data_t for i in idx]
                diffs = [params[i].diff_t for i in idx]
                if p.iter_size > 1:
                    torch._foreach_mul_(diffs, 1.0 / p.iter_size)
                if not decoupled and local_decay:
                    if p.regularization_type == "L2":
                        torch._foreach_add_(diffs, datas, alpha=local_decay)
                    else:
                        torch._foreach_add_(diffs, torch._foreach_sign(datas), alpha=local_decay)
                self.compute_update_values(idx, diffs, local_rate)
                if decoupled and local_decay:
                    torch._foreach_add_(diffs, datas, alpha=local_rate * local_decay)

    # On CPU each multi-tensor op streams over all of its tensors, so a group as large as ResNet-50's
    # 25M values leaves the cache between ops; chunks of about a megabyte per tensor keep a chunk's
    # ops in cache (benchmarks/update_bench.py). On a GPU a group is one set of fused launches.
    CPU_CHUNK = 1 << 18

    def _chunks(self, idx: list[int]) -> list[list[int]]:
        params = self.net.learnable_params
        if not idx or params[idx[0]].device.type != "cpu":
            return [idx]
        chunks, cur, n = [], [], 0
        for i in idx:
            c = params[i].count()
            if cur and n + c > self.CPU_CHUNK:
                chunks.append(cur)
                cur, n = [], 0
            cur.append(i)
            n += c
        chunks.append(cur)
        return chunks

    def clip_gradients(self) -> None:
        clip = self.param.clip_gradients
        if clip < 0 or not self.net.learnable_params:
            return
        params = self.net.learnable_params
        # Per-param float32 dots summed in double in param order, as Caffe's loop (one host sync).
        dots = torch.stack([torch.dot(b.diff_t.reshape(-1), b.diff_t.reshape(-1)) for b in params])
        sumsq = sum(dots.tolist())
        l2norm = math.sqrt(sumsq)
        if l2norm > clip:
            scale = clip / l2norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale factor %g",
                     l2norm, clip, scale)
            torch._foreach_mul_([b.diff_t for b in params], scale)

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

    def compute_update_values(self, idx: list[int], diffs: list[torch.Tensor], local_rate: float) -> None:
        """``compute_update_value`` for the params ``idx`` at once (same ops, same order)."""
        history = self.histories(idx)
        torch._foreach_mul_(history, self.param.momentum)
        torch._foreach_add_(history, diffs, alpha=local_rate)
        torch._foreach_copy_(diffs, history)

    def histories(self, idx: list[int], offset: int = 0) -> list[torch.Tensor]:
        return [self.history[offset + i].data_t for i in idx]

    # -------------------------------------------------------------- state
    def history_blobs(self) -> list[Blob]:
        return self.history

    def snapshot_solver_state(self, model_filename: str) -> str:
        if self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            filename = self.snapshot_filename(".solverstate.h5")
            log.info("Snapshotting solver state to HDF5 file %s", filename)
            hdf5_weights.save_state(filename, self.iter, model_filename, self.current_step, self.history_blobs())
            return filename
        state = caffe_pb2.SolverState(iter=self.iter, learned_net=model_filename, current_step=self.current_step)
        for h in self.history_blobs():
            state.history.add().CopyFrom(h.to_proto())
        filename = self.snapshot_filename(".solverstate")
        log.info("Snapshotting solver state to binary proto file %s", filename)
        write_binary(filename, state)
        return filename

    def restore(self, state_file: str) -> None:
        """Restore iter, lr step, history and (via ``learned_net``) the weights, from either format."""
        state_file = os.fspath(state_file)
        if state_file.endswith(".h5"):
            try:
                it, model, step, history = hdf5_weights.load_state(state_file,
                                                                   [h.shape for h in self.history_blobs()])
            except hdf5_weights.HDF5FormatError as e:
                raise SolverError(str(e)) from None
        else:
            state = read_binary(state_file, caffe_pb2.SolverState(), "SolverState (.solverstate)")
            it, model, step, history = state.iter, state.learned_net or None, state.current_step, state.history
        self.iter = it
        self._iterations_last = it  # (Caffe leaves it as it was; counting from here gives a true rate)
        if isinstance(model, bytes):  # not UTF-8: protobuf hands the bytes over; a path as Caffe reads it
            model = os.fsdecode(model)
        if model:
            if not os.path.exists(model):  # snapshots moved together: look beside the state file
                alt = os.path.join(os.path.dirname(state_file), os.path.basename(model))
                model = alt if os.path.exists(alt) else model
            self.net.copy_from(model)
        self.current_step = step
        hist = self.history_blobs()
        if len(history) != len(hist):
            raise SolverError(f"{state_file}: incorrect length of history blobs: the state has "
                              f"{len(history)}, this net's solver needs {len(hist)} (does the "
                              "state belong to this net and solver type?)")
        log.info("%s: restoring history", type(self).__name__)
        for i, (h, saved) in enumerate(zip(hist, history)):
            shape = proto_shape(saved) if isinstance(saved, caffe_pb2.BlobProto) else tuple(saved.shape)
            if shape != h.shape and not (isinstance(saved, caffe_pb2.BlobProto) and h.shape_equals(saved)):
                raise SolverError(f"{state_file}: history blob {i} has shape {shape}, this net's "
                                  f"param {i} has shape {h.shape}: the state belongs to another net")
            if isinstance(saved, caffe_pb2.BlobProto):
                h.from_proto(saved, reshape=False, where=f"{state_file}: history blob {i}")
            else:
                h.data[...] = saved


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

    def compute_update_values(self, idx: list[int], diffs: list[torch.Tensor], local_rate: float) -> None:
        m = self.param.momentum
        history = self.histories(idx)
        old = [h.clone() for h in history]
        torch._foreach_mul_(history, m)
        torch._foreach_add_(history, diffs, alpha=local_rate)
        torch._foreach_copy_(diffs, history)
        torch._foreach_mul_(diffs, 1 + m)
        torch._foreach_add_(diffs, old, alpha=-m)


def _owner(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO that defines ``name``."""
    return next(k for k in cls.__mro__ if name in k.__dict__)
