"""Data layers (Input, DummyData, Data), the databases and the DataTransformer.

Expected values are computed here with numpy from the stored bytes; the databases are written
in tmp_path with the db API.
"""
import gc
import io
import threading
import time

import numpy as np
import pytest
import torch

from helpers import capture_log
from recaffe.blob import Blob
from recaffe.data import db as dbmod
from recaffe.data.db import NEW, READ, DBError, open_db
from recaffe.data.lmdb_child import open_reader_env
from recaffe.data.transformer import DataTransformer, TransformError
from recaffe.gradient_check import forward_layer, layer_param, make_layer
from recaffe.io.protofiles import write_binary
from recaffe.layer import LayerError, create_layer
from recaffe.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def datum_u8(arr, label=0):
    arr = np.asarray(arr, dtype=np.uint8)
    c, h, w = arr.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=arr.tobytes(), label=label)


def images(n, c=1, h=4, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def write_db(path, arrays, labels, backend="lmdb", datum=datum_u8):
    db = open_db(backend, path, NEW)
    txn = db.new_transaction()
    for i, (a, lab) in enumerate(zip(arrays, labels)):
        txn.put(b"%08d" % i, datum(a, int(lab)).SerializeToString())
    txn.commit()
    db.close()
    return str(path)


def data_layer(source, batch_size, *, backend="LMDB", transform="", extra="", num_tops=2, phase=TEST,
               dtype=torch.float64, seed=1701):
    text = (f'name: "mnist" type: "Data" transform_param {{ {transform} }} '
            f'data_param {{ source: "{source}" batch_size: {batch_size} backend: {backend} {extra} }}')
    return make_layer(text, [], num_tops=num_tops, dtype=dtype, phase=phase, seed=seed)


def forward_batches(layer, bottom, top, n):
    out = []
    for _ in range(n):
        layer.run_forward(bottom, top)
        out.append([t.data.copy() for t in top])
    return out


# ------------------------------------------------------------------------------------- Input
def test_input_shapes_once_or_per_top():
    layer, _, top = make_layer('type: "Input" input_param { shape { dim: 2 dim: 3 } }', [], num_tops=2)
    assert [t.shape for t in top] == [(2, 3), (2, 3)]
    layer, _, top = make_layer('type: "Input" input_param { shape { dim: 2 } shape { dim: 4 dim: 1 } }',
                               [], num_tops=2)
    assert [t.shape for t in top] == [(2,), (4, 1)]
    top[0].data[...] = [1, 2]
    layer.run_forward([], top)
    np.testing.assert_array_equal(top[0].data, [1, 2])  # forward leaves user data alone


def test_input_bad_shape_count():
    text = 'name: "in" type: "Input" input_param { shape { dim: 1 } shape { dim: 1 } }'
    with pytest.raises(LayerError, match="'in'.*0, 1 or 3 shapes"):
        make_layer(text, [], num_tops=3)


# --------------------------------------------------------------------------------- DummyData
def test_dummy_default_is_constant_zero():
    (y,) = forward_layer('type: "DummyData" dummy_data_param { shape { dim: 2 dim: 3 } }', [])
    np.testing.assert_array_equal(y, np.zeros((2, 3)))


def test_dummy_constant_per_top_and_legacy_dims():
    text = ('type: "DummyData" dummy_data_param { '
            'data_filler { type: "constant" value: 1.5 } data_filler { type: "constant" value: -2 } '
            'num: 2 channels: 3 channels: 1 height: 4 width: 5 }')
    a, b = forward_layer(text, [], num_tops=2)
    np.testing.assert_array_equal(a, np.full((2, 3, 4, 5), 1.5))
    np.testing.assert_array_equal(b, np.full((2, 1, 4, 5), -2.0))


def test_dummy_random_filler_refills_every_forward_constant_does_not():
    text = ('type: "DummyData" dummy_data_param { '
            'data_filler { type: "uniform" min: 2 max: 3 } data_filler { type: "constant" value: 7 } '
            'shape { dim: 4 dim: 5 } }')
    layer, bottom, top = make_layer(text, [], num_tops=2)
    top[1].data[0, 0] = -1  # constant tops are filled once, at setup: user edits persist
    layer.run_forward(bottom, top)
    first = top[0].data.copy()
    layer.run_forward(bottom, top)
    second = top[0].data.copy()
    assert first.min() >= 2 and first.max() <= 3 and first.std() > 0
    assert not np.array_equal(first, second)
    assert top[1].data[0, 0] == -1 and np.all(top[1].data.ravel()[1:] == 7)


def test_dummy_one_filler_for_all_tops_is_random_in_each():
    text = ('type: "DummyData" dummy_data_param { data_filler { type: "gaussian" std: 1 } '
            'shape { dim: 50 } shape { dim: 60 } }')
    a, b = forward_layer(text, [], num_tops=2)
    assert a.shape == (50,) and b.shape == (60,)
    assert a.std() > 0.3 and b.std() > 0.3


@pytest.mark.parametrize("params, match", [
    (('data_filler { type: "constant" } data_filler { type: "constant" } '
      'data_filler { type: "constant" } shape { dim: 1 }'), "Number of data fillers must be 0, 1 or equal"),
    ('shape { dim: 1 } shape { dim: 1 } shape { dim: 1 }', "Must specify 'shape' once, or once per top"),
    ('', "Must specify 'shape' once"),
    ('shape { dim: 1 } num: 1 channels: 1 height: 1 width: 1', "Both shape and legacy"),
    ('num: 1 channels: 1 height: 1', "Must specify 'width' once"),
    ('data_filler { type: "nope" } shape { dim: 1 }', "Unknown filler"),
])
def test_dummy_bad_params(params, match):
    text = f'name: "dd" type: "DummyData" dummy_data_param {{ {params} }}'
    with pytest.raises(LayerError, match=f"'dd'.*{match}"):
        make_layer(text, [], num_tops=2)


# ------------------------------------------------------------------------------ transformer
def tparam(text=""):
    return layer_param(f"type: \"Data\" transform_param {{ {text} }}").transform_param


def test_transform_center_crop_in_test_then_scale():
    x = images(1, c=2, h=7, w=6)[0]
    t = DataTransformer(tparam("crop_size: 3 scale: 0.5"), TEST)
    y = t.transform(datum_u8(x))
    # centre offsets round down: (7-3)//2 = 2, (6-3)//2 = 1
    np.testing.assert_array_equal(y, x[:, 2:5, 1:4].astype(np.float32) * np.float32(0.5))
    assert y.dtype == np.float32
    assert t.infer_blob_shape(datum_u8(x)) == [1, 2, 3, 3]


def test_transform_mean_file_is_cropped_with_the_datum(tmp_path):
    x = images(1, c=3, h=6, w=6, seed=1)[0]
    mean = np.random.default_rng(2).uniform(0, 255, size=(1, 3, 6, 6)).astype(np.float32)
    proto = caffe_pb2.BlobProto(num=1, channels=3, height=6, width=6)
    proto.data.extend(mean.ravel())
    write_binary(tmp_path / "mean.binaryproto", proto)
    t = DataTransformer(tparam(f'mean_file: "{tmp_path / "mean.binaryproto"}" crop_size: 4 scale: 0.25'),
                        TEST, dtype=np.float64)
    y = t.transform(datum_u8(x))
    expect = (x.astype(np.float64) - mean[0].astype(np.float64))[:, 1:5, 1:5] * 0.25
    np.testing.assert_allclose(y, expect, rtol=0, atol=1e-12)


def test_transform_mean_values_one_per_channel_or_one_for_all():
    x = images(1, c=3, h=2, w=3, seed=3)[0].astype(np.float64)
    y = DataTransformer(tparam("mean_value: 10 mean_value: 20 mean_value: 30 scale: 2"), TEST,
                        dtype=np.float64).transform(x)
    np.testing.assert_array_equal(y, (x - np.array([10, 20, 30.])[:, None, None]) * 2)
    y = DataTransformer(tparam("mean_value: 100"), TEST, dtype=np.float64).transform(x)
    np.testing.assert_array_equal(y, x - 100)


def test_transform_float_data_datum():
    vals = np.random.default_rng(4).standard_normal((2, 3, 3)).astype(np.float32)
    d = caffe_pb2.Datum(channels=2, height=3, width=3)
    d.float_data.extend(vals.ravel())
    y = DataTransformer(tparam("scale: 3 mean_value: 1"), TEST).transform(d)
    np.testing.assert_array_equal(y, (vals - np.float32(1)) * np.float32(3))


def test_transform_mirror_flips_some_items_in_test_too():
    x = images(40, c=2, h=3, w=4, seed=5)
    y = DataTransformer(tparam("mirror: true"), TEST, rng=np.random.default_rng(0)).transform_arrays(x)
    plain = x.astype(np.float32)
    flipped = plain[..., ::-1]
    is_plain = np.all(y == plain, axis=(1, 2, 3))
    is_flip = np.all(y == flipped, axis=(1, 2, 3))
    assert np.all(is_plain | is_flip)
    assert is_plain.sum() > 5 and is_flip.sum() > 5


def test_transform_order_crop_mean_scale_mirror_train(tmp_path):
    """Each output is flip?((x - mean)[crop at one offset]) * scale: the mean is taken at the
    source position, before the flip (Caffe's index arithmetic)."""
    c, h, w, crop, scale = 2, 5, 6, 3, 0.125
    x = images(30, c=c, h=h, w=w, seed=6)
    mean = np.random.default_rng(7).uniform(0, 200, size=(c, h, w))
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([1, c, h, w])
    proto.double_data.extend(mean.ravel())
    write_binary(tmp_path / "m.binaryproto", proto)
    t = DataTransformer(tparam(f'mean_file: "{tmp_path / "m.binaryproto"}" crop_size: {crop} '
                               f'mirror: true scale: {scale}'), TRAIN, rng=np.random.default_rng(1),
                        dtype=np.float64)
    y = t.transform_arrays(x)
    assert y.shape == (30, c, crop, crop)
    seen_offsets, seen_flips = set(), set()
    def candidate(centred, ho, wo, flip):
        a = centred[:, ho:ho + crop, wo:wo + crop]
        return a[..., ::-1] if flip else a

    for i in range(30):
        centred = (x[i] - mean) * scale
        matches = [(ho, wo, f) for ho in range(h - crop + 1) for wo in range(w - crop + 1)
                   for f in (False, True)
                   if np.allclose(y[i], candidate(centred, ho, wo, f), rtol=0, atol=1e-12)]
        assert matches, f"item {i} is no crop/flip of (x - mean) * scale"
        seen_offsets.add(matches[0][:2])
        seen_flips.add(matches[0][2])
    assert len(seen_offsets) > 3 and seen_flips == {False, True}


def test_transform_train_random_crop_reproducible_with_seed():
    x = images(8, h=9, w=9)
    a = DataTransformer(tparam("crop_size: 4"), TRAIN, rng=np.random.default_rng(5)).transform_arrays(x)
    b = DataTransformer(tparam("crop_size: 4"), TRAIN, rng=np.random.default_rng(5)).transform_arrays(x)
    np.testing.assert_array_equal(a, b)


def test_transform_mixed_sizes_with_crop_and_size_mismatch():
    t = DataTransformer(tparam("crop_size: 2"), TEST)
    y = t.transform_datums([datum_u8(images(1, h=4, w=4)[0]), datum_u8(images(1, h=6, w=3)[0])])
    assert y.shape == (2, 1, 2, 2)
    with pytest.raises(TransformError, match="item 1"):
        DataTransformer(tparam(), TEST).transform_datums([datum_u8(images(1, h=4, w=4)[0]),
                                                          datum_u8(images(1, h=5, w=4)[0])])


def encoded_datum(rgb, fmt="PNG", label=0):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return caffe_pb2.Datum(data=buf.getvalue(), encoded=True, label=label)


def test_transform_encoded_colour_is_bgr_and_force_gray_color():
    rgb = np.random.default_rng(8).integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    d = encoded_datum(rgb)
    y = DataTransformer(tparam(), TEST).transform(d)
    np.testing.assert_array_equal(y, rgb[..., ::-1].transpose(2, 0, 1).astype(np.float32))
    gray = DataTransformer(tparam("force_gray: true"), TEST).transform(d)
    assert gray.shape == (1, 3, 4)
    g = np.random.default_rng(9).integers(0, 256, size=(3, 4), dtype=np.uint8)
    colour = DataTransformer(tparam("force_color: true"), TEST).transform(encoded_datum(g))
    np.testing.assert_array_equal(colour, np.repeat(g[None].astype(np.float32), 3, axis=0))


@pytest.mark.parametrize("text, datum, match", [
    ("crop_size: 5", datum_u8(np.zeros((1, 4, 6))), "crop_size 5 is larger"),
    ('mean_file: "m" mean_value: 1', None, "Cannot specify mean_file and mean_value"),
    ("mean_value: 1 mean_value: 2", datum_u8(np.zeros((3, 2, 2))), "Specify either 1 mean_value or as many"),
    ("force_color: true force_gray: true", None, "both force_color and force_gray"),
    ('mean_file: "/nonexistent/mean.binaryproto"', None, "mean.binaryproto"),
    ("", caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc"), "3 data bytes"),
    ("", caffe_pb2.Datum(channels=1, height=2, width=2), "neither data nor float_data"),
    ("", caffe_pb2.Datum(data=b"not an image", encoded=True), "cannot decode"),
])
def test_transform_errors(text, datum, match):
    with pytest.raises(TransformError, match=match):
        t = DataTransformer(tparam(text), TEST)
        t.transform(datum)


def test_transform_mean_file_shape_mismatch(tmp_path):
    proto = caffe_pb2.BlobProto(num=1, channels=1, height=3, width=3)
    proto.data.extend([0.0] * 9)
    write_binary(tmp_path / "m.binaryproto", proto)
    t = DataTransformer(tparam(f'mean_file: "{tmp_path / "m.binaryproto"}"'), TEST)
    with pytest.raises(TransformError, match="1x3x3.*1x4x4"):
        t.transform(datum_u8(np.zeros((1, 4, 4))))


# -------------------------------------------------------------------------------- databases
@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_db_cursor_and_transaction(tmp_path, backend):
    db = open_db(backend, tmp_path / "db", NEW)
    txn = db.new_transaction()
    for k in (b"b", b"a", b"c"):
        txn.put(k, k * 2)
    txn.commit()
    db.close()
    db = open_db(backend, tmp_path / "db", READ)
    cur = db.new_cursor()
    assert list(cur) == [(b"a", b"aa"), (b"b", b"bb"), (b"c", b"cc")]
    assert not cur.valid()
    cur.seek_to_first()
    assert cur.valid() and cur.key() == b"a" and cur.value() == b"aa"
    cur.next()
    assert cur.key() == b"b"
    cur.close()
    db.close()
    with pytest.raises(DBError, match="already exists"):
        open_db(backend, tmp_path / "db", NEW)


def test_lmdb_map_grows_when_full(tmp_path, monkeypatch):
    monkeypatch.setattr(dbmod.LMDB, "INITIAL_MAP_SIZE", 64 * 1024)
    db = open_db("lmdb", tmp_path / "db", NEW)
    txn = db.new_transaction()
    for i in range(100):
        txn.put(b"%08d" % i, bytes([i]) * 4000)
    txn.commit()
    assert len(db) == 100
    db.close()
    db = open_db("lmdb", tmp_path / "db", READ)
    assert [v[:1] for _, v in db.new_cursor()] == [bytes([i]) for i in range(100)]
    db.close()


def test_unknown_backend():
    with pytest.raises(DBError, match="Unknown db backend"):
        dbmod.get_db("sqlite")


# ------------------------------------------------------------------------------- Data layer
@pytest.mark.parametrize("backend", ["LMDB", "LEVELDB"])
def test_data_layer_round_trip_and_cycling(tmp_path, backend):
    x = images(5, c=1, h=3, w=4)
    labels = [3, 1, 4, 1, 5]
    src = write_db(tmp_path / "db", x, labels, backend=backend.lower())
    layer, bottom, top = data_layer(src, 7, backend=backend, transform="scale: 0.00390625")
    try:
        assert top[0].shape == (7, 1, 3, 4) and top[1].shape == (7,)
        batches = forward_batches(layer, bottom, top, 3)
    finally:
        layer.close()
    # A batch larger than the database wraps around; the next batch continues where it stopped.
    order = np.arange(21) % 5
    data = np.concatenate([b[0] for b in batches])
    label = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(data, x[order].astype(np.float64) * 0.00390625)
    np.testing.assert_array_equal(label, np.array(labels, dtype=np.float64)[order])
    assert top[1].data.dtype == np.float64


def test_data_layer_logs_output_size_and_restart(tmp_path, caplog):
    src = write_db(tmp_path / "db", images(3, c=1, h=28, w=28), [0, 1, 2])
    import logging

    logger = logging.getLogger("recaffe")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="recaffe"):
            layer, bottom, top = data_layer(src, 4)
            layer.run_forward(bottom, top)
            layer.close()
    finally:
        logger.removeHandler(caplog.handler)
    text = caplog.text
    assert "output data size: 4,1,28,28" in text
    assert "Restarting data prefetching from start." in text
    assert f"Opened lmdb {src}" in text


def test_data_layer_float32_fast_path_and_single_top(tmp_path):
    x = images(4, c=3, h=2, w=2)
    src = write_db(tmp_path / "db", x, range(4))
    layer, bottom, top = data_layer(src, 4, num_tops=1, dtype=torch.float32, transform="scale: 0.1")
    try:
        layer.run_forward(bottom, top)
    finally:
        layer.close()
    assert top[0].data.dtype == np.float32
    np.testing.assert_array_equal(top[0].data, x.astype(np.float32) * np.float32(0.1))


def test_data_layer_crop_mean_value_in_test(tmp_path):
    x = images(3, c=2, h=5, w=5)
    src = write_db(tmp_path / "db", x, range(3))
    layer, bottom, top = data_layer(src, 3, transform="crop_size: 3 mean_value: 100 scale: 2")
    try:
        layer.run_forward(bottom, top)
    finally:
        layer.close()
    assert top[0].shape == (3, 2, 3, 3)
    np.testing.assert_array_equal(top[0].data, (x[:, :, 1:4, 1:4].astype(np.float64) - 100) * 2)


def test_data_layer_train_mirror_reproducible_from_seed(tmp_path):
    src = write_db(tmp_path / "db", images(6, h=3, w=8), range(6))
    runs = []
    for seed in (11, 11, 12):
        layer, bottom, top = data_layer(src, 6, transform="mirror: true crop_size: 2", phase=TRAIN, seed=seed)
        try:
            runs.append(np.concatenate([b[0] for b in forward_batches(layer, bottom, top, 3)]))
        finally:
            layer.close()
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_data_layer_ignores_deprecated_data_param_transform_fields(tmp_path):
    """Caffe's DataLayer reads only transform_param; data_param.scale is moved there only when a V1
    net is upgraded (tests/test_upgrade.py), so here it is ignored, with a warning."""
    x = images(2)
    src = write_db(tmp_path / "db", x, range(2))
    with capture_log() as lines:
        layer, bottom, top = data_layer(src, 2, extra="scale: 0.5")
    try:
        layer.run_forward(bottom, top)
    finally:
        layer.close()
    np.testing.assert_array_equal(top[0].data, x)
    assert any("data_param.scale is deprecated and ignored" in ln for ln in lines)


def test_data_layer_synchronous_when_prefetch_zero(tmp_path):
    x = images(3)
    src = write_db(tmp_path / "db", x, range(3))
    before = threading.active_count()
    layer, bottom, top = data_layer(src, 2, extra="prefetch: 0")
    assert threading.active_count() == before
    out = forward_batches(layer, bottom, top, 2)
    layer.close()
    np.testing.assert_array_equal(np.concatenate([o[0] for o in out]), x[[0, 1, 2, 0]])


def _data_threads():
    return [t for t in threading.enumerate() if t.name.startswith("recaffe-data-")]


def test_data_layer_thread_stops_on_close_and_gc(tmp_path):
    src = write_db(tmp_path / "db", images(3), range(3))
    base = len(_data_threads())
    layer, bottom, top = data_layer(src, 2)
    assert len(_data_threads()) == base + 1
    layer.close()
    assert len(_data_threads()) == base
    with pytest.raises(LayerError, match="after close"):
        layer.run_forward(bottom, top)

    layer, bottom, top = data_layer(src, 2)
    layer.run_forward(bottom, top)
    assert len(_data_threads()) == base + 1
    del layer
    gc.collect()
    deadline = time.time() + 5
    while len(_data_threads()) > base and time.time() < deadline:
        time.sleep(0.02)
    assert len(_data_threads()) == base


def test_data_layer_missing_database(tmp_path):
    missing = tmp_path / "nope_lmdb"
    expect = f"Data layer 'mnist': cannot open LMDB '{missing}': no such directory"
    with pytest.raises(LayerError, match=expect):
        data_layer(missing, 2)
    with pytest.raises(LayerError, match="'mnist': cannot open LevelDB .*nope_lmdb'"):
        data_layer(missing, 2, backend="LEVELDB")


def test_data_layer_bad_params_and_data(tmp_path):
    src = write_db(tmp_path / "db", [np.zeros((1, 2, 2)), np.zeros((1, 3, 3))], [0, 1])
    with pytest.raises(LayerError, match="'mnist'.*batch_size must be positive"):
        data_layer(src, 0)
    with pytest.raises(LayerError, match="'mnist'.*crop_size 4 is larger"):
        data_layer(src, 1, transform="crop_size: 4")
    with pytest.raises(LayerError, match="'mnist'.*source"):
        make_layer('name: "mnist" type: "Data" data_param { batch_size: 1 }', [], num_tops=2)
    # The second datum does not fit the batch shaped from the first: the prefetch thread's error
    # reaches forward, naming the layer.
    layer, bottom, top = data_layer(src, 2)
    try:
        with pytest.raises(LayerError, match="'mnist'.*item 1"):
            layer.run_forward(bottom, top)
    finally:
        layer.close()


def test_data_layer_empty_database_and_foreign_records(tmp_path):
    open_db("lmdb", tmp_path / "empty", NEW).close()
    with pytest.raises(LayerError, match="holds no records"):
        data_layer(tmp_path / "empty", 1)
    db = open_db("lmdb", tmp_path / "junk", NEW)
    txn = db.new_transaction()
    txn.put(b"k", b"\xff\xff\xff")
    txn.commit()
    db.close()
    with pytest.raises(LayerError, match="is not a Datum"):
        data_layer(tmp_path / "junk", 1)


def test_data_layer_in_a_net(tmp_path):
    from recaffe.net import Net

    x = images(4, c=1, h=2, w=2)
    src = write_db(tmp_path / "db", x, [0, 1, 2, 3])
    proto = tmp_path / "net.prototxt"
    proto.write_text(f'layer {{ name: "d" type: "Data" top: "data" top: "label" '
                     f'data_param {{ source: "{src}" batch_size: 3 backend: LMDB }} }}')
    net = Net(str(proto), TEST)
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, x[:3])
    np.testing.assert_array_equal(net.blobs["label"].data, [0, 1, 2])
    net.forward()
    np.testing.assert_array_equal(net.blobs["label"].data, [3, 0, 1])
    del net
    gc.collect()


