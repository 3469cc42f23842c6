"""Training logs -> tables (Caffe's parse_log.py) and charts (plot_training_log): the real Caffe's
LeNet log in both glog formats, our own solver's log, year/midnight handling, CSV files, errors."""
import csv
import datetime
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import require_reference
from recaffe.cli import main as cli_main
from recaffe.io.protofiles import parse_text
from recaffe.log import GlogFormatter
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver
from recaffe.training_log import TrainingLogError, csv_text, parse_log

STAMP = re.compile(r"^I(\d{8}|\d{4}) (\d\d:\d\d:\d\d\.\d{6}) ")


def stamp_time(line: str) -> datetime.datetime:
    """The time of a new-format (with year) glog line, read independently of the parser."""
    date, clock = STAMP.match(line).groups()
    return datetime.datetime.strptime(date + " " + clock, "%Y%m%d %H:%M:%S.%f")


def grep(lines, pattern):
    return [m for m in (re.search(pattern, line) for line in lines) if m]


@pytest.fixture
def lenet_logs():
    return (require_reference("lenet", "train.log"), require_reference("lenet", "train_glog_classic.log"))


def test_lenet_log_rows_match_the_log_text(lenet_logs):
    lines = lenet_logs[0].read_text().splitlines()
    train, test = parse_log(lenet_logs[0])

    # one train row per display (an "Iteration N (...)" line followed by the train outputs)
    displays = grep(lines, r"Iteration (\d+) \(")
    train_losses = grep(lines, r"Train net output #0: loss = (\S+)")
    assert len(train) == len(train_losses) == 20
    assert [r["NumIters"] for r in train] == [float(m.group(1)) for m in displays][:20]
    assert [r["loss"] for r in train] == [float(m.group(1)) for m in train_losses]
    assert list(train[0]) == ["NumIters", "Seconds", "LearningRate", "loss"]

    accuracies = grep(lines, r"Test net output #0: accuracy = (\S+)")
    test_losses = grep(lines, r"Test net output #1: loss = (\S+)")
    tests_at = grep(lines, r"Iteration (\d+), Testing net")
    assert len(test) == len(accuracies) == 5
    assert [r["NumIters"] for r in test] == [float(m.group(1)) for m in tests_at]
    assert [r["NumIters"] for r in test] == [0, 500, 1000, 1500, 2000]
    assert [r["accuracy"] for r in test] == [float(m.group(1)) for m in accuracies]
    assert [r["loss"] for r in test] == [float(m.group(1)) for m in test_losses]

    # Seconds: from the "Solving" line to the row's first output line
    start = stamp_time(next(line for line in lines if "] Solving " in line))
    train_times = [stamp_time(line) for line in lines if "Train net output #0" in line]
    test_times = [stamp_time(line) for line in lines if "Test net output #0" in line]
    assert [r["Seconds"] for r in train] == pytest.approx([(t - start).total_seconds() for t in train_times],
                                                          abs=1e-9)
    assert [r["Seconds"] for r in test] == pytest.approx([(t - start).total_seconds() for t in test_times],
                                                         abs=1e-9)
    assert test[1]["Seconds"] == pytest.approx(60 + 0.793967 - 49.977798)  # 16:25:00.793967 - 16:24:49.977798

    # the solver logs "lr" after the outputs: a row carries the previous display's rate,
    # and the first row copies the second's (Caffe's fix_initial_nan_learning_rate)
    rates = [float(m.group(1)) for m in grep(lines, r"Iteration \d+, lr = (\S+)")]
    assert [r["LearningRate"] for r in train[1:]] == rates[:19]
    assert train[0]["LearningRate"] == train[1]["LearningRate"] == 0.01
    assert test[1]["LearningRate"] == 0.00971013  # "Iteration 400, lr = 0.00971013"
    assert test[0]["LearningRate"] == test[1]["LearningRate"]


def test_classic_and_dated_glog_formats_give_identical_tables(lenet_logs):
    dated, classic = lenet_logs
    assert "I1121 16:24:49.970850" in classic.read_text().splitlines()[0]
    assert "I20261121 16:24:49.970850" in dated.read_text().splitlines()[0]
    assert parse_log(classic) == parse_log(dated)


