"""The published deploy nets of the Faster R-CNN / R-FCN, ShuffleNet and YOLO forks
(../shared/reference/forks/models/, read in place): they build, run forward with random weights
(inputs reduced in memory, wide layers narrowed: Faster R-CNN's fc6/fc7, the convolutions of
R-FCN and the YOLOs, to keep the tests fast) and export where their layers export.

Types written by other fork branches are skipped while they are not registered: Faster R-CNN's
DetectionOutput (the SSD branch; the net then stops before it) and YOLOv3's Upsample (the
segmentation branch)."""
import sys
import textwrap

import numpy as np
import pytest
from conftest import require_reference
from test_export import check_exports

from recaffe.export import ExportError, build_graph
from recaffe.io.netfiles import read_net_text
from recaffe.layer import _REGISTRY, LayerError, layer_type_list
from recaffe.net import Net
from recaffe.proto import caffe_pb2


def registered(type_name: str) -> bool:
    layer_type_list()  # loads the built-in layers
    return type_name in _REGISTRY


def model_param(name: str, inputs: dict, narrow: dict | None = None) -> caffe_pb2.NetParameter:
    """The model's NetParameter (read in place, upgraded) with Input shapes replaced by ``inputs``
    and the num_output of the layers in ``narrow`` replaced."""
    param = read_net_text(require_reference("forks", "models", name))
    for lp in param.layer:
        if lp.type == "Input":
            for i, top in enumerate(lp.top):
                if top in inputs:
                    lp.input_param.shape[i].dim[:] = inputs[top]
        if narrow and lp.name in narrow:
            (lp.convolution_param if lp.type == "Convolution" else lp.inner_product_param).num_output = narrow[lp.name]
    return param


def narrowed(param: caffe_pb2.NetParameter, factor: int, keep=()) -> caffe_pb2.NetParameter:
    """Every Convolution with at least 64 outputs (but the ``keep`` ones and the last layer)
    narrowed by ``factor``: the nets stay consistent (a layer's inputs follow its bottom) and
    the tests stay fast."""
    last = param.layer[-1].name
    for lp in param.layer:
        p = lp.convolution_param
        if lp.type == "Convolution" and p.num_output >= 64 and lp.name not in keep and lp.name != last:
            p.num_output //= factor
    return param


def without_types(param: caffe_pb2.NetParameter, types) -> caffe_pb2.NetParameter:
    kept = [lp for lp in param.layer if lp.type not in types]
    del param.layer[:]
    param.layer.extend(kept)
    return param


def randomize(net: Net, seed: int = 0) -> None:
    """He-scaled random weights (activations stay O(1) through deep nets), unit BatchNorm
    statistics (variance 1, scale factor 1), Scale weights near 1."""
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if not layer.blobs:
            continue
        if layer.type == "BatchNorm":
            layer.blobs[0].data[...] = rng.standard_normal(layer.blobs[0].shape) * 0.1
            layer.blobs[1].data[...] = rng.uniform(0.5, 1.5, layer.blobs[1].shape)
            layer.blobs[2].data[...] = 1
            continue
        for i, blob in enumerate(layer.blobs):
            shape = blob.shape
            if layer.type == "Scale" and i == 0:
                blob.data[...] = rng.uniform(0.5, 1.0, shape)
            elif len(shape) > 1:
                fan_in = int(np.prod(shape[1:]))
                blob.data[...] = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            else:
                blob.data[...] = rng.standard_normal(shape) * 0.01


def feed(net: Net, seed: int = 1, **fixed) -> None:
    rng = np.random.default_rng(seed)
    for name in net.inputs:
        net.blobs[name].data[...] = fixed[name] if name in fixed else rng.standard_normal(net.blobs[name].shape)


