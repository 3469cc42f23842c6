"""convert_annoset / get_image_size (SSD fork tools) and the annotation readers: round trips through
an LMDB, the fork's grouping and instance ids, and errors that name the file and the object."""
import json

import numpy as np
import pytest
from PIL import Image

from recaffe.cli import convert_annoset as convert_cli
from recaffe.cli import get_image_size as size_cli
from recaffe.data.annoset import convert_annoset, scale_for_dims
from recaffe.data.annotations import (
    AnnotationError,
    ground_truth_rows,
    label_map_from_label_file,
    map_name_to_label,
    read_label_map,
)
from recaffe.data.db import open_db
from recaffe.proto import caffe_pb2

LABELMAP = """
item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "cat" label: 1 display_name: "Cat" }
item { name: "dog" label: 2 display_name: "Dog" }
"""


def voc(objects, width=40, height=20):
    parts = [f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
                     f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
                     "</bndbox></object>")
    return "".join(parts) + "</annotation>"


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(root / f"im{k}.png")
    (root / "im0.xml").write_text(voc([("cat", (4, 2, 20, 10), 0), ("dog", (0, 0, 40, 20), 1),
                                       ("cat", (10, 10, 30, 20), 0)]))
    (root / "im1.xml").write_text(voc([("dog", (8, 4, 16, 8), 0)]))
    # im2 has no annotation file: an image without objects
    (tmp_path / "list.txt").write_text("im0.png im0.xml\nim1.png im1.xml\nim2.png im2.xml\n")
    (tmp_path / "labelmap.prototxt").write_text(LABELMAP)
    return tmp_path


def read_db(path):
    db = open_db("lmdb", str(path))
    try:
        out = []
        for key, value in db.new_cursor():
            d = caffe_pb2.AnnotatedDatum()
            d.ParseFromString(value)
            out.append((key, d))
        return out
    finally:
        db.close()


def test_voc_round_trip_through_lmdb(dataset):
    n = convert_annoset(str(dataset / "data") + "/", str(dataset / "list.txt"), str(dataset / "db"),
                        anno_type="detection", label_map_file=str(dataset / "labelmap.prototxt"))
    assert n == 3
    records = read_db(dataset / "db")
    assert [k for k, _ in records] == [b"00000000_im0.png", b"00000001_im1.png", b"00000002_im2.png"]
    d0 = records[0][1]
    assert d0.type == caffe_pb2.AnnotatedDatum.BBOX
    assert (d0.datum.channels, d0.datum.height, d0.datum.width) == (3, 20, 40)
    assert d0.datum.label == -1
    rows = ground_truth_rows(d0, 0)
    # groups in first-seen order (cat, dog), instance ids counting within a group
    np.testing.assert_allclose(rows, [[0, 1, 0, 4 / 40, 2 / 20, 20 / 40, 10 / 20, 0],
                                      [0, 1, 1, 10 / 40, 10 / 20, 30 / 40, 20 / 20, 0],
                                      [0, 2, 0, 0, 0, 1, 1, 1]], rtol=1e-6)
    np.testing.assert_allclose(ground_truth_rows(records[1][1], 1), [[1, 2, 0, 0.2, 0.2, 0.4, 0.4, 0]],
                               rtol=1e-6)
    assert len(records[2][1].annotation_group) == 0  # no annotation file: no objects
    # the pixels are the image's (BGR, CHW)
    img = np.asarray(Image.open(dataset / "data" / "im0.png"))
    chw = np.frombuffer(d0.datum.data, np.uint8).reshape(3, 20, 40)
    np.testing.assert_array_equal(chw, img[..., ::-1].transpose(2, 0, 1))


