"""A folder of images with box annotations -> a database of ``AnnotatedDatum``s, as the SSD fork's
``convert_annoset`` writes it (and ``get_image_size``, the sizes its evaluation reads).

The list file holds ``IMAGE LABELFILE`` per line (``anno_type: detection``) or ``IMAGE LABEL``
(``classification``: plain Datums inside AnnotatedDatums without groups, as the fork). Both paths
are appended to ``root_folder`` as they are. Records are keyed ``"%08d_%s" % (line, IMAGE)`` and
committed every 1,000, as convert_imageset (:mod:`recaffe.data.imageset`, whose image reading and
encoding rules apply). ``min_dim``/``max_dim`` scale an image so that its shorter side is at least
``min_dim`` and its longer side at most ``max_dim``, keeping its aspect ratio (the fork's
ReadImageToCVMat). Boxes are normalized by the size written in the annotation file (the original
image's), so resizing does not change them. A list line whose annotation names a label missing from
the label map stops the conversion with an error naming the file and object; an image that does
not decode is skipped with a warning, as in the fork.
"""
from __future__ import annotations

import os

import numpy as np

from ..log import get_logger
from ..proto import caffe_pb2
from .annotations import AnnotationError, annotate, map_name_to_label, read_label_map
from .db import NEW, open_db
from .image_file import ImageReadError, encode_image, read_image, resize_linear
from .imageset import ImagesetError, image_to_datum, read_image_to_datum, write_records

log = get_logger(__name__)


def read_pairs(path: str) -> list[tuple[str, str, int]]:
    """``(first, second, line number)`` of each non-blank line of two whitespace-separated fields."""
    out = []
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise ImagesetError(f"{path}:{number}: expected 'IMAGE LABELFILE' (two fields), "
                                        f"got {len(fields)}")
                out.append((fields[0], fields[1], number))
    except OSError as e:
        raise ImagesetError(f"{path}: cannot read the list file ({e.strerror})") from None
    return out


def image_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file, from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, UnidentifiedImageError) as e:
        raise ImageReadError(f"Could not open or find file {path} ({e})") from None


def scale_for_dims(height: int, width: int, min_dim: int, max_dim: int) -> float:
    """The fork's scale factor: shorter side up to ``min_dim``, then longer side down to ``max_dim``."""
    scale = 1.0
    lo, hi = min(height, width), max(height, width)
    if min_dim > 0 and lo < min_dim:
        scale = np.float32(min_dim) / np.float32(lo)
    if max_dim > 0 and int(np.float32(scale) * hi) > max_dim:
        scale = np.float32(max_dim) / np.float32(hi)
    return float(scale)


def read_image_datum(path: str, resize_height: int, resize_width: int, min_dim: int, max_dim: int,
                     is_color: bool, encoding: str) -> caffe_pb2.Datum:
    """The fork's ReadImageToDatum with min_dim/max_dim (label -1)."""
    if min_dim <= 0 and max_dim <= 0:
        return read_image_to_datum(path, -1, resize_height, resize_width, is_color, encoding)
    chw = read_image(path, is_color)
    scale = scale_for_dims(chw.shape[1], chw.shape[2], min_dim, max_dim)
    if scale != 1.0:
        chw = resize_linear(chw, round(chw.shape[1] * scale), round(chw.shape[2] * scale))
    if not encoding:
        return image_to_datum(chw, -1)
    return caffe_pb2.Datum(data=encode_image(chw, encoding), label=-1, encoded=True)


