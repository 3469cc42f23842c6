"""Data-parallel training (recaffe.parallel) on CPU with gloo: 2 ranks equal one solver with
iter_size 2 on the same batches; only rank 0 tests and snapshots; failures do not hang."""
import functools
import json
import os

import numpy as np
import pytest

from recaffe.data.db import open_db
from recaffe.io.protofiles import parse_text
from recaffe.parallel import DataParallelError, train_data_parallel
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver

B, K, WORLD = 4, 3, 2  # batch per rank, steps, ranks

NET = """
name: "dp"
layer { name: "data" type: "Data" top: "data" top: "label"
  data_param { source: "%s" backend: LMDB batch_size: %d prefetch: 0 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 }
                        bias_filler { type: "uniform" min: -0.1 max: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _write_db(path, features, labels, order):
    db = open_db("lmdb", path, "new")
    txn = db.new_transaction()
    for key, i in enumerate(order):
        d = caffe_pb2.Datum(channels=features.shape[1], height=1, width=1, label=int(labels[i]))
        d.float_data.extend(features[i].tolist())
        txn.put(b"%08d" % key, d.SerializeToString())
    txn.commit()
    db.close()


def _solver(net_file, **fields):
    text = (f'net: "{net_file}" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed" '
            f"max_iter: {K} random_seed: 7 display: 0 snapshot_after_train: false")
    param = parse_text(text, caffe_pb2.SolverParameter(), filename="<test solver>")
    for k, v in fields.items():
        setattr(param, k, v)
    return param


def _record(tmp, rank, solver):
    """on_start: log each test/snapshot call of this rank to a file."""
    def wrap(name):
        inner = getattr(solver, name)

        def call(*a, **kw):
            with open(os.path.join(tmp, f"events{rank}.txt"), "a") as f:
                f.write(f"{name} {solver.iter}\n")
            return inner(*a, **kw)
        setattr(solver, name, call)
    wrap("test")
    wrap("snapshot")


def _save(tmp, rank, solver):
    """on_finish: this rank's final weights and how many training records its Data layer read."""
    np.savez(os.path.join(tmp, f"final{rank}.npz"), *[b.data for b in solver.net.learnable_params])
    reader = solver.net.layer_dict["data"]._reader
    with open(os.path.join(tmp, f"reader{rank}.json"), "w") as f:
        json.dump({"offset": reader.offset}, f)


def _events(tmp, rank):
    path = os.path.join(tmp, f"events{rank}.txt")
    return open(path).read().split("\n")[:-1] if os.path.exists(path) else []


