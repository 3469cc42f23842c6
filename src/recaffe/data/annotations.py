"""SSD's detection annotations: label maps and the VOC XML / COCO JSON / text box files that the
fork's ``convert_annoset`` turns into ``AnnotatedDatum`` records (weiliu89/caffe, util/io.cpp).

An ``AnnotatedDatum`` holds the image (a Datum, raw or encoded) and one ``AnnotationGroup`` per
label, each with ``Annotation``s (``instance_id`` counting from 0 within the group, and a
``NormalizedBBox``: pixel coordinates divided by the image size given in the annotation file). As in
the fork, VOC coordinates are integers, a missing annotation file gives an image without objects,
and ``difficult`` (VOC) or ``iscrowd`` (COCO) marks a box difficult. Unlike the fork, a name missing
from the label map, a box before its object's name or a malformed file is an error naming the file
and the object (the fork aborts or silently reads 0).
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET

from ..io.protofiles import ProtoFileError, read_text
from ..log import get_logger
from ..proto import caffe_pb2

log = get_logger(__name__)


class AnnotationError(ValueError):
    """An annotation or label map file that cannot be used; the message names the file and object."""


# ------------------------------------------------------------------ label maps
def read_label_map(path: str | os.PathLike) -> caffe_pb2.LabelMap:
    """A ``labelmap_voc.prototxt``-style LabelMap (items with name, label, display_name)."""
    try:
        return read_text(path, caffe_pb2.LabelMap())
    except ProtoFileError as e:
        raise AnnotationError(f"label map: {e}") from None


def map_name_to_label(label_map: caffe_pb2.LabelMap, strict: bool = False) -> dict[str, int]:
    """name -> label; ``strict`` refuses duplicate names (the fork's ``-check_label``)."""
    out: dict[str, int] = {}
    for item in label_map.item:
        if strict and item.name in out:
            raise AnnotationError(f"label map: there are many duplicates of name {item.name!r}")
        out[item.name] = item.label
    return out


def map_label_to_name(label_map: caffe_pb2.LabelMap, strict: bool = False,
                      display: bool = False) -> dict[int, str]:
    """label -> name (or display_name); ``strict`` refuses duplicate labels."""
    out: dict[int, str] = {}
    for item in label_map.item:
        if strict and item.label in out:
            raise AnnotationError(f"label map: there are many duplicates of label {item.label}")
        out[item.label] = item.display_name if display else item.name
    return out


def label_map_from_label_file(path: str, include_background: bool = True,
                              delimiter: str = " :;") -> caffe_pb2.LabelMap:
    """The fork's ReadLabelFileToLabelMap: lines ``name [label] [display_name]`` split on any
    character of ``delimiter``; with ``include_background`` label 0 is ``none_of_the_above``."""
    lm = caffe_pb2.LabelMap()
    label = 0
    if include_background:
        lm.item.add(name="none_of_the_above", label=0, display_name="background")
        label = 1
    width = None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = _split_any(line.rstrip("\n"), delimiter)
            if width is None:
                width = len(fields)
            elif len(fields) != width:
                raise AnnotationError(f"{path}:{number}: inconsistent number of fields per line")
            if width == 1:
                lm.item.add(name=fields[0], label=label, display_name=fields[0])
                label += 1
            elif width in (2, 3):
                label = _int(fields[1], f"{path}:{number}")
                lm.item.add(name=fields[0], label=label, display_name=fields[-1] if width == 3 else fields[0])
            else:
                raise AnnotationError(f"{path}:{number}: the number of fields should be 1 to 3")
    return lm


def _split_any(text: str, chars: str) -> list[str]:
    out, cur = [], ""
    for ch in text:
        if ch in chars:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise AnnotationError(f"{where}: {text!r} is not an integer") from None


# ------------------------------------------------------------------ annotation files
class _Groups:
    """Builds annotation groups in the fork's order: a group per label, in first-seen order."""

    def __init__(self, datum: caffe_pb2.AnnotatedDatum):
        self.datum = datum

    def add(self, label: int) -> caffe_pb2.Annotation:
        for group in self.datum.annotation_group:
            if group.group_label == label:
                last = group.annotation[-1].instance_id + 1 if len(group.annotation) else 0
                return group.annotation.add(instance_id=last)
        group = self.datum.annotation_group.add(group_label=label)
        return group.annotation.add(instance_id=0)


def _set_box(anno, xmin, ymin, xmax, ymax, width, height, difficult, where: str) -> None:
    if min(xmin, ymin, xmax, ymax) < 0 or xmin > width or xmax > width or ymin > height or ymax > height:
        log.warning("%s bounding box exceeds image boundary.", where)
    if xmin > xmax or ymin > ymax:
        log.warning("%s bounding box irregular.", where)
    b = anno.bbox
    b.xmin, b.ymin = xmin / width, ymin / height
    b.xmax, b.ymax = xmax / width, ymax / height
    b.difficult = difficult


def _image_size(found_h, found_w, img_h, img_w, path: str) -> tuple[int, int]:
    if found_h is None or found_w is None:
        log.warning("When parsing %s: no image size in the file; using the image's", path)
        found_h, found_w = img_h, img_w
    if found_h != img_h:
        log.warning("%s inconsistent image height.", path)
    if found_w != img_w:
        log.warning("%s inconsistent image width.", path)
    if not found_h or not found_w:
        raise AnnotationError(f"{path}: no valid image width/height")
    return found_h, found_w


def read_voc_xml(path: str, img_height: int, img_width: int, name_to_label: dict[str, int],
                 datum: caffe_pb2.AnnotatedDatum) -> None:
    """Add the objects of a VOC/ILSVRC XML file to ``datum`` (the fork's ReadXMLToAnnotatedDatum)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: malformed XML annotation ({e})") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read the annotation ({e.strerror})") from None
    if root.tag != "annotation":
        raise AnnotationError(f"{path}: not a VOC annotation (root element <{root.tag}>)")

    def size(tag):
        text = root.findtext(f"size/{tag}")
        try:
            return int(text) if text is not None else None
        except ValueError:
            raise AnnotationError(f"{path}: <size><{tag}> {text!r} is not an integer") from None

    height, width = _image_size(size("height"), size("width"), img_height, img_width, path)
    groups = _Groups(datum)
    for number, obj in enumerate(root.findall("object"), 1):
        anno, difficult = None, False
        name = obj.findtext("name", default="?")
        where = f"{path}: object {number} ({name!r})"
        for child in obj:  # in document order: 'difficult' applies to a later 'bndbox', as in the fork
            if child.tag == "name":
                if child.text not in name_to_label:
                    raise AnnotationError(f"{where}: unknown name {child.text!r}, not in the label map")
                anno = groups.add(name_to_label[child.text])
            elif child.tag == "difficult":
                difficult = (child.text or "").strip() == "1"
            elif child.tag == "bndbox":
                if anno is None:
                    raise AnnotationError(f"{where}: <bndbox> comes before the object's <name>")
                coords = []
                for tag in ("xmin", "ymin", "xmax", "ymax"):
                    text = child.findtext(tag)
                    if text is None:
                        coords.append(0)  # the fork's default
                        continue
                    try:
                        coords.append(int(text.strip()))
                    except ValueError:
                        raise AnnotationError(f"{where}: <{tag}> {text!r} is not an integer pixel "
                                              "coordinate") from None
                _set_box(anno, *coords, width, height, difficult, path)


def read_coco_json(path: str, img_height: int, img_width: int, name_to_label: dict[str, int],
                   datum: caffe_pb2.AnnotatedDatum) -> None:
    """Add the objects of a per-image COCO-style JSON file (``image.height/width``, ``annotation``:
    a list of ``{category_id, bbox: [x, y, w, h], iscrowd}``), as ReadJSONToAnnotatedDatum."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: malformed JSON annotation ({e})") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read the annotation ({e.strerror})") from None
    image = doc.get("image", {}) if isinstance(doc, dict) else {}
    height, width = _image_size(image.get("height"), image.get("width"), img_height, img_width, path)
    objects = doc.get("annotation") if isinstance(doc, dict) else None
    if not isinstance(objects, list):
        raise AnnotationError(f"{path}: no 'annotation' list")
    groups = _Groups(datum)
    for number, obj in enumerate(objects, 1):
        name = str(obj.get("category_id")) if isinstance(obj, dict) else "?"
        where = f"{path}: object {number} (category_id {name!r})"
        if name not in name_to_label:
            raise AnnotationError(f"{where}: unknown name, not in the label map")
        box = obj.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise AnnotationError(f"{where}: 'bbox' must be [x, y, width, height]")
        anno = groups.add(name_to_label[name])
        x, y, w, h = (float(v) for v in box)
        _set_box(anno, x, y, x + w, y + h, width, height, bool(obj.get("iscrowd", 0)), path)


