"""Modules that Caffe's forks shipped *inside* their pycaffe, imported from the user's own copy.

The SSD fork's scripts say ``from caffe.model_libs import *``: model_libs.py lived in the fork's
``python/caffe/`` folder. It is the fork's code, not ours; put the file next to your script (or
anywhere on ``sys.path``) and ``import caffe.model_libs`` loads it under that name.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

FORK_MODULES = ("model_libs",)


class _ForkModuleFinder:
    """Finds ``caffe.<name>`` for the names in FORK_MODULES as the top-level module ``<name>``."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "caffe" or name not in FORK_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
        if spec is None or spec.origin is None:
            return None
        return importlib.util.spec_from_file_location(fullname, spec.origin)


def install() -> None:
    if not any(isinstance(f, type) and f is _ForkModuleFinder for f in sys.meta_path):
        sys.meta_path.append(_ForkModuleFinder)
