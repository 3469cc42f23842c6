"""SSD's detection layers (weiliu89/caffe, branch ssd): PriorBox, DetectionOutput, DetectionEvaluate,
MultiBoxLoss.

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

from ..boxes import batched_nms, iou_matrix
from ..io.protofiles import ProtoFileError, read_text
from ..layer import Layer, register
from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger(__name__)

FLT_MAX = 3.4028234663852886e38
FLT_MIN = 1.1754943508222875e-38


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
    p = prior.numel() // 8
    nl = 1 if share_location else num_classes
    pr = prior.reshape(-1)[: 2 * p * 4].reshape(2, p, 4)
    decoded = decode_boxes(loc.reshape(n, p, nl, 4).transpose(1, 2), pr[0], pr[1], code_type=code_type,
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
        if bottom[2].count() < 2 * self.num_priors * 4:
            raise self.error(f"priors {bottom[2].shape} must hold boxes and variances (2 channels)")
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
            try:
                with open(sp.name_size_file) as f:
                    tokens = f.read().split()
            except OSError as e:
                raise self.error(f"failed to open name size file {sp.name_size_file!r}: {e}") from e
            for i in range(0, len(tokens) - 2, 3):
                self.names.append(tokens[i])
                self.sizes.append((int(tokens[i + 1]), int(tokens[i + 2])))
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


@register("DetectionEvaluate")
class DetectionEvaluateLayer(Layer):
    """Scores detections against ground truth, for SSD's test-time mAP (the solver's
    ``eval_type: "detection"``). Bottoms: detections ``[1, 1, D, 7]`` (DetectionOutput's rows) and
    ground truth ``[1, 1, G, 8]`` rows ``[image, label, instance, xmin, ymin, xmax, ymax, difficult]``.

    Top ``[1, 1, num_pos_classes + valid detections, 5]``: first one row ``[-1, label, num_gt, -1, -1]``
    per class other than the background (``num_gt`` counts difficult ground truth only with
    ``evaluate_difficult_gt``), then per image (ascending) and label (ascending) the detections as
    ``[image, label, score, tp, fp]``: sorted by descending score and greedily matched to the
    ground truth box of highest IoU (>= ``overlap_threshold``; a box already matched makes a false
    positive; a match to a difficult box when not evaluating them makes ``0, 0``); detections of an
    image or label without ground truth are false positives in input order. Ground truth rows
    stop at the first image id -1; detection rows with image id -1 are skipped. With
    ``name_size_file``, boxes are scaled to each image's size and compared as pixel boxes, the
    image counter advancing once per image with detections, as the fork. Forward only.
    """

    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.detection_evaluate_param
        if not p.HasField("num_classes"):
            raise self.error("must provide detection_evaluate_param.num_classes")
        self.num_classes = int(p.num_classes)
        self.background = int(p.background_label_id)
        self.overlap_threshold = float(p.overlap_threshold)
        if self.overlap_threshold <= 0:
            raise self.error(f"overlap_threshold must be positive, got {self.overlap_threshold}")
        self.evaluate_difficult = p.evaluate_difficult_gt
        self.sizes: list[tuple[int, int]] = []
        if p.HasField("name_size_file"):
            try:
                with open(p.name_size_file) as f:
                    tokens = f.read().split()
            except OSError as e:
                raise self.error(f"failed to open name size file {p.name_size_file!r}: {e}") from e
            self.sizes = [(int(tokens[i + 1]), int(tokens[i + 2])) for i in range(0, len(tokens) - 2, 3)]
        self.resize = p.resize_param if p.HasField("resize_param") else None
        if self.resize is not None and self.resize.resize_mode == caffe_pb2.ResizeParameter.FIT_LARGE_SIZE_AND_PAD:
            raise self.error("resize_param FIT_LARGE_SIZE_AND_PAD is not supported")
        self.count = 0

    def reshape(self, bottom, top):
        det, gt = bottom
        if det.num != 1 or det.channels != 1 or det.width != 7:
            raise self.error(f"detections must have shape [1, 1, D, 7], got {det.shape}")
        if gt.num != 1 or gt.channels != 1 or gt.width != 8:
            raise self.error(f"ground truth must have shape [1, 1, G, 8], got {gt.shape}")
        labels = det.data_t.reshape(-1, 7)[:, 1]
        n_valid = int((labels != -1).sum())
        n_classes = self.num_classes if self.background == -1 else self.num_classes - 1
        top[0].reshape((1, 1, n_classes + n_valid, 5))

    def forward(self, bottom, top):
        det = bottom[0].data_t.detach().reshape(-1, 7).cpu().numpy().astype(np.float32)
        gt = bottom[1].data_t.detach().reshape(-1, 8).cpu().numpy().astype(np.float32)
        detections: dict[int, dict[int, list[int]]] = {}
        for i, row in enumerate(det):
            if int(row[0]) == -1:
                continue
            label = int(row[1])
            if label == self.background:
                raise self.error(f"found the background label {label} in the detection results (row {i})")
            detections.setdefault(int(row[0]), {}).setdefault(label, []).append(i)
        truth: dict[int, dict[int, list[int]]] = {}
        for i, row in enumerate(gt):
            if int(row[0]) == -1:
                break
            label = int(row[1])
            if label == self.background:
                raise self.error(f"found the background label {label} in the ground truth (row {i})")
            truth.setdefault(int(row[0]), {}).setdefault(label, []).append(i)
        num_pos: dict[int, int] = {}
        for labels in truth.values():
            for label, rows in labels.items():
                n = len(rows) if self.evaluate_difficult else sum(1 for r in rows if not gt[r, 7])
                num_pos[label] = num_pos.get(label, 0) + n
        out = [[-1, c, num_pos.get(c, 0), -1, -1] for c in range(self.num_classes) if c != self.background]
        pixel = bool(self.sizes)
        for image in sorted(detections):
            labels = truth.get(image, {})
            for label in sorted(detections[image]):
                rows = detections[image][label]
                if label not in labels:
                    out += [[image, label, det[r, 2], 0, 1] for r in rows]
                    continue
                gt_rows = labels[label]
                gt_boxes = gt[gt_rows, 3:7]
                rows = sorted(rows, key=lambda r: -det[r, 2])  # stable: ties keep input order
                det_boxes = det[rows, 3:7]
                if pixel:
                    size = self.sizes[self.count]
                    gt_boxes = np.stack([output_bbox(b, size, self.resize) for b in gt_boxes])
                    det_boxes = np.stack([output_bbox(b, size, self.resize) for b in det_boxes])
                overlaps = iou_matrix(torch.from_numpy(det_boxes), torch.from_numpy(gt_boxes), pixel=pixel).numpy()
                best = overlaps.argmax(axis=1)  # the first of equal maxima, as the fork's strict >
                visited = np.zeros(len(gt_rows), bool)
                for r, j, ov in zip(rows, best, overlaps[np.arange(len(rows)), best]):
                    tp = fp = 0
                    if ov >= self.overlap_threshold:
                        if self.evaluate_difficult or not gt[gt_rows[j], 7]:
                            tp, fp = (0, 1) if visited[j] else (1, 0)
                            visited[j] = True
                    else:
                        fp = 1
                    out.append([image, label, det[r, 2], tp, fp])
            if self.sizes:
                self.count = (self.count + 1) % len(self.sizes)
        result = torch.tensor(np.asarray(out, np.float32).reshape(-1, 5), dtype=self.dtype, device=self.device)
        top[0].reshape((1, 1, result.shape[0], 5))
        top[0].data_t = result.reshape(1, 1, -1, 5)

    def backward(self, top, propagate_down, bottom):
        pass  # forward only, as in the fork


def encode_boxes(gt: torch.Tensor, prior_boxes: torch.Tensor, prior_var: torch.Tensor, *, code_type: int,
                 variance_encoded_in_target: bool = False) -> torch.Tensor:
    """SSD's EncodeBBox on tensors: ground truth ``gt [M, 4]`` against its priors ``[M, 4]`` (the
    inverse of :func:`decode_boxes` for normalized boxes)."""
    v = torch.ones_like(prior_var) if variance_encoded_in_target else prior_var
    if code_type == 1:  # CORNER
        return (gt - prior_boxes) / v
    pw = prior_boxes[:, 2] - prior_boxes[:, 0]
    ph = prior_boxes[:, 3] - prior_boxes[:, 1]
    if code_type == 3:  # CORNER_SIZE
        return (gt - prior_boxes) / torch.stack([pw, ph, pw, ph], dim=1) / v
    pcx, pcy = (prior_boxes[:, 0] + prior_boxes[:, 2]) / 2, (prior_boxes[:, 1] + prior_boxes[:, 3]) / 2
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gcx, gcy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
    return torch.stack([(gcx - pcx) / pw / v[:, 0], (gcy - pcy) / ph / v[:, 1],
                        torch.log(gw / pw) / v[:, 2], torch.log(gh / ph) / v[:, 3]], dim=1)


def match_boxes(overlaps: torch.Tensor, cross: torch.Tensor, bipartite_only: bool,
                overlap_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD's MatchBBox from the IoU matrix ``[P, G]`` of predictions (priors) and ground truth:
    ``(match [P] (gt index, -1 unmatched, -2 ignored cross-boundary), match_overlap [P])``.

    Bipartite: repeatedly the largest remaining overlap (first in (prediction, gt) order among
    equals) pairs its prediction and gt, each used once; then, unless ``bipartite_only``, every
    unmatched prediction takes its best gt with overlap >= ``overlap_threshold``. Overlaps <= 1e-6
    do not count. The loop runs once per gt box."""
    p, g = overlaps.shape
    valid = (overlaps > 1e-6) & ~cross[:, None]
    match = torch.where(cross, torch.full((p,), -2, dtype=torch.long), torch.full((p,), -1, dtype=torch.long))
    match_overlap = torch.where(valid, overlaps, torch.zeros_like(overlaps)).amax(dim=1) if g else \
        torch.zeros(p, dtype=overlaps.dtype)
    if g == 0:
        return match, match_overlap
    pool = valid.clone()
    for _ in range(g):
        if not bool(pool.any()):
            break
        scores = torch.where(pool, overlaps, torch.full_like(overlaps, -1.0))
        best = int(scores.reshape(-1).argmax())
        i, j = divmod(best, g)
        match[i] = j
        match_overlap[i] = overlaps[i, j]
        pool[i, :] = False
        pool[:, j] = False
    if not bipartite_only:
        rest = (match == -1) & valid.any(dim=1)
        cand = torch.where(valid & (overlaps >= overlap_threshold), overlaps, torch.full_like(overlaps, -1.0))
        best_val, best_gt = cand.max(dim=1)
        take = rest & (best_val > -1)
        match = torch.where(take, best_gt, match)
        match_overlap = torch.where(take, best_val, match_overlap)
    return match, match_overlap


