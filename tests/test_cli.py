"""The caffe command: Caffe's flag spellings, train (with snapshot and resume), test, time."""
import re

import numpy as np
import pytest

import caffe
from helpers import capture_log, write
from recaffe.cli.flags import FlagError, FlagSet
from recaffe.cli.main import main

NET = """name: "tiny"
layer { name: "d" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 8 dim: 3 } shape { dim: 8 dim: 2 }
                     data_filler { type: "constant" value: 0.5 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "o"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "o" bottom: "y" top: "loss" }
"""


@pytest.mark.parametrize("argv", [["-solver=s.prototxt"], ["--solver=s.prototxt"], ["-solver", "s.prototxt"],
                                  ["--solver", "s.prototxt"]])
def test_flag_spellings(argv):
    f = FlagSet()
    f.add("solver", "", "solver")
    f.add("iterations", 50, "n")
    f.add("verbose", False, "bool")
    values, rest = f.parse(argv + ["-iterations=3", "-verbose"])
    assert values == {"solver": "s.prototxt", "iterations": 3, "verbose": True} and rest == []
    assert f.parse(["-noverbose"])[0]["verbose"] is False
    with pytest.raises(FlagError, match="unknown command line flag 'bogus'"):
        f.parse(["-bogus=1"])
    with pytest.raises(FlagError, match="takes a int"):
        f.parse(["-iterations=x"])


def test_train_snapshots_and_resume_matches_straight_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "net.prototxt", NET)
    base = 'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 display: 2 random_seed: 4 '
    write(tmp_path, "straight.prototxt", base + 'max_iter: 6 snapshot_prefix: "straight"')
    write(tmp_path, "half.prototxt", base + 'max_iter: 3 snapshot_prefix: "half"')
    write(tmp_path, "rest.prototxt", base + 'max_iter: 6 snapshot_prefix: "rest"')
    with capture_log() as lines:
        assert main(["train", "--solver=straight.prototxt"]) == 0
    assert "Optimization Done." in lines and any(ln.startswith("Iteration 2, lr = 0.1") for ln in lines)
    assert (tmp_path / "straight_iter_6.caffemodel").exists()
    assert main(["train", "-solver", "half.prototxt"]) == 0
    assert main(["train", "-solver=rest.prototxt", "-snapshot=half_iter_3.solverstate"]) == 0
    a = caffe.Net("net.prototxt", caffe.TEST, weights="straight_iter_6.caffemodel")
    b = caffe.Net("net.prototxt", caffe.TEST, weights="rest_iter_6.caffemodel")
    assert np.array_equal(a.params["ip"][0].data, b.params["ip"][0].data)


def test_train_refuses_snapshot_and_weights_together(tmp_path, capsys):
    assert main(["train", "-solver=x", "-snapshot=a", "-weights=b"]) == 1
    assert "not both" in capsys.readouterr().err


def test_test_and_time_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "net.prototxt", NET)
    caffe.Net("net.prototxt", caffe.TEST).save("w.caffemodel")
    with capture_log() as lines:
        assert main(["test", "-model=net.prototxt", "-weights=w.caffemodel", "-iterations=2"]) == 0
    assert "Running for 2 iterations." in lines
    assert any(re.match(r"^loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)$", ln) for ln in lines)
    with capture_log() as lines:
        assert main(["time", "-model", "net.prototxt", "-iterations", "3"]) == 0
    assert any(re.match(r"^\s+ip\tforward: [\d.e+-]+ ms\.$", ln) for ln in lines)
    assert any(ln.startswith("Average Forward-Backward: ") for ln in lines)


def test_time_runs_every_layers_backward_as_caffe(tmp_path, monkeypatch):
    # a deploy net (no loss): no layer needs backward, yet Caffe's time calls each layer's
    # Backward with the net's propagate_down flags, so the convolution's param gradients are timed
    from recaffe.layers.vision import ConvolutionLayer
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "deploy.prototxt",
          'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 1 dim: 5 dim: 5 } } }\n'
          'layer { name: "conv" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 2 '
          'kernel_size: 3 } }\n'
          'layer { name: "relu" type: "ReLU" bottom: "c" top: "c" }\n')
    calls = []
    original = ConvolutionLayer.backward
    monkeypatch.setattr(ConvolutionLayer, "backward",
                        lambda self, top, prop, bottom: (calls.append(list(prop)),
                                                         original(self, top, prop, bottom)))
    assert main(["time", "-model", "deploy.prototxt", "-iterations", "3"]) == 0
    assert calls == [[False]] * 3
    calls.clear()  # -compile times the same work (after its warm-up passes, which skip it)
    from recaffe import fastpath
    monkeypatch.setattr(fastpath, "_mode", None)
    monkeypatch.setenv(fastpath.COMPILE_ENV, "0")  # main() sets both; restored after the test
    try:
        assert main(["time", "-model", "deploy.prototxt", "-iterations", "2", "-compile"]) == 0
    finally:
        fastpath.set_compile(False)
    assert calls == [[False]] * 2


def test_unknown_command_and_gpu_without_cuda(capsys):
    assert main(["trian"]) == 1
    assert "unknown command 'trian'" in capsys.readouterr().err
    import torch
    if not torch.cuda.is_available():
        assert main(["test", "-model=x", "-weights=y", "-gpu=0"]) == 1
        assert "CUDA is not available" in capsys.readouterr().err


def test_signals_snapshot_and_stop_training(tmp_path, monkeypatch):
    import os
    import signal

    from recaffe.signals import SignalHandler
    from recaffe.solvers import get_solver
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "net.prototxt", NET)
    write(tmp_path, "s.prototxt", 'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 100 '
          'snapshot_prefix: "sig" snapshot_after_train: true')
    solver = get_solver("s.prototxt")
    sent = {2: signal.SIGHUP, 4: signal.SIGINT}

    def on_start():
        if solver.iter in sent:
            os.kill(os.getpid(), sent[solver.iter])
    solver.add_callback(on_start=on_start)
    with SignalHandler("snapshot", "snapshot") as h1:  # first run: both signals snapshot, training goes on
        solver.action_request = h1.action
        solver.step(5)
    assert sorted(p.name for p in tmp_path.glob("sig_iter_*")) == [
        "sig_iter_3.caffemodel", "sig_iter_3.solverstate", "sig_iter_5.caffemodel", "sig_iter_5.solverstate"]
    sent = {7: signal.SIGINT}
    with SignalHandler("stop", "none") as h2:  # Ctrl-C stops; solve() still snapshots, as Caffe
        solver.action_request = h2.action
        with capture_log() as lines:
            solver.solve()
    assert solver.iter == 8 and "Optimization stopped early." in lines
    assert (tmp_path / "sig_iter_8.caffemodel").exists()
