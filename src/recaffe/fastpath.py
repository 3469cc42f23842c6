"""The compiled fast path: ``caffe train|test|time ... -compile``, ``caffe.set_compile(True)``,
``net.set_compile(True)``.

A net's layers are cut into **segments**: maximal runs of layers that can be captured, and the
layers that cannot (Python layers, data layers, loss and accuracy layers with their data-dependent
label checks, Dropout and stochastic pooling in TRAIN with their random draws), which always run
eagerly (one log line per eager run of layers). Each capturable run gets two compiled functions,
one for its forward (reshape + forward of each layer, straight-line code) and one for the
backward of its layers that need it, built with ``torch.compile`` (TorchDynamo + Inductor on CPU;
on CUDA with ``mode="reduce-overhead"``, i.e. CUDA graphs — written but **untested**, no GPU was
available). The layers' own Python code is what gets traced: blobs are still set with
``top.data_t = t`` and param diffs still accumulate in place, so after a compiled forward or
backward every blob and param is readable as after an eager one, and a user's edit of a blob or
param between calls is read by the next call (the tensors are graph inputs, never constants).

**Choosing per segment.** Compiling is not always faster (Inductor's CPU convolutions and extern
kernels can lose to eager). Each compiled segment first runs eagerly for a few calls (timed), is
then compiled (the compile time is logged) and timed for a few calls, and from then on runs the
faster of the two (fastest call against fastest call: the least disturbed on a shared machine).
Segments that are faster alone can still make the whole pass slower (layouts changing between a
compiled forward and an eager backward, the eager work around them), so once every segment has
chosen, whole passes (forward and backward) are timed as chosen and all eager, and the net keeps
the faster (``PassCheck``; logged). ``set_compile("always")`` skips the measurements (tests use it).

**Numbers.** Inductor fuses elementwise ops and may reorder float arithmetic, so compiled results
agree with eager within float rounding, not bit for bit (docs/performance.md). The solver's update
is not compiled: it runs the multi-tensor update (solvers/sgd.py), bit-exact with Caffe's order.

**Cache.** Inductor's FX graph cache (on by default) keeps compiled kernels across runs in
``TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_<user>``); a second run of the same
net compiles much faster (figures in docs/performance.md).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable

import torch

from .log import get_logger
from .proto import caffe_pb2

if TYPE_CHECKING:
    from .net import Net

log = get_logger(__name__)

COMPILE_ENV = "RECAFFE_COMPILE"
CHANNELS_LAST_ENV = "RECAFFE_COMPILE_CHANNELS_LAST"

# "auto": measure eager vs compiled per segment and keep the faster; "always": compiled whenever
# it compiles; None: off.
_env = os.environ.get(COMPILE_ENV, "").strip().lower()
_mode: str | None = None if _env in ("", "0", "false", "no", "off") else ("always" if _env == "always" else "auto")

# Calls per segment: one eager warm-up, EAGER_SAMPLES timed eager calls, one compiling call, one
# compiled warm-up, COMPILED_SAMPLES timed compiled calls; then the choice. Then, if any segment
# chose compiled code, the whole pass is checked: PASS_SAMPLES passes as chosen and as many all
# eager (each after one untimed pass), and the faster kept.
EAGER_SAMPLES = 5
COMPILED_SAMPLES = 5
PASS_SAMPLES = 5

# Layer types always run eagerly, with the reason logged.
_EAGER_TYPES = {
    "Python": "Python layer",
    "Input": "data layer", "Data": "data layer", "ImageData": "data layer", "WindowData": "data layer",
    "HDF5Data": "data layer", "HDF5Output": "data layer", "MemoryData": "data layer",
    "DummyData": "data layer",
    "Accuracy": "data-dependent", "BatchReindex": "data-dependent", "Filter": "data-dependent",
    "Embed": "data-dependent", "RNN": "recurrent net", "LSTM": "recurrent net",
}


def set_compile(mode: bool | str = True) -> None:
    """Compile the nets created from now on (and their solvers' nets): True or "auto" (measure,
    keep the faster per segment), "always" (compiled whenever it compiles), False (eager)."""
    global _mode
    if mode not in (True, False, None, "auto", "always"):
        raise ValueError(f"set_compile: expected True, False, 'auto' or 'always', got {mode!r}")
    _mode = None if not mode else ("auto" if mode is True else mode)


def compile_mode() -> str | None:
    return _mode


def eager_reason(layer) -> str | None:
    """Why ``layer`` cannot be captured (None: it can). A layer class may say so itself with a
    ``capturable = False`` attribute."""
    if getattr(layer, "capturable", True) is False:
        return "not capturable"
    reason = _EAGER_TYPES.get(layer.type)
    if reason:
        return reason
    from .layers.loss import LossLayer
    if isinstance(layer, LossLayer):
        return "loss layer"
    if type(layer).run_forward is not _base_run_forward():
        return "own run_forward"
    train = layer.phase == caffe_pb2.TRAIN
    if layer.type == "Dropout" and train:
        return "random draws"
    if layer.type == "Pooling" and train and \
            layer.layer_param.pooling_param.pool == caffe_pb2.PoolingParameter.STOCHASTIC:
        return "random draws"
    return None


def _eager_reason_in(net: "Net", k: int) -> str | None:
    """eager_reason, and layers that run on converted copies (mixed precision) stay eager."""
    if net._casts[k] is not None:
        return "precision conversion"
    return eager_reason(net.layers[k])


def _base_run_forward():
    from .layer import Layer
    return Layer.run_forward


class Segment:
    """A run of layers in one direction, run eagerly or compiled (chosen by measurement)."""

    def __init__(self, net: "Net", direction: str, ids: list[int], mode: str | None, reason: str = "",
                 channels_last: bool = False):
        self.net, self.direction, self.ids = net, direction, ids
        # convolutions that run channels-last when compiled, NCHW when eager (set before each call)
        self.convs = [net.layers[k] for k in ids if channels_last and mode is not None
                      and net.layers[k].type == "Convolution" and hasattr(net.layers[k], "channels_last")]
        self.reason = reason
        self.capturable = mode is not None
        self.mode = mode
        self.eager_fn = self._eager_fn()
        self.compiled_fn: Callable | None = None
        self.eager_times: list[float] = []
        self.compiled_times: list[float] = []
        self.compile_time = 0.0
        self.calls = 0
        self._warm = False
        self.choice = "eager" if not self.capturable else ("compiled" if mode == "always" else "measuring")
        # layers inside a compiled forward whose loss is read outside the graph
        self.loss_ids = [k for k in ids if net.layers[k].loss_weights]

    @property
    def names(self) -> str:
        names = [self.net.layer_names[k] for k in self.ids]
        return names[0] if len(names) == 1 else f"{names[0]}..{names[-1]} ({len(names)} layers)"

    def _eager_fn(self) -> Callable[[], float]:
        net, ids = self.net, self.ids
        if self.direction == "forward":
            def run() -> float:
                loss = 0.0
                for k in ids:
                    loss += net.forward_layer(k)
                return loss
        else:
            def run() -> float:
                for k in ids:
                    net.backward_layer(k)  # (loss scaling and precision conversions included)
                return 0.0
        return run

    def _build_compiled(self) -> Callable[[], float]:
        """Straight-line code over the segment's layers' forward (or backward) calls (no loop: a
        graph break inside one layer then splits the graph instead of abandoning the whole frame),
        compiled by torch.compile."""
        net = self.net
        if self.direction == "forward":
            body = [f"    L[{k}].forward(B[{k}], T[{k}])" for k in self.ids]
        else:
            body = [f"    L[{k}].backward(T[{k}], P[{k}], B[{k}])" for k in self.ids]
        src = "def segment(L, B, T, P):\n" + "\n".join(body) + "\n"
        namespace: dict = {}
        exec(compile(src, f"<recaffe {net.name} {self.direction} {self.names}>", "exec"), namespace)
        cuda = net.device.type == "cuda"
        # CUDA graphs through Inductor's reduce-overhead mode: written, untested (no GPU here).
        fn = torch.compile(namespace["segment"], dynamic=False, mode="reduce-overhead" if cuda else None)
        args = (net.layers, net.bottom_vecs, net.top_vecs, net.bottom_need_backward)
        layers, bottoms, tops = net.layers, net.bottom_vecs, net.top_vecs
        loss_ids = self.loss_ids
        reshape_ids = self.ids if self.direction == "forward" else []

        def run() -> float:
            # Reshapes run eagerly first, as Caffe's Net::Reshape does: shape logic (and the layers'
            # protobuf fields it reads) stays out of the graph; capturable layers' shapes never
            # depend on data, so reshaping the whole segment before its forwards is the same.
            for k in reshape_ids:
                layers[k].reshape(bottoms[k], tops[k])
            fn(*args)
            loss = 0.0
            for k in loss_ids:  # Layer.run_forward's loss, read outside the graph
                for t, w in zip(tops[k], layers[k].loss_weights):
                    if w:
                        loss += float(torch.dot(t.data_t.reshape(-1), t.diff_t.reshape(-1)))
            return loss
        return run

    def run(self) -> float:
        if self.choice == "eager":
            self._layout(False)
            return self.eager_fn()
        if self.choice == "compiled" and self.compiled_fn is not None:
            self._layout(True)
            return self.compiled_fn()
        return self._run_measuring()

    def _layout(self, compiled: bool) -> None:
        for layer in self.convs:
            layer.channels_last = compiled

    def _run_measuring(self) -> float:
        """Warm-up, timed eager calls, the compiling call, timed compiled calls, then the choice
        (with mode "always": straight to compiling)."""
        self.calls += 1
        sync = torch.cuda.synchronize if self.net.device.type == "cuda" else (lambda: None)
        if self.compiled_fn is None and self.choice == "measuring" and len(self.eager_times) < EAGER_SAMPLES:
            self._layout(False)
            t = time.perf_counter()
            loss = self.eager_fn()
            sync()
            if self.calls > 1:  # the first call warms up
                self.eager_times.append(time.perf_counter() - t)
            return loss
        self._layout(True)
        if self.compiled_fn is None:
            t = time.perf_counter()
            # backward accumulates into param diffs: keep them, to run eagerly from the same state
            # if compiling fails after part of the segment ran (a graph break splits the work)
            params = [b for k in self.ids for b in self.net.layers[k].blobs] if self.direction == "backward" else []
            saved = [b.diff_t.clone() for b in params]
            try:
                self.compiled_fn = self._build_compiled()
                loss = self.compiled_fn()
                sync()
            except Exception as e:  # noqa: BLE001 — anything Dynamo/Inductor cannot do: stay eager
                for b, d in zip(params, saved):
                    b.diff_t.copy_(d)
                self.compiled_fn = None
                self.choice = "eager"
                log.info("Compiled fast path: %s %s of net %s does not compile (%s: %s); running it eagerly",
                         self.direction, self.names, self.net.name, type(e).__name__, str(e).splitlines()[0][:200])
                self._layout(False)
                return self.eager_fn()
            self.compile_time = time.perf_counter() - t
            log.info("Compiled fast path: %s %s of net %s compiled in %.1f s", self.direction, self.names,
                     self.net.name, self.compile_time)
            self._warm = False
            return loss
        t = time.perf_counter()
        loss = self.compiled_fn()
        sync()
        if self._warm:
            self.compiled_times.append(time.perf_counter() - t)
        self._warm = True
        if len(self.compiled_times) >= COMPILED_SAMPLES:
            # the fastest call of each: on a shared machine, the least disturbed by other work
            eager, comp = min(self.eager_times), min(self.compiled_times)
            self.choice = "compiled" if comp < eager else "eager"
            log.info("Compiled fast path: %s %s of net %s: eager %.3g ms, compiled %.3g ms (%.2fx): %s",
                     self.direction, self.names, self.net.name, eager * 1e3, comp * 1e3, eager / comp,
                     self.choice)
        return loss

    def summary(self) -> dict:
        best = (lambda v: min(v) if v else None)
        return {"direction": self.direction, "layers": [self.net.layer_names[k] for k in self.ids],
                "choice": self.choice, "reason": self.reason, "eager_s": best(self.eager_times),
                "compiled_s": best(self.compiled_times), "compile_s": self.compile_time}


class FastPath:
    """A net's forward and backward as segments (see the module docstring)."""

    def __init__(self, net: "Net", mode: str, channels_last: bool | None = None):
        self.net = net
        n = len(net.layers)
        # 2-D convolutions of compiled segments run channels-last: mkldnn's convolution backward is
        # faster in that layout (LeNet's conv2 forward+backward 19.4 -> 14.0 ms, one thread), and
        # inside a compiled graph the layout flows from layer to layer without copies. Eager runs
        # (and segments that chose eager) keep NCHW.
        if channels_last is None:
            channels_last = os.environ.get(CHANNELS_LAST_ENV, "1") != "0"
        self.channels_last = channels_last
        self.forward_segments = self._cut(list(range(n)), "forward", mode)
        need = [k for k in range(n - 1, -1, -1) if net.layer_need_backward[k]]
        self.backward_segments = self._cut(need, "backward", mode)
        self.pass_check = PassCheck(self) if mode == "auto" else None

    def _cut(self, ids: list[int], direction: str, mode: str) -> list[Segment]:
        net = self.net
        runs: list[tuple[str | None, list[int]]] = []
        for k in ids:
            reason = _eager_reason_in(net, k)
            if runs and (runs[-1][0] is None) == (reason is None):
                runs[-1][1].append(k)
            else:
                runs.append((reason, [k]))
        segments = []
        for reason, run in runs:
            seg = Segment(net, direction, run, None if reason else mode, reason or "", self.channels_last)
            if reason and direction == "forward":
                why = sorted({_eager_reason_in(net, k) for k in run})
                log.info("Compiled fast path: net %s: %s run eagerly (%s)", net.name, seg.names, ", ".join(why))
            segments.append(seg)
        return segments

    def forward(self) -> float:
        check = self.pass_check
        if check is not None:
            check.pass_starts()
            t = time.perf_counter()
        loss = 0.0
        for seg in self.forward_segments:
            loss += seg.run()
        if check is not None:
            check.add(time.perf_counter() - t)
        return loss

    def backward(self) -> None:
        check = self.pass_check
        if check is not None:
            t = time.perf_counter()
        for seg in self.backward_segments:
            seg.run()
        if check is not None:
            check.add(time.perf_counter() - t)

    @property
    def segments(self) -> list[Segment]:
        return self.forward_segments + self.backward_segments

    @property
    def settled(self) -> bool:
        """Every segment has chosen, and the whole-pass check (if any) is done."""
        return all(s.choice != "measuring" for s in self.segments if s.capturable) and \
            (self.pass_check is None or self.pass_check.state == "done")

    @property
    def active(self) -> bool:
        """False once every segment has settled on eager code: the net then runs its plain loop."""
        check = self.pass_check
        return check is None or check.state != "done" or any(s.choice == "compiled" for s in self.segments)

    def summary(self) -> list[dict]:
        return [s.summary() for s in self.forward_segments + self.backward_segments if s.capturable]


