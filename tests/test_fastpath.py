"""The compiled fast path (recaffe/fastpath.py): training within float rounding of eager, blobs and
params visible and editable between compiled calls, eager segments around a Python layer, and the
eager-vs-compiled choice.

One tiny net is compiled once for the whole module (4 small graphs: a few seconds with Inductor's
cache warm); everything else runs without compiling.
"""
import logging
import sys
import types

import numpy as np
import pytest

from helpers import capture_log
from recaffe import fastpath
from recaffe.io.protofiles import parse_text
from recaffe.net import Net
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver

pytest.importorskip("torch._dynamo")

PYLAYER = """import caffe
class Twice(caffe.Layer):
    def setup(self, bottom, top): pass
    def reshape(self, bottom, top): top[0].reshape(*bottom[0].shape)
    def forward(self, bottom, top): top[0].data[...] = 2 * bottom[0].data
    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 2 * top[0].diff
"""

NET = """name: "tiny"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 2 dim: 6 dim: 6 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                      bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }
layer { name: "twice" type: "Python" bottom: "c" top: "t" python_param { module: "fastpath_twice" layer: "Twice" } }
layer { name: "ip" type: "InnerProduct" bottom: "t" top: "o"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "o" bottom: "y" top: "loss" }
"""
SOLVER = 'base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed" random_seed: 3\n'


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def pylayer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pylayer")
    (folder / "fastpath_twice.py").write_text(PYLAYER)
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))


def batch(i):
    rng = np.random.default_rng(i)
    return rng.standard_normal((4, 2, 6, 6)).astype("f4"), rng.integers(0, 3, 4).astype("f4")


def make_solver():
    sp = parse_text(SOLVER, caffe_pb2.SolverParameter())
    sp.net_param.CopyFrom(parse_text(NET, caffe_pb2.NetParameter()))
    return create_solver(sp)


@pytest.fixture(scope="module")
def trained(pylayer):
    """An eager and a compiled solver after 3 steps on the same batches, and the log lines."""
    lines = Lines()
    logging.getLogger("recaffe").addHandler(lines)
    try:
        eager, comp = make_solver(), make_solver()
        comp.net.set_compile("always")
        trajectory = []
        for i in range(3):
            x, y = batch(i)
            for s in (eager, comp):
                s.net.blobs["x"].data[...] = x
                s.net.blobs["y"].data[...] = y
                s.step(1)
            trajectory.append([(a.data.copy(), b.data.copy())
                               for a, b in zip(eager.net.learnable_params, comp.net.learnable_params)])
    finally:
        logging.getLogger("recaffe").removeHandler(lines)
    return eager, comp, trajectory, lines.lines


def test_segments_around_the_python_layer_and_one_log_line_each(trained):
    _, comp, _, lines = trained
    fp = comp.net.fastpath
    assert [(s.direction, [comp.net.layer_names[k] for k in s.ids], s.choice) for s in fp.forward_segments] == [
        ("forward", ["x", "y"], "eager"), ("forward", ["conv", "relu"], "compiled"),
        ("forward", ["twice"], "eager"), ("forward", ["ip"], "compiled"), ("forward", ["loss"], "eager")]
    assert [([comp.net.layer_names[k] for k in s.ids], s.choice) for s in fp.backward_segments] == [
        (["loss"], "eager"), (["ip"], "compiled"), (["twice"], "eager"), (["relu", "conv"], "compiled")]
    assert all(s.compiled_fn is not None for s in fp.forward_segments + fp.backward_segments if s.capturable)
    assert sum("twice run eagerly (Python layer)" in ln for ln in lines) == 1
    assert sum("compiled in" in ln for ln in lines) == 4


def test_compiled_training_follows_eager_within_float_rounding(trained):
    eager, comp, trajectory, _ = trained
    moved = 0.0
    for step, pairs in enumerate(trajectory):
        for a, b in pairs:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"step {step + 1}")
    first = make_solver()  # same seed: the initial weights
    moved = max(float(np.abs(w.data - f.data).max())
                for w, f in zip(comp.net.learnable_params, first.net.learnable_params))
    assert moved > 1e-3
    assert comp.net.layers[2].channels_last and not eager.net.layers[2].channels_last


