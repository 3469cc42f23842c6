"""recaffe.threads: OpenMP threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE, set before torch
loads unless the user set it), and the thread count comes from -threads / RECAFFE_THREADS /
set_num_threads."""
import os
import subprocess
import sys

import pytest
import torch

import recaffe
from recaffe import threads
from recaffe.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prepare_environment_sets_passive_only_before_torch_and_never_over_the_user():
    env = {}
    assert threads.prepare_environment(env, modules={}) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not threads.prepare_environment(env, modules={}) and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert not threads.prepare_environment(env, modules={"torch": torch}) and env == {}


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "RECAFFE_THREADS")}
    full.update(PYTHONPATH=os.path.join(ROOT, "src"), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_import_sets_the_policy_and_applies_recaffe_threads_in_a_fresh_process():
    code = ("import os, caffe, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads()); "
            "caffe.set_num_threads(2); print(torch.get_num_threads())")
    r = _python(code, RECAFFE_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["PASSIVE", "1", "2"]
    r = _python("import os, recaffe; print(os.environ['OMP_WAIT_POLICY'])", OMP_WAIT_POLICY="ACTIVE",
                RECAFFE_THREADS="zero")
    assert r.returncode != 0 and "RECAFFE_THREADS: expected a number of threads" in r.stderr


def test_set_num_threads_checks_its_argument():
    before = torch.get_num_threads()
    try:
        recaffe.set_num_threads(1)
        assert recaffe.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(threads.ThreadsError, match="positive integer"):
        recaffe.set_num_threads(0)


def test_cli_threads_flag(tmp_path, capsys, monkeypatch):
    model = tmp_path / "net.prototxt"
    model.write_text('name: "t" layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }'
                     'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 2 } }')
    before = torch.get_num_threads()
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    try:
        assert main(["time", f"-model={model}", "-iterations=1", "-threads=1"]) == 0
        assert torch.get_num_threads() == 1
        assert os.environ[threads.THREADS_ENV] == "1"  # data-parallel ranks inherit it
    finally:
        torch.set_num_threads(before)
        os.environ.pop(threads.THREADS_ENV, None)
    assert main(["time", f"-model={model}", "-threads=-2"]) == 1
    assert "-threads must be a positive number of threads" in capsys.readouterr().err
