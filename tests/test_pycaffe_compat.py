"""pycaffe compatibility (issue 12): the module names scripts import, caffe.coord_map, NCCL and the
multi-solver settings, Timer, log, net callbacks, forward_backward_all, Python layers' exceptions,
live numpy views of blobs, the solver's ``weights`` field, the display rate across step() calls,
and channel_shared PReLU."""
import os
import re
import sys
import time

import numpy as np
import pytest
import torch

import caffe
from caffe import layers as L
from caffe import params as P
from caffe.coord_map import coord_map_from_to, crop
from helpers import capture_log, write
from recaffe.cli.main import main as cli_main
from recaffe.gradient_check import check_gradient
from recaffe.solvers import SolverError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- module names
def test_scripts_import_pycaffes_module_names():
    from caffe._caffe import (NCCL, Timer, has_nccl, log, set_multiprocess, set_solver_count,  # noqa: F401
                              set_solver_rank, solver_count, solver_rank)
    from caffe.pycaffe import Net, SGDSolver
    assert Net is caffe.Net and SGDSolver is caffe.SGDSolver and NCCL is caffe.NCCL and Timer is caffe.Timer
    assert caffe.TRAIN == 0 and caffe.TEST == 1


# -------------------------------------------------------------------------------- coord_map
def _window_center(y, kernel, stride, pad):
    """Input coordinate at the centre of output y's window (from the window's two ends)."""
    first = y * stride - pad
    return (first + first + kernel - 1) / 2


def test_coord_map_of_a_strided_conv_is_its_window_centre():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 30, 30]))
    n.conv = L.Convolution(n.data, num_output=1, kernel_size=5, stride=2, pad=1)
    ax, a, b = coord_map_from_to(n.conv, n.data)  # conv coordinates -> data coordinates
    assert ax == 1
    for y in range(4):
        np.testing.assert_allclose(a * y + b, _window_center(y, 5, 2, 1))


