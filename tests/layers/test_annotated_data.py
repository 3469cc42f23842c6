"""AnnotatedData (SSD fork): records written by convert_annoset come out with their boxes, and the
boxes follow the pixels through mirror, expansion, sampled crops, resize and distortion."""
import numpy as np
import pytest
from helpers import make_net
from PIL import Image

from recaffe.data.annoset import convert_annoset
from recaffe.data.annotated_transform import (apply_noise, bgr_to_hsv, generate_batch_samples, hsv_to_bgr,
                                              sample_boxes, satisfied)
from recaffe.layer import LayerError
from recaffe.proto import caffe_pb2

BG, FG = 40, 250


def intersection(a, b):
    """SSD's IntersectBBox area for normalized boxes (0 when they are apart)."""
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return 0.0
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def area(a):
    return max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])


def jaccard(a, b):
    i = intersection(a, b)
    return i / (area(a) + area(b) - i) if i > 0 else 0.0


def coverage(of, by):
    """SSD's BBoxCoverage: the share of ``of``'s area inside ``by``."""
    i = intersection(of, by)
    return i / area(of) if i > 0 else 0.0


def make_db(tmp_path, boxes_per_image, size=(48, 64), encoded=False):
    """Images of background BG with each object box painted FG; VOC files; an LMDB."""
    root = tmp_path / "img"
    root.mkdir()
    lines = []
    h, w = size
    for k, boxes in enumerate(boxes_per_image):
        img = np.full((h, w, 3), BG, np.uint8)
        objs = []
        for (x0, y0, x1, y1) in boxes:
            img[y0:y1, x0:x1] = FG
            objs.append(f"<object><name>thing</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
                        f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
        Image.fromarray(img).save(root / f"{k}.png")
        (root / f"{k}.xml").write_text(f"<annotation><size><width>{w}</width><height>{h}</height></size>"
                                       + "".join(objs) + "</annotation>")
        lines.append(f"{k}.png {k}.xml")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "lm.prototxt").write_text('item { name: "none" label: 0 } item { name: "thing" label: 1 }')
    convert_annoset(str(root) + "/", str(tmp_path / "list.txt"), str(tmp_path / "db"), anno_type="detection",
                    label_map_file=str(tmp_path / "lm.prototxt"), encoded=encoded)
    return str(tmp_path / "db")


def net(db, batch, transform="", sampler="", phase=caffe_pb2.TRAIN):
    return make_net(f"""
layer {{ name: "d" type: "AnnotatedData" top: "data" top: "label"
  data_param {{ source: "{db}" backend: LMDB batch_size: {batch} prefetch: 0 }}
  transform_param {{ {transform} }}
  annotated_data_param {{ {sampler} }} }}""", phase)


def boxes_follow_pixels(data, label, check_outside=True):
    """Every labelled box's interior is foreground and (unless an emit constraint may drop boxes
    that are partly in view) the image outside all boxes is not."""
    n, _, h, w = data.shape
    rows = label.reshape(-1, 8)
    inside = np.zeros((n, h, w), bool)
    for item, _, _, x0, y0, x1, y1, _ in rows:
        if item < 0:
            continue
        X0, Y0, X1, Y1 = int(np.ceil(x0 * w)) + 1, int(np.ceil(y0 * h)) + 1, int(x1 * w) - 1, int(y1 * h) - 1
        if X1 - X0 >= 2 and Y1 - Y0 >= 2:
            patch = data[int(item), :, Y0:Y1, X0:X1]
            assert patch.mean() > 200, f"box {x0, y0, x1, y1} of item {item} is not on the object"
        # 2 pixels of slack: crops are cut at whole pixels while boxes keep the sampled fractions
        inside[int(item), max(0, int(y0 * h) - 2):int(np.ceil(y1 * h)) + 2,
               max(0, int(x0 * w) - 2):int(np.ceil(x1 * w)) + 2] = True
    for i in range(n if check_outside else 0):
        outside = data[i][:, ~inside[i]]
        if outside.size:
            assert (outside < 200).all(), f"item {i} has foreground where no box is"


