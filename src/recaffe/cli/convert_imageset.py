"""convert_imageset: a folder of images and a list file -> an LMDB or LevelDB of Datums, as
Caffe's tool (the conversion itself is :func:`recaffe.data.imageset.convert_imageset`).

Usage: convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
"""
from __future__ import annotations

import sys

from .flags import FlagSet, parse_tool_argv

USAGE = """\
Convert a set of images to the leveldb/lmdb
format used as input for Caffe.
Usage:
    convert_imageset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
LISTFILE holds one 'FILENAME LABEL' per line; files are read from ROOTFOLDER/FILENAME.
The ImageNet dataset for the training demo is at
    http://www.image-net.org/download-images

Flags:
"""


def _flags() -> FlagSet:
    f = FlagSet()
    f.add("gray", False, "When this option is on, treat images as grayscale ones")
    f.add("shuffle", False, "Randomly shuffle the order of images and their labels")
    f.add("backend", "lmdb", "The backend {lmdb, leveldb} for storing the result")
    f.add("resize_width", 0, "Width images are resized to")
    f.add("resize_height", 0, "Height images are resized to")
    f.add("check_size", False, "When this option is on, check that all the datum have the same size")
    f.add("encoded", False, "When this option is on, the encoded image will be save in datum")
    f.add("encode_type", "", "Optional: What type should we encode the image as ('png','jpg',...).")
    f.add("shuffle_seed", 0, "recaffe: the seed of -shuffle's order (Caffe's is unseeded)")
    return f


def main(argv: list[str] | None = None) -> int:
    from ..data.db import DBError
    from ..data.imageset import ImagesetError, convert_imageset

    argv = sys.argv[1:] if argv is None else list(argv)
    flags = _flags()
    parsed = parse_tool_argv("convert_imageset", flags, argv, USAGE, nargs=(3,))
    if isinstance(parsed, int):
        return parsed
    values, positional = parsed
    root, list_file, db_path = positional
    try:
        convert_imageset(root, list_file, db_path, backend=values["backend"], gray=values["gray"],
                         shuffle=values["shuffle"], seed=values["shuffle_seed"],
                         resize_height=values["resize_height"], resize_width=values["resize_width"],
                         check_size=values["check_size"], encoded=values["encoded"],
                         encode_type=values["encode_type"])
    except (ImagesetError, DBError) as e:
        print(f"convert_imageset: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