def test_coord_map_anisotropic_and_through_relu_and_pooling():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 30, 30]))
    n.conv = L.Convolution(n.data, num_output=1, kernel_h=3, kernel_w=5, stride_h=1, stride_w=2, pad_w=2)
    n.relu = L.ReLU(n.conv)
    n.pool = L.Pooling(n.relu, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    ax, a, b = coord_map_from_to(n.pool, n.data)
    for y in range(3):
        # pool window centre in conv coordinates, then the conv window centre of that, per axis
        c = _window_center(y, 2, 2, 0)
        np.testing.assert_allclose(a * y + b, [_window_center(c, 3, 1, 0), _window_center(c, 5, 2, 2)])


def _conv_net(pad):
    """data (1x1x6x7) -> 3x3 conv with ``pad``."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 6, 7]))
    n.conv = L.Convolution(n.data, num_output=1, kernel_size=3, pad=pad, bias_term=False)
    return n


def test_crop_aligns_a_padded_conv_with_its_input(tmp_path):
    n = _conv_net(pad=3)  # conv output is 10x11, shifted by pad - 1 = 2 against the data
    n.crop = crop(n.conv, n.data)
    assert n.crop.fn.params["crop_param"] == {"axis": 2, "offset": [2]}  # one offset: every axis
    net = caffe.Net(write(tmp_path, "crop.prototxt", str(n.to_proto())), caffe.TEST)
    w = np.zeros((1, 1, 3, 3), "f4")
    w[0, 0, 1, 1] = 1  # the conv copies its window's centre
    net.params["conv"][0].data[...] = w
    x = np.random.default_rng(0).standard_normal((1, 1, 6, 7)).astype("f4")
    net.blobs["data"].data[...] = x
    net.forward()
    np.testing.assert_array_equal(net.blobs["crop"].data, x)  # aligned element for element


def test_coord_map_errors():
    n = _conv_net(pad=0)
    n.ip = L.InnerProduct(n.conv, num_output=3)
    with pytest.raises(RuntimeError, match="connected by spatial layers"):
        coord_map_from_to(n.ip, n.data)
    with pytest.raises(AssertionError, match="negative offset"):  # conv smaller than data
        crop(n.conv, n.data)
    n.pool = L.Pooling(n.data, kernel_size=2, stride=2)
    with pytest.raises(AssertionError, match="scale mismatch"):
        crop(n.pool, n.data)


# --------------------------------------------------------------------- NCCL and solver settings
SOLVER_NET = """net_param {
  layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
  layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 dim: 2 } } }
  layer { name: "ip" type: "InnerProduct" bottom: "x" top: "o"
    inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
  layer { name: "loss" type: "EuclideanLoss" bottom: "o" bottom: "y" top: "loss" }
}
random_seed: 3 base_lr: 0.1 lr_policy: "fixed" momentum: 0.9
"""
X = np.random.default_rng(1).standard_normal((4, 3)).astype("f4")
Y = np.random.default_rng(2).standard_normal((4, 2)).astype("f4")


def _solver(tmp_path, extra=""):
    s = caffe.get_solver(write(tmp_path, "solver.prototxt", SOLVER_NET + extra))
    s.net.blobs["x"].data[...] = X
    s.net.blobs["y"].data[...] = Y
    return s


def test_has_nccl_says_whether_torch_has_nccl():
    import torch.distributed as dist
    assert caffe.has_nccl() == (dist.is_available() and dist.is_nccl_available())
    a, b = caffe.NCCL.new_uid(), caffe.NCCL.new_uid()
    assert isinstance(a, bytes) and a != b


def test_solver_count_and_rank_setters():
    try:
        caffe.set_solver_count(4)
        caffe.set_solver_rank(3)
        caffe.set_multiprocess(True)
        assert (caffe.solver_count(), caffe.solver_rank()) == (4, 3)
        with pytest.raises(ValueError, match="at least 1"):
            caffe.set_solver_count(0)
    finally:
        caffe.set_solver_count(1)
        caffe.set_solver_rank(0)
        caffe.set_multiprocess(False)


def test_each_solver_seeds_with_seed_plus_rank(tmp_path):
    try:
        caffe.set_solver_count(2)
        caffe.set_solver_rank(1)
        rank1 = _solver(tmp_path).net.params["ip"][0].data.copy()  # random_seed: 3
    finally:
        caffe.set_solver_count(1)
        caffe.set_solver_rank(0)
    text = SOLVER_NET.replace("random_seed: 3", "random_seed: 4")
    other_seed = caffe.get_solver(write(tmp_path, "seed4.prototxt", text)).net.params["ip"][0].data
    np.testing.assert_array_equal(rank1, other_seed)


def test_nccl_alone_is_a_callback_that_changes_nothing(tmp_path):
    plain, with_nccl = _solver(tmp_path), _solver(tmp_path)
    nccl = caffe.NCCL(with_nccl, caffe.NCCL.new_uid())
    nccl.bcast()
    with_nccl.add_callback(nccl)       # pycaffe's one-object form
    with_nccl.net.after_backward(nccl)  # layer-wise reduce: accepted
    plain.step(3)
    with_nccl.step(3)
    np.testing.assert_array_equal(with_nccl.net.params["ip"][0].data, plain.net.params["ip"][0].data)


def test_nccl_rejects_a_rank_outside_the_count(tmp_path):
    s = _solver(tmp_path)
    try:
        caffe.set_solver_rank(2)
        with pytest.raises(ValueError, match="rank 2 is outside 0..0"):
            caffe.NCCL(s, caffe.NCCL.new_uid())
    finally:
        caffe.set_solver_rank(0)


# ------------------------------------------------------------------------------ Timer and log
def test_timer_measures_whole_milliseconds_on_cpu():
    caffe.set_mode_cpu()
    t = caffe.Timer()
    assert t.ms == 0  # never started: 0 (with a warning), as Caffe
    t.start()
    time.sleep(0.03)
    first = t.ms  # reading stops a running timer
    time.sleep(0.01)
    assert first >= 30 and first == int(first) and t.ms == first
    t.start()
    t.stop()
    assert t.ms < first


def test_log_writes_an_info_line():
    with capture_log() as lines:
        caffe.log("Using devices [0, 1]")
    assert lines == ["Using devices [0, 1]"]


# ------------------------------------------------------------------ net callbacks, *_all
IP_NET = """name: "ip"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "out"
  inner_product_param { num_output: 2 bias_term: false weight_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "out" top: "out" }