class PassCheck:
    """The whole-pass check after the per-segment choices (see the module docstring): a pass is the
    time spent in the fast path's forward and backward between two forwards."""

    def __init__(self, fastpath: FastPath):
        self.fastpath = fastpath
        self.state = "choosing"  # -> "as chosen" -> "all eager" -> "done"
        self.elapsed = 0.0
        self.samples: dict[str, list[float]] = {"as chosen": [], "all eager": []}
        self.compiled: list[Segment] = []
        self._warm = False

    def add(self, seconds: float) -> None:
        self.elapsed += seconds

    def pass_starts(self) -> None:
        """A forward begins: the previous pass (if one was timed) is complete."""
        seconds, self.elapsed = self.elapsed, 0.0
        if self.state == "done":
            return
        if self.state == "choosing":
            segs = [s for s in self.fastpath.segments if s.capturable]
            if any(s.choice == "measuring" for s in segs):
                return
            self.compiled = [s for s in segs if s.choice == "compiled"]
            self.state = "as chosen" if self.compiled else "done"
            self._warm = False
            return
        if self.fastpath.net.device.type == "cuda":
            torch.cuda.synchronize()
        if not self._warm:  # the first pass of a state warms up (and its time began before it)
            self._warm = True
            return
        samples = self.samples[self.state]
        samples.append(seconds)
        if len(samples) < PASS_SAMPLES:
            return
        if self.state == "as chosen":
            self.state, self._warm = "all eager", False
            for s in self.compiled:
                s.choice = "eager"
            return
        chosen, eager = min(self.samples["as chosen"]), min(self.samples["all eager"])
        keep = chosen < eager
        for s in self.compiled:
            s.choice = "compiled" if keep else "eager"
        self.state = "done"
        log.info("Compiled fast path: net %s, whole forward+backward: all eager %.3g ms, as chosen %.3g ms "
                 "(%.2fx): %s", self.fastpath.net.name, eager * 1e3, chosen * 1e3, eager / chosen,
                 "keeping the compiled segments" if keep else "running every segment eagerly")

