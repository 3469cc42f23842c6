"""Run one layer alone and check its gradients by finite differences (Caffe's GradientChecker).

Used by the test suite and usable for your own layers::

    from recaffe.gradient_check import check_gradient
    check_gradient('type: "ReLU"', [np.random.randn(2, 3, 4, 5)], kink=0.0, kink_range=1e-2)

The layer runs in float64. The objective is ``sum_i <top_i, R_i>`` for fixed random ``R_i``, so
the analytic gradient is what ``backward`` computes with ``R_i`` written into the top diffs.
Parameters are checked too (their diffs are zeroed first, since backward accumulates into them).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import device as _device
from . import rng
from .blob import Blob
from .layer import Layer, create_layer
from .proto import caffe_pb2
from .io.protofiles import parse_text


def layer_param(text_or_param: str | caffe_pb2.LayerParameter, phase: int = caffe_pb2.TRAIN,
                ) -> caffe_pb2.LayerParameter:
    if isinstance(text_or_param, caffe_pb2.LayerParameter):
        return text_or_param
    p = parse_text(text_or_param, caffe_pb2.LayerParameter(), filename="<layer>")
    if not p.name:
        p.name = "L"
    if not p.HasField("phase"):
        p.phase = phase
    return p


def make_layer(param, bottoms: Sequence[np.ndarray], num_tops: int = 1, dtype=torch.float64,
               phase: int = caffe_pb2.TRAIN, seed: int = 1701,
               device=None) -> tuple[Layer, list[Blob], list[Blob]]:
    """Create and set up a layer on float64 bottom blobs holding ``bottoms``, on ``device``
    (default: the current mode's device, so GPU mode checks the GPU kernels)."""
    device = _device.current_device() if device is None else torch.device(device)
    rng.set_random_seed(seed)
    p = layer_param(param, phase)
    layer = create_layer(p, dtype=dtype, device=device)
    bottom = []
    for arr in bottoms:
        arr = np.asarray(arr)
        b = Blob(arr.shape, dtype, device)
        b.data_t = torch.as_tensor(arr, dtype=dtype).clone().to(device)
        bottom.append(b)
    top = [Blob((), dtype, device) for _ in range(num_tops)]
    layer.setup(bottom, top)
    return layer, bottom, top


def forward_layer(param, bottoms: Sequence[np.ndarray], num_tops: int = 1, dtype=torch.float64,
                  phase: int = caffe_pb2.TRAIN, seed: int = 1701) -> list[np.ndarray]:
    """Set up and run one forward; returns copies of the tops' data."""
    layer, bottom, top = make_layer(param, bottoms, num_tops, dtype, phase, seed)
    layer.run_forward(bottom, top)
    return [t.data.copy() for t in top]


def check_gradient(param, bottoms: Sequence[np.ndarray], *, num_tops: int = 1,
                   check_bottoms: Sequence[int] | None = None, check_params: bool = True,
                   step: float = 1e-4, threshold: float = 1e-5, kink: float = 0.0,
                   kink_range: float = -1.0, phase: int = caffe_pb2.TRAIN, seed: int = 1701,
                   layer_setup_hook=None) -> Layer:
    """Assert that backward matches central finite differences on bottoms and params.

    ``check_bottoms``: indices of bottoms to check (default: all). Elements within ``kink_range``
    of ``kink`` are skipped (non-differentiable points such as ReLU's 0). Returns the layer.
    """
    layer, bottom, top = make_layer(param, bottoms, num_tops, torch.float64, phase, seed)
    if layer_setup_hook is not None:
        layer_setup_hook(layer)
    if check_bottoms is None:
        check_bottoms = range(len(bottom))
    check_bottoms = list(check_bottoms)
    gen = np.random.default_rng(seed)

    def objective() -> float:
        rng.set_random_seed(seed)  # layers that draw random numbers (Dropout) repeat their draws
        layer.run_forward(bottom, top)
        return sum(float((t.data_t * r).sum()) for t, r in zip(top, proj))

    rng.set_random_seed(seed)
    layer.run_forward(bottom, top)
    device = layer.device
    proj = [torch.as_tensor(gen.standard_normal(t.shape), dtype=torch.float64).to(device) for t in top]
    # analytic gradients
    objective()
    for t, r in zip(top, proj):
        t.diff_t = r.clone()
    for b in layer.blobs:
        b.diff_t.zero_()
    for i, b in enumerate(bottom):
        b.diff_t = torch.zeros(b.shape, dtype=torch.float64, device=device)
    propagate = [i in check_bottoms for i in range(len(bottom))]
    saved_ppd = list(layer.param_propagate_down)
    layer.param_propagate_down = [check_params] * len(layer.blobs)
    layer.backward(top, propagate, bottom)
    layer.param_propagate_down = saved_ppd
    targets = [(f"bottom {i}", bottom[i]) for i in check_bottoms]
    if check_params:
        targets += [(f"param {i}", b) for i, b in enumerate(layer.blobs)]
    analytic = [b.diff_t.clone() for _, b in targets]
    failures = []
    for (what, blob), grad in zip(targets, analytic):
        data = blob.data_t.reshape(-1)
        g = grad.reshape(-1)
        for k in range(data.numel()):
            x = float(data[k])
            if kink_range >= 0 and abs(x - kink) <= kink_range:
                continue
            data[k] = x + step
            plus = objective()
            data[k] = x - step
            minus = objective()
            data[k] = x
            numeric = (plus - minus) / (2 * step)
            a = float(g[k])
            scale = max(abs(a), abs(numeric), 1.0)
            if abs(a - numeric) > threshold * scale:
                failures.append(f"{what}[{k}]: analytic {a:.6g} vs numeric {numeric:.6g}")
    if failures:
        raise AssertionError(f"gradient check failed for {layer.type} ({len(failures)} elements), e.g.: "
                             + "; ".join(failures[:5]))
    return layer
