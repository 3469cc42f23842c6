"""HDF5Data and HDF5Output against files written and read with h5py in tmp_path."""
import math

import h5py
import numpy as np
import pytest
import torch

from recaffe.gradient_check import make_layer
from recaffe.io.protofiles import parse_text
from recaffe.layer import LayerError
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver


def h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return str(path)


def listing(tmp_path, files, name="list.txt"):
    path = tmp_path / name
    path.write_text("\n".join(files) + "\n")
    return str(path)


def hdf5_data(source, batch_size, tops=("data", "label"), extra="", seed=1701, more=""):
    text = (f'name: "h5" type: "HDF5Data" {"".join(f"top: {t!r} " for t in tops)} {more} '
            f'hdf5_data_param {{ source: "{source}" batch_size: {batch_size} {extra} }}')
    return make_layer(text, [], num_tops=len(tops), dtype=torch.float32, seed=seed)


def forwards(layer, top, n):
    out = []
    for _ in range(n):
        layer.run_forward([], top)
        out.append([t.data.copy() for t in top])
    return out


@pytest.fixture
def two_files(tmp_path):
    rng = np.random.default_rng(0)
    d0, d1 = rng.normal(size=(3, 2, 3)), rng.normal(size=(5, 2, 3))  # float64 in the files
    l0, l1 = np.arange(3, dtype=np.int32), np.arange(10, 15, dtype=np.int64)
    files = [h5(tmp_path / "a.h5", data=d0, label=l0), h5(tmp_path / "b.h5", data=d1, label=l1)]
    source = listing(tmp_path, files)
    return source, np.concatenate([d0, d1]), np.concatenate([l0, l1])


def test_hdf5_data_rows_in_order_across_files_and_wrap_around(two_files):
    source, data, labels = two_files
    layer, _, top = hdf5_data(source, 3)
    assert top[0].shape == (3, 2, 3) and top[1].shape == (3,)
    order = np.arange(3 * 6) % 8  # 8 rows in all: a.h5 then b.h5, then again
    for i, (d, lab) in enumerate(forwards(layer, top, 6)):
        rows = order[3 * i:3 * i + 3]
        assert d.dtype == np.float32
        np.testing.assert_array_equal(d, data[rows].astype(np.float32))  # read as the net's float
        np.testing.assert_array_equal(lab, labels[rows])


def test_hdf5_data_any_number_of_tops_named_by_dataset(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    source = listing(tmp_path, [h5(tmp_path / "x.h5", x=x, y=-x, z=np.ones(4))])
    layer, _, top = hdf5_data(source, 2, tops=("y",))
    (y,), = forwards(layer, top, 1)
    np.testing.assert_array_equal(y, -x[:2])


def sequence(source, seed, n=4, shuffle=True):
    layer, _, top = hdf5_data(source, 4, extra=f"shuffle: {str(shuffle).lower()}", seed=seed)
    return [tuple(int(v) for v in lab) for _, lab in forwards(layer, top, n)]


def test_hdf5_data_shuffle_is_seeded(two_files):
    source, _, labels = two_files
    a = sequence(source, seed=5)
    assert a == sequence(source, seed=5)
    assert a != sequence(source, seed=6)
    # Rows are shuffled within a file and files are read whole: each file's rows come together.
    flat = [v for batch in a for v in batch]
    for epoch in (flat[:8], flat[8:16]):
        assert sorted(epoch) == sorted(labels.tolist())
        first = set(epoch[:3]) if epoch[0] < 10 else set(epoch[:5])
        assert first in ({0, 1, 2}, {10, 11, 12, 13, 14})
    assert sequence(source, seed=5, shuffle=False)[:2] == [(0, 1, 2, 10), (11, 12, 13, 14)]


def test_hdf5_data_errors(tmp_path, two_files):
    source, _, _ = two_files
    with pytest.raises(LayerError, match="'h5'.*Failed to open source file.*nolist.txt"):
        hdf5_data(str(tmp_path / "nolist.txt"), 2)
    with pytest.raises(LayerError, match="at least 1 HDF5 filename.*empty.txt"):
        hdf5_data(listing(tmp_path, [""], "empty.txt"), 2)
    with pytest.raises(LayerError, match="Failed opening HDF5 file.*missing.h5.*no such file"):
        hdf5_data(listing(tmp_path, [str(tmp_path / "missing.h5")], "m.txt"), 2)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(LayerError, match="Failed opening HDF5 file.*text.h5"):
        hdf5_data(listing(tmp_path, [str(tmp_path / "text.h5")], "t.txt"), 2)
    no_label = h5(tmp_path / "nolabel.h5", data=np.zeros((2, 3)))
    with pytest.raises(LayerError, match=r"nolabel.h5: Failed to find HDF5 dataset 'label'"):
        hdf5_data(listing(tmp_path, [no_label], "nl.txt"), 2)
    rows = h5(tmp_path / "rows.h5", data=np.zeros((3, 2)), label=np.zeros(4))
    with pytest.raises(LayerError, match=r"rows.h5: dataset 'label' has 4 rows but 'data' has 3"):
        hdf5_data(listing(tmp_path, [rows], "r.txt"), 2)
    wide = h5(tmp_path / "wide.h5", data=np.zeros((2, 2, 4)), label=np.zeros(2))
    layer, _, top = hdf5_data(listing(tmp_path, [source.replace("list.txt", "a.h5"), wide], "w.txt"), 2)
    forwards(layer, top, 1)
    with pytest.raises(LayerError, match=r"wide.h5: dataset 'data' has rows of shape \(2, 4\)"):
        forwards(layer, top, 1)
    with pytest.raises(LayerError, match="does not transform data"):
        hdf5_data(source, 2, more="transform_param { scale: 2 }")


def output_layer(path):
    return (f'name: "out" type: "HDF5Output" bottom: "a" bottom: "b" '
            f'hdf5_output_param {{ file_name: "{path}" }}')


def test_hdf5_output_round_trip(tmp_path):
    path = tmp_path / "out.h5"
    data = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    label = np.array([1, 0, 2], np.float32)
    layer, bottom, _ = make_layer(output_layer(path), [data, label], num_tops=0, dtype=torch.float32)
    assert not path.exists()  # written by the first forward (Caffe creates it at setup)
    layer.run_forward(bottom, [])
    with h5py.File(path, "r") as f:
        assert f["data"].dtype == np.float32 and f["data"].shape == (3, 4, 1, 1)  # legacy 4-D
        np.testing.assert_array_equal(f["data"][...].reshape(3, 4), data)
        np.testing.assert_array_equal(f["label"][...].reshape(3), label)
        assert f["label"].shape == (3, 1, 1, 1)
    # Read back through HDF5Data: the datasets are the tops.
    layer2, _, top = hdf5_data(listing(tmp_path, [str(path)]), 3)
    (d, lab), = forwards(layer2, top, 1)
    np.testing.assert_array_equal(d.reshape(3, 4), data)
    np.testing.assert_array_equal(lab.reshape(3), label)
    # Caffe's HDF5Output writes its datasets once; a second batch is an error, not an overwrite.
    with pytest.raises(LayerError, match="'out'.*out.h5.*first forward"):
        layer.run_forward(bottom, [])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["data"][...].reshape(3, 4), data)


