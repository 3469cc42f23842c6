"""A test-only cross-check: OpenCV 4's Caffe importer (the last OpenCV line that has one) runs the
same SSD deploy nets with the same random weights, and its DetectionOutput rows equal ours as sets
(OpenCV orders rows by score and pads with zeros; recaffe keeps the fork's order). The forks' own
reference cases (test_reference_cases.test_fork_case) remain the spec; this checks whole nets."""
import os

import numpy as np
import pytest

import caffe
from conftest import require_reference

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless (the test extra) is not installed")


def random_weights(net, rng):
    for name, blobs in net.params.items():
        for b in blobs:
            fan_in = max(1, int(np.prod(b.data.shape[1:])))
            # 1-D blobs (biases, BatchNorm statistics, Scale factors) positive: variances must be
            b.data[...] = (rng.normal(0, np.sqrt(2.0 / fan_in), b.data.shape) if b.data.ndim > 1
                           else np.abs(rng.normal(0, 0.1, b.data.shape)) + 0.5)
        if "mbox_conf" in name and len(blobs) > 1:
            blobs[1].data[...] = rng.normal(0, 1.2, blobs[1].data.shape)  # confident, untied scores


def rows_as_set(rows):
    r = np.asarray(rows).reshape(-1, 7)
    r = r[r[:, 2] > 0]  # OpenCV pads with zero rows
    key = r.copy()
    key[:, 2] = np.round(key[:, 2], 4)  # scores equal to float rounding: order them by their boxes
    return r[np.lexsort(tuple(key[:, c] for c in (6, 5, 4, 3, 2, 1, 0)))]


@pytest.mark.parametrize("model", ["mobilenet_ssd", "res10_face_ssd", "ssd300_vgg"])
def test_detections_match_opencv(model, tmp_path):
    if model == "ssd300_vgg" and not os.environ.get("RECAFFE_SLOW"):
        pytest.skip("about 10 s; set RECAFFE_SLOW=1")
    proto = str(require_reference("forks", "models", f"{model}.prototxt"))
    net = caffe.Net(proto, caffe.TEST)
    rng = np.random.default_rng(0)
    random_weights(net, rng)
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    x = rng.uniform(-1, 1, net.blobs[net.inputs[0]].data.shape).astype(np.float32)
    net.blobs[net.inputs[0]].data[...] = x
    ours = rows_as_set(net.forward()["detection_out"])
    cv = cv2.dnn.readNetFromCaffe(proto, weights)
    cv.setInput(x)
    theirs = rows_as_set(cv.forward("detection_out"))
    assert len(ours) > 10 and ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-4)  # the reference cases' tolerance


@pytest.mark.parametrize("model", ["shufflenet_g3", "yolov2_tiny", "yolov2"])
def test_mobile_and_yolo_nets_match_opencv(model, tmp_path):
    """ShuffleChannel, ConvolutionDepthwise (ShuffleNet) and Reorg (YOLOv2) through whole nets."""
    proto = str(require_reference("forks", "models", f"{model}.prototxt"))
    net = caffe.Net(proto, caffe.TEST)
    rng = np.random.default_rng(0)
    random_weights(net, rng)
    weights = str(tmp_path / "w.caffemodel")
    net.save(weights)
    x = rng.uniform(-1, 1, net.blobs[net.inputs[0]].data.shape).astype(np.float32)
    net.blobs[net.inputs[0]].data[...] = x
    ours = net.forward()
    cv = cv2.dnn.readNetFromCaffe(proto, weights)
    cv.setInput(x)
    for name, theirs in zip(ours, cv.forward(list(ours))):
        np.testing.assert_allclose(ours[name].reshape(theirs.shape), theirs, atol=1e-5, rtol=1e-4, err_msg=name)
