"""Caffe's weight fillers, drawing from recaffe's seeded generator (see rng.py).

fan_in and fan_out follow Caffe's definition on the blob's legacy shape:
``fan_in = count / num`` and ``fan_out = count / channels`` (num = axis 0, channels = axis 1).
"""
from __future__ import annotations

import math

import torch

from . import rng
from .blob import Blob
from .proto import caffe_pb2

FillerParameter = caffe_pb2.FillerParameter


def fill(blob: Blob, param: FillerParameter) -> None:
    """Fill ``blob.data`` in place according to ``param`` (Caffe's GetFiller(param)->Fill(blob))."""
    kind = param.type
    fn = _FILLERS.get(kind)
    if fn is None:
        raise ValueError(f"Unknown filler name: {kind!r}; known fillers: {', '.join(sorted(_FILLERS))}")
    if blob.count() == 0:
        return
    if kind != "gaussian" and param.sparse != -1:
        raise ValueError(f"Sparsity not supported by the {kind!r} filler")
    # Draw on the CPU generator in float64 then cast: identical numbers on every device and dtype.
    values = fn(blob, param, rng.generator("cpu"))
    blob.data_t.copy_(values.reshape(blob.shape))


def _empty(blob: Blob) -> torch.Tensor:
    return torch.empty(blob.count(), dtype=torch.float64)


def _constant(blob, p, g):
    return torch.full((blob.count(),), p.value, dtype=torch.float64)


def _uniform(blob, p, g):
    return _empty(blob).uniform_(p.min, p.max, generator=g)


def _gaussian(blob, p, g):
    values = _empty(blob).normal_(p.mean, p.std, generator=g)
    if p.sparse < -1:
        raise ValueError(f"gaussian filler: sparse must be >= -1, got {p.sparse}")
    if p.sparse >= 0:
        # Each output (axis 0) keeps on average `sparse` non-zero input weights.
        if blob.num_axes < 1:
            raise ValueError("gaussian filler: sparse needs a blob with at least one axis")
        prob = p.sparse / blob.shape[0]
        mask = torch.empty_like(values).bernoulli_(min(prob, 1.0), generator=g)
        values *= mask
    return values


def _positive_unitball(blob, p, g):
    values = _empty(blob).uniform_(0, 1, generator=g).reshape(blob.num, -1)
    values /= values.sum(dim=1, keepdim=True)
    return values


def _fan_n(blob: Blob, p: FillerParameter) -> float:
    fan_in = blob.count() / blob.num
    fan_out = blob.count() / blob.channels
    if p.variance_norm == FillerParameter.AVERAGE:
        return (fan_in + fan_out) / 2.0
    if p.variance_norm == FillerParameter.FAN_OUT:
        return fan_out
    return fan_in


def _xavier(blob, p, g):
    scale = math.sqrt(3.0 / _fan_n(blob, p))
    return _empty(blob).uniform_(-scale, scale, generator=g)


def _msra(blob, p, g):
    std = math.sqrt(2.0 / _fan_n(blob, p))
    return _empty(blob).normal_(0.0, std, generator=g)


def _bilinear(blob, p, g):
    # Weights of a bilinear upsampling kernel, for Deconvolution (kernel 2f - f%2, stride f).
    if blob.num_axes != 4:
        raise ValueError(f"bilinear filler needs a 4-D blob, got shape {blob.shape}")
    h, w = blob.shape[2], blob.shape[3]
    if h != w:
        raise ValueError(f"bilinear filler needs a square kernel, got {h}x{w}")
    f = math.ceil(w / 2.0)
    c = (w - 1) / (2.0 * f)
    x = torch.arange(w, dtype=torch.float64)
    wx = 1 - (x / f - c).abs()
    kernel = wx[:, None] * wx[None, :]
    return kernel.expand(blob.shape[0], blob.shape[1], h, w).reshape(-1).clone()


_FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}
