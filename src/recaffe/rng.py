"""Caffe's global random number generator.

Fillers, Dropout masks, data shuffling and random crops/mirrors all draw from one generator
per device, seeded by ``set_random_seed`` (the solver calls it with ``random_seed``), so a run
is reproducible from its solver file. We keep our own ``torch.Generator`` objects rather than
torch's global one, so user code that calls ``torch.manual_seed`` does not disturb a run.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import torch

_seed: int = int.from_bytes(os.urandom(4), "little")
_generators: dict[str, torch.Generator] = {}
_numpy_rng: np.random.Generator | None = None


def set_random_seed(seed: int) -> None:
    """Reseed every generator (torch generators per device and the numpy one used for data)."""
    global _seed, _numpy_rng
    _seed = int(seed)
    _generators.clear()
    _numpy_rng = None


def get_seed() -> int:
    return _seed


def generator(device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for ``device``, created from the current seed on first use."""
    device = torch.device(device)
    key = str(device)
    g = _generators.get(key)
    if g is None:
        g = torch.Generator(device=device)
        g.manual_seed(_seed)
        _generators[key] = g
    return g


def numpy_rng() -> np.random.Generator:
    """A numpy generator derived from the seed, for host-side data choices (shuffle, crop, mirror)."""
    global _numpy_rng
    if _numpy_rng is None:
        _numpy_rng = np.random.default_rng(_seed)
    return _numpy_rng


def layer_generator(layer_name: str, phase: int, *streams: int) -> np.random.Generator:
    """A numpy generator for one layer's draws (crops, mirrors, shuffles), from the global seed,
    the layer's name and phase, and a stream number per kind of draw: runs repeat exactly and
    layers (or kinds of draw) do not share a sequence."""
    seed = [get_seed() & 0xFFFFFFFF, zlib.crc32(layer_name.encode()), int(phase), *streams]
    return np.random.default_rng(seed)