def test_parse_log_cli_writes_caffe_csv_files(lenet_logs, tmp_path):
    assert cli_main.main(["parse_log", str(lenet_logs[0]), str(tmp_path)]) == 0
    train_file, test_file = tmp_path / "train.log.train", tmp_path / "train.log.test"
    train, test = parse_log(lenet_logs[0])
    with open(train_file, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert len(rows) == 21
    # Caffe's csv.DictWriter on Python floats: repr formatting, csv.excel's \r\n line ends
    assert rows[1] == [repr(0.0), repr(0.326031), repr(0.01), repr(2.29531)]
    assert train_file.read_bytes().splitlines(keepends=True)[0].endswith(b"\r\n")
    with open(test_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert [float(r["accuracy"]) for r in rows] == [r["accuracy"] for r in test]

    out = tmp_path / "tabs"
    out.mkdir()
    assert cli_main.main(["parse_log", str(lenet_logs[1]), str(out), "--delimiter", "\t", "--verbose"]) == 0
    first = (out / "train_glog_classic.log.test").read_text().splitlines()[0]
    assert first == "NumIters\tSeconds\tLearningRate\taccuracy\tloss"


def _glog_lines(path, lines, mtime_year=None):
    path.write_text("".join(line + "\n" for line in lines))
    if mtime_year is not None:
        t = datetime.datetime(mtime_year, 6, 1).timestamp()
        os.utime(path, (t, t))
    return path


def test_midnight_and_new_year(tmp_path):
    log = _glog_lines(tmp_path / "midnight.log", [
        "I20261231 23:59:59.500000 1 solver.cpp:289] Solving net",
        "I20261231 23:59:59.750000 1 solver.cpp:239] Iteration 0 (0 iter/s, 0s/1 iters), loss = 1",
        "I20261231 23:59:59.800000 1 solver.cpp:258]     Train net output #0: loss = 1",
        "I20270101 00:00:02.000000 1 solver.cpp:239] Iteration 1 (1 iter/s, 1s/1 iters), loss = 0.5",
        "I20270101 00:00:02.250000 1 solver.cpp:258]     Train net output #0: loss = 0.5",
    ])
    train, test = parse_log(log)
    assert [r["Seconds"] for r in train] == pytest.approx([0.3, 2.75])
    assert test == []

    # classic lines have no year: a month going down is a new year; the year of the last line
    # comes from the file's mtime, so 29 February 2028 (a leap year) is readable
    log = _glog_lines(tmp_path / "classic.log", [
        "I0229 10:00:00.000000 1 solver.cpp:289] Solving net",
        "I0229 10:00:00.500000 1 solver.cpp:239] Iteration 0 (0 iter/s, 0s/1 iters), loss = 1",
        "I0229 10:00:01.000000 1 solver.cpp:258]     Train net output #0: loss = 1",
        "I1231 23:59:59.000000 1 solver.cpp:258]     Iteration 1, lr = 0.1",
        "I0101 00:00:01.000000 1 solver.cpp:239] Iteration 2 (1 iter/s, 1s/1 iters), loss = 0.5",
        "I0101 00:00:02.000000 1 solver.cpp:258]     Train net output #0: loss = 0.5",
    ], mtime_year=2029)
    train, _ = parse_log(log)
    expected = (datetime.datetime(2029, 1, 1, 0, 0, 2) - datetime.datetime(2028, 2, 29, 10)).total_seconds()
    assert [r["Seconds"] for r in train] == [1.0, expected]
    assert [r["LearningRate"] for r in train] == [0.1, 0.1]


def test_single_row_multi_output_and_nan(tmp_path):
    # Caffe's script drops a lone first row and skips "nan" values; we keep both
    log = _glog_lines(tmp_path / "one.log", [
        "I0101 00:00:00.000000 1 solver.cpp:289] Solving net",
        "I0101 00:00:01.000000 1 solver.cpp:347] Iteration 3, Testing net (#0)",
        "I0101 00:00:02.000000 1 solver.cpp:414]     Test net output #0: acc = nan",
        "I0101 00:00:02.500000 1 solver.cpp:414]     Test net output #1: loss = 1.5e-07 (* 1 = 1.5e-07 loss)",
    ])
    _, test = parse_log(log)
    assert len(test) == 1 and test[0]["NumIters"] == 3.0 and test[0]["Seconds"] == 2.0
    assert np.isnan(test[0]["acc"]) and np.isnan(test[0]["LearningRate"]) and test[0]["loss"] == 1.5e-07
    assert csv_text(test).splitlines()[1] == "3.0,2.0,nan,nan,1.5e-07"
    assert csv_text([]) == "NumIters,Seconds,LearningRate\r\n"


NET = """net_param {
  name: "tiny"
  layer { name: "d" type: "DummyData" top: "x" top: "y"
    dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 }
                       data_filler { type: "gaussian" std: 1 } } }
  layer { name: "ip" type: "InnerProduct" bottom: "x" top: "o"
    inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
  layer { name: "loss" type: "EuclideanLoss" bottom: "o" bottom: "y" top: "loss" }
}
base_lr: 0.1 lr_policy: "step" gamma: 0.5 stepsize: 2 display: 1 max_iter: 5
test_iter: 1 test_interval: 2 random_seed: 3 snapshot_after_train: false
"""


def test_our_solver_log_parses_to_the_reported_losses(tmp_path):
    solver = create_solver(parse_text(NET, caffe_pb2.SolverParameter()))
    train_losses, test_results = [], []
    solver.add_callback(None, lambda: train_losses.append(float(solver.net.blobs["loss"].data)))
    run_test = solver.test
    solver.test = lambda i=0: test_results.append(run_test(i)) or test_results[-1]

    log_path = tmp_path / "ours.log"
    handler = logging.FileHandler(log_path)
    handler.setFormatter(GlogFormatter())
    logger = logging.getLogger("recaffe")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        solver.solve()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()

    train, test = parse_log(log_path)
    assert [r["NumIters"] for r in train] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in train], train_losses, rtol=1e-5)  # logged with %g
    # step policy by hand: 0.1 * 0.5^floor(it/2); a row carries the rate of the iteration before
    rate = [0.1 * 0.5 ** (it // 2) for it in range(5)]
    assert [r["LearningRate"] for r in train] == pytest.approx([rate[0]] + rate[:4])
    assert [r["NumIters"] for r in test] == [0, 2, 4]
    np.testing.assert_allclose([r["loss"] for r in test], [t["loss"] for t in test_results], rtol=1e-5)
    assert all(0 <= a["Seconds"] <= b["Seconds"] < 120 for a, b in zip(train, train[1:]))


def test_parse_log_errors(tmp_path, capsys):
    with pytest.raises(TrainingLogError, match="missing.log: no such log file"):
        parse_log(tmp_path / "missing.log")
    empty = _glog_lines(tmp_path / "setup.log", ["I0101 00:00:00.000000 1 net.cpp:53] Initializing net"])
    with pytest.raises(TrainingLogError, match=r"setup.log: no 'Iteration N' line"):
        parse_log(empty)
    text = tmp_path / "notes.txt"
    text.write_text("hello\nIteration 5\n")
    with pytest.raises(TrainingLogError, match="notes.txt: no glog-format lines"):
        parse_log(text)

    assert cli_main.main(["parse_log", str(empty), str(tmp_path)]) == 1
    assert "no 'Iteration N' line" in capsys.readouterr().err
    assert cli_main.main(["parse_log", str(text), str(tmp_path / "nowhere")]) == 1
    assert "notes.txt" in capsys.readouterr().err
    good = _glog_lines(tmp_path / "good.log", [
        "I0101 00:00:00.000000 1 solver.cpp:239] Iteration 0 (0 iter/s, 0s/1 iters), loss = 1",
        "I0101 00:00:00.000001 1 solver.cpp:258]     Train net output #0: loss = 1"])
    assert cli_main.main(["parse_log", str(good), str(tmp_path / "nowhere")]) == 1
    assert "nowhere: output directory does not exist" in capsys.readouterr().err
    assert cli_main.main(["parse_log", str(good), str(tmp_path), "--delimiter", "ab"]) == 1
    assert "one character" in capsys.readouterr().err


def _image_ok(path, size=(800, 600)):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 5  # not blank: axes, text, lines


def test_plot_training_log_charts(lenet_logs, tmp_path, capsys):
    png = tmp_path / "acc.png"
    assert cli_main.main(["plot_training_log", "0", str(png), str(lenet_logs[0]), str(lenet_logs[1])]) == 0
    _image_ok(png)
    png = tmp_path / "loss_seconds.png"
    assert cli_main.main(["plot_training_log", "7", str(png), str(lenet_logs[1])]) == 0
    _image_ok(png)

    from recaffe.cli.plot_training_log import chart_description, series
    assert [chart_description(i) for i in (0, 1, 4, 7)] == [
        "Test accuracy  vs. Iters", "Test accuracy  vs. Seconds", "Train learning rate  vs. Iters",
        "Train loss  vs. Seconds"]
    xs, ys = series(2, str(lenet_logs[0]))  # test loss vs iters
    assert xs == [0, 500, 1000, 1500, 2000] and ys[0] == 2.37237


def test_plot_training_log_errors(lenet_logs, tmp_path, capsys):
    log = str(lenet_logs[0])
    assert cli_main.main(["plot_training_log", "8", str(tmp_path / "x.png"), log]) == 1
    assert "8 is not a valid chart type" in capsys.readouterr().err
    assert cli_main.main(["plot_training_log", "loss", str(tmp_path / "x.png"), log]) == 1
    assert "not a valid chart type" in capsys.readouterr().err
    assert cli_main.main(["plot_training_log", "0", str(tmp_path / "x.png")]) == 1
    assert cli_main.main(["plot_training_log", "0", str(tmp_path / "x.png"), str(tmp_path / "no.log")]) == 1
    assert "no.log: no such log file" in capsys.readouterr().err
    assert cli_main.main(["plot_training_log", "0", str(tmp_path / "x.qqq"), log]) == 1
    assert "unknown image format 'qqq'" in capsys.readouterr().err
    train_only = _glog_lines(tmp_path / "train_only.log", [
        "I0101 00:00:00.000000 1 solver.cpp:239] Iteration 0 (0 iter/s, 0s/1 iters), loss = 1",
        "I0101 00:00:00.000001 1 solver.cpp:258]     Train net output #0: loss = 1"])
    assert cli_main.main(["plot_training_log", "0", str(tmp_path / "x.png"), str(train_only)]) == 1
    assert "train_only.log: no 'Test net output' lines" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
