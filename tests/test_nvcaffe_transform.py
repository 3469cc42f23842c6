"""NVCaffe's random resize in the DataTransformer (NVIDIA/caffe's image_random_resize).

Expected sizes are recomputed by hand from the draws of an independent generator with the same seed;
expected pixels from numpy index arithmetic (OpenCV's INTER_NEAREST rule) or, where installed,
OpenCV itself.
"""
import numpy as np
import pytest
import torch

from recaffe import rng as rrng
from recaffe.data.transformer import DataTransformer, TransformError, resize_image
from recaffe.gradient_check import layer_param, make_layer
from recaffe.io.protofiles import parse_text, write_binary
from recaffe.layer import LayerError
from recaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
T = caffe_pb2.TransformationParameter


def tparam(text):
    return layer_param(f'type: "Data" transform_param {{ {text} }}').transform_param


def nearest(img, nh, nw):
    _, h, w = img.shape
    ys = [min(int(np.floor(y * h / nh)), h - 1) for y in range(nh)]
    xs = [min(int(np.floor(x * w / nw)), w - 1) for x in range(nw)]
    return img[:, ys][:, :, xs]


def test_new_size_from_draws_short_side_then_stretch():
    p = tparam("crop_size: 10 img_rand_resize_lower: 20 img_rand_resize_upper: 30 "
               "vertical_stretch_lower: 0.7 vertical_stretch_upper: 1.3 "
               "horizontal_stretch_lower: 0.8 horizontal_stretch_upper: 1.2 allow_upscale: true")
    t = DataTransformer(p, TRAIN, np.random.default_rng(5))
    g = np.random.default_rng(5)
    for _ in range(20):
        short = 20 + int(g.integers(0, 11))
        v = np.float32(g.uniform(0.7, 1.3))
        hz = np.float32(g.uniform(0.8, 1.2))
        # a 40x60 image: height is the short side
        s = np.float32(short) / np.float32(40)
        eh = max(10, int(np.floor(float(s * np.float32(40) * v) + 0.5)))
        ew = max(10, int(np.floor(float(s * np.float32(60) * hz) + 0.5)))
        assert t.random_resize_size(40, 60) == (eh, ew)


def test_ratio_sets_the_long_side():
    p = tparam("crop_size: 4 rand_resize_ratio_lower: 1.5 rand_resize_ratio_upper: 1.5 allow_upscale: true")
    t = DataTransformer(p, TRAIN, np.random.default_rng(0))
    # no size range: the short side stays (30); the long side becomes 30 * 1.5
    assert t.random_resize_size(30, 80) == (30, 45)
    assert t.random_resize_size(80, 30) == (45, 30)
    # a square: a coin flip picks the side
    sizes = {t.random_resize_size(30, 30) for _ in range(20)}
    assert sizes == {(30, 45), (45, 30)}


def test_no_upscale_without_allow_upscale_and_never_below_crop():
    p = tparam("crop_size: 16 img_rand_resize_lower: 100 img_rand_resize_upper: 100")
    t = DataTransformer(p, TRAIN, np.random.default_rng(0))
    assert t.random_resize_size(40, 60) == (40, 60)  # 100x150 clamped to the original
    p.allow_upscale = True
    t = DataTransformer(p, TRAIN, np.random.default_rng(0))
    assert t.random_resize_size(40, 60) == (100, 150)
    p = tparam("crop_size: 16 img_rand_resize_lower: 8 img_rand_resize_upper: 8")
    t = DataTransformer(p, TRAIN, np.random.default_rng(0))
    assert t.random_resize_size(40, 60) == (16, 16)  # 8x12 raised to crop_size


def test_enabled_when_a_stretch_field_is_set_even_to_its_default():
    assert not DataTransformer(tparam("crop_size: 4"), TRAIN).resize_enabled
    assert DataTransformer(tparam("crop_size: 4 vertical_stretch_lower: 1"), TRAIN).resize_enabled
    assert DataTransformer(tparam("crop_size: 4 img_rand_resize_upper: 9"), TRAIN).resize_enabled


