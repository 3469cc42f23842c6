"""The training loop shared by every solver type (Caffe's Solver): nets, step/solve, tests,
display with loss smoothing, snapshots and restore. Update rules live in the subclasses.
"""
from __future__ import annotations

import os
import re
import time
from typing import Callable

from google.protobuf import text_format

from .. import device as _device
from .. import rng
from ..errors import RecaffeError
from ..io.netfiles import read_net_text
from ..io.protofiles import locked_temporary, remove_stale_temporaries
from ..io.upgrade import upgrade_solver
from ..log import get_logger
from ..net import Net
from ..parallel import solver_rank_and_count
from ..precision import LossScaler
from ..proto import caffe_pb2
from ..signals import deferred_interrupts
from .lr_policies import LearningRateError, check_policy, learning_rate

log = get_logger(__name__)

solver_registry: dict[str, type["Solver"]] = {}


class SolverError(RecaffeError, ValueError):
    pass


def register_solver(name: str):
    def deco(cls):
        solver_registry[name] = cls
        cls.type = name
        return cls
    return deco


class Solver:
    type = ""

    def __init__(self, param: caffe_pb2.SolverParameter | str, source: str | None = None):
        if isinstance(param, (str, os.PathLike)):
            from ..io.netfiles import read_solver_text
            source = os.fspath(param)
            param = read_solver_text(source)
        else:
            param = upgrade_solver(_copy(param), source or "<solver>")
        self.param = param
        self.source = source
        try:
            self._upgrade_snapshot_prefix()
        except UnicodeEncodeError:  # protobuf strings are UTF-8; a file name need not be
            raise SolverError(f"{source!r}: the solver file's name is not UTF-8, so snapshot_prefix cannot be "
                              "derived from it: set snapshot_prefix in the solver file") from None
        log.info("Initializing solver from parameters: \n%s", text_format.MessageToString(param))
        from ..io.fork_fields import unimplemented_fields
        nv = unimplemented_fields(param)
        if nv:
            log.warning("NVCaffe's solver fields (%s) are read but not used: recaffe follows Caffe's "
                        "solver (float32 math, BVLC's policies)", ", ".join(nv))
        if param.average_loss < 1:
            raise SolverError("average_loss should be non-negative (>= 1)")
        if param.iter_size < 1:
            raise SolverError("iter_size must be >= 1")
        if param.eval_type not in ("classification", "detection"):
            raise SolverError(f"eval_type {param.eval_type!r}: recaffe knows 'classification' and the SSD "
                              "fork's 'detection'")
        if param.eval_type == "detection" and param.ap_version not in ("11point", "MaxIntegral", "Integral"):
            raise SolverError(f"ap_version {param.ap_version!r}: one of 11point, MaxIntegral, Integral")
        try:
            check_policy(param)
        except LearningRateError as e:
            raise SolverError(f"{source or '<solver>'}: {e}") from None
        if param.HasField("solver_mode") and param.solver_mode == caffe_pb2.SolverParameter.GPU \
                and _device.mode() == "cpu":
            log.info("solver_mode is GPU but recaffe runs in CPU mode (use -gpu or caffe.set_mode_gpu() "
                     "for CUDA); training on CPU")
        self.iter = 0
        if param.snapshot:  # before the nets are built, as Caffe's CheckSnapshotWritePermissions
            self.check_snapshot_prefix("snapshot")
        self.remove_stale_snapshot_temporaries()
        if param.random_seed >= 0:
            # Caffe's Solver::Init: each of several solvers (caffe.NCCL, -gpu 0,1) seeds with seed + rank.
            rng.set_random_seed(param.random_seed + solver_rank_and_count()[0])
        self.callbacks: list[tuple[Callable | None, Callable | None]] = []
        self.requested_early_exit = False
        self.action_request: Callable[[], str] | None = None
        self._init_train_net()
        self._init_test_nets()
        plan = self.net.precision
        # float16 (or a prototxt's global_grad_scale): the loss scale, unscaled before each update
        self.loss_scaler = LossScaler(plan.loss_scale, plan.dynamic) \
            if plan.loss_scale != 1 or plan.dynamic else None
        log.info("Solver scaffolding done.")
        self.current_step = 0
        self.smoothed_loss = 0.0
        # Caffe's iteration_timer_ and iterations_last_: the display's iter/s spans step() calls
        # (the timer runs from one display to the next; step() only starts it when stopped).
        self._display_timer_start: float | None = None
        self._iterations_last = 0
        self.losses: list[float] = []
        self.pre_solve()

    # ------------------------------------------------------------------ nets
    def _upgrade_snapshot_prefix(self) -> None:
        p = self.param
        if self.source is None:
            return
        if not p.HasField("snapshot_prefix"):
            p.snapshot_prefix = os.path.splitext(self.source)[0]
            log.info("snapshot_prefix was not specified and is set to %s", p.snapshot_prefix)
        elif os.path.isdir(p.snapshot_prefix):
            stem = os.path.splitext(os.path.basename(self.source))[0]
            p.snapshot_prefix = os.path.join(p.snapshot_prefix, stem)
            log.info("snapshot_prefix is a directory and is set to %s", p.snapshot_prefix)

    def _resolve(self, path: str) -> str:
        """Caffe reads net files relative to the working directory; if that fails we also try the
        solver file's folder, so a solver can be run from anywhere."""
        if os.path.exists(path) or self.source is None or os.path.isabs(path):
            return path
        alt = os.path.join(os.path.dirname(self.source), path)
        return alt if os.path.exists(alt) else path

    def _init_train_net(self) -> None:
        p = self.param
        fields = "net, net_param, train_net, train_net_param"
        n = sum([p.HasField("net_param"), p.HasField("train_net_param"), p.HasField("net"), p.HasField("train_net")])
        if n < 1:
            raise SolverError(f"SolverParameter must specify a train net using one of these fields: {fields}")
        if n > 1:
            raise SolverError(f"SolverParameter must not contain more than one of these fields specifying a "
                              f"train_net: {fields}")
        if p.HasField("train_net_param"):
            log.info("Creating training net specified in train_net_param.")
            net_param = _copy(p.train_net_param)
        elif p.HasField("train_net"):
            log.info("Creating training net from train_net file: %s", p.train_net)
            net_param = read_net_text(self._resolve(p.train_net))
        elif p.HasField("net_param"):
            log.info("Creating training net specified in net_param.")
            net_param = _copy(p.net_param)
        else:
            log.info("Creating training net from net file: %s", p.net)
            net_param = read_net_text(self._resolve(p.net))
        state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN)
        state.MergeFrom(net_param.state)
        state.MergeFrom(p.train_state)
        net_param.state.CopyFrom(state)
        self.net = Net(net_param)
        self._load_weights(self.net)

    def _init_test_nets(self) -> None:
        p = self.param
        has_net_param, has_net_file = p.HasField("net_param"), p.HasField("net")
        if has_net_param and has_net_file:
            raise SolverError("Both net_param and net_file may not be specified.")
        num_test_nets = len(p.test_net_param) + len(p.test_net)
        if has_net_param or has_net_file:
            if len(p.test_iter) < num_test_nets:
                raise SolverError("test_iter must be specified for each test network.")
        elif len(p.test_iter) != num_test_nets:
            raise SolverError("test_iter must be specified for each test network.")
        instances = len(p.test_iter)
        if len(p.test_state) and len(p.test_state) != instances:
            raise SolverError("test_state must be unspecified or specified once per test net.")
        if instances and p.test_interval <= 0:
            raise SolverError("test_interval must be > 0 when test nets are defined (test_iter is set)")
        sources, params = [], []
        for tp in p.test_net_param:
            sources.append("test_net_param")
            params.append(_copy(tp))
        for f in p.test_net:
            sources.append("test_net file: " + f)
            params.append(read_net_text(self._resolve(f)))
        for _ in range(instances - len(params)):
            if has_net_param:
                sources.append("net_param")
                params.append(_copy(p.net_param))
            else:
                sources.append("net file: " + p.net)
                params.append(read_net_text(self._resolve(p.net)))
        self.test_nets: list[Net] = []
        for i, net_param in enumerate(params):
            state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
            state.MergeFrom(net_param.state)
            if len(p.test_state):
                state.MergeFrom(p.test_state[i])
            net_param.state.CopyFrom(state)
            log.info("Creating test net (#%d) specified by %s", i, sources[i])
            net = Net(net_param)
            self._load_weights(net)
            net.share_with(self.net)
            self.test_nets.append(net)

    def weights_files(self) -> list[str]:
        """The ``weights:`` entries (fine-tuning), each a comma-separated list, in order."""
        return [name.strip() for entry in self.param.weights for name in entry.split(",")]

    def _load_weights(self, net: Net) -> None:
        """Caffe's LoadNetWeights: copy every ``weights:`` file into ``net`` by layer name."""
        for name in self.weights_files():
            path = self._resolve(name)
            if not os.path.isfile(path):
                raise SolverError(f"{self.source or '<solver>'}: weights file {name!r} (solver field "
                                  "'weights') not found")
            log.info("Finetuning from %s", name)
            net.copy_from(path)

    # ------------------------------------------------------------------ loop
    def add_callback(self, on_start=None, on_gradients_ready: Callable | None = None) -> None:
        """pycaffe's callbacks: ``on_start()`` before each iteration's forward, and
        ``on_gradients_ready()`` after backward and before the update. As in pycaffe, a single
        object with ``on_start`` and ``on_gradients_ready`` methods (a ``caffe.NCCL``) also works."""
        if on_gradients_ready is None and hasattr(on_start, "on_gradients_ready"):
            on_start, on_gradients_ready = on_start.on_start, on_start.on_gradients_ready
        self.callbacks.append((on_start, on_gradients_ready))

    def step(self, iters: int) -> None:
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + iters
        self.losses = []
        self.smoothed_loss = 0.0
        if self._display_timer_start is None:
            self._display_timer_start = time.perf_counter()
        net = self.net
        while self.iter < stop_iter:
            net.clear_param_diffs()
            if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self.callbacks:
                if on_start:
                    on_start()
            display = p.display and self.iter % p.display == 0
            loss = 0.0
            if self.loss_scaler is not None:
                net.loss_scale = self.loss_scaler.scale
            for _ in range(p.iter_size):
                loss += net.forward_loss()
                net.backward_from_to()
            loss /= p.iter_size
            self._update_smoothed_loss(loss, start_iter)
            if display:
                now = time.perf_counter()
                lapse = now - self._display_timer_start
                per_s = (self.iter - self._iterations_last) / (lapse if lapse else 1)
                log.info("Iteration %d (%g iter/s, %.3fs/%d iters), loss = %g", self.iter, per_s, lapse,
                         p.display, self.smoothed_loss)
                self._display_timer_start, self._iterations_last = now, self.iter
                self._log_outputs(net, "Train", self._output_values(net))
            for _, on_grad in self.callbacks:
                if on_grad:
                    on_grad()
            with deferred_interrupts():  # Ctrl-C lands after the whole update, not inside it
                self.apply_update()
                self.iter += 1
            request = self.action_request() if self.action_request else "none"
            if (p.snapshot and self.iter % p.snapshot == 0) or request == "snapshot":
                self.snapshot()
            if request == "stop":
                self.requested_early_exit = True
                break

    def solve(self, resume_file: str | None = None) -> None:
        p = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if p.snapshot_after_train:  # found now, not after the training
            self.check_snapshot_prefix("snapshot_after_train")
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_loss()
            self._update_smoothed_loss(loss, start_iter)
            log.info("Iteration %d, loss = %g", self.iter, self.smoothed_loss)
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    def _update_smoothed_loss(self, loss: float, start_iter: int) -> None:
        n = self.param.average_loss
        if len(self.losses) < n:
            self.losses.append(loss)
            size = len(self.losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            idx = (self.iter - start_iter) % n
            self.smoothed_loss += (loss - self.losses[idx]) / n
            self.losses[idx] = loss

    def _output_values(self, net: Net) -> list[tuple[str, int, float]]:
        """(blob name, element index, value) for every element of every net output, in order."""
        return [(name, k, float(v)) for name in net.outputs
                for k, v in enumerate(net.blobs[name].data.reshape(-1))]

    def _log_outputs(self, net: Net, kind: str, values: list[tuple[str, int, float]]) -> None:
        """Caffe's "<kind> net output #i: name = v (* w = w*v loss)" lines."""
        weights = net.blob_loss_weights
        for i, (name, _, v) in enumerate(values):
            w = weights[name]
            extra = f" (* {w:g} = {w * v:g} loss)" if w else ""
            log.info("    %s net output #%d: %s = %g%s", kind, i, name, v, extra)

    def test_all(self) -> dict[int, dict[str, float]]:
        return {i: self.test(i) for i in range(len(self.test_nets))}

    def test(self, test_net_id: int = 0) -> dict[str, float]:
        """Run test net ``test_net_id`` for its ``test_iter`` batches; log and return the mean of
        each output element (keyed ``name``, or ``name[k]`` for outputs with several elements)."""
        p = self.param
        if p.eval_type == "detection":  # the SSD fork's test mode (detection_metrics.py)
            from ..detection_metrics import run_detection_test
            return run_detection_test(self, test_net_id)
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        net.share_with(self.net)
        iters = p.test_iter[test_net_id]
        totals: list[tuple[str, int, float]] = []
        total_loss = 0.0
        for i in range(iters):
            if self.action_request and self.action_request() == "stop":
                self.requested_early_exit = True
                log.info("Test interrupted.")
                return {}
            iter_loss = net.forward_loss()
            if p.test_compute_loss:
                total_loss += iter_loss
            values = self._output_values(net)
            totals = values if i == 0 else [(n, k, t + v) for (n, k, t), (_, _, v) in zip(totals, values)]
        if p.test_compute_loss:
            log.info("Test loss: %g", total_loss / iters)
        means = [(n, k, t / iters) for n, k, t in totals]
        self._log_outputs(net, "Test", means)
        counts = {n: net.blobs[n].count() for n in net.outputs}
        return {(n if counts[n] == 1 else f"{n}[{k}]"): v for n, k, v in means}

    # ---------------------------------------------------------------- update
    @property
    def lr(self) -> float:
        """The learning rate at the current iteration (what the next update will use)."""
        rate, self.current_step = learning_rate(self.param, self.iter, self.current_step)
        return rate

    def get_learning_rate(self) -> float:
        return self.lr

    def apply_update(self) -> None:
        raise NotImplementedError

    def pre_solve(self) -> None:
        """Create the update rule's history blobs."""

    # -------------------------------------------------------------- snapshots
    def snapshot_filename(self, extension: str) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def check_snapshot_prefix(self, setting: str) -> None:
        """Caffe's CheckSnapshotWritePermissions: write and remove a probe file where the snapshots
        will go, so a missing or read-only folder is found before training, not after it."""
        probe = self.snapshot_filename(".probe")
        try:
            fd, tmp = locked_temporary(probe)
        except OSError as e:
            prefix = self.param.snapshot_prefix
            folder = os.path.dirname(os.path.abspath(probe))
            raise SolverError(f"Cannot write to snapshot prefix {prefix!r} (needed by {setting}): "
                              f"{e.strerror or e} in {folder!r}. Make sure that the directory exists "
                              f"and is writable.") from None
        os.close(fd)
        os.unlink(tmp)

    def remove_stale_snapshot_temporaries(self) -> None:
        """Temporaries of snapshot writes that were killed (see io/protofiles.atomic_target)."""
        prefix = self.param.snapshot_prefix
        pattern = re.escape(os.path.basename(prefix)) + r"_iter_\d+\.(caffemodel|solverstate|probe)(\.h5)?"
        folder = os.path.dirname(prefix)
        for name in remove_stale_temporaries(folder, pattern):
            log.info("Removed %s, left by an interrupted snapshot", os.path.join(folder, name))

    def snapshot(self) -> str:
        """Write the weights and the solver state (both atomically); returns the state's filename."""
        p = self.param
        self.remove_stale_snapshot_temporaries()
        if p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            model_filename = self.snapshot_filename(".caffemodel.h5")
            log.info("Snapshotting to HDF5 file %s", model_filename)
            self.net.save_hdf5(model_filename, write_diff=p.snapshot_diff)
        else:
            model_filename = self.snapshot_filename(".caffemodel")
            log.info("Snapshotting to binary proto file %s", model_filename)
            self.net.save(model_filename, write_diff=p.snapshot_diff)
        return self.snapshot_solver_state(model_filename)

    def snapshot_solver_state(self, model_filename: str) -> str:
        raise NotImplementedError

    def restore(self, state_file: str) -> None:
        raise NotImplementedError


def _copy(msg):
    out = type(msg)()
    out.CopyFrom(msg)
    return out