def test_create_layer_direct_blob_api(tmp_path):
    """A Data layer built by hand with Blob tops (not through make_layer)."""
    src = write_db(tmp_path / "db", images(2), [5, 6])
    p = layer_param(f'name: "d" type: "Data" data_param {{ source: "{src}" batch_size: 2 backend: LMDB }}')
    layer = create_layer(p)
    top = [Blob(), Blob()]
    layer.setup([], top)
    layer.run_forward([], top)
    layer.close()
    np.testing.assert_array_equal(top[1].data, [5, 6])


@pytest.mark.parametrize("backend", ["LMDB", "LEVELDB"])
def test_two_layers_read_one_database_independently(tmp_path, backend):
    """Train and test nets (or two pycaffe Nets) may read the same database at once."""
    x = images(3)
    src = write_db(tmp_path / "db", x, range(3), backend=backend.lower())
    a, ab, at = data_layer(src, 2, backend=backend)
    b, bb, bt = data_layer(src, 1, backend=backend)
    try:
        ya = [o[1] for o in forward_batches(a, ab, at, 2)]
        a.close()
        yb = [o[1] for o in forward_batches(b, bb, bt, 4)]
    finally:
        a.close()
        b.close()
    np.testing.assert_array_equal(np.concatenate(ya), [0, 1, 2, 0])
    np.testing.assert_array_equal(np.concatenate(yb), [0, 1, 2, 0])
    # Every handle on it was released (LMDB readers are child processes, ended by close).
    key = str((tmp_path / "db").resolve())
    assert key not in dbmod._leveldb_readers._open


