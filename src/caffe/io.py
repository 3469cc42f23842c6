"""pycaffe's ``caffe.io``: input preprocessing (Transformer), image loading and resizing, crops,
and conversions between numpy arrays and BlobProto / Datum messages.

Where pycaffe leans on scikit-image and scipy we use Pillow and numpy; the differences are
documented per function (``load_image``, ``resize_image``).
"""
from __future__ import annotations

import os

import numpy as np

from recaffe.blob import proto_shape
from recaffe.data.transformer import TransformError, decode_image
from recaffe.proto import caffe_pb2

# ----------------------------------------------------------------- protos <-> arrays


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff) as a float64 array of its shape.

    The shape is the legacy num/channels/height/width when any of them is set (4-D), else
    ``shape.dim``, as in pycaffe. pycaffe reads only the float fields; we fall back to the
    ``double_*`` fields when the float ones are empty (Caffe writes those for double blobs).
    """
    which = "diff" if return_diff else "data"
    values = getattr(blob, which)
    if not len(values):
        values = getattr(blob, "double_" + which)
    shape = proto_shape(blob)
    arr = np.array(values, dtype=np.float64)
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"blob proto holds {arr.size} {which} values, its shape {shape} needs "
                         f"{int(np.prod(shape, dtype=np.int64))}")
    return arr.reshape(shape)


def array_to_blobproto(arr, diff=None) -> caffe_pb2.BlobProto:
    """An N-d array (and optionally its diff) -> BlobProto with ``shape.dim`` and float values."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(arr.shape)
    blob.data.extend(arr.astype(float).flat)
    if diff is not None:
        diff = np.asarray(diff)
        if diff.size != arr.size:  # pycaffe does not check; a mismatch would make an unreadable blob
            raise ValueError(f"diff has {diff.size} values, the array of shape {arr.shape} has {arr.size}")
        blob.diff.extend(diff.astype(float).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    """Arrays -> a serialized BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(arr) for arr in arraylist])
    return vec.SerializeToString()


# The misspelt name older pycaffe releases exported.
arraylist_to_blobprotovecor_str = arraylist_to_blobprotovector_str


def blobprotovector_str_to_arraylist(data: bytes) -> list[np.ndarray]:
    """A serialized BlobProtoVector -> a list of arrays (see ``blobproto_to_array``)."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(data)
    return [blobproto_to_array(blob) for blob in vec.blobs]


def array_to_datum(arr, label=None) -> caffe_pb2.Datum:
    """A (C, H, W) array -> Datum: uint8 arrays go to ``data`` as bytes, others to ``float_data``.
    ``label`` is set only when given."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError('Incorrect array shape.')
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """A Datum's pixels as (C, H, W): uint8 from ``data``, else float64 from ``float_data``.

    Encoded datums (``encoded: true``, e.g. from ``convert_imageset --encoded``) are decoded as
    Caffe's DecodeDatum does: uint8 in OpenCV's channel order (BGR), the file's own channels.
    pycaffe itself does not decode them. The label is not returned (it is ``datum.label``).
    """
    if datum.encoded:
        try:
            return decode_image(datum.data)
        except TransformError as e:
            raise ValueError(str(e)) from None
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        arr = np.frombuffer(datum.data, dtype=np.uint8)
    else:
        arr = np.array(datum.float_data).astype(float)
    if arr.size != datum.channels * datum.height * datum.width:
        raise ValueError(f"datum holds {arr.size} values, its shape {shape} needs "
                         f"{datum.channels * datum.height * datum.width}")
    return arr.reshape(shape).copy()


# ----------------------------------------------------------------- preprocessing


class Transformer:
    """Turns (H, W, K) images into a net's input, per input blob (pycaffe's caffe.io.Transformer).

    ``inputs`` maps input names to their blob shapes, e.g. ``{'data': net.blobs['data'].data.shape}``.
    ``preprocess`` applies, in this order: cast to float32, resize to the blob's H x W, transpose,
    channel swap, ``* raw_scale``, ``- mean``, ``* input_scale``; ``deprocess`` undoes them in reverse.
    """

    def __init__(self, inputs):
        self.inputs = inputs
        self.transpose = {}
        self.channel_swap = {}
        self.raw_scale = {}
        self.mean = {}
        self.input_scale = {}

    def _check_input(self, in_) -> None:
        if in_ not in self.inputs:
            raise ValueError(f'{in_} is not one of the net inputs: {self.inputs}')

    def preprocess(self, in_, data) -> np.ndarray:
        """(H', W', K) array -> (K, H, W) float32 input for blob ``in_``. The caller's array is
        never modified (pycaffe scales in place when no step made a copy)."""
        self._check_input(in_)
        caffe_in = np.array(data, dtype=np.float32)
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        in_dims = tuple(self.inputs[in_][2:])
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if transpose is not None:
            caffe_in = caffe_in.transpose(transpose)
        if channel_swap is not None:
            caffe_in = caffe_in[list(channel_swap), :, :]
        if raw_scale is not None:
            caffe_in *= raw_scale
        if mean is not None:
            caffe_in -= mean
        if input_scale is not None:
            caffe_in *= input_scale
        return caffe_in

    def deprocess(self, in_, data) -> np.ndarray:
        """Invert ``preprocess`` (except the resize); a leading batch axis of 1 is squeezed away."""
        self._check_input(in_)
        decaf_in = np.array(data).squeeze()
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            decaf_in /= input_scale
        if mean is not None:
            decaf_in += mean
        if raw_scale is not None:
            decaf_in /= raw_scale
        if channel_swap is not None:
            decaf_in = decaf_in[np.argsort(channel_swap), :, :]
        if transpose is not None:
            decaf_in = decaf_in.transpose(np.argsort(transpose))
        return decaf_in

    def set_transpose(self, in_, order) -> None:
        """Axis order taking the (H, W, K) image to the blob's (K, H, W), usually (2, 0, 1)."""
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise ValueError('Transpose order needs to have the same number of dimensions as the input.')
        self.transpose[in_] = order

    def set_channel_swap(self, in_, order) -> None:
        """Channel order applied after the transpose, e.g. (2, 1, 0) for RGB -> BGR."""
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise ValueError('Channel swap needs to have the same number of dimensions as the '
                             'input channels.')
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_, scale) -> None:
        """Multiply the raw image before the mean (255 for models trained on [0, 255] pixels)."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_, mean) -> None:
        """Mean to subtract: one value per channel (K,) or a full (K, H, W) / (H, W) array, in the
        blob's space (after transpose, channel swap and raw scale)."""
        self._check_input(in_)
        mean = np.asarray(mean)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise ValueError('Mean channels incompatible with input.')
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise ValueError('Mean shape invalid')
            if tuple(ms) != tuple(self.inputs[in_][1:]):
                raise ValueError('Mean shape incompatible with input shape.')
        self.mean[in_] = mean

    def set_input_scale(self, in_, scale) -> None:
        """Multiply the blob after the mean is subtracted."""
        self._check_input(in_)
        self.input_scale[in_] = scale


