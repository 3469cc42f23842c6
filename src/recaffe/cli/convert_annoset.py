"""convert_annoset: images and box annotations -> an LMDB or LevelDB of AnnotatedDatums, as the SSD
fork's tool (the conversion itself is :func:`recaffe.data.annoset.convert_annoset`).

Usage: convert_annoset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
"""
from __future__ import annotations

import sys

from .flags import FlagSet, parse_tool_argv

USAGE = """\
Convert a set of images and annotations to the leveldb/lmdb format used as input for Caffe.
Usage:
    convert_annoset [FLAGS] ROOTFOLDER/ LISTFILE DB_NAME
LISTFILE holds one 'IMAGE LABELFILE' per line (-anno_type detection) or 'IMAGE LABEL'
(classification); both are read from ROOTFOLDER/.

Flags:
"""


def _flags() -> FlagSet:
    from .convert_imageset import _flags as imageset_flags

    f = imageset_flags()  # convert_imageset's flags, which the fork's tool shares
    f.add("anno_type", "classification", "The type of annotation {classification, detection}.")
    f.add("label_type", "xml", "The type of annotation file format {xml, json, txt}.")
    f.add("label_map_file", "", "A file with LabelMap protobuf message.")
    f.add("check_label", False, "When this option is on, check that there is no duplicated name/label.")
    f.add("min_dim", 0, "Minimum dimension images are resized to (keep same aspect ratio)")
    f.add("max_dim", 0, "Maximum dimension images are resized to (keep same aspect ratio)")
    return f


def main(argv: list[str] | None = None) -> int:
    from ..data.annoset import convert_annoset
    from ..data.annotations import AnnotationError
    from ..data.db import DBError
    from ..data.imageset import ImagesetError

    argv = sys.argv[1:] if argv is None else list(argv)
    parsed = parse_tool_argv("convert_annoset", _flags(), argv, USAGE, nargs=(3,))
    if isinstance(parsed, int):
        return parsed
    v, (root, list_file, db_path) = parsed
    try:
        convert_annoset(root, list_file, db_path, anno_type=v["anno_type"], label_type=v["label_type"],
                        label_map_file=v["label_map_file"], check_label=v["check_label"],
                        min_dim=v["min_dim"], max_dim=v["max_dim"], resize_height=v["resize_height"],
                        resize_width=v["resize_width"], backend=v["backend"], gray=v["gray"],
                        shuffle=v["shuffle"], seed=v["shuffle_seed"], check_size=v["check_size"],
                        encoded=v["encoded"], encode_type=v["encode_type"])
    except (AnnotationError, ImagesetError, DBError) as e:
        print(f"convert_annoset: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
