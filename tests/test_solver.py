"""Solver semantics: update rules against hand-computed values, lr policies, the hand-written loop
that reproduces solver.step bit for bit, iter_size, clipping, snapshots and resume."""
import math

import numpy as np
import pytest

from helpers import capture_log
from recaffe.io.protofiles import parse_text
from recaffe.proto import caffe_pb2
from recaffe.solvers import SolverError, create_solver
from recaffe.solvers.lr_policies import LearningRateError, learning_rate

NET = """net_param {
  name: "tiny"
  layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
  layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 dim: 2 } } }
  layer { name: "ip" type: "InnerProduct" bottom: "x" top: "o" %s
    inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 }
                          bias_filler { type: "gaussian" std: 0.5 } } }
  layer { name: "loss" type: "EuclideanLoss" bottom: "o" bottom: "y" top: "loss" }
}
"""
X = np.array([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [-0.2, 0.8, 0.1], [1.0, 1.0, -1.0]], "f4")
Y = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, 2.0]], "f4")


def solver(settings: str, params: str = "", seed: int = 7):
    text = NET % params + f"random_seed: {seed}\n" + settings
    s = create_solver(parse_text(text, caffe_pb2.SolverParameter()))
    s.net.blobs["x"].data[...] = X
    s.net.blobs["y"].data[...] = Y
    return s


def grads(w, b):
    """Euclidean loss sum((xW^T+b - y)^2)/(2N) and its gradients, in float64."""
    o = X.astype("f8") @ w.T + b
    d = (o - Y) / len(X)
    return d.T @ X, d.sum(0)


def run_reference(s, steps, update):
    """Apply ``update(i, w_or_b, grad, state, it)`` for ``steps`` iterations from the solver's init."""
    w = s.net.params["ip"][0].data.astype("f8")
    b = s.net.params["ip"][1].data.astype("f8")
    state = [{}, {}]
    for it in range(steps):
        gw, gb = grads(w, b)
        w = update(0, w, gw, state[0], it)
        b = update(1, b, gb, state[1], it)
    return w, b


