"""The real Caffe's LeNet (../shared/reference/lenet/): its .caffemodel and .solverstate load, its
deploy outputs are reproduced, and `caffe test` on the bundled test digits reports its accuracy."""
import os
import re
import shutil

import numpy as np
import pytest

import caffe
from conftest import ROOT, require_reference
from helpers import capture_log
from recaffe.cli.main import main as caffe_main
from recaffe.data.mnist import convert_mnist

DATA = ROOT / "examples" / "mnist" / "data"


def test_deploy_outputs_match_caffe():
    d = require_reference("lenet")
    z = np.load(d / "deploy_outputs.npz")
    net = caffe.Net(str(d / "lenet.prototxt"), caffe.TEST, weights=str(d / "lenet_iter_2000.caffemodel"))
    out = net.forward(data=z["data"])
    np.testing.assert_allclose(out["prob"], z["prob"], rtol=1e-4, atol=1e-5)
    for name in ("pool2", "ip1", "ip2"):
        np.testing.assert_allclose(net.blobs[name].data, z["blob__" + name], rtol=1e-4, atol=1e-5)
    assert (out["prob"].argmax(1) == z["labels"]).mean() > 0.95


@pytest.fixture
def lenet_workdir(tmp_path):
    """A folder laid out as the reference run expected: prototxts, weights and the test LMDB."""
    d = require_reference("lenet")
    for name in ("lenet_train_test.prototxt", "lenet_solver.prototxt", "lenet_iter_1000.caffemodel",
                 "lenet_iter_1000.solverstate", "lenet_iter_2000.caffemodel"):
        shutil.copy(d / name, tmp_path / name)
    convert_mnist(str(DATA / "t10k-images-idx3-ubyte.gz"), str(DATA / "t10k-labels-idx1-ubyte.gz"),
                  str(tmp_path / "mnist_test_lmdb"))
    return tmp_path


def test_caffe_test_reports_caffes_accuracy(lenet_workdir, monkeypatch):
    monkeypatch.chdir(lenet_workdir)
    with capture_log() as lines:
        rc = caffe_main(["test", "-model", "lenet_train_test.prototxt", "-weights=lenet_iter_2000.caffemodel",
                         "--iterations", "20"])
    assert rc == 0
    summary = {m.group(1): float(m.group(2)) for m in (re.match(r"^(\w+) = ([-\d.e]+)", ln) for ln in lines) if m}
    assert summary["accuracy"] == pytest.approx(0.9725, abs=1e-6)
    assert summary["loss"] == pytest.approx(0.0950559, rel=1e-4)


def test_caffe_solverstate_restores(lenet_workdir, monkeypatch):
    monkeypatch.chdir(lenet_workdir)
    os.symlink("mnist_test_lmdb", "mnist_train_lmdb")  # any LMDB will do: nothing is trained here
    solver = caffe.get_solver("lenet_solver.prototxt")
    solver.restore("lenet_iter_1000.solverstate")
    assert solver.iter == 1000
    ref = caffe.Net("lenet_train_test.prototxt", caffe.TEST, weights="lenet_iter_1000.caffemodel")
    for name, blobs in ref.params.items():
        for mine, theirs in zip(solver.net.params[name], blobs):
            assert np.array_equal(mine.data, theirs.data)
    assert any(h.data.any() for h in solver.history)  # Caffe's momentum history came along


def test_caffe_time_on_lenet_prints_the_per_layer_table(lenet_workdir, monkeypatch):
    """`caffe time -model lenet_train_test.prototxt -iterations 2`: Caffe's per-layer lines for every
    layer of the TRAIN net, then the averages."""
    monkeypatch.chdir(lenet_workdir)
    os.symlink("mnist_test_lmdb", "mnist_train_lmdb")
    with capture_log() as lines:
        assert caffe_main(["time", "-model", "lenet_train_test.prototxt", "-iterations", "2"]) == 0
    layers = ["mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"]
    for name in layers:
        for way in ("forward", "backward"):
            assert any(re.match(rf"^\s*{name}\t{way}: [\d.e+-]+ ms\.$", ln) for ln in lines), (name, way)
    assert sum(ln.startswith("Iteration: ") for ln in lines) == 2
    for what in ("Average Forward pass", "Average Backward pass", "Average Forward-Backward", "Total Time"):
        assert any(re.match(rf"^{what}: [\d.e+-]+ ms\.$", ln) for ln in lines), what
