"""CPU threads: how many torch uses, and how its OpenMP threads wait, so that training shares a
busy machine gracefully.

OpenMP's threads spin while they wait for work by default. On a machine where another process
keeps a core busy, a thread that spins (or that is descheduled in the middle of a parallel
region) makes every other thread wait for it, and LeNet training falls to a small fraction of its
quiet speed. With ``OMP_WAIT_POLICY=PASSIVE`` the waiting threads sleep at once and give the core
back. The policy is read once, when torch's OpenMP runtime loads (``import torch``), so
``prepare_environment()`` runs when recaffe is imported, before torch: it sets
``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set already (yours wins); processes started
afterwards inherit it. A program that imported torch before recaffe keeps OpenMP's default; set
the variable in its environment.

The number of intra-op threads is torch's default (one per physical core) unless
``RECAFFE_THREADS`` (environment), ``-threads N`` (caffe train/test/time) or
``set_num_threads(n)`` says otherwise.
"""
from __future__ import annotations

import os
import sys

THREADS_ENV = "RECAFFE_THREADS"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"


class ThreadsError(ValueError):
    pass


def prepare_environment(environ=None, modules=None) -> bool:
    """Before torch loads: OpenMP threads sleep while they wait, unless OMP_WAIT_POLICY is set.
    Returns whether the policy was set (not when torch is loaded already: too late to matter)."""
    env = os.environ if environ is None else environ
    if "torch" in (sys.modules if modules is None else modules) or WAIT_POLICY_ENV in env:
        return False
    env[WAIT_POLICY_ENV] = DEFAULT_WAIT_POLICY
    return True


def _parse(value, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ThreadsError(f"{where}: expected a number of threads (a positive integer), "
                           f"got {value!r}") from None
    if n < 1:
        raise ThreadsError(f"{where}: expected a number of threads (a positive integer), got {value!r}")
    return n


def set_num_threads(n: int) -> None:
    """Use ``n`` threads for torch's intra-op parallelism (convolutions, GEMMs, elementwise ops)."""
    import torch
    torch.set_num_threads(_parse(n, "set_num_threads"))


def get_num_threads() -> int:
    import torch
    return torch.get_num_threads()


def apply_environment() -> None:
    """Apply RECAFFE_THREADS, if set (called when recaffe is imported)."""
    value = os.environ.get(THREADS_ENV, "")
    if value:
        import torch
        torch.set_num_threads(_parse(value, THREADS_ENV))


def describe() -> str:
    """One line for logs and benchmarks: threads and wait policy in effect."""
    import torch
    return (f"{torch.get_num_threads()} intra-op threads, OMP_WAIT_POLICY="
            f"{os.environ.get(WAIT_POLICY_ENV, 'unset (OpenMP default: spin)')}")
