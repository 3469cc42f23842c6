"""Shared fixtures: the reference outputs of the real Caffe in ../shared/reference/, and the
device the layer tests and reference cases run on.

Tests that read the references skip with a clear reason when the folder is absent (a user's
clone); in CI (``CI`` set), where it is always present, a missing folder is an error, not a skip.

``RECAFFE_TEST_DEVICE=cuda python -m pytest tests/layers tests/test_reference_cases.py`` runs
those tests in GPU mode (``caffe.set_mode_gpu()`` around each test, so nets, ``make_net`` and
``recaffe.gradient_check`` put their blobs on the GPU); they are skipped with the reason when
torch has no CUDA device. Tests marked ``cpu_only`` stay on the CPU. Other test files always run
on the CPU.
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


TEST_DEVICE = os.environ.get("RECAFFE_TEST_DEVICE", "cpu").strip().lower() or "cpu"
DEVICE_TESTS = (ROOT / "tests" / "layers", ROOT / "tests" / "test_reference_cases.py")


def runs_on_test_device(item) -> bool:
    """Whether ``item`` is one of the tests that RECAFFE_TEST_DEVICE moves (layers, reference cases)."""
    path = pathlib.Path(str(item.fspath)).resolve()
    return any(path == p or p in path.parents for p in DEVICE_TESTS) and item.get_closest_marker("cpu_only") is None


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: stays on the CPU when RECAFFE_TEST_DEVICE=cuda")
    if TEST_DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"RECAFFE_TEST_DEVICE={TEST_DEVICE!r}: expected cpu or cuda")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE != "cuda":
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"RECAFFE_TEST_DEVICE=cuda but CUDA is not available to torch "
                                   f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    for item in items:
        if runs_on_test_device(item):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def test_device(request):
    """The device this test's nets are built on: 'cuda' (GPU mode) or 'cpu'."""
    if TEST_DEVICE != "cuda" or not runs_on_test_device(request.node):
        yield "cpu"
        return
    from recaffe import device
    device.set_mode_gpu()
    try:
        yield "cuda"
    finally:
        device.set_mode_cpu()
