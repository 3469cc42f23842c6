"""Logging in glog's line format, so Caffe's log parsers and habits keep working.

Every line looks like ``I1121 16:24:49.970850 16437 solver.py:239] message``: severity letter,
month+day, wall time with microseconds, thread id, source file:line, then the message.
``GLOG_minloglevel`` (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL) silences lower levels, as in Caffe.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

_LETTERS = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
            logging.CRITICAL: "F"}
_GLOG_LEVELS = [logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL]


class GlogFormatter(logging.Formatter):
    """Formats a record as glog does (classic format, without the year)."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created - int(record.created)) * 1e6)
        prefix = "%s%02d%02d %02d:%02d:%02d.%06d %5d %s:%d] " % (
            _LETTERS.get(record.levelno, "I"), t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec,
            micros, threading.get_native_id() % 100000, record.filename, record.lineno)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return prefix + msg


def _level_from_env() -> int:
    try:
        return _GLOG_LEVELS[min(max(int(os.environ.get("GLOG_minloglevel", "0")), 0), 3)]
    except ValueError:
        return logging.INFO


logger = logging.getLogger("recaffe")
if not logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(GlogFormatter())
    logger.addHandler(_handler)
    logger.propagate = False
logger.setLevel(_level_from_env())


def get_logger(name: str) -> logging.Logger:
    """A child of the ``recaffe`` logger (``name`` is usually ``__name__``)."""
    return logging.getLogger("recaffe." + name.split("recaffe.", 1)[-1])


def set_log_level(level: int) -> None:
    """Set the minimum glog level (0 INFO .. 3 FATAL), like ``GLOG_minloglevel``."""
    logger.setLevel(_GLOG_LEVELS[min(max(level, 0), 3)])