# ----------------------------------------------------------------- images

# scikit-image's rgb2gray weights (ITU-R 709 luma), which pycaffe's load_image(color=False) uses.
_GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])


def load_image(filename, color: bool = True) -> np.ndarray:
    """An image file as float32 in [0, 1], (H, W, 3) RGB or, with ``color=False``, (H, W, 1).

    As pycaffe (which reads with scikit-image): a gray file is tiled to 3 channels when ``color``;
    an alpha channel is dropped (not composited); ``color=False`` turns a color file into gray with
    scikit-image's weights 0.2125 R + 0.7154 G + 0.0721 B. We read with Pillow: 8-bit images are
    divided by 255, 16-bit ones by 65535.
    """
    filename = os.fspath(filename)
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {filename!r} not found") from None
    img = _read_unit_float(raw, filename)  # (H, W) gray or (H, W, 3) RGB, float64
    if img.ndim == 3 and not color:
        img = img @ _GRAY_WEIGHTS
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    return img


def _read_unit_float(raw: bytes, filename: str) -> np.ndarray:
    """Decode to float64 in [0, 1]: (H, W) for gray files, (H, W, 3) RGB otherwise."""
    import io as _bytes_io

    from PIL import Image, UnidentifiedImageError

    try:
        pil = Image.open(_bytes_io.BytesIO(raw))
        pil.load()
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(f"{filename}: cannot read as an image: {e}") from None
    if pil.mode.startswith("I;16"):
        return np.asarray(pil, dtype=np.float64) / 65535.0
    if pil.mode == "F":
        return np.asarray(pil, dtype=np.float64)
    try:
        chw = decode_image(raw)  # uint8, the file's channels in OpenCV order: gray, BGR or BGRA
    except TransformError as e:
        raise ValueError(f"{filename}: {e}") from None
    if chw.shape[0] == 1:
        return chw[0] / 255.0
    return chw[2::-1].transpose(1, 2, 0) / 255.0  # BGR(A) -> RGB, alpha dropped


