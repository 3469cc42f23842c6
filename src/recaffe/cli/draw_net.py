"""draw_net: draw a net's graph into an image (pycaffe's python/draw_net.py).

Usage: draw_net input_net_proto_file output_image_file [--rankdir LR|TB|BT|RL]
                [--phase TRAIN|TEST|ALL] [--display_lrm]

The net is read as ``caffe train`` reads it (legacy input fields upgraded). The format follows the
output file's extension; without graphviz's ``dot``, images are drawn with matplotlib and
``.dot``/``.gv`` files hold the DOT text (see recaffe.draw).
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draw_net", description="Draw a graph of the net architecture.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("input_net_proto_file", help="Input network prototxt file")
    parser.add_argument("output_image_file", help="Output image file")
    parser.add_argument("--rankdir", default="LR",
                        help="One of TB (top-bottom, i.e., vertical), BT, LR (left-right, i.e., "
                             "horizontal) or RL; see http://www.graphviz.org/doc/info/attrs.html#k:rankdir")
    parser.add_argument("--phase", default="ALL",
                        help="Which network phase to draw: can be TRAIN, TEST, or ALL. If ALL, then all "
                             "layers are drawn regardless of phase.")
    parser.add_argument("--display_lrm", action="store_true",
                        help="Use this flag to visualize the learning rate multiplier, when non-zero, "
                             "for the learning layers (Convolution, Deconvolution, InnerProduct).")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..draw import RANKDIRS, DrawError, draw_net_to_file
    from ..io.netfiles import read_net_text
    from ..io.protofiles import ProtoFileError
    from ..io.upgrade import UpgradeError
    from ..proto import caffe_pb2

    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:  # argparse already printed usage/help
        return int(e.code or 0)
    phases = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST, "ALL": None}
    if args.phase not in phases:
        print(f"draw_net: Unknown phase: {args.phase} (use TRAIN, TEST or ALL)", file=sys.stderr)
        return 1
    if args.rankdir not in RANKDIRS:
        print(f"draw_net: --rankdir must be one of {', '.join(RANKDIRS)}, got {args.rankdir!r}",
              file=sys.stderr)
        return 1
    try:
        net = read_net_text(args.input_net_proto_file)
        print(f"Drawing net to {args.output_image_file}")
        draw_net_to_file(net, args.output_image_file, args.rankdir, phases[args.phase], args.display_lrm)
    except (DrawError, ProtoFileError, UpgradeError, ValueError, OSError) as e:
        print(f"draw_net: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
