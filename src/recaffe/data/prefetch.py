"""Background loading ahead of compute, as Caffe's BasePrefetchingDataLayer.

A daemon thread calls ``produce()`` and keeps up to ``depth`` results in a queue; the consumer
takes them with :meth:`Prefetcher.get`. An exception in ``produce`` is handed to the consumer,
which re-raises it. The thread holds no reference to the object that owns the Prefetcher (only
to ``produce``), so the owner can be garbage-collected; the owner stops the thread with
:meth:`close`, typically from ``weakref.finalize``, which also runs at interpreter exit.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_POLL_S = 0.1  # how often a blocked producer checks for a stop request


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


def _run(produce: Callable[[], Any], q: queue.Queue, stop: threading.Event,
         on_exit: Callable[[], None] | None) -> None:
    # A module-level function: the thread must not keep the Prefetcher's owner alive.
    try:
        while not stop.is_set():
            try:
                item = produce()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = _Failure(e)
            while not stop.is_set():
                try:
                    q.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return
    finally:
        if on_exit is not None:
            on_exit()


class Prefetcher:
    """Runs ``produce`` in a background thread, ``depth`` results ahead of the consumer."""

    def __init__(self, produce: Callable[[], Any], depth: int, name: str = "prefetch",
                 on_exit: Callable[[], None] | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=_run, args=(produce, self._queue, self._stop, on_exit),
                                        name=name, daemon=True)
        self._thread.start()

    def get(self) -> Any:
        """The next result (waits for it); re-raises the producer's exception."""
        if self._failure is not None:
            raise self._failure
        if self._stop.is_set():
            raise RuntimeError("the prefetch thread was closed")
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped unexpectedly") from None
        if isinstance(item, _Failure):
            self._failure = item.exc
            raise item.exc
        return item

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it (it finishes the batch it is loading, if any)."""
        self._stop.set()
        # Unblock a producer waiting on a full queue.
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
