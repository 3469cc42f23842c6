"""Training logs -> tables, as Caffe's tools/extra/parse_log.py.

A log (Caffe's, or ours: recaffe writes the same glog lines) becomes two lists of rows, one per
displayed training iteration and one per test pass. Each row holds ``NumIters``, ``Seconds``,
``LearningRate`` and one column per net output named in the ``Train net output #i: name = v`` /
``Test net output #i: name = v`` lines (``loss``, ``accuracy``, ...). Like Caffe's tool:

- ``NumIters`` is the last ``Iteration N`` seen; nothing is read before the first one.
- ``Seconds`` is measured from the ``Solving <net>`` line (Caffe's start time); a log without one
  is measured from its first timestamped line.
- ``LearningRate`` is the last ``lr = x`` seen, so a train row carries the rate of the previous
  display (the solver logs it after the outputs); the first row, printed before any rate, takes
  the second row's rate.
- A row is complete when it has as many columns as the first row; a new ``NumIters`` also starts
  a new row. Several output elements with one name keep the last value.

Where we differ from Caffe's script (documented choices):

- Timestamps: glog's classic prefix ``I1121 16:24:49.970850`` has no year, the newer
  ``I20261121 16:24:49.970850`` (glog >= 0.6) has one; Caffe's script only reads the classic one,
  we read both. Seconds come from full dates, so a log crossing midnight is measured correctly.
  Classic logs crossing a new year are detected where the month goes down (as Caffe does); the
  year of the log's last line is taken from the file's modification time (Caffe takes the
  creation year for the first line, which is off by one for logs spanning new year and can
  then fail on 29 February). Only the differences are used, so the exact year rarely matters.
- Lines without a glog prefix (multi-line messages such as the printed net) are skipped rather
  than matched for ``Iteration``.
- Output values ``nan``/``inf`` are read (Caffe's pattern skips them, shifting the columns).
- A lone first row, which Caffe's script drops at the end of the file, is kept.
- The CSV header is the union of the rows' columns (Caffe takes the first row's and fails on
  later extra columns); missing cells are empty. An empty table is written as its header.
"""
from __future__ import annotations

import csv
import datetime
import io
import math
import os
import re
from dataclasses import dataclass

from .errors import RecaffeError
from .io.protofiles import atomic_write

# glog prefix: severity, [YYYY]MMDD, HH:MM:SS.micros, thread, file:line] message
_PREFIX = re.compile(r"^[IWEF](\d{8}|\d{4}) (\d\d):(\d\d):(\d\d)\.(\d{1,6})\s+\S+\s+[^\]]*\]\s?(.*)$")
_ITERATION = re.compile(r"Iteration (\d+)")
_NUMBER = r"[-+]?(?:nan|inf(?:inity)?|[.\deE+-]+)"
_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = (" + _NUMBER + ")", re.IGNORECASE)
_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = (" + _NUMBER + ")", re.IGNORECASE)
_LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")

BASE_COLUMNS = ("NumIters", "Seconds", "LearningRate")


class TrainingLogError(RecaffeError, ValueError):
    pass


@dataclass
class _Stamp:
    """One glog line's time; ``year`` is None in the classic (yearless) format."""
    year: int | None
    month: int
    day: int
    clock: tuple[int, int, int, int]  # hour, minute, second, microsecond
    message: str


def _read_stamp(line: str) -> _Stamp | None:
    m = _PREFIX.match(line)
    if not m:
        return None
    date, hh, mm, ss, frac, message = m.groups()
    year = int(date[:4]) if len(date) == 8 else None
    micros = int(frac.ljust(6, "0"))
    return _Stamp(year, int(date[-4:-2]), int(date[-2:]), (int(hh), int(mm), int(ss), micros), message)


def _date_times(path: str, stamps: list[tuple[int, _Stamp]]) -> list[datetime.datetime]:
    """Full dates for the stamps; classic stamps get years counted back from the file's mtime."""
    rollovers, last_month = 0, None
    for _, s in stamps:
        if s.year is None:
            if last_month is not None and s.month < last_month:
                rollovers += 1
            last_month = s.month
    year = datetime.datetime.fromtimestamp(os.path.getmtime(path)).year - rollovers
    result, last_month = [], None
    for lineno, s in stamps:
        if s.year is None:
            if last_month is not None and s.month < last_month:
                year += 1
            last_month = s.month
        try:
            result.append(datetime.datetime(s.year or year, s.month, s.day, *s.clock))
        except ValueError as e:
            raise TrainingLogError(f"{path}:{lineno}: bad timestamp ({e})") from None
    return result