def test_hdf5_output_errors(tmp_path):
    layer, bottom, _ = make_layer(output_layer(tmp_path / "x.h5"), [np.zeros((2, 3)), np.zeros(3)],
                                  num_tops=0)
    with pytest.raises(LayerError, match="data blob and label blob must have the same batch size"):
        layer.run_forward(bottom, [])
    with pytest.raises(LayerError, match="Failed to open HDF5 file.*nodir"):
        make_layer(output_layer(tmp_path / "nodir" / "x.h5"), [np.zeros((2, 3)), np.zeros(2)], num_tops=0)
    with pytest.raises(LayerError, match="exactly 2 bottom"):
        make_layer(f'type: "HDF5Output" hdf5_output_param {{ file_name: "{tmp_path / "y.h5"}" }}',
                   [np.zeros(2)], num_tops=0)


SOLVER = """
net_param {
  name: "tiny"
  layer { name: "d" type: "HDF5Data" top: "data" top: "label"
          hdf5_data_param { source: "%s" batch_size: 8 shuffle: true } }
  layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
          inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.01 } } }
  layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
}
base_lr: 0.5 lr_policy: "fixed" momentum: 0.9 display: 0 random_seed: 1 snapshot_prefix: "%s"
"""


def test_tiny_net_trains_from_hdf5_data(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.float32)
    halves = [slice(0, 16), slice(16, 32)]
    files = [h5(tmp_path / f"p{i}.h5", data=x[s], label=y[s]) for i, s in enumerate(halves)]
    source = listing(tmp_path, files)
    solver = create_solver(parse_text(SOLVER % (source, tmp_path / "snap"), caffe_pb2.SolverParameter()))
    losses = []
    for _ in range(30):
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


@pytest.mark.parametrize("rank", [0, 1])
def test_hdf5_data_solver_r_of_n_reads_rows_r_r_plus_n(two_files, rank):
    """Caffe 1.0's HDF5DataLayer::Skip in multi-GPU training: solver r of 2 keeps the rows at stream
    positions r, r+2, ... (across files and wrap-around); TEST layers keep every row."""
    from recaffe.parallel import set_solver_rank

    source, data, labels = two_files
    set_solver_rank(rank, 2)
    try:
        layer, _, top = hdf5_data(source, 3)
        text = (f'name: "h5" type: "HDF5Data" top: "data" top: "label" '
                f'hdf5_data_param {{ source: "{source}" batch_size: 3 }}')
        test_layer, _, test_top = make_layer(text, [], num_tops=2, dtype=torch.float32, phase=caffe_pb2.TEST)
    finally:
        set_solver_rank(0, 1)
    stream = np.arange(40) % 8  # 8 rows: a.h5 then b.h5, then again
    mine = stream[rank::2]
    for i, (d, lab) in enumerate(forwards(layer, top, 4)):
        np.testing.assert_array_equal(lab, labels[mine[3 * i:3 * i + 3]])
        np.testing.assert_array_equal(d, data[mine[3 * i:3 * i + 3]].astype(np.float32))
    (d, lab), = forwards(test_layer, test_top, 1)
    np.testing.assert_array_equal(lab, labels[:3])  # TEST: every row, whatever the rank
