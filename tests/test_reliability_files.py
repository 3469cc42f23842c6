"""Issue 12, files, databases and snapshots: damaged or hostile inputs become errors naming the
file, layer or setting, and nothing is lost (see docs/reliability.md)."""
import os
import signal
import stat
import threading

import h5py
import numpy as np
import pytest
import torch

from recaffe.data.db import NEW, READ, DBError, open_db
from recaffe.data.image_mean import compute_image_mean
from recaffe.data.lmdb_check import LMDBFileError, check_lmdb_file
from recaffe.gradient_check import make_layer
from recaffe.io.protofiles import ProtoFileError, atomic_target, parse_text
from recaffe.layer import LayerError
from recaffe.net import Net, WeightsError
from recaffe.proto import caffe_pb2
from recaffe.solvers import SolverError, create_solver
from recaffe.solvers import solver as solver_module
from recaffe.solvers.sgd import SGDSolver

TEST = caffe_pb2.TEST
PAGE = 4096


# ------------------------------------------------------------------------------ fixtures
def write_lmdb(path, n=300, size=200):
    """An LMDB as convert_imageset writes one: n Datums of `size` bytes under keys %08d."""
    db = open_db("lmdb", path, NEW)
    txn = db.new_transaction()
    for i in range(n):
        d = caffe_pb2.Datum(channels=1, height=1, width=size, data=bytes([i % 256]) * size, label=i)
        txn.put(b"%08d" % i, d.SerializeToString())
    txn.commit()
    db.close()
    return str(path)


def data_layer(source, batch=4):
    text = (f'name: "mnist" type: "Data" data_param {{ source: "{source}" batch_size: {batch} '
            f'backend: LMDB }}')
    return make_layer(text, [], num_tops=2, dtype=torch.float32, phase=TEST)


def zero_page(source, page):
    with open(os.path.join(source, "data.mdb"), "r+b") as f:
        f.seek(page * PAGE)
        f.write(bytes(PAGE))


@pytest.fixture
def fifo(tmp_path):
    """A FIFO nobody writes to. Should a reader block on it, a timer opens and closes its write end
    after 10 s, so the test fails instead of hanging."""
    path = str(tmp_path / "fifo")
    os.mkfifo(path)

    def unblock():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    timer = threading.Timer(10, unblock)
    timer.start()
    yield path
    timer.cancel()


NET = """name: "tiny"
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "y" type: "Input" top: "y" input_param { shape { dim: 4 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "o"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "o" bottom: "y" top: "loss" }
"""


def solver(settings=""):
    text = f"net_param {{ {NET} }} random_seed: 7 base_lr: 0.1 momentum: 0.9 lr_policy: \"fixed\" " + settings
    s = create_solver(parse_text(text, caffe_pb2.SolverParameter()))
    rng = np.random.default_rng(0)
    s.net.blobs["x"].data[...] = rng.normal(size=(4, 3))
    s.net.blobs["y"].data[...] = rng.normal(size=(4, 2))
    return s


def tiny_net():
    return Net(parse_text(NET, caffe_pb2.NetParameter()), TEST)


# ------------------------------------------------------------------- 1. damaged LMDBs
def test_a_truncated_lmdb_is_refused_before_it_is_mapped(tmp_path):
    src = write_lmdb(tmp_path / "db")
    data = os.path.join(src, "data.mdb")
    full = os.path.getsize(data)
    os.truncate(data, full - PAGE)  # whole pages, fewer than the last commit uses
    with pytest.raises(DBError, match=f"LMDB '{src}'.*last commit uses {full // PAGE} pages.*truncated"):
        open_db("lmdb", src, READ)
    os.truncate(data, 3 * PAGE - 100)
    with pytest.raises(DBError, match="not a whole number of 4096-byte pages"):
        open_db("lmdb", src, READ)
    with pytest.raises(LayerError, match=f"'mnist'.*LMDB '{src}'.*truncated"):
        data_layer(src)


def test_lmdb_meta_page_checks(tmp_path):
    src = write_lmdb(tmp_path / "db")
    data = os.path.join(src, "data.mdb")
    check_lmdb_file(data)  # a whole database passes
    with open(data, "r+b") as f:
        f.seek(40)  # the page size, in the first meta page's free-list record
        f.write((3000).to_bytes(4, "little"))
    with pytest.raises(LMDBFileError, match="page size 3000 is not a power of two"):
        check_lmdb_file(data)
    with open(data, "r+b") as f:
        f.seek(16)
        f.write(b"\0\0\0\0")
    with pytest.raises(LMDBFileError, match="not an LMDB file"):
        check_lmdb_file(data)


