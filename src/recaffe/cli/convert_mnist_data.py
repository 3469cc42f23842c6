"""convert_mnist_data: MNIST IDX files -> an LMDB or LevelDB of Datums, as Caffe's tool.

Usage: convert_mnist_data [--backend=lmdb|leveldb] input_image_file input_label_file output_db_file
"""
from __future__ import annotations

import sys

USAGE = """\
This script converts the MNIST dataset to
the lmdb/leveldb format used by Caffe to load data.
Usage:
    convert_mnist_data [FLAGS] input_image_file input_label_file output_db_file
The image and label files may be gzip-compressed.

Flags:
    -backend (The backend for storing the result) type: string default: "lmdb"
"""


def _parse(argv: list[str]) -> tuple[list[str], str]:
    """gflags-style arguments: -backend=x, --backend=x, -backend x, --backend x."""
    positional: list[str] = []
    backend = "lmdb"
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional.extend(argv[i + 1:])
            break
        if arg.startswith("-") and len(arg) > 1:
            name, eq, value = arg.lstrip("-").partition("=")
            if name in ("h", "help", "helpfull", "helpshort"):
                raise _Help()
            if name != "backend":
                raise _UsageError(f"unknown command line flag '{name}'")
            if not eq:
                if i + 1 >= len(argv):
                    raise _UsageError("flag '-backend' is missing its argument")
                i += 1
                value = argv[i]
            backend = value
        else:
            positional.append(arg)
        i += 1
    return positional, backend


class _Help(Exception):
    pass


class _UsageError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    from ..data.db import DBError
    from ..data.mnist import MnistFormatError, convert_mnist

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        positional, backend = _parse(argv)
    except _Help:
        print(USAGE, end="")
        return 0
    except _UsageError as e:
        print(f"convert_mnist_data: ERROR: {e}\n\n{USAGE}", end="", file=sys.stderr)
        return 1
    if len(positional) != 3:
        print(f"convert_mnist_data: expected 3 arguments, got {len(positional)}\n\n{USAGE}", end="",
              file=sys.stderr)
        return 1
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
