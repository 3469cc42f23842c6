"""convert_cifar_data: CIFAR-10's binary batches -> LMDB or LevelDB databases of Datums, as Caffe's
tool (the conversion is :func:`recaffe.data.cifar.convert_cifar`).

Usage: convert_cifar_data input_folder output_folder db_type
"""
from __future__ import annotations

import sys

from .flags import parse_tool_argv

USAGE = """\
This script converts the CIFAR dataset to the leveldb format used
by caffe to perform classification.
Usage:
    convert_cifar_data input_folder output_folder db_type
Where the input folder should contain the binary batch files.
The CIFAR dataset could be downloaded at
    http://www.cs.toronto.edu/~kriz/cifar.html
You should gunzip them after downloading.
db_type is lmdb or leveldb; the databases are written to
output_folder/cifar10_train_<db_type> and output_folder/cifar10_test_<db_type>.
"""


def main(argv: list[str] | None = None) -> int:
    from ..data.cifar import CifarFormatError, convert_cifar
    from ..data.db import DBError

    argv = sys.argv[1:] if argv is None else list(argv)
    parsed = parse_tool_argv("convert_cifar_data", None, argv, USAGE, nargs=(3,))
    if isinstance(parsed, int):
        return parsed
    input_folder, output_folder, db_type = argv
    try:
        convert_cifar(input_folder, output_folder, db_type)
    except (CifarFormatError, DBError) as e:
        print(f"convert_cifar_data: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
