"""Caffe's DataTransformer: Datum -> float array, with crop, mirror, mean subtraction and scale.

For every item, in Caffe's order:

1. decode: ``data`` (uint8 CHW bytes) or ``float_data``; ``encoded`` datums are image files
   decoded with Pillow into BGR(A) channel order as OpenCV does (``force_color`` -> 3 channels,
   ``force_gray`` -> 1 channel, else the file's own channels);
2. crop to ``crop_size`` x ``crop_size``: a random offset in TRAIN, the centre (rounded down) in TEST;
3. subtract the mean: ``mean_file`` (a BlobProto the size of the *uncropped* datum, cropped at the
   same offset) or ``mean_value`` (one for all channels or one per channel);
4. multiply by ``scale``;
5. mirror (flip left-right) when ``mirror`` is set and a coin flip says so, TRAIN and TEST alike.

``value = (pixel - mean) * scale`` is computed in the output dtype, as Caffe computes it in Dtype.
Batches of equally sized items are transformed with whole-array numpy operations.

NVCaffe's random resize (``img_rand_resize_lower``/``upper``, ``rand_resize_ratio_*``, ``*_stretch_*``,
``interpolation_algo_down``/``up``, ``allow_upscale``; NVIDIA/caffe's ``image_random_resize``) comes
before step 2, item by item, in TRAIN and TEST alike (NVCaffe does not look at the phase): the short side
is drawn from [lower, upper], the long side scaled with it, optionally set to the short side times a
ratio, the height and width stretched, each kept at least ``crop_size`` and (without ``allow_upscale``)
at most the original; the image is resized with OpenCV's rules (:func:`resize_image`). Then it is
cropped to ``crop_size`` and the ``mean_file`` image is *centre-cropped* to ``crop_size`` (NVCaffe's
rule: the mean's size need not be the datum's).
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from .. import rng as _rng
from ..blob import Blob
from ..errors import RecaffeError
from ..io.protofiles import ProtoFileError, read_binary
from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger(__name__)


class TransformError(RecaffeError, ValueError):
    """Data that the transformation parameters cannot apply to (sizes, mean, decoding)."""


def _np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)
    return np.dtype(dtype)


def decode_image(data: bytes, force_color: bool = False, force_gray: bool = False) -> np.ndarray:
    """An encoded image file -> uint8 (C, H, W) in OpenCV's channel order (BGR, BGRA or gray).

    ``force_color``/``force_gray`` decode as ``cv::imdecode`` with IMREAD_COLOR/IMREAD_GRAYSCALE
    (the reader convert_imageset and ImageData use); otherwise the file's own channels are kept,
    as Caffe's DecodeDatumToCVMatNative does.
    """
    from PIL import Image, UnidentifiedImageError

    if force_color or force_gray:
        from .image_file import ImageReadError, decode_image_file
        try:
            return decode_image_file(data, is_color=force_color, name=f"the encoded datum ({len(data)} bytes)")
        except ImageReadError as e:
            raise TransformError(str(e)) from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError as e:
        raise TransformError(f"the encoded datum ({len(data)} bytes): refused to decode a possible "
                             f"decompression bomb ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise TransformError(f"cannot decode the encoded datum ({len(data)} bytes) as an image: {e}") \
            from None
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    elif img.mode == "LA":
        img = img.convert("RGBA")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode not in ("L", "RGB", "RGBA"):
        raise TransformError(f"encoded image of mode {img.mode!r}: image data type must be unsigned byte")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        return arr[None]
    arr = arr.transpose(2, 0, 1)
    # OpenCV's order: RGB -> BGR, RGBA -> BGRA.
    order = [2, 1, 0] + ([3] if arr.shape[0] == 4 else [])
    return np.ascontiguousarray(arr[order])


_NV_RESIZE_SET_FIELDS = ("rand_resize_ratio_lower", "rand_resize_ratio_upper", "vertical_stretch_lower",
                         "vertical_stretch_upper", "horizontal_stretch_lower", "horizontal_stretch_upper")


def random_resize_enabled(p: caffe_pb2.TransformationParameter) -> bool:
    """NVCaffe's image_random_resize_enabled: a size bound is non-zero, or a ratio/stretch field is set
    (even to its default)."""
    return bool(p.img_rand_resize_lower or p.img_rand_resize_upper
                or any(p.HasField(f) for f in _NV_RESIZE_SET_FIELDS))


def _area_weights(src: int, dst: int) -> np.ndarray:
    """OpenCV's INTER_AREA weights (dst x src) on a shrinking (or equal) axis: each output pixel is
    the mean of the source cells it covers, fractional cells weighted by the covered part
    (computeResizeAreaTab)."""
    scale = src / dst
    w = np.zeros((dst, src), dtype=np.float64)
    for dx in range(dst):
        f1 = dx * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s1, s2 = int(np.ceil(f1)), int(np.floor(f2))
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        if s1 - f1 > 1e-3:
            w[dx, s1 - 1] = (s1 - f1) / cell
        w[dx, s1:s2] = 1.0 / cell
        if f2 - s2 > 1e-3:
            w[dx, s2] = min(min(f2 - s2, 1.0), cell) / cell
    return w


def _area_up_weights(src: int, dst: int) -> np.ndarray:
    """OpenCV's INTER_AREA weights (dst x src) when the image grows on some axis: linear
    interpolation between the two source pixels the output cell straddles (cv::resize's area_mode)."""
    inv = dst / src
    scale = src / dst
    w = np.zeros((dst, src), dtype=np.float64)
    for dx in range(dst):
        sx = int(np.floor(dx * scale))
        fx = (dx + 1) - (sx + 1) * inv
        fx = 0.0 if fx <= 0 else fx - np.floor(fx)
        if sx < 0:
            sx, fx = 0, 0.0
        if sx >= src - 1:
            sx, fx = src - 1, 0.0
        w[dx, sx] += 1.0 - fx
        w[dx, min(sx + 1, src - 1)] += fx
    return w


def resize_image(img: np.ndarray, height: int, width: int, algo: int) -> np.ndarray:
    """``cv::resize`` of a (C, H, W) image to ``height`` x ``width`` with an
    ``InterpolationAlgo``; uint8 images are rounded (half to even) and saturated as OpenCV's
    ``saturate_cast``, float images are returned as float32.

    INTER_NEAREST takes source pixel ``floor(d * src/dst)`` as OpenCV does (exact). INTER_LINEAR and
    INTER_CUBIC are torch's ``bilinear``/``bicubic`` (align_corners=False, a = -0.75: OpenCV's
    sampling and kernel), INTER_AREA OpenCV's area weights; OpenCV computes these in fixed point for
    uint8, so a pixel may differ by one.
    """
    c, h, w = img.shape
    if (h, w) == (height, width):
        return img
    T = caffe_pb2.TransformationParameter
    if algo == T.INTER_NEAREST:
        ys = np.minimum(np.floor(np.arange(height) * (1.0 / (height / h))).astype(np.int64), h - 1)
        xs = np.minimum(np.floor(np.arange(width) * (1.0 / (width / w))).astype(np.int64), w - 1)
        return np.ascontiguousarray(img[:, ys[:, None], xs[None, :]])
    x = img.astype(np.float32 if img.dtype != np.float64 else np.float64)
    if algo in (T.INTER_LINEAR, T.INTER_CUBIC):
        mode = "bilinear" if algo == T.INTER_LINEAR else "bicubic"
        out = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None],
                                              size=(height, width), mode=mode,
                                              align_corners=False)[0].numpy()
    elif algo == T.INTER_AREA:
        weights = _area_weights if height <= h and width <= w else _area_up_weights
        out = np.einsum("yh,chw,xw->cyx", weights(h, height), x.astype(np.float64), weights(w, width))
    else:
        raise TransformError(f"interpolation algorithm {algo} is not one of INTER_NEAREST, "
                             f"INTER_LINEAR, INTER_CUBIC, INTER_AREA")
    if img.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(np.float32)


