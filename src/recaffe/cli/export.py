"""caffe export: a net and its weights as an ONNX model or a PyTorch module.

Usage: caffe export --model deploy.prototxt --weights x.caffemodel --format onnx|torch --out path
       [--phase TEST|TRAIN] [--stage a,b] [--level N]
"""
from __future__ import annotations

import os
import sys

from .flags import FlagError, FlagSet

USAGE = """\
Export a Caffe net with its weights to ONNX or to a PyTorch module.
Usage:
    caffe export -model deploy.prototxt -weights x.caffemodel -format onnx|torch -out path
onnx writes <path> (an ONNX model, opset 18); torch writes <path>.py (a torch.nn.Module that
depends only on torch) and <path>.pth (its state dict).

Flags:
"""

FORMATS = ("onnx", "torch")


def _flags() -> FlagSet:
    f = FlagSet()
    f.add("model", "", "The model definition protocol buffer text file.")
    f.add("weights", "", "The trained weights (.caffemodel or .caffemodel.h5).")
    f.add("format", "onnx", "The output format: onnx or torch.")
    f.add("out", "", "The output path (torch: <out>.py and <out>.pth).")
    f.add("phase", "TEST", "Optional; network phase (TRAIN or TEST).")
    f.add("stage", "", "Optional; network stages, separated by ','.")
    f.add("level", 0, "Optional; network level.")
    return f


def _export(values: dict) -> list[str]:
    from ..export import export_onnx, export_torch
    from ..net import Net
    from ..proto import caffe_pb2

    fmt = values["format"].lower()
    if fmt not in FORMATS:
        raise FlagError(f"unknown format {values['format']!r} (use onnx or torch)")
    for flag in ("model", "weights", "out"):
        if not values[flag]:
            raise FlagError(f"-{flag} is required")
    for flag in ("model", "weights"):
        if not os.path.isfile(values[flag]):
            raise FlagError(f"-{flag}: {values[flag]}: file not found")
    phase = values["phase"].upper()
    if phase not in ("TRAIN", "TEST"):
        raise FlagError(f"-phase must be TRAIN or TEST, got {values['phase']!r}")
    stages = [s for s in values["stage"].split(",") if s]
    try:
        net = Net(values["model"], getattr(caffe_pb2, phase), level=values["level"], stages=stages,
                  weights=values["weights"])
        if fmt == "onnx":
            export_onnx(net, values["out"])
            return [values["out"]]
        return list(export_torch(net, values["out"]))
    except ValueError as e:  # ExportError, LayerError, WeightsError, ProtoFileError: all name the cause
        raise FlagError(str(e)) from None
    except ImportError as e:  # the onnx package is an optional extra
        raise FlagError(f"--format {fmt} needs the {e.name or 'onnx'!r} package: "
                        "pip install 'recaffe[export]'") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = _flags()
    if any(a.lstrip("-") in ("h", "help", "helpfull", "helpshort") for a in argv if a.startswith("-")):
        print(USAGE + flags.usage())
        return 0
    try:
        values, positional = flags.parse(argv)
        if positional:
            raise FlagError(f"unexpected argument(s): {' '.join(positional)}")
        written = _export(values)
    except (FlagError, OSError) as e:
        print(f"caffe export: error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