def test_plain_records(tmp_path):
    db = make_db(tmp_path, [[(8, 4, 24, 20)], [(30, 10, 60, 40), (2, 2, 10, 10)]])
    n = net(db, 2)
    n.forward()
    data, label = n.blobs["data"].data, n.blobs["label"].data
    assert data.shape == (2, 3, 48, 64) and label.shape == (1, 1, 3, 8)
    np.testing.assert_allclose(label.reshape(-1, 8), [
        [0, 1, 0, 8 / 64, 4 / 48, 24 / 64, 20 / 48, 0],
        [1, 1, 0, 30 / 64, 10 / 48, 60 / 64, 40 / 48, 0],
        [1, 1, 1, 2 / 64, 2 / 48, 10 / 64, 10 / 48, 0]], rtol=1e-6)
    assert data[0, :, 10, 10].tolist() == [FG] * 3 and data[0, :, 30, 40].tolist() == [BG] * 3


def test_no_boxes_gives_one_row_of_minus_one(tmp_path):
    db = make_db(tmp_path, [[]])
    n = net(db, 1)
    n.forward()
    assert n.blobs["label"].data.tolist() == [[[[-1.0] * 8]]]


@pytest.mark.parametrize("transform, sampler", [
    ("mirror: true", ""),
    ('mirror: true expand_param { prob: 1 max_expand_ratio: 3 } mean_value: 10 '
     'resize_param { resize_mode: WARP height: 60 width: 60 }', ""),
    ("resize_param { prob: 1 resize_mode: WARP height: 40 width: 40 interp_mode: LINEAR }",
     "batch_sampler { sampler { min_scale: 0.4 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 } "
     "sample_constraint { min_jaccard_overlap: 0.1 } max_sample: 1 max_trials: 50 }"),
    ("crop_size: 32", ""),
    ("crop_size: 32 emit_constraint { emit_type: CENTER }", ""),
    ("distort_param { brightness_prob: 1 brightness_delta: 8 contrast_prob: 0.5 contrast_lower: 0.9 "
     "contrast_upper: 1.1 }", ""),
])
def test_boxes_follow_the_pixels(tmp_path, transform, sampler):
    db = make_db(tmp_path, [[(8, 4, 24, 20)], [(30, 10, 60, 40), (2, 26, 14, 44)], [(20, 20, 44, 40)]])
    n = net(db, 3, transform, sampler)
    for _ in range(4):
        n.forward()
        boxes_follow_pixels(n.blobs["data"].data, n.blobs["label"].data, "emit_constraint" not in transform)


def test_sampled_crops_satisfy_their_constraint():
    rng = np.random.default_rng(0)
    bs = caffe_pb2.BatchSampler(max_sample=1, max_trials=50)
    bs.sampler.min_scale, bs.sampler.max_scale = 0.3, 1.0
    bs.sampler.min_aspect_ratio, bs.sampler.max_aspect_ratio = 0.5, 2.0
    bs.sample_constraint.min_jaccard_overlap = 0.5
    objects = np.array([[0.1, 0.1, 0.5, 0.6], [0.6, 0.5, 0.9, 0.9]])
    for _ in range(30):
        for s in generate_batch_samples(objects, [bs], rng):
            assert (0 <= s).all() and (s <= 1).all()
            assert max(jaccard(s, o) for o in objects) >= 0.5
    # the fork's quirk: one kind met by some object is enough even if another object fails the next kind
    c = caffe_pb2.SampleConstraint(min_jaccard_overlap=0.5, min_object_coverage=0.99)
    sample = np.array([0.1, 0.1, 0.5, 0.6])
    assert satisfied(sample[None], objects[:1], c)[0]
    assert not satisfied(np.array([[0.0, 0.0, 0.05, 0.05]]), objects, c)[0]


