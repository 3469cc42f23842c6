"""convert_mnist_data: MNIST IDX files -> an LMDB or LevelDB of Datums, as Caffe's tool.

Usage: convert_mnist_data [--backend=lmdb|leveldb] input_image_file input_label_file output_db_file
"""
from __future__ import annotations

import sys

from .flags import FlagSet, parse_tool_argv

USAGE = """\
This script converts the MNIST dataset to
the lmdb/leveldb format used by Caffe to load data.
Usage:
    convert_mnist_data [FLAGS] input_image_file input_label_file output_db_file
The image and label files may be gzip-compressed.

Flags:
"""


def main(argv: list[str] | None = None) -> int:
    from ..data.db import DBError
    from ..data.mnist import MnistFormatError, convert_mnist

    argv = sys.argv[1:] if argv is None else list(argv)
    flags = FlagSet()
    flags.add("backend", "lmdb", "The backend for storing the result")
    parsed = parse_tool_argv("convert_mnist_data", flags, argv, USAGE, nargs=(3,))
    if isinstance(parsed, int):
        return parsed
    values, positional = parsed
    backend = values["backend"]
    if backend.lower() not in ("lmdb", "leveldb"):
        print(f"convert_mnist_data: Unknown db backend {backend!r} (use lmdb or leveldb)", file=sys.stderr)
        return 1
    image_file, label_file, db_path = positional
    try:
        convert_mnist(image_file, label_file, db_path, backend.lower())
    except (MnistFormatError, DBError) as e:
        print(f"convert_mnist_data: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