def test_two_ranks_equal_iter_size_two(tmp_path):
    g = np.random.default_rng(3)
    n = WORLD * B * K
    features = g.normal(size=(n, 6)).astype(np.float32)
    labels = g.integers(0, 3, n)
    # The parallel run reads records round-robin: rank r gets positions r, r+2, ...; the reference
    # db holds, per step, rank 0's batch then rank 1's batch.
    par_db, ref_db = str(tmp_path / "par_lmdb"), str(tmp_path / "ref_lmdb")
    _write_db(par_db, features, labels, range(n))
    ref_order = [s * WORLD * B + r + WORLD * i for s in range(K) for r in range(WORLD) for i in range(B)]
    _write_db(ref_db, features, labels, ref_order)
    par_net, ref_net = tmp_path / "par.prototxt", tmp_path / "ref.prototxt"
    par_net.write_text(NET % (par_db, B))
    ref_net.write_text(NET % (ref_db, B))

    ref = create_solver(_solver(str(ref_net), iter_size=WORLD))
    ref.solve()
    expected = [b.data.copy() for b in ref.net.learnable_params]

    tmp = str(tmp_path)
    param = _solver(str(par_net), test_interval=K, snapshot=K, snapshot_prefix=str(tmp_path / "dp"))
    param.test_iter.append(1)
    train_data_parallel(param, ["cpu"] * WORLD, on_start=functools.partial(_record, tmp),
                        on_finish=functools.partial(_save, tmp), timeout_s=60)

    finals = [list(np.load(os.path.join(tmp, f"final{r}.npz")).values()) for r in range(WORLD)]
    for got, want in zip(finals[0], expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(finals[0], finals[1]):
        np.testing.assert_array_equal(a, b)
    # Each rank read only its own share: B records per step, the skipped ones included.
    for r in range(WORLD):
        offset = json.load(open(os.path.join(tmp, f"reader{r}.json")))["offset"]
        assert offset == WORLD * B * K - (WORLD - 1 - r)  # position after its last record
    # Only rank 0 tests (at iter 0 and K) and snapshots (at K).
    assert _events(tmp, 0) == ["test 0", f"snapshot {K}", f"test {K}"]
    assert _events(tmp, 1) == []
    snap = caffe_pb2.NetParameter()
    snap.ParseFromString((tmp_path / f"dp_iter_{K}.caffemodel").read_bytes())
    ip1 = next(l for l in snap.layer if l.name == "ip1")
    np.testing.assert_array_equal(np.array(ip1.blobs[0].data, np.float32).reshape(5, 6), finals[0][0])


def test_error_in_one_rank_is_raised_not_hung(tmp_path):
    db = str(tmp_path / "lmdb")
    _write_db(db, np.zeros((4, 6), np.float32), np.zeros(4, int), range(4))
    net = tmp_path / "net.prototxt"
    net.write_text(NET % (db, 2))
    missing = str(tmp_path / "missing.caffemodel")
    # Only rank 0 loads weights: rank 1 is already waiting for its broadcast when rank 0 fails. A hang
    # would end at the launcher's timeout with a timeout error, not with rank 0's error matched here.
    with pytest.raises(DataParallelError, match=r"rank 0(.|\n)*missing\.caffemodel"):
        train_data_parallel(_solver(str(net)), ["cpu", "cpu"], weights=missing, timeout_s=120)


def test_bad_solver_path_fails_before_spawning(tmp_path):
    with pytest.raises(Exception, match="nope.prototxt"):
        train_data_parallel(str(tmp_path / "nope.prototxt"), ["cpu", "cpu"])


def test_cli_train_with_several_gpus_uses_the_launcher(tmp_path, monkeypatch):
    import recaffe.parallel
    from recaffe.cli import main as cli

    calls = []
    monkeypatch.setattr(cli, "_torch_device_count", lambda: 3)
    monkeypatch.setattr(recaffe.parallel, "train_data_parallel", lambda *a, **kw: calls.append((a, kw)))
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 1')
    assert cli.main(["train", f"-solver={solver}", "-gpu", "all", "-weights=w.caffemodel"]) == 0
    assert cli.main(["train", f"-solver={solver}", "-gpu=0,2"]) == 0
    assert [a[1] for a, _ in calls] == [[0, 1, 2], [0, 2]]
    # -weights travels in the solver's weights field (as Caffe's train() puts it there): every
    # rank's solver loads it when built.
    assert list(calls[0][0][0].weights) == ["w.caffemodel"] and calls[0][1]["source"] == str(solver)
    assert list(calls[1][0][0].weights) == []


def _signal_self_at_iter_1(tmp, rank, solver):
    """on_start: rank 1 sends itself SIGINT after its first update (as Ctrl-C would, which reaches
    every rank); both ranks record their snapshot calls and where they stopped."""
    import signal

    _record(tmp, rank, solver)
    if rank == 1:
        solver.add_callback(on_start=lambda: solver.iter == 1 and os.kill(os.getpid(), signal.SIGINT))


def _stopped_at(tmp, rank, solver):
    with open(os.path.join(tmp, f"stopped{rank}.txt"), "w") as f:
        f.write(str(solver.iter))


@pytest.mark.parametrize("effect", ["stop", "snapshot"])
def test_a_signal_to_one_rank_is_acted_on_by_all_at_the_same_iteration(tmp_path, effect):
    g = np.random.default_rng(4)
    n = WORLD * B
    db = str(tmp_path / "lmdb")
    _write_db(db, g.normal(size=(n, 6)).astype(np.float32), g.integers(0, 3, n), range(n))
    net = tmp_path / "net.prototxt"
    net.write_text(NET % (db, B))
    tmp = str(tmp_path)
    param = _solver(str(net), max_iter=4, snapshot_prefix=str(tmp_path / "sig"))
    train_data_parallel(param, ["cpu"] * WORLD, on_start=functools.partial(_signal_self_at_iter_1, tmp),
                        on_finish=functools.partial(_stopped_at, tmp), timeout_s=60, sigint_effect=effect)
    stopped = [int(open(os.path.join(tmp, f"stopped{r}.txt")).read()) for r in range(WORLD)]
    if effect == "stop":
        assert stopped == [2, 2]  # the signal came during iteration 1: both stop after it
        assert _events(tmp, 0) == []
    else:
        assert stopped == [4, 4]  # training goes on
        assert _events(tmp, 0) == ["snapshot 2"]  # the root snapshots after the signalled iteration
        assert (tmp_path / "sig_iter_2.caffemodel").exists()
    assert _events(tmp, 1) == []  # never a non-root rank
