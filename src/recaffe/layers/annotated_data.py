"""SSD's ``AnnotatedData`` layer (weiliu89/caffe): AnnotatedDatum records from an LMDB/LevelDB,
augmented for detection, prefetched like Data.

Per image, in the fork's order: distortion (``transform_param.distort_param``), expansion
(``expand_param``), a crop picked at random among the boxes the ``batch_sampler``s generate (the
whole image when none qualifies), then the usual transformation: resize (``resize_param``), crop
(``crop_size``), mirror, mean and scale, the boxes following every step (kept when they meet
``emit_constraint`` and overlap the crop; flipped with the image). Tops: data ``[N, C, H, W]`` and,
for annotated records, label ``[1, 1, B, 8]`` with rows ``[item, label, instance, xmin, ymin, xmax,
ymax, difficult]`` over the batch (one row of -1 when the batch has no box, as the fork); for records
without an annotation type, a label per item as Data. See data/annotated_transform.py for the steps
and the deviations from the fork.
"""
from __future__ import annotations

import numpy as np
import torch
from google.protobuf.message import DecodeError

from ..data.annotated_transform import (
    Boxes,
    apply_noise,
    crop_image,
    distort_image,
    expand_image,
    generate_batch_samples,
    new_size,
    project_boxes,
    resize_image,
    update_boxes_for_resize,
)
from ..data.db import DBError
from ..data.transformer import TransformError
from ..layer import register
from ..log import get_logger
from ..proto import caffe_pb2
from .data import DataLayer, _BatchReader

log = get_logger(__name__)


class _AnnotatedBatchReader(_BatchReader):
    """Reads AnnotatedDatums and applies SSD's augmentation; runs in the prefetch thread."""

    def __init__(self, *args, layer_param: caffe_pb2.LayerParameter, **kw):
        super().__init__(*args, **kw)
        self.tp = layer_param.transform_param
        self.ap = layer_param.annotated_data_param
        self.gen = self.transformer.rng
        p = self.transformer.param
        mean = list(p.mean_value) or [0.0]
        self.fill = np.clip(np.rint(np.asarray(mean, dtype=np.float64)), 0, 255).astype(np.uint8)
        self.emit = self.tp.emit_constraint if self.tp.HasField("emit_constraint") else None
        self.anno_type = None  # decided by the first record, as the fork

    def read_datum(self) -> caffe_pb2.AnnotatedDatum:
        record = caffe_pb2.AnnotatedDatum()
        try:
            record.ParseFromString(self.cursor.value())
        except DecodeError:
            raise DBError(f"{self.where}: record {self.cursor.key()!r} is not an AnnotatedDatum") from None
        if not record.HasField("datum"):
            raise DBError(f"{self.where}: record {self.cursor.key()!r} holds no datum (not an AnnotatedDatum?)")
        return record

    def annotated(self, record: caffe_pb2.AnnotatedDatum) -> bool:
        if self.anno_type is None:
            self.anno_type = record.HasField("type") or self.ap.HasField("anno_type")
        return self.anno_type

    def augment(self, record: caffe_pb2.AnnotatedDatum):
        """One record -> (image (C, H, W) uint8 before resize/crop, its boxes)."""
        img = self.transformer.decode(record.datum)
        if img.dtype != np.uint8:
            raise TransformError("AnnotatedData augments uint8 images; this datum holds float_data")
        boxes = Boxes.from_datum(record)
        if self.tp.HasField("distort_param"):
            img = distort_image(img, self.tp.distort_param, self.gen)
        if self.tp.HasField("expand_param"):
            img, boxes = expand_image(img, boxes, self.tp.expand_param, self.fill, self.emit, self.gen)
        if len(self.ap.batch_sampler):
            samples = generate_batch_samples(boxes.xyxy.astype(np.float64), self.ap.batch_sampler, self.gen)
            if samples:
                box = samples[int(self.gen.integers(len(samples)))]
                img = crop_image(img, box)
                boxes = project_boxes(np.clip(box, 0, 1), boxes, self.emit)
        return img, boxes

    def finish(self, img: np.ndarray, boxes: Boxes) -> tuple[np.ndarray, Boxes]:
        """Resize, crop, mirror, mean and scale one image and carry its boxes along."""
        t = self.transformer
        _, h, w = img.shape
        if self.tp.HasField("resize_param"):
            boxes = Boxes(update_boxes_for_resize(boxes.xyxy, self.tp.resize_param, w, h), boxes.label,
                          boxes.instance, boxes.difficult)
            img = resize_image(img, self.tp.resize_param, self.gen)
        if self.tp.HasField("noise_param"):  # after the resize, before the crop, as the fork
            img = apply_noise(img, self.tp.noise_param, self.gen)
        _, h, w = img.shape
        flip = bool(t.mirror and self.gen.integers(0, 2))
        crop = t.crop_size
        if crop:
            if h < crop or w < crop:
                raise TransformError(f"crop_size {crop} is larger than the image ({h}x{w})")
            if t.phase == caffe_pb2.TRAIN:
                h_off, w_off = int(self.gen.integers(h - crop + 1)), int(self.gen.integers(w - crop + 1))
            else:
                h_off, w_off = (h - crop) // 2, (w - crop) // 2
            ch, cw = crop, crop
        else:
            h_off = w_off = 0
            ch, cw = h, w
        frame = np.array([w_off / w, h_off / h, (w_off + cw) / w, (h_off + ch) / h])
        boxes = project_boxes(frame, boxes, self.emit)
        if flip and len(boxes):
            x = boxes.xyxy.copy()
            x[:, 0], x[:, 2] = 1 - boxes.xyxy[:, 2], 1 - boxes.xyxy[:, 0]
            boxes = Boxes(x, boxes.label, boxes.instance, boxes.difficult)
        t.output_shape(img.shape)  # checks crop and mean against the image
        out = t.crop_mirror_normalize(img[None], np.array([h_off]), np.array([w_off]), np.array([flip]))[0]
        return out, boxes

    def load_batch(self):
        images, rows, labels = [], [], []
        for item in range(self.batch_size):
            record = self.next_record()
            annotated = self.annotated(record)
            img, boxes = self.augment(record)
            out, boxes = self.finish(img, boxes)
            if images and out.shape != images[0].shape:
                raise TransformError(f"item {item} of the batch transforms to {out.shape}, the first to "
                                     f"{images[0].shape}: with resize_mode FIT_SMALL_SIZE use batch_size 1")
            images.append(out)
            if annotated:
                rows.append(boxes.rows(item))
            else:
                labels.append(record.datum.label)
        data = torch.from_numpy(np.stack(images))
        label = None
        if self.output_labels:
            if self.anno_type:
                table = np.concatenate(rows) if rows else np.zeros((0, 8))
                if len(table) == 0:
                    table = np.full((1, 8), -1.0)
                label = torch.from_numpy(table.astype(self.np_dtype).reshape(1, 1, -1, 8))
            else:
                label = torch.from_numpy(np.asarray(labels, dtype=self.np_dtype))
        return self.batch(data, label)