def test_blobs_and_diffs_are_readable_after_a_compiled_step(trained):
    eager, comp, _, _ = trained
    for name in ("c", "t", "o"):
        np.testing.assert_allclose(comp.net.blobs[name].data, eager.net.blobs[name].data, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(comp.net.blobs[name].diff, eager.net.blobs[name].diff, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager.net.learnable_params, comp.net.learnable_params):
        np.testing.assert_allclose(b.diff, a.diff, rtol=1e-5, atol=1e-6)


def test_edits_of_params_and_blobs_between_calls_take_effect(trained):
    eager, comp, _, _ = trained
    for s in (eager, comp):
        s.net.params["ip"][0].data[:, :5] = 0.25        # a param edited in place
        s.net.blobs["x"].data[...] = batch(7)[0]        # a new input
        s.net.forward()
    np.testing.assert_allclose(comp.net.blobs["o"].data, eager.net.blobs["o"].data, rtol=1e-5, atol=1e-6)
    before = comp.net.blobs["o"].data.copy()
    comp.net.params["conv"][1].data[...] += 1.0           # the conv bias, read inside the graph
    comp.net.forward()
    assert not np.allclose(comp.net.blobs["o"].data, before)
    # a top diff edited between forward and backward is what the compiled backward reads
    for s in (eager, comp):
        s.net.params["conv"][1].data[...] = comp.net.params["conv"][1].data
        s.net.forward()
        s.net.clear_param_diffs()
        s.net.blobs["o"].diff[...] = np.arange(12, dtype="f4").reshape(4, 3)
        s.net.backward(start="ip")
    np.testing.assert_allclose(comp.net.params["ip"][0].diff, eager.net.params["ip"][0].diff, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ without compiling
def test_which_layers_run_eagerly():
    net = Net(parse_text(NET.replace('type: "Python"', 'type: "Dropout"').replace(
        'python_param { module: "fastpath_twice" layer: "Twice" }', ""), caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    reasons = {n: fastpath.eager_reason(l) for n, l in zip(net.layer_names, net.layers)}
    assert reasons == {"x": "data layer", "y": "data layer", "conv": None, "relu": None,
                       "twice": "random draws", "ip": None, "loss": "loss layer"}
    test_net = Net(parse_text(NET.replace('type: "Python"', 'type: "Dropout"').replace(
        'python_param { module: "fastpath_twice" layer: "Twice" }', ""), caffe_pb2.NetParameter()), caffe_pb2.TEST)
    assert fastpath.eager_reason(test_net.layer_by_name("twice")) is None  # TEST dropout: identity


@pytest.mark.parametrize("compiled_cost, expected", [(0.5, "compiled"), (2.0, "eager")])
def test_auto_mode_keeps_the_faster_of_eager_and_compiled(monkeypatch, compiled_cost, expected):
    """The choice itself, with a stand-in for torch.compile and a fake clock (eager calls cost 1,
    compiled calls ``compiled_cost``): slower compiled code is dropped, faster is kept."""
    net = Net(parse_text(NET.replace('type: "Python"', 'type: "ReLU"').replace(
        'python_param { module: "fastpath_twice" layer: "Twice" }', ""), caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    clock = [0.0]
    calls = {"compiled": 0}
    plain_eager = fastpath.Segment._eager_fn

    def costing(fn, cost, counter=None):
        def run():
            clock[0] += cost
            if counter:
                calls[counter] += 1
            return fn()
        return run

    monkeypatch.setattr(fastpath, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(fastpath.Segment, "_build_compiled",
                        lambda seg: costing(plain_eager(seg), compiled_cost, "compiled"))
    monkeypatch.setattr(fastpath.Segment, "_eager_fn", lambda seg: costing(plain_eager(seg), 1.0))
    net.set_compile("auto")
    x, y = batch(0)
    net.blobs["x"].data[...] = x
    net.blobs["y"].data[...] = y
    (seg,) = [s for s in net.fastpath.forward_segments if s.capturable]
    for _ in range(1 + fastpath.EAGER_SAMPLES + 2 + fastpath.COMPILED_SAMPLES):
        assert seg.choice == "measuring"
        net.forward()
    assert seg.choice == expected
    n = calls["compiled"]
    net.forward()
    assert calls["compiled"] == n + (expected == "compiled")


def test_set_compile_global_switch_applies_to_new_nets(monkeypatch):
    monkeypatch.setattr(fastpath, "_mode", None)
    text = NET.replace('type: "Python"', 'type: "ReLU"').replace(
        'python_param { module: "fastpath_twice" layer: "Twice" }', "")
    assert Net(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN).fastpath is None
    fastpath.set_compile(True)
    net = Net(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    assert net.fastpath is not None and fastpath.compile_mode() == "auto"
    net.set_compile(False)
    assert net.fastpath is None and not net.layers[2].channels_last
    fastpath.set_compile(False)
    with pytest.raises(ValueError):
        fastpath.set_compile("sometimes")


def test_cli_time_with_compile_times_whole_passes(tmp_path, monkeypatch, capfd):
    """``caffe time -compile``: the fast path is on, segments settle, whole passes are timed (the
    compiler is stubbed here: the real one is exercised above)."""
    from recaffe.cli.main import main

    monkeypatch.setattr(fastpath, "_mode", None)
    monkeypatch.setenv(fastpath.COMPILE_ENV, "0")  # main() sets it; restored after the test
    plain_eager = fastpath.Segment._eager_fn
    monkeypatch.setattr(fastpath.Segment, "_build_compiled", lambda seg: plain_eager(seg))
    model = tmp_path / "tiny.prototxt"
    model.write_text(NET.replace('type: "Python"', 'type: "ReLU"').replace(
        'python_param { module: "fastpath_twice" layer: "Twice" }', ""))
    lines = Lines()
    logging.getLogger("recaffe").addHandler(lines)
    try:
        assert main(["time", "-model", str(model), "-compile", "-iterations", "2"]) == 0
    finally:
        logging.getLogger("recaffe").removeHandler(lines)
        fastpath.set_compile(False)
    assert any("warm-up iterations" in ln for ln in lines.lines)
    assert any(ln.startswith("Average Forward-Backward") for ln in lines.lines)
    assert not any("\tforward:" in ln for ln in lines.lines)  # no per-layer lines


def test_a_segment_that_does_not_compile_runs_eagerly_from_the_same_state(monkeypatch):
    """Compiling fails after the backward graph already accumulated into a param diff: the diffs
    are restored and the segment runs eagerly, once."""
    text = NET.replace('type: "Python"', 'type: "ReLU"').replace(
        'python_param { module: "fastpath_twice" layer: "Twice" }', "")
    eager = Net(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    net = Net(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    plain_eager = fastpath.Segment._eager_fn

    def failing_build(seg):
        run = plain_eager(seg)

        def fail():
            run()  # the work happened (accumulated into the diffs), then the "compiler" fails
            raise RuntimeError("backend compiler failed")
        return fail

    monkeypatch.setattr(fastpath.Segment, "_build_compiled", failing_build)
    net.set_compile("always")
    x, y = batch(1)
    for a, b in zip(eager.learnable_params, net.learnable_params):
        b.data[...] = a.data
    for n in (eager, net):
        n.blobs["x"].data[...] = x
        n.blobs["y"].data[...] = y
        n.clear_param_diffs()
        n.forward()
        n.backward()
    assert all(s.choice == "eager" for s in net.fastpath.forward_segments + net.fastpath.backward_segments)
    for a, b in zip(eager.learnable_params, net.learnable_params):
        np.testing.assert_array_equal(b.diff, a.diff)


@pytest.mark.parametrize("cost_after_choice, expected", [(0.5, "compiled"), (3.0, "eager")])
def test_whole_pass_check_undoes_choices_that_slow_the_pass(monkeypatch, cost_after_choice, expected):
    """Segments measured faster alone can make the whole pass slower (layouts, the eager work
    around them): after the choices, whole passes are timed as chosen and all eager, and the
    faster is kept. Fake clock: eager calls cost 1, compiled calls 0.5 while the segment measures
    and ``cost_after_choice`` once it has chosen."""
    net = Net(parse_text(NET.replace('type: "Python"', 'type: "ReLU"').replace(
        'python_param { module: "fastpath_twice" layer: "Twice" }', ""), caffe_pb2.NetParameter()), caffe_pb2.TRAIN)
    clock = [0.0]
    plain_eager = fastpath.Segment._eager_fn

    def compiled(seg):
        fn = plain_eager(seg)

        def run():
            clock[0] += 0.5 if seg.choice == "measuring" else cost_after_choice
            return fn()
        return run

    def eager(seg):
        fn = plain_eager(seg)

        def run():
            clock[0] += 1.0
            return fn()
        return run

    monkeypatch.setattr(fastpath, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(fastpath.Segment, "_build_compiled", compiled)
    monkeypatch.setattr(fastpath.Segment, "_eager_fn", eager)
    net.set_compile("auto")
    x, y = batch(0)
    net.blobs["x"].data[...] = x
    net.blobs["y"].data[...] = y
    segs = [s for s in net.fastpath.segments if s.capturable]
    with capture_log() as lines:
        for _ in range(60):
            net.forward()
            net.backward()
            if net.fastpath.pass_check.state == "done":
                break
    assert net.fastpath.pass_check.state == "done"
    assert [s.choice for s in segs] == [expected] * len(segs)
    assert any(ln.startswith(f"Compiled fast path: net {net.name}, whole forward+backward: all eager")
               for ln in lines)
