"""A folder of image files and a list file -> a database of Datums, as Caffe's
``convert_imageset`` writes it.

The list file holds one ``FILENAME LABEL`` per line; as in Caffe the label is what follows the
*last* space, so file names may contain spaces. Each file is read from ``root_folder + FILENAME``
(plain concatenation, as Caffe: give the root folder with its trailing slash).

Every image becomes a Datum under the key ``"%08d_%s" % (line_index, FILENAME)`` (the index in
the, possibly shuffled, list, so skipped files leave gaps), committed every 1,000 records:

- raw (default): ``channels``, ``height``, ``width``, ``data`` = uint8 pixels in (C, H, W)
  order, BGR (see :mod:`recaffe.data.image_file`), ``label`` and ``encoded: false``;
- ``encoded`` or ``encode_type``: ``data`` = an image file, ``label``, ``encoded: true`` and no
  shape. As ``ReadImageToDatum``: the file's own bytes when no resize flag is set and its
  extension matches the encoding ("jpg" also matches ".jpeg"); otherwise the decoded (and
  resized) image re-encoded in the encoding, with Pillow. Without ``encode_type`` the
  encoding is the file's extension. Like Caffe, the file's own bytes are stored even with
  ``gray`` (the decoder chooses colour or grey when reading).

Choices where Caffe is unclear or unhelpful:

- files that do not exist or do not decode are skipped, as in Caffe, and logged with their
  list file line;
- a list line without a space and a label, or with a label that is not an integer, is an
  error naming the list file and line (Caffe's ``atoi`` would read it as label 0); blank
  lines are skipped and trailing blanks after a file name are ignored;
- ``shuffle`` is seeded (``seed``, default 0) so a conversion can be repeated; Caffe draws
  from an unseeded generator;
- ``check_size`` with encoded datums is refused (Caffe compares file sizes with pixel counts
  and stops at the second image); a size mismatch stops the conversion with an error naming
  both files; records committed before it stay in the database, as in Caffe.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from ..errors import RecaffeError
from ..io.protofiles import open_regular
from ..log import get_logger
from ..proto import caffe_pb2
from .db import NEW, open_db
from .image_file import ImageReadError, encode_image, pillow_format, read_image

log = get_logger(__name__)

COMMIT_EVERY = 1000


class ImagesetError(RecaffeError, ValueError):
    """A list file or image set that cannot be converted; the message names the file (and line)."""


@dataclass(frozen=True)
class ListEntry:
    filename: str
    label: int
    line: int  # 1-based line number in the list file


def read_list_file(path: str | os.PathLike) -> list[ListEntry]:
    """The ``FILENAME LABEL`` lines of a list file, in order."""
    path = os.fspath(path)
    try:
        with open_regular(path, "list file", mode="r", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        raise ImagesetError(f"list file {path} not found") from None
    except OSError as e:
        raise ImagesetError(f"cannot read list file {path}: {e.strerror or e}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, sep, label = line.rstrip().rpartition(" ")
        name = name.rstrip()
        if not sep or not name:
            raise ImagesetError(f"{path}:{number}: expected 'FILENAME LABEL', got {line!r}")
        try:
            value = int(label)
        except ValueError:
            raise ImagesetError(f"{path}:{number}: the label {label!r} is not an integer") from None
        entries.append(ListEntry(name, value, number))
    return entries


def _matches_extension(filename: str, encoding: str) -> bool:
    """Caffe's matchExt: does the file's extension name ``encoding``?"""
    ext = filename.rpartition(".")[2].lower() if "." in filename else filename.lower()
    enc = encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def image_to_datum(chw: np.ndarray, label: int) -> caffe_pb2.Datum:
    """uint8 (C, H, W) -> a raw Datum as Caffe's CVMatToDatum (``encoded`` set to false)."""
    c, h, w = chw.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=np.ascontiguousarray(chw).tobytes(),
                           label=label, encoded=False)


