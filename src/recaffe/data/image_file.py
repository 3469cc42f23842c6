"""Image files read, resized and encoded as Caffe's OpenCV calls do it, with Pillow.

Caffe's ``ReadImageToCVMat`` reads a file with ``cv::imread`` (``IMREAD_COLOR`` or
``IMREAD_GRAYSCALE``) and resizes it with ``cv::resize`` (bilinear); ``CVMatToDatum`` stores
the pixels channel by channel (C, H, W) in OpenCV's channel order, BGR. Here:

- colour: every image becomes 3 channels, B, G, R (grey is replicated, alpha dropped);
- grey (``is_color=False``): JPEG files are decoded straight to their luma (Y) channel, as
  libjpeg does for OpenCV; other colour files are converted with OpenCV's ``BGR2GRAY``
  weights (0.299 R + 0.587 G + 0.114 B in 14-bit fixed point). OpenCV's PNG reader converts
  with libpng's own rounding, which can differ by one grey level;
- 16-bit images are reduced to 8 bits (the high byte), as ``imread`` does;
- resizing follows OpenCV's 8-bit ``INTER_LINEAR`` arithmetic (``resize_linear``): pixel
  centres are aligned (``src = (dst + 0.5) * scale - 0.5``), borders are replicated, weights
  are 11-bit fixed point and the vertical pass truncates as OpenCV's does (IPP or GPU builds
  of OpenCV may differ by one level);
- EXIF orientation is not applied (the Data layer's decoder does not apply it either);
- images over Pillow's decompression-bomb limit (2 * ``PIL.Image.MAX_IMAGE_PIXELS``, about 179
  million pixels by default; OpenCV's own limit is 2**30) are refused with an error naming them
  before any pixel is decoded.
"""
from __future__ import annotations

import io
import os

import numpy as np

from ..errors import RecaffeError

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS
# OpenCV's BGR2GRAY weights for 8-bit images: 14-bit fixed point, summing to 1 << 14.
_GRAY_R, _GRAY_G, _GRAY_B = 4899, 9617, 1868


class ImageReadError(RecaffeError, ValueError):
    """A file that does not exist or cannot be decoded as an image; the message names it."""


def read_image(path: str | os.PathLike, is_color: bool = True, height: int = 0, width: int = 0) -> np.ndarray:
    """The image file ``path`` as uint8 (C, H, W) in OpenCV's order (BGR, or 1 grey channel).

    When both ``height`` and ``width`` are positive the image is resized to them (only one of
    them given means no resizing, as in Caffe).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"Could not open or find file {path}")
    arr = _decode(path, is_color, path)
    if height > 0 and width > 0:
        arr = resize_linear(arr, height, width)
    return arr


def decode_image_file(data: bytes, is_color: bool = True, name: str = "the image") -> np.ndarray:
    """The bytes of an image file decoded as :func:`read_image` reads a file (``cv::imdecode``
    with ``IMREAD_COLOR`` or ``IMREAD_GRAYSCALE``); ``name`` is used in error messages."""
    return _decode(io.BytesIO(data), is_color, name)


def _decode(source, is_color: bool, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as img:
            if not is_color and img.format == "JPEG" and img.mode in ("RGB", "YCbCr"):
                img.draft("L", None)  # libjpeg's grey output: the Y channel, as OpenCV reads it
            img.load()
            return _to_opencv_channels(img, is_color)
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{name}: refused to decode a possible decompression bomb ({e}); raise "
                             "PIL.Image.MAX_IMAGE_PIXELS to read bigger images") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageReadError(f"Could not open or find file {name}: cannot decode it as an image ({e})") \
            from None


def _to_opencv_channels(img, is_color: bool) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        grey = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)  # imread keeps the high byte
    elif mode in ("L", "1", "LA"):
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
    else:
        # RGB, RGBA (alpha dropped), palette, CMYK, ... through Pillow's RGB.
        bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)[::-1])
        return bgr if is_color else bgr_to_gray(bgr)
    return np.repeat(grey[None], 3, axis=0) if is_color else grey[None]


def bgr_to_gray(bgr: np.ndarray) -> np.ndarray:
    """(3, H, W) BGR uint8 -> (1, H, W) grey with OpenCV's ``cvtColor(BGR2GRAY)`` arithmetic."""
    b, g, r = (bgr[i].astype(np.int32) for i in range(3))
    grey = (b * _GRAY_B + g * _GRAY_G + r * _GRAY_R + (1 << 13)) >> 14
    return grey.astype(np.uint8)[None]


def _linear_taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each output position: the two source indices and their fixed-point weights, as
    OpenCV's ``resize`` computes them: ``src = (dst + 0.5) * scale - 0.5`` in double, cast to
    float; each weight rounded on its own (``1 - f`` and ``f`` times 2048, so they may not sum to
    2048). Horizontally (``clamp``) a position outside the image takes the border pixel with
    weights (2048, 0); vertically the weights are kept and the rows are clamped instead."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    frac = f - i0.astype(np.float32)  # exact in float32
    if clamp:
        low = i0 < 0
        frac[low], i0[low] = 0, 0
        high = i0 >= src - 1
        frac[high], i0[high] = 0, src - 1
    w0 = np.rint((np.float32(1) - frac) * np.float32(_COEF_SCALE)).astype(np.int64)
    w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int64)
    return np.clip(i0, 0, src - 1), np.clip(i0 + 1, 0, src - 1), w0, w1


def resize_linear(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (C, H, W) -> (C, height, width) with OpenCV's 8-bit ``INTER_LINEAR`` arithmetic.

    Rows are interpolated first in exact integers (weights of 11 bits); the vertical pass then
    uses OpenCV's own shortcut for 8-bit images, ``((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4))
    >> 16) + 2) >> 2``, which its SIMD and plain code paths share (it can differ by one level
    from a rounded exact product).
    """
    _, h, w = chw.shape
    if (h, w) == (height, width):
        return chw
    x0, x1, wx0, wx1 = _linear_taps(w, width, clamp=True)
    y0, y1, wy0, wy1 = _linear_taps(h, height, clamp=False)
    src = chw.astype(np.int64)
    rows = (src[:, :, x0] * wx0 + src[:, :, x1] * wx1) >> 4                  # (C, H, width)
    top = (rows[:, y0, :] * wy0[:, None]) >> 16
    bottom = (rows[:, y1, :] * wy1[:, None]) >> 16
    return ((top + bottom + 2) >> 2).astype(np.uint8)


def pillow_format(encoding: str) -> str:
    """The Pillow format name for an encoding given as a file extension ('jpg', 'png', '.bmp')."""
    from PIL import Image

    ext = "." + encoding.lower().lstrip(".")
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ImageReadError(f"cannot encode images as {encoding!r}: not an image format that can be "
                             f"written (use e.g. png, jpg, bmp)")
    return fmt


def encode_image(chw: np.ndarray, encoding: str) -> bytes:
    """uint8 (C, H, W) BGR or grey -> the bytes of an image file in format ``encoding``
    (a file extension), as ``cv::imencode`` (JPEG quality 95, OpenCV's default)."""
    from PIL import Image

    fmt = pillow_format(encoding)
    if chw.shape[0] == 1:
        img = Image.fromarray(np.ascontiguousarray(chw[0]), "L")
    elif chw.shape[0] == 3:
        img = Image.fromarray(np.ascontiguousarray(chw[::-1].transpose(1, 2, 0)), "RGB")
    else:
        raise ImageReadError(f"cannot encode an image of {chw.shape[0]} channels")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()
