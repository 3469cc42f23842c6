"""convert_mnist_data: IDX files written here -> LMDB/LevelDB of Datums as Caffe's tool writes them."""
import gzip
import runpy
import struct
import sys

import numpy as np
import pytest
from conftest import require_shared

from recaffe.cli.convert_mnist_data import main
from recaffe.data.db import open_db
from recaffe.data.mnist import MnistFormatError, read_images, read_labels
from recaffe.proto import caffe_pb2


def write_idx(tmp_path, images, labels, *, gz=False, image_magic=2051, label_magic=2049, n_labels=None):
    n, rows, cols = images.shape
    img = struct.pack(">IIII", image_magic, n, rows, cols) + images.astype(np.uint8).tobytes()
    lab = struct.pack(">II", label_magic, len(labels) if n_labels is None else n_labels) \
        + np.asarray(labels, np.uint8).tobytes()
    suffix = ".gz" if gz else ""
    ip, lp = tmp_path / f"images-idx3-ubyte{suffix}", tmp_path / f"labels-idx1-ubyte{suffix}"
    ip.write_bytes(gzip.compress(img) if gz else img)
    lp.write_bytes(gzip.compress(lab) if gz else lab)
    return str(ip), str(lp)


def read_db(path, backend="lmdb"):
    db = open_db(backend, path)
    records = [(k, caffe_pb2.Datum.FromString(v)) for k, v in db.new_cursor()]
    db.close()
    return records


def sample(n=5, rows=3, cols=4):
    g = np.random.default_rng(0)
    return g.integers(0, 256, (n, rows, cols), dtype=np.uint8), g.integers(0, 10, n).astype(np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_convert_lmdb_records_match_caffe_layout(tmp_path, gz):
    imgs, labels = sample()
    ip, lp = write_idx(tmp_path, imgs, labels, gz=gz)
    out = tmp_path / "out_lmdb"
    assert main([ip, lp, str(out)]) == 0
    records = read_db(out)
    assert [k for k, _ in records] == [b"%08d" % i for i in range(5)]
    for i, (_, d) in enumerate(records):
        assert (d.channels, d.height, d.width, d.label, d.encoded) == (1, 3, 4, labels[i], False)
        assert d.data == imgs[i].tobytes() and len(d.float_data) == 0
    # Byte layout of Caffe's serialized Datum: fields 1,2,3,4,5 in order, label always present.
    raw = open_db("lmdb", out).new_cursor().value()
    head = bytes([0x08, 1, 0x10, 3, 0x18, 4, 0x22, 12])
    assert raw == head + imgs[0].tobytes() + bytes([0x28, int(labels[0])])


@pytest.mark.parametrize("flags", [["-backend=leveldb"], ["--backend=leveldb"], ["--backend", "leveldb"]])
def test_convert_leveldb_flag_spellings(tmp_path, flags):
    imgs, labels = sample(3)
    ip, lp = write_idx(tmp_path, imgs, labels)
    out = str(tmp_path / "out_leveldb")
    assert main(flags + [ip, lp, out]) == 0
    records = read_db(out, "leveldb")
    assert [d.label for _, d in records] == list(labels)
    assert records[2][1].data == imgs[2].tobytes()


def test_label_is_a_signed_char_as_in_caffe(tmp_path):
    imgs, _ = sample(2)
    ip, lp = write_idx(tmp_path, imgs, [200, 7])
    assert main([ip, lp, str(tmp_path / "db")]) == 0
    assert [d.label for _, d in read_db(tmp_path / "db")] == [200 - 256, 7]


def test_commits_in_chunks_of_1000(tmp_path):
    imgs = np.zeros((1001, 1, 1), np.uint8)
    ip, lp = write_idx(tmp_path, imgs, np.arange(1001) % 10)
    assert main([ip, lp, str(tmp_path / "db")]) == 0
    db = open_db("lmdb", tmp_path / "db")
    assert len(db) == 1001
    db.close()


def test_bad_magic_names_the_file(tmp_path, capsys):
    imgs, labels = sample()
    ip, lp = write_idx(tmp_path, imgs, labels, image_magic=2049)
    assert main([ip, lp, str(tmp_path / "db")]) == 1
    err = capsys.readouterr().err
    assert ip in err and "Incorrect image file magic: 2049" in err
    assert not (tmp_path / "db").exists()
    ip, lp = write_idx(tmp_path, imgs, labels, label_magic=7)
    with pytest.raises(MnistFormatError, match=f"{lp}: Incorrect label file magic"):
        read_labels(lp)


def test_count_mismatch_and_truncation(tmp_path, capsys):
    imgs, labels = sample(4)
    ip, lp = write_idx(tmp_path, imgs, labels[:3])
    assert main([ip, lp, str(tmp_path / "db")]) == 1
    assert "4 images but" in capsys.readouterr().err
    ip, lp = write_idx(tmp_path, imgs, labels)
    with open(ip, "rb+") as f:
        f.truncate(20)
    with pytest.raises(MnistFormatError, match="truncated"):
        read_images(ip)


def test_refuses_existing_output_and_bad_usage(tmp_path, capsys):
    imgs, labels = sample(2)
    ip, lp = write_idx(tmp_path, imgs, labels)
    (tmp_path / "db").mkdir()
    assert main([ip, lp, str(tmp_path / "db")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main([ip, lp]) == 1
    assert "Usage" in capsys.readouterr().err
    assert main(["--backend=sqlite", ip, lp, str(tmp_path / "x")]) == 1
    assert "Unknown db backend" in capsys.readouterr().err
    assert main(["--frobnicate", ip, lp, str(tmp_path / "x")]) == 1
    assert main([ip, str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "Unable to open file" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_runs_as_a_module(tmp_path, monkeypatch, capsys):
    """``python -m recaffe.cli.convert_mnist_data`` (run in-process: a subprocess would pay torch's
    import time)."""
    imgs, labels = sample(2)
    ip, lp = write_idx(tmp_path, imgs, labels)
    monkeypatch.setattr(sys, "argv", ["convert_mnist_data", ip, lp, str(tmp_path / "db")])
    monkeypatch.delitem(sys.modules, "recaffe.cli.convert_mnist_data", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("recaffe.cli.convert_mnist_data", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 0
    assert len(read_db(tmp_path / "db")) == 2


def test_mnist_sample_converts(tmp_path):
    folder = require_shared("mnist")
    ip, lp = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
    assert main([str(ip), str(lp), str(tmp_path / "db")]) == 0
    imgs, labels = read_images(ip), read_labels(lp)
    db = open_db("lmdb", tmp_path / "db")
    assert len(db) == len(imgs) == 2000
    cur = db.new_cursor()
    first = caffe_pb2.Datum.FromString(cur.value())
    db.close()
    assert (first.height, first.width) == (28, 28) and first.data == imgs[0].tobytes()
    assert first.label == labels[0]
