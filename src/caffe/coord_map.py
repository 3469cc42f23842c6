"""pycaffe's ``caffe.coord_map``: how the spatial coordinates of one NetSpec top relate to another's,
and ``crop(top_from, top_to)`` which defines the Crop layer that aligns them (FCN's net surgery).

A layer maps input coordinates to output coordinates affinely along the axes after ``axis``:
``y = a * x + b`` (``a``, ``b`` one value per spatial axis). The output position ``y`` of a
convolution or pooling with kernel extent ``k`` (dilated), stride ``s`` and pad ``p`` is centred on
input ``x = s * y - p + (k - 1) / 2``, so ``a = 1 / s`` and ``b = (p - (k - 1) / 2) / s``; a
deconvolution is the inverse (``a = s``, ``b = (k - 1) / 2 - p``); a crop by ``offset`` shifts
(``a = 1``, ``b = -offset``); elementwise layers leave coordinates alone. A map is ``(axis, a, b)``,
with ``axis`` None for maps that hold on any axis.

``coord_map_from_to(top_from, top_to)`` walks back from both tops to a common ancestor, composing
maps, and returns the map from ``top_from``'s coordinates to ``top_to``'s.
"""
from __future__ import annotations

import numpy as np

from recaffe.net_spec import layers as L

__all__ = ["AxisMismatchError", "UndefinedMapError", "coord_map", "coord_map_from_to", "compose",
           "crop", "inverse"]

# Layers whose output element i sits where input element i does.
PASS_THROUGH_LAYERS = frozenset([
    "AbsVal", "BatchNorm", "Bias", "BNLL", "Clip", "Dropout", "Eltwise", "ELU", "Exp", "Log", "LRN",
    "MVN", "Power", "PReLU", "ReLU", "Scale", "Sigmoid", "Split", "Swish", "TanH", "Threshold"])


class UndefinedMapError(Exception):
    """The layer has no coordinate map (InnerProduct, Input, global pooling, ...)."""


class AxisMismatchError(ValueError):
    """Two maps apply from different axes and cannot be composed."""


IDENTITY = (None, np.ones(1), np.zeros(1))


def _vector(value, default) -> np.ndarray:
    """A param given as a scalar or a list, as a float vector (one entry per spatial axis)."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        value = default
    return np.array(value, dtype=float, ndmin=1)


def _params(fn, message: str) -> dict:
    """The keyword arguments of a NetSpec layer, whether given flat or in ``<message>=dict(...)``."""
    nested = fn.params.get(message)
    return dict(nested) if isinstance(nested, dict) else dict(fn.params)


def _hw(params: dict, name: str, default) -> np.ndarray:
    """``name`` (e.g. ``kernel_size``) or the legacy ``name_h``/``name_w`` pair."""
    stem = {"kernel_size": "kernel", "stride": "stride", "pad": "pad"}[name]
    if f"{stem}_h" in params or f"{stem}_w" in params:
        return np.array([params.get(f"{stem}_h", default), params.get(f"{stem}_w", default)], dtype=float)
    return _vector(params.get(name), default)


def _window(fn):
    """(axis, stride, kernel extent, pad) of a Convolution/Deconvolution/Im2col/Pooling layer."""
    if fn.type_name == "Pooling":
        params = _params(fn, "pooling_param")
        if params.get("global_pooling"):
            raise UndefinedMapError("global pooling maps every position to one")
        axis, dilation = 1, np.ones(1)
    else:
        params = _params(fn, "convolution_param")
        axis = params.get("axis", 1)
        dilation = _vector(params.get("dilation"), 1)
    if "kernel_size" not in params and "kernel_h" not in params:
        raise ValueError(f"{fn.type_name} layer has no kernel_size: its coordinate map is undefined")
    kernel = _hw(params, "kernel_size", 1)
    extent = (kernel - 1) * dilation + 1
    return axis, _hw(params, "stride", 1), extent, _hw(params, "pad", 0)


def coord_map(fn) -> tuple:
    """The map (axis, a, b) from a layer's input coordinates to its output's: ``y = a x + b``."""
    t = fn.type_name
    if t in ("Convolution", "Pooling", "Im2col"):
        axis, stride, extent, pad = _window(fn)
        return axis, 1 / stride, (pad - (extent - 1) / 2) / stride
    if t == "Deconvolution":
        axis, stride, extent, pad = _window(fn)
        return axis, stride, (extent - 1) / 2 - pad
    if t in PASS_THROUGH_LAYERS:
        return IDENTITY
    if t == "Crop":
        params = _params(fn, "crop_param")
        axis = params.get("axis", 2)
        # Coordinates start at the crop axis; the map's axis is the last axis before them.
        return axis - 1, np.ones(1), -_vector(params.get("offset"), 0)
    raise UndefinedMapError(f"no coordinate map for a {t} layer")


def compose(first, then) -> tuple:
    """The map applying ``first`` and then ``then``: x -> a2 (a1 x + b1) + b2."""
    ax1, a1, b1 = first
    ax2, a2, b2 = then
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        raise AxisMismatchError(f"cannot compose coordinate maps on axis {ax1} and axis {ax2}")
    return (ax2 if ax1 is None else ax1), a2 * a1, a2 * b1 + b2


def inverse(m) -> tuple:
    """x = (y - b) / a."""
    ax, a, b = m
    return ax, 1 / a, -b / a


def _maps_to(top) -> dict:
    """For ``top`` and each ancestor reachable through layers with a map: the map from that blob's
    coordinates to ``top``'s, nearest ancestors first. Only a Crop's first bottom is mapped (the
    second only gives the size)."""
    maps = {top: IDENTITY}
    queue = [top]
    while queue:
        t = queue.pop(0)
        try:
            layer_map = coord_map(t.fn)
        except UndefinedMapError:
            continue
        bottoms = t.fn.inputs[:1] if t.fn.type_name == "Crop" else t.fn.inputs
        for bottom in bottoms:
            if bottom not in maps:
                maps[bottom] = compose(layer_map, maps[t])
                queue.append(bottom)
    return maps


def coord_map_from_to(top_from, top_to) -> tuple:
    """The map (axis, a, b) taking ``top_from``'s coordinates to ``top_to``'s, through their
    nearest common ancestor; RuntimeError when no chain of spatial layers connects them."""
    from_maps = _maps_to(top_from)
    to_maps = _maps_to(top_to)
    for blob, to_map in to_maps.items():  # nearest to top_to first
        if blob in from_maps:
            return compose(inverse(from_maps[blob]), to_map)
    raise RuntimeError("Could not compute map between tops; are they connected by spatial layers?")


def crop(top_from, top_to):
    """A Crop layer (NetSpec) cutting ``top_from`` to the region aligned with ``top_to``. Raises
    AssertionError when the tops differ in scale or ``top_from`` would need padding rather than
    cropping, as pycaffe does."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    if not np.all(a == 1):
        raise AssertionError(f"scale mismatch on crop (a = {a})")
    if not np.all(b <= 0):
        raise AssertionError(f"cannot crop negative offset (b = {b})")
    if not np.all(np.round(b) == b):
        raise AssertionError(f"cannot crop noninteger offset (b = {b})")
    axis = 2 if ax is None else ax + 1  # (None: only elementwise layers between, nothing to cut)
    return L.Crop(top_from, top_to, crop_param=dict(axis=axis, offset=[int(v) for v in -np.round(b)]))