def _sample_positions(n_in: int, n_out: int, corner_aligned: bool) -> np.ndarray:
    """Where each output pixel samples the input, in input pixel coordinates."""
    o = np.arange(n_out, dtype=np.float64)
    if corner_aligned:  # scipy.ndimage.zoom: first and last pixels map onto each other
        return o * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    return (o + 0.5) * (n_in / n_out) - 0.5  # scikit-image: pixel centres, half-pixel offset


def _resample_axis(x: np.ndarray, axis: int, n_out: int, order: int, corner_aligned: bool) -> np.ndarray:
    n_in = x.shape[axis]
    pos = _sample_positions(n_in, n_out, corner_aligned)
    if order == 0:
        idx = np.clip(np.floor(pos + 0.5).astype(np.intp), 0, n_in - 1)
        return np.take(x, idx, axis=axis)
    pos = np.clip(pos, 0, n_in - 1)  # samples beyond the border take the edge pixel
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (pos - i0).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return np.take(x, i0, axis=axis) * (1 - w) + np.take(x, i1, axis=axis) * w


def resize_image(im, new_dims, interp_order: int = 1) -> np.ndarray:
    """Resize (H, W, K) to (new_dims[0], new_dims[1], K) float32; order 1 bilinear, 0 nearest.

    Like pycaffe, images of 1 or 3 channels are resampled at pixel centres (output pixel ``o``
    samples input coordinate ``(o + 0.5) * in / out - 0.5``, scikit-image's resize) and others
    with corners aligned (``o * (in - 1) / (out - 1)``, scipy's zoom). Differences from pycaffe,
    pixel by pixel: samples that fall outside the image take the edge pixel (scikit-image's
    ``mode='edge'``), where pycaffe's scikit-image mixes in 0 (``mode='constant'``, versions
    before 0.15: darker borders when upsampling) or the mirrored pixel (``'reflect'``, later
    versions); and we never smooth before downsampling, where scikit-image >= 0.19 applies a
    Gaussian (``anti_aliasing``). pycaffe's scaling to [0, 1] around the resize is omitted:
    with order 0 or 1 it changes nothing but rounding. Orders above 1 are not supported.
    """
    im = np.asarray(im)
    if im.ndim != 3:
        raise ValueError(f"resize_image needs an (H, W, K) array, got shape {im.shape}")
    if interp_order not in (0, 1):
        raise ValueError(f"interp_order {interp_order} is not supported: use 1 (bilinear) or 0 (nearest)")
    h, w = (int(d) for d in new_dims)
    corner_aligned = im.shape[-1] not in (1, 3)
    out = im.astype(np.float64)
    out = _resample_axis(out, 0, h, interp_order, corner_aligned)
    out = _resample_axis(out, 1, w, interp_order, corner_aligned)
    return out.astype(np.float32)


def oversample(images, crop_dims) -> np.ndarray:
    """Ten crops per (H, W, K) image: the 4 corners (top-left, top-right, bottom-left,
    bottom-right), the centre, then the same 5 mirrored left-right -> (10 N, h, w, K) float32.
    All images must have the shape of the first."""
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims).astype(int)
    ch, cw = crop_dims
    corners = [(i, j) for i in (0, im_shape[0] - ch) for j in (0, im_shape[1] - cw)]
    # Centre crop: image centre -/+ half the crop, truncated to ints as pycaffe's int cast does.
    cy, cx = (im_shape[:2] / 2.0 - crop_dims / 2.0).astype(int)
    origins = corners + [(cy, cx)]
    crops = np.empty((10 * len(images), ch, cw, im_shape[-1]), dtype=np.float32)
    ix = 0
    for im in images:
        for i, j in origins:
            crops[ix] = im[i:i + ch, j:j + cw, :]
            crops[ix + 5] = crops[ix, :, ::-1, :]
            ix += 1
        ix += 5
    return crops