def test_coco_json_and_txt_annotations(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(root / "a.jpg")
    (root / "a.json").write_text(json.dumps({"image": {"height": 10, "width": 20}, "annotation": [
        {"category_id": 2, "bbox": [2, 1, 8, 4], "iscrowd": 1}]}))
    (root / "a.txt").write_text("3 2 2 10 5\n")
    (tmp_path / "list.txt").write_text("a.jpg a.json\n")
    (tmp_path / "lm.prototxt").write_text('item { name: "2" label: 7 }')
    convert_annoset(str(root) + "/", str(tmp_path / "list.txt"), str(tmp_path / "j"), anno_type="detection",
                    label_type="json", label_map_file=str(tmp_path / "lm.prototxt"), encoded=True)
    (_, d), = read_db(tmp_path / "j")
    assert d.datum.encoded and d.datum.data[:2] == b"\xff\xd8"  # the JPEG file itself
    np.testing.assert_allclose(ground_truth_rows(d, 0), [[0, 7, 0, 0.1, 0.1, 0.5, 0.5, 1]], rtol=1e-6)
    (tmp_path / "list.txt").write_text("a.jpg a.txt\n")
    convert_annoset(str(root) + "/", str(tmp_path / "list.txt"), str(tmp_path / "t"), anno_type="detection",
                    label_type="txt", label_map_file=str(tmp_path / "lm.prototxt"))
    (_, d), = read_db(tmp_path / "t")
    np.testing.assert_allclose(ground_truth_rows(d, 0), [[0, 3, 0, 0.1, 0.2, 0.5, 0.5, 0]], rtol=1e-6)


def test_unknown_label_names_file_and_object(dataset):
    (dataset / "data" / "im1.xml").write_text(voc([("dog", (1, 1, 5, 5), 0), ("horse", (1, 1, 5, 5), 0)]))
    with pytest.raises(AnnotationError, match=r"im1\.xml: object 2 \('horse'\).*not in the label map.*line 2"):
        convert_annoset(str(dataset / "data") + "/", str(dataset / "list.txt"), str(dataset / "db"),
                        anno_type="detection", label_map_file=str(dataset / "labelmap.prototxt"))


@pytest.mark.parametrize("xml, message", [
    ("<annotation><object><name>cat", "malformed XML"),
    ("<annotation><size><width>40</width><height>20</height></size><object><bndbox><xmin>1</xmin>"
     "</bndbox><name>cat</name></object></annotation>", "before the object's <name>"),
    ("<annotation><size><width>40</width><height>20</height></size><object><name>cat</name><bndbox>"
     "<xmin>1.5</xmin></bndbox></object></annotation>", "not an integer"),
])
def test_malformed_xml(dataset, xml, message):
    (dataset / "data" / "im0.xml").write_text(xml)
    with pytest.raises(AnnotationError, match=message) as e:
        convert_annoset(str(dataset / "data") + "/", str(dataset / "list.txt"), str(dataset / "db"),
                        anno_type="detection", label_map_file=str(dataset / "labelmap.prototxt"))
    assert "im0.xml" in str(e.value)


def test_cli_and_get_image_size(dataset, capsys):
    rc = convert_cli.main(["--anno_type=detection", f"--label_map_file={dataset / 'labelmap.prototxt'}",
                           "--min_dim=30", str(dataset / "data") + "/", str(dataset / "list.txt"),
                           str(dataset / "cli_db")])
    assert rc == 0
    d = read_db(dataset / "cli_db")[0][1]
    assert (d.datum.height, d.datum.width) == (30, 60)  # shorter side scaled up to min_dim
    assert ground_truth_rows(d, 0)[0][3] == pytest.approx(0.1)  # boxes stay normalized
    assert size_cli.main([str(dataset / "data"), str(dataset / "list.txt"), str(dataset / "sizes.txt")]) == 0
    assert (dataset / "sizes.txt").read_text() == "im0 20 40\nim1 20 40\nim2 20 40\n"
    rc = convert_cli.main(["--anno_type=detection", str(dataset / "data") + "/", str(dataset / "list.txt"),
                           str(dataset / "x")])
    assert rc == 1 and "label_map_file" in capsys.readouterr().err


def test_scale_for_dims():
    assert scale_for_dims(20, 40, 30, 0) == pytest.approx(1.5)
    assert scale_for_dims(20, 40, 30, 50) == pytest.approx(50 / 40)  # max_dim wins
    assert scale_for_dims(20, 40, 10, 0) == 1.0


def test_label_maps(tmp_path):
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    lm = label_map_from_label_file(str(tmp_path / "names.txt"))
    assert [(i.name, i.label, i.display_name) for i in lm.item] == [
        ("none_of_the_above", 0, "background"), ("cat", 1, "cat"), ("dog", 2, "dog")]
    (tmp_path / "dup.prototxt").write_text('item { name: "a" label: 1 } item { name: "a" label: 2 }')
    lm = read_label_map(tmp_path / "dup.prototxt")
    assert map_name_to_label(lm) == {"a": 2}
    with pytest.raises(AnnotationError, match="duplicates of name"):
        map_name_to_label(lm, strict=True)
    (tmp_path / "bad.prototxt").write_text("item { nam: 1 }")
    with pytest.raises(AnnotationError, match=r"bad\.prototxt:1"):
        read_label_map(tmp_path / "bad.prototxt")