# (size range, extra fields, the image 8x10 becomes, shrinks on both sides)
@pytest.mark.parametrize("size, extra, shape, shrink", [
    (6, "", (6, 8), True),
    (12, "", (12, 15), False),
    (8, "horizontal_stretch_lower: 0.5 horizontal_stretch_upper: 0.5", (8, 5), True),  # height stays
    (8, "horizontal_stretch_lower: 1.5 horizontal_stretch_upper: 1.5", (8, 15), False),  # one side grows
    (6, "vertical_stretch_lower: 2 vertical_stretch_upper: 2", (12, 8), False),
])
def test_interpolation_down_or_up(monkeypatch, size, extra, shape, shrink):
    import recaffe.data.transformer as tm
    calls = []
    monkeypatch.setattr(tm, "resize_image", lambda img, h, w, algo: calls.append((algo, h, w)) or
                        np.zeros((img.shape[0], h, w), img.dtype))
    p = tparam(f"crop_size: 4 img_rand_resize_lower: {size} img_rand_resize_upper: {size} allow_upscale: true "
               f"interpolation_algo_down: INTER_AREA interpolation_algo_up: INTER_LINEAR {extra}")
    t = DataTransformer(p, TEST, np.random.default_rng(0))
    t.transform(np.zeros((1, 8, 10), np.uint8))
    assert calls == [(T.INTER_AREA if shrink else T.INTER_LINEAR, *shape)]
    # defaults: NEAREST down, CUBIC up
    calls.clear()
    p = tparam(f"crop_size: 4 img_rand_resize_lower: {size} img_rand_resize_upper: {size} allow_upscale: true {extra}")
    DataTransformer(p, TEST, np.random.default_rng(0)).transform(np.zeros((1, 8, 10), np.uint8))
    assert calls == [(T.INTER_NEAREST if shrink else T.INTER_CUBIC, *shape)]


def test_resize_nearest_is_opencvs_floor_rule_and_uint8_rounds():
    x = np.random.default_rng(3).integers(0, 256, (2, 9, 13), dtype=np.uint8)
    np.testing.assert_array_equal(resize_image(x, 5, 7, T.INTER_NEAREST), nearest(x, 5, 7))
    np.testing.assert_array_equal(resize_image(x, 20, 17, T.INTER_NEAREST), nearest(x, 20, 17))
    for algo in (T.INTER_LINEAR, T.INTER_CUBIC, T.INTER_AREA):
        y = resize_image(x, 20, 17, algo)
        assert y.dtype == np.uint8 and y.shape == (2, 20, 17)
    # area on an integer factor is the block mean
    z = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    np.testing.assert_array_equal(resize_image(z, 2, 2, T.INTER_AREA),
                                  np.rint(z.reshape(1, 2, 2, 2, 2).mean((2, 4))).astype(np.uint8))


@pytest.mark.parametrize("algo", [0, 1, 2, 3])
@pytest.mark.parametrize("size", [(5, 7), (20, 17), (6, 30)])
def test_resize_against_opencv(algo, size):
    cv2 = pytest.importorskip("cv2")
    x = np.random.default_rng(4).integers(0, 256, (3, 11, 14), dtype=np.uint8)
    ours = resize_image(x, *size, algo).astype(int)
    cv = cv2.resize(np.ascontiguousarray(x.transpose(1, 2, 0)), size[::-1], interpolation=algo)
    diff = np.abs(ours - cv.transpose(2, 0, 1).astype(int))
    assert diff.max() <= (0 if algo == T.INTER_NEAREST else 1)


def write_mean(path, mean):
    proto = caffe_pb2.BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    proto.data.extend(mean.ravel())
    write_binary(path, proto)
    return str(path)


def test_mean_file_is_centre_cropped_with_random_resize(tmp_path):
    mean = np.random.default_rng(1).uniform(0, 255, (1, 9, 11)).astype(np.float32)
    src = write_mean(tmp_path / "mean.binaryproto", mean)
    x = np.random.default_rng(2).integers(0, 256, (1, 20, 30), dtype=np.uint8)
    p = tparam(f'mean_file: "{src}" crop_size: 5 img_rand_resize_lower: 10 img_rand_resize_upper: 10 scale: 0.5')
    y = DataTransformer(p, TEST, np.random.default_rng(0), dtype=np.float64).transform(x)
    r = nearest(x, 10, 15)  # short side 10: 10x15, then the centre 5x5 at (2, 5)
    expect = (r[:, 2:7, 5:10].astype(np.float64) - mean[:, 2:7, 3:8]) * 0.5
    np.testing.assert_allclose(y, expect, rtol=0, atol=1e-12)


