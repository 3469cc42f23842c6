"""SSD's detection layers (weiliu89/caffe, branch ssd): PriorBox and DetectionOutput (MultiBoxLoss is
in multibox.py, DetectionEvaluate in detection_evaluate.py).

Boxes are rows ``[xmin, ymin, xmax, ymax]``, normalized to [0, 1] unless OpenCV's
``normalized_bbox: false`` says they are pixels (then widths and areas get the ``+ 1`` of pixel
boxes). The box arithmetic (decode, IoU, greedy NMS with SSD's adaptive ``eta``) is in
:mod:`recaffe.boxes`, vectorized over images and classes.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from ..boxes import batched_nms
from ..io.protofiles import ProtoFileError, read_text
from ..layer import Layer, register
from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger(__name__)

FLT_MAX = 3.4028234663852886e38


# --------------------------------------------------------------------------- box helpers
# decode_boxes, ssd_detections and ssd_empty_convention depend on torch (and recaffe.boxes) only:
# the torch exporter copies their source into generated modules (export/detection_ops.py).
def decode_boxes(loc: torch.Tensor, prior_boxes: torch.Tensor, prior_var: torch.Tensor, *, code_type: int,
                 variance_encoded_in_target: bool = False, normalized: bool = True) -> torch.Tensor:
    """SSD's DecodeBBox on tensors: ``loc [..., P, 4]`` against ``prior_boxes``/``prior_var``
    ``[P, 4]``; ``code_type`` as PriorBoxParameter.CodeType (1 CORNER, 2 CENTER_SIZE, 3 CORNER_SIZE).
    ``normalized`` false is OpenCV's pixel convention (prior width + 1 for CENTER_SIZE)."""
    v = torch.ones_like(prior_var) if variance_encoded_in_target else prior_var
    d = loc * v
    px0, py0, px1, py1 = prior_boxes.unbind(-1)
    if code_type == 1:  # CORNER
        return prior_boxes + d
    pw, ph = px1 - px0, py1 - py0
    if code_type == 2:  # CENTER_SIZE
        if not normalized:
            pw, ph = pw + 1, ph + 1
            pcx, pcy = px0 + pw * 0.5, py0 + ph * 0.5
        else:
            pcx, pcy = (px0 + px1) / 2, (py0 + py1) / 2
        cx = d[..., 0] * pw + pcx
        cy = d[..., 1] * ph + pcy
        w = torch.exp(d[..., 2]) * pw
        h = torch.exp(d[..., 3]) * ph
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    if code_type == 3:  # CORNER_SIZE
        scale = torch.stack([pw, ph, pw, ph], dim=-1)
        return prior_boxes + d * scale
    raise ValueError(f"unknown code_type {code_type}")