# ------------------------------------------------------------------------------ Faster R-CNN
def test_faster_rcnn_zf_opencv_form():
    """Proposal + ROIPooling + Dropout(scale_train: false), then DetectionOutput where registered."""
    param = model_param("faster_rcnn_zf.prototxt", {"data": [1, 3, 160, 192]}, {"fc6": 64, "fc7": 64})
    has_detection_output = registered("DetectionOutput")
    if not has_detection_output:
        param = without_types(param, {"DetectionOutput"})
    net = Net(param, caffe_pb2.TEST)
    assert [lp.type for lp in net.layers if lp.name == "proposal"] == ["Proposal"]
    assert not net.layer_dict["drop6"].scale_train
    randomize(net)
    feed(net, im_info=np.array([[160, 192, 1.0]]))
    net.forward()
    rois = net.blobs["rois"].data
    n = rois.shape[0]
    assert 0 < n <= 300 and rois.shape == (n, 5) and (rois[:, 0] == 0).all()
    assert (rois[:, 1] >= 0).all() and (rois[:, 3] <= 191).all() and (rois[:, 4] <= 159).all()
    assert net.blobs["roi_pool_conv5"].data.shape == (n, 256, 6, 6)
    probs = net.blobs["cls_prob"].data
    assert probs.shape == (n, 21) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert net.blobs["bbox_pred_reshape"].data.shape == (1, n * 84)
    if has_detection_output:
        assert net.blobs["detection_out"].data.ndim == 4
    with pytest.raises(ExportError, match=r"Proposal layer 'proposal'.*not exportable.*depends on the data"):
        build_graph(net)


STAND_IN = '''
"""A stand-in for py-faster-rcnn's rpn.proposal_layer: the highest-scoring cells' anchors (no
deltas, no NMS), enough to drive the nets through a Python proposal layer."""
import ast

import numpy as np
import caffe


class ProposalLayer(caffe.Layer):
    def setup(self, bottom, top):
        self.feat_stride = ast.literal_eval("{" + self.param_str + "}")["feat_stride"]
        top[0].reshape(1, 5)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        scores = bottom[0].data[0, 9:].max(0)  # (H, W): the best anchor per cell
        h, w = np.unravel_index(np.argsort(-scores, axis=None)[:20], scores.shape)
        cx, cy = w * self.feat_stride + 7.5, h * self.feat_stride + 7.5
        im_h, im_w = bottom[2].data[0, :2]
        boxes = np.stack([np.zeros_like(cx), np.clip(cx - 40, 0, im_w - 1), np.clip(cy - 30, 0, im_h - 1),
                          np.clip(cx + 40, 0, im_w - 1), np.clip(cy + 30, 0, im_h - 1)], 1)
        top[0].reshape(*boxes.shape)
        top[0].data[...] = boxes

    def backward(self, top, propagate_down, bottom):
        pass
'''


