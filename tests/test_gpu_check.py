"""benchmarks/gpu_check.sh's plumbing, on the CPU (--cpu-dry-run): every check runs small on the
CPU and the summary table and exit status come out right. Says nothing about CUDA itself."""
import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _run(*args, **env):
    full_env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full_env, timeout=600)


def _table(stdout):
    lines = stdout.split("check        status seconds  detail\n", 1)[1].splitlines()
    rows = {}
    for line in lines:
        if not line.strip():
            break
        name, status = line.split()[:2]
        rows[name] = status
    return rows


def test_cpu_dry_run_runs_every_check_and_passes():
    r = _run("--cpu-dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CPU DRY RUN: plumbing only, says nothing about CUDA" in r.stdout
    assert _table(r.stdout) == {"tests": "PASS", "lenet": "PASS", "precision": "PASS", "determinism": "PASS",
                                "zoo": "PASS", "multi_gpu": "SKIP"} or _table(r.stdout)["zoo"] == "SKIP", r.stdout
    assert "caffemodels identical" in r.stdout
    assert "gpu_check: all checks passed" in r.stdout


def test_a_failing_check_gives_exit_status_1_and_its_log():
    r = _run("--cpu-dry-run", GPU_CHECK_ONLY="tests", GPU_CHECK_PYTEST_ARGS="tests/no_such_test_file.py")
    assert r.returncode == 1, r.stdout + r.stderr
    assert _table(r.stdout) == {"tests": "FAIL"}
    assert "gpu_check: FAILED" in r.stdout and "no_such_test_file.py" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_a_gpu_it_says_so_and_exits_2():
    r = _run()
    assert r.returncode == 2
    assert "no CUDA device is available to torch" in r.stderr and "--cpu-dry-run" in r.stderr


def test_usage_error():
    assert _run("--bogus").returncode == 64