@register("MultiBoxLoss")
class MultiBoxLossLayer(Layer):
    """SSD's training loss: bottoms loc ``[N, P*4]``, conf ``[N, P*C]`` (scores before softmax),
    priors ``[1, 2, P*4]``, ground truth ``[1, 1, G, 8]``; a scalar top.

    As the fork: priors are matched to the ground truth (``match_type`` BIPARTITE or PER_PREDICTION
    at ``overlap_threshold``; ``use_prior_for_matching`` false matches the decoded predictions;
    ``ignore_cross_boundary_bbox``), negatives are mined (``mining_type`` MAX_NEGATIVE: the
    highest-confidence-loss unmatched priors with overlap < ``neg_overlap``, ``neg_pos_ratio`` per
    positive; NONE: every prior in the confidence loss), the matched ground truth is encoded
    (``code_type``, ``encode_variance_in_target``, ``bp_inside``) and the loss is
    ``loc_weight * loc_loss / n + conf_loss / n``, loc SMOOTH_L1 (``sum f(d)``) or L2 (``sum d^2 / 2``),
    conf SOFTMAX (``-sum log p``) or LOGISTIC (sigmoid cross-entropy), ``n`` from ``loss_param``'s
    normalization (default VALID: the number of matches). A term counts only when the layer's
    ``propagate_down`` for its bottom is true (default: true true false false). Gradients: the fork's
    (the loc diff is copied as computed on the encoded values, also with
    ``encode_variance_in_target``). Not supported (clear errors): ``share_location: false``,
    HARD_EXAMPLE mining and mining with ``nms_param``.
    """

    exact_num_bottom_blobs = 4
    exact_num_top_blobs = 1
    auto_top_blobs = True

    def default_loss_weight(self, top_index: int) -> float:
        return 1.0

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True  # as the fork: force_backward reaches the priors and labels, and backward refuses

    def layer_setup(self, bottom, top):
        lp = self.layer_param
        if not len(lp.propagate_down):
            lp.propagate_down.extend([True, True, False, False])
        self.term_used = [bool(v) for v in lp.propagate_down]
        p = lp.multibox_loss_param
        if not p.HasField("num_classes"):
            raise self.error("must provide multibox_loss_param.num_classes")
        self.p = p
        self.num_classes = int(p.num_classes)
        if self.num_classes < 1:
            raise self.error("num_classes should not be less than 1")
        if not p.share_location:
            raise self.error("share_location: false is not supported")
        M = caffe_pb2.MultiBoxLossParameter
        if p.HasField("do_neg_mining") and p.do_neg_mining != (p.mining_type != M.NONE):
            raise self.error(f"do_neg_mining {str(p.do_neg_mining).lower()} contradicts mining_type "
                             f"{M.MiningType.Name(p.mining_type)}")
        self.mining = p.mining_type != M.NONE
        if p.mining_type == M.HARD_EXAMPLE:
            raise self.error("mining_type HARD_EXAMPLE is not supported")
        if self.mining and p.HasField("nms_param") and p.nms_param.nms_threshold > 0:
            raise self.error("negative mining with nms_param is not supported")
        lp_loss = lp.loss_param
        if not lp_loss.HasField("normalization") and lp_loss.HasField("normalize"):
            self.normalization = caffe_pb2.LossParameter.VALID if lp_loss.normalize \
                else caffe_pb2.LossParameter.BATCH_SIZE
        else:
            self.normalization = lp_loss.normalization
        self.softmax = p.conf_loss_type == M.SOFTMAX
        if self.softmax and not 0 <= p.background_label_id < self.num_classes:
            raise self.error(f"background_label_id should be within [0, num_classes) for Softmax, got "
                             f"{p.background_label_id} with {self.num_classes} classes")
        if p.map_object_to_agnostic and self.num_classes != (2 if p.background_label_id >= 0 else 1):
            raise self.error("map_object_to_agnostic needs num_classes 2 (1 without background)")

    def reshape(self, bottom, top):
        if bottom[0].num != bottom[1].num:
            raise self.error(f"loc and conf must have the same number of images: bottom[0] has shape "
                             f"{bottom[0].shape}, bottom[1] has shape {bottom[1].shape}")
        self.num_priors = bottom[2].height // 4
        if self.num_priors * 4 != bottom[0].channels:
            raise self.error(f"number of priors must match number of location predictions: priors "
                             f"{bottom[2].shape} vs loc {bottom[0].shape}")
        if self.num_priors * self.num_classes != bottom[1].channels:
            raise self.error(f"number of priors must match number of confidence predictions: priors "
                             f"{bottom[2].shape} vs conf {bottom[1].shape} ({self.num_classes} classes)")
        top[0].reshape(())

    # ------------------------------------------------------------------ pieces
    def _ground_truth(self, gt: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """image -> (boxes [G, 4], labels [G]) as the fork's GetGroundTruth (rows of image -1 skipped)."""
        rows = gt.reshape(-1, 8).detach().cpu()
        bg = int(self.p.background_label_id)
        out: dict[int, list[int]] = {}
        for i, row in enumerate(rows.tolist()):
            item = int(row[0])
            if item == -1:
                continue
            if int(row[1]) == bg:
                raise self.error(f"found the background label {bg} in the ground truth (row {i})")
            if not self.p.use_difficult_gt and row[7]:
                continue
            out.setdefault(item, []).append(i)
        return {k: (gt.reshape(-1, 8)[v, 3:7], gt.reshape(-1, 8)[v, 1].long()) for k, v in out.items()}

    def _conf_loss_rows(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-row confidence loss (SOFTMAX: -log max(p, FLT_MIN); LOGISTIC: summed over classes)."""
        if self.softmax:
            prob = torch.softmax(x, dim=1).gather(1, labels[:, None])[:, 0]
            return -torch.log(prob.clamp_min(FLT_MIN))
        t = self._targets(x, labels)
        pos = (x >= 0).to(x.dtype)
        return -(x * (t - pos) - torch.log1p(torch.exp(x - 2 * x * pos))).sum(dim=1)

    def _targets(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """LOGISTIC's one-hot targets; a label outside [0, num_classes) (background -1) is all zeros."""
        t = torch.zeros_like(x)
        ok = (labels >= 0) & (labels < self.num_classes)
        t[ok.nonzero()[:, 0], labels[ok]] = 1
        return t

    def forward(self, bottom, top):
        p, M = self.p, caffe_pb2.MultiBoxLossParameter
        n, np_, c = bottom[0].num, self.num_priors, self.num_classes
        loc = bottom[0].data_t.reshape(n, np_, 4)
        conf = bottom[1].data_t.reshape(n, np_, c)
        pr = bottom[2].data_t.reshape(-1)[: 2 * np_ * 4].reshape(2, np_, 4)
        pb, pv = pr[0], pr[1]
        truth = self._ground_truth(bottom[3].data_t)
        bg = int(p.background_label_id)
        code = int(p.code_type)
        enc_var = p.encode_variance_in_target
        pos_img, pos_prior, pos_gt_box, pos_label, neg_img, neg_prior = [], [], [], [], [], []
        for i in range(n):
            if i not in truth:
                continue
            gt_boxes, gt_labels = truth[i]
            if p.use_prior_for_matching:
                preds = pb
            else:
                preds = decode_boxes(loc[i], pb, pv, code_type=code, variance_encoded_in_target=enc_var)
            cross = ((preds < 0) | (preds > 1)).any(dim=1) if p.ignore_cross_boundary_bbox else \
                torch.zeros(np_, dtype=torch.bool, device=preds.device)
            match, overlap = match_boxes(iou_matrix(preds, gt_boxes).cpu(), cross.cpu(),
                                         p.match_type == M.BIPARTITE, float(p.overlap_threshold))
            match, overlap = match.to(loc.device), overlap.to(loc.device)
            matched = match > -1
            idx = matched.nonzero()[:, 0]
            pos_img.append(torch.full_like(idx, i))
            pos_prior.append(idx)
            pos_gt_box.append(gt_boxes[match[idx]])
            label = gt_labels[match[idx]]
            pos_label.append(torch.full_like(label, bg + 1) if p.map_object_to_agnostic else label)
            if p.mining_type == M.MAX_NEGATIVE:
                labels_all = torch.full((np_,), bg, dtype=torch.long, device=loc.device)
                labels_all[idx] = gt_labels[match[idx]]
                loss = self._conf_loss_rows(conf[i], labels_all).to(torch.float32)
                eligible = (match == -1) & (overlap < p.neg_overlap)
                num_sel = min(int(np.float32(int(matched.sum())) * np.float32(p.neg_pos_ratio)), int(eligible.sum()))
                if num_sel > 0:
                    ranked = torch.where(eligible, loss, torch.full_like(loss, -float("inf")))
                    chosen = torch.sort(ranked, descending=True, stable=True).indices[:num_sel]
                    chosen = torch.sort(chosen).values
                    neg_img.append(torch.full_like(chosen, i))
                    neg_prior.append(chosen)

        def cat(parts, dtype=torch.long):
            return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=loc.device)

        self._pos = (cat(pos_img), cat(pos_prior))
        self._neg = (cat(neg_img), cat(neg_prior))
        gt_box = torch.cat(pos_gt_box) if pos_gt_box else torch.zeros((0, 4), dtype=loc.dtype, device=loc.device)
        pos_lab = cat(pos_label)
        self.num_matches = int(self._pos[0].numel())
        # localization
        pi, pj = self._pos
        if self.num_matches:
            gt_enc = encode_boxes(gt_box, pb[pj], pv[pj], code_type=code, variance_encoded_in_target=enc_var)
            pred = loc[pi, pj]
            if p.bp_inside:
                inside = pb[pj] if p.use_prior_for_matching else decode_boxes(
                    pred, pb[pj], pv[pj], code_type=code, variance_encoded_in_target=enc_var)
                pred = torch.where((inside < 0) | (inside > 1), gt_enc, pred)
            if enc_var:
                pred, gt_enc = pred / pv[pj], gt_enc / pv[pj]
            d = pred - gt_enc
            self._loc_d = d
            if p.loc_loss_type == M.SMOOTH_L1:
                loc_loss = torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5).sum()
            else:
                loc_loss = (d * d).sum() / 2
        else:
            loc_loss = torch.zeros((), dtype=loc.dtype, device=loc.device)
        # confidence
        if self.mining:
            ni, nj = self._neg
            rows_i, rows_j = torch.cat([pi, ni]), torch.cat([pj, nj])
            # per image: its positives, then its negatives (the fork's order; the sum does not care)
            x = conf[rows_i, rows_j]
            labels = torch.cat([pos_lab, torch.full_like(nj, bg)])
            self._conf_rows = (rows_i, rows_j)
        else:
            x = conf.reshape(-1, c)
            lab = torch.full((n, np_), bg, dtype=torch.long, device=loc.device)
            lab[pi, pj] = pos_lab
            labels = lab.reshape(-1)
            self._conf_rows = None
        self._conf_x, self._conf_labels = x, labels
        conf_loss = self._conf_loss_rows(x, labels).sum() if x.shape[0] else torch.zeros((), dtype=loc.dtype,
                                                                                          device=loc.device)
        self._normalizer = self._get_normalizer(n, np_)
        total = torch.zeros((), dtype=loc.dtype, device=loc.device)
        if self.term_used[0]:
            total = total + p.loc_weight * loc_loss / self._normalizer
        if self.term_used[1]:
            total = total + conf_loss / self._normalizer
        top[0].data_t = total

    def _get_normalizer(self, n: int, p: int) -> float:
        Norm = caffe_pb2.LossParameter
        mode = self.normalization
        value = {Norm.FULL: n * p, Norm.VALID: self.num_matches, Norm.BATCH_SIZE: n, Norm.NONE: 1}.get(mode)
        if value is None:
            raise self.error(f"unknown normalization mode {mode}")
        return float(max(1, value))

    def backward(self, top, propagate_down, bottom):
        if propagate_down[2]:
            raise self.error("cannot backpropagate to prior inputs (bottom 2)")
        if propagate_down[3]:
            raise self.error("cannot backpropagate to label inputs (bottom 3)")
        scale = top[0].diff_t / self._normalizer
        M = caffe_pb2.MultiBoxLossParameter
        if propagate_down[0]:
            diff = torch.zeros_like(bottom[0].data_t).reshape(bottom[0].num, self.num_priors, 4)
            if self.num_matches:
                d = self._loc_d
                g = torch.where(d.abs() < 1, d, torch.sign(d)) if self.p.loc_loss_type == M.SMOOTH_L1 else d
                diff[self._pos] = g * (self.p.loc_weight * scale)
            bottom[0].diff_t = diff.reshape(bottom[0].shape)
        if propagate_down[1]:
            x, labels = self._conf_x, self._conf_labels
            if x.shape[0]:
                if self.softmax:
                    g = torch.softmax(x, dim=1)
                    g[torch.arange(x.shape[0], device=x.device), labels] -= 1
                else:
                    g = torch.sigmoid(x) - self._targets(x, labels)
                g = g * scale
            if self._conf_rows is None:
                diff = g.reshape(bottom[1].shape) if x.shape[0] else torch.zeros_like(bottom[1].data_t)
            else:
                diff = torch.zeros_like(bottom[1].data_t).reshape(bottom[1].num, self.num_priors, self.num_classes)
                if x.shape[0]:
                    diff[self._conf_rows] = g
            bottom[1].diff_t = diff.reshape(bottom[1].shape)
