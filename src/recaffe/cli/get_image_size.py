"""get_image_size: ``name height width`` of each listed image, as the SSD fork's tool (the sizes
DetectionEvaluate's ``name_size_file`` reads). Usage: get_image_size [FLAGS] ROOTFOLDER/ LISTFILE OUTFILE
"""
from __future__ import annotations

import sys

from .flags import FlagSet, parse_tool_argv

USAGE = """\
Get sizes of a set of images.
Usage:
    get_image_size ROOTFOLDER/ LISTFILE OUTFILE

Flags:
"""


def main(argv: list[str] | None = None) -> int:
    from ..data.annoset import write_image_sizes
    from ..data.image_file import ImageReadError
    from ..data.imageset import ImagesetError

    f = FlagSet()
    f.add("name_id_file", "", "A file which maps image_name to image_id.")
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed = parse_tool_argv("get_image_size", f, argv, USAGE, nargs=(3,))
    if isinstance(parsed, int):
        return parsed
    v, (root, list_file, out_file) = parsed
    try:
        write_image_sizes(root, list_file, out_file, v["name_id_file"])
    except (ImagesetError, ImageReadError, OSError) as e:
        print(f"get_image_size: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
