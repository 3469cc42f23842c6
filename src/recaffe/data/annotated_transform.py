"""SSD's data augmentation for detection (weiliu89/caffe: data_transformer.cpp, im_transforms.cpp,
sampler.cpp): photometric distortion, expansion onto a larger canvas, crops chosen by batch
samplers under overlap constraints, resizing, and the boxes carried through every step.

Images are uint8 ``(C, H, W)`` arrays in OpenCV's channel order (BGR); boxes are ``[n, 4]`` float
arrays ``(xmin, ymin, xmax, ymax)`` normalized to the image, with a label, instance id and
difficult flag per box (:class:`Boxes`). Random draws come from one numpy generator per layer.

Deviations from the fork (docs/forks.md): the fork re-encodes encoded images as JPEG after each of
distortion, expansion and cropping; we keep the decoded pixels (no repeated JPEG loss). The fork
distorts only encoded datums (raw ones are logged and left alone); we distort both. HSV conversions
follow OpenCV's 8-bit formulas in floating point, so hue/saturation changes may differ from
OpenCV's integer tables by one grey level. Resize modes WARP, FIT_SMALL_SIZE and
FIT_LARGE_SIZE_AND_PAD are supported; interpolation modes LINEAR (OpenCV's arithmetic) and
NEAREST, CUBIC, AREA, LANCZOS4 (Pillow's filters).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..proto import caffe_pb2
from .image_file import resize_linear
from .transformer import TransformError

_Resize = caffe_pb2.ResizeParameter
_Emit = caffe_pb2.EmitConstraint


@dataclass
class Boxes:
    """The boxes of one image: coordinates ``[n, 4]`` and per box label, instance id, difficult."""
    xyxy: np.ndarray
    label: np.ndarray
    instance: np.ndarray
    difficult: np.ndarray

    @classmethod
    def from_datum(cls, datum: caffe_pb2.AnnotatedDatum) -> Boxes:
        rows = [(a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax, g.group_label, a.instance_id,
                 a.bbox.difficult) for g in datum.annotation_group for a in g.annotation]
        r = np.array(rows, dtype=np.float64).reshape(-1, 7)
        return cls(r[:, :4].astype(np.float32), r[:, 4].astype(np.int64), r[:, 5].astype(np.int64),
                   r[:, 6].astype(bool))

    def take(self, keep: np.ndarray, xyxy: np.ndarray) -> Boxes:
        return Boxes(xyxy[keep].astype(np.float32), self.label[keep], self.instance[keep], self.difficult[keep])

    def __len__(self) -> int:
        return len(self.xyxy)

    def rows(self, item: int) -> np.ndarray:
        """The label top's rows ``[item, label, instance, xmin, ymin, xmax, ymax, difficult]``, in
        the fork's order (by group label in first-seen order, then as stored)."""
        order = _group_order(self.label)
        n = len(order)
        out = np.empty((n, 8), dtype=np.float64)
        out[:, 0] = item
        out[:, 1] = self.label[order]
        out[:, 2] = self.instance[order]
        out[:, 3:7] = self.xyxy[order]
        out[:, 7] = self.difficult[order]
        return out


def _group_order(labels: np.ndarray) -> np.ndarray:
    """Indices grouping equal labels together, groups in order of first appearance (stable)."""
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(labels, return_index=True)
    rank = {int(labels[i]): r for r, i in enumerate(sorted(first))}
    keys = np.array([rank[int(v)] for v in labels])
    return np.argsort(keys, kind="stable")


# ------------------------------------------------------------------ box geometry (bbox_util.cpp)
def _areas(b: np.ndarray) -> np.ndarray:
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    return np.where((w < 0) | (h < 0), 0.0, w * h)


