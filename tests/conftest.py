"""Shared fixtures: the reference outputs of the real Caffe in ../shared/reference/.

Tests that read them skip with a clear reason when the folder is absent (a user's clone);
in CI (``CI`` set), where it is always present, a missing folder is an error, not a skip.
"""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("RECAFFE_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"


def require_reference(*parts: str) -> pathlib.Path:
    """The path under ../shared/reference/, or a skip (an error in CI) when it is absent."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with ../shared/reference/ present")
        pytest.skip(f"{path} not present (the real Caffe's reference outputs live in ../shared/)")
    return path


def require_shared(*parts: str) -> pathlib.Path:
    """The path under ../shared/data/ (sample data sets), or a skip (an error in CI) when absent."""
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must run with ../shared/data/ present")
        pytest.skip(f"{path} not present (the sample data sets live in ../shared/data/)")
    return path


@pytest.fixture
def reference():
    return require_reference
