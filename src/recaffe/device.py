"""Caffe's global mode: CPU or GPU (CUDA through torch), and which GPU; determinism on demand.

Nets created after ``set_mode_gpu()`` live on ``cuda:<device id>``; nets created before keep their
device. ``set_mode_gpu`` without a CUDA build or device raises a clear error. GPU mode is untested
until a run of ``benchmarks/gpu_check.sh`` on a CUDA machine has passed (see docs/gpu.md).
"""
from __future__ import annotations

import os

import torch

from .errors import RecaffeError

DETERMINISTIC_ENV = "RECAFFE_DETERMINISTIC"

_mode = "cpu"
_device_id = 0


class DeviceError(RecaffeError, RuntimeError):
    pass


def set_mode_cpu() -> None:
    global _mode
    _mode = "cpu"


def set_mode_gpu() -> None:
    """Nets created from now on live on the current GPU. GPU mode computes in full float32, as
    Caffe's cuBLAS/cuDNN calls do: TF32 (torch's default for cuDNN convolutions on Ampere and later)
    is turned off for convolutions and matrix products."""
    global _mode
    _require_cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _mode = "gpu"


def set_device(device_id: int) -> None:
    global _device_id
    if _mode == "gpu" or torch.cuda.is_available():
        _require_cuda(device_id)
    _device_id = int(device_id)


def current_device() -> torch.device:
    return torch.device("cuda", _device_id) if _mode == "gpu" else torch.device("cpu")


def mode() -> str:
    return _mode


def _require_cuda(device_id: int | None = None) -> None:
    if not torch.cuda.is_available():
        raise DeviceError("GPU mode requested but CUDA is not available to torch "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                          "use CPU mode (caffe.set_mode_cpu() / no -gpu flag)")
    n = torch.cuda.device_count()
    if device_id is not None and not 0 <= device_id < n:
        raise DeviceError(f"GPU {device_id} requested but only {n} CUDA device(s) are present")


def set_deterministic(enabled: bool = True) -> None:
    """Beyond Caffe: make every kernel deterministic, so a seeded run repeats bit for bit on GPU too.

    Turns on ``torch.use_deterministic_algorithms`` (a kernel without a deterministic version then
    raises instead of running), cuDNN's deterministic algorithms without autotuning, and the cuBLAS
    workspace setting that deterministic GEMMs need. Sets ``RECAFFE_DETERMINISTIC=1`` so that
    processes started afterwards (data-parallel ranks) do the same. CPU kernels are deterministic
    already; the cost is on GPU (slower convolutions and scatter-style backward passes).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        os.environ[DETERMINISTIC_ENV] = "1"
    else:
        os.environ.pop(DETERMINISTIC_ENV, None)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def is_deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def device_query(device_id: int = 0) -> list[str]:
    """Lines describing a CUDA device, as ``caffe device_query`` prints them."""
    _require_cuda(device_id)
    p = torch.cuda.get_device_properties(device_id)
    return [
        f"Device id:                     {device_id}",
        f"Major revision number:         {p.major}",
        f"Minor revision number:         {p.minor}",
        f"Name:                          {p.name}",
        f"Total global memory:           {p.total_memory}",
        f"Number of multiprocessors:     {p.multi_processor_count}",
    ]


if os.environ.get(DETERMINISTIC_ENV, "") not in ("", "0"):
    set_deterministic(True)  # asked for by the environment (or inherited by a spawned rank)