def project_boxes(src: np.ndarray, boxes: Boxes, emit: caffe_pb2.EmitConstraint | None) -> Boxes:
    """The fork's TransformAnnotation without resize/mirror: boxes that meet the emit constraint and
    overlap ``src``, re-expressed relative to ``src`` and clipped to [0, 1]."""
    b = boxes.xyxy.astype(np.float64)
    keep = np.ones(len(b), dtype=bool)
    if emit is not None:
        if emit.emit_type == _Emit.CENTER:
            cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
            keep &= (cx >= src[0]) & (cx <= src[2]) & (cy >= src[1]) & (cy <= src[3])
        else:  # MIN_OVERLAP: the share of the box inside src
            cov = _pairwise("sample_coverage", b, src[None])[:, 0]  # the share of each box inside src
            keep &= cov > emit.emit_overlap
    keep &= ~((b[:, 0] >= src[2]) | (b[:, 2] <= src[0]) | (b[:, 1] >= src[3]) | (b[:, 3] <= src[1]))
    sw, sh = src[2] - src[0], src[3] - src[1]
    proj = np.stack([(b[:, 0] - src[0]) / sw, (b[:, 1] - src[1]) / sh,
                     (b[:, 2] - src[0]) / sw, (b[:, 3] - src[1]) / sh], 1) if len(b) else b
    proj = np.clip(proj, 0.0, 1.0)
    keep &= _areas(proj) > 0 if len(b) else keep
    return boxes.take(keep, proj.astype(np.float32))


# ------------------------------------------------------------------ batch samplers (sampler.cpp)
def _constraint_kind(c: caffe_pb2.SampleConstraint):
    """The kind of constraint the fork's SatisfySampleConstraint effectively tests, with its bounds.

    The fork walks the objects and, per object, the jaccard, sample-coverage and object-coverage
    checks in that order; a check that fails moves on to the next object, but ``found`` stays set by
    an earlier kind and is what the function returns. So a sample qualifies exactly when some object
    passes the *first* kind of constraint that is set; the later kinds never decide. We follow that.
    """
    for kind in ("jaccard_overlap", "sample_coverage", "object_coverage"):
        lo, hi = f"min_{kind}", f"max_{kind}"
        if c.HasField(lo) or c.HasField(hi):
            return kind, (getattr(c, lo) if c.HasField(lo) else None), (getattr(c, hi) if c.HasField(hi) else None)
    return None, None, None


