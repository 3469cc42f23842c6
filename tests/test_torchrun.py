"""Multi-node training (recaffe.parallel.train_distributed): `caffe train` under torchrun, as two
nodes of one process each on loopback (two torchrun processes, CPU/gloo). The result equals one
solver with iter_size 2 on the same batches; a SIGHUP to one rank is acted on by all; a rank that
dies or freezes stops the other with a clear error instead of a hang."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from recaffe.parallel import DataParallelError, PeerWatchdog, launched_by_torchrun, train_distributed
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver

from test_parallel import NET, _solver, _write_db

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, K, WORLD = 4, 3, 2

SOLVER = ('net: "{net}" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed" max_iter: {max_iter} '
          'random_seed: 7 display: {display} snapshot_prefix: "{prefix}"')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_nodes(tmp_path, solver_file, extra_env=None):
    """Two torchrun 'nodes' of one process each, rendezvous on loopback."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", **(extra_env or {}))
    procs = []
    for node in range(WORLD):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(WORLD), "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "--max-restarts", "0", "-m", "recaffe.cli.main", "train", f"-solver={solver_file}"]
        out = open(tmp_path / f"node{node}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp_path)))
    return procs


def _wait(procs, timeout):
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.01, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        return None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _data(tmp_path):
    g = np.random.default_rng(3)
    n = WORLD * B * K
    features = g.normal(size=(n, 6)).astype(np.float32)
    labels = g.integers(0, 3, n)
    return features, labels, n


def test_two_torchrun_nodes_equal_one_solver_with_iter_size_two(tmp_path):
    features, labels, n = _data(tmp_path)
    # Global rank r reads positions r, r+2, ...; the reference db holds, per step, rank 0's batch
    # then rank 1's.
    par_db, ref_db = str(tmp_path / "par_lmdb"), str(tmp_path / "ref_lmdb")
    _write_db(par_db, features, labels, range(n))
    _write_db(ref_db, features, labels,
              [s * WORLD * B + r + WORLD * i for s in range(K) for r in range(WORLD) for i in range(B)])
    (tmp_path / "par.prototxt").write_text(NET % (par_db, B))
    (tmp_path / "ref.prototxt").write_text(NET % (ref_db, B))
    ref = create_solver(_solver(str(tmp_path / "ref.prototxt"), iter_size=WORLD))
    ref.solve()

    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(SOLVER.format(net=tmp_path / "par.prototxt", max_iter=K, display=1,
                                         prefix=tmp_path / "tr"))
    codes = _wait(_torchrun_nodes(tmp_path, solver_file), timeout=120)
    logs = [(tmp_path / f"node{r}.log").read_text() for r in range(WORLD)]
    assert codes == [0, 0], "\n".join(logs)
    assert "Rank 0 of 2 (local rank 0) on cpu, backend gloo" in logs[0]
    assert "Iteration 0" in logs[0] and "Iteration 0" not in logs[1]  # only the root displays
    snap = caffe_pb2.NetParameter()
    snap.ParseFromString((tmp_path / f"tr_iter_{K}.caffemodel").read_bytes())  # the root's snapshot
    got = [np.array(b.data, np.float32) for layer in snap.layer for b in layer.blobs]
    want = [b.data.reshape(-1) for b in ref.net.learnable_params]
    assert len(got) == len(want) == 4
    for g_, w in zip(got, want):
        np.testing.assert_allclose(g_, w, rtol=1e-6, atol=1e-6)
    assert not list(tmp_path.glob("tr_iter_*.solverstate.*"))  # nothing from rank 1


def _ranks_as_slurm_starts_them(tmp_path, solver_file, extra_env):
    """The two ranks started directly with the env:// variables set (as an sbatch script with srun
    does, see docs/distributed.md): rank 0 hosts the rendezvous store."""
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra_env)
        out = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "recaffe.cli.main", "train", f"-solver={solver_file}"],
                                      env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp_path)))
    return procs


def _start_long_training(tmp_path, extra_env):
    """Two ranks training 'forever' (env:// launch), returned once both are past their first update."""
    features, labels, n = _data(tmp_path)
    db = str(tmp_path / "lmdb")
    _write_db(db, features, labels, range(n))
    (tmp_path / "net.prototxt").write_text(NET % (db, B))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(SOLVER.format(net=tmp_path / "net.prototxt", max_iter=10**7, display=1000,
                                         prefix=tmp_path / "s"))
    procs = _ranks_as_slurm_starts_them(tmp_path, solver_file, extra_env)
    # Rank 0 displays iteration 0 after the first all-reduce: both ranks are training.
    _wait_until(lambda: "Iteration 0 " in (tmp_path / "rank0.log").read_text(), procs, tmp_path)
    return procs