def ssd_detections(loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor, *, num_classes: int,
                   share_location: bool, labels: list, code_type: int, variance_encoded_in_target: bool,
                   normalized: bool, clip: bool, nms_threshold: float, confidence_threshold: float, top_k: int,
                   eta: float, keep_top_k: int) -> torch.Tensor:
    """SSD's DetectionOutput forward: rows ``[D, 7]`` in the fork's order, from loc ``[N, P*L*4]``,
    conf ``[N, P*num_classes]`` and priors ``[1, 2, P*4]``; ``labels`` are the classes other than
    the background, ascending."""
    n = loc.shape[0]
    nl = 1 if share_location else num_classes
    p = loc.shape[1] // (nl * 4)
    flat = prior.reshape(-1)
    boxes_p = flat[: p * 4].reshape(p, 4)
    # OpenCV's priors may have no variance channel when the variance is encoded in the target
    var_p = torch.ones_like(boxes_p) if variance_encoded_in_target else flat[p * 4: 2 * p * 4].reshape(p, 4)
    decoded = decode_boxes(loc.reshape(n, p, nl, 4).transpose(1, 2), boxes_p, var_p, code_type=code_type,
                           variance_encoded_in_target=variance_encoded_in_target, normalized=normalized)
    if clip:
        decoded = decoded.clamp(0.0, 1.0)                                   # [N, L, P, 4]
    lab = torch.tensor(labels, dtype=torch.long, device=loc.device)
    c = len(labels)
    scores = conf.reshape(n, p, num_classes)[:, :, lab].transpose(1, 2)      # [N, C', P]
    boxes = decoded[:, :1].expand(n, c, p, 4) if share_location else decoded[:, lab]
    keep, order, sorted_scores = batched_nms(
        boxes.reshape(n * c, p, 4), scores.reshape(n * c, p), nms_threshold,
        score_threshold=confidence_threshold, top_k=top_k, eta=eta, pixel=not normalized)
    k = keep.shape[1]
    keep = keep.reshape(n, c, k)
    sorted_scores = sorted_scores.reshape(n, c, k)
    if keep_top_k > -1:
        over = keep.sum(dim=(1, 2)) > keep_top_k
        if bool(over.any()):
            inf = float("inf")
            flat = torch.where(keep, sorted_scores, torch.full_like(sorted_scores, -inf)).reshape(n, -1)
            # ties: the lower (class, rank) first, as ONNX TopK (the fork's std::sort leaves them unspecified)
            best_idx = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :keep_top_k]
            best = torch.zeros_like(keep.reshape(n, -1)).scatter_(1, best_idx, True).reshape(n, c, k)
            keep = torch.where(over[:, None, None], keep & best, keep)
    img, cls, pos = keep.nonzero(as_tuple=True)
    box = boxes[img, cls, order.reshape(n, c, k)[img, cls, pos]]
    dt = loc.dtype
    return torch.cat([img.to(dt)[:, None], lab[cls].to(dt)[:, None], sorted_scores[img, cls, pos][:, None], box],
                     dim=1)


def ssd_empty_convention(rows: torch.Tensor, num: int) -> torch.Tensor:
    """``[1, 1, D, 7]``; with no detection at all, one row ``[i, -1, -1, -1, -1, -1, -1]`` per image."""
    if rows.shape[0] == 0:
        rows = torch.full((num, 7), -1.0, dtype=rows.dtype, device=rows.device)
        rows[:, 0] = torch.arange(num, dtype=rows.dtype, device=rows.device)
    return rows.reshape(1, 1, -1, 7)



def output_bbox(box: np.ndarray, size: tuple[int, int], resize=None) -> np.ndarray:
    """SSD's OutputBBox: a normalized box ``[4]`` clipped to [0, 1] and scaled to the image
    ``size`` (height, width); ``resize`` (a ResizeParameter) FIT_SMALL_SIZE with height_scale and
    width_scale scales by those and clips to the image instead. FIT_LARGE_SIZE_AND_PAD is refused by
    the layers that take it."""
    h, w = size
    if resize is not None and resize.resize_mode == caffe_pb2.ResizeParameter.FIT_SMALL_SIZE \
            and resize.height_scale and resize.width_scale:
        out = box * np.array([resize.width_scale, resize.height_scale] * 2, "f4")
        return np.minimum(np.maximum(out, 0), np.array([w, h, w, h], "f4"))
    return np.clip(box, 0, 1) * np.array([w, h, w, h], "f4")