def test_hsv_matches_opencv_primaries():
    bgr = np.array([[[0, 0, 255, 128]], [[0, 255, 0, 128]], [[255, 0, 0, 128]]], np.uint8)  # red green blue grey
    hsv = bgr_to_hsv(bgr)
    assert hsv[:, 0].T.tolist() == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128]]
    np.testing.assert_array_equal(hsv_to_bgr(hsv), bgr)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    assert np.abs(hsv_to_bgr(bgr_to_hsv(x)).astype(int) - x).max() <= 5  # 8-bit hue: 2-degree steps


def test_errors(tmp_path):
    db = make_db(tmp_path, [[(8, 4, 24, 20)]])
    with pytest.raises(LayerError, match="crop_size 100"):
        net(db, 1, "crop_size: 100").forward()
    with pytest.raises(LayerError, match="clahe"):
        net(db, 1, "noise_param { clahe: true }")
    with pytest.raises(LayerError, match="max_trials"):
        net(db, 1, "", "batch_sampler { max_trials: 0 }")


def fork_satisfies(sample, objects, c):
    """SatisfySampleConstraint written out as the fork's loop (found persists across objects)."""
    has_j = c.HasField("min_jaccard_overlap") or c.HasField("max_jaccard_overlap")
    has_s = c.HasField("min_sample_coverage") or c.HasField("max_sample_coverage")
    has_o = c.HasField("min_object_coverage") or c.HasField("max_object_coverage")
    if not (has_j or has_s or has_o):
        return True
    found = False
    for obj in objects:
        if has_j:
            v = jaccard(sample, obj)
            if (c.HasField("min_jaccard_overlap") and v < c.min_jaccard_overlap) or \
                    (c.HasField("max_jaccard_overlap") and v > c.max_jaccard_overlap):
                continue
            found = True
        if has_s:
            v = coverage(sample, obj)
            if (c.HasField("min_sample_coverage") and v < c.min_sample_coverage) or \
                    (c.HasField("max_sample_coverage") and v > c.max_sample_coverage):
                continue
            found = True
        if has_o:
            v = coverage(obj, sample)
            if (c.HasField("min_object_coverage") and v < c.min_object_coverage) or \
                    (c.HasField("max_object_coverage") and v > c.max_object_coverage):
                continue
            found = True
        if found:
            return True
    return found


@pytest.mark.parametrize("constraint", [
    dict(min_jaccard_overlap=0.3), dict(max_jaccard_overlap=0.2), dict(min_sample_coverage=0.5),
    dict(min_object_coverage=0.8, max_object_coverage=1.0), dict(min_jaccard_overlap=0.5, min_object_coverage=0.99),
    dict(min_sample_coverage=0.2, max_object_coverage=0.5), {}])
def test_vectorized_constraint_matches_the_forks_loop(constraint):
    rng = np.random.default_rng(5)
    c = caffe_pb2.SampleConstraint(**constraint)
    s = caffe_pb2.Sampler(min_scale=0.2, max_scale=1.0, min_aspect_ratio=0.5, max_aspect_ratio=2.0)
    samples = sample_boxes(s, 300, rng)
    objects = np.array([[0.1, 0.1, 0.5, 0.6], [0.6, 0.5, 0.9, 0.9], [0.3, 0.3, 0.4, 0.35]])
    want = [fork_satisfies(x, objects, c) for x in samples]
    assert satisfied(samples, objects, c).tolist() == want
    assert any(want)


def noise(**kw):
    return caffe_pb2.NoiseParameter(**kw)