DEPRECATED_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def warn_deprecated_transform_fields(layer_name: str, param_name: str, old) -> None:
    """Caffe's data layers read only ``transform_param``: the deprecated ``scale``/``mean_file``/
    ``crop_size``/``mirror`` of ``data_param``/``image_data_param`` are moved there when a V1 net is
    upgraded (io/upgrade.py) and are otherwise ignored. Ignoring them silently would surprise."""
    fields = [f for f in DEPRECATED_TRANSFORM_FIELDS if old.HasField(f)]
    if fields:
        log.warning("Layer %s: %s.%s %s deprecated and ignored, as in Caffe; put %s in transform_param",
                    layer_name, param_name, "/".join(fields), "is" if len(fields) == 1 else "are",
                    "it" if len(fields) == 1 else "them")


class DataTransformer:
    """Applies a ``TransformationParameter`` to Datums or (C, H, W) arrays.

    ``rng`` draws the random crops and mirrors; by default one seeded from ``recaffe.rng``.
    """

    def __init__(self, param: caffe_pb2.TransformationParameter | None = None,
                 phase: int = caffe_pb2.TRAIN, rng: np.random.Generator | None = None,
                 dtype=np.float32):
        self.param = param if param is not None else caffe_pb2.TransformationParameter()
        p = self.param
        self.phase = phase
        self.dtype = _np_dtype(dtype)
        self.scale = np.asarray(p.scale, dtype=self.dtype)
        self.crop_size = int(p.crop_size)
        self.mirror = bool(p.mirror)
        self.rng = rng if rng is not None else np.random.default_rng(_rng.get_seed())
        self._warned_force = False
        if p.force_color and p.force_gray:
            # Caffe checks this when it meets an encoded datum; the combination is never valid.
            raise TransformError("cannot set both force_color and force_gray")
        self.mean: np.ndarray | None = None        # (C, H, W) from mean_file
        self.mean_values: np.ndarray | None = None  # (k,) from mean_value
        if p.HasField("mean_file"):
            if len(p.mean_value):
                raise TransformError("Cannot specify mean_file and mean_value at the same time")
            log.info("Loading mean file from: %s", p.mean_file)
            try:
                proto = read_binary(p.mean_file, caffe_pb2.BlobProto(), what="BlobProto (mean file)")
            except ProtoFileError as e:
                raise TransformError(f"cannot read mean_file: {e}") from None
            blob = Blob((), torch.float64)
            try:
                blob.from_proto(proto)
            except ValueError as e:
                raise TransformError(f"mean_file {p.mean_file!r}: {e}") from None
            c, h, w = blob.channels, blob.height, blob.width
            flat = blob.data.reshape(-1)
            if flat.size < c * h * w or c * h * w == 0:
                raise TransformError(f"mean_file {p.mean_file!r} holds no mean image "
                                     f"(blob shape {blob.shape})")
            self.mean = flat[:c * h * w].reshape(c, h, w).astype(self.dtype)
        elif len(p.mean_value):
            self.mean_values = np.asarray(list(p.mean_value), dtype=self.dtype)
        self.resize_enabled = random_resize_enabled(p)
        self._crop_mean: np.ndarray | None = None  # with random resize: the mean centre-cropped
        if self.resize_enabled:
            lo, up = int(p.img_rand_resize_lower), int(p.img_rand_resize_upper)
            if lo > 0 and up > 0 and up < lo:
                raise TransformError(f"img_rand_resize_upper ({up}) can't be less than "
                                     f"img_rand_resize_lower ({lo})")
            if lo > 0 and up > 0:
                self._size_range = (lo, up)
            else:
                self._size_range = None
                if lo or up:
                    log.warning("img_rand_resize_lower %d / img_rand_resize_upper %d: both must be "
                                "positive for a random size; the short side is kept, as NVCaffe does",
                                lo, up)
            if not self.crop_size:
                raise TransformError("the random resize (img_rand_resize_*, rand_resize_ratio_*, "
                                     "*_stretch_*) needs crop_size: resized images differ in size, "
                                     "and crop_size brings a batch to one size")
            if self.mean is not None:
                mc, mh, mw = self.mean.shape
                if mh < self.crop_size or mw < self.crop_size:
                    raise TransformError(f"mean_file {p.mean_file!r} is {mh}x{mw}, smaller than "
                                         f"crop_size {self.crop_size}: with the random resize the mean "
                                         f"is centre-cropped to crop_size")
                t, l = (mh - self.crop_size) // 2, (mw - self.crop_size) // 2
                self._crop_mean = np.ascontiguousarray(
                    self.mean[:, t:t + self.crop_size, l:l + self.crop_size])

    @property
    def needs_rand(self) -> bool:
        return self.mirror or (self.phase == caffe_pb2.TRAIN and self.crop_size > 0) or self.resize_enabled

    # ---------------------------------------------------------------- NVCaffe's random resize
    def _rand_float(self, a: float, b: float) -> np.float32:
        """NVCaffe's Rand(a, b): uniform between the two (either order); ``a`` without a draw when equal."""
        if a == b:
            return np.float32(a)
        lo, up = min(a, b), max(a, b)
        return np.float32(self.rng.uniform(lo, up))

    def random_resize_size(self, h: int, w: int) -> tuple[int, int]:
        """The (height, width) NVCaffe's image_random_resize draws for an ``h`` x ``w`` image, in
        its order and float32 arithmetic: short side, ratio, vertical then horizontal stretch."""
        p = self.param
        f32 = np.float32
        new_size = min(h, w)
        if self._size_range is not None:
            lo, up = self._size_range
            new_size = lo + int(self.rng.integers(0, up - lo + 1))
        scale = f32(new_size) / f32(h) if w >= h else f32(new_size) / f32(w)
        fh, fw = scale * f32(h), scale * f32(w)
        rlo, rup = p.rand_resize_ratio_lower, p.rand_resize_ratio_upper
        if rlo >= 1.0 and rup > 1.0:
            ratio = self._rand_float(rlo, rup)
            if fw > fh:
                fw = fh * ratio
            elif fw < fh:
                fh = fw * ratio
            elif self.rng.integers(0, 2) > 0:
                fw = fh * ratio
            else:
                fh = fw * ratio
        if p.vertical_stretch_lower > 0 and p.vertical_stretch_upper > 0:
            fh = fh * self._rand_float(p.vertical_stretch_lower, p.vertical_stretch_upper)
        if p.horizontal_stretch_lower > 0 and p.horizontal_stretch_upper > 0:
            fw = fw * self._rand_float(p.horizontal_stretch_lower, p.horizontal_stretch_upper)
        # std::lround: halves away from zero (the sizes are positive)
        nh = max(self.crop_size, int(np.floor(float(fh) + 0.5)))
        nw = max(self.crop_size, int(np.floor(float(fw) + 0.5)))
        if not p.allow_upscale:
            nh, nw = min(nh, h), min(nw, w)
        return nh, nw

    def random_resize(self, img: np.ndarray) -> np.ndarray:
        """One (C, H, W) image through NVCaffe's image_random_resize (draws from ``self.rng``)."""
        _, h, w = img.shape
        nh, nw = self.random_resize_size(h, w)
        if (nh, nw) == (h, w):
            return img
        p = self.param
        algo = p.interpolation_algo_down if nh <= h and nw <= w else p.interpolation_algo_up
        return resize_image(img, nh, nw, algo)

    # ------------------------------------------------------------------------ decoding
    def decode(self, datum: caffe_pb2.Datum) -> np.ndarray:
        """The datum's values as a (C, H, W) array: uint8 for bytes/images, float32 for float_data."""
        p = self.param
        if datum.encoded:
            return decode_image(datum.data, p.force_color, p.force_gray)
        if (p.force_color or p.force_gray) and not self._warned_force:
            log.error("force_color and force_gray only for encoded datum")
            self._warned_force = True
        c, h, w = datum.channels, datum.height, datum.width
        if c <= 0 or h <= 0 or w <= 0:
            raise TransformError(f"datum has shape channels={c} height={h} width={w}; all must be > 0")
        n = c * h * w
        if len(datum.data):
            if len(datum.data) != n:
                raise TransformError(f"datum holds {len(datum.data)} data bytes, but its shape "
                                     f"{c}x{h}x{w} needs {n}")
            return np.frombuffer(datum.data, dtype=np.uint8).reshape(c, h, w)
        if len(datum.float_data):
            if len(datum.float_data) != n:
                raise TransformError(f"datum holds {len(datum.float_data)} float_data values, but its "
                                     f"shape {c}x{h}x{w} needs {n}")
            return np.asarray(datum.float_data, dtype=np.float32).reshape(c, h, w)
        raise TransformError(f"datum of shape {c}x{h}x{w} holds neither data nor float_data")

    # --------------------------------------------------------------------------- shapes
    def output_shape(self, chw: Sequence[int]) -> tuple[int, int, int]:
        """The (C, H, W) an item of ``chw`` becomes; checks the crop and the mean against it."""
        c, h, w = (int(v) for v in chw)
        crop = self.crop_size
        if self.resize_enabled and self.param.allow_upscale:
            pass  # the resized image is at least crop_size on both sides
        elif crop and (h < crop or w < crop):
            raise TransformError(f"crop_size {crop} is larger than the datum ({h}x{w})"
                                 + (" (the random resize does not upscale without allow_upscale)"
                                    if self.resize_enabled else ""))
        if self.resize_enabled:
            if self.mean is not None and self.mean.shape[0] != c:
                raise TransformError(f"the mean_file's mean has {self.mean.shape[0]} channels, the "
                                     f"datum {c}")
        elif self.mean is not None and self.mean.shape != (c, h, w):
            raise TransformError(f"the mean_file's mean is {'x'.join(map(str, self.mean.shape))} "
                                 f"(channels x height x width), the datum is {c}x{h}x{w}")
        if self.mean_values is not None and self.mean_values.size not in (1, c):
            raise TransformError(f"Specify either 1 mean_value or as many as channels: {c} "
                                 f"({self.mean_values.size} given)")
        return (c, crop, crop) if crop else (c, h, w)

    def infer_blob_shape(self, datum: caffe_pb2.Datum | np.ndarray) -> list[int]:
        """Caffe's InferBlobShape: ``[1, C, H', W']`` for one transformed item."""
        arr = datum if isinstance(datum, np.ndarray) else self.decode(datum)
        return [1, *self.output_shape(arr.shape)]

    # -------------------------------------------------------------------------- transform
    def transform(self, datum: caffe_pb2.Datum | np.ndarray) -> np.ndarray:
        """One datum (or a decoded (C, H, W) array) -> transformed (C, H', W')."""
        arr = datum if isinstance(datum, np.ndarray) else self.decode(datum)
        return self.transform_arrays([arr])[0]

    def transform_datums(self, datums: Sequence[caffe_pb2.Datum]) -> np.ndarray:
        """Datums -> (N, C, H', W'); raw uint8 datums of one size are decoded in a single step."""
        if not datums:
            raise TransformError("There is no datum to transform")
        first = datums[0]
        shape = (first.channels, first.height, first.width)
        n = shape[0] * shape[1] * shape[2]
        if (not first.encoded and n > 0 and all(not d.encoded and len(d.data) == n
                                                and (d.channels, d.height, d.width) == shape
                                                for d in datums)):
            if self.param.force_color or self.param.force_gray:
                self.decode(first)  # logs the "encoded only" complaint once
            x = np.frombuffer(b"".join([d.data for d in datums]), dtype=np.uint8)
            return self.transform_arrays(x.reshape(len(datums), *shape))
        return self.transform_arrays([self.decode(d) for d in datums])

    def transform_arrays(self, arrays: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """A stack (N, C, H, W) or a list of (C, H, W) arrays -> transformed (N, C, H', W').

        Every item must transform to the same shape (the first item's); items of different input
        sizes are allowed when cropping brings them to one size, as in Caffe.
        """
        items = list(arrays) if not isinstance(arrays, np.ndarray) else arrays
        n = len(items)
        if n == 0:
            raise TransformError("There is no datum to transform")
        in_shapes = [tuple(a.shape) for a in items] if not isinstance(items, np.ndarray) \
            else [tuple(items.shape[1:])] * n
        for i, s in enumerate(in_shapes):
            if len(s) != 3:
                raise TransformError(f"item {i} has shape {s}, expected (channels, height, width)")
        out_shape = self.output_shape(in_shapes[0])
        for i, s in enumerate(in_shapes[1:], 1):
            shape = self.output_shape(s)
            if shape != out_shape:
                raise TransformError(f"item {i} of the batch is {'x'.join(map(str, s))} and transforms "
                                     f"to {shape}, but the batch was shaped {out_shape} from its "
                                     f"first item")
        heights = np.array([s[1] for s in in_shapes])
        widths = np.array([s[2] for s in in_shapes])
        # Random draws come first, for the whole batch, so the stream does not depend on the path.
        flips = self.rng.integers(0, 2, size=n).astype(bool) if self.mirror else np.zeros(n, bool)
        crop = self.crop_size
        if self.resize_enabled:
            # Item by item: resize, then the crop's offsets in the resized image (TRAIN: random,
            # TEST: centre), cropped here; the mean is the centre-cropped one.
            x = np.empty((n, out_shape[0], crop, crop), dtype=items[0].dtype)
            for i, a in enumerate(items):
                r = self.random_resize(a)
                _, rh, rw = r.shape
                if self.phase == caffe_pb2.TRAIN:
                    ho, wo = int(self.rng.integers(0, rh - crop + 1)), int(self.rng.integers(0, rw - crop + 1))
                else:
                    ho, wo = (rh - crop) // 2, (rw - crop) // 2
                x[i] = r[:, ho:ho + crop, wo:wo + crop]
            zeros = np.zeros(n, dtype=np.int64)
            return self._apply(x, zeros, zeros, flips, self._crop_mean)
        if crop and self.phase == caffe_pb2.TRAIN:
            h_off = self.rng.integers(0, heights - crop + 1)
            w_off = self.rng.integers(0, widths - crop + 1)
        elif crop:
            h_off, w_off = (heights - crop) // 2, (widths - crop) // 2
        else:
            h_off = w_off = np.zeros(n, dtype=np.int64)

        if all(s == in_shapes[0] for s in in_shapes):
            x = items if isinstance(items, np.ndarray) else np.stack(items)
            return self._apply(x, h_off, w_off, flips)
        out = np.empty((n, *out_shape), dtype=self.dtype)
        for i, a in enumerate(items):
            out[i] = self._apply(a[None], h_off[i:i + 1], w_off[i:i + 1], flips[i:i + 1])[0]
        return out

    def crop_mirror_normalize(self, x: np.ndarray, h_off: np.ndarray, w_off: np.ndarray,
                              flips: np.ndarray) -> np.ndarray:
        """:meth:`transform_arrays` with the crop offsets and flips chosen by the caller (layers that
        move boxes with the image, such as AnnotatedData)."""
        if self.resize_enabled:
            # NVCaffe's AnnotatedData skips its random resize; ignoring the fields silently would mislead
            raise TransformError("NVCaffe's random resize (img_rand_resize_*, rand_resize_ratio_*, "
                                 "*_stretch_*) is not supported here (NVCaffe's AnnotatedData ignores it)")
        return self._apply(x, h_off, w_off, flips)

    def _apply(self, x: np.ndarray, h_off: np.ndarray, w_off: np.ndarray, flips: np.ndarray,
               mean: np.ndarray | None = None) -> np.ndarray:
        """Crop, subtract the mean, scale and mirror a stack (N, C, H, W) of one size.

        ``flip(x - mean) == flip(x) - flip(mean)``: mirroring while copying gives Caffe's values.
        """
        n, c, _, _ = x.shape
        crop = self.crop_size
        mean = self.mean if mean is None else mean
        if flips.any() or (crop and not (np.all(h_off == h_off[0]) and np.all(w_off == w_off[0]))):
            # Per-item offsets or flips: copying slices item by item is several times faster than
            # fancy-indexed gathers. The flip is applied while copying.
            oh, ow = (crop, crop) if crop else x.shape[2:]
            out = np.empty((n, c, oh, ow), dtype=self.dtype)
            for i in range(n):
                hs, ws = slice(h_off[i], h_off[i] + oh), slice(w_off[i], w_off[i] + ow)
                step = -1 if flips[i] else 1
                out[i] = x[i, :, hs, ws][..., ::step]
                if mean is not None:
                    out[i] -= mean[:, hs, ws][..., ::step]
        else:
            if crop:
                hs, ws = slice(h_off[0], h_off[0] + crop), slice(w_off[0], w_off[0] + crop)
                x = x[:, :, hs, ws]
                if mean is not None:
                    mean = mean[:, hs, ws]
            out = x.astype(self.dtype)
            if mean is not None:
                out -= mean
        if self.mean_values is not None:
            mv = self.mean_values if self.mean_values.size == c else np.repeat(self.mean_values, c)
            out -= mv.reshape(1, c, 1, 1)
        out *= self.scale
        return out