@pytest.mark.parametrize("page", [2, 10])
def test_a_zeroed_page_is_an_error_naming_the_database(tmp_path, page):
    """liblmdb aborts the process on such pages (Assertion 'IS_LEAF(mp)' failed) or raises a
    CorruptedError; either way this process gets a DBError naming the database."""
    src = write_lmdb(tmp_path / "db")
    zero_page(src, page)
    with pytest.raises(DBError, match=f"LMDB '{src}': .*(corrupt|Corrupted)") as e:
        db = open_db("lmdb", src, READ)
        list(db.new_cursor())
    if page == 10:  # a leaf in the middle: the reader process was killed by liblmdb's assert
        assert "SIGABRT" in str(e.value) and "IS_LEAF" in str(e.value)
    with pytest.raises(LayerError, match=f"'mnist'.*LMDB '{src}'"):
        layer, bottom, top = data_layer(src, batch=300)
        layer.run_forward(bottom, top)
    with pytest.raises(DBError, match=f"LMDB '{src}'"):
        compute_image_mean(src, "lmdb")


def test_truncated_while_read_kills_only_the_reader_process(tmp_path):
    """A file cut after it was opened raises SIGBUS where it is mapped: in the reader process."""
    src = write_lmdb(tmp_path / "db", n=3000, size=100)
    db = open_db("lmdb", src, READ)
    cursor = db.new_cursor()
    os.truncate(os.path.join(src, "data.mdb"), 4 * PAGE)
    with pytest.raises(DBError, match=f"LMDB '{src}'.*reader process was killed by SIGBUS"):
        while cursor.valid():
            cursor.next()
    db.close()


def test_records_across_chunks_come_in_order(tmp_path, monkeypatch):
    """The reader sends records in chunks; seeking back while a chunk is on its way is exact."""
    src = write_lmdb(tmp_path / "db", n=2500, size=10)
    db = open_db("lmdb", src, READ)
    assert len(db) == 2500
    cursor = db.new_cursor()
    keys = []
    for _ in range(1500):  # into the second chunk: the third is being read ahead
        keys.append(cursor.key())
        cursor.next()
    cursor.seek_to_first()
    keys.extend(k for k, _ in cursor)
    cursor.close()
    db.close()
    expected = [b"%08d" % i for i in range(2500)]
    assert keys == expected[:1500] + expected


# --------------------------------------------------- 3. HDF5 weights, states and data
def weights_file(path, make):
    with h5py.File(path, "w") as f:
        make(f.create_group("data").create_group("ip"))
    return str(path)


def test_hdf5_weights_with_external_storage_are_refused(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(np.arange(6, dtype="f4").tobytes())
    path = weights_file(tmp_path / "w.caffemodel.h5", lambda g: g.create_dataset(
        "0", shape=(2, 3), dtype="f4", external=[(str(secret), 0, 24)]))
    net = tiny_net()
    before = net.params["ip"][0].data.copy()
    with pytest.raises(WeightsError, match="data/ip/0.*external files.*secret.*refused"):
        net.copy_from(path)
    np.testing.assert_array_equal(net.params["ip"][0].data, before)


def test_hdf5_virtual_datasets_and_external_links_are_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["w"] = np.ones((2, 3), "f4")

    def virtual(g):
        layout = h5py.VirtualLayout(shape=(2, 3), dtype="f4")
        layout[...] = h5py.VirtualSource(str(other), "w", shape=(2, 3))
        g.create_virtual_dataset("0", layout)
    with pytest.raises(WeightsError, match="data/ip/0.*virtual dataset"):
        tiny_net().copy_from(weights_file(tmp_path / "v.h5", virtual))
    path = tmp_path / "l.h5"
    with h5py.File(path, "w") as f:
        f.create_group("data")["ip"] = h5py.ExternalLink(str(other), "/")
    with pytest.raises(WeightsError, match="data/ip: a ExternalLink"):
        tiny_net().copy_from(str(path))


def test_hdf5_shapes_are_checked_before_reading(tmp_path):
    """A few KB of file declaring a 40 GB dataset: refused by its shape, never read."""
    path = weights_file(tmp_path / "big.h5",
                        lambda g: g.create_dataset("0", shape=(100000, 100000), dtype="f4"))
    assert os.path.getsize(path) < 10000
    with pytest.raises(WeightsError,
                       match=r"Source param shape is \(100000, 100000\); target param shape is \(2, 3\)"):
        tiny_net().copy_from(path)
    s = solver('snapshot_format: HDF5 snapshot_prefix: "%s"' % (tmp_path / "s"))
    state = s.snapshot()
    with h5py.File(state, "a") as f:
        del f["history/0"]
        f["history"].create_dataset("0", shape=(100000, 100000), dtype="f4")
    with pytest.raises(SolverError, match=r"history blob 0 has shape \(100000, 100000\).*\(2, 3\)"):
        solver().restore(state)


def hdf5_data_layer(tmp_path, make):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        make(f)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{path}\n")
    return make_layer(f'name: "h" type: "HDF5Data" top: "data" hdf5_data_param {{ source: "{listing}" '
                      f'batch_size: 2 }}', [], num_tops=1)


def test_hdf5_data_refuses_declared_but_unstored_and_external_data(tmp_path):
    with pytest.raises(LayerError,
                       match=r"'h'.*dataset 'data': declares shape \(1000000, 1000\) .* stores 0 bytes"):
        hdf5_data_layer(tmp_path, lambda f: f.create_dataset("data", shape=(1000000, 1000), dtype="f4"))
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(32))
    with pytest.raises(LayerError, match="'h'.*dataset 'data'.*external files"):
        hdf5_data_layer(tmp_path, lambda f: f.create_dataset("data", shape=(2, 4), dtype="f4",
                                                             external=[(str(secret), 0, 32)]))
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.ones((2, 4), "f4")
    with pytest.raises(LayerError, match="'h'.*dataset 'data' is a ExternalLink"):
        hdf5_data_layer(tmp_path, lambda f: f.__setitem__("data", h5py.ExternalLink(str(other), "/data")))
    # Compressed data stores fewer bytes than it holds, within what deflate can do: accepted.
    layer, _, top = hdf5_data_layer(tmp_path, lambda f: f.create_dataset(
        "data", data=np.zeros((64, 100), "f4"), compression="gzip", chunks=(64, 100)))
    assert top[0].shape == (2, 100)


