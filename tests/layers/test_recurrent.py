"""Recurrent layers (RNN, LSTM, LSTMUnit): forward against a numpy recurrence written here,
gradient checks, sequence resets by ``cont``, state carried across batches, bad params, and a
tiny LSTM that learns a sequence task through the solver."""
import numpy as np
import pytest

from helpers import capture_log, make_net
from recaffe.gradient_check import check_gradient, forward_layer, make_layer
from recaffe.io.protofiles import parse_text
from recaffe.layer import LayerError
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver


def randn(*shape, seed=0, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape)


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


FILLERS = ('weight_filler { type: "uniform" min: -0.6 max: 0.6 } '
           'bias_filler { type: "uniform" min: -0.3 max: 0.3 }')


def lstm_text(num_output=3, extra=""):
    return f'type: "LSTM" recurrent_param {{ num_output: {num_output} {FILLERS} {extra} }}'


def rnn_text(num_output=3, extra=""):
    return f'type: "RNN" recurrent_param {{ num_output: {num_output} {FILLERS} {extra} }}'


# Two streams; stream 0 restarts at t=2, stream 1 at t=3.
CONT = np.array([[0, 0], [1, 1], [0, 1], [1, 0]], "f8")


# ----------------------------------------------------------------- numpy references
def np_lstm(x, cont, w_xc, b_c, w_hc, w_s=None, x_static=None, h0=None, c0=None):
    """Stream by stream, step by step: the textbook LSTM with Caffe's gate order i, f, o, g and
    the state flushed where cont is 0."""
    T, N = cont.shape
    H = w_hc.shape[1]
    xs = x.reshape(T, N, -1)
    out = np.zeros((T, N, H))
    h_last, c_last = np.zeros((N, H)), np.zeros((N, H))
    for n in range(N):
        h = np.zeros(H) if h0 is None else h0[0, n].copy()
        c = np.zeros(H) if c0 is None else c0[0, n].copy()
        for t in range(T):
            if cont[t, n] == 0:
                h, c = np.zeros(H), np.zeros(H)
            a = w_xc @ xs[t, n] + b_c + w_hc @ h
            if w_s is not None:
                a = a + w_s @ x_static[n].ravel()
            i, f, o, g = sigmoid(a[:H]), sigmoid(a[H:2 * H]), sigmoid(a[2 * H:3 * H]), np.tanh(a[3 * H:])
            c = f * c + i * g
            h = o * np.tanh(c)
            out[t, n] = h
        h_last[n], c_last[n] = h, c
    return out, h_last, c_last


def np_rnn(x, cont, w_xh, b_h, w_hh, w_ho, b_o, w_s=None, x_static=None, h0=None):
    T, N = cont.shape
    H = w_hh.shape[0]
    xs = x.reshape(T, N, -1)
    out = np.zeros((T, N, H))
    h_last = np.zeros((N, H))
    for n in range(N):
        h = np.zeros(H) if h0 is None else h0[0, n].copy()
        for t in range(T):
            h = h * cont[t, n]
            a = w_xh @ xs[t, n] + b_h + w_hh @ h
            if w_s is not None:
                a = a + w_s @ x_static[n].ravel()
            h = np.tanh(a)
            out[t, n] = np.tanh(w_ho @ h + b_o)
        h_last[n] = h
    return out, h_last


def params(layer):
    return [b.data.copy() for b in layer.blobs]


# ------------------------------------------------------------------------ LSTM forward
def test_lstm_param_layout_is_caffes():
    x = randn(4, 2, 3, 2)
    layer, _, _ = make_layer(lstm_text(5), [x, CONT])
    assert [b.shape for b in layer.blobs] == [(20, 6), (20,), (20, 5)]  # W_xc, b_c, W_hc
    layer, _, _ = make_layer(lstm_text(5), [x, CONT, randn(2, 2, 3)])
    assert [b.shape for b in layer.blobs] == [(20, 6), (20,), (20, 6), (20, 5)]  # + W_xc_static third
    layer, _, _ = make_layer(rnn_text(5), [x, CONT, randn(2, 4)])
    assert [b.shape for b in layer.blobs] == [(5, 6), (5,), (5, 4), (5, 5), (5, 5), (5,)]


