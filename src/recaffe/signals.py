"""SIGINT/SIGHUP during training turned into solver actions, as Caffe's SignalHandler does.

``caffe train -sigint_effect=snapshot|stop|none -sighup_effect=...``: the handler records the
signals; the solver asks ``action()`` after each iteration and snapshots or stops.

``deferred_interrupts()`` holds SIGINT back while the solver updates the weights and its history,
so Ctrl-C in ``solver.step()`` from Python lands between iterations, never in a half-done update.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

ACTIONS = ("none", "snapshot", "stop")  # by precedence: when several are requested, stop wins


class SignalHandler:
    """Turns SIGINT/SIGHUP into solver actions (Caffe's SignalHandler): 'stop', 'snapshot' or 'none'."""

    def __init__(self, sigint_effect: str, sighup_effect: str):
        for name, effect in (("sigint_effect", sigint_effect), ("sighup_effect", sighup_effect)):
            if effect not in ACTIONS:
                raise ValueError(f"-{name} must be stop, snapshot or none, got {effect!r}")
        self.effects = {signal.SIGINT: sigint_effect}
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = sighup_effect
        self.pending: list[int] = []
        self.previous = {}

    def __enter__(self):
        for sig in self.effects:
            self.previous[sig] = signal.signal(sig, lambda s, frame: self.pending.append(s))
        return self

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)

    def action(self) -> str:
        """The action requested since the last call (stop wins over snapshot)."""
        actions = [self.effects[s] for s in self.pending]
        self.pending.clear()
        return max(actions, key=ACTIONS.index, default="none")


@contextlib.contextmanager
def deferred_interrupts():
    """Run the block with SIGINT held back; a SIGINT that arrived meanwhile is handed to the
    handler that was in place (Python's raises KeyboardInterrupt) when the block has finished.
    Outside the main thread (where Python cannot install handlers) nothing changes: signals are
    handled by the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, object]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signum, frame = caught[0]
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