def check(s, steps, update, rtol=2e-5):
    w_ref, b_ref = run_reference(s, steps, update)
    s.step(steps)
    np.testing.assert_allclose(s.net.params["ip"][0].data, w_ref, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(s.net.params["ip"][1].data, b_ref, rtol=rtol, atol=1e-6)


def test_sgd_momentum_keeps_lr_inside_history_with_l2_and_mults():
    # step policy changes the rate mid-run: the lr inside the history is what makes Caffe differ
    s = solver('base_lr: 0.1 lr_policy: "step" gamma: 0.5 stepsize: 2 momentum: 0.9 weight_decay: 0.01',
               'param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }')
    lr_mult, decay_mult = [1, 2], [1, 0]

    def update(i, p, g, st, it):
        rate = 0.1 * 0.5 ** (it // 2)
        g = g + 0.01 * decay_mult[i] * p
        st["h"] = 0.9 * st.get("h", 0) + rate * lr_mult[i] * g
        return p - st["h"]
    check(s, 5, update)


def test_sgd_l1_regularization_uses_sign():
    s = solver('base_lr: 0.05 lr_policy: "fixed" weight_decay: 0.1 regularization_type: "L1"')

    def update(i, p, g, st, it):
        return p - 0.05 * (g + 0.1 * np.sign(p))
    check(s, 4, update)


def test_nesterov_adagrad_rmsprop_adadelta_adam_formulas():
    cases = {
        "Nesterov": 'momentum: 0.9',
        "AdaGrad": 'delta: 1e-6',
        "RMSProp": 'rms_decay: 0.9 delta: 1e-6',
        "AdaDelta": 'momentum: 0.95 delta: 1e-6',
        "Adam": 'momentum: 0.9 momentum2: 0.999 delta: 1e-8',
    }

    def nesterov(i, p, g, st, it):
        old = st.get("h", 0)
        st["h"] = 0.9 * old + 0.1 * g
        return p - ((1 + 0.9) * st["h"] - 0.9 * old)

    def adagrad(i, p, g, st, it):
        st["h"] = st.get("h", 0) + g * g
        return p - 0.1 * g / (np.sqrt(st["h"]) + 1e-6)

    def rmsprop(i, p, g, st, it):
        st["h"] = 0.9 * st.get("h", 0) + 0.1 * g * g
        return p - 0.1 * g / (np.sqrt(st["h"]) + 1e-6)

    def adadelta(i, p, g, st, it):
        st["g2"] = 0.95 * st.get("g2", 0) + 0.05 * g * g
        upd = g * np.sqrt((st.get("u2", 0) + 1e-6) / (st["g2"] + 1e-6))
        st["u2"] = 0.95 * st.get("u2", 0) + 0.05 * upd * upd
        return p - 0.1 * upd

    def adam(i, p, g, st, it):
        t = it + 1
        st["m"] = 0.9 * st.get("m", 0) + 0.1 * g
        st["v"] = 0.999 * st.get("v", 0) + 0.001 * g * g
        corr = math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        return p - 0.1 * corr * st["m"] / (np.sqrt(st["v"]) + 1e-8)

    rules = {"Nesterov": nesterov, "AdaGrad": adagrad, "RMSProp": rmsprop, "AdaDelta": adadelta, "Adam": adam}
    for name, extra in cases.items():
        s = solver(f'type: "{name}" base_lr: 0.1 lr_policy: "fixed" {extra}')
        check(s, 6, rules[name], rtol=1e-4)


@pytest.mark.parametrize("name", ["AdaGrad", "RMSProp"])
def test_adagrad_and_rmsprop_refuse_momentum(name):
    with pytest.raises(SolverError, match=f"Momentum cannot be used with {name}"):
        solver(f'type: "{name}" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9')


def test_deprecated_solver_type_enum_selects_the_solver():
    s = solver('solver_type: ADAM base_lr: 0.1 lr_policy: "fixed"')
    assert type(s).__name__ == "AdamSolver"


def test_lr_policies_match_their_formulas():
    p = parse_text('base_lr: 0.1 gamma: 0.5 power: 0.75 stepsize: 3 max_iter: 10 stepvalue: 2 stepvalue: 5',
                   caffe_pb2.SolverParameter())
    f32 = lambda v: float(np.float32(v))  # noqa: E731  Caffe's Dtype rate
    expect = {
        "fixed": lambda it: 0.1,
        "step": lambda it: 0.1 * 0.5 ** (it // 3),
        "exp": lambda it: 0.1 * 0.5 ** it,
        "inv": lambda it: 0.1 * (1 + 0.5 * it) ** -0.75,
        "multistep": lambda it: 0.1 * 0.5 ** sum(it >= v for v in (2, 5)),
        "poly": lambda it: 0.1 * (1 - it / 10) ** 0.75,
        "sigmoid": lambda it: 0.1 / (1 + math.exp(-0.5 * (it - 3))),
    }
    for policy, fn in expect.items():
        p.lr_policy = policy
        step = 0
        for it in range(8):
            rate, step = learning_rate(p, it, step)
            assert rate == pytest.approx(f32(fn(it)), rel=1e-6), (policy, it)
    p.lr_policy = "cosine"
    with pytest.raises(LearningRateError, match="Unknown learning rate policy"):
        learning_rate(p, 0, 0)


def test_hand_written_loop_matches_step_exactly_with_clear_param_diffs():
    settings = 'base_lr: 0.01 lr_policy: "fixed" momentum: 0 weight_decay: 0'
    a, b = solver(settings, seed=3), solver(settings, seed=3)
    a.step(5)
    net = b.net
    for _ in range(5):
        net.clear_param_diffs()
        net.forward()
        net.backward()
        for layer in net.layers:
            for blob in layer.blobs:
                blob.diff[...] *= 0.01
                blob.data[...] -= blob.diff
    for pa, pb in zip(a.net.params["ip"], net.params["ip"]):
        assert np.linalg.norm(pa.data - pb.data) == 0.0


def test_hand_written_loop_without_clearing_accumulates_and_differs_from_step():
    settings = 'base_lr: 0.01 lr_policy: "fixed"'
    a, b = solver(settings, seed=3), solver(settings, seed=3)
    net = b.net
    diffs = []
    for it in range(3):
        a.step(1)
        net.forward()
        net.backward()  # no clear_param_diffs: this iteration's gradient adds to the last one's
        for blob in net.params["ip"]:
            blob.diff[...] *= 0.01
            blob.data[...] -= blob.diff
        diffs.append(np.linalg.norm(a.net.params["ip"][0].data - net.params["ip"][0].data))
    assert diffs[0] == 0.0 and diffs[1] > 0 and diffs[2] > 0


def test_iter_size_averages_gradients_over_passes():
    one = solver('base_lr: 0.1 lr_policy: "fixed"', seed=5)
    two = solver('base_lr: 0.1 lr_policy: "fixed" iter_size: 2', seed=5)
    one.step(3)
    two.step(3)  # same batch twice, normalized by iter_size: the same update
    np.testing.assert_allclose(one.net.params["ip"][0].data, two.net.params["ip"][0].data, rtol=1e-6)


def test_clip_gradients_scales_by_global_norm():
    s = solver('base_lr: 1 lr_policy: "fixed" clip_gradients: 0.01')
    w0 = s.net.params["ip"][0].data.astype("f8").copy()
    b0 = s.net.params["ip"][1].data.astype("f8").copy()
    gw, gb = grads(w0, b0)
    norm = math.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    assert norm > 0.01
    with capture_log() as lines:
        s.step(1)
    np.testing.assert_allclose(s.net.params["ip"][0].data, w0 - gw * 0.01 / norm, rtol=1e-5, atol=1e-7)
    assert any(line.startswith("Gradient clipping: scaling down gradients (L2 norm") for line in lines)


def test_random_seed_makes_init_reproducible():
    a, b, c = solver('base_lr: 0.1', seed=11), solver('base_lr: 0.1', seed=11), solver('base_lr: 0.1', seed=12)
    assert np.array_equal(a.net.params["ip"][0].data, b.net.params["ip"][0].data)
    assert not np.array_equal(a.net.params["ip"][0].data, c.net.params["ip"][0].data)


@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"])
def test_resume_from_snapshot_is_exact(tmp_path, kind):
    momentum = "momentum: 0.9" if kind in ("SGD", "Nesterov", "AdaDelta", "Adam") else ""
    settings = (f'type: "{kind}" base_lr: 0.05 lr_policy: "multistep" gamma: 0.5 stepvalue: 3 {momentum} '
                f'weight_decay: 0.001 snapshot_prefix: "{tmp_path}/snap"')
    straight = solver(settings)
    straight.step(6)
    first = solver(settings)
    first.step(3)
    state = first.snapshot()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap_iter_3.caffemodel", "snap_iter_3.solverstate"]
    resumed = solver(settings, seed=99)  # different init: everything must come from the snapshot
    resumed.restore(state)
    assert resumed.iter == 3
    resumed.step(3)
    for pa, pb in zip(straight.net.params["ip"], resumed.net.params["ip"]):
        assert np.array_equal(pa.data, pb.data)


def test_restoring_a_state_of_another_net_is_a_clear_error(tmp_path):
    s = solver(f'base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 snapshot_prefix: "{tmp_path}/s"')
    s.step(1)
    state = s.snapshot()
    other = solver(f'type: "Adam" base_lr: 0.1 lr_policy: "fixed" snapshot_prefix: "{tmp_path}/o"')
    with pytest.raises(SolverError, match="incorrect length of history blobs"):
        other.restore(state)


def test_display_logs_smoothed_loss_and_lr(tmp_path):
    s = solver('base_lr: 0.1 lr_policy: "fixed" display: 2 average_loss: 2')
    losses = []
    s.add_callback(on_gradients_ready=lambda: losses.append(float(s.net.blobs["loss"].data)))
    with capture_log() as lines:
        s.step(4)
    shown = [ln for ln in lines if ln.startswith("Iteration 2 (")]
    assert len(shown) == 1 and shown[0].endswith("loss = %g" % ((losses[1] + losses[2]) / 2))
    assert "Iteration 2, lr = 0.1" in lines
    assert any(ln.startswith("    Train net output #0: loss = ") for ln in lines)


def test_test_nets_share_weights_and_report_means(tmp_path):
    text = NET % "" + 'random_seed: 1 base_lr: 0.1 lr_policy: "fixed" test_iter: 3 test_interval: 2 ' \
        'test_initialization: false test_net_param { ' \
        'layer { name: "x" type: "DummyData" top: "x" dummy_data_param { shape { dim: 4 dim: 3 } ' \
        'data_filler { type: "constant" value: 1 } } } ' \
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "o" inner_product_param { num_output: 2 } } }'
    s = create_solver(parse_text(text, caffe_pb2.SolverParameter()))
    s.net.blobs["x"].data[...] = X
    s.net.blobs["y"].data[...] = Y
    with capture_log() as lines:
        s.step(2)
        result = s.test(0)
    assert s.test_nets[0].params["ip"][0] is s.net.params["ip"][0]
    w, b = s.net.params["ip"][0].data, s.net.params["ip"][1].data
    expected = w.sum(1) + b  # all-ones input
    assert "Iteration 2, Testing net (#0)" in lines
    got = [result[f"o[{k}]"] for k in range(8)]
    np.testing.assert_allclose(got, np.tile(expected, 4), rtol=1e-6)


def test_decoupled_weight_decay_matches_adamw_closed_form_and_differs_from_l2():
    common = 'type: "Adam" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 momentum2: 0.999 delta: 1e-8 ' \
        'weight_decay: 0.2 '
    dec = solver(common + 'regularization_type: "decoupled"')
    l2 = solver(common + 'regularization_type: "L2"')

    def adamw(i, p, g, st, it):
        t = it + 1
        st["m"] = 0.9 * st.get("m", 0) + 0.1 * g
        st["v"] = 0.999 * st.get("v", 0) + 0.001 * g * g
        corr = math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        return p - 0.1 * corr * st["m"] / (np.sqrt(st["v"]) + 1e-8) - 0.1 * 0.2 * p
    check(dec, 5, adamw, rtol=1e-4)
    l2.step(5)
    assert np.abs(l2.net.params["ip"][0].data - dec.net.params["ip"][0].data).max() > 1e-3


def test_decoupled_decay_equals_l2_for_plain_sgd():
    a = solver('base_lr: 0.1 lr_policy: "fixed" weight_decay: 0.05 regularization_type: "decoupled"')
    b = solver('base_lr: 0.1 lr_policy: "fixed" weight_decay: 0.05')
    a.step(4)
    b.step(4)
    np.testing.assert_allclose(a.net.params["ip"][0].data, b.net.params["ip"][0].data, rtol=1e-6, atol=1e-7)


def test_unknown_regularization_type_is_an_error():
    with pytest.raises(SolverError, match="Unknown regularization type: 'L3'"):
        solver('base_lr: 0.1 lr_policy: "fixed" regularization_type: "L3"')


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_resume_from_hdf5_snapshot_is_exact(tmp_path, kind):
    settings = (f'type: "{kind}" base_lr: 0.05 lr_policy: "step" gamma: 0.5 stepsize: 2 momentum: 0.9 '
                f'snapshot_format: HDF5 snapshot_prefix: "{tmp_path}/h"')
    straight = solver(settings)
    straight.step(6)
    first = solver(settings)
    first.step(3)
    state = first.snapshot()
    assert state.endswith("h_iter_3.solverstate.h5") and (tmp_path / "h_iter_3.caffemodel.h5").exists()
    resumed = solver(settings, seed=99)
    resumed.restore(state)
    resumed.step(3)
    for pa, pb in zip(straight.net.params["ip"], resumed.net.params["ip"]):
        assert np.array_equal(pa.data, pb.data)
