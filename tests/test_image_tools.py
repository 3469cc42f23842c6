"""Caffe's image/data tools: convert_imageset, compute_image_mean, convert_cifar_data and
extract_features, run through ``recaffe.cli.main.main``, checked against images written here and
values computed by hand (numpy, Pillow)."""
import io

import numpy as np
import pytest
from helpers import capture_log
from PIL import Image

import caffe
from recaffe.cli.main import main
from recaffe.data import imageset
from recaffe.data.db import open_db
from recaffe.io.protofiles import read_binary
from recaffe.proto import caffe_pb2

# ------------------------------------------------------------------------------ helpers


def smooth(h, w, c, seed):
    """A smooth uint8 image (JPEG keeps it close), with some per-pixel texture."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = [40 + 10 * y + 6 * x + 30 * k for k in range(c)]
    img = np.stack(base, -1) + g.integers(0, 8, (h, w, c))
    return np.clip(img, 0, 255).astype(np.uint8)


def bgr_chw(rgb_or_grey):
    """What OpenCV's IMREAD_COLOR gives, in Caffe's datum layout: (3, H, W), B, G, R."""
    a = np.asarray(rgb_or_grey)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[:, :, :3].transpose(2, 0, 1)[::-1])


def pillow_rgb(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# name -> (what to save, format). Sizes are 1x, 2x and 3x the 6x8 target used with -resize.
IMAGES = {
    "colour.png": (lambda: Image.fromarray(smooth(12, 16, 3, 1)), "PNG"),
    "photo.jpg": (lambda: Image.fromarray(smooth(6, 8, 3, 2)), "JPEG"),
    "grey.png": (lambda: Image.fromarray(smooth(18, 24, 1, 3)[:, :, 0]), "PNG"),
    "grey photo.jpg": (lambda: Image.fromarray(smooth(12, 16, 1, 4)[:, :, 0]), "JPEG"),
    "alpha.png": (lambda: Image.fromarray(smooth(6, 8, 4, 5), "RGBA"), "PNG"),
    "sub/palette.png": (lambda: Image.fromarray(smooth(12, 16, 3, 6)).convert("P"), "PNG"),
}
LABELS = [3, 1, 4, 1, 5, 9]


def make_image_folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for name, (make, fmt) in IMAGES.items():
        make().save(root / name, fmt)
    listfile = tmp_path / "list.txt"
    listfile.write_text("".join(f"{name} {label}\n" for name, label in zip(IMAGES, LABELS)))
    return str(root) + "/", str(listfile)


def expected_colour(root):
    """Each image as Caffe stores it without resizing, from Pillow's decode."""
    return {name: bgr_chw(pillow_rgb(root + name)) for name in IMAGES}