def _pairwise(kind: str, samples: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """``[T, G]`` jaccard overlaps or coverages of samples and objects (SSD's float arithmetic)."""
    a, b = samples[:, None, :], objects[None, :, :]
    disjoint = (b[..., 0] > a[..., 2]) | (b[..., 2] < a[..., 0]) | (b[..., 1] > a[..., 3]) | (b[..., 3] < a[..., 1])
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = np.where(disjoint, 0.0, w * h)
    area_s, area_o = _areas(a), _areas(b)
    if kind == "jaccard_overlap":
        denom = area_s + area_o - inter
    elif kind == "sample_coverage":
        denom = np.broadcast_to(area_s, inter.shape)
    else:
        denom = np.broadcast_to(area_o, inter.shape)
    return np.where(inter > 0, inter / np.where(denom > 0, denom, 1), 0.0)


def satisfied(samples: np.ndarray, objects: np.ndarray, c: caffe_pb2.SampleConstraint) -> np.ndarray:
    """For ``samples [T, 4]``: whether each meets the constraint (the fork's SatisfySampleConstraint)."""
    kind, lo, hi = _constraint_kind(c)
    if kind is None:
        return np.ones(len(samples), dtype=bool)
    if len(objects) == 0:
        return np.zeros(len(samples), dtype=bool)
    v = _pairwise(kind, samples, np.asarray(objects, dtype=np.float64))
    ok = np.ones_like(v, dtype=bool)
    if lo is not None:
        ok &= v >= lo
    if hi is not None:
        ok &= v <= hi
    return ok.any(axis=1)


def sample_boxes(s: caffe_pb2.Sampler, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of the fork's SampleBBox draws at once: boxes of random scale and aspect ratio."""
    if not (0 < s.min_scale <= s.max_scale <= 1):
        raise TransformError(f"sampler scales must satisfy 0 < min_scale <= max_scale <= 1, got "
                             f"{s.min_scale}, {s.max_scale}")
    if not (0 < s.min_aspect_ratio <= s.max_aspect_ratio):
        raise TransformError(f"sampler aspect ratios must satisfy 0 < min <= max, got "
                             f"{s.min_aspect_ratio}, {s.max_aspect_ratio}")
    scale = rng.uniform(s.min_scale, s.max_scale, n)
    ratio = np.clip(rng.uniform(s.min_aspect_ratio, s.max_aspect_ratio, n), scale ** 2, 1 / scale ** 2)
    w, h = scale * np.sqrt(ratio), scale / np.sqrt(ratio)
    x = rng.uniform(0, 1, n) * np.clip(1 - w, 0, None)  # w, h <= 1 up to rounding
    y = rng.uniform(0, 1, n) * np.clip(1 - h, 0, None)
    return np.stack([x, y, x + w, y + h], 1)


def generate_batch_samples(objects: np.ndarray, samplers, rng: np.random.Generator) -> list[np.ndarray]:
    """The fork's GenerateBatchSamples: for each batch sampler, up to ``max_sample`` boxes out of
    ``max_trials`` draws that satisfy its constraint (relative to the whole image), in draw order.
    All of a sampler's trials are drawn at once (the fork stops drawing at ``max_sample``: the same
    distribution, a different use of the random stream)."""
    out = []
    objects = np.asarray(objects, dtype=np.float64).reshape(-1, 4)
    for bs in samplers:
        if not bs.use_original_image or bs.max_trials <= 0:
            continue
        boxes = sample_boxes(bs.sampler, bs.max_trials, rng)
        good = boxes[satisfied(boxes, objects, bs.sample_constraint)]
        if bs.HasField("max_sample"):
            good = good[:bs.max_sample]
        out.extend(good)
    return out


# ------------------------------------------------------------------ image operations
def crop_image(img: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The fork's CropImage: the pixels of the (clipped) normalized box, offsets and sizes truncated."""
    _, h, w = img.shape
    b = np.clip(box, 0.0, 1.0) * np.array([w, h, w, h], dtype=np.float64)
    x0, y0 = int(np.float32(b[0])), int(np.float32(b[1]))
    cw, ch = int(np.float32(b[2] - b[0])), int(np.float32(b[3] - b[1]))
    return np.ascontiguousarray(img[:, y0:y0 + ch, x0:x0 + cw])


def expand_image(img: np.ndarray, boxes: Boxes, p: caffe_pb2.ExpansionParameter, fill: np.ndarray,
                 emit, rng: np.random.Generator) -> tuple[np.ndarray, Boxes]:
    """The fork's ExpandImage: with probability ``prob`` the image is placed at a random spot of a
    canvas ``ratio`` times larger (ratio uniform in [1, max_expand_ratio]) filled with the mean."""
    if rng.uniform(0, 1) > p.prob or abs(p.max_expand_ratio - 1.0) < 1e-2:
        return img, boxes
    ratio = rng.uniform(1.0, p.max_expand_ratio)
    c, h, w = img.shape
    eh, ew = int(h * ratio), int(w * ratio)
    h_off = float(np.floor(rng.uniform(0, eh - h)))
    w_off = float(np.floor(rng.uniform(0, ew - w)))
    canvas = np.empty((c, eh, ew), dtype=np.uint8)
    canvas[:] = fill.reshape(-1, 1, 1) if fill.size == c else fill.reshape(1, 1, 1)
    canvas[:, int(h_off):int(h_off) + h, int(w_off):int(w_off) + w] = img
    frame = np.array([-w_off / w, -h_off / h, (ew - w_off) / w, (eh - h_off) / h])
    return canvas, project_boxes(frame, boxes, emit)


def resize_image(img: np.ndarray, p: caffe_pb2.ResizeParameter, rng: np.random.Generator) -> np.ndarray:
    """The fork's ApplyResize: WARP to height x width, FIT_SMALL_SIZE (shorter side to the target,
    aspect kept) or FIT_LARGE_SIZE_AND_PAD (longer side to the target, padded with pad_value)."""
    modes = list(p.interp_mode)
    interp = modes[int(np.searchsorted(np.cumsum([1.0] * len(modes)), rng.uniform(0, len(modes))))] \
        if modes else _Resize.LINEAR
    c, h, w = img.shape
    if p.height <= 0 or p.width <= 0:
        raise TransformError("resize_param needs height and width")
    if p.resize_mode == _Resize.WARP:
        return _resize(img, p.height, p.width, interp)
    if p.resize_mode == _Resize.FIT_SMALL_SIZE:
        nh, nw = new_size(p, w, h)
        return _resize(img, nh, nw, interp)
    if p.resize_mode == _Resize.FIT_LARGE_SIZE_AND_PAD:
        if p.pad_mode != _Resize.CONSTANT:
            raise TransformError("resize_param: only pad_mode CONSTANT is supported")
        scale = min(p.width / w, p.height / h)
        nh, nw = max(1, int(h * scale)), max(1, int(w * scale))
        inner = _resize(img, nh, nw, interp)
        pad = list(p.pad_value) or [0.0]
        out = np.empty((c, p.height, p.width), dtype=np.uint8)
        out[:] = np.array(pad * c if len(pad) == 1 else pad, dtype=np.float64)[:c].astype(np.uint8).reshape(c, 1, 1)
        top, left = (p.height - nh) // 2, (p.width - nw) // 2
        out[:, top:top + nh, left:left + nw] = inner
        return out
    raise TransformError(f"unknown resize_mode {p.resize_mode}")


def new_size(p: caffe_pb2.ResizeParameter, old_w: int, old_h: int) -> tuple[int, int]:
    """The fork's InferNewSize: (height, width) after resizing."""
    h, w = p.height, p.width
    if p.resize_mode == _Resize.FIT_SMALL_SIZE:
        if old_w / old_h < w / h:
            h = int(w / (old_w / old_h))
        else:
            w = int((old_w / old_h) * h)
    return h, w


def _resize(img: np.ndarray, h: int, w: int, interp: int) -> np.ndarray:
    if (h, w) == img.shape[1:]:
        return img
    if interp == _Resize.LINEAR:
        return resize_linear(img, h, w)
    from PIL import Image

    filters = {_Resize.NEAREST: Image.NEAREST, _Resize.CUBIC: Image.BICUBIC, _Resize.AREA: Image.BOX,
               _Resize.LANCZOS4: Image.LANCZOS}
    planes = [np.asarray(Image.fromarray(ch).resize((w, h), filters[interp])) for ch in img]
    return np.stack(planes)


def update_boxes_for_resize(xyxy: np.ndarray, p: caffe_pb2.ResizeParameter, old_w: int, old_h: int) -> np.ndarray:
    """The fork's UpdateBBoxByResizePolicy."""
    nh, nw = float(p.height), float(p.width)
    b = xyxy.astype(np.float64) * np.array([old_w, old_h, old_w, old_h])
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    if p.resize_mode == _Resize.FIT_LARGE_SIZE_AND_PAD:
        orig, new = old_w / old_h, nw / nh
        if orig > new:
            pad = (nh - nw / orig) / 2
            x0, x1 = np.maximum(0, x0 * nw / old_w), np.minimum(nw, x1 * nw / old_w)
            y0 = pad + np.maximum(0, y0 * (nh - 2 * pad) / old_h)
            y1 = pad + np.minimum(nh, y1 * (nh - 2 * pad) / old_h)
        else:
            pad = (nw - orig * nh) / 2
            x0 = pad + np.maximum(0, x0 * (nw - 2 * pad) / old_w)
            x1 = pad + np.minimum(nw, x1 * (nw - 2 * pad) / old_w)
            y0, y1 = np.maximum(0, y0 * nh / old_h), np.minimum(nh, y1 * nh / old_h)
    else:
        if p.resize_mode == _Resize.FIT_SMALL_SIZE:
            if old_w / old_h < nw / nh:
                nh = nw / (old_w / old_h)
            else:
                nw = (old_w / old_h) * nh
        x0, x1 = np.maximum(0, x0 * nw / old_w), np.minimum(nw, x1 * nw / old_w)
        y0, y1 = np.maximum(0, y0 * nh / old_h), np.minimum(nh, y1 * nh / old_h)
    return np.stack([x0 / nw, y0 / nh, x1 / nw, y1 / nh], 1).astype(np.float32)


# ------------------------------------------------------------------ photometric distortion
def distort_image(img: np.ndarray, p: caffe_pb2.DistortionParameter, rng: np.random.Generator) -> np.ndarray:
    """The fork's ApplyDistort: brightness, contrast, saturation, hue and channel order, each with its
    probability, contrast first or last by a coin flip."""
    out = img
    contrast_first = rng.uniform(0, 1) > 0.5
    out = _brightness(out, p, rng)
    if contrast_first:
        out = _contrast(out, p, rng)
    out = _saturation(out, p, rng)
    out = _hue(out, p, rng)
    if not contrast_first:
        out = _contrast(out, p, rng)
    if rng.uniform(0, 1) < p.random_order_prob:
        if out.shape[0] != 3:
            raise TransformError("random_order_prob needs 3-channel images")
        out = out[rng.permutation(3)]
    return np.ascontiguousarray(out)


def _saturate(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _brightness(img, p, rng):
    if rng.uniform(0, 1) < p.brightness_prob:
        delta = rng.uniform(-p.brightness_delta, p.brightness_delta)
        if abs(delta) > 0:
            return _saturate(img.astype(np.float32) + np.float32(delta))
    return img


def _contrast(img, p, rng):
    if rng.uniform(0, 1) < p.contrast_prob:
        alpha = rng.uniform(p.contrast_lower, p.contrast_upper)
        if abs(alpha - 1.0) > 1e-3:
            return _saturate(img.astype(np.float32) * np.float32(alpha))
    return img


def _saturation(img, p, rng):
    if rng.uniform(0, 1) < p.saturation_prob:
        alpha = rng.uniform(p.saturation_lower, p.saturation_upper)
        hsv = bgr_to_hsv(img)
        hsv[1] = _saturate(hsv[1].astype(np.float32) * np.float32(alpha))
        return hsv_to_bgr(hsv)
    return img


def _hue(img, p, rng):
    if rng.uniform(0, 1) < p.hue_prob:
        delta = rng.uniform(-p.hue_delta, p.hue_delta)
        if abs(delta) > 0:
            hsv = bgr_to_hsv(img)
            hsv[0] = _saturate(hsv[0].astype(np.float32) + np.float32(delta))
            return hsv_to_bgr(hsv)
    return img


def bgr_to_hsv(img: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit BGR2HSV: H in [0, 180), S and V in [0, 255]."""
    if img.shape[0] != 3:
        raise TransformError("saturation and hue distortion need 3-channel (BGR) images")
    b, g, r = (img[i].astype(np.float64) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    diff = v - mn
    s = np.where(v > 0, diff * 255.0 / np.where(v > 0, v, 1), 0.0)
    safe = np.where(diff > 0, diff, 1)
    h = np.where(v == r, 60.0 * (g - b) / safe,
                 np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    h = np.where(diff > 0, h, 0.0)
    h = np.where(h < 0, h + 360.0, h)
    return np.stack([_saturate(h / 2), _saturate(s), _saturate(v)])


def hsv_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV2BGR (hue in units of 2 degrees; values past 180 wrap)."""
    h = hsv[0].astype(np.float64) * 2.0 / 60.0
    s = hsv[1].astype(np.float64) / 255.0
    v = hsv[2].astype(np.float64)
    i = np.floor(h)
    f = h - i
    i = np.mod(i, 6).astype(np.int64)
    p_, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p_), (q, v, p_), (p_, v, t), (p_, q, v), (t, p_, v), (v, p_, q)]
    r = np.choose(i, [row[0] for row in table])
    g = np.choose(i, [row[1] for row in table])
    b = np.choose(i, [row[2] for row in table])
    return np.stack([_saturate(b), _saturate(g), _saturate(r)])


# ------------------------------------------------------------------ noise (im_transforms.cpp ApplyNoise)
def apply_noise(img: np.ndarray, p: caffe_pb2.NoiseParameter, rng: np.random.Generator) -> np.ndarray:
    """The fork's ApplyNoise, applied whenever ``noise_param`` is set (the fork never reads its
    ``prob``), in its order: decolorize, Gaussian blur (7x7, sigma 1.5), histogram equalization of the
    luma, JPEG at quality ``jpeg``, erosion (3x3 cross), posterize (64 levels), inverse, salt and
    pepper (``fraction`` of the pixels set to ``value``), HSV. CLAHE and Lab are refused."""
    if p.clahe or p.convert_to_lab:
        raise TransformError("noise_param: clahe and convert_to_lab are not supported")
    out = img
    if p.decolorize and out.shape[0] == 3:
        from .image_file import bgr_to_gray
        out = np.repeat(bgr_to_gray(out), 3, axis=0)
    if p.gauss_blur:
        out = _gaussian_blur(out, 7, 1.5)
    if p.hist_eq:
        if out.shape[0] == 3:
            y, cr, cb = _bgr_to_ycrcb(out)
            out = _ycrcb_to_bgr(_equalize(y), cr, cb)
        else:
            out = np.stack([_equalize(c) for c in out])
    if p.jpeg > 0:
        out = _jpeg(out, int(p.jpeg))
    if p.erode:
        out = _erode_cross(out)
    if p.posterize:
        out = (out // 64 * 64 + 32).astype(np.uint8)
    if p.inverse:
        out = (255 - out).astype(np.uint8)
    if p.saltpepper:
        values = list(p.saltpepper_param.value)
        c, h, w = out.shape
        if len(values) not in (1, c):
            raise TransformError(f"saltpepper_param: give 1 value or one per channel ({c})")
        v = np.array(values * c if len(values) == 1 else values, dtype=np.float64).astype(np.uint8)
        n = int(np.floor(p.saltpepper_param.fraction * w * h))
        if n:
            out = out.copy()
            xs, ys = rng.integers(0, w, n), rng.integers(0, h, n)
            out[:, ys, xs] = v[:, None]
    if p.convert_to_hsv:
        out = bgr_to_hsv(out)
    return np.ascontiguousarray(out)


def _gaussian_blur(img: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """cv::GaussianBlur with a k x k kernel, BORDER_REFLECT_101 (numpy's 'reflect'), rounded."""
    x = np.arange(k) - (k - 1) / 2
    g = np.exp(-x * x / (2 * sigma * sigma))
    g /= g.sum()
    r = k // 2
    a = np.pad(img.astype(np.float64), ((0, 0), (r, r), (r, r)), mode="reflect")
    a = sum(g[i] * a[:, :, i:i + img.shape[2]] for i in range(k))
    a = sum(g[i] * a[:, i:i + img.shape[1], :] for i in range(k))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _bgr_to_ycrcb(img: np.ndarray):
    b, g, r = (img[i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return y, (r - y) * 0.713 + 128, (b - y) * 0.564 + 128


def _ycrcb_to_bgr(y: np.ndarray, cr: np.ndarray, cb: np.ndarray) -> np.ndarray:
    y = y.astype(np.float64)
    r = y + 1.403 * (cr - 128)
    g = y - 0.714 * (cr - 128) - 0.344 * (cb - 128)
    b = y + 1.773 * (cb - 128)
    return np.clip(np.rint(np.stack([b, g, r])), 0, 255).astype(np.uint8)


def _equalize(plane: np.ndarray) -> np.ndarray:
    """cv::equalizeHist of one 8-bit plane (given as float or uint8)."""
    v = np.clip(np.rint(plane), 0, 255).astype(np.uint8)
    hist = np.bincount(v.ravel(), minlength=256)
    first = int(np.nonzero(hist)[0][0])
    total = v.size
    if hist[first] == total:
        return np.full_like(v, first)
    scale = np.float32(255.0 / (total - hist[first]))
    lut = np.zeros(256, dtype=np.uint8)
    cum = np.cumsum(hist)
    lut[first + 1:] = np.clip(np.rint((cum[first + 1:] - hist[first]) * scale), 0, 255).astype(np.uint8)
    return lut[v]


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    import io

    from PIL import Image

    from .transformer import decode_image
    rgb = img[::-1].transpose(1, 2, 0) if img.shape[0] == 3 else img[0]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=quality)
    return decode_image(buf.getvalue(), force_color=True)


def _erode_cross(img: np.ndarray) -> np.ndarray:
    """cv::erode with the 3x3 elliptic (cross) element; outside the image counts as the maximum."""
    a = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="constant", constant_values=255)
    h, w = img.shape[1:]
    return np.minimum.reduce([a[:, 1:h + 1, 1:w + 1], a[:, 0:h, 1:w + 1], a[:, 2:h + 2, 1:w + 1],
                              a[:, 1:h + 1, 0:w], a[:, 1:h + 1, 2:w + 2]])