"""


def test_net_callbacks_run_around_every_layer(tmp_path):
    net = caffe.Net(write(tmp_path, "ip.prototxt", IP_NET), caffe.TEST)
    calls = []
    net.before_forward(lambda i: calls.append(("bf", i)))
    net.after_forward(lambda i: calls.append(("af", i)))
    net.before_backward(lambda i: calls.append(("bb", i)))
    net.after_backward(lambda i: calls.append(("ab", i)))
    net.forward()
    net.backward()
    assert calls == [("bf", 0), ("af", 0), ("bf", 1), ("af", 1), ("bf", 2), ("af", 2),
                     ("bb", 2), ("ab", 2), ("bb", 1), ("ab", 1), ("bb", 0), ("ab", 0)]


def test_forward_backward_all_batches_and_cuts_the_padding(tmp_path):
    net = caffe.Net(write(tmp_path, "ip.prototxt", IP_NET.replace('type: "ReLU"', 'type: "TanH"')),
                    caffe.TEST)
    w = net.params["ip"][0].data.astype("f8")
    x = np.random.default_rng(3).standard_normal((5, 3))
    dy = np.random.default_rng(4).standard_normal((5, 2))
    outs, diffs = net.forward_backward_all(data=x, out=dy)  # 5 items, batches of 2
    y = np.tanh(x @ w.T)
    np.testing.assert_allclose(outs["out"], y, rtol=1e-5)
    np.testing.assert_allclose(diffs["data"], (dy * (1 - y ** 2)) @ w, rtol=1e-4, atol=1e-6)
    assert outs["out"].shape == (5, 2) and diffs["data"].shape == (5, 3)


# ------------------------------------------------------------------ Python layer exceptions
class RaisingLayer(caffe.Layer):
    def setup(self, bottom, top):
        if self.param_str == "setup":
            raise RuntimeError("bad setup")

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        raise KeyError("bad forward")


def _python_net(tmp_path, where):
    sys.modules.setdefault("test_pycaffe_compat", sys.modules[__name__])
    return write(tmp_path, "py.prototxt", f"""
        layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 }} }} }}
        layer {{ name: "py" type: "Python" bottom: "data" top: "out"
          python_param {{ module: "test_pycaffe_compat" layer: "RaisingLayer" param_str: "{where}" }} }}""")


def test_python_layer_exceptions_keep_their_type(tmp_path):
    with pytest.raises(RuntimeError, match="bad setup") as info:
        caffe.Net(_python_net(tmp_path, "setup"), caffe.TEST)
    assert type(info.value) is RuntimeError  # not wrapped in a LayerError
    net = caffe.Net(_python_net(tmp_path, "forward"), caffe.TEST)
    with pytest.raises(KeyError, match="bad forward"):
        net.forward()


# ------------------------------------------------------------------------------- live views
CONV_NET = """name: "live"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 1 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "flat" type: "Flatten" bottom: "conv" top: "flat" }
"""


def _conv_reference(net, x):
    """The net's output for input x, computed with numpy from its weights."""
    w = net.params["conv"][0].data.astype("f8")
    b = net.params["conv"][1].data.astype("f8")
    out = np.zeros((x.shape[0], 2, 2, 2))
    for i in range(2):
        for j in range(2):
            out[:, :, i, j] = np.einsum("nchw,ochw->no", x[:, :, i:i + 3, j:j + 3], w) + b
    return np.maximum(out, 0)