class _Table:
    """Rows of one kind (train or test), grown as Caffe's parse_log grows them."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []
        self.pending: dict[str, float] | None = None

    def add(self, iteration: float, seconds: float, rate: float, name: str, value: float) -> None:
        if self.pending is None or self.pending["NumIters"] != iteration:
            if self.pending is not None:
                self.rows.append(self.pending)
            self.pending = {"NumIters": iteration, "Seconds": seconds, "LearningRate": rate}
        self.pending[name] = value
        if self.rows and len(self.pending) == len(self.rows[0]):
            self.rows.append(self.pending)
            self.pending = None

    def finish(self) -> list[dict[str, float]]:
        if self.pending is not None and not self.rows:
            self.rows.append(self.pending)
        if len(self.rows) > 1:
            self.rows[0]["LearningRate"] = self.rows[1]["LearningRate"]
        return self.rows


def parse_log(path_to_log: str | os.PathLike) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """``(train_rows, test_rows)`` of a Caffe/recaffe training log (Caffe's ``parse_log``).

    Raises TrainingLogError naming the file when it is missing or holds no ``Iteration`` line."""
    path = os.fspath(path_to_log)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise TrainingLogError(f"{path}: no such log file") from None
    except OSError as e:
        raise TrainingLogError(f"{path}: cannot read the log ({e.strerror or e})") from None
    stamps = [(i + 1, s) for i, s in enumerate(map(_read_stamp, lines)) if s is not None]
    if not stamps:
        raise TrainingLogError(f"{path}: no glog-format lines (like 'I1121 16:24:49.970850 ...]'): "
                               "is this a Caffe training log?")
    times = _date_times(path, stamps)
    start = next((t for (_, s), t in zip(stamps, times) if "Solving" in s.message), times[0])

    train, test = _Table(), _Table()
    iteration, rate, seen_iteration = -1.0, math.nan, False
    for (_, s), t in zip(stamps, times):
        m = _ITERATION.search(s.message)
        if m:
            iteration, seen_iteration = float(m.group(1)), True
        if not seen_iteration:
            continue
        seconds = (t - start).total_seconds()
        m = _LEARNING_RATE.search(s.message)
        if m:
            rate = float(m.group(1))
        for table, pattern in ((train, _TRAIN_OUTPUT), (test, _TEST_OUTPUT)):
            m = pattern.search(s.message)
            if m:
                table.add(iteration, seconds, rate, m.group(2), float(m.group(3)))
    if not seen_iteration:
        raise TrainingLogError(f"{path}: no 'Iteration N' line: the log holds no training iterations")
    return train.finish(), test.finish()


def csv_text(rows: list[dict[str, float]], delimiter: str = ",") -> str:
    """The rows as Caffe's parse_log writes them: a header, floats as Python prints them."""
    columns = list(BASE_COLUMNS) if not rows else []
    for row in rows:
        columns += [c for c in row if c not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, delimiter=delimiter, restval="",
                            lineterminator="\r\n")  # csv.excel's line ending, as Caffe's
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_csv(output_filename: str | os.PathLike, rows: list[dict[str, float]], delimiter: str = ",",
              verbose: bool = False) -> None:
    atomic_write(output_filename, csv_text(rows, delimiter).encode("utf-8"))
    if verbose:
        print(f"Wrote {os.fspath(output_filename)}")


def save_csv_files(logfile_path: str | os.PathLike, output_dir: str | os.PathLike,
                   train_dict_list: list[dict[str, float]], test_dict_list: list[dict[str, float]],
                   delimiter: str = ",", verbose: bool = False) -> tuple[str, str]:
    """Write ``<log name>.train`` and ``<log name>.test`` into ``output_dir``; return their paths."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        raise TrainingLogError(f"{output_dir}: output directory does not exist")
    base = os.path.basename(os.fspath(logfile_path))
    paths = (os.path.join(output_dir, base + ".train"), os.path.join(output_dir, base + ".test"))
    for path, rows in zip(paths, (train_dict_list, test_dict_list)):
        write_csv(path, rows, delimiter, verbose)
    return paths
