"""The multi-tensor (torch._foreach_*) update is bit-exact with Caffe's per-param loop.

Two solvers from the same seed take the same batches, one with ``foreach = False`` (the per-param
loop, Caffe's ApplyUpdate op by op) and one with the default multi-tensor path; weights and history
must be *equal*, not close, after every step, for every solver type and everything the update
reads (L2/L1/decoupled decay, clip_gradients, iter_size, lr_mult/decay_mult groups).
"""
import numpy as np
import pytest

from recaffe.io.protofiles import parse_text
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver
from recaffe.solvers.sgd import SGDSolver

from test_solver_by_hand import NET, TYPES, batches

VARIANTS = {
    "L2": 'weight_decay: 0.01 regularization_type: "L2" base_lr: 0.05 lr_policy: "fixed"',
    "L1_clip": 'weight_decay: 0.02 regularization_type: "L1" clip_gradients: 0.1 base_lr: 0.05 '
               'lr_policy: "fixed"',
    "decoupled_itersize": 'weight_decay: 0.05 regularization_type: "decoupled" iter_size: 2 '
                          'base_lr: 0.05 lr_policy: "step" gamma: 0.5 stepsize: 2',
}


def make(kind, settings, foreach, chunk=None):
    s = create_solver(parse_text(NET + f'type: "{kind}"\n{TYPES[kind]}\n{settings}\n',
                                 caffe_pb2.SolverParameter()))
    s.foreach = foreach
    if chunk:
        s.CPU_CHUNK = chunk
    return s


def run_both(kind, settings, steps=4, chunk=None):
    loop, multi = make(kind, settings, False), make(kind, settings, True, chunk)
    for x, y in batches(steps):
        for s in (loop, multi):
            s.net.blobs["x"].data[...] = x
            s.net.blobs["y"].data[...] = y
            s.step(1)
        yield loop, multi


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", sorted(TYPES))
def test_foreach_update_equals_the_per_param_loop_bit_for_bit(kind, variant):
    moved = 0.0
    first = [w.data.copy() for w in make(kind, VARIANTS[variant], True).net.learnable_params]
    for loop, multi in run_both(kind, VARIANTS[variant]):
        for a, b in zip(loop.net.learnable_params, multi.net.learnable_params):
            assert np.array_equal(a.data, b.data), f"{kind}/{variant}: weights differ"
        for a, b in zip(loop.history, multi.history):
            assert np.array_equal(a.data, b.data), f"{kind}/{variant}: history differs"
    moved = max(float(np.abs(w.data - f).max()) for w, f in zip(multi.net.learnable_params, first))
    assert moved > 1e-4


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_chunked_foreach_update_equals_the_loop(kind):
    """CPU chunks (here of at most 16 values: every param its own chunk but the biases) change
    nothing either."""
    solver = make(kind, VARIANTS["L1_clip"], True, chunk=16)
    assert sum(len(solver._chunks(g)) for *_, g in solver.param_groups()) > len(solver.param_groups())
    for loop, multi in run_both(kind, VARIANTS["L1_clip"], chunk=16):
        for a, b in zip(loop.net.learnable_params, multi.net.learnable_params):
            assert np.array_equal(a.data, b.data)


def test_groups_follow_the_multipliers():
    s = make("SGD", VARIANTS["L2"], True)
    # ip1: (1, 1) weight, (2, 0) bias; ip2: (0.5, 3) weight, default (1, 1) bias
    assert s.param_groups() == [(1.0, 1.0, [0, 3]), (2.0, 0.0, [1]), (0.5, 3.0, [2])]


def test_the_comparison_can_fail():
    """A multi-tensor rule that rounds differently (rate applied as two multiplications) is caught."""

    class Skewed(SGDSolver):
        compute_update_value = SGDSolver.compute_update_value  # both rules from this class

        def compute_update_values(self, idx, diffs, local_rate):
            import torch
            history = self.histories(idx)
            torch._foreach_mul_(history, self.param.momentum)
            torch._foreach_add_(history, torch._foreach_mul(torch._foreach_mul(diffs, local_rate * 3), 1 / 3))
            torch._foreach_copy_(diffs, history)

    loop, multi = make("SGD", VARIANTS["L2"], False), make("SGD", VARIANTS["L2"], True)
    multi.__class__ = Skewed
    differs = False
    for x, y in batches(3):
        for s in (loop, multi):
            s.net.blobs["x"].data[...] = x
            s.net.blobs["y"].data[...] = y
            s.step(1)
        differs |= any(not np.array_equal(a.data, b.data)
                       for a, b in zip(loop.net.learnable_params, multi.net.learnable_params))
    assert differs


def test_a_subclass_overriding_only_the_per_param_rule_keeps_the_loop():
    class Custom(SGDSolver):
        calls = 0

        def compute_update_value(self, i, blob, local_rate):
            Custom.calls += 1
            super().compute_update_value(i, blob, local_rate)

    s = make("SGD", VARIANTS["L2"], True)
    s.__class__ = Custom
    x, y = batches(1)[0]
    s.net.blobs["x"].data[...] = x
    s.net.blobs["y"].data[...] = y
    s.step(1)
    assert Custom.calls == len(s.net.learnable_params)
