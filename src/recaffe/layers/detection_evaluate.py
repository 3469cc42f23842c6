"""SSD's ``DetectionEvaluate`` (weiliu89/caffe, branch ssd): detections scored against ground truth.

Bottoms: detections ``[1, 1, D, 7]`` (DetectionOutput's rows ``[image, label, score, xmin, ymin,
xmax, ymax]``) and ground truth ``[1, 1, G, 8]`` (``[image, label, instance, xmin, ymin, xmax, ymax,
difficult]``). The top ``[1, 1, C' + D', 5]`` holds first one row ``[-1, label, num_gt, -1, -1]`` per
non-background class, then for every image (ascending) and label (ascending) its detections as
``[image, label, score, tp, fp]``: by descending score where the image has ground truth of that label
(each ground-truth box is the true positive of at most one detection, the best-scored one with
overlap >= ``overlap_threshold``), in input order and all false positives otherwise. The solver's
detection test mode turns these rows into average precision.

With ``name_size_file`` (lines ``name height width``, one per test image in order) the boxes are
scaled to pixels first (clipped to [0, 1], or through ``resize_param``'s FIT_SMALL_SIZE scales: the
fork's OutputBBox, as DetectionOutput writes files) and overlaps use pixel areas (+1), as the fork; the fork advances to the next size once per image that has
detections, and so do we.
"""
from __future__ import annotations

import torch

from ..boxes import iou_matrix
from ..layer import Layer, register
from .detection import output_bbox, read_name_size_file
from ..proto import caffe_pb2

_Resize = caffe_pb2.ResizeParameter


@register("DetectionEvaluate")
class DetectionEvaluateLayer(Layer):
    exact_num_bottom_blobs = 2
    exact_num_top_blobs = 1

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def layer_setup(self, bottom, top):
        p = self.layer_param.detection_evaluate_param
        if not p.HasField("num_classes"):
            raise self.error("detection_evaluate_param.num_classes must be given")
        if p.overlap_threshold <= 0:
            raise self.error(f"overlap_threshold must be positive, got {p.overlap_threshold}")
        self.p = p
        self.sizes: list[tuple[int, int]] = []
        if p.HasField("name_size_file"):
            self.sizes = read_name_size_file(p.name_size_file, self)[1]
        self.resize = p.resize_param if p.HasField("resize_param") else None
        if self.resize is not None and self.resize.resize_mode == _Resize.FIT_LARGE_SIZE_AND_PAD:
            raise self.error("resize_param FIT_LARGE_SIZE_AND_PAD is not supported in DetectionEvaluate")
        self.count = 0

    def reshape(self, bottom, top):
        det, gt = bottom
        if det.num_axes != 4 or det.shape[:2] != (1, 1) or det.shape[3] != 7:
            raise self.error(f"detections must be [1, 1, D, 7], got {det.shape}")
        if gt.num_axes != 4 or gt.shape[:2] != (1, 1) or gt.shape[3] != 8:
            raise self.error(f"ground truth must be [1, 1, G, 8], got {gt.shape}")
        p = self.p
        num_pos_classes = p.num_classes if p.background_label_id == -1 else p.num_classes - 1
        num_valid = int((det.data_t.reshape(-1, 7)[:, 1] != -1).sum())
        top[0].reshape((1, 1, num_pos_classes + num_valid, 5))

    def forward(self, bottom, top):
        p = self.p
        det = bottom[0].data_t.reshape(-1, 7).to(torch.float64).cpu()
        gt = bottom[1].data_t.reshape(-1, 8).to(torch.float64).cpu()
        background = p.background_label_id
        # ground truth up to the first row of image -1 (the fork stops there)
        stop = (gt[:, 0] == -1).nonzero()
        gt = gt[: int(stop[0]) if stop.numel() else gt.shape[0]]
        if (gt[:, 1].to(torch.long) == background).any():
            raise self.error("found the background label in the ground truth")
        det = det[det[:, 0] != -1]
        if (det[:, 1].to(torch.long) == background).any():
            raise self.error("found the background label in the detection results")
        gt_img, gt_lab = gt[:, 0].to(torch.long), gt[:, 1].to(torch.long)
        difficult = gt[:, 7] != 0
        rows = []
        for c in range(p.num_classes):
            if c == background:
                continue
            of_c = gt_lab == c
            n = int(of_c.sum()) if p.evaluate_difficult_gt else int((of_c & ~difficult).sum())
            rows.append([-1.0, float(c), float(n), -1.0, -1.0])
        det_img, det_lab = det[:, 0].to(torch.long), det[:, 1].to(torch.long)
        for image in sorted(set(det_img.tolist())):
            size = self.sizes[self.count] if self.sizes else None
            for label in sorted(set(det_lab[det_img == image].tolist())):
                if label == -1:
                    continue
                d = det[(det_img == image) & (det_lab == label)]
                g_sel = (gt_img == image) & (gt_lab == label)
                if not g_sel.any():
                    rows += [[float(image), float(label), float(s), 0.0, 1.0] for s in d[:, 2].tolist()]
                    continue
                order = torch.sort(d[:, 2], descending=True, stable=True).indices
                d = d[order]
                d_boxes, g_boxes = d[:, 3:7], gt[g_sel, 3:7]
                if size is not None:
                    d_boxes, g_boxes = (torch.from_numpy(output_bbox(b.numpy(), size, self.resize))
                                        for b in (d_boxes, g_boxes))
                ov = iou_matrix(d_boxes, g_boxes, pixel=size is not None)
                best, j = ov.max(1)  # the first maximum, as the fork's strict '>'
                g_difficult = difficult[g_sel]
                visited = [False] * g_boxes.shape[0]
                for k, (score, o, jj) in enumerate(zip(d[:, 2].tolist(), best.tolist(), j.tolist())):
                    tp = fp = 0.0
                    if o >= p.overlap_threshold:
                        if p.evaluate_difficult_gt or not bool(g_difficult[jj]):
                            if not visited[jj]:
                                tp, visited[jj] = 1.0, True
                            else:
                                fp = 1.0
                    else:
                        fp = 1.0
                    rows.append([float(image), float(label), score, tp, fp])
            if self.sizes:
                self.count = (self.count + 1) % len(self.sizes)
        out = torch.tensor(rows, dtype=bottom[0].dtype).reshape(1, 1, -1, 5)
        top[0].data_t = out.to(bottom[0].device)
