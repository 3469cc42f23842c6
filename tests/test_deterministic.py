"""Determinism on demand (beyond Caffe): caffe.set_deterministic, `caffe train -deterministic`, and
RECAFFE_DETERMINISTIC=1 for processes started later (data-parallel ranks)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import caffe
from helpers import capture_log, write
from recaffe import device
from recaffe.cli.main import main

NET = """name: "tiny"
layer { name: "d" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 8 dim: 3 } shape { dim: 8 dim: 2 }
                     data_filler { type: "gaussian" std: 1 } data_filler { type: "gaussian" std: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "o"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "drop" type: "Dropout" bottom: "o" top: "o" }
layer { name: "loss" type: "EuclideanLoss" bottom: "o" bottom: "y" top: "loss" }
"""


@pytest.fixture
def restore_torch_settings(monkeypatch):
    monkeypatch.delenv(device.DETERMINISTIC_ENV, raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
           torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(was[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = was[1], was[2]


def test_set_deterministic_switches_torch_and_the_environment(restore_torch_settings):
    caffe.set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled() and device.is_deterministic()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ[device.DETERMINISTIC_ENV] == "1"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    caffe.set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert device.DETERMINISTIC_ENV not in os.environ


def test_environment_variable_turns_it_on_at_import():
    env = dict(os.environ, **{device.DETERMINISTIC_ENV: "1"})
    code = "import recaffe, torch; print(torch.are_deterministic_algorithms_enabled())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def _train(tmp_path, name, extra):
    solver = write(tmp_path, f"{name}_solver.prototxt",
                   f'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 max_iter: 5 '
                   f'display: 0 random_seed: 4 snapshot_prefix: "{name}" snapshot_after_train: true')
    with capture_log() as lines:
        assert main(["train", f"-solver={solver}"] + extra) == 0
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST, weights=str(tmp_path / f"{name}_iter_5.caffemodel"))
    return [b.data.copy() for b in net.params["ip"]], lines


def test_deterministic_training_repeats_bit_for_bit(tmp_path, monkeypatch, restore_torch_settings):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "net.prototxt", NET)
    a, lines = _train(tmp_path, "a", ["-deterministic"])  # Dropout and the fillers draw random numbers
    assert "Using deterministic algorithms only." in lines
    assert torch.are_deterministic_algorithms_enabled()
    b, _ = _train(tmp_path, "b", ["--deterministic"])
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