def read_name_size_file(path: str, layer: Layer) -> tuple[list[str], list[tuple[int, int]]]:
    """SSD's name_size_file: ``name height width`` per test image -> (names, (height, width)s)."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError as e:
        raise layer.error(f"failed to open name_size_file {path!r}: {e.strerror or e}") from None
    if len(words) % 3:
        raise layer.error(f"name_size_file {path!r}: expected lines 'name height width'")
    try:
        return words[0::3], [(int(h), int(w)) for h, w in zip(words[1::3], words[2::3])]
    except ValueError:
        raise layer.error(f"name_size_file {path!r}: height and width must be integers") from None


@register("PriorBox")
class PriorBoxLayer(Layer):
    """The prior (default) boxes of one feature map: top ``[1, 2, H*W*num_priors*4]``, channel 0
    the boxes (normalized by the image size), channel 1 their variances.

    Per cell, in the fork's order: for each ``min_size`` the square box of that size, then (with
    ``max_size``) the square of side ``sqrt(min_size * max_size)``, then one box per aspect ratio
    other than 1 (``flip`` adds each ratio's inverse right after it). The fork truncates
    ``min_size``/``max_size`` to integers; so does this layer. OpenCV's ``width``/``height`` give the
    boxes explicitly instead, and its ``offset_h``/``offset_w`` several centers per cell (boxes
    outer, offsets inner, as OpenCV). Forward only, as in the fork.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.prior_box_param
        explicit = len(p.width) > 0 or len(p.height) > 0
        if explicit:
            if len(p.width) != len(p.height):
                raise self.error(f"width ({len(p.width)} values) and height ({len(p.height)} values) must "
                                 "have the same number of values")
            if len(p.min_size) or len(p.max_size) or len(p.aspect_ratio):
                raise self.error("explicit width/height (OpenCV) exclude min_size, max_size and aspect_ratio")
            widths = [float(w) for w in p.width]
            heights = [float(h) for h in p.height]
        else:
            if not len(p.min_size):
                raise self.error("must provide min_size")
            mins = []
            for m in p.min_size:
                if m <= 0:
                    raise self.error(f"min_size must be positive, got {m}")
                mins.append(int(m))  # the fork stores min sizes in an int
            ratios = [1.0]
            for ar in p.aspect_ratio:
                if any(abs(ar - r) < 1e-6 for r in ratios):
                    continue
                ratios.append(float(ar))
                if p.flip:
                    ratios.append(float(np.float32(1.0 / ar)))
            maxs = []
            if len(p.max_size):
                if len(p.max_size) != len(p.min_size):
                    raise self.error(f"{len(p.max_size)} max_size values for {len(p.min_size)} min_size values")
                for mn, mx in zip(p.min_size, p.max_size):
                    if mx <= mn:
                        raise self.error(f"max_size ({mx}) must be greater than min_size ({mn})")
                    maxs.append(int(mx))
            widths, heights = [], []
            f32 = np.float32
            for s, mn in enumerate(mins):
                widths.append(float(mn))
                heights.append(float(mn))
                if maxs:
                    side = float(f32(math.sqrt(mn * maxs[s])))
                    widths.append(side)
                    heights.append(side)
                for ar in ratios:
                    if abs(ar - 1.0) < 1e-6:
                        continue
                    r = np.sqrt(f32(ar))
                    widths.append(float(f32(mn) * r))
                    heights.append(float(f32(mn) / r))
        self.widths, self.heights = widths, heights
        if len(p.offset_h) or len(p.offset_w):
            if p.HasField("offset"):
                raise self.error("either offset or offset_h/offset_w (OpenCV) may be given, not both")
            if len(p.offset_h) != len(p.offset_w) or not len(p.offset_h):
                raise self.error(f"offset_h ({len(p.offset_h)} values) and offset_w ({len(p.offset_w)} values) "
                                 "must have the same, non-zero number of values")
            self.offsets = [(float(h), float(w)) for h, w in zip(p.offset_h, p.offset_w)]
        else:
            self.offsets = [(float(p.offset), float(p.offset))]
        self.num_priors = len(widths) * len(self.offsets)
        self.clip = p.clip
        if len(p.variance) > 1:
            if len(p.variance) != 4:
                raise self.error(f"variance must have 1 or 4 values, got {len(p.variance)}")
        for v in p.variance:
            if v <= 0:
                raise self.error(f"variance must be positive, got {v}")
        self.variance = [float(v) for v in p.variance] or [0.1]
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise self.error("either img_size or img_h/img_w should be specified; not both")
            if p.img_h <= 0 or p.img_w <= 0:
                raise self.error(f"img_h and img_w must be larger than 0, got {p.img_h} and {p.img_w}")
            self.img_h, self.img_w = int(p.img_h), int(p.img_w)
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                raise self.error("img_size should be larger than 0")
            self.img_h = self.img_w = int(p.img_size)
        else:
            self.img_h = self.img_w = 0
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise self.error("either step or step_h/step_w should be specified; not both")
            if p.step_h <= 0 or p.step_w <= 0:
                raise self.error(f"step_h and step_w must be larger than 0, got {p.step_h} and {p.step_w}")
            self.step_h, self.step_w = float(p.step_h), float(p.step_w)
        elif p.HasField("step"):
            if p.step <= 0:
                raise self.error("step should be larger than 0")
            self.step_h = self.step_w = float(p.step)
        else:
            self.step_h = self.step_w = 0.0
        self._cache_key = None

    def reshape(self, bottom, top):
        h, w = bottom[0].height, bottom[0].width
        top[0].reshape((1, 2, h * w * self.num_priors * 4))

    def priors(self, layer_h: int, layer_w: int, img_h: int, img_w: int) -> np.ndarray:
        """The top's values ``[1, 2, H*W*num_priors*4]`` as float32 numpy (also used by export)."""
        if self.img_h and self.img_w:
            img_h, img_w = self.img_h, self.img_w
        f32 = np.float32
        if self.step_h and self.step_w:
            step_h, step_w = f32(self.step_h), f32(self.step_w)
        else:
            step_h, step_w = f32(img_h) / f32(layer_h), f32(img_w) / f32(layer_w)
        off_h = np.array([o[0] for o in self.offsets], f32)
        off_w = np.array([o[1] for o in self.offsets], f32)
        # centers in float32 as the fork computes them: [H, W, offsets]
        cy = (np.arange(layer_h, dtype=f32)[:, None, None] + off_h[None, None, :]) * step_h
        cx = (np.arange(layer_w, dtype=f32)[None, :, None] + off_w[None, None, :]) * step_w
        cy = np.broadcast_to(cy, (layer_h, layer_w, len(self.offsets))).astype("f8")
        cx = np.broadcast_to(cx, (layer_h, layer_w, len(self.offsets))).astype("f8")
        bw = np.array(self.widths, "f8")[None, None, :, None]   # [1, 1, boxes, 1]
        bh = np.array(self.heights, "f8")[None, None, :, None]
        cx, cy = cx[:, :, None, :], cy[:, :, None, :]            # [H, W, 1, offsets]
        out = np.stack([(cx - bw / 2.0) / img_w, (cy - bh / 2.0) / img_h,
                        (cx + bw / 2.0) / img_w, (cy + bh / 2.0) / img_h], axis=-1).astype(f32)
        out = out.reshape(-1)
        if self.clip:
            out = np.clip(out, 0.0, 1.0)
        var = np.tile(np.array(self.variance if len(self.variance) == 4 else self.variance * 4, f32),
                      out.size // 4)
        return np.stack([out, var]).reshape(1, 2, -1)

    def forward(self, bottom, top):
        key = (bottom[0].height, bottom[0].width, bottom[1].height, bottom[1].width)
        if key != self._cache_key:
            self._values = torch.as_tensor(self.priors(*key), dtype=self.dtype, device=self.device)
            self._cache_key = key
        top[0].data_t = self._values.clone()

    def backward(self, top, propagate_down, bottom):
        pass  # the fork's Backward_cpu returns without touching the bottoms


@register("DetectionOutput")
class DetectionOutputLayer(Layer):
    """Decodes SSD's location predictions against the priors, runs per-class NMS, keeps the best
    ``keep_top_k`` per image, and writes ``[1, 1, N, 7]`` rows ``[image_id, label, score, xmin, ymin,
    xmax, ymax]``: image ascending, then label ascending, then score descending (the fork's order).
    When no image has any detection the top is one row ``[i, -1, -1, -1, -1, -1, -1]`` per image.

    Bottoms: loc ``[N, P*L*4]`` (L = 1 with ``share_location``, else num_classes), conf
    ``[N, P*num_classes]`` (probabilities), priors ``[1, 2, P*4]``. Boxes are not clipped (the
    fork's CPU path), unless OpenCV's ``clip: true``. OpenCV's ``normalized_bbox: false`` treats
    boxes as pixels (``+ 1`` in widths and areas). ``save_output_param`` writes result files
    (VOC, COCO, ILSVRC) when it names an output directory, a label map and a name-size file, as the
    fork does. ``visualize`` (an OpenCV window in the fork) is ignored with a warning.
    """

    min_bottom_blobs = 3
    max_bottom_blobs = 4
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("must specify detection_output_param.num_classes")
        self.num_classes = int(p.num_classes)
        self.share_location = p.share_location
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background = int(p.background_label_id)
        self.code_type = p.code_type
        self.variance_encoded = p.variance_encoded_in_target
        self.keep_top_k = int(p.keep_top_k)
        self.confidence_threshold = float(p.confidence_threshold) if p.HasField("confidence_threshold") \
            else -FLT_MAX
        self.nms_threshold = float(p.nms_param.nms_threshold)
        if self.nms_threshold < 0:
            raise self.error(f"nms_threshold must be non negative, got {self.nms_threshold}")
        self.eta = float(p.nms_param.eta)
        if not 0 < self.eta <= 1:
            raise self.error(f"nms_param.eta must be in (0, 1], got {self.eta}")
        self.top_k = int(p.nms_param.top_k) if p.nms_param.HasField("top_k") else -1
        self.normalized = p.normalized_bbox
        self.clip = p.clip
        if p.visualize:
            log.warning("DetectionOutput layer %r: visualize is not supported (the fork opens an OpenCV "
                        "window); ignored", self.name)
        self.labels_kept = [c for c in range(self.num_classes) if c != self.background]
        self._setup_save(p.save_output_param)

    # ------------------------------------------------------------------ shapes
    def reshape(self, bottom, top):
        if bottom[0].num != bottom[1].num:
            raise self.error(f"loc and conf must have the same number of images: bottom[0] has shape "
                             f"{bottom[0].shape}, bottom[1] has shape {bottom[1].shape}")
        self.num_priors = bottom[2].height // 4
        if self.num_priors * self.num_loc_classes * 4 != bottom[0].channels:
            raise self.error(f"number of priors must match number of location predictions: priors "
                             f"{bottom[2].shape} ({self.num_priors} priors) vs loc {bottom[0].shape} "
                             f"({self.num_loc_classes} location class(es))")
        if self.num_priors * self.num_classes != bottom[1].channels:
            raise self.error(f"number of priors must match number of confidence predictions: priors "
                             f"{bottom[2].shape} ({self.num_priors} priors) vs conf {bottom[1].shape} "
                             f"({self.num_classes} classes)")
        if bottom[2].count() < (1 if self.variance_encoded else 2) * self.num_priors * 4:
            raise self.error(f"priors {bottom[2].shape} must hold boxes and variances (2 channels; 1 is enough "
                             "with variance_encoded_in_target, as OpenCV's Faster R-CNN nets feed it)")
        top[0].reshape((1, 1, 1, 7))

    # ----------------------------------------------------------------- forward
    def forward(self, bottom, top):
        n = bottom[0].num
        rows = ssd_detections(bottom[0].data_t.reshape(n, -1), bottom[1].data_t.reshape(n, -1), bottom[2].data_t,
                              **self.options())
        if self.need_save:
            self._save(rows, n)
        if rows.shape[0] == 0:
            log.info("Couldn't find any detections")
        out = ssd_empty_convention(rows, n)
        top[0].reshape(tuple(out.shape))
        top[0].data_t = out

    def options(self) -> dict:
        """The keyword arguments of :func:`ssd_detections` (also used by the exporters)."""
        return dict(num_classes=self.num_classes, share_location=self.share_location,
                    labels=self.labels_kept, code_type=int(self.code_type),
                    variance_encoded_in_target=self.variance_encoded, normalized=self.normalized,
                    clip=self.clip, nms_threshold=self.nms_threshold,
                    confidence_threshold=self.confidence_threshold, top_k=self.top_k, eta=self.eta,
                    keep_top_k=self.keep_top_k)

    def backward(self, top, propagate_down, bottom):
        pass  # forward only, as in the fork

    # ----------------------------------------------------------- saving results
    def _setup_save(self, sp) -> None:
        self.output_directory = sp.output_directory
        self.output_name_prefix = sp.output_name_prefix
        self.output_format = sp.output_format
        self.need_save = bool(self.output_directory)
        if self.output_directory:
            os.makedirs(self.output_directory, exist_ok=True)
        self.label_to_name: dict[int, str] = {}
        if sp.HasField("label_map_file") and sp.label_map_file:
            try:
                label_map = read_text(sp.label_map_file, caffe_pb2.LabelMap())
            except (OSError, ProtoFileError) as e:
                raise self.error(f"failed to read label map file {sp.label_map_file!r}: {e}") from e
            for item in label_map.item:
                if item.label in self.label_to_name:
                    raise self.error(f"label map {sp.label_map_file!r}: duplicate label {item.label}")
                self.label_to_name[item.label] = item.name
        else:
            if sp.HasField("label_map_file"):
                log.warning("Provide label_map_file if output results to files.")
            self.need_save = False
        self.names: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        if sp.HasField("name_size_file") and sp.name_size_file:
            self.names, self.sizes = read_name_size_file(sp.name_size_file, self)
            self.num_test_image = int(sp.num_test_image) if sp.HasField("num_test_image") else len(self.names)
            if self.num_test_image > len(self.names):
                raise self.error(f"num_test_image {self.num_test_image} exceeds the {len(self.names)} names in "
                                 f"{sp.name_size_file!r}")
        else:
            if sp.HasField("name_size_file"):
                log.warning("Provide name_size_file if output results to files.")
            self.need_save = False
        self.resize = sp.resize_param if sp.HasField("resize_param") else None
        if self.need_save:
            if self.output_format not in ("VOC", "COCO", "ILSVRC"):
                raise self.error(f"save_output_param.output_format {self.output_format!r} is not supported "
                                 "(VOC, COCO or ILSVRC)")
            if self.resize is not None and \
                    self.resize.resize_mode == caffe_pb2.ResizeParameter.FIT_LARGE_SIZE_AND_PAD:
                raise self.error("save_output_param.resize_param FIT_LARGE_SIZE_AND_PAD is not supported")
        self.name_count = 0
        self.detections: list[dict] = []

    def _save(self, rows: torch.Tensor, num: int) -> None:
        rows = rows.detach().cpu().numpy().astype("f4")
        for i in range(num):
            if self.name_count >= len(self.names):
                raise self.error(f"more images than names in the name size file ({len(self.names)})")
            for r in rows[rows[:, 0] == i]:
                label = int(r[1])
                if label not in self.label_to_name:
                    raise self.error(f"Cannot find label: {label} in the label map.")
                b = output_bbox(r[3:7], self.sizes[self.name_count], self.resize)
                bbox = [round(float(b[0]) * 100) / 100, round(float(b[1]) * 100) / 100,
                        round(float(b[2] - b[0]) * 100) / 100, round(float(b[3] - b[1]) * 100) / 100]
                self.detections.append({
                    "image_id": self.names[self.name_count],
                    "category_id": label if self.output_format == "ILSVRC" else self.label_to_name[label],
                    "bbox": bbox, "score": float(r[2])})
            self.name_count += 1
            if self.name_count % self.num_test_image == 0:
                self._write_files()
                self.name_count = 0
                self.detections = []

    def _write_files(self) -> None:
        d, prefix = self.output_directory, self.output_name_prefix
        if self.output_format == "VOC":
            names = [self.label_to_name[c] for c in range(self.num_classes)
                     if c != self.background and c in self.label_to_name]
            files = {nm: open(os.path.join(d, prefix + nm + ".txt"), "w") for nm in names}
            try:
                for det in self.detections:
                    f = files.get(det["category_id"])
                    if f is None:
                        continue
                    x, y, bw, bh = (int(v) for v in det["bbox"])
                    f.write(f"{det['image_id']} {det['score']:g} {x} {y} {x + bw} {y + bh}\n")
            finally:
                for f in files.values():
                    f.close()
        elif self.output_format == "COCO":
            with open(os.path.join(d, prefix + ".json"), "w") as f:
                json.dump(self.detections, f, indent=2)
                f.write("\n")
        else:  # ILSVRC
            with open(os.path.join(d, prefix + ".txt"), "w") as f:
                for det in self.detections:
                    x, y, bw, bh = (int(v) for v in det["bbox"])
                    f.write(f"{det['image_id']} {det['category_id']} {det['score']:g} "
                            f"{x} {y} {x + bw} {y + bh}\n")