# --------------------------------------------------------------- 6. snapshot prefix
def test_snapshot_prefix_is_checked_at_solver_init(tmp_path):
    with pytest.raises(SolverError,
                       match=f"snapshot prefix '{tmp_path}/missing/snap' \\(needed by snapshot\\)"):
        solver(f'snapshot: 10 snapshot_prefix: "{tmp_path}/missing/snap"')
    (tmp_path / "file").write_text("")
    with pytest.raises(SolverError, match="needed by snapshot.*Not a directory"):
        solver(f'snapshot: 10 snapshot_prefix: "{tmp_path}/file/snap"')
    assert sorted(os.listdir(tmp_path)) == ["file"]  # the probe is gone


def test_snapshot_after_train_prefix_is_checked_before_training(tmp_path):
    s = solver(f'max_iter: 5 snapshot_prefix: "{tmp_path}/missing/snap"')  # snapshot: 0
    with pytest.raises(SolverError, match="missing/snap' \\(needed by snapshot_after_train\\)"):
        s.solve()
    assert s.iter == 0
    s.param.snapshot_after_train = False
    s.solve()
    assert s.iter == 5


# ------------------------------------------------------- 7. durable, clean snapshots
def test_stale_snapshot_temporaries_are_removed_and_live_ones_kept(tmp_path):
    import fcntl

    stale = ["snap_iter_5.caffemodel.a1b2c3d4.tmp", "snap_iter_5.solverstate.h5.x_Y9z0k1.tmp",
             "snap_iter_0.probe.abcdefgh.tmp"]
    others = ["snap_iter_5.caffemodel", "snap_iter_5.caffemodel.short.tmp", "notes.tmp",
              "other_iter_5.caffemodel.a1b2c3d4.tmp", "snapx_iter_5.caffemodel.a1b2c3d4.tmp"]
    live = "snap_iter_6.caffemodel.livelive.tmp"
    for name in stale + others + [live]:
        (tmp_path / name).write_bytes(b"partial")
    fd = os.open(tmp_path / live, os.O_RDONLY)  # a writer that is still alive holds its flock
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        solver(f'snapshot_prefix: "{tmp_path}/snap"')
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == sorted(others + [live])


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_snapshot_files_and_folder_are_fsynced(tmp_path, monkeypatch, fmt):
    s = solver(f'snapshot_prefix: "{tmp_path}/snap" snapshot_format: {fmt}')
    synced = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        names = {e.name for e in os.scandir(tmp_path)}
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        synced.append((kind, sorted(n for n in names if "iter" in n)))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    s.step(1)
    s.snapshot()
    ext = ".h5" if fmt == "HDF5" else ""
    model, state = f"snap_iter_1.caffemodel{ext}", f"snap_iter_1.solverstate{ext}"
    kinds = [k for k, _ in synced]
    assert kinds == ["file", "dir", "file", "dir"]
    # Each folder fsync comes after its file's rename.
    assert model in synced[1][1] and state not in synced[1][1] and state in synced[3][1]
    assert sorted(os.listdir(tmp_path)) == sorted([model, state])


def test_a_failed_atomic_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.caffemodel"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_target(target) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["out.caffemodel"] and target.read_bytes() == b"old"


