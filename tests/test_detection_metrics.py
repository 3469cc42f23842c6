"""The SSD fork's detection test mode: average precision by hand, and a solver that logs
detection_eval as the fork does."""
import numpy as np
import pytest

from helpers import capture_log, write
from recaffe.detection_metrics import DetectionTally, average_precision

# five detections of one label by descending score: tp, fp, tp, tp, fp; three ground-truth boxes
TP = [(0.9, 1), (0.8, 0), (0.7, 1), (0.6, 1), (0.5, 0)]
FP = [(s, 1 - t) for s, t in TP]
# precision 1, 1/2, 2/3, 3/4, 3/5 at recall 1/3, 1/3, 2/3, 1, 1


def test_integral():
    assert average_precision(TP, FP, 3, "Integral") == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4)


def test_max_integral():
    # precision made monotone from the right: 1 up to recall 1/3, then 3/4 up to recall 1
    assert average_precision(TP, FP, 3, "MaxIntegral") == pytest.approx(1 / 3 * 1 + 2 / 3 * 3 / 4)


def test_11point():
    # max precision at recall >= t for t = 0, .1, ..., 1: 1 for t <= 1/3 (4 points), 3/4 after (7 points)
    assert average_precision(TP, FP, 3, "11point") == pytest.approx((4 * 1 + 7 * 0.75) / 11, rel=1e-6)


def test_no_detections_or_no_truth_is_zero():
    assert average_precision([], [], 3, "Integral") == 0.0
    assert average_precision(TP, FP, 0, "Integral") == 0.0
    with pytest.raises(ValueError, match="ap_version"):
        average_precision(TP, FP, 3, "VOC")


def test_tally_over_batches_and_labels():
    tally = DetectionTally()
    # batch 1: label 1 has 2 truths, label 2 has 1; batch 2 adds one label-1 truth
    tally.add([[-1, 1, 2, -1, -1], [-1, 2, 1, -1, -1], [0, 1, 0.9, 1, 0], [0, 1, 0.8, 0, 1],
               [0, 2, 0.4, 0, 0]])  # tp = fp = 0: a difficult box, skipped
    tally.add([[-1, 1, 1, -1, -1], [-1, 2, 0, -1, -1], [1, 1, 0.7, 1, 0], [1, 1, 0.6, 1, 0], [1, 1, 0.5, 0, 1]])
    assert tally.num_pos == {1: 3, 2: 1}
    # label 1 is the TP/FP list above; label 2 has no scored detection (a warning, AP counted as 0)
    assert tally.mean_ap("Integral") == pytest.approx(average_precision(TP, FP, 3, "Integral") / 2)


SOLVER_NET = """
layer { name: "det" type: "Input" top: "det" input_param { shape { dim: 1 dim: 1 dim: 3 dim: 7 } } }
layer { name: "gt" type: "Input" top: "gt" input_param { shape { dim: 1 dim: 1 dim: 2 dim: 8 } } }
layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 1 } } include { phase: TRAIN } }
layer { name: "loss" type: "Reduction" bottom: "p" top: "loss" include { phase: TRAIN } }
layer { name: "ev" type: "DetectionEvaluate" bottom: "det" bottom: "gt" top: "detection_eval"
  include { phase: TEST } detection_evaluate_param { num_classes: 3 background_label_id: 0 } }
layer { name: "s" type: "Silence" bottom: "det" bottom: "gt" include { phase: TRAIN } }
"""


def test_solver_logs_detection_eval(tmp_path):
    import caffe

    write(tmp_path, "net.prototxt", SOLVER_NET)
    path = write(tmp_path, "solver.prototxt", 'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" '
                 'max_iter: 1 test_iter: 1 test_interval: 1000 eval_type: "detection" ap_version: "Integral" '
                 f'snapshot_prefix: "{tmp_path}/s"')
    solver = caffe.get_solver(path)
    net = solver.test_nets[0]
    net.blobs["det"].data[...] = np.array([[0, 1, 0.9, 0.1, 0.1, 0.3, 0.3], [0, 1, 0.8, 0.6, 0.6, 0.7, 0.7],
                                           [0, 2, 0.7, 0.5, 0.5, 0.9, 0.9]]).reshape(1, 1, 3, 7)
    net.blobs["gt"].data[...] = np.array([[0, 1, 0, 0.1, 0.1, 0.3, 0.3, 0],
                                          [0, 2, 0, 0.5, 0.5, 0.9, 0.9, 0]]).reshape(1, 1, 2, 8)
    with capture_log() as lines:
        result = solver.test(0)
    assert result == {"detection_eval": pytest.approx(1.0)}  # both classes: AP 1 (the FP comes last)
    assert any(line.strip() == "Test net output #0: detection_eval = 1" for line in lines)


def test_bad_eval_settings(tmp_path):
    import caffe

    write(tmp_path, "net.prototxt", SOLVER_NET)
    for extra, message in [('eval_type: "segmentation"', "eval_type"),
                           ('eval_type: "detection" ap_version: "VOC"', "ap_version")]:
        path = write(tmp_path, "solver.prototxt", f'net: "net.prototxt" base_lr: 0.1 {extra}')
        with pytest.raises(ValueError, match=message):
            caffe.get_solver(path)