def test_lstm_forward_matches_numpy_with_resets():
    x = randn(4, 2, 3, 2)  # features beyond axis 2 are flattened, as InnerProduct axis 2 does
    layer, bottom, top = make_layer(lstm_text(3), [x, CONT])
    layer.run_forward(bottom, top)
    expect, _, _ = np_lstm(x, CONT, *params(layer))
    assert top[0].shape == (4, 2, 3)
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-12, atol=1e-14)


def test_lstm_forward_static_input():
    x, xs = randn(4, 2, 3), randn(2, 2, 2, seed=1)
    layer, bottom, top = make_layer(lstm_text(3), [x, CONT, xs])
    layer.run_forward(bottom, top)
    w_xc, b_c, w_s, w_hc = params(layer)
    expect, _, _ = np_lstm(x, CONT, w_xc, b_c, w_hc, w_s, xs)
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-12, atol=1e-14)


def test_lstm_expose_hidden_forward():
    x, h0, c0 = randn(3, 2, 2), randn(1, 2, 3, seed=1), randn(1, 2, 3, seed=2)
    cont = np.array([[1, 0], [1, 1], [1, 1]], "f8")  # stream 0 continues from h0/c0, stream 1 restarts
    layer, bottom, top = make_layer(lstm_text(3, "expose_hidden: true"), [x, cont, h0, c0], num_tops=3)
    layer.run_forward(bottom, top)
    expect, h_t, c_t = np_lstm(x, cont, *params(layer), h0=h0, c0=c0)
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(top[1].data, h_t[None], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(top[2].data, c_t[None], rtol=1e-12, atol=1e-14)


def test_lstm_carries_state_across_forwards():
    """Without expose_hidden the final state of one batch starts the next: two batches with
    cont = 1 at the second's start equal one long sequence; cont = 0 there restarts it."""
    x = randn(6, 2, 2)
    cont = np.ones((6, 2))
    cont[0] = 0
    layer, bottom, top = make_layer(lstm_text(3), [x[:3], cont[:3]])
    expect, _, _ = np_lstm(x, cont, *params(layer))
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, expect[:3], rtol=1e-12)
    bottom[0].data[...] = x[3:]
    bottom[1].data[...] = cont[3:]
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, expect[3:], rtol=1e-12)
    bottom[1].data[0] = 0
    layer.run_forward(bottom, top)
    restarted, _, _ = np_lstm(x[3:], bottom[1].data, *params(layer))
    np.testing.assert_allclose(top[0].data, restarted, rtol=1e-12)
    assert not np.allclose(restarted, expect[3:])


def test_lstm_one_step_at_a_time_equals_full_sequence():
    """Caffe's own TestForward: T steps at once == T forwards of one step each (state carried)."""
    x = randn(4, 3, 2)
    cont = np.ones((4, 3))
    cont[0] = 0
    full = forward_layer(lstm_text(3), [x, cont])[0]
    layer, bottom, top = make_layer(lstm_text(3), [x[:1], cont[:1]])  # same seed: same weights
    for t in range(4):
        bottom[0].data[...] = x[t:t + 1]
        bottom[1].data[...] = cont[t:t + 1]
        layer.run_forward(bottom, top)
        np.testing.assert_allclose(top[0].data, full[t:t + 1], rtol=1e-12)


def test_lstm_batch_size_may_change():
    x = randn(2, 3, 2)
    cont = np.array([[0, 0, 0], [1, 1, 1]], "f8")
    layer, bottom, top = make_layer(lstm_text(2), [x, cont])
    layer.run_forward(bottom, top)
    bottom[0].reshape(2, 2, 2)
    bottom[1].reshape(2, 2)
    bottom[0].data[...] = x[:, :2]
    bottom[1].data[...] = cont[:, :2]
    layer.run_forward(bottom, top)
    assert top[0].shape == (2, 2, 2)
    np.testing.assert_allclose(top[0].data, np_lstm(x[:, :2], cont[:, :2], *params(layer))[0], rtol=1e-12)


# ------------------------------------------------------------------------- RNN forward
def test_rnn_forward_matches_numpy():
    x = randn(4, 2, 3)
    layer, bottom, top = make_layer(rnn_text(3), [x, CONT])
    layer.run_forward(bottom, top)
    np.testing.assert_allclose(top[0].data, np_rnn(x, CONT, *params(layer))[0], rtol=1e-12, atol=1e-14)


