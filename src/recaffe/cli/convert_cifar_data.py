"""convert_cifar_data: CIFAR-10's binary batches -> LMDB or LevelDB databases of Datums, as Caffe's
tool (the conversion is :func:`recaffe.data.cifar.convert_cifar`).

Usage: convert_cifar_data input_folder output_folder db_type
"""
from __future__ import annotations

import sys

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
    if any(a.lstrip("-") in ("h", "help", "helpfull", "helpshort") for a in argv if a.startswith("-")):
        print(USAGE, end="")
        return 0
    if len(argv) != 3:
        # Caffe prints the usage and exits with 0; a wrong command line is an error here.
        print(f"convert_cifar_data: expected 3 arguments, got {len(argv)}\n\n{USAGE}", end="",
              file=sys.stderr)
        return 1
    input_folder, output_folder, db_type = argv
    try:
        convert_cifar(input_folder, output_folder, db_type)
    except (CifarFormatError, DBError) as e:
        print(f"convert_cifar_data: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