def test_noise_filters_against_their_definitions():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (3, 9, 11), dtype=np.uint8)
    gen = np.random.default_rng(0)
    assert (apply_noise(img, noise(inverse=True), gen) == 255 - img).all()
    assert (apply_noise(img, noise(posterize=True), gen) == img // 64 * 64 + 32).all()
    grey = apply_noise(img, noise(decolorize=True), gen)
    want = np.rint(0.114 * img[0] + 0.587 * img[1] + 0.299 * img[2])
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    assert np.abs(grey[0].astype(int) - want).max() <= 1
    # erosion by the 3x3 cross: the minimum of each pixel and its 4 neighbours
    er = apply_noise(img, noise(erode=True), gen).astype(int)
    i, j = 4, 5
    assert (er[:, i, j] == np.min([img[:, i, j], img[:, i - 1, j], img[:, i + 1, j], img[:, i, j - 1],
                                   img[:, i, j + 1]], axis=0)).all()
    # the blur keeps a constant image and smooths an impulse into a normalized 7x7 Gaussian
    flat = np.full((3, 9, 9), 77, np.uint8)
    assert (apply_noise(flat, noise(gauss_blur=True), gen) == 77).all()
    impulse = np.zeros((1, 15, 15), np.uint8)
    impulse[0, 7, 7] = 255
    blurred = apply_noise(impulse, noise(gauss_blur=True), gen)[0].astype(float)
    assert blurred[7, 7] == blurred.max() and blurred[7, 6] == blurred[6, 7] == blurred[7, 8]
    assert blurred[7, 11] == 0 and blurred[7, 10] > 0  # the 7x7 kernel reaches 3 pixels out
    # salt and pepper: exactly the drawn pixels take the value
    sp = apply_noise(img, noise(saltpepper=True, saltpepper_param=dict(fraction=0.2, value=[0])), gen)
    changed = (sp != img).any(0)
    assert 0 < changed.sum() <= int(0.2 * 9 * 11) and (sp[:, changed] == 0).all()
    # histogram equalization of the luma spreads a low-contrast image over the full range
    dull = (rng.integers(100, 120, (3, 16, 16))).astype(np.uint8)
    eq = apply_noise(dull, noise(hist_eq=True), gen)
    assert np.ptp(eq.astype(int)) > 3 * np.ptp(dull.astype(int))
    # JPEG at quality 95 stays close, at quality 5 does not
    smooth = np.repeat(np.linspace(0, 255, 16 * 16).reshape(1, 16, 16), 3, 0).astype(np.uint8)
    assert np.abs(apply_noise(smooth, noise(jpeg=95), gen).astype(int) - smooth).mean() < 3
    assert (apply_noise(img, noise(convert_to_hsv=True), gen) == bgr_to_hsv(img)).all()


def test_noise_param_in_the_layer_keeps_boxes(tmp_path):
    db = make_db(tmp_path, [[(8, 4, 24, 20)], [(30, 10, 60, 40)]])
    n = net(db, 2, "noise_param { posterize: true gauss_blur: true }")
    n.forward()
    boxes_follow_pixels(n.blobs["data"].data, n.blobs["label"].data)


def test_emit_constraint_min_overlap():
    from recaffe.data.annotated_transform import Boxes, project_boxes
    boxes = Boxes(np.array([[0.4, 0.0, 0.6, 0.2], [0.1, 0.1, 0.2, 0.2]], np.float32), np.array([1, 2]),
                  np.array([0, 0]), np.array([False, False]))
    crop = np.array([0.5, 0.0, 1.0, 0.5])  # holds half of box 0, none of box 1
    for overlap, kept in [(0.4, [1]), (0.6, [])]:
        emit = caffe_pb2.EmitConstraint(emit_type=caffe_pb2.EmitConstraint.MIN_OVERLAP, emit_overlap=overlap)
        out = project_boxes(crop, boxes, emit)
        assert out.label.tolist() == kept
    out = project_boxes(crop, boxes, None)  # without a constraint: the part inside, re-expressed
    np.testing.assert_allclose(out.xyxy, [[0.0, 0.0, 0.2, 0.4]], atol=1e-6)