def test_lmdb_in_a_read_only_folder_is_read_without_locks(tmp_path, monkeypatch):
    import lmdb

    src = write_db(tmp_path / "db", images(2), [4, 2])
    real_open = lmdb.open

    def no_lock_file(path, **kw):  # what a read-only mount answers when LMDB makes its lock file
        if kw.get("lock", True):
            raise lmdb.Error(f"{path}: Permission denied")
        return real_open(path, **kw)

    monkeypatch.setattr(lmdb, "open", no_lock_file)
    # The reader process's open (run here, where lmdb.open is patched).
    env = open_reader_env(str(src))
    with env.begin() as txn:
        assert [caffe_pb2.Datum.FromString(v).label for _, v in txn.cursor()] == [4, 2]
    env.close()


@pytest.mark.parametrize("backend, junk_file, words", [
    ("LMDB", "data.mdb", "not an LMDB file"),
    ("LEVELDB", "CURRENT", "Corruption"),
])
def test_data_layer_corrupt_database_names_the_database(tmp_path, backend, junk_file, words):
    src = tmp_path / "corrupt_db"
    src.mkdir()
    (src / junk_file).write_bytes(np.random.default_rng(0).bytes(9000))
    with pytest.raises(LayerError, match=f"'mnist': cannot open {'LMDB' if backend == 'LMDB' else 'LevelDB'} "
                                         f"'{src}'.*{words}"):
        data_layer(src, 1, backend=backend)


