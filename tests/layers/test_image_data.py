"""ImageData and WindowData on real image files written in tmp_path.

Expected values are computed here with numpy from the arrays the images were made from (PNG is
lossless) or from Pillow's own decode of the file (JPEG); resizing is checked against a float
bilinear reference with OpenCV's pixel-centre convention (to within one grey level).
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import capture_log
from recaffe.gradient_check import make_layer
from recaffe.io.protofiles import parse_text, write_binary
from recaffe.layer import LayerError
from recaffe.layers.image_data import window_geometry
from recaffe.proto import caffe_pb2
from recaffe.solvers import create_solver

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def bgr_chw(a):
    return np.ascontiguousarray(a[..., ::-1].transpose(2, 0, 1))


def save(tmp_path, name, array, **kw):
    Image.fromarray(array).save(tmp_path / name, **kw)
    return name


def write_list(tmp_path, lines, name="list.txt"):
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def bilinear(chw, h, w):
    """Float bilinear resize, pixel centres aligned and borders clamped (OpenCV's INTER_LINEAR)."""
    def taps(src, dst):
        f = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
        i0 = np.floor(f).astype(int)
        return i0, np.minimum(i0 + 1, src - 1), f - i0
    y0, y1, ay = taps(chw.shape[1], h)
    x0, x1, ax = taps(chw.shape[2], w)
    x = chw.astype(np.float64)
    rows = x[:, :, x0] * (1 - ax) + x[:, :, x1] * ax
    return rows[:, y0, :] * (1 - ay)[:, None] + rows[:, y1, :] * ay[:, None]


def image_data(source, batch_size=2, extra="", transform="", phase=TEST, seed=1701, root="", prefetch=4):
    text = (f'name: "img" type: "ImageData" transform_param {{ {transform} }} '
            f'data_param {{ prefetch: {prefetch} }} image_data_param {{ source: "{source}" '
            f'batch_size: {batch_size} root_folder: "{root}" {extra} }}')
    return make_layer(text, [], num_tops=2, dtype=torch.float32, phase=phase, seed=seed)


def batches(layer, top, n):
    out = []
    for _ in range(n):
        layer.run_forward([], top)
        out.append((top[0].data.copy(), top[1].data.copy()))
    return out


@pytest.fixture
def four_pngs(tmp_path):
    arrays = [rgb(5, 7, i) for i in range(4)]
    names = [save(tmp_path, f"im {i}.png", a) for i, a in enumerate(arrays)]  # paths may hold spaces
    source = write_list(tmp_path, [f"{n} {10 + i}" for i, n in enumerate(names)])
    return tmp_path, source, arrays


# ------------------------------------------------------------------------------- ImageData
@pytest.mark.parametrize("prefetch", [0, 2])
def test_image_data_values_labels_and_wrap_around(four_pngs, prefetch):
    folder, source, arrays = four_pngs
    layer, _, top = image_data(source, 3, transform="scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30",
                               root=f"{folder}/", prefetch=prefetch)
    assert top[0].shape == (3, 3, 5, 7) and top[1].shape == (3,)
    mean = np.array([10, 20, 30], np.float32).reshape(3, 1, 1)
    expect = [(bgr_chw(a).astype(np.float32) - mean) * np.float32(0.5) for a in arrays]
    (d1, l1), (d2, l2) = batches(layer, top, 2)
    np.testing.assert_array_equal(l1, [10, 11, 12])
    np.testing.assert_array_equal(l2, [13, 10, 11])  # wraps around to the first line
    np.testing.assert_array_equal(d1, np.stack(expect[:3]))
    np.testing.assert_array_equal(d2, np.stack([expect[3], expect[0], expect[1]]))


def test_image_data_jpeg_grey_and_resize(tmp_path):
    colour = rgb(9, 6, 1)
    grey = rgb(4, 5, 2)[..., 0]
    save(tmp_path, "c.jpg", colour, quality=90)
    save(tmp_path, "g.png", grey)
    save(tmp_path, "gj.jpg", rgb(6, 8, 3)[..., 1], quality=90)
    # Colour, no resize: the JPEG equals Pillow's decode of the file; grey PNG becomes 3 equal channels.
    source = write_list(tmp_path, ["c.jpg 1"])
    layer, _, top = image_data(source, 1, root=f"{tmp_path}/")
    (d, _), = batches(layer, top, 1)
    np.testing.assert_array_equal(d[0], bgr_chw(np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB"))))
    source = write_list(tmp_path, ["g.png 0"], "g.txt")
    layer, _, top = image_data(source, 1, root=f"{tmp_path}/")
    (d, _), = batches(layer, top, 1)
    np.testing.assert_array_equal(d[0], np.repeat(grey[None], 3, 0))
    # Grey (is_color: false), images of different sizes resized to one: 1 channel.
    source = write_list(tmp_path, ["g.png 0", "gj.jpg 1"], "both.txt")
    layer, _, top = image_data(source, 2, extra="is_color: false new_height: 7 new_width: 3",
                               root=f"{tmp_path}/")
    assert top[0].shape == (2, 1, 7, 3)
    (d, labels), = batches(layer, top, 1)
    np.testing.assert_allclose(d[0], bilinear(grey[None], 7, 3), atol=1)
    gj = np.asarray(Image.open(tmp_path / "gj.jpg"))
    np.testing.assert_allclose(d[1], bilinear(gj[None], 7, 3), atol=1)
    np.testing.assert_array_equal(labels, [0, 1])


def test_image_data_colour_to_grey_uses_opencv_weights(tmp_path):
    a = rgb(3, 4, 5)
    save(tmp_path, "a.png", a)
    source = write_list(tmp_path, ["a.png 3"])
    layer, _, top = image_data(source, 1, extra="is_color: false", root=f"{tmp_path}/")
    (d, _), = batches(layer, top, 1)
    r, g, b = (a[..., i].astype(np.float64) for i in range(3))
    np.testing.assert_allclose(d[0, 0], 0.299 * r + 0.587 * g + 0.114 * b, atol=0.51)


def test_image_data_crop_mirror_and_mean_file(four_pngs):
    folder, source, arrays = four_pngs
    mean = np.random.default_rng(9).uniform(0, 255, (3, 5, 7)).astype(np.float32)
    mean_file = folder / "mean.binaryproto"
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend([1, 3, 5, 7])
    proto.data.extend(mean.ravel().tolist())
    write_binary(str(mean_file), proto)
    # TEST: the centre crop, (5-3)//2 = 1 and (7-3)//2 = 2, of (image - mean).
    layer, _, top = image_data(source, 4, transform=f'crop_size: 3 mean_file: "{mean_file}"',
                               root=f"{folder}/")
    (d, _), = batches(layer, top, 1)
    for i, a in enumerate(arrays):
        np.testing.assert_allclose(d[i], (bgr_chw(a) - mean)[:, 1:4, 2:5], rtol=1e-6)
    # TRAIN with mirror: each item is some 3x3 window of the image, flipped or not.
    layer, _, top = image_data(source, 4, transform="crop_size: 3 mirror: true", phase=TRAIN,
                               root=f"{folder}/")
    seen_flip = set()
    for d, _ in batches(layer, top, 6):
        for i, a in enumerate(arrays):
            x = bgr_chw(a).astype(np.float32)
            windows = {(h, w, f): x[:, h:h + 3, w:w + 3][..., ::-1] if f else x[:, h:h + 3, w:w + 3]
                       for h in range(3) for w in range(5) for f in (0, 1)}
            found = [key for key, window in windows.items() if np.array_equal(d[i], window)]
            assert found, f"item {i} is no 3x3 window of its image"
            seen_flip.update(f for *_, f in found)
    assert seen_flip == {0, 1}


def test_image_data_deprecated_fields_are_ignored_with_a_warning(four_pngs):
    """Caffe's ImageDataLayer reads only transform_param (the old fields move there only when a V1
    net is upgraded)."""
    folder, source, arrays = four_pngs
    with capture_log() as lines:
        layer, _, top = image_data(source, 1, extra="scale: 0.25 crop_size: 3", root=f"{folder}/")
    (d, _), = batches(layer, top, 1)
    np.testing.assert_array_equal(d[0], bgr_chw(arrays[0]))
    assert any("image_data_param.scale/crop_size are deprecated and ignored" in ln for ln in lines)


def label_epochs(tmp_path, seed, n=6, epochs=2, extra="shuffle: true"):
    for i in range(n):
        if not (tmp_path / f"{i}.png").exists():
            save(tmp_path, f"{i}.png", rgb(2, 2, i))
    source = write_list(tmp_path, [f"{i}.png {i}" for i in range(n)], "shuffle.txt")
    layer, _, top = image_data(source, n, extra=extra, root=f"{tmp_path}/", seed=seed)
    return [tuple(int(v) for v in lab) for _, lab in batches(layer, top, epochs)]


def test_image_data_shuffle_is_seeded_and_reshuffled_each_epoch(tmp_path):
    a = label_epochs(tmp_path, seed=5)
    assert a == label_epochs(tmp_path, seed=5)
    assert a != label_epochs(tmp_path, seed=6)
    assert all(sorted(e) == list(range(6)) for e in a)
    assert a[0] != a[1]  # a new order after the wrap-around
    assert label_epochs(tmp_path, seed=5, extra="")[0] == tuple(range(6))  # no shuffle: list order


def test_image_data_rand_skip(tmp_path):
    labels = label_epochs(tmp_path, seed=3, epochs=1, extra="rand_skip: 4")[0]
    start = labels[0]
    assert 0 <= start < 4 and labels == tuple((start + k) % 6 for k in range(6))
    starts = {label_epochs(tmp_path, seed=s, epochs=1, extra="rand_skip: 4")[0][0] for s in range(12)}
    assert len(starts) > 1


def test_image_data_errors(tmp_path, four_pngs):
    folder, source, _ = four_pngs
    root = f"{folder}/"
    with pytest.raises(LayerError, match="'img'.*image list file.*nothere.txt"):
        image_data(str(tmp_path / "nothere.txt"))
    empty = write_list(tmp_path, ["", "  "], "empty.txt")
    with pytest.raises(LayerError, match="empty.txt.*lists no images"):
        image_data(empty)
    bad = write_list(tmp_path, ["im 0.png 3", "im 1.png x"], "bad.txt")
    with pytest.raises(LayerError, match=r"bad.txt:2: the label 'x' is not an integer"):
        image_data(bad, root=root)
    with pytest.raises(LayerError, match=r"new_height and new_width"):
        image_data(source, extra="new_height: 4", root=root)
    # A missing first image fails at setup, a later one in the forward that reaches it.
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    missing = write_list(tmp_path, ["gone.png 0"], "missing.txt")
    with pytest.raises(LayerError, match=r"missing.txt:1: .*gone.png"):
        image_data(missing, root=root)
    later = write_list(tmp_path, ["im 0.png 0", "im 1.png 1", "", "gone.png 2"], "later.txt")
    layer, _, top = image_data(later, 2, root=root)
    layer.run_forward([], top)
    with pytest.raises(LayerError, match=r"later.txt:4: .*gone.png"):
        layer.run_forward([], top)
    undecodable = write_list(tmp_path, ["im 0.png 0", "junk.png 1"], "junk.txt")
    layer, _, top = image_data(undecodable, 2, root=f"{tmp_path}/")
    with pytest.raises(LayerError, match=r"junk.txt:2: .*junk.png.*decode"):
        layer.run_forward([], top)
    save(tmp_path, "big.png", rgb(6, 7, 0))
    sizes = write_list(tmp_path, ["im 0.png 0", "big.png 1"], "sizes.txt")
    layer, _, top = image_data(sizes, 2, root=f"{tmp_path}/")
    with pytest.raises(LayerError, match=r"sizes.txt:2: image 'big.png' gives a 3x6x7 item .* 3x5x7"):
        layer.run_forward([], top)
    one = write_list(tmp_path, ["im 0.png 0"], "one.txt")
    with pytest.raises(LayerError, match="Not enough points to skip"):
        image_data(one, extra="rand_skip: 1000", root=root)
    with pytest.raises(LayerError, match="crop_size 9 is larger"):
        image_data(source, transform="crop_size: 9", root=root)


SOLVER = """
net_param {
  name: "tiny"
  %s
  layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
          inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.01 } } }
  layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
}
base_lr: 0.5 lr_policy: "fixed" momentum: 0.9 max_iter: 30 display: 0 random_seed: 1 snapshot_prefix: "%s"
"""


def train(data_layer, tmp_path, iters=30):
    solver = create_solver(parse_text(SOLVER % (data_layer, tmp_path / "snap"), caffe_pb2.SolverParameter()))
    losses = []
    for _ in range(iters):
        solver.step(1)
        losses.append(float(solver.net.blobs["loss"].data))
    return losses


def test_tiny_net_trains_from_image_data(tmp_path):
    # Class 1 images are bright, class 0 dark: a linear layer separates them.
    lines = []
    for i in range(8):
        a = rgb(4, 4, i) // 4 + (160 if i % 2 else 0)
        lines.append(f"{save(tmp_path, f't{i}.png', a.astype(np.uint8))} {i % 2}")
    source = write_list(tmp_path, lines)
    layer = (f'layer {{ name: "d" type: "ImageData" top: "data" top: "label" '
             f'transform_param {{ scale: 0.00390625 }} image_data_param {{ source: "{source}" '
             f'root_folder: "{tmp_path}/" batch_size: 4 shuffle: true }} }}')
    losses = train(layer, tmp_path)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


# ------------------------------------------------------------------------------ WindowData
def window_file(tmp_path, images, name="windows.txt"):
    """images: [(path, (h, w), [(class, overlap, x1, y1, x2, y2), ...])]"""
    lines = []
    for i, (path, (h, w), windows) in enumerate(images):
        lines += [f"# {i}", path, "3", str(h), str(w), str(len(windows))]
        lines += [" ".join(str(v) for v in win) for win in windows]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def window_data(source, batch_size=2, extra="", transform="crop_size: 6", phase=TEST, seed=1701):
    text = (f'name: "win" type: "WindowData" transform_param {{ {transform} }} '
            f'window_data_param {{ source: "{source}" batch_size: {batch_size} {extra} }}')
    return make_layer(text, [], num_tops=2, dtype=torch.float32, phase=phase, seed=seed)


@pytest.fixture
def scene(tmp_path):
    a = rgb(20, 30, 7)
    save(tmp_path, "scene.png", a)
    windows = [(3, 0.9, 2, 3, 7, 8),       # foreground, 6x6
               (5, 0.1, 10, 4, 15, 9),     # background: class forced to 0
               (7, 0.4, 0, 0, 5, 5)]       # between the thresholds: never used
    source = window_file(tmp_path, [("scene.png", (20, 30), windows)])
    return tmp_path, source, bgr_chw(a).astype(np.float32)


def test_window_data_warp_values_and_order(scene):
    folder, source, x = scene
    extra = f'root_folder: "{folder}/" fg_threshold: 0.5 bg_threshold: 0.3 fg_fraction: 0.5 scale: 0.5'
    layer, _, top = window_data(source, 2, extra=extra, transform="crop_size: 6 mean_value: 100")
    assert top[0].shape == (2, 3, 6, 6) and top[1].shape == (2,)
    for d, labels in batches(layer, top, 3):
        np.testing.assert_array_equal(labels, [0, 3])  # background first, then foreground
        np.testing.assert_array_equal(d[0], (x[:, 4:10, 10:16] - 100) * np.float32(0.5))
        np.testing.assert_array_equal(d[1], (x[:, 3:9, 2:8] - 100) * np.float32(0.5))


def test_window_data_mirror_resize_and_mean_file(scene):
    folder, source, x = scene
    mean = np.random.default_rng(4).uniform(0, 255, (3, 8, 8)).astype(np.float32)
    proto = caffe_pb2.BlobProto(num=1, channels=3, height=8, width=8)
    proto.data.extend(mean.ravel().tolist())
    write_binary(str(folder / "mean.binaryproto"), proto)
    extra = f'root_folder: "{folder}/" fg_fraction: 1'
    transform = f'crop_size: 4 mirror: true mean_file: "{folder / "mean.binaryproto"}"'
    layer, _, top = window_data(source, 4, extra=extra, transform=transform, phase=TEST)
    warped = bilinear(x[:, 3:9, 2:8], 4, 4)  # the 6x6 window resized to the 4x4 crop
    centre = mean[:, 2:6, 2:6]               # (8 - 4) // 2 = 2
    flips = set()
    for d, labels in batches(layer, top, 4):
        np.testing.assert_array_equal(labels, [3, 3, 3, 3])
        for item in d:
            flipped = abs(item - (warped[..., ::-1] - centre)).max() <= 1
            assert flipped or abs(item - (warped - centre)).max() <= 1
            flips.add(flipped)
    assert flips == {True, False}


def test_window_geometry_by_hand():
    # 10x10 box, crop 14, context_pad 2: scale 14/10, centre 15 -> box 8..22 (15 wide) -> 14 px.
    assert window_geometry((10, 10, 19, 19), (40, 40), 14, 2, False, False) == \
        ((8, 8, 22, 22), (14, 14), (0, 0))
    # At the corner: expanded to -2..12, clipped to 0..12 (13 px); 13 * 14/15 -> 12 px after a
    # pad of round(2 * 14/15) = 2; mirrored, the padding moves to the right (pad_x2 = 0 here).
    assert window_geometry((0, 0, 9, 9), (40, 40), 14, 2, False, False) == ((0, 0, 12, 12), (12, 12), (2, 2))
    assert window_geometry((0, 0, 9, 9), (40, 40), 14, 2, False, True) == ((0, 0, 12, 12), (12, 12), (2, 0))
    # square: a 10x4 box becomes 10x10 around its centre (15, 12): 10..20 x 7..17 (11 px).
    assert window_geometry((10, 10, 19, 13), (40, 40), 11, 0, True, False) == \
        ((10, 7, 20, 17), (11, 11), (0, 0))
    # warp without context: the box as given, resized to the crop.
    assert window_geometry((3, 4, 9, 6), (40, 40), 5, 0, False, False) == ((3, 4, 9, 6), (5, 5), (0, 0))


def test_window_data_context_pad_places_patch_and_zero_padding(scene):
    folder, source, x = scene
    win = window_file(folder, [("scene.png", (20, 30), [(2, 0.8, 0, 0, 9, 9)])], "corner.txt")
    layer, _, top = window_data(win, 1, extra=f'root_folder: "{folder}/" fg_fraction: 1 context_pad: 2',
                                transform="crop_size: 14")
    (d, labels), = batches(layer, top, 1)
    assert labels[0] == 2
    expect = np.zeros((3, 14, 14))
    expect[:, 2:14, 2:14] = bilinear(x[:, 0:13, 0:13], 12, 12)
    np.testing.assert_allclose(d[0], expect, atol=1)
    assert not d[0][:, :2, :].any() and not d[0][:, :, :2].any()  # padding stays 0


def test_window_data_sampling_pools_and_cache(scene):
    folder, source, x = scene
    extra = f'root_folder: "{folder}/" fg_threshold: 0.5 bg_threshold: 0.3 fg_fraction: 0.25'
    layer, _, top = window_data(source, 4, extra=extra, transform="crop_size: 6 mirror: true", seed=3)
    plain = batches(layer, top, 5)
    for _, labels in plain:
        np.testing.assert_array_equal(labels, [0, 0, 0, 3])  # the 0.4-overlap class 7 never appears
    layer, _, top = window_data(source, 4, extra=extra + " cache_images: true",
                                transform="crop_size: 6 mirror: true", seed=3)
    for (d1, l1), (d2, l2) in zip(plain, batches(layer, top, 5)):
        np.testing.assert_array_equal(d1, d2)


@pytest.mark.parametrize("cache", ["false", "true"])
def test_window_data_16_bit_image_keeps_the_high_byte_with_or_without_cache(tmp_path, cache):
    """cv::imread and cv::imdecode (cache_images) read a 16-bit PNG in colour as its high byte."""
    deep = np.random.default_rng(5).integers(0, 65536, (6, 6), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    source = window_file(tmp_path, [("deep.png", (6, 6), [(2, 0.9, 0, 0, 5, 5)])])
    extra = f'root_folder: "{tmp_path}/" fg_fraction: 1 cache_images: {cache}'
    layer, _, top = window_data(source, 1, extra=extra, transform="crop_size: 6")
    (data, labels), = batches(layer, top, 1)
    want = (deep >> 8).astype(np.float32)
    np.testing.assert_array_equal(data[0], np.stack([want] * 3))
    np.testing.assert_array_equal(labels, [2])


def test_window_data_errors(tmp_path, scene):
    folder, source, _ = scene
    root = f'root_folder: "{folder}/"'
    with pytest.raises(LayerError, match="'win'.*window file.*nope.txt"):
        window_data(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(LayerError, match="empty.txt.*is empty"):
        window_data(str(tmp_path / "empty.txt"))
    (tmp_path / "hash.txt").write_text("% 0\nscene.png\n3 20 30 0\n")
    with pytest.raises(LayerError, match=r"hash.txt:1: expected '#'"):
        window_data(str(tmp_path / "hash.txt"))
    zero = window_file(tmp_path, [("scene.png", (20, 30), [(0, 0.9, 1, 1, 4, 4)])], "zero.txt")
    with pytest.raises(LayerError, match=r"zero.txt:7: foreground window .* class 0"):
        window_data(zero, extra=root)
    bg_only = window_file(tmp_path, [("scene.png", (20, 30), [(1, 0.1, 1, 1, 4, 4)])], "bg.txt")
    with pytest.raises(LayerError, match="no foreground windows"):
        window_data(bg_only, 4, extra=root)
    with pytest.raises(LayerError, match="crop_size"):
        window_data(source, extra=root, transform="")
    gone = window_file(tmp_path, [("scene.png", (20, 30), [(1, 0.9, 1, 1, 4, 4)]),
                                  ("gone.png", (20, 30), [(2, 0.9, 1, 1, 4, 4)])], "gone.txt")
    with pytest.raises(LayerError, match=r"gone.txt:9: Could not open or find file .*gone.png"):
        window_data(gone, extra=root + " cache_images: true")
    layer, _, top = window_data(gone, 8, extra=root + " fg_fraction: 1")
    with pytest.raises(LayerError, match=r"gone.txt:9: .*gone.png"):
        layer.run_forward([], top)
    outside = window_file(tmp_path, [("scene.png", (20, 30), [(1, 0.9, 25, 1, 35, 4)])], "out.txt")
    layer, _, top = window_data(outside, 1, extra=root + " fg_fraction: 1")
    with pytest.raises(LayerError, match=r"out.txt:2: window \(25, 1, 35, 4\) .* outside"):
        layer.run_forward([], top)


def test_data_layer_logs(four_pngs):
    folder, source, _ = four_pngs
    with capture_log() as lines:
        image_data(source, 2, extra="shuffle: true", root=f"{folder}/")
    assert "Shuffling data" in lines and "A total of 4 images." in lines
    assert "output data size: 2,3,5,7" in lines
