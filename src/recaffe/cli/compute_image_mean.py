"""compute_image_mean: the mean image of an LMDB or LevelDB of Datums, written as a binaryproto,
as Caffe's tool (the computation is :func:`recaffe.data.image_mean.compute_image_mean`).

Usage: compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]
"""
from __future__ import annotations

import sys

from .flags import FlagSet, parse_tool_argv

USAGE = """\
Compute the mean_image of a set of images given by a leveldb/lmdb
Usage:
    compute_image_mean [FLAGS] INPUT_DB [OUTPUT_FILE]

Flags:
"""


def _flags() -> FlagSet:
    f = FlagSet()
    f.add("backend", "lmdb", "The backend {leveldb, lmdb} containing the images")
    return f


def main(argv: list[str] | None = None) -> int:
    from ..data.db import DBError
    from ..data.image_mean import ImageMeanError, channel_means, compute_image_mean
    from ..io.protofiles import write_binary
    from ..log import get_logger

    log = get_logger("compute_image_mean")
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = _flags()
    parsed = parse_tool_argv("compute_image_mean", flags, argv, USAGE, nargs=(1, 2))
    if isinstance(parsed, int):
        return parsed
    values, positional = parsed
    try:
        mean = compute_image_mean(positional[0], values["backend"])
        if len(positional) == 2:
            log.info("Write to %s", positional[1])
            write_binary(positional[1], mean)  # atomic: a temporary file renamed into place
    except (ImageMeanError, DBError, OSError) as e:
        print(f"compute_image_mean: {e}", file=sys.stderr)
        return 1
    log.info("Number of channels: %d", mean.channels)
    for c, value in enumerate(channel_means(mean)):
        log.info("mean_value channel [%d]:%g", c, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