@pytest.mark.parametrize("text, match", [
    ("crop_size: 4 img_rand_resize_lower: 30 img_rand_resize_upper: 20",
     r"img_rand_resize_upper \(20\) can't be less than img_rand_resize_lower \(30\)"),
    ("img_rand_resize_lower: 20 img_rand_resize_upper: 30", "needs crop_size"),
    ("horizontal_stretch_lower: 0.9", "needs crop_size"),
])
def test_errors(text, match):
    with pytest.raises(TransformError, match=match):
        DataTransformer(tparam(text), TRAIN)


def test_errors_small_mean_and_small_image(tmp_path):
    src = write_mean(tmp_path / "m.binaryproto", np.zeros((1, 3, 3), np.float32))
    with pytest.raises(TransformError, match="smaller than crop_size 4"):
        DataTransformer(tparam(f'mean_file: "{src}" crop_size: 4 img_rand_resize_lower: 8 '
                               'img_rand_resize_upper: 8'), TRAIN)
    t = DataTransformer(tparam("crop_size: 8 img_rand_resize_lower: 8 img_rand_resize_upper: 9"), TRAIN)
    with pytest.raises(TransformError, match="does not upscale without allow_upscale"):
        t.transform(np.zeros((1, 6, 10), np.uint8))
    # with allow_upscale a small image is brought up to crop_size
    t = DataTransformer(tparam("crop_size: 8 img_rand_resize_lower: 8 img_rand_resize_upper: 9 "
                               "allow_upscale: true"), TRAIN)
    assert t.transform(np.zeros((1, 6, 10), np.uint8)).shape == (1, 8, 8)


NV_TEXT = """layer { name: "data" type: "Data" top: "data" top: "label"
  data_param { source: "x" backend: LMDB batch_size: 2 }
  transform_param { img_rand_resize_lower: 240 img_rand_resize_upper: 288 vertical_stretch_lower: 0.7
    vertical_stretch_upper: 1.3 horizontal_stretch_lower: 0.7 horizontal_stretch_upper: 1.3
    rand_resize_ratio_lower: 1 rand_resize_ratio_upper: 1.2 interpolation_algo_down: INTER_AREA
    interpolation_algo_up: INTER_LINEAR allow_upscale: true crop_size: 224 mirror: true scale: 0.00390625 } }"""


def test_prototxt_parses_and_binary_round_trip_keeps_fields():
    net = parse_text(NV_TEXT, caffe_pb2.NetParameter(), filename="train_val_fp16.prototxt")
    tp = net.layer[0].transform_param
    assert (tp.img_rand_resize_lower, tp.img_rand_resize_upper) == (240, 288)
    assert tp.interpolation_algo_down == T.INTER_AREA and tp.interpolation_algo_up == T.INTER_LINEAR
    assert tp.allow_upscale and tp.HasField("vertical_stretch_lower")
    back = caffe_pb2.TransformationParameter.FromString(tp.SerializeToString())
    assert back == tp and back.HasField("horizontal_stretch_upper")
    assert back.vertical_stretch_lower == pytest.approx(0.7)
    assert back.rand_resize_ratio_upper == pytest.approx(1.2)


def _lmdb(tmp_path, arrays):
    from recaffe.data.db import NEW, open_db
    db = open_db("lmdb", tmp_path / "db", NEW)
    txn = db.new_transaction()
    for i, a in enumerate(arrays):
        c, h, w = a.shape
        txn.put(b"%08d" % i, caffe_pb2.Datum(channels=c, height=h, width=w, data=a.tobytes(),
                                              label=i).SerializeToString())
    txn.commit()
    db.close()
    return str(tmp_path / "db")


