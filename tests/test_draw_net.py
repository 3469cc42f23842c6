"""Net drawing (pycaffe's caffe.draw and python/draw_net.py): pycaffe's labels, shapes and colours
in the DOT graph, the phase filter, PNG/SVG through graphviz and through the matplotlib fallback."""
import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from conftest import require_reference
from helpers import capture_log, net_param, write
from recaffe import draw
from recaffe.cli import main as cli_main
from recaffe.io.netfiles import read_net_text
from recaffe.proto import caffe_pb2

NET = """name: "drawme"
layer { name: "train_data" type: "DummyData" top: "data" top: "label" include { phase: TRAIN }
  dummy_data_param { shape { dim: 2 dim: 1 dim: 8 dim: 8 } shape { dim: 2 } } }
layer { name: "test_data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "nowhere_lmdb" batch_size: 7 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" exclude { phase: TRAIN } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""
# pycaffe's node labels, written out by hand (LR joins the words with a DOT "\n")
LR_LABELS = {
    "train_data": r'"train_data\n(DummyData)"',
    "test_data": r'"test_data\n(Data)"',
    "conv": r'"conv\n(Convolution)\nkernel size: 3\nstride: 2\npad: 1"',
    "relu": r'"relu\n(ReLU)"',
    "pool": r'"pool\n(Pooling AVE)\nkernel size: 2\nstride: 2\npad: 0"',
    "fc": r'"fc\n(InnerProduct)"',
    "acc": r'"acc\n(Accuracy)"',
    "loss": r'"loss\n(SoftmaxWithLoss)"',
}
COLOURS = {"train_data": "#6495ED", "test_data": "#6495ED", "conv": "#FF5050", "relu": "#90EE90",
           "pool": "#FF9900", "fc": "#CC33FF", "acc": "#6495ED", "loss": "#6495ED"}
BLOBS = ["data", "label", "conv", "pool", "fc", "acc", "loss"]


def strip(value):
    return value.strip('"') if isinstance(value, str) else value


def test_nodes_have_pycaffe_labels_shapes_and_colours():
    graph = draw.get_pydot_graph(net_param(NET), "LR")
    assert graph.get_name() == "drawme" and strip(graph.get("rankdir")) == "LR"
    text = graph.to_string()
    for layer, label in LR_LABELS.items():
        (node,) = graph.get_node(label)
        assert node.get("shape") == "record" and strip(node.get("fillcolor")) == COLOURS[layer]
        assert label in text
    for blob in BLOBS:
        assert graph.get_node(blob), blob
    # blobs last used as a bottom are grey octagons; pure outputs keep graphviz's default shape
    for blob in ["data", "label", "conv", "pool", "fc"]:
        (node,) = graph.get_node(blob)
        assert node.get("shape") == "octagon" and strip(node.get("fillcolor")) == "#E0E0E0"
    assert graph.get_node("loss")[0].get("shape") is None
    edges = {(e.get_source(), e.get_destination()): strip(e.get_label()) for e in graph.get_edges()}
    assert edges[(LR_LABELS["test_data"], "data")] == "Batch 7"
    assert edges[(LR_LABELS["conv"], "conv")] == "4"
    assert edges[(LR_LABELS["fc"], "fc")] == "3"
    assert edges[("conv", LR_LABELS["relu"])] == "" and edges[(LR_LABELS["relu"], "conv")] == ""
    assert len(graph.get_edges()) == 2 + 2 + 2 + 2 + 2 + 2 + 3 + 3

    no_edge_labels = draw.get_pydot_graph(net_param(NET), "LR", label_edges=False)
    assert {strip(e.get_label()) for e in no_edge_labels.get_edges()} == {""}


def test_vertical_labels_and_learning_rate_multipliers():
    graph = draw.get_pydot_graph(net_param(NET), "TB", display_lrm=True)
    text = graph.to_string()
    assert '"conv (Convolution) kernel size: 3 stride: 2 pad: 1 lr mult: 1.0, 2.0"' in text
    assert '"fc (InnerProduct) lr mult: 1.0, 1.0"' in text  # unset lr_mult defaults to 1
    assert '"pool (Pooling AVE) kernel size: 2 stride: 2 pad: 0"' in text
    frozen = net_param('layer { name: "f" type: "InnerProduct" bottom: "x" top: "y" param { lr_mult: 0 } '
                       'param { lr_mult: 0 } inner_product_param { num_output: 1 } }')
    assert '"f (InnerProduct)"' in draw.get_pydot_graph(frozen, "BT", display_lrm=True).to_string()
    assert draw.get_layer_lr_mult(net_param(NET).layer[2]) == (1.0, 2.0)
    with pytest.raises(ValueError, match="Pooling layers do not have a learning rate multiplier"):
        draw.get_layer_lr_mult(net_param(NET).layer[4])


def test_phase_filter():
    def layers(phase):
        graph = draw.get_pydot_graph(net_param(NET), "LR", phase=phase)
        return {name for name, label in LR_LABELS.items() if graph.get_node(label)}

    assert layers(None) == set(LR_LABELS)
    assert layers(caffe_pb2.TRAIN) == set(LR_LABELS) - {"test_data", "acc"}
    assert layers(caffe_pb2.TEST) == set(LR_LABELS) - {"train_data"}
    both = net_param('layer { name: "b" type: "ReLU" bottom: "x" top: "x" include { phase: TEST } '
                     'exclude { phase: TRAIN } }')
    with pytest.raises(ValueError, match="layer b has both include and exclude"):
        draw.get_pydot_graph(both, "LR", phase=caffe_pb2.TEST)


def test_reference_lenet_graph_names_every_layer_and_blob():
    path = require_reference("lenet", "lenet_train_test.prototxt")
    text = path.read_text()
    names = re.findall(r'name: "([^"]+)"\s+type: "([^"]+)"', text)
    blobs = set(re.findall(r'(?:top|bottom): "([^"]+)"', text))
    dot = draw.get_pydot_graph(read_net_text(path), "LR").to_string()
    assert len(names) == 11  # two mnist Data layers (TRAIN and TEST) share one node
    for name, layer_type in names:
        assert re.search(r'"%s\\n\(%s' % (re.escape(name), layer_type), dot), name
    for blob in blobs:
        assert re.search(r"(^|\s)%s \[" % re.escape(blob), dot, re.M), blob


def _png(data_or_path):
    with Image.open(data_or_path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _has_colour(pixels, hex_colour, at_least=50):
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return int((pixels == rgb).all(-1).sum()) >= at_least


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_png_and_svg_through_graphviz(tmp_path):
    out = tmp_path / "net.png"
    with capture_log() as lines:
        draw.draw_net_to_file(net_param(NET), str(out), "TB")
    assert any("with graphviz" in line for line in lines)
    pixels = _png(out)
    assert pixels.shape[0] > pixels.shape[1] > 50  # TB: taller than wide
    assert _has_colour(pixels, COLOURS["conv"]) and _has_colour(pixels, COLOURS["relu"])
    svg = draw.draw_net(net_param(NET), "LR", ext="svg")
    assert ET.fromstring(svg).tag.endswith("svg")
    laid_out = draw.draw_net(net_param(NET), "LR", ext="dot").decode()
    assert laid_out.startswith("digraph drawme") and "pos=" in laid_out  # dot's layout, as pycaffe


@pytest.fixture
def no_dot(monkeypatch):
    monkeypatch.setattr(draw, "find_dot", lambda: None)


def test_fallback_renderer_without_dot(no_dot, tmp_path):
    lr, tb = tmp_path / "lr.png", tmp_path / "tb.png"
    with capture_log() as lines:
        draw.draw_net_to_file(net_param(NET), str(lr), "LR")
    assert any("with matplotlib" in line for line in lines)
    draw.draw_net_to_file(net_param(NET), str(tb), "TB", phase=caffe_pb2.TEST)
    wide, tall = _png(lr), _png(tb)
    assert wide.shape[1] > wide.shape[0] and tall.shape[0] > tall.shape[1]
    for pixels in (wide, tall):
        for colour in ("#FF5050", "#90EE90", "#FF9900", "#CC33FF", "#6495ED", "#E0E0E0"):
            assert _has_colour(pixels, colour), colour
        assert pixels.std() > 20

    svg = draw.draw_net(net_param(NET), "BT", ext="svg")
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert b"SoftmaxWithLoss" in svg or b"glyph" in svg  # text is drawn (as text or glyph paths)

    # without dot, .dot/.gv files hold pydot's DOT text
    dot_file = tmp_path / "net.gv"
    draw.draw_net_to_file(net_param(NET), str(dot_file), "LR")
    assert dot_file.read_text() == draw.get_pydot_graph(net_param(NET), "LR").to_string()


def test_fallback_can_be_forced_where_dot_exists(tmp_path):
    data = draw.draw_net(net_param(NET), "RL", ext="png", renderer="matplotlib")
    import io
    pixels = _png(io.BytesIO(data))
    assert _has_colour(pixels, COLOURS["fc"])


def test_draw_errors(no_dot, tmp_path):
    with pytest.raises(draw.DrawError, match="rankdir must be one of LR, TB, BT, RL, got 'XY'"):
        draw.get_pydot_graph(net_param(NET), "XY")
    with pytest.raises(draw.DrawError, match="'dot' program was not found"):
        draw.draw_net(net_param(NET), "LR", renderer="dot")
    with pytest.raises(draw.DrawError, match="cannot draw format 'xyz' without graphviz"):
        draw.draw_net_to_file(net_param(NET), str(tmp_path / "net.xyz"))
    assert not (tmp_path / "net.xyz").exists()
    with pytest.raises(draw.DrawError, match="no file extension"):
        draw.draw_net_to_file(net_param(NET), str(tmp_path / "net"))


def test_caffe_draw_is_pycaffe_module():
    import caffe.draw

    assert caffe.draw.get_pydot_graph is draw.get_pydot_graph
    assert caffe.draw.draw_net_to_file is draw.draw_net_to_file
    assert caffe.draw.draw_net is draw.draw_net


def test_draw_net_cli(no_dot, tmp_path, capsys):
    proto = write(tmp_path, "net.prototxt", NET)
    out = tmp_path / "net.dot"
    assert cli_main.main(["draw_net", proto, str(out), "--phase", "TRAIN", "--rankdir", "TB",
                          "--display_lrm"]) == 0
    assert f"Drawing net to {out}" in capsys.readouterr().out
    text = out.read_text()
    assert "rankdir=TB" in text and "lr mult: 1.0, 2.0" in text
    assert "test_data" not in text and "acc (Accuracy)" not in text
    png = tmp_path / "net.png"
    assert cli_main.main(["draw_net", proto, str(png)]) == 0
    _png(png)

    assert cli_main.main(["draw_net", proto, str(png), "--rankdir", "sideways"]) == 1
    assert "--rankdir must be one of LR, TB, BT, RL" in capsys.readouterr().err
    assert cli_main.main(["draw_net", proto, str(png), "--phase", "VAL"]) == 1
    assert "Unknown phase: VAL" in capsys.readouterr().err
    assert cli_main.main(["draw_net", str(tmp_path / "missing.prototxt"), str(png)]) == 1
    assert "missing.prototxt" in capsys.readouterr().err
