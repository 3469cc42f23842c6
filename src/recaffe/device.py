"""Caffe's global mode: CPU or GPU (CUDA through torch), and which GPU.

Nets created after ``set_mode_gpu()`` live on ``cuda:<device id>``; nets created before keep their
device. ``set_mode_gpu`` without a CUDA build or device raises a clear error.
"""
from __future__ import annotations

import torch

_mode = "cpu"
_device_id = 0


class DeviceError(RuntimeError):
    pass


def set_mode_cpu() -> None:
    global _mode
    _mode = "cpu"


def set_mode_gpu() -> None:
    global _mode
    _require_cuda()
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
