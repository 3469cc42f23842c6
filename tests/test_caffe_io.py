"""caffe.io (pycaffe's preprocessing, image and proto helpers) against values computed by hand,
with numpy, Pillow and torch's own resampling."""
import io as bytes_io

import numpy as np
import pytest
import torch
from PIL import Image

import caffe
from caffe.proto import caffe_pb2
from conftest import require_reference

RNG = np.random.default_rng(7)


def torch_resize(im, dims, mode="bilinear"):
    """Reference resize: torch's half-pixel bilinear (or nearest-exact), edges clamped."""
    t = torch.from_numpy(np.asarray(im, dtype=np.float64)).permute(2, 0, 1)[None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return torch.nn.functional.interpolate(t, size=tuple(dims), mode=mode, **kw)[0].permute(1, 2, 0).numpy()


def transformer(shape=(1, 3, 4, 5)):
    t = caffe.io.Transformer({"data": shape})
    t.set_transpose("data", (2, 0, 1))
    return t


# ------------------------------------------------------------------------ Transformer


def test_preprocess_applies_transpose_swap_raw_scale_mean_input_scale_in_order():
    img = RNG.random((4, 5, 3)).astype(np.float32)
    mean = np.array([10.0, 20.0, 30.0])
    t = transformer()
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", mean)
    t.set_input_scale("data", 0.5)
    out = t.preprocess("data", img)
    chw = np.stack([img[:, :, 2], img[:, :, 1], img[:, :, 0]])  # HWC -> CHW, RGB -> BGR
    expected = (chw * np.float32(255.0) - mean[:, None, None].astype(np.float32)) * np.float32(0.5)
    assert out.dtype == np.float32 and out.shape == (3, 4, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)


def test_preprocess_with_full_and_2d_means_and_no_side_effects():
    img = RNG.random((4, 5, 3)).astype(np.float32)
    before = img.copy()
    full = RNG.random((3, 4, 5))
    t = transformer()
    t.set_mean("data", full)
    np.testing.assert_allclose(t.preprocess("data", img), img.transpose(2, 0, 1) - full, rtol=1e-6)
    assert np.array_equal(img, before)  # the caller's image is untouched
    # An (H, W) mean is a one-channel mean.
    gray = RNG.random((4, 5, 1))
    flat = RNG.random((4, 5))
    t1 = transformer((1, 1, 4, 5))
    t1.set_mean("data", flat)
    np.testing.assert_allclose(t1.preprocess("data", gray), gray.transpose(2, 0, 1) - flat[None], rtol=1e-6)
    with pytest.raises(ValueError, match="Mean shape incompatible"):
        t.set_mean("data", flat)
    # Without any step, preprocess must still hand back a new array.
    bare = caffe.io.Transformer({"data": (1, 4, 5, 3)})
    out = bare.preprocess("data", img)
    out *= 2
    assert np.array_equal(img, before)


def test_preprocess_resizes_to_the_input_size_first():
    img = RNG.random((7, 3, 3))
    t = transformer()
    t.set_raw_scale("data", 2.0)
    expected = torch_resize(img, (4, 5)).transpose(2, 0, 1) * 2.0
    np.testing.assert_allclose(t.preprocess("data", img), expected, rtol=1e-5, atol=1e-6)


def test_deprocess_inverts_preprocess():
    img = RNG.random((4, 5, 3)).astype(np.float32)
    t = transformer()
    t.set_channel_swap("data", (1, 2, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", RNG.random((3, 4, 5)) * 100)
    t.set_input_scale("data", 0.017)
    caffe_in = t.preprocess("data", img)
    np.testing.assert_allclose(t.deprocess("data", caffe_in[None]), img, rtol=1e-4, atol=1e-5)


def test_transformer_errors():
    t = transformer()
    with pytest.raises(Exception, match="nope is not one of the net inputs"):
        t.preprocess("nope", np.zeros((4, 5, 3)))
    with pytest.raises(Exception, match="nope is not one of the net inputs"):
        t.set_mean("nope", np.zeros(3))
    with pytest.raises(ValueError, match="Mean channels incompatible"):
        t.set_mean("data", np.zeros(4))
    with pytest.raises(ValueError, match="Mean shape incompatible"):
        t.set_mean("data", np.zeros((3, 5, 4)))
    with pytest.raises(ValueError, match="Mean shape invalid"):
        t.set_mean("data", np.zeros((1, 3, 4, 5)))
    with pytest.raises(Exception, match="Transpose order"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(Exception, match="Channel swap"):
        t.set_channel_swap("data", (1, 0))


# ------------------------------------------------------------------------ images


def _png(tmp_path, arr, name="im.png", mode=None):
    path = tmp_path / name
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return str(path)


def test_load_image_rgb_rgba_gray_and_16_bit(tmp_path):
    rgb = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    im = caffe.io.load_image(_png(tmp_path, rgb))
    assert im.dtype == np.float32 and im.shape == (5, 6, 3)
    np.testing.assert_allclose(im, rgb / 255.0, rtol=1e-6)
    gray_of_rgb = caffe.io.load_image(_png(tmp_path, rgb), color=False)
    weights = rgb[..., 0] / 255.0 * 0.2125 + rgb[..., 1] / 255.0 * 0.7154 + rgb[..., 2] / 255.0 * 0.0721
    np.testing.assert_allclose(gray_of_rgb, weights[..., None], rtol=1e-5)

    rgba = RNG.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    np.testing.assert_allclose(caffe.io.load_image(_png(tmp_path, rgba, "a.png")), rgba[..., :3] / 255.0,
                               rtol=1e-6)

    gray = RNG.integers(0, 256, (5, 6), dtype=np.uint8)
    path = _png(tmp_path, gray, "g.png")
    color = caffe.io.load_image(path)
    assert color.shape == (5, 6, 3)
    for c in range(3):
        np.testing.assert_allclose(color[..., c], gray / 255.0, rtol=1e-6)
    single = caffe.io.load_image(path, color=False)
    assert single.shape == (5, 6, 1)
    np.testing.assert_allclose(single[..., 0], gray / 255.0, rtol=1e-6)

    deep = RNG.integers(0, 65536, (5, 6), dtype=np.uint16)
    path16 = str(tmp_path / "d.png")
    Image.fromarray(deep).save(path16)
    np.testing.assert_allclose(caffe.io.load_image(path16, color=False)[..., 0], deep / 65535.0, rtol=1e-6)


def test_load_image_of_the_reference_jpeg_matches_pillow():
    path = require_reference("images", "cat.jpg")
    im = caffe.io.load_image(path)
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    assert im.shape == expected.shape and im.shape[2] == 3
    np.testing.assert_allclose(im, expected, rtol=1e-6)


def test_load_image_errors_name_the_file(tmp_path):
    missing = str(tmp_path / "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        caffe.io.load_image(missing)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="junk.jpg"):
        caffe.io.load_image(str(junk))


def test_resize_image_bilinear_by_hand():
    # Half-pixel centres: 2 -> 4 samples the input at -0.25, 0.25, 0.75, 1.25 (edges clamped).
    im = np.array([[0.0, 4.0], [8.0, 12.0]])[..., None]
    out = caffe.io.resize_image(im, (4, 4))
    row = np.array([0.0, 1.0, 3.0, 4.0])
    expected = np.array([row, row + 2, row + 6, row + 8])
    assert out.dtype == np.float32 and out.shape == (4, 4, 1)
    np.testing.assert_allclose(out[..., 0], expected)
    # 4 -> 2 samples at 0.5 and 2.5: means of neighbouring pairs.
    line = np.array([[1.0, 3.0, 5.0, 11.0]])[..., None].repeat(3, axis=2)
    np.testing.assert_allclose(caffe.io.resize_image(line, (1, 2))[0, :, 0], [2.0, 8.0])


def test_resize_image_matches_torch_half_pixel_resampling():
    im = RNG.random((7, 5, 3)) * 40 - 10
    for dims in [(11, 9), (3, 2), (7, 5)]:
        np.testing.assert_allclose(caffe.io.resize_image(im, dims), torch_resize(im, dims),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(caffe.io.resize_image(im, dims, interp_order=0),
                                   torch_resize(im, dims, "nearest-exact"), rtol=1e-6)
    np.testing.assert_array_equal(caffe.io.resize_image(im, (7, 5)), im.astype(np.float32))
    flat = np.full((3, 4, 1), 0.25)
    np.testing.assert_array_equal(caffe.io.resize_image(flat, (5, 2)), np.full((5, 2, 1), 0.25, np.float32))


def test_resize_image_other_channel_counts_align_corners_like_zoom():
    # 2 -> 3 with corners aligned samples at 0, 0.5, 1.
    im = np.zeros((1, 2, 5))
    im[0, :, 0] = [2.0, 6.0]
    out = caffe.io.resize_image(im, (1, 3))
    assert out.shape == (1, 3, 5)
    np.testing.assert_allclose(out[0, :, 0], [2.0, 4.0, 6.0])


def test_resize_image_errors():
    with pytest.raises(ValueError, match="H, W, K"):
        caffe.io.resize_image(np.zeros((4, 4)), (2, 2))
    with pytest.raises(ValueError, match="interp_order 3"):
        caffe.io.resize_image(np.zeros((4, 4, 3)), (2, 2), interp_order=3)


def test_oversample_corners_centre_and_mirrors():
    images = RNG.random((2, 7, 9, 3)).astype(np.float32)
    crops = caffe.io.oversample(images, (4, 5))
    assert crops.shape == (20, 4, 5, 3) and crops.dtype == np.float32
    for n, im in enumerate(images):
        # centre: 3.5 - 2 = 1.5 -> 1 rows, 4.5 - 2.5 = 2 columns
        five = [im[0:4, 0:5], im[0:4, 4:9], im[3:7, 0:5], im[3:7, 4:9], im[1:5, 2:7]]
        for k, c in enumerate(five):
            np.testing.assert_array_equal(crops[10 * n + k], c)
            np.testing.assert_array_equal(crops[10 * n + 5 + k], c[:, ::-1])


# ------------------------------------------------------------------------ protos


def test_blobproto_round_trip_with_diff():
    arr = RNG.standard_normal((2, 3, 4))
    diff = RNG.standard_normal((2, 3, 4))
    blob = caffe.io.array_to_blobproto(arr, diff)
    assert list(blob.shape.dim) == [2, 3, 4] and not blob.HasField("num")
    parsed = caffe_pb2.BlobProto.FromString(blob.SerializeToString())
    data = caffe.io.blobproto_to_array(parsed)
    assert data.shape == (2, 3, 4) and data.dtype == np.float64
    np.testing.assert_array_equal(data, arr.astype(np.float32))  # stored as float
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(parsed, return_diff=True),
                                  diff.astype(np.float32))
    with pytest.raises(ValueError, match="diff has 3 values"):
        caffe.io.array_to_blobproto(arr, np.zeros(3))


def test_blobproto_legacy_4d_fields_and_doubles():
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3, data=[1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(legacy), np.arange(1, 7).reshape(1, 2, 1, 3))
    doubles = caffe_pb2.BlobProto(double_data=[0.1, 0.2])
    doubles.shape.dim.extend([2])
    np.testing.assert_array_equal(caffe.io.blobproto_to_array(doubles), [0.1, 0.2])
    short = caffe_pb2.BlobProto(num=2, channels=1, height=1, width=1, data=[1.0])
    with pytest.raises(ValueError, match="holds 1 data values"):
        caffe.io.blobproto_to_array(short)


def test_blobprotovector_round_trip():
    arrays = [RNG.standard_normal((2, 3)).astype(np.float32), np.arange(4.0).reshape(1, 1, 2, 2)]
    s = caffe.io.arraylist_to_blobprotovector_str(arrays)
    vec = caffe_pb2.BlobProtoVector.FromString(s)
    assert [list(b.shape.dim) for b in vec.blobs] == [[2, 3], [1, 1, 2, 2]]
    back = caffe.io.blobprotovector_str_to_arraylist(s)
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)
    assert caffe.io.arraylist_to_blobprotovecor_str(arrays) == s  # old pycaffe spelling


def test_datum_round_trips():
    pixels = RNG.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    datum = caffe.io.array_to_datum(pixels, 7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 4, 5, 7)
    assert datum.data == pixels.tobytes() and len(datum.float_data) == 0
    back = caffe.io.datum_to_array(caffe_pb2.Datum.FromString(datum.SerializeToString()))
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, pixels)

    values = RNG.standard_normal((2, 3, 1))
    fdatum = caffe.io.array_to_datum(values)
    assert not fdatum.HasField("label") and fdatum.data == b""
    fback = caffe.io.datum_to_array(fdatum)
    assert fback.dtype == np.float64
    np.testing.assert_array_equal(fback, values.astype(np.float32))

    with pytest.raises(ValueError, match="Incorrect array shape"):
        caffe.io.array_to_datum(np.zeros((2, 2)))
    bad = caffe_pb2.Datum(channels=2, height=2, width=2, data=b"abc")
    with pytest.raises(ValueError, match="holds 3 values"):
        caffe.io.datum_to_array(bad)


def test_encoded_datum_decodes_to_bgr_chw():
    rgb = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    buf = bytes_io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    datum = caffe_pb2.Datum(channels=3, height=4, width=6, data=buf.getvalue(), encoded=True, label=1)
    out = caffe.io.datum_to_array(datum)
    np.testing.assert_array_equal(out, rgb[..., ::-1].transpose(2, 0, 1))
    junk = caffe_pb2.Datum(data=b"xyz", encoded=True)
    with pytest.raises(ValueError, match="cannot decode"):
        caffe.io.datum_to_array(junk)