@pytest.fixture
def rpn_module(tmp_path, monkeypatch):
    """``rpn.proposal_layer`` importable from a tmp dir, as a user's py-faster-rcnn lib/ would be."""
    package = tmp_path / "rpn"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "proposal_layer.py").write_text(textwrap.dedent(STAND_IN))
    for name in ("rpn", "rpn.proposal_layer"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("rpn", "rpn.proposal_layer"):
        sys.modules.pop(name, None)


def test_faster_rcnn_zf_python_proposal_layer(rpn_module):
    param = model_param("faster_rcnn_zf_pyfrcnn.prototxt", {"data": [1, 3, 128, 160]}, {"fc6": 64, "fc7": 64})
    net = Net(param, caffe_pb2.TEST)
    assert net.layer_dict["proposal"].type == "Python"
    randomize(net)
    feed(net, im_info=np.array([[128, 160, 1.0]]))
    net.forward()
    n = net.blobs["rois"].shape[0]
    assert net.blobs["roi_pool_conv5"].shape == (n, 256, 6, 6)
    assert net.blobs["cls_prob"].shape == (n, 21) and net.blobs["bbox_pred"].shape == (n, 84)


def test_python_proposal_layer_needs_the_users_module():
    param = model_param("faster_rcnn_zf_pyfrcnn.prototxt", {"data": [1, 3, 64, 64]})
    sys.modules.pop("rpn", None)
    with pytest.raises(LayerError, match=r"Python layer 'proposal': cannot import module 'rpn.proposal_layer'"):
        Net(param, caffe_pb2.TEST)


def test_rfcn_resnet50_python_proposal_and_psroi_pooling(rpn_module):
    param = narrowed(model_param("rfcn_resnet50.prototxt", {"data": [1, 3, 96, 128]}), 4,
                     keep={"rfcn_cls", "rfcn_bbox", "rpn_cls_score", "rpn_bbox_pred"})
    net = Net(param, caffe_pb2.TEST)
    assert [lp.type for lp in net.layers if lp.type == "PSROIPooling"] == ["PSROIPooling"] * 2
    randomize(net)
    feed(net, data=np.random.default_rng(2).standard_normal((1, 3, 96, 128)), im_info=np.array([[96, 128, 1.0]]))
    net.forward()
    n = net.blobs["rois"].shape[0]
    assert net.blobs["psroipooled_cls_rois"].shape == (n, 21, 7, 7)
    assert net.blobs["psroipooled_loc_rois"].shape == (n, 8, 7, 7)
    probs = net.blobs["cls_prob"].data.reshape(n, -1)
    assert probs.shape == (n, 21) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.isfinite(net.blobs["bbox_pred"].data).all()


# ------------------------------------------------------------------------------ mobile / YOLO
def test_shufflenet_g3_forward_and_export(tmp_path):
    net = Net(model_param("shufflenet_g3.prototxt", {"data": [1, 3, 32, 32]}), caffe_pb2.TEST)
    types = {layer.type for layer in net.layers}
    assert {"ShuffleChannel", "ConvolutionDepthwise"} <= types
    randomize(net)
    check_exports(net, tmp_path, rtol=1e-4, atol=1e-4)
    assert net.blobs["fc1000"].shape == (1, 1000, 1, 1)


def test_yolov2_tiny_forward_and_export(tmp_path):
    net = Net(narrowed(model_param("yolov2_tiny.prototxt", {"data": [1, 3, 96, 96]}), 4), caffe_pb2.TEST)
    randomize(net)
    check_exports(net, tmp_path, rtol=1e-4, atol=1e-4)
    out = net.outputs[0]
    assert net.blobs[out].shape[1] == 125


def test_yolov2_reorg_forward_and_export(tmp_path):
    net = Net(narrowed(model_param("yolov2.prototxt", {"data": [1, 3, 64, 64]}), 8), caffe_pb2.TEST)
    assert "Reorg" in {layer.type for layer in net.layers}
    randomize(net)
    check_exports(net, tmp_path, rtol=1e-4, atol=1e-4)
    assert net.blobs[net.outputs[0]].shape == (1, 70, 2, 2)


def test_yolov3_upsample():
    if not registered("Upsample"):
        pytest.skip("Upsample (the segmentation branch's layer) is not registered yet")
    net = Net(narrowed(model_param("yolov3.prototxt", {"data": [1, 3, 64, 64]}), 8), caffe_pb2.TEST)
    randomize(net)
    feed(net)
    out = net.forward()
    assert all(np.isfinite(v).all() for v in out.values())


def test_region_after_a_yolo_head(tmp_path):
    """The ports append Region to the head: tiny-yolo's 125 channels = 5 anchors x (4 + 1 + 20)."""
    param = narrowed(model_param("yolov2_tiny.prototxt", {"data": [1, 3, 64, 64]}), 8)
    head = param.layer[-1].top[0]
    region = param.layer.add()
    region.CopyFrom(caffe_pb2.LayerParameter(name="region", type="Region", bottom=[head], top=["region"]))
    region.region_param.classes, region.region_param.boxes_of_each_grid = 20, 5
    region.region_param.softmax = True
    net = Net(param, caffe_pb2.TEST)
    randomize(net)
    check_exports(net, tmp_path, rtol=1e-4, atol=1e-5)
    y = net.blobs["region"].data.reshape(1, -1, 5, 25)
    np.testing.assert_allclose(y[..., 5:].sum(-1), 1, rtol=1e-5)
    assert ((y[..., 4] > 0) & (y[..., 4] < 1)).all()