def test_data_layer_test_phase_resizes_then_centre_crops(tmp_path):
    imgs = np.random.default_rng(7).integers(0, 256, (3, 3, 16, 24), dtype=np.uint8)
    src = _lmdb(tmp_path, imgs)
    mean = np.random.default_rng(8).uniform(0, 255, (3, 10, 10)).astype(np.float32)
    mfile = write_mean(tmp_path / "mean.binaryproto", mean)
    text = (f'name: "d" type: "Data" transform_param {{ crop_size: 6 img_rand_resize_lower: 8 '
            f'img_rand_resize_upper: 8 mean_file: "{mfile}" scale: 0.25 }} '
            f'data_param {{ source: "{src}" batch_size: 3 backend: LMDB }}')
    layer, bottom, top = make_layer(text, [], num_tops=2, dtype=torch.float64, phase=TEST)
    layer.run_forward(bottom, top)
    assert top[0].shape == (3, 3, 6, 6)
    for i in range(3):
        r = nearest(imgs[i], 8, 12)  # 16x24 -> 8x12 (INTER_NEAREST), centre 6x6 at (1, 3)
        expect = (r[:, 1:7, 3:9].astype(np.float64) - mean[:, 2:8, 2:8]) * 0.25
        np.testing.assert_allclose(top[0].data[i], expect, rtol=0, atol=1e-6)


def test_data_layer_train_phase_draws_from_the_layer_generator(tmp_path):
    imgs = np.random.default_rng(9).integers(0, 256, (4, 1, 20, 30), dtype=np.uint8)
    src = _lmdb(tmp_path, imgs)
    text = (f'name: "d" type: "Data" transform_param {{ crop_size: 8 img_rand_resize_lower: 10 '
            f'img_rand_resize_upper: 14 vertical_stretch_lower: 0.8 vertical_stretch_upper: 1.2 '
            f'mirror: true }} data_param {{ source: "{src}" batch_size: 4 backend: LMDB }}')
    layer, bottom, top = make_layer(text, [], num_tops=2, dtype=torch.float64, phase=TRAIN, seed=33)
    layer.run_forward(bottom, top)
    first = top[0].data.copy()
    # the same draws, in the transformer's order, from the same seeded stream
    rrng.set_random_seed(33)
    g = rrng.layer_generator("d", TRAIN)
    flips = g.integers(0, 2, size=4).astype(bool)
    for i in range(4):
        short = 10 + int(g.integers(0, 5))
        v = np.float32(g.uniform(0.8, 1.2))
        s = np.float32(short) / np.float32(20)
        nh = min(20, max(8, int(np.floor(float(s * np.float32(20) * v) + 0.5))))
        nw = min(30, max(8, int(np.floor(float(s * np.float32(30)) + 0.5))))
        r = nearest(imgs[i], nh, nw)
        ho, wo = int(g.integers(0, nh - 7)), int(g.integers(0, nw - 7))
        expect = r[:, ho:ho + 8, wo:wo + 8].astype(np.float64)
        if flips[i]:
            expect = expect[..., ::-1]
        np.testing.assert_array_equal(first[i], expect)
    # seeded runs repeat
    layer2, bottom2, top2 = make_layer(text, [], num_tops=2, dtype=torch.float64, phase=TRAIN, seed=33)
    layer2.run_forward(bottom2, top2)
    np.testing.assert_array_equal(top2[0].data, first)


def test_data_layer_without_crop_size_is_a_layer_error(tmp_path):
    src = _lmdb(tmp_path, np.zeros((1, 1, 8, 8), np.uint8))
    text = (f'name: "d" type: "Data" transform_param {{ img_rand_resize_lower: 6 img_rand_resize_upper: 7 }} '
            f'data_param {{ source: "{src}" batch_size: 1 backend: LMDB }}')
    with pytest.raises(LayerError, match="needs crop_size"):
        make_layer(text, [], num_tops=2, phase=TRAIN)


def test_box_layers_refuse_the_random_resize():
    t = DataTransformer(tparam("crop_size: 4 img_rand_resize_lower: 6 img_rand_resize_upper: 6"), TRAIN)
    with pytest.raises(TransformError, match="not supported here"):
        t.crop_mirror_normalize(np.zeros((1, 1, 8, 8), np.uint8), np.zeros(1, int), np.zeros(1, int),
                                np.zeros(1, bool))
