"""parse_log: a training log -> ``<log>.train`` and ``<log>.test`` CSV files (Caffe's parse_log.py).

Usage: parse_log logfile_path output_dir [--delimiter D] [--verbose]
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parse_log",
        description="Parse a Caffe training log into two CSV files containing training and testing "
                    "information")
    parser.add_argument("logfile_path", help="Path to log file")
    parser.add_argument("output_dir", help="Directory in which to place output CSV files")
    parser.add_argument("--verbose", action="store_true",
                        help="Print some extra info (e.g., output filenames)")
    parser.add_argument("--delimiter", default=",",
                        help="Column delimiter in output files (default: '%(default)s')")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..training_log import TrainingLogError, parse_log, save_csv_files

    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:  # argparse already printed usage/help
        return int(e.code or 0)
    if len(args.delimiter) != 1:
        print(f"parse_log: --delimiter must be one character, got {args.delimiter!r}", file=sys.stderr)
        return 1
    try:
        train, test = parse_log(args.logfile_path)
        save_csv_files(args.logfile_path, args.output_dir, train, test, delimiter=args.delimiter,
                       verbose=args.verbose)
    except (TrainingLogError, OSError) as e:
        print(f"parse_log: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