def read_box_txt(path: str, img_height: int, img_width: int, datum: caffe_pb2.AnnotatedDatum) -> None:
    """Add the boxes of a text file of ``label xmin ymin xmax ymax`` lines (ReadTxtToAnnotatedDatum)."""
    groups = _Groups(datum)
    with open(path) as f:
        words = f.read().split()
    for k in range(0, len(words) - len(words) % 5, 5):
        where = f"{path}: object {k // 5 + 1}"
        try:
            label = int(words[k])
            coords = [float(v) for v in words[k + 1:k + 5]]
        except ValueError:
            raise AnnotationError(f"{where}: expected 'label xmin ymin xmax ymax'") from None
        _set_box(groups.add(label), *coords, img_width, img_height, False, path)


def annotate(datum: caffe_pb2.AnnotatedDatum, label_file: str, label_type: str, img_height: int,
             img_width: int, name_to_label: dict[str, int]) -> None:
    """Fill ``datum``'s annotation groups from ``label_file``; a missing file means no objects."""
    del datum.annotation_group[:]
    datum.type = caffe_pb2.AnnotatedDatum.BBOX
    if not os.path.exists(label_file):
        return
    if label_type == "xml":
        read_voc_xml(label_file, img_height, img_width, name_to_label, datum)
    elif label_type == "json":
        read_coco_json(label_file, img_height, img_width, name_to_label, datum)
    elif label_type == "txt":
        read_box_txt(label_file, img_height, img_width, datum)
    else:
        raise AnnotationError(f"unknown label_type {label_type!r} (xml, json or txt)")


def ground_truth_rows(datum: caffe_pb2.AnnotatedDatum, item_id: int) -> list[list[float]]:
    """The rows ``[item, label, instance, xmin, ymin, xmax, ymax, difficult]`` that AnnotatedData
    writes to its label top for one image."""
    return [[float(item_id), float(g.group_label), float(a.instance_id), a.bbox.xmin, a.bbox.ymin,
             a.bbox.xmax, a.bbox.ymax, float(a.bbox.difficult)]
            for g in datum.annotation_group for a in g.annotation]