# ------------------------------------------------------------------ 8. Ctrl-C in step
def interrupt_inside_update(s):
    """SIGINT raised after the history is updated and before the weights are."""
    real_update = s.net.update

    def update():
        signal.raise_signal(signal.SIGINT)
        real_update()
    s.net.update = update


def test_ctrl_c_during_the_update_lands_after_it():
    reference = solver()
    reference.step(1)
    s = solver()
    interrupt_inside_update(s)
    with pytest.raises(KeyboardInterrupt):
        s.step(3)
    assert s.iter == 1
    for a, b in zip(s.net.learnable_params, reference.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)
    for a, b in zip(s.history, reference.history):
        np.testing.assert_array_equal(a.data, b.data)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_deferral_the_same_interrupt_tears_the_update(monkeypatch):
    """The test above can fail: the interrupt it sends would otherwise land mid-update."""
    import contextlib

    monkeypatch.setattr(solver_module, "deferred_interrupts", contextlib.nullcontext)
    fresh = solver()
    s = solver()
    interrupt_inside_update(s)
    with pytest.raises(KeyboardInterrupt):
        s.step(3)
    assert s.iter == 0
    assert np.any(s.history[0].data != 0)  # history updated, weights not:
    np.testing.assert_array_equal(s.net.learnable_params[0].data, fresh.net.learnable_params[0].data)


# ---------------------------------------------------------------- 9. non-regular files
def test_fifos_and_devices_are_refused_by_name(tmp_path, fifo):
    with pytest.raises(ProtoFileError, match=f"{fifo}: is a FIFO, not a regular file"):
        Net(fifo, TEST)
    with pytest.raises(ProtoFileError, match="/dev/zero: is a character device"):
        Net("/dev/zero", TEST)
    with pytest.raises(ProtoFileError, match=f"{tmp_path}: is a directory"):
        Net(str(tmp_path), TEST)
    net = tiny_net()
    for weights in (fifo, "/dev/zero"):
        with pytest.raises(ProtoFileError, match=f"{weights}: is a .*not a regular file"):
            net.copy_from(weights)
    s = solver()
    for state in (fifo, fifo + ".h5"):
        if state != fifo:
            os.mkfifo(state)
        with pytest.raises((ProtoFileError, SolverError), match=f"{state}: is a FIFO"):
            s.restore(state)
    with pytest.raises(ProtoFileError, match=f"{fifo}: is a FIFO"):
        SGDSolver(fifo)


def test_fifo_means_and_lists_are_refused(tmp_path, fifo):
    with pytest.raises(LayerError, match=f"{fifo}: is a FIFO"):
        make_layer(f'name: "img" type: "ImageData" image_data_param {{ source: "{fifo}" batch_size: 1 }}',
                   [], num_tops=2)
    with pytest.raises(LayerError, match=f"'h'.*{fifo}: is a FIFO"):
        make_layer(f'name: "h" type: "HDF5Data" top: "data" '
                   f'hdf5_data_param {{ source: "{fifo}" batch_size: 1 }}', [], num_tops=1)
    src = write_lmdb(tmp_path / "db", n=2, size=4)
    with pytest.raises(LayerError, match=f"'mnist'.*{fifo}: is a FIFO"):
        make_layer(f'name: "mnist" type: "Data" transform_param {{ mean_file: "{fifo}" }} '
                   f'data_param {{ source: "{src}" batch_size: 1 backend: LMDB }}', [], num_tops=2)


# ----------------------------------------------------------------------- 10. HDF5Output
def hdf5_output(path):
    return make_layer(f'name: "out" type: "HDF5Output" bottom: "a" bottom: "b" '
                      f'hdf5_output_param {{ file_name: "{path}" }}', [np.ones((2, 3)), np.zeros(2)],
                      num_tops=0)


def test_hdf5_output_never_replaces_a_file_that_is_not_hdf5(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(LayerError, match=f"'out'.*file_name '{notes}' exists and is not an HDF5 file"):
        hdf5_output(notes)
    assert notes.read_text() == "precious"
    with pytest.raises(LayerError, match="exists and is a directory"):
        hdf5_output(tmp_path)
    # Created between setup and the first forward: still refused, still intact.
    late = tmp_path / "late.h5"
    layer, bottom, _ = hdf5_output(late)
    assert not late.exists()  # nothing is written when the net is built
    late.write_text("precious")
    with pytest.raises(LayerError, match="'out'.*exists and is not an HDF5 file"):
        layer.run_forward(bottom, [])
    assert late.read_text() == "precious"
    # A previous output (HDF5) is replaced at the first forward.
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:
        f["data"] = np.zeros(1)
    layer, bottom, _ = hdf5_output(old)
    layer.run_forward(bottom, [])
    with h5py.File(old) as f:
        assert f["data"].shape == (2, 3, 1, 1)