def test_rnn_forward_static_and_expose_hidden():
    x, xs, h0 = randn(3, 2, 2), randn(2, 3, seed=1), randn(1, 2, 3, seed=2)
    cont = np.array([[1, 0], [1, 1], [0, 1]], "f8")
    layer, bottom, top = make_layer(rnn_text(3, "expose_hidden: true"), [x, cont, xs, h0], num_tops=2)
    layer.run_forward(bottom, top)
    w_xh, b_h, w_s, w_hh, w_ho, b_o = params(layer)
    expect, h_t = np_rnn(x, cont, w_xh, b_h, w_hh, w_ho, b_o, w_s, xs, h0)
    np.testing.assert_allclose(top[0].data, expect, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(top[1].data, h_t[None], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------- gradients
# cont is 0 at t=0 in every case: the gradient checker runs forward many times, and the reset
# keeps the carried state from leaking between those runs.
CONT3 = np.array([[0, 0], [1, 0], [1, 1]], "f8")


@pytest.mark.parametrize("text", [lstm_text(2), rnn_text(2)])
def test_gradient_x_and_params(text):
    check_gradient(text, [randn(3, 2, 2), CONT3], check_bottoms=[0])


@pytest.mark.parametrize("text", [lstm_text(2), rnn_text(2)])
def test_gradient_static_input(text):
    check_gradient(text, [randn(3, 2, 2), CONT3, randn(2, 3, seed=1)], check_bottoms=[0, 2])


def test_lstm_gradient_expose_hidden():
    cont = np.array([[1, 0], [1, 1], [0, 1]], "f8")
    bottoms = [randn(3, 2, 2), cont, randn(1, 2, 2, seed=1), randn(1, 2, 2, seed=2)]
    check_gradient(lstm_text(2, "expose_hidden: true"), bottoms, num_tops=3, check_bottoms=[0, 2, 3])


def test_rnn_gradient_expose_hidden_with_static():
    cont = np.array([[1, 0], [1, 1], [0, 1]], "f8")
    bottoms = [randn(3, 2, 2), cont, randn(2, 2, seed=3), randn(1, 2, 2, seed=1)]
    check_gradient(rnn_text(2, "expose_hidden: true"), bottoms, num_tops=2, check_bottoms=[0, 2, 3])


def test_backward_accumulates_params_and_respects_propagate_down():
    x = randn(3, 2, 2)
    layer, bottom, top = make_layer(lstm_text(2), [x, CONT3])
    layer.run_forward(bottom, top)
    top[0].diff[...] = randn(3, 2, 2, seed=5)
    for b in layer.blobs:
        b.diff[...] = 0
    bottom[0].diff[...] = 7.0
    layer.backward(top, [False, False], bottom)
    once = [b.diff.copy() for b in layer.blobs]
    assert all(np.abs(d).sum() > 0 for d in once)
    np.testing.assert_array_equal(bottom[0].diff, 7.0)  # not asked for: untouched
    layer.backward(top, [True, False], bottom)
    for b, d in zip(layer.blobs, once):
        np.testing.assert_allclose(b.diff, 2 * d, rtol=1e-12)
    assert not np.any(bottom[0].diff == 7.0)
    np.testing.assert_array_equal(bottom[1].diff, 0)  # cont never gets a gradient


def test_cont_gets_no_forced_gradient_in_a_net():
    net = make_net("""force_backward: true
      layer { name: "x" type: "Input" top: "x" top: "cont"
              input_param { shape { dim: 3 dim: 2 dim: 2 } shape { dim: 3 dim: 2 } } }
      layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
              recurrent_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }""")
    lid = net.layer_names.index("lstm")
    assert net.bottom_need_backward[lid] == [True, False]
    assert [b.shape for b in net.params["lstm"]] == [(8, 2), (8,), (8, 2)]


# ------------------------------------------------------------------------- LSTMUnit
def test_lstm_unit_forward_matches_numpy():
    c_prev, x = randn(1, 3, 2), randn(1, 3, 8, seed=1)
    cont = np.array([[1, 0, 1]], "f8")
    c, h = forward_layer('type: "LSTMUnit"', [c_prev, x, cont], num_tops=2)
    i, f, o, g = sigmoid(x[0, :, :2]), sigmoid(x[0, :, 2:4]), sigmoid(x[0, :, 4:6]), np.tanh(x[0, :, 6:])
    f = f * cont[0][:, None]
    expect_c = f * c_prev[0] + i * g
    np.testing.assert_allclose(c[0], expect_c, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h[0], o * np.tanh(expect_c), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cont", [[0, 0, 0], [1, 0, 1]])
def test_lstm_unit_gradient(cont):
    bottoms = [randn(1, 3, 2), randn(1, 3, 8, seed=1), np.array([cont], "f8")]
    check_gradient('type: "LSTMUnit"', bottoms, num_tops=2, check_bottoms=[0, 1])


def test_lstm_unit_refuses_gradient_to_cont_and_bad_shapes():
    bottoms = [randn(1, 3, 2), randn(1, 3, 8, seed=1), np.ones((1, 3))]
    layer, bottom, top = make_layer('type: "LSTMUnit"', bottoms, num_tops=2)
    assert not layer.allow_force_backward(2)
    layer.run_forward(bottom, top)
    with pytest.raises(LayerError, match="'L'.*sequence indicators"):
        layer.backward(top, [True, True, True], bottom)
    for bad, match in (([randn(1, 3, 2), randn(1, 3, 6), np.ones((1, 3))], "4 x 2"),
                       ([randn(2, 3, 2), randn(2, 3, 8), np.ones((2, 3))], "single timestep"),
                       ([randn(1, 3, 2), randn(1, 3, 8), np.ones((1, 2))], "(1, 2)"),
                       ([randn(1, 3, 2), randn(1, 3, 8), np.ones(3)], "2 axes")):
        with pytest.raises(LayerError, match="'L'") as info:
            forward_layer('type: "LSTMUnit"', bad, num_tops=2)
        assert match in str(info.value)


# ---------------------------------------------------------------------------- errors
def raises_named(text, bottoms, num_tops=1):
    with pytest.raises(LayerError) as info:
        forward_layer(text, bottoms, num_tops=num_tops)
    assert "'L'" in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("make", [lstm_text, rnn_text])
def test_bad_params_and_shapes(make):
    x = randn(4, 2, 3)
    assert "num_output must be positive" in raises_named(make(0), [x, CONT])
    msg = raises_named(make(2), [x, np.ones((4, 3))])
    assert "(4, 3)" in msg and "(4, 2, 3)" in msg  # both shapes named
    assert "(4, 2)" in raises_named(make(2), [x, np.ones(8)])
    assert "at least 3 axes" in raises_named(make(2), [randn(4, 2), CONT])
    assert "x_static" in raises_named(make(2), [x, CONT, randn(3, 2)])
    assert "bottom" in raises_named(make(2), [x])  # cont is required
    # expose_hidden: one more bottom per state, of shape (1, N, H), and one more top per state
    raises_named(make(2, "expose_hidden: true"), [x, CONT])
    layer, bottom, top = make_layer(make(2), [x, CONT])
    bottom[0].reshape(5, 2, 3)
    bottom[1].reshape(5, 2)
    with pytest.raises(LayerError, match="'L'.*timesteps changed"):
        layer.reshape(bottom, top)


def test_expose_hidden_state_shape_checked():
    x = randn(3, 2, 2)
    cont = np.ones((3, 2))
    bottoms = [x, cont, np.zeros((1, 2, 4)), np.zeros((1, 2, 3))]
    msg = raises_named(lstm_text(3, "expose_hidden: true"), bottoms, num_tops=3)
    assert "(1, 2, 4)" in msg and "(1, 2, 3)" in msg


def test_debug_info_logs_the_unrolled_steps():
    with capture_log() as lines:
        layer, bottom, top = make_layer(lstm_text(2, "debug_info: true"), [randn(3, 2, 2), CONT3])
        layer.run_forward(bottom, top)
        layer.backward(top, [True, False], bottom)
    assert any("[Forward] Layer L_unit_3, top blob h_3 data:" in line for line in lines)
    assert any("[Backward] Layer L_unit_1, bottom blob gate_input_1 diff:" in line for line in lines)


# -------------------------------------------------------------------------- learning
LEARN_NET = """
  name: "echo"
  layer { name: "data" type: "Input" top: "x" top: "cont" top: "y"
          input_param { shape { dim: 8 dim: 16 dim: 1 } shape { dim: 8 dim: 16 }
                        shape { dim: 8 dim: 16 dim: 1 } } }
  layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
          recurrent_param { num_output: 8 weight_filler { type: "uniform" min: -0.3 max: 0.3 }
                            bias_filler { type: "constant" value: 0 } } }
  layer { name: "out" type: "InnerProduct" bottom: "h" top: "pred"
          inner_product_param { num_output: 1 axis: 2 weight_filler { type: "uniform" min: -0.3 max: 0.3 } } }
  layer { name: "loss" type: "EuclideanLoss" bottom: "pred" bottom: "y" top: "loss" }
"""


def echo_batch(rng, T=8, N=16):
    """Random +-1 inputs in sequences of random length; the target is the previous input of the
    same sequence, 0 at a sequence start (where cont is 0): only a reset state gets that right."""
    x = rng.choice([-1.0, 1.0], size=(T, N, 1))
    cont = (rng.random((T, N)) > 0.3).astype("f4")
    cont[0] = 0
    y = np.zeros_like(x)
    y[1:] = x[:-1] * cont[1:, :, None]
    return x, cont, y


def test_lstm_learns_to_echo_the_previous_input():
    text = f"net_param {{ {LEARN_NET} }} type: \"Adam\" base_lr: 0.03 momentum: 0.9 momentum2: 0.999 " \
           "lr_policy: \"fixed\" max_iter: 200 display: 0 random_seed: 3 snapshot_after_train: false"
    solver = create_solver(parse_text(text, caffe_pb2.SolverParameter()))
    net = solver.net
    rng = np.random.default_rng(0)

    def feed():
        x, cont, y = echo_batch(rng)
        net.blobs["x"].data[...] = x
        net.blobs["cont"].data[...] = cont
        net.blobs["y"].data[...] = y

    solver.add_callback(on_start=feed)
    losses = []
    solver.add_callback(on_gradients_ready=lambda: losses.append(float(net.blobs["loss"].data)))
    solver.step(200)
    start, end = np.mean(losses[:10]), np.mean(losses[-20:])
    assert end < 0.1 * start, (start, end)


def test_lstm_built_with_netspec_learns_the_echo_task():
    """The same task with the net written in pycaffe's NetSpec (caffe.layers.LSTM with a cont input)."""
    import caffe
    from caffe import layers as L

    n = caffe.NetSpec()
    n.x, n.cont, n.y = L.Input(shape=[dict(dim=[8, 16, 1]), dict(dim=[8, 16]), dict(dim=[8, 16, 1])], ntop=3)
    uniform = dict(type="uniform", min=-0.3, max=0.3)
    n.h = L.LSTM(n.x, n.cont, recurrent_param=dict(num_output=8, weight_filler=uniform,
                                                   bias_filler=dict(type="constant", value=0)))
    n.pred = L.InnerProduct(n.h, num_output=1, axis=2, weight_filler=uniform)
    n.loss = L.EuclideanLoss(n.pred, n.y)
    sp = caffe_pb2.SolverParameter(type="Adam", base_lr=0.03, momentum=0.9, momentum2=0.999,
                                   lr_policy="fixed", max_iter=200, random_seed=3)
    sp.net_param.CopyFrom(n.to_proto())
    assert [lp.type for lp in sp.net_param.layer] == ["Input", "LSTM", "InnerProduct", "EuclideanLoss"]
    assert list(sp.net_param.layer[1].bottom) == ["x", "cont"]
    solver = create_solver(sp)
    net = solver.net
    rng = np.random.default_rng(1)
    losses = []
    for _ in range(200):
        x, cont, y = echo_batch(rng)
        net.blobs["x"].data[...] = x
        net.blobs["cont"].data[...] = cont
        net.blobs["y"].data[...] = y
        solver.step(1)
        losses.append(float(net.blobs["loss"].data))
    start, end = np.mean(losses[:10]), np.mean(losses[-20:])
    assert end < 0.1 * start, (start, end)
