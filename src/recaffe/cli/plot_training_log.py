"""plot_training_log: one chart of one or more training logs (Caffe's plot_training_log.py.example).

Usage: plot_training_log chart_type[0-7] /where/to/save.png /path/to/first.log ...

Chart types are Caffe's (its field names sorted, each y field against each x field). Choices where
Caffe's example is loose: the logs are read with recaffe.training_log (no parse_log.sh, no files
left behind); "Train loss" is the train net's ``loss`` output (Caffe's shell parser took the
display line's smoothed loss, the same value unless ``average_loss`` > 1); an output named
otherwise is found by the word ``accuracy``/``loss`` in its name. Colours and markers come from a
fixed cycle instead of random ones, any log name is accepted (``.log`` is dropped from the legend
label), and the image format follows the extension (png, svg, pdf, jpg...). Matplotlib is used
through its Agg canvas directly, so the caller's pyplot backend is left alone.
"""
from __future__ import annotations

import io
import os
import sys

from ..errors import RecaffeError

CHART_TYPES = [  # (rows, y label, x label), in Caffe's numbering
    ("Test", "accuracy", "Iters"), ("Test", "accuracy", "Seconds"),
    ("Test", "loss", "Iters"), ("Test", "loss", "Seconds"),
    ("Train", "learning rate", "Iters"), ("Train", "learning rate", "Seconds"),
    ("Train", "loss", "Iters"), ("Train", "loss", "Seconds"),
]
_X_COLUMNS = {"Iters": "NumIters", "Seconds": "Seconds"}
_MARKERS = ["o", "s", "^", "v", "D", "x", "+", "*", "<", ">", "p", "h"]


class PlotError(RecaffeError, ValueError):
    pass


def chart_description(chart_type: int) -> str:
    kind, y, x = CHART_TYPES[chart_type]
    return f"{kind} {y}  vs. {x}"


def usage() -> str:
    lines = ["Usage:",
             f"    plot_training_log chart_type[0-{len(CHART_TYPES) - 1}] /where/to/save.png "
             "/path/to/first.log ...",
             "Notes:",
             "    1. Supporting multiple logs.",
             "    2. The image format follows the file extension (png, svg, pdf, jpg, ...).",
             "Supported chart types:"]
    lines += [f"    {i}: {chart_description(i)}" for i in range(len(CHART_TYPES))]
    return "\n".join(lines) + "\n"


def _y_column(rows: list[dict], y: str, log_path: str, kind: str) -> str:
    if y == "learning rate":
        return "LearningRate"
    if y in rows[0]:
        return y
    named = [c for c in rows[0] if y in c.lower() and c not in ("NumIters", "Seconds", "LearningRate")]
    if not named:
        outputs = ", ".join(c for c in rows[0] if c not in ("NumIters", "Seconds", "LearningRate"))
        raise PlotError(f"{log_path}: no {kind} output named like {y!r} (outputs: {outputs or 'none'})")
    return named[0]


def series(chart_type: int, log_path: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of ``chart_type`` read from one log."""
    from ..training_log import parse_log

    kind, y, x = CHART_TYPES[chart_type]
    train, test = parse_log(log_path)
    rows = test if kind == "Test" else train
    if not rows:
        raise PlotError(f"{log_path}: no '{kind} net output' lines to plot")
    column = _y_column(rows, y, log_path, kind.lower())
    points = [(r[_X_COLUMNS[x]], r[column]) for r in rows if column in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_chart(chart_type: int, path_to_image: str, log_paths: list[str]) -> None:
    """Draw ``chart_type`` for every log into one image (format from the extension), atomically."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'recaffe[tools]'") from None

    from ..io.protofiles import atomic_write

    if not 0 <= chart_type < len(CHART_TYPES):
        raise PlotError(f"{chart_type} is not a valid chart type (0-{len(CHART_TYPES) - 1})")
    fig = Figure(figsize=(8, 6), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ext = os.path.splitext(path_to_image)[1][1:].lower()
    if ext not in canvas.get_supported_filetypes():
        raise PlotError(f"{path_to_image}: unknown image format {ext!r} (supported: "
                        f"{', '.join(sorted(canvas.get_supported_filetypes()))})")
    ax = fig.add_subplot(1, 1, 1)
    for i, log_path in enumerate(log_paths):
        xs, ys = series(chart_type, log_path)
        label = os.path.basename(log_path)
        label = label[:-len(".log")] if label.endswith(".log") and len(label) > 4 else label
        ax.plot(xs, ys, label=label, color=f"C{i % 10}", marker=_MARKERS[i % len(_MARKERS)],
                linewidth=0.75)
    kind, y, x = CHART_TYPES[chart_type]
    ax.legend(loc="lower right" if y == "accuracy" else "upper right", ncol=1)
    ax.set_title(chart_description(chart_type))
    ax.set_xlabel(x)
    ax.set_ylabel(f"{kind} {y}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=ext)
    atomic_write(path_to_image, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    from ..training_log import TrainingLogError

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help", "-help") for a in argv):
        print(usage(), end="")
        return 0
    if len(argv) < 3:
        print(f"plot_training_log: expected a chart type, an image path and at least one log\n\n{usage()}",
              end="", file=sys.stderr)
        return 1
    try:
        chart_type = int(argv[0])
    except ValueError:
        chart_type = -1
    if not 0 <= chart_type < len(CHART_TYPES):
        print(f"plot_training_log: {argv[0]} is not a valid chart type.\n\n{usage()}", end="",
              file=sys.stderr)
        return 1
    try:
        plot_chart(chart_type, argv[1], argv[2:])
    except (PlotError, TrainingLogError, OSError) as e:
        print(f"plot_training_log: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
