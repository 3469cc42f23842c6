"""Image-file data layers: ImageData (a list of ``path label`` lines) and WindowData (Caffe's
R-CNN window file); the segmentation forks' ImageSegData (DeepLab v2) and DenseImageData (SegNet),
lists of ``image label-image`` pairs. Both prefetch batches in a background thread, as the Data layer does
(``data_param.prefetch`` batches ahead, default 4; 0 loads each batch in ``forward``).

Images are read as Caffe's ``ReadImageToCVMat`` reads them (``recaffe.data.image_file``): BGR
channel order, (C, H, W), resizing with OpenCV's ``INTER_LINEAR`` arithmetic.

Random draws (shuffles, ``rand_skip``, window sampling, crops and mirrors) come from numpy
generators seeded from ``recaffe.rng``'s seed, the layer name and the phase: a run repeats exactly
with the same ``random_seed``, but does not draw Caffe's boost numbers.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import rng
from ..data.image_file import ImageReadError, decode_image_file, read_image, resize_linear
from ..data.transformer import DataTransformer, TransformError, warn_deprecated_transform_fields
from ..io.protofiles import open_regular
from ..layer import register
from .data import PrefetchingDataLayer
from ..log import get_logger
from ..proto import caffe_pb2
from ..errors import RecaffeError

log = get_logger(__name__)


class DataFileError(RecaffeError, ValueError):
    """A list/window file or an image it names that cannot be used; the message names the file."""


def _merged_transform_param(layer_param, old) -> caffe_pb2.TransformationParameter:
    """WindowData's transform: transform_param, with window_data_param's own ``scale/mean_file/
    crop_size/mirror`` moved in when set (Caffe's WindowDataLayer reads those)."""
    tp = caffe_pb2.TransformationParameter()
    tp.CopyFrom(layer_param.transform_param)
    for field in ("scale", "mean_file", "crop_size", "mirror"):
        if old.HasField(field):
            setattr(tp, field, getattr(old, field))
    return tp


def _read_lines(path: str, what: str) -> list[str]:
    try:
        with open_regular(path, what, encoding="utf-8", errors="surrogateescape", mode="r") as f:
            return f.read().split("\n")
    except OSError as e:
        raise DataFileError(f"cannot open the {what} {path!r}: {e.strerror or e}") from None


def read_image_list(source: str) -> list[tuple[str, int, int]]:
    """Caffe's ImageData list file -> ``[(path, label, line_number)]``.

    Each line is split at its *last* space into the image path (which may contain spaces) and
    an integer label. Blank lines are skipped; a line without a space or with a label that is not
    an integer is an error here (Caffe would read ``atoi`` of it, usually 0).
    """
    entries = []
    for lineno, line in enumerate(_read_lines(source, "image list file"), 1):
        line = line.rstrip()
        if not line:
            continue
        pos = line.rfind(" ")
        if pos < 0:
            raise DataFileError(f"{source}:{lineno}: expected '<image path> <label>', got {line!r}")
        try:
            label = int(line[pos + 1:])
        except ValueError:
            raise DataFileError(f"{source}:{lineno}: the label {line[pos + 1:]!r} is not an integer") \
                from None
        entries.append((line[:pos], label, lineno))
    if not entries:
        raise DataFileError(f"the image list file {source!r} lists no images")
    return entries


# --------------------------------------------------------------------------------- ImageData
class _ImageListReader:
    """Reads, transforms and labels batches of listed images (runs in the prefetch thread)."""

    def __init__(self, entries, param: caffe_pb2.ImageDataParameter, transformer: DataTransformer,
                 shuffle_rng: np.random.Generator | None, start: int, np_dtype):
        self.entries = entries
        self.param = param
        self.source = param.source
        self.transformer = transformer
        self.shuffle_rng = shuffle_rng
        self.pos = start
        self.np_dtype = np_dtype

    def shuffle(self) -> None:
        order = self.shuffle_rng.permutation(len(self.entries))
        self.entries = [self.entries[i] for i in order]

    def read(self, index: int) -> np.ndarray:
        path, _, lineno = self.entries[index]
        p = self.param
        try:
            # root_folder is prepended as a string, as Caffe does (give it a trailing '/').
            return read_image(p.root_folder + path, p.is_color, p.new_height, p.new_width)
        except ImageReadError as e:
            raise DataFileError(f"{self.source}:{lineno}: {e}") from None

    def output_shape(self, image: np.ndarray, index: int) -> tuple[int, int, int]:
        try:
            return self.transformer.output_shape(image.shape)
        except TransformError as e:
            path, _, lineno = self.entries[index]
            raise DataFileError(f"{self.source}:{lineno}: image {path!r}: {e}") from None

    def load_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        shape = None
        for _ in range(self.param.batch_size):
            image = self.read(self.pos)
            # The batch takes the shape of its first image (so batches of one may vary in size).
            item_shape = self.output_shape(image, self.pos)
            if shape is None:
                shape = item_shape
            elif item_shape != shape:
                path, _, lineno = self.entries[self.pos]
                raise DataFileError(
                    f"{self.source}:{lineno}: image {path!r} gives a {'x'.join(map(str, item_shape))} "
                    f"item but its batch was shaped {'x'.join(map(str, shape))} by its first image; "
                    f"set new_height/new_width or crop_size to give every image one size")
            images.append(image)
            labels.append(self.entries[self.pos][1])
            self.pos += 1
            if self.pos >= len(self.entries):
                log.debug("Restarting data prefetching from start.")
                self.pos = 0
                if self.shuffle_rng is not None:
                    self.shuffle()
        data = torch.from_numpy(self.transformer.transform_arrays(images))
        return data, torch.from_numpy(np.asarray(labels, dtype=self.np_dtype))


@register("ImageData")
class ImageDataLayer(PrefetchingDataLayer):
    """Images listed in ``image_data_param.source`` (``path label`` per line), transformed by
    ``transform_param``. Tops: data (batch_size, C, H, W) and label (batch_size,).

    ``root_folder`` is prepended to each path; ``is_color: false`` reads 1 grey channel;
    ``new_height``/``new_width`` (both or neither) resize every image first. ``shuffle`` shuffles
    the list at setup and again each time it wraps around; ``rand_skip`` starts at a random line
    below it. Each batch is shaped by its first image: without resize or crop, all images of a
    batch must have one size. The deprecated ``scale/mean_file/crop_size/mirror`` of
    image_data_param are ignored with a warning, as Caffe ignores them.
    """

    exact_num_top_blobs = 2
    batch_errors = (DataFileError, TransformError)

    def layer_setup(self, bottom, top):
        p = self.layer_param.image_data_param
        if (p.new_height == 0) != (p.new_width == 0):
            raise self.error("new_height and new_width must be set at the same time")
        if p.batch_size <= 0:
            raise self.error("image_data_param.batch_size must be positive")
        log.info("Opening file %s", p.source)
        try:
            entries = read_image_list(p.source)
        except DataFileError as e:
            raise self.error(str(e)) from None
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        try:
            warn_deprecated_transform_fields(self.name, "image_data_param", p)
            transformer = DataTransformer(self.layer_param.transform_param, self.phase,
                                          rng.layer_generator(self.name, self.phase, 0), self.dtype)
        except TransformError as e:
            raise self.error(str(e)) from None
        order_rng = rng.layer_generator(self.name, self.phase, 1)
        reader = _ImageListReader(entries, p, transformer, order_rng if p.shuffle else None, 0, np_dtype)
        if p.shuffle:
            log.info("Shuffling data")
            reader.shuffle()
        log.info("A total of %d images.", len(entries))
        if p.rand_skip:
            skip = int(order_rng.integers(p.rand_skip))
            log.info("Skipping first %d data points.", skip)
            if skip >= len(entries):
                raise self.error(f"Not enough points to skip: rand_skip drew {skip}, the list has "
                                 f"{len(entries)} images")
            reader.pos = skip
        try:
            shape = reader.output_shape(reader.read(reader.pos), reader.pos)
        except DataFileError as e:
            raise self.error(str(e)) from None
        top[0].reshape((p.batch_size, *shape))
        log.info("output data size: %d,%d,%d,%d", p.batch_size, *shape)
        top[1].reshape((p.batch_size,))
        self.start_loading(reader)


# -------------------------------------------------------------------------------- WindowData
def _c_round(x) -> int:
    """C's round(): halves away from zero (Python's round() rounds halves to even)."""
    x = float(x)
    r = math.floor(abs(x) + 0.5)
    return int(r if x >= 0 else -r)


def window_geometry(box, image_hw, crop_size: int, context_pad: int, square: bool, mirror: bool,
                    ftype=np.float32):
    """Caffe's WindowData warp for one window, in Caffe's arithmetic (``ftype`` = the net's Dtype).

    ``box`` = (x1, y1, x2, y2), inclusive pixel coordinates. Returns the clipped source box
    (x1, y1, x2, y2), the size (height, width) it is resized to, and the offsets (pad_h, pad_w)
    at which the resized patch is placed in the crop_size x crop_size output (the rest stays 0).

    With ``context_pad`` or ``square`` the box is first expanded around its centre so that, once
    warped, ``context_pad`` pixels of context surround it (``square`` makes it square first);
    the parts outside the image become padding, mirrored with the patch when ``mirror``.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    height, width = image_hw
    f = ftype
    out_h = out_w = crop_size
    pad_h = pad_w = 0
    if context_pad > 0 or square:
        context_scale = f(crop_size) / f(crop_size - 2 * context_pad)
        half_h = f((y2 - y1 + 1) / 2.0)
        half_w = f((x2 - x1 + 1) / 2.0)
        cx = f(x1) + half_w
        cy = f(y1) + half_h
        if square:
            if half_h > half_w:
                half_w = half_h
            else:
                half_h = half_w
        x1 = _c_round(cx - half_w * context_scale)
        x2 = _c_round(cx + half_w * context_scale)
        y1 = _c_round(cy - half_h * context_scale)
        y2 = _c_round(cy + half_h * context_scale)
        unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
        pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
        pad_x2, pad_y2 = max(0, x2 - width + 1), max(0, y2 - height + 1)
        x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
        scale_x = f(crop_size) / f(unclipped_w)
        scale_y = f(crop_size) / f(unclipped_h)
        out_w = _c_round(f(x2 - x1 + 1) * scale_x)
        out_h = _c_round(f(y2 - y1 + 1) * scale_y)
        pad_x1 = _c_round(f(pad_x1) * scale_x)
        pad_x2 = _c_round(f(pad_x2) * scale_x)
        pad_y1 = _c_round(f(pad_y1) * scale_y)
        pad_h = pad_y1
        pad_w = pad_x2 if mirror else pad_x1
        # Rounding may make patch + padding overflow the crop; Caffe trims the patch.
        out_h = min(out_h, crop_size - pad_h)
        out_w = min(out_w, crop_size - pad_w)
    return (x1, y1, x2, y2), (out_h, out_w), (pad_h, pad_w)


def read_window_file(source: str, root_folder: str, fg_threshold: float, bg_threshold: float):
    """Caffe's window file -> (images, fg_windows, bg_windows).

    The file repeats: ``# <image index>``, image path, channels, height, width, number of
    windows, then one ``class overlap x1 y1 x2 y2`` line per window (whitespace-separated tokens,
    as C++ streams read them). ``images`` holds (path with root_folder, channels, line); windows
    are (image index, label, overlap, x1, y1, x2, y2). A window is foreground when
    ``overlap >= fg_threshold`` (its class must be > 0), background (class and overlap forced to 0)
    when ``overlap < bg_threshold``, and dropped in between. Image indices must count 0, 1, 2...
    (Caffe uses them as positions).
    """
    lines = _read_lines(source, "window file")
    tokens = [(tok, n) for n, line in enumerate(lines, 1) for tok in line.split()]
    if len(tokens) < 2:
        raise DataFileError(f"the window file {source!r} is empty")
    pos = 0

    def take(what, kind=int):
        nonlocal pos
        if pos >= len(tokens):
            raise DataFileError(f"{source}: the file ends where {what} was expected")
        tok, n = tokens[pos]
        pos += 1
        try:
            return (kind(tok) if kind is not float else float(np.float32(tok))), n
        except ValueError:
            kind_name = "an integer" if kind is int else "a number"
            raise DataFileError(f"{source}:{n}: {what} {tok!r} is not {kind_name}") from None

    images, fg, bg = [], [], []
    fg_t, bg_t = float(np.float32(fg_threshold)), float(np.float32(bg_threshold))
    while pos < len(tokens):
        tag, n = take("'#'", str)
        if tag != "#":
            raise DataFileError(f"{source}:{n}: expected '#' starting an image entry, got {tag!r}")
        index, n = take("the image index")
        if index != len(images):
            raise DataFileError(f"{source}:{n}: image index {index} out of order (expected {len(images)})")
        path, n = take("the image path", str)
        channels, _ = take("the image channels")
        take("the image height")
        take("the image width")
        num_windows, _ = take("the number of windows")
        images.append((root_folder + path, channels, n))
        for _ in range(num_windows):
            label, n = take("the window class")
            overlap, _ = take("the window overlap", float)
            x1, _ = take("x1")
            y1, _ = take("y1")
            x2, _ = take("x2")
            y2, _ = take("y2")
            if overlap >= fg_t:
                if label <= 0:
                    raise DataFileError(f"{source}:{n}: foreground window (overlap {overlap:g}) has class "
                                        f"{label}; foreground classes must be > 0")
                fg.append((index, label, overlap, x1, y1, x2, y2))
            elif overlap < bg_t:
                bg.append((index, 0, 0.0, x1, y1, x2, y2))
    return images, fg, bg


class _WindowSampler:
    """Samples, warps and labels batches of windows (runs in the prefetch thread)."""

    def __init__(self, source, images, fg, bg, cache, batch_size, num_fg, crop_size, channels, context_pad,
                 square, mirror, scale, mean, mean_values, rng_: np.random.Generator, np_dtype):
        self.source = source
        self.images, self.fg, self.bg, self.cache = images, fg, bg, cache
        self.batch_size, self.num_fg = batch_size, num_fg
        self.crop_size, self.channels, self.context_pad = crop_size, channels, context_pad
        self.square, self.mirror = square, mirror
        self.dtype = np.dtype(np_dtype)
        self.scale = self.dtype.type(scale)
        self.mean = mean  # (C, H, W) or None; its centre crop is used, as Caffe does
        self.mean_values = mean_values  # (C,) or None
        self.rng = rng_

    def image(self, index: int) -> np.ndarray:
        path, _, line = self.images[index]
        try:
            if self.cache is not None:
                return decode_image_file(self.cache[index], is_color=True, name=path)
            return read_image(path, is_color=True)
        except ImageReadError as e:
            raise DataFileError(f"{self.source}:{line}: {e}") from None

    def warp(self, window, do_mirror: bool) -> tuple[np.ndarray, int, int]:
        """The window's patch (C, h, w) (uint8, mirrored if asked) and its (pad_h, pad_w)."""
        img = self.image(window[0])
        _, height, width = img.shape
        box, (out_h, out_w), (pad_h, pad_w) = window_geometry(
            window[3:], (height, width), self.crop_size, self.context_pad, self.square, do_mirror,
            self.dtype.type)
        x1, y1, x2, y2 = box
        if not (0 <= x1 <= x2 < width and 0 <= y1 <= y2 < height) or out_h <= 0 or out_w <= 0:
            path, _, line = self.images[window[0]]
            raise DataFileError(f"{self.source}:{line}: window {tuple(window[3:])} of image {path!r} "
                                f"({width}x{height}) lies outside the image")
        patch = resize_linear(np.ascontiguousarray(img[:, y1:y2 + 1, x1:x2 + 1]), out_h, out_w)
        return (patch[:, :, ::-1] if do_mirror else patch), pad_h, pad_w

    def load_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, crop = self.channels, self.crop_size
        data = np.zeros((self.batch_size, c, crop, crop), dtype=self.dtype)
        labels = np.zeros(self.batch_size, dtype=self.dtype)
        item = 0
        # Background windows first, then foreground, as Caffe fills its batch.
        for pool, count in ((self.bg, self.batch_size - self.num_fg), (self.fg, self.num_fg)):
            for _ in range(count):
                window = pool[int(self.rng.integers(len(pool)))]
                do_mirror = self.mirror and bool(self.rng.integers(2))
                patch, pad_h, pad_w = self.warp(window, do_mirror)
                _, h, w = patch.shape
                value = patch.astype(self.dtype)
                if self.mean is not None:
                    off = (self.mean.shape[2] - crop) // 2  # Caffe uses the width's offset for both axes
                    value -= self.mean[:, off + pad_h:off + pad_h + h, off + pad_w:off + pad_w + w]
                elif self.mean_values is not None:
                    value -= self.mean_values.reshape(c, 1, 1)
                data[item, :, pad_h:pad_h + h, pad_w:pad_w + w] = value * self.scale
                labels[item] = window[1]
                item += 1
        return torch.from_numpy(data), torch.from_numpy(labels)


@register("WindowData")
class WindowDataLayer(PrefetchingDataLayer):
    """Windows of images from Caffe's window file (``window_data_param.source``), for R-CNN.

    Each batch holds ``batch_size * (1 - fg_fraction)`` background windows then the foreground
    ones (the count truncated as Caffe's float product), each drawn uniformly at random from its
    pool. A window is cut out (``crop_mode: "warp"``, or made square first with ``"square"``,
    with ``context_pad`` pixels of context), resized to ``crop_size`` x ``crop_size`` (bilinear),
    mirrored at random when ``mirror``, then ``(pixel - mean) * scale``. ``mean_file`` is
    centre-cropped to the crop size; padding outside the image stays 0. Tops: data
    (batch_size, 3, crop_size, crop_size) and label (batch_size,). Images are read in colour.

    ``crop_size``, ``mirror``, ``mean_file``/``mean_value`` come from ``transform_param`` (the
    deprecated window_data_param fields are used when set). Caffe multiplies by
    ``window_data_param.scale`` only; recaffe uses it when set, else ``transform_param.scale``.
    """

    exact_num_top_blobs = 2
    batch_errors = (DataFileError, TransformError)

    def layer_setup(self, bottom, top):
        p = self.layer_param.window_data_param
        log.info("Window data layer:\n  foreground (object) overlap threshold: %g\n"
                 "  background (non-object) overlap threshold: %g\n  foreground sampling fraction: %g\n"
                 "  cache_images: %d\n  root_folder: %s", p.fg_threshold, p.bg_threshold,
                 p.fg_fraction, p.cache_images, p.root_folder)
        tp = _merged_transform_param(self.layer_param, p)
        crop = int(tp.crop_size)
        if crop <= 0:
            raise self.error("crop_size (transform_param) must be positive: windows are warped to it")
        if p.batch_size <= 0:
            raise self.error("window_data_param.batch_size must be positive")
        if p.crop_mode not in ("warp", "square"):
            raise self.error(f"crop_mode must be \"warp\" or \"square\", got {p.crop_mode!r}")
        if 2 * p.context_pad >= crop:
            raise self.error(f"context_pad {p.context_pad} leaves no room in crop_size {crop}")
        if not 0 <= p.fg_fraction <= 1:
            raise self.error(f"fg_fraction must be between 0 and 1, got {p.fg_fraction:g}")
        try:
            images, fg, bg = read_window_file(p.source, p.root_folder, p.fg_threshold, p.bg_threshold)
            cache = self._cache(p.source, images) if p.cache_images else None
            # The transformer loads and checks mean_file / mean_value; WindowData applies them itself.
            transformer = DataTransformer(tp, self.phase, None, self.dtype)
        except (DataFileError, TransformError) as e:
            raise self.error(str(e)) from None
        self._log_windows(images, fg, bg, p)
        channels = images[-1][1]  # Caffe shapes the top with the last image's channel count
        if channels != 3:
            raise self.error(f"{p.source}:{images[-1][2]}: the last image declares {channels} channels; "
                             f"WindowData reads images in colour (3 channels)")
        num_fg = int(np.float32(p.batch_size) * np.float32(p.fg_fraction))
        for pool, count, what in ((fg, num_fg, "foreground"), (bg, p.batch_size - num_fg, "background")):
            if count and not pool:
                raise self.error(f"{p.source} has no {what} windows, but each batch takes {count}")
        mean = transformer.mean
        if mean is not None:
            off = (mean.shape[2] - crop) // 2
            if mean.shape[0] != channels or off < 0 or off + crop > mean.shape[1]:
                raise self.error(f"the mean_file's mean is {'x'.join(map(str, mean.shape))}; WindowData "
                                 f"needs {channels} channels and at least {crop}x{crop} to crop its centre")
        mean_values = transformer.mean_values
        if mean_values is not None:
            if mean_values.size not in (1, channels):
                raise self.error(f"Specify either 1 mean_value or as many as channels: {channels}")
            mean_values = np.broadcast_to(mean_values, (channels,)).copy()
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        sampler = _WindowSampler(p.source, images, fg, bg, cache, int(p.batch_size), num_fg, crop, channels,
                                 int(p.context_pad), p.crop_mode == "square", bool(tp.mirror),
                                 p.scale if p.HasField("scale") else tp.scale, mean, mean_values,
                                 rng.layer_generator(self.name, self.phase, 0), np_dtype)
        top[0].reshape((p.batch_size, channels, crop, crop))
        log.info("output data size: %d,%d,%d,%d", p.batch_size, channels, crop, crop)
        top[1].reshape((p.batch_size,))
        self.start_loading(sampler)

    @staticmethod
    def _cache(source, images) -> list[bytes]:
        """cache_images: the encoded files, read once at setup (decoded at each use, as Caffe)."""
        cache = []
        for path, _, line in images:
            try:
                with open(path, "rb") as f:
                    cache.append(f.read())
            except OSError:
                raise DataFileError(f"{source}:{line}: Could not open or find file {path}") from None
        return cache

    @staticmethod
    def _log_windows(images, fg, bg, p) -> None:
        log.info("Number of images: %d", len(images))
        hist = {0: len(bg)}
        for w in fg:
            hist[w[1]] = hist.get(w[1], 0) + 1
        for label in sorted(hist):
            log.info("class %d has %d samples", label, hist[label])
        log.info("Amount of context padding: %d", p.context_pad)
        log.info("Crop mode: %s", p.crop_mode)


# ------------------------------------------------------------- forks: segmentation image pairs
def read_pair_list(source: str, with_label: bool = True) -> list[tuple[str, str, int]]:
    """A list of ``image label`` pairs (whitespace-separated, as C++'s ``>>`` reads them) ->
    ``[(image, label, line_number)]``; ``with_label`` false reads only the first token (DeepLab's
    ``label_type: NONE``). Blank lines are skipped; a line lacking its label is an error."""
    entries = []
    for lineno, line in enumerate(_read_lines(source, "image list file"), 1):
        tokens = line.split()
        if not tokens:
            continue
        if with_label and len(tokens) < 2:
            raise DataFileError(f"{source}:{lineno}: expected '<image path> <label path>', got {line!r}")
        entries.append((tokens[0], tokens[1] if with_label else "", lineno))
    if not entries:
        raise DataFileError(f"the image list file {source!r} lists no images")
    return entries


def resize_nearest(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's ``INTER_NEAREST`` resize: destination pixel i takes source floor(i * src / dst)."""
    c, h, w = chw.shape
    rows = np.minimum((np.arange(height) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(width) * (w / width)).astype(np.int64), w - 1)
    return chw[:, rows[:, None], cols[None, :]]


class _SegPairReader:
    """The shared list walking of ImageSegData and DenseImageData: reading position, wrap-around
    with a reshuffle, and errors that name the list file and line."""

    def __init__(self, entries, source: str, root_folder: str, batch_size: int,
                 shuffle_rng: np.random.Generator | None, np_dtype):
        self.entries = entries
        self.source = source
        self.root = root_folder
        self.batch_size = batch_size
        self.shuffle_rng = shuffle_rng
        self.pos = 0
        self.np_dtype = np_dtype

    def shuffle(self) -> None:
        order = self.shuffle_rng.permutation(len(self.entries))
        self.entries = [self.entries[i] for i in order]

    def advance(self) -> None:
        self.pos += 1
        if self.pos >= len(self.entries):
            log.debug("Restarting data prefetching from start.")
            self.pos = 0
            if self.shuffle_rng is not None:
                self.shuffle()

    def read(self, path: str, is_color: bool, height: int, width: int, lineno: int) -> np.ndarray:
        try:
            return read_image(self.root + path, is_color, height, width)
        except ImageReadError as e:
            raise DataFileError(f"{self.source}:{lineno}: {e}") from None

    def fail(self, lineno: int, message: str) -> DataFileError:
        return DataFileError(f"{self.source}:{lineno}: {message}")


class _ImageSegReader(_SegPairReader):
    """DeepLab v2's ImageSegDataLayer::load_batch and DataTransformer::TransformImgAndSeg."""

    def __init__(self, entries, p: caffe_pb2.ImageDataParameter, tp: caffe_pb2.TransformationParameter,
                 phase: int, gen: np.random.Generator, shuffle_rng, np_dtype):
        super().__init__(entries, p.source, p.root_folder, p.batch_size, shuffle_rng, np_dtype)
        self.p = p
        self.crop = int(tp.crop_size)
        self.mirror = bool(tp.mirror)
        self.scale = np.float64(tp.scale)
        self.mean_values = list(tp.mean_value)
        self.train = phase == caffe_pb2.TRAIN
        self.gen = gen

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path, label_path, lineno = self.entries[index]
        p = self.p
        image = self.read(path, p.is_color, p.new_height, p.new_width, lineno)
        if p.label_type == caffe_pb2.ImageDataParameter.PIXEL:
            # the fork reads the label image with the image's (bilinear) resize
            seg = self.read(label_path, False, p.new_height, p.new_width, lineno)
            if seg.shape[1:] != image.shape[1:]:
                raise self.fail(lineno, f"label image {label_path!r} is {seg.shape[1]}x{seg.shape[2]}, "
                                        f"image {path!r} is {image.shape[1]}x{image.shape[2]}")
        else:
            if p.label_type == caffe_pb2.ImageDataParameter.IMAGE:
                try:
                    value = int(label_path)
                except ValueError:
                    raise self.fail(lineno, f"label_type IMAGE needs an integer label, got "
                                            f"{label_path!r}") from None
            else:
                value = p.ignore_label
            seg = np.full((1, *image.shape[1:]), value, dtype=np.int64)
        return image, seg

    def item_shape(self, image: np.ndarray) -> tuple[int, int, int]:
        c, h, w = image.shape
        return (c, self.crop, self.crop) if self.crop else (c, h, w)

    def mean(self, channels: int) -> np.ndarray:
        if not self.mean_values:
            return np.zeros(channels)
        values = self.mean_values * channels if len(self.mean_values) == 1 else self.mean_values
        return np.asarray(values[:channels], dtype=np.float64)

    def transform(self, image: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, h, w = image.shape
        mean = self.mean(c)
        do_mirror = self.mirror and bool(self.gen.integers(2))
        img = image.astype(np.float64)
        if self.crop:
            pad_h, pad_w = max(self.crop - h, 0), max(self.crop - w, 0)
            if pad_h or pad_w:  # pad at the bottom/right: the image with the mean, the label ignored
                padded = np.empty((c, h + pad_h, w + pad_w))
                padded[:] = mean[:, None, None]
                padded[:, :h, :w] = img
                img = padded
                lab = np.full((1, h + pad_h, w + pad_w), self.p.ignore_label, dtype=np.int64)
                lab[:, :h, :w] = seg
                seg = lab
            hh, ww = img.shape[1:]
            if self.train:
                h_off = int(self.gen.integers(hh - self.crop + 1))
                w_off = int(self.gen.integers(ww - self.crop + 1))
            else:
                h_off, w_off = (hh - self.crop) // 2, (ww - self.crop) // 2
            img = img[:, h_off:h_off + self.crop, w_off:w_off + self.crop]
            seg = seg[:, h_off:h_off + self.crop, w_off:w_off + self.crop]
        data = (img - mean[:, None, None]) * self.scale if self.mean_values else img * self.scale
        if do_mirror:
            data, seg = data[:, :, ::-1], seg[:, :, ::-1]
        return data.astype(self.np_dtype), seg.astype(self.np_dtype)

    def load_batch(self):
        datas, labels, dims = [], [], []
        shape = None
        for _ in range(self.batch_size):
            image, seg = self.read_pair(self.pos)
            item = self.item_shape(image)
            if shape is None:
                shape = item
            elif item != shape:
                path, _, lineno = self.entries[self.pos]
                raise self.fail(lineno, f"image {path!r} gives a {'x'.join(map(str, item))} item but its "
                                        f"batch was shaped {'x'.join(map(str, shape))} by its first image; "
                                        f"set new_height/new_width or crop_size")
            data, lab = self.transform(image, seg)
            datas.append(data)
            labels.append(lab)
            dims.append([min(shape[1], image.shape[1]), min(shape[2], image.shape[2])])
            self.advance()
        dim = np.asarray(dims, dtype=self.np_dtype).reshape(-1, 1, 1, 2)
        return torch.from_numpy(np.stack(datas)), torch.from_numpy(np.stack(labels)), torch.from_numpy(dim)


def _start_pair_reader(layer, reader, entries_count: int, rand_skip: int, order_rng) -> None:
    if reader.shuffle_rng is not None:
        log.info("Shuffling data")
        reader.shuffle()
    log.info("A total of %d images.", entries_count)
    if rand_skip:
        skip = int(order_rng.integers(rand_skip))
        log.info("Skipping first %d data points.", skip)
        if skip >= entries_count:
            raise layer.error(f"Not enough points to skip: rand_skip drew {skip}, the list has "
                              f"{entries_count} images")
        reader.pos = skip


@register("ImageSegData")
class ImageSegDataLayer(PrefetchingDataLayer):
    """DeepLab v2's images and label maps. ``image_data_param.source`` lists ``image label``
    lines (``label_type: PIXEL``, the default IMAGE: an integer label filling the map, NONE: image
    paths only, the map filled with ``ignore_label``). Tops: data (N, C, H, W), label (N, 1, H, W)
    and data_dim (N, 1, 1, 2), each image's (height, width) after resizing, clipped to the blob's.

    ``new_height``/``new_width`` resize the image and (bilinearly, as the fork) the label image.
    ``transform_param``: with ``crop_size`` an image smaller than the crop is first padded at the
    bottom/right with the mean values (its label with ``ignore_label``), then cropped (random in
    TRAIN, centred in TEST), identically for image and label; ``mirror`` flips both; data =
    (pixel - mean_value) * scale; labels are the raw values. ``mean_file`` is refused, as the fork.
    """

    exact_num_top_blobs = 3
    min_top_blobs = 3
    max_top_blobs = 3
    auto_top_blobs = True
    batch_errors = (DataFileError,)

    def layer_setup(self, bottom, top):
        p = self.layer_param.image_data_param
        tp = self.layer_param.transform_param
        if tp.HasField("mean_file"):
            raise self.error("ImageSegData does not support mean_file (use mean_value)")
        if (p.new_height == 0) != (p.new_width == 0):
            raise self.error("new_height and new_width must be set at the same time")
        if p.batch_size <= 0:
            raise self.error("image_data_param.batch_size must be positive")
        if len(tp.mean_value) > 1 and len(tp.mean_value) != (3 if p.is_color else 1):
            raise self.error(f"give one mean_value or one per channel, got {len(tp.mean_value)}")
        log.info("Opening file %s", p.source)
        try:
            entries = read_pair_list(p.source, p.label_type != caffe_pb2.ImageDataParameter.NONE)
        except DataFileError as e:
            raise self.error(str(e)) from None
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        order_rng = rng.layer_generator(self.name, self.phase, 1)
        reader = _ImageSegReader(entries, p, tp, self.phase, rng.layer_generator(self.name, self.phase, 0),
                                 order_rng if p.shuffle else None, np_dtype)
        _start_pair_reader(self, reader, len(entries), p.rand_skip, order_rng)
        try:
            image, _ = reader.read_pair(reader.pos)
        except DataFileError as e:
            raise self.error(str(e)) from None
        c, h, w = reader.item_shape(image)
        top[0].reshape((p.batch_size, c, h, w))
        top[1].reshape((p.batch_size, 1, h, w))
        top[2].reshape((p.batch_size, 1, 1, 2))
        log.info("output data size: %d,%d,%d,%d", p.batch_size, c, h, w)
        self.start_loading(reader)


class _DenseImageReader(_SegPairReader):
    """SegNet's DenseImageDataLayer::InternalThreadEntry."""

    def __init__(self, entries, p: caffe_pb2.DenseImageDataParameter, transformer: DataTransformer,
                 gen: np.random.Generator, shuffle_rng, np_dtype):
        super().__init__(entries, p.source, p.root_folder, p.batch_size, shuffle_rng, np_dtype)
        self.p = p
        self.transformer = transformer
        self.gen = gen

    def read_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path, label_path, lineno = self.entries[index]
        p = self.p
        image = self.read(path, p.is_color, p.new_height, p.new_width, lineno)
        label = self.read(label_path, False, 0, 0, lineno)
        if p.new_height > 0 and p.new_width > 0:
            label = resize_nearest(label, p.new_height, p.new_width)
        if label.shape[1:] != image.shape[1:]:
            raise self.fail(lineno, f"label image {label_path!r} is {label.shape[1]}x{label.shape[2]}, image "
                                    f"{path!r} is {image.shape[1]}x{image.shape[2]}: input and label image "
                                    f"heights and widths must match")
        return image, label

    def item_shape(self, image: np.ndarray) -> tuple[int, int, int]:
        p = self.p
        c, h, w = image.shape
        return (c, p.crop_height, p.crop_width) if p.crop_height > 0 else (c, h, w)

    def load_batch(self):
        p = self.p
        images, labels = [], []
        shape = None
        for _ in range(self.batch_size):
            image, label = self.read_pair(self.pos)
            path, _, lineno = self.entries[self.pos]
            if p.mirror and bool(self.gen.integers(2)):
                image, label = image[:, :, ::-1], label[:, :, ::-1]
            if p.crop_height > 0:
                h, w = image.shape[1:]
                if h < p.crop_height or w < p.crop_width:
                    raise self.fail(lineno, f"image {path!r} ({h}x{w}) is smaller than the crop "
                                            f"{p.crop_height}x{p.crop_width}")
                h_off = int(self.gen.integers(h - p.crop_height + 1))
                w_off = int(self.gen.integers(w - p.crop_width + 1))
                image = image[:, h_off:h_off + p.crop_height, w_off:w_off + p.crop_width]
                label = label[:, h_off:h_off + p.crop_height, w_off:w_off + p.crop_width]
            item = tuple(image.shape)
            if shape is None:
                shape = item
            elif item != shape:
                raise self.fail(lineno, f"image {path!r} gives a {'x'.join(map(str, item))} item but its "
                                        f"batch was shaped {'x'.join(map(str, shape))} by its first image; "
                                        f"set new_height/new_width or crop_height/crop_width")
            images.append(np.ascontiguousarray(image))
            labels.append(label.astype(self.np_dtype))
            self.advance()
        try:
            data = self.transformer.transform_arrays(images)
        except TransformError as e:
            raise DataFileError(f"{self.source}: {e}") from None
        return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(np.stack(labels))


@register("DenseImageData")
class DenseImageDataLayer(PrefetchingDataLayer):
    """SegNet's images and label images. ``dense_image_data_param.source`` lists ``image label``
    pairs. Tops: data (N, C, H, W) and label (N, 1, H, W), the label image's raw values.

    ``new_height``/``new_width`` resize the image bilinearly and the label by nearest neighbour;
    ``mirror`` flips both at random; ``crop_height``/``crop_width`` crop both at one random
    offset (in every phase, as the fork). ``transform_param`` applies its ``scale`` and mean to
    the image only; its ``mirror``/``crop_size`` are refused (the fork aborts on them: they would
    transform the image and the label differently). ``shuffle``, ``rand_skip``, ``root_folder``,
    ``is_color`` are as in ImageData.
    """

    exact_num_top_blobs = 2
    min_top_blobs = 2
    max_top_blobs = 2
    auto_top_blobs = True
    batch_errors = (DataFileError,)

    def layer_setup(self, bottom, top):
        p = self.layer_param.dense_image_data_param
        tp = self.layer_param.transform_param
        if (p.new_height == 0) != (p.new_width == 0):
            raise self.error("new_height and new_width must be set at the same time")
        if (p.crop_height == 0) != (p.crop_width == 0):
            raise self.error("crop_height and crop_width must be set at the same time")
        if p.batch_size <= 0:
            raise self.error("dense_image_data_param.batch_size must be positive")
        if tp.mirror or tp.crop_size:
            raise self.error("transform_param mirror/crop_size would transform the image and its label "
                             "differently; use dense_image_data_param's mirror and crop_height/crop_width")
        log.info("Opening file %s", p.source)
        try:
            entries = read_pair_list(p.source)
            transformer = DataTransformer(tp, self.phase, rng.layer_generator(self.name, self.phase, 2),
                                          self.dtype)
        except (DataFileError, TransformError) as e:
            raise self.error(str(e)) from None
        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype
        order_rng = rng.layer_generator(self.name, self.phase, 1)
        reader = _DenseImageReader(entries, p, transformer, rng.layer_generator(self.name, self.phase, 0),
                                   order_rng if p.shuffle else None, np_dtype)
        _start_pair_reader(self, reader, len(entries), p.rand_skip, order_rng)
        try:
            image, _ = reader.read_pair(reader.pos)
        except DataFileError as e:
            raise self.error(str(e)) from None
        c, h, w = reader.item_shape(image)
        top[0].reshape((p.batch_size, c, h, w))
        top[1].reshape((p.batch_size, 1, h, w))
        log.info("output data size: %d,%d,%d,%d", p.batch_size, c, h, w)
        self.start_loading(reader)