@pytest.mark.parametrize("flag", ["force_color", "force_gray"])
def test_encoded_16_bit_datum_keeps_the_high_byte_when_forced(flag):
    """cv::imdecode with IMREAD_COLOR/GRAYSCALE reduces 16-bit pixels to their high byte (300 -> 1),
    as convert_imageset and ImageData read files; Pillow's own conversion would clip to 255."""

    from PIL import Image

    from recaffe.data.transformer import decode_image

    pixels = np.array([[300, 65535], [256, 7]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), **{flag: True})
    want = (pixels >> 8).astype(np.uint8)
    assert out.shape == ((3, 2, 2) if flag == "force_color" else (1, 2, 2))
    for channel in out:
        np.testing.assert_array_equal(channel, want)


# ------------------------------------------------------------------ NVCaffe's cache + shuffle
def _labels_of(batches):
    return [b[1].astype(int).tolist() for b in batches]


def test_nvcaffe_cache_and_shuffle_reshuffles_every_pass_after_the_first(tmp_path):
    src = write_db(tmp_path / "db", images(5), range(5))
    layer, bottom, top = data_layer(src, 5, extra="cache: true shuffle: true")
    try:
        passes = _labels_of(forward_batches(layer, bottom, top, 4))
    finally:
        layer.close()
    assert passes[0] == [0, 1, 2, 3, 4]  # the first pass reads the database in order (and caches it)
    for p in passes[1:]:
        assert sorted(p) == [0, 1, 2, 3, 4]  # each later pass: every record once
    assert len({tuple(p) for p in passes[1:]}) > 1  # in a new order each time
    again, bottom, top = data_layer(src, 5, extra="cache: true shuffle: true")  # the same seed: the same orders
    try:
        assert _labels_of(forward_batches(again, bottom, top, 4)) == passes
    finally:
        again.close()


def test_nvcaffe_shuffle_without_cache_reads_in_order(tmp_path):
    src = write_db(tmp_path / "db", images(3), range(3))
    layer, bottom, top = data_layer(src, 4, extra="shuffle: true")
    try:
        assert _labels_of(forward_batches(layer, bottom, top, 2)) == [[0, 1, 2, 0], [1, 2, 0, 1]]
    finally:
        layer.close()


def test_nvcaffe_cache_with_rand_skip_still_holds_every_record(tmp_path):
    src = write_db(tmp_path / "db", images(6), range(6))
    layer, bottom, top = data_layer(src, 3, extra="cache: true shuffle: true rand_skip: 5", phase=TRAIN)
    try:
        first, second, third, fourth = _labels_of(forward_batches(layer, bottom, top, 4))
    finally:
        layer.close()
    start = first[0]
    assert start != 0  # (the skip is drawn; with this seed it is not 0, so the cache wraps around)
    assert first + second == [(start + i) % 6 for i in range(6)]  # one pass in database order from the skip
    assert sorted(third + fourth) == list(range(6))  # then every record, shuffled