@register("AnnotatedData")
class AnnotatedDataLayer(DataLayer):
    """SSD's AnnotatedData: ``data_param`` (source, backend, batch_size, rand_skip, prefetch),
    ``transform_param`` with SSD's extensions, ``annotated_data_param`` (batch_sampler,
    label_map_file, anno_type)."""

    def layer_setup(self, bottom, top):
        noise = self.layer_param.transform_param.noise_param
        if noise.clahe or noise.convert_to_lab:
            raise self.error("transform_param.noise_param: clahe and convert_to_lab are not supported")
        for i, bs in enumerate(self.layer_param.annotated_data_param.batch_sampler):
            if bs.max_trials <= 0:
                raise self.error(f"batch_sampler {i}: max_trials must be positive")
        reader = self.make_reader(_AnnotatedBatchReader, len(top) > 1, layer_param=self.layer_param)
        transformer, batch_size = reader.transformer, reader.batch_size
        try:
            first = reader.read_datum()
            shape = list(transformer.decode(first.datum).shape)
        except (TransformError, DBError) as e:
            raise self.error(str(e)) from None
        tp = self.layer_param.transform_param
        if tp.HasField("resize_param"):
            shape[1], shape[2] = new_size(tp.resize_param, shape[2], shape[1])
        if transformer.crop_size:
            shape[1] = shape[2] = transformer.crop_size
        top[0].reshape((batch_size, *shape))
        log.info("output data size: %d,%d,%d,%d", *top[0].shape)
        if len(top) > 1:
            annotated = reader.annotated(first)
            top[1].reshape((1, 1, 1, 8) if annotated else (batch_size,))
        self.start_loading(reader, on_exit=reader.close)
