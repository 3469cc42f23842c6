"""The base of recaffe's user errors.

Every error that bad input causes (a file, a setting, a flag, a layer's parameters) is a
``RecaffeError``: its text names the file, line, layer or setting to fix. The ``caffe`` command
prints such errors as one line and exits with status 1; any other exception is a bug in recaffe
and is printed with its traceback (see cli/main.py). Each family keeps its own subclass
(LayerError, ProtoFileError, WeightsError, SolverError, ...), which also derives from the builtin
class it always was (ValueError, or RuntimeError for databases and devices), so existing
``except ValueError`` code keeps working.
"""
from __future__ import annotations


class RecaffeError(Exception):
    """An error in what the user gave recaffe (files, settings, flags), not in recaffe."""