def convert_annoset(root_folder: str, list_file: str, db_path: str, *, anno_type: str = "classification",
                    label_type: str = "xml", label_map_file: str = "", check_label: bool = False,
                    min_dim: int = 0, max_dim: int = 0, resize_height: int = 0, resize_width: int = 0,
                    backend: str = "lmdb", gray: bool = False, shuffle: bool = False, seed: int = 0,
                    check_size: bool = False, encoded: bool = False, encode_type: str = "") -> int:
    """Write the database (which must not exist yet); returns the number of records stored."""
    if anno_type not in ("classification", "detection"):
        raise ImagesetError(f"-anno_type must be classification or detection, not {anno_type!r}")
    name_to_label: dict[str, int] = {}
    lines = read_pairs(list_file)
    if anno_type == "detection":
        if not label_map_file:
            raise ImagesetError("-anno_type detection needs -label_map_file")
        name_to_label = map_name_to_label(read_label_map(label_map_file), check_label)
    else:
        for image, label, number in lines:
            try:
                int(label)
            except ValueError:
                raise ImagesetError(f"{list_file}:{number}: label {label!r} is not an integer") from None
    if shuffle:
        log.info("Shuffling data")
        order = np.random.default_rng(seed).permutation(len(lines))
        lines = [lines[i] for i in order]
    log.info("A total of %d images.", len(lines))
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
        encoded = True
    data_size = None

    def records():
        nonlocal data_size
        for index, (image, second, number) in enumerate(lines):
            path = root_folder + image
            encoding = encode_type
            if encoded and not encoding:
                encoding = image.rpartition(".")[2].lower() if "." in image else ""
            record = caffe_pb2.AnnotatedDatum()
            try:
                record.datum.CopyFrom(read_image_datum(path, max(0, resize_height), max(0, resize_width),
                                                       max(0, min_dim), max(0, max_dim), not gray, encoding))
            except ImageReadError as e:
                log.warning("Failed to read %s (%s, line %d of %s)", image, e, number, list_file)
                continue
            if anno_type == "classification":
                record.datum.label = int(second)
            else:
                height, width = image_size(path)
                try:
                    annotate(record, root_folder + second, label_type, height, width, name_to_label)
                except AnnotationError as e:
                    raise AnnotationError(f"{e} (line {number} of {list_file})") from None
            if check_size and not record.datum.encoded:
                size = record.datum.channels * record.datum.height * record.datum.width
                if data_size is None:
                    data_size = size
                elif len(record.datum.data) != data_size:
                    raise ImagesetError(f"-check_size: Incorrect data field size {len(record.datum.data)} "
                                        f"for {path} (line {number} of {list_file})")
            key = b"%08d_" % index + image.encode("utf-8", "surrogateescape")
            yield key, record.SerializeToString()

    return write_records(open_db(backend, db_path, NEW), records())


def write_image_sizes(root_folder: str, list_file: str, out_file: str, name_id_file: str = "") -> int:
    """The fork's get_image_size: ``name height width`` per listed image (or ``id height width``
    with a ``name id`` file), names being the image file's stem."""
    lines = read_pairs(list_file)
    name_to_id: dict[str, int] = {}
    if name_id_file:
        for name, ident, number in read_pairs(name_id_file):
            if name in name_to_id:
                raise ImagesetError(f"{name_id_file}:{number}: {name!r} appears twice")
            try:
                name_to_id[name] = int(ident)
            except ValueError:
                raise ImagesetError(f"{name_id_file}:{number}: id {ident!r} is not an integer") from None
        if len(name_to_id) != len(lines):
            raise ImagesetError(f"{name_id_file} has {len(name_to_id)} names for {len(lines)} images")
    rows = []
    for image, _, number in lines:
        path = os.path.join(root_folder, image)
        height, width = image_size(path)
        stem = os.path.splitext(os.path.basename(image))[0]
        if name_to_id:
            if stem not in name_to_id:
                raise ImagesetError(f"{list_file}:{number}: {stem!r} is not in {name_id_file}")
            stem = str(name_to_id[stem])
        rows.append(f"{stem} {height} {width}\n")
    from ..io.protofiles import atomic_write

    atomic_write(out_file, "".join(rows).encode())
    log.info("Processed %d files.", len(rows))
    return len(rows)
