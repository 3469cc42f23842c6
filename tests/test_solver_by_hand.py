"""The by-hand recipe of docs/semantics.md reproduces solver.step for every solver type.

The test executes the code block marked ``<!-- recipe:update_by_hand -->`` in the docs, so the
documented recipe cannot drift from what the solvers do.
"""
import math
import pathlib
import re

import numpy as np
import pytest

from recaffe.io.protofiles import parse_text
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "semantics.md"

NET = """net_param {
  name: "mlp"
  layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 6 dim: 4 } } }
  layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 6 } } }
  layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
    param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
    inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                          bias_filler { type: "gaussian" std: 0.5 } } }
  layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
  layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "o"
    param { lr_mult: 0.5 decay_mult: 3 }
    inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 }
                          bias_filler { type: "gaussian" std: 0.5 } } }
  layer { name: "loss" type: "SoftmaxWithLoss" bottom: "o" bottom: "y" top: "loss" }
}
random_seed: 11
"""

# Per type, solver settings with Caffe's usual hyper-parameters for that type.
TYPES = {
    "SGD": "momentum: 0.9",
    "Nesterov": "momentum: 0.9",
    "AdaGrad": "delta: 1e-6",
    "RMSProp": "rms_decay: 0.95 delta: 1e-6",
    "AdaDelta": "momentum: 0.95 delta: 1e-6",
    "Adam": "momentum: 0.9 momentum2: 0.999 delta: 1e-8",
}
# Variations of everything the update reads: regularization, clipping, iter_size, lr policy.
VARIANTS = {
    "L2": 'weight_decay: 0.01 regularization_type: "L2" base_lr: 0.05 lr_policy: "fixed"',
    "L1_clip": 'weight_decay: 0.02 regularization_type: "L1" clip_gradients: 0.1 base_lr: 0.05 '
               'lr_policy: "fixed"',
    "decoupled_step_itersize": 'weight_decay: 0.05 regularization_type: "decoupled" iter_size: 2 '
                               'base_lr: 0.05 lr_policy: "step" gamma: 0.5 stepsize: 2',
}


POLICY_SETTINGS = "gamma: 0.5 power: 0.75 stepsize: 2 max_iter: 10 stepvalue: 1 stepvalue: 3"
# Caffe's seven lr policies, from their definitions in caffe.proto's SolverParameter comments.
POLICIES = {
    "fixed": lambda p, it: p.base_lr,
    "step": lambda p, it: p.base_lr * p.gamma ** (it // p.stepsize),
    "exp": lambda p, it: p.base_lr * p.gamma ** it,
    "inv": lambda p, it: p.base_lr * (1 + p.gamma * it) ** -p.power,
    "multistep": lambda p, it: p.base_lr * p.gamma ** sum(it >= v for v in p.stepvalue),
    "poly": lambda p, it: p.base_lr * (1 - it / p.max_iter) ** p.power,
    "sigmoid": lambda p, it: p.base_lr / (1 + math.exp(-p.gamma * (it - p.stepsize))),
}


def rate_at(p, it):
    return POLICIES[p.lr_policy](p, it)


def documented_recipe():
    text = DOC.read_text()
    m = re.search(r"<!-- recipe:update_by_hand -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/semantics.md lost its update_by_hand recipe block"
    scope = {}
    exec(compile(m.group(1), str(DOC), "exec"), scope)
    return scope["update_by_hand"]


def batches(n):
    rng = np.random.default_rng(5)
    return [(rng.normal(size=(6, 4)).astype("f4"), rng.integers(0, 3, size=6).astype("f4"))
            for _ in range(n)]


def make_solver(kind, settings):
    text = NET + f'type: "{kind}"\n{TYPES[kind]}\n{settings}\n'
    return create_solver(parse_text(text, caffe_pb2.SolverParameter()))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", sorted(TYPES))
def test_documented_recipe_reproduces_step(kind, variant):
    compare_with_recipe(kind, VARIANTS[variant], steps=5)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("kind", sorted(TYPES))
def test_every_lr_policy_with_every_solver_type(kind, policy):
    settings = f'base_lr: 0.05 lr_policy: "{policy}" {POLICY_SETTINGS} weight_decay: 0.01'
    compare_with_recipe(kind, settings, steps=4)


def compare_with_recipe(kind, settings, steps):
    update_by_hand = documented_recipe()
    variant = f"{settings!r}"
    a, b = make_solver(kind, settings), make_solver(kind, settings)
    for pa, pb in zip(a.net.learnable_params, b.net.learnable_params):
        assert np.array_equal(pa.data, pb.data)  # same seed, same init
    net, p, hist = b.net, b.param, {}
    moved = 0.0
    for it, (x, y) in enumerate(batches(steps)):
        for s in (a, b):
            s.net.blobs["x"].data[...] = x
            s.net.blobs["y"].data[...] = y
        before = [w.data.copy() for w in a.net.learnable_params]
        a.step(1)
        net.clear_param_diffs()
        for _ in range(p.iter_size):
            net.forward()
            net.backward()
        update_by_hand(net, p, rate_at(p, it), it, hist)
        for w0, wa, wb in zip(before, a.net.learnable_params, net.learnable_params):
            np.testing.assert_allclose(wb.data, wa.data, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{kind}/{variant} step {it + 1}")
            moved = max(moved, float(np.abs(wa.data - w0).max()))
    assert moved > 1e-4  # the solver really updated the weights


def test_recipe_is_not_vacuous_it_detects_a_wrong_rate():
    """With a rate off by 10% the recipe no longer matches: the comparison above can fail."""
    update_by_hand = documented_recipe()
    a, b = make_solver("Adam", VARIANTS["L2"]), make_solver("Adam", VARIANTS["L2"])
    (x, y), = batches(1)
    for s in (a, b):
        s.net.blobs["x"].data[...] = x
        s.net.blobs["y"].data[...] = y
    a.step(1)
    b.net.clear_param_diffs()
    b.net.forward()
    b.net.backward()
    update_by_hand(b.net, b.param, 1.1 * rate_at(b.param, 0), 0, {})
    diff = max(float(np.abs(pa.data - pb.data).max())
               for pa, pb in zip(a.net.learnable_params, b.net.learnable_params))
    assert diff > 1e-4
    assert not math.isnan(diff)


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_forward_backward_then_apply_update_alone_is_step(kind):
    """Your own forward/backward, then only Caffe's update: solver.apply_update() (+ iter += 1,
    which Solver::Step does after the update) gives step()'s weights exactly."""
    settings = VARIANTS["decoupled_step_itersize"].replace("iter_size: 2", "")
    a, b = make_solver(kind, settings), make_solver(kind, settings)
    for x, y in batches(4):
        for s in (a, b):
            s.net.blobs["x"].data[...] = x
            s.net.blobs["y"].data[...] = y
        a.step(1)
        assert b.lr == pytest.approx(rate_at(b.param, b.iter), rel=1e-6)
        b.net.clear_param_diffs()
        b.net.forward()
        b.net.backward()
        b.apply_update()
        b.iter += 1
        for pa, pb in zip(a.net.learnable_params, b.net.learnable_params):
            assert np.array_equal(pa.data, pb.data)
    assert a.iter == b.iter == 4