def test_views_of_activations_follow_later_forwards(tmp_path):
    net = caffe.Net(write(tmp_path, "live.prototxt", CONV_NET), caffe.TEST)
    rng = np.random.default_rng(5)
    net.blobs["data"].data[...] = rng.standard_normal((2, 1, 4, 4))
    net.forward()
    v = net.blobs["conv"].data[0, 0]  # a view, as pycaffe hands out
    flat = net.blobs["flat"].data     # a top sharing the conv blob's memory
    x2 = rng.standard_normal((2, 1, 4, 4))
    net.blobs["data"].data[...] = x2
    net.forward()
    expected = _conv_reference(net, x2)
    np.testing.assert_allclose(v, expected[0, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat, expected.reshape(2, -1), rtol=1e-5, atol=1e-6)


def test_views_of_diffs_follow_later_backwards(tmp_path):
    net = caffe.Net(write(tmp_path, "live.prototxt", CONV_NET), caffe.TEST)
    net.blobs["data"].data[...] = np.random.default_rng(6).standard_normal((2, 1, 4, 4))
    net.forward()
    g = net.blobs["data"].diff  # held across the next backward
    dy = np.random.default_rng(7).standard_normal((2, 8))
    for scale in (1.0, -2.0):
        net.blobs["flat"].diff[...] = scale * dy
        net.backward()
        # conv's input gradient by hand: scatter the (relu-masked) output diffs through the kernel
        w = net.params["conv"][0].data.astype("f8")
        d = scale * dy.reshape(2, 2, 2, 2) * (net.blobs["conv"].data > 0)
        want = np.zeros((2, 1, 4, 4))
        for i in range(2):
            for j in range(2):
                want[:, :, i:i + 3, j:j + 3] += np.einsum("no,ochw->nchw", d[:, :, i, j], w)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


def test_reshape_keeps_the_buffer_until_the_count_grows():
    from recaffe.blob import Blob
    b = Blob((2, 3))
    held = b.data
    held[...] = 7
    b.reshape(5)  # smaller: same memory, as Caffe's capacity rule
    assert np.shares_memory(b.data, held)
    b.data_t = torch.arange(5.0)
    np.testing.assert_array_equal(held.reshape(-1)[:5], np.arange(5.0))
    b.reshape(3, 3)  # larger than ever: new memory; the old array no longer follows
    assert not np.shares_memory(b.data, held)


def test_in_place_layers_on_a_held_blob_still_get_their_gradients_right():
    # PReLU and Scale in place keep their input for backward; a held blob is written over.
    for text in ('type: "PReLU" prelu_param { filler { type: "uniform" min: -0.5 max: 0.5 } }',
                 'type: "Scale" scale_param { filler { type: "uniform" min: 0.5 max: 1.5 } }'):
        results = []
        for hold in (False, True):
            from recaffe.gradient_check import make_layer
            x = np.random.default_rng(8).standard_normal((2, 3, 2, 2))
            layer, bottom, _ = make_layer(text, [x])
            layer.setup(bottom, bottom)  # in place
            if hold:
                bottom[0].data  # noqa: B018 (Python now holds the blob's memory)
            layer.run_forward(bottom, bottom)
            bottom[0].diff[...] = 1.0
            for p in layer.blobs:
                p.diff[...] = 0
            layer.backward(bottom, [True], bottom)
            results.append([bottom[0].diff.copy()] + [p.diff.copy() for p in layer.blobs])
        for held, plain in zip(results[1], results[0]):
            np.testing.assert_array_equal(held, plain)


# ----------------------------------------------------------------------- solver weights field
def _two_weight_files(tmp_path):
    """ip weights in one file, and a test-net-only layer's weights in another."""
    s = _solver(tmp_path)
    s.net.params["ip"][0].data[...] = np.arange(6).reshape(2, 3)
    a = str(tmp_path / "a.caffemodel")
    s.net.save(a)
    extra = caffe.Net(write(tmp_path, "extra.prototxt", """
        layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
        layer { name: "probe" type: "InnerProduct" bottom: "x" top: "p"
          inner_product_param { num_output: 1 bias_term: false } }"""), caffe.TEST)
    extra.params["probe"][0].data[...] = [[5, 6, 7]]
    b = str(tmp_path / "b.caffemodel")
    extra.save(b)
    return a, b


TEST_NET = """test_iter: 1 test_interval: 100 test_net_param {
  layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
  layer { name: "ip" type: "InnerProduct" bottom: "x" top: "o" inner_product_param { num_output: 2 } }
  layer { name: "probe" type: "InnerProduct" bottom: "x" top: "p"
    inner_product_param { num_output: 1 bias_term: false } } }
"""


@pytest.mark.parametrize("form", ["comma", "repeated"])
def test_solver_weights_field_fine_tunes_train_and_test_nets(tmp_path, form):
    a, b = _two_weight_files(tmp_path)
    weights = f'weights: "{a}, {b}"' if form == "comma" else f'weights: "{a}" weights: "{b}"'
    with capture_log() as lines:
        s = _solver(tmp_path, TEST_NET + weights)
    assert f"Finetuning from {a}" in lines and f"Finetuning from {b}" in lines
    np.testing.assert_array_equal(s.net.params["ip"][0].data, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(s.test_nets[0].params["ip"][0].data, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(s.test_nets[0].params["probe"][0].data, [[5, 6, 7]])


def test_solver_weights_field_missing_file_is_named(tmp_path):
    with pytest.raises(SolverError, match=r"weights file 'nowhere\.caffemodel'.*not found"):
        _solver(tmp_path, 'weights: "nowhere.caffemodel"')


def test_cli_weights_flag_replaces_and_snapshot_flag_drops_the_solver_weights(tmp_path, capsys):
    a, _ = _two_weight_files(tmp_path)
    solver = write(tmp_path, "s.prototxt", SOLVER_NET + 'max_iter: 0 weights: "missing.caffemodel"')
    with capture_log() as lines:
        assert cli_main(["train", f"-solver={solver}", f"-weights={a}"]) == 0
    assert f"Finetuning from {a}" in lines and not any("missing" in ln for ln in lines)
    assert cli_main(["train", f"-solver={solver}", f"-weights={a}", "-snapshot=x.solverstate"]) == 1
    assert "not both" in capsys.readouterr().err
    assert cli_main(["train", f"-solver={solver}"]) == 1
    assert "weights file 'missing.caffemodel'" in capsys.readouterr().err


# ------------------------------------------------------------------------- display rate
def test_display_rate_spans_step_calls(tmp_path):
    s = _solver(tmp_path, "display: 2")
    with capture_log() as lines:
        for _ in range(5):
            s.step(1)  # as a Python training loop does
    rates = [float(m.group(1)) for m in (re.match(r"Iteration \d+ \((\S+) iter/s", ln) for ln in lines) if m]
    # iterations 0, 2, 4: Caffe's rate counts from iteration 0, so the first is 0
    assert len(rates) == 3 and rates[0] == 0 and rates[1] > 0 and rates[2] > 0


# ---------------------------------------------------------------------- channel_shared PReLU
SHARED_PRELU = """name: "p"
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }
layer { name: "L" type: "PReLU" bottom: "x" top: "y" prelu_param { channel_shared: true } }
"""


def test_prelu_channel_shared_gradient_float64():
    x = np.random.default_rng(9).standard_normal((2, 3, 2, 2))
    layer = check_gradient('type: "PReLU" prelu_param { channel_shared: true '
                           'filler { type: "constant" value: -0.3 } }', [x], kink=0.0, kink_range=1e-2)
    assert layer.blobs[0].shape == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prelu_channel_shared_forward_backward_and_weights_file(tmp_path, dtype):
    from recaffe.net import Net
    model = write(tmp_path, "p.prototxt", SHARED_PRELU)
    src = Net(model, caffe.TEST, dtype=dtype)
    src.params["L"][0].data[...] = 0.4
    src.save(str(tmp_path / "p.caffemodel"))
    net = Net(model, caffe.TEST, weights=str(tmp_path / "p.caffemodel"), dtype=dtype)  # 0-axis blob
    x = np.random.default_rng(10).standard_normal((2, 3, 2, 2))
    dy = np.random.default_rng(11).standard_normal((2, 3, 2, 2))
    net.blobs["x"].data[...] = x
    net.forward()
    tol = dict(rtol=1e-6 if dtype == torch.float32 else 1e-14)
    a = float(np.float32(0.4)) if dtype == torch.float32 else 0.4
    np.testing.assert_allclose(net.blobs["y"].data, np.where(x > 0, x, a * x), **tol)
    net.blobs["y"].diff[...] = dy
    net.backward()
    np.testing.assert_allclose(net.blobs["x"].diff, np.where(x > 0, dy, a * dy), **tol)
    np.testing.assert_allclose(net.params["L"][0].diff, (dy * x * (x <= 0)).sum(), rtol=1e-5)
    assert net.params["L"][0].diff.shape == ()


# ---------------------------------------------------------------------------- README and CI
def test_ci_runs_exactly_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("Run the tests", 1)[1].split("```")[1].strip()
    assert "pip install -e '.[test]'" in block and "pytest" in block  # installs what the tests need
    ci = [ln.strip() for ln in open(os.path.join(ROOT, ".ci", "run")) if ln.strip() and not ln.startswith("#")]
    assert block in ci
    assert ci.index("python -m pip install --quiet torch==2.13.0") < ci.index(block)