def _wait_until(condition, procs, tmp_path, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "rank0.log").read_text()
        time.sleep(0.1)


def _rank0_exit_after(procs, how):
    """Send `how` to rank 1; rank 0's exit code, how long it took to exit."""
    os.kill(procs[1].pid, how)
    start = time.monotonic()
    code = procs[0].wait(timeout=30)
    return code, time.monotonic() - start


def test_sighup_to_one_rank_then_killing_it_stops_the_other_with_a_clear_error(tmp_path):
    procs = _start_long_training(tmp_path, {"RECAFFE_PEER_TIMEOUT": "3"})
    try:
        # SIGHUP reaching rank 1 only: all ranks agree, the root snapshots, training goes on.
        os.kill(procs[1].pid, signal.SIGHUP)
        _wait_until(lambda: list(tmp_path.glob("s_iter_*.solverstate")), procs, tmp_path)
        assert procs[1].poll() is None
        code, elapsed = _rank0_exit_after(procs, signal.SIGKILL)
    finally:
        _wait(procs, timeout=0)  # kills what is left
    log = (tmp_path / "rank0.log").read_text()
    assert code != 0 and elapsed < 15, log
    # gloo sees the closed connection at once (NCCL would not: then the watchdog does)
    assert ("caffe train: error: rank 0 of 2: the collective operation all_reduce failed" in log
            or "caffe train: error: rank 0 of 2: stopping: rank 1 has sent no heartbeat" in log), log


def test_a_frozen_rank_stops_the_other_through_the_watchdog(tmp_path):
    procs = _start_long_training(tmp_path, {"RECAFFE_PEER_TIMEOUT": "3"})
    try:
        code, elapsed = _rank0_exit_after(procs, signal.SIGSTOP)  # gloo alone would wait for it
    finally:
        _wait(procs, timeout=0)  # kills the frozen rank too
    log = (tmp_path / "rank0.log").read_text()
    assert code == 3 and elapsed < 15, log
    assert "caffe train: error: rank 0 of 2: stopping: rank 1 has sent no heartbeat for 3 s" in log, log


class _Store(dict):
    """The store operations the watchdog uses, in memory."""

    def set(self, key, value):
        self[key] = value.encode()

    def check(self, keys):
        return all(k in self for k in keys)

    def get(self, key):
        return self[key]


def test_watchdog_reports_a_silent_peer_a_failed_peer_and_ignores_a_finished_one():
    store = _Store()
    failures = []
    dog = PeerWatchdog(store, 0, 3, timeout_s=0.5, on_failure=failures.append, interval_s=0.05).start()
    store.set("hb/2", "done")  # rank 2 finished: not watched
    for i in range(5):  # rank 1 beats for a while, then stops
        store.set("hb/1", str(i))
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.05)
    dog.stop()
    assert failures == ["rank 1 has sent no heartbeat for 0.5 s: it died, was stopped, or its node became "
                        "unreachable"]
    assert store["hb/0"] == b"done"

    failures.clear()
    store = _Store(**{"hb/1": b"failed: OSError: no such file"})
    dog = PeerWatchdog(store, 0, 2, timeout_s=5, on_failure=failures.append, interval_s=0.05).start()
    time.sleep(0.3)
    dog.stop("failed: test")
    assert failures == ["rank 1 failed: OSError: no such file"]
    assert store["hb/0"] == b"failed: test"


def test_torchrun_environment_detection(monkeypatch):
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launched_by_torchrun(env)
    assert not launched_by_torchrun(dict(env, WORLD_SIZE="1"))
    assert not launched_by_torchrun({k: v for k, v in env.items() if k != "MASTER_PORT"})
    for k in env:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(DataParallelError, match="missing: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        train_distributed(caffe_pb2.SolverParameter())



@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_mode_under_torchrun_without_a_gpu_is_a_clear_error(monkeypatch):
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DataParallelError, match=r"rank 1 \(LOCAL_RANK 0\) needs GPU 0, but this node has 0 CUDA"):
        train_distributed(caffe_pb2.SolverParameter(), gpu=True)