def read_image_to_datum(path: str, label: int, height: int = 0, width: int = 0, is_color: bool = True,
                        encoding: str = "") -> caffe_pb2.Datum:
    """Caffe's ``ReadImageToDatum``: a raw Datum, or an encoded one when ``encoding`` is given.

    Raises :class:`ImageReadError` when the file does not exist or does not decode.
    """
    chw = read_image(path, is_color, height, width)
    if not encoding:
        return image_to_datum(chw, label)
    if height <= 0 and width <= 0 and _matches_extension(path, encoding):
        with open(path, "rb") as f:
            data = f.read()
    else:
        try:
            data = encode_image(chw, encoding)
        except ImageReadError as e:
            raise ImageReadError(f"{path}: {e}") from None
    return caffe_pb2.Datum(data=data, label=label, encoded=True)


def _progress(total: int, enabled: bool | None):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="img", desc="convert_imageset")


def convert_imageset(root_folder: str, list_file: str | os.PathLike, db_path: str | os.PathLike, *,
                     backend: str = "lmdb", gray: bool = False, shuffle: bool = False, seed: int = 0,
                     resize_height: int = 0, resize_width: int = 0, check_size: bool = False,
                     encoded: bool = False, encode_type: str = "", progress: bool | None = None) -> int:
    """Write the database (which must not exist yet); returns the number of images stored.

    ``progress``: show a progress bar on stderr (default: when stderr is a terminal).
    """
    list_file = os.fspath(list_file)
    entries = read_list_file(list_file)
    if encode_type:
        try:
            pillow_format(encode_type)  # an unknown format fails before anything is written
        except ImageReadError as e:
            raise ImagesetError(f"-encode_type: {e}") from None
    if check_size and (encoded or encode_type):
        raise ImagesetError("-check_size cannot be used with encoded datums (-encoded or -encode_type): "
                            "they hold image files, not pixels")
    if shuffle:
        log.info("Shuffling data")
        order = np.random.default_rng(seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    log.info("A total of %d images.", len(entries))
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
        encoded = True
    resize_height, resize_width = max(0, resize_height), max(0, resize_width)
    if bool(resize_height) != bool(resize_width):
        log.warning("Only one of resize_height and resize_width is set: images are not resized")
    root_hint = ""
    if root_folder and not root_folder.endswith(("/", os.sep)) and os.path.isdir(root_folder):
        root_hint = f" (file names are appended to ROOTFOLDER {root_folder!r} as they are: " \
                    f"did you mean {root_folder + '/'!r}?)"

    first_size: tuple[int, str] | None = None

    def records():
        nonlocal first_size
        with _progress(len(entries), progress) as bar:
            for index, entry in enumerate(entries):
                bar.update(1)
                path = root_folder + entry.filename
                encoding = encode_type
                if encoded and not encoding:
                    if "." not in entry.filename:
                        log.warning("Failed to guess the encoding of '%s'", entry.filename)
                    encoding = entry.filename.rpartition(".")[2]
                try:
                    datum = read_image_to_datum(path, entry.label, resize_height, resize_width, not gray,
                                                encoding)
                except ImageReadError as e:
                    log.error("%s (line %d of %s)%s", e, entry.line, list_file, root_hint)
                    continue
                if check_size:
                    size = datum.channels * datum.height * datum.width
                    if first_size is None:
                        first_size = (size, path)
                    elif len(datum.data) != first_size[0]:
                        raise ImagesetError(
                            f"-check_size: Incorrect data field size {len(datum.data)} for {path} (line "
                            f"{entry.line} of {list_file}): it is {datum.channels}x{datum.height}x"
                            f"{datum.width}, but the first image {first_size[1]} has {first_size[0]} values")
                key = b"%08d_" % index + entry.filename.encode("utf-8", "surrogateescape")
                yield key, datum.SerializeToString()

    return write_records(open_db(backend, db_path, NEW), records())


def write_records(db, records) -> int:
    """Put ``(key, value)`` pairs into ``db`` (then closed), committing every COMMIT_EVERY records
    and logging "Processed N files." as Caffe's converters do; returns the number written. Records
    put before an error stay committed up to the last full batch, as in Caffe."""
    count = 0
    try:
        txn = db.new_transaction()
        for key, value in records:
            txn.put(key, value)
            count += 1
            if count % COMMIT_EVERY == 0:
                txn.commit()
                log.info("Processed %d files.", count)
        if count % COMMIT_EVERY != 0:
            txn.commit()
            log.info("Processed %d files.", count)
    finally:
        db.close()
    return count