def downscale(chw, factor):
    """OpenCV's INTER_LINEAR to 1/factor of the size, by hand: factor 2 averages 2x2 blocks
    (rounding halves up), factor 3 takes each 3x3 block's centre."""
    if factor == 1:
        return chw
    if factor == 3:
        return chw[:, 1::3, 1::3]
    c, h, w = chw.shape
    blocks = chw.astype(np.int64).reshape(c, h // 2, 2, w // 2, 2).sum(axis=(2, 4))
    return ((blocks + 2) // 4).astype(np.uint8)


def read_db(path, backend="lmdb"):
    db = open_db(backend, path)
    records = [(k, v) for k, v in db.new_cursor()]
    db.close()
    return records


def datums(path, backend="lmdb"):
    return [(k, caffe_pb2.Datum.FromString(v)) for k, v in read_db(path, backend)]


def decode_png_or_jpeg(data):
    return bgr_chw(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def keys_for(names):
    return [b"%08d_%s" % (i, n.encode()) for i, n in enumerate(names)]


# ------------------------------------------------------- convert_imageset: the acceptance test
TINY_NET = """
name: "tiny"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ scale: 0.00390625 mean_value: 104 mean_value: 117 mean_value: 123 }}
  data_param {{ source: "{source}" backend: {backend} batch_size: {batch} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


def train_from(tmp_path, db, backend, n):
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(TINY_NET.format(source=db, backend=backend.upper(), batch=n))
    solver_file = tmp_path / "solver.prototxt"
    solver_file.write_text(f'net: "{net_file}"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 3\n'
                           f'display: 0\nsnapshot_after_train: false\nrandom_seed: 7\nsolver_mode: CPU\n')
    solver = caffe.get_solver(str(solver_file))
    w0 = solver.net.params["ip"][0].data.copy()
    solver.step(3)
    net = solver.net
    assert np.isfinite(float(net.blobs["loss"].data))
    assert not np.array_equal(w0, net.params["ip"][0].data)  # it trained
    return net.blobs["data"].data.copy(), net.blobs["label"].data.copy()


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
@pytest.mark.parametrize("encoded", [False, True])
def test_convert_imageset_resized_then_train(tmp_path, backend, encoded):
    root, listfile = make_image_folder(tmp_path)
    db = str(tmp_path / f"db_{backend}")
    flags = [f"-backend={backend}", "-resize_width=8", "-resize_height=6"] + (["-encoded"] if encoded else [])
    assert main(["convert_imageset", *flags, root, listfile, db]) == 0
    records = datums(db, backend)
    assert [k for k, _ in records] == keys_for(IMAGES)
    originals = expected_colour(root)
    images = []
    for (name, (make, fmt)), (_, d), label in zip(IMAGES.items(), records, LABELS):
        factor = originals[name].shape[1] // 6
        want = downscale(originals[name], factor)
        assert d.label == label and d.encoded == encoded
        if encoded:
            # Resized images are re-encoded in the file's own format: PNG exactly, JPEG lossy.
            assert not d.HasField("channels")
            got = decode_png_or_jpeg(d.data)
            assert Image.open(io.BytesIO(d.data)).format == fmt
            if fmt == "PNG":
                np.testing.assert_array_equal(got, want, err_msg=name)
            else:
                assert np.abs(got.astype(int) - want).mean() < 3, name
            images.append(got)
        else:
            assert (d.channels, d.height, d.width) == (3, 6, 8)
            np.testing.assert_array_equal(np.frombuffer(d.data, np.uint8).reshape(3, 6, 8), want,
                                          err_msg=name)
            images.append(want)
    data, labels = train_from(tmp_path, db, backend, len(IMAGES))
    mean = np.array([104, 117, 123], np.float32).reshape(1, 3, 1, 1)
    want = (np.stack(images).astype(np.float32) - mean) * np.float32(0.00390625)
    np.testing.assert_allclose(data, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(labels, LABELS)


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_convert_imageset_native_sizes_raw_and_encoded(tmp_path, backend):
    root, listfile = make_image_folder(tmp_path)
    originals = expected_colour(root)
    raw_db, enc_db = str(tmp_path / "raw"), str(tmp_path / "enc")
    assert main(["convert_imageset", "--backend", backend, root, listfile, raw_db]) == 0
    assert main(["convert_imageset", "--backend", backend, "-encoded", root, listfile, enc_db]) == 0
    for (key, raw), (key2, enc), name, label in zip(read_db(raw_db, backend), read_db(enc_db, backend),
                                                     IMAGES, LABELS):
        assert key == key2
        img = originals[name]
        c, h, w = img.shape
        # Caffe's exact bytes: channels, height, width, data, label, encoded (false).
        head = bytes([0x08, c, 0x10, h, 0x18, w, 0x22]) + _varint(c * h * w)
        assert raw == head + img.tobytes() + bytes([0x28, label, 0x38, 0]), name
        # -encoded without resizing stores the file itself: data, label, encoded (true).
        file_bytes = open(root + name, "rb").read()
        assert enc == bytes([0x22]) + _varint(len(file_bytes)) + file_bytes + bytes([0x28, label, 0x38, 1])


def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_convert_imageset_gray(tmp_path):
    root, listfile = make_image_folder(tmp_path)
    db = str(tmp_path / "db")
    assert main(["convert_imageset", "-gray", root, listfile, db]) == 0
    for (_, d), name in zip(datums(db), IMAGES):
        assert d.channels == 1
        got = np.frombuffer(d.data, np.uint8).reshape(d.height, d.width)
        with Image.open(root + name) as im:
            if name.endswith(".jpg"):
                im.draft("L", None)  # the JPEG's own luma, as libjpeg gives OpenCV
                want = np.asarray(im.convert("L")).astype(int)
                np.testing.assert_array_equal(got, want, err_msg=name)
            elif im.mode == "L":
                np.testing.assert_array_equal(got, np.asarray(im), err_msg=name)
            else:
                rgb = np.asarray(im.convert("RGB")).astype(float)
                luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
                assert np.abs(got - luma).max() <= 0.51, name


def test_convert_imageset_encode_type_reencodes(tmp_path):
    root, listfile = make_image_folder(tmp_path)
    db = str(tmp_path / "db")
    with capture_log() as lines:
        assert main(["convert_imageset", "-encode_type=png", root, listfile, db]) == 0
    assert "encode_type specified, assuming encoded=true." in lines
    originals = expected_colour(root)
    for (_, d), name in zip(datums(db), IMAGES):
        assert d.encoded and Image.open(io.BytesIO(d.data)).format == "PNG"
        if name.endswith(".png"):  # PNG files match the encoding: stored as they are
            assert d.data == open(root + name, "rb").read()
        np.testing.assert_array_equal(decode_png_or_jpeg(d.data), originals[name], err_msg=name)


def test_convert_imageset_shuffle_is_seeded(tmp_path):
    root, listfile = make_image_folder(tmp_path)
    orders = []
    for i, seed in enumerate(["0", "0", "5"]):
        db = str(tmp_path / f"db{i}")
        assert main(["convert_imageset", "-shuffle", "-shuffle_seed", seed, root, listfile, db]) == 0
        records = datums(db)
        names = [k[9:].decode() for k, _ in records]
        assert [k[:9] for k, _ in records] == [b"%08d_" % j for j in range(len(IMAGES))]
        assert sorted(names) == sorted(IMAGES)
        label_of = dict(zip(IMAGES, LABELS))
        assert [d.label for _, d in records] == [label_of[n] for n in names]
        orders.append(names)
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_convert_imageset_skips_unreadable_images_and_logs_them(tmp_path):
    root, listfile = make_image_folder(tmp_path)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with open(listfile, "a") as f:
        f.write("\nmissing.png 2\nbroken.jpg 7\ncolour.png 0\n")
    db = str(tmp_path / "db")
    with capture_log() as lines:
        assert main(["convert_imageset", root, listfile, db]) == 0
    assert any("missing.png" in ln and f"line 8 of {listfile}" in ln for ln in lines), lines
    assert any("broken.jpg" in ln and f"line 9 of {listfile}" in ln and "decode" in ln for ln in lines)
    keys = [k for k, _ in read_db(db)]
    # Skipped lines keep their index: the last image is record 8 of the list.
    assert keys == keys_for(IMAGES) + [b"00000008_colour.png"]
    assert "Processed 7 files." in lines


def test_convert_imageset_commits_every_1000(tmp_path, monkeypatch):
    root, listfile = make_image_folder(tmp_path)
    monkeypatch.setattr(imageset, "COMMIT_EVERY", 4)
    with capture_log() as lines:
        assert main(["convert_imageset", root, listfile, str(tmp_path / "db")]) == 0
    assert [ln for ln in lines if ln.startswith("Processed")] == ["Processed 4 files.", "Processed 6 files."]
    assert f"A total of {len(IMAGES)} images." in lines


def test_convert_imageset_progress_bar(tmp_path, capsys):
    root, listfile = make_image_folder(tmp_path)
    imageset.convert_imageset(root, listfile, str(tmp_path / "db"), progress=True)
    assert "convert_imageset: 100%" in capsys.readouterr().err


def test_convert_imageset_check_size(tmp_path, capsys):
    root, listfile = make_image_folder(tmp_path)
    assert main(["convert_imageset", "-check_size", "-resize_height=6", "-resize_width=8", root, listfile,
                 str(tmp_path / "ok")]) == 0
    assert main(["convert_imageset", "-check_size", root, listfile, str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert "Incorrect data field size" in err and root + "photo.jpg" in err and "line 2" in err
    assert main(["convert_imageset", "-check_size", "-encoded", root, listfile, str(tmp_path / "x")]) == 1
    assert "-check_size cannot be used with encoded" in capsys.readouterr().err


def test_convert_imageset_errors(tmp_path, capsys):
    root, listfile = make_image_folder(tmp_path)
    missing = str(tmp_path / "nolist.txt")
    assert main(["convert_imageset", root, missing, str(tmp_path / "db")]) == 1
    assert f"list file {missing} not found" in capsys.readouterr().err
    assert not (tmp_path / "db").exists()
    bad = tmp_path / "bad.txt"
    bad.write_text("colour.png 1\nphoto.jpg\n")
    assert main(["convert_imageset", root, str(bad), str(tmp_path / "db")]) == 1
    assert f"{bad}:2: expected 'FILENAME LABEL'" in capsys.readouterr().err
    bad.write_text("colour.png one\n")
    assert main(["convert_imageset", root, str(bad), str(tmp_path / "db")]) == 1
    assert f"{bad}:1: the label 'one' is not an integer" in capsys.readouterr().err
    assert main(["convert_imageset", "-encode_type=xyz", root, listfile, str(tmp_path / "db")]) == 1
    assert "cannot encode images as 'xyz'" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["convert_imageset", root, listfile, str(tmp_path / "exists")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["convert_imageset", "-backend=sqlite", root, listfile, str(tmp_path / "db")]) == 1
    assert "Unknown db backend" in capsys.readouterr().err
    assert main(["convert_imageset", root, listfile]) == 1
    assert "Usage:" in capsys.readouterr().err
    assert main(["convert_imageset", "-bogus", root, listfile, str(tmp_path / "db")]) == 1
    assert main(["convert_imageset", "-help"]) == 0
    assert "-resize_width" in capsys.readouterr().out


def test_root_folder_without_slash_gets_a_hint(tmp_path):
    root, listfile = make_image_folder(tmp_path)
    with capture_log() as lines:
        assert main(["convert_imageset", root.rstrip("/"), listfile, str(tmp_path / "db")]) == 0
    assert any("did you mean" in ln for ln in lines)
    assert read_db(str(tmp_path / "db")) == []


@pytest.mark.parametrize("size", [(5, 13), (11, 4), (14, 18)])
def test_resize_is_opencv_linear(size):
    """Arbitrary factors against torch's bilinear with the same half-pixel centres (float, so
    OpenCV's 11-bit weights may move a value by one level)."""
    import torch

    from recaffe.data.image_file import resize_linear

    img = np.random.default_rng(2).integers(0, 256, (3, 7, 9), dtype=np.uint8)
    got = resize_linear(img, *size)
    ref = torch.nn.functional.interpolate(torch.from_numpy(img[None].astype(np.float64)), size=size,
                                          mode="bilinear", align_corners=False)[0].numpy()
    assert got.shape == (3, *size) and got.dtype == np.uint8
    assert np.abs(got - np.round(ref)).max() <= 1


def test_resize_truncates_as_opencv_8bit_linear():
    """Column [1, 5] to 5 rows, worked by hand with OpenCV's 8-bit arithmetic. Rows are
    clamped, weights b0 = rint((1 - fy) * 2048), b1 = rint(fy * 2048) are kept at the borders,
    each row sum (pixel * 2048 here) is shifted >> 4, each product >> 16, then (sum + 2) >> 2:
    row 3 has fy = 0.9, b = (205, 1843): ((205 * 128) >> 16) + ((1843 * 640) >> 16) = 0 + 17,
    (17 + 2) >> 2 = 4, where rounding 0.1 * 1 + 0.9 * 5 = 4.6 would give 5."""
    from recaffe.data.image_file import resize_linear

    got = resize_linear(np.array([[[1], [5]]], np.uint8), 5, 1)
    np.testing.assert_array_equal(got.ravel(), [1, 1, 3, 4, 5])


def _opencv_linear_by_loops(img, out_h, out_w):
    """OpenCV's 8-bit INTER_LINEAR written out pixel by pixel (cv::resize's fixed-point path)."""
    c, h, w = img.shape

    def taps(src, dst, clamp):
        out = []
        for d in range(dst):
            f = np.float32((d + 0.5) * (1.0 / (dst / src)) - 0.5)
            s = int(np.floor(f))
            f = np.float32(f - np.float32(s))
            if clamp and (s < 0 or s >= src - 1):
                s, f = min(max(s, 0), src - 1), np.float32(0)
            out.append((s, int(np.rint((np.float32(1) - f) * np.float32(2048))),
                        int(np.rint(f * np.float32(2048)))))
        return out

    xs, ys = taps(w, out_w, True), taps(h, out_h, False)
    out = np.zeros((c, out_h, out_w), np.uint8)
    for k in range(c):
        rows = [[int(img[k, y, s]) * (a0 if s + 1 < w else 2048) + (int(img[k, y, s + 1]) * a1 if s + 1 < w else 0)
                 for s, a0, a1 in xs] for y in range(h)]
        for dy, (s, b0, b1) in enumerate(ys):
            r0, r1 = rows[min(max(s, 0), h - 1)], rows[min(max(s + 1, 0), h - 1)]
            for dx in range(out_w):
                out[k, dy, dx] = (((b0 * (r0[dx] >> 4)) >> 16) + ((b1 * (r1[dx] >> 4)) >> 16) + 2) >> 2
    return out


@pytest.mark.parametrize("shape", [(7, 9, 5, 13), (7, 9, 11, 4), (6, 10, 6, 3), (1, 5, 4, 2)])
def test_resize_matches_opencv_written_pixel_by_pixel(shape):
    from recaffe.data.image_file import resize_linear

    h, w, out_h, out_w = shape
    img = np.random.default_rng(h * w).integers(0, 256, (3, h, w), dtype=np.uint8)
    np.testing.assert_array_equal(resize_linear(img, out_h, out_w), _opencv_linear_by_loops(img, out_h, out_w))


def test_16_bit_png_keeps_the_high_byte(tmp_path):
    from recaffe.data.image_file import read_image

    values = np.arange(0, 65536, 4099, dtype=np.uint16)[:16].reshape(4, 4)
    Image.fromarray(values).save(tmp_path / "deep.png")
    got = read_image(tmp_path / "deep.png")
    want = (values >> 8).astype(np.uint8)
    np.testing.assert_array_equal(got, np.stack([want] * 3))
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png", is_color=False)[0], want)


# --------------------------------------------------------------------------- compute_image_mean
def write_datums(path, items, backend="lmdb"):
    db = open_db(backend, path, "new")
    txn = db.new_transaction()
    for i, d in enumerate(items):
        txn.put(b"%08d" % i, d.SerializeToString())
    txn.commit()
    db.close()


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_compute_image_mean_matches_numpy(tmp_path, backend):
    g = np.random.default_rng(0)
    imgs = g.integers(0, 256, (7, 3, 4, 5), dtype=np.uint8)
    db = str(tmp_path / "db")
    write_datums(db, [caffe_pb2.Datum(channels=3, height=4, width=5, data=x.tobytes()) for x in imgs],
                 backend)
    out = tmp_path / "mean.binaryproto"
    with capture_log() as lines:
        assert main(["compute_image_mean", f"-backend={backend}", db, str(out)]) == 0
    blob = read_binary(out, caffe_pb2.BlobProto())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 4, 5)
    want = imgs.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(np.asarray(blob.data).reshape(3, 4, 5), want, rtol=1e-6)
    assert f"Write to {out}" in lines and "Number of channels: 3" in lines
    for c in range(3):
        line = next(ln for ln in lines if ln.startswith(f"mean_value channel [{c}]:"))
        assert float(line.split(":")[1]) == pytest.approx(want[c].mean(), rel=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_compute_image_mean_decodes_encoded_and_reads_float_data(tmp_path):
    root, listfile = make_image_folder(tmp_path)
    enc = str(tmp_path / "enc")
    assert main(["convert_imageset", "-encoded", "-encode_type=png", "-resize_height=6", "-resize_width=8",
                 root, listfile, enc]) == 0
    images = [decode_png_or_jpeg(d.data) for _, d in datums(enc)]
    with capture_log() as lines:
        assert main(["compute_image_mean", enc, str(tmp_path / "m1")]) == 0
    assert "Decoding Datum" in lines
    blob = read_binary(tmp_path / "m1", caffe_pb2.BlobProto())
    np.testing.assert_allclose(np.asarray(blob.data).reshape(3, 6, 8),
                               np.stack(images).astype(np.float64).mean(0), rtol=1e-6)
    values = np.random.default_rng(1).normal(size=(3, 2, 2, 2)).astype(np.float32)
    fdb = str(tmp_path / "float")
    write_datums(fdb, [caffe_pb2.Datum(channels=2, height=2, width=2, float_data=v.ravel().tolist())
                       for v in values])
    assert main(["compute_image_mean", fdb, str(tmp_path / "m2")]) == 0
    blob = read_binary(tmp_path / "m2", caffe_pb2.BlobProto())
    np.testing.assert_allclose(blob.data, values.astype(np.float64).mean(0).ravel(), rtol=1e-5, atol=1e-6)


def test_compute_image_mean_errors(tmp_path, capsys):
    missing = str(tmp_path / "nothere")
    assert main(["compute_image_mean", missing]) == 1
    assert missing in capsys.readouterr().err
    empty = str(tmp_path / "empty")
    write_datums(empty, [])
    assert main(["compute_image_mean", empty, str(tmp_path / "m")]) == 1
    assert "holds no records" in capsys.readouterr().err and not (tmp_path / "m").exists()
    mixed = str(tmp_path / "mixed")
    write_datums(mixed, [caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes(4)),
                         caffe_pb2.Datum(channels=1, height=3, width=2, data=bytes(6))])
    assert main(["compute_image_mean", mixed]) == 1
    err = capsys.readouterr().err
    assert "Incorrect data field size 6" in err and "'00000001'" in err and mixed in err
    assert main(["compute_image_mean"]) == 1
    assert "Usage:" in capsys.readouterr().err
    ok = str(tmp_path / "ok")
    write_datums(ok, [caffe_pb2.Datum(channels=1, height=1, width=1, data=b"\x07")])
    assert main(["compute_image_mean", ok, str(tmp_path / "no" / "dir" / "m")]) == 1


# --------------------------------------------------------------------------- convert_cifar_data
def write_cifar(folder, counts, seed=0):
    g = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    files = {}
    for name, n in zip([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"], counts):
        raw = g.integers(0, 256, (n, 3073), dtype=np.uint8)
        raw[:, 0] = g.integers(0, 10, n)
        if n:
            raw[0, 0] = 200  # a C char: -56
        (folder / name).write_bytes(raw.tobytes())
        files[name] = raw
    return files


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_convert_cifar_copies_the_bytes(tmp_path, backend):
    files = write_cifar(tmp_path / "in", [2, 1, 3, 1, 2, 3])
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert_cifar_data", str(tmp_path / "in"), str(out), backend]) == 0
    train = np.concatenate([files[f"data_batch_{i}.bin"] for i in range(1, 6)])
    test = files["test_batch.bin"]
    for db, raw in ((f"cifar10_train_{backend}", train), (f"cifar10_test_{backend}", test)):
        records = datums(str(out / db), backend)
        assert [k for k, _ in records] == [b"%05d" % i for i in range(len(raw))]
        for (_, d), row in zip(records, raw):
            assert (d.channels, d.height, d.width) == (3, 32, 32)
            assert d.data == row[1:].tobytes()  # R, G, B planes as in the file
            assert d.label == (int(row[0]) if row[0] < 128 else int(row[0]) - 256)


def test_convert_cifar_errors(tmp_path, capsys):
    write_cifar(tmp_path / "in", [1, 1, 1, 1, 1, 1])
    (tmp_path / "in" / "test_batch.bin").unlink()
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert_cifar_data", str(tmp_path / "in"), str(out), "lmdb"]) == 1
    assert "test_batch.bin" in capsys.readouterr().err and list(out.iterdir()) == []
    (tmp_path / "in" / "test_batch.bin").write_bytes(bytes(3073 + 5))
    assert main(["convert_cifar_data", str(tmp_path / "in"), str(out), "lmdb"]) == 1
    err = capsys.readouterr().err
    assert "test_batch.bin" in err and "3078 bytes is not a whole number" in err
    (tmp_path / "in" / "test_batch.bin").write_bytes(bytes(3073))
    (out / "cifar10_test_lmdb").mkdir()
    assert main(["convert_cifar_data", str(tmp_path / "in"), str(out), "lmdb"]) == 1
    assert "already exists" in capsys.readouterr().err and not (out / "cifar10_train_lmdb").exists()
    assert main(["convert_cifar_data", str(tmp_path / "in")]) == 1
    assert "Usage:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- extract_features
FEATURE_NET = """
name: "features"
layer {{ name: "data" type: "Data" top: "data" top: "label"
  transform_param {{ scale: 0.5 }}
  data_param {{ source: "{source}" backend: LMDB batch_size: 2 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }}
                         bias_filler {{ type: "constant" value: 0.25 }} }} }}
"""


def test_extract_features_matches_the_forward_pass(tmp_path):
    g = np.random.default_rng(3)
    imgs = g.integers(0, 256, (5, 2, 3, 4), dtype=np.uint8)
    source = str(tmp_path / "images")
    write_datums(source, [caffe_pb2.Datum(channels=2, height=3, width=4, data=x.tobytes(), label=1)
                          for x in imgs])
    proto = tmp_path / "features.prototxt"
    proto.write_text(FEATURE_NET.format(source=source))
    net = caffe.Net(str(proto), caffe.TEST)
    W = net.params["ip"][0].data.copy()
    b = net.params["ip"][1].data.copy()
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    del net
    ip_db, data_db = str(tmp_path / "ip_feats"), str(tmp_path / "data_feats")
    with capture_log() as lines:
        assert main(["extract_features", weights, str(proto), "ip,data", f"{ip_db},{data_db}", "2",
                     "lmdb"]) == 0
    assert "Extracted features of 4 query images for feature blob ip" in lines
    assert "Successfully extracted the features!" in lines
    x = imgs[:4].astype(np.float32) * np.float32(0.5)  # two batches of two
    want_ip = x.reshape(4, -1).astype(np.float64) @ W.T.astype(np.float64) + b
    recs = datums(ip_db)
    assert [k for k, _ in recs] == [b"%010d" % i for i in range(4)]
    for (_, d), want in zip(recs, want_ip):
        assert (d.channels, d.height, d.width, d.HasField("label")) == (3, 1, 1, False)
        np.testing.assert_allclose(d.float_data, want, rtol=1e-5, atol=1e-5)
    for (_, d), want in zip(datums(data_db), x):
        assert (d.channels, d.height, d.width) == (2, 3, 4)
        np.testing.assert_array_equal(np.asarray(d.float_data, np.float32), want.ravel())


def test_extract_features_errors(tmp_path, capsys):
    source = str(tmp_path / "images")
    write_datums(source, [caffe_pb2.Datum(channels=1, height=2, width=2, data=bytes(4))] * 2)
    proto = tmp_path / "features.prototxt"
    proto.write_text(FEATURE_NET.format(source=source))
    weights = str(tmp_path / "w.caffemodel")
    caffe.Net(str(proto), caffe.TEST).save(weights)
    base = ["extract_features", weights, str(proto)]
    assert main(base + ["fc7", str(tmp_path / "f"), "1", "lmdb"]) == 1
    err = capsys.readouterr().err
    assert "Unknown feature blob name fc7" in err and str(proto) in err and not (tmp_path / "f").exists()
    assert main(base + ["ip,data", str(tmp_path / "f"), "1", "lmdb"]) == 1
    assert "must be equal" in capsys.readouterr().err
    assert main(base + ["ip", str(tmp_path / "f"), "two", "lmdb"]) == 1
    assert "num_mini_batches must be an integer" in capsys.readouterr().err
    assert main(base + ["ip", str(tmp_path / "f"), "1", "sqlite"]) == 1
    assert "Unknown db backend" in capsys.readouterr().err
    assert main(["extract_features", str(tmp_path / "none.caffemodel"), str(proto), "ip",
                 str(tmp_path / "g"), "1", "lmdb"]) == 1
    assert "none.caffemodel" in capsys.readouterr().err
    assert main(base + ["ip"]) == 1
    assert "Usage: extract_features" in capsys.readouterr().err
    import torch
    if not torch.cuda.is_available():
        assert main(base + ["ip", str(tmp_path / "h"), "1", "lmdb", "GPU", "0"]) == 1
        assert "CUDA" in capsys.readouterr().err


def test_extract_features_refuses_blobs_of_more_than_4_axes(tmp_path):
    """Caffe's legacy accessors (num/channels/height/width) stop at blobs of more than 4 axes."""
    from recaffe.data.features import FeatureError, extract_features

    proto = tmp_path / "five.prototxt"
    proto.write_text('layer { name: "x" type: "Input" top: "x" '
                     'input_param { shape { dim: 1 dim: 2 dim: 1 dim: 1 dim: 3 } } }')
    net = caffe.Net(str(proto), caffe.TEST)
    with pytest.raises(FeatureError, match=r"feature blob x .*five\.prototxt.* 5 axes"):
        extract_features(net, ["x"], [str(tmp_path / "f")], 1, source=str(proto))
    assert not (tmp_path / "f").exists()
