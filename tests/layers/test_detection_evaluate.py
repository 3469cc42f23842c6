"""DetectionEvaluate (SSD fork): true/false positives on crafted detections, pixel mode, errors."""
import numpy as np
import pytest

from recaffe.gradient_check import forward_layer
from recaffe.layer import LayerError

LAYER = 'type: "DetectionEvaluate" detection_evaluate_param { num_classes: 3 %s }'


def blob(rows, width):
    return np.array(rows, dtype=float).reshape(1, 1, -1, width)


GT = blob([[0, 1, 0, 0.1, 0.1, 0.4, 0.4, 0], [0, 1, 1, 0.6, 0.6, 0.9, 0.9, 1],
           [1, 2, 0, 0.2, 0.2, 0.5, 0.5, 0]], 8)


def test_true_and_false_positives_by_descending_score():
    det = blob([[0, 1, 0.5, 0.1, 0.1, 0.4, 0.41],   # duplicate of the next one, lower score
                [0, 1, 0.9, 0.1, 0.1, 0.4, 0.4],    # true positive
                [0, 2, 0.8, 0.1, 0.1, 0.4, 0.4],    # no class-2 truth in image 0
                [1, 2, 0.7, 0.7, 0.7, 0.9, 0.9],    # misplaced
                [2, 1, 0.6, 0.1, 0.1, 0.4, 0.4]], 7)  # an image without truth
    (out,) = forward_layer(LAYER % "", [det, GT])
    want = [[-1, 1, 2, -1, -1], [-1, 2, 1, -1, -1],
            [0, 1, 0.9, 1, 0], [0, 1, 0.5, 0, 1],
            [0, 2, 0.8, 0, 1], [1, 2, 0.7, 0, 1], [2, 1, 0.6, 0, 1]]
    np.testing.assert_allclose(out.reshape(-1, 5), want, rtol=1e-6)


def test_difficult_truth_is_neither_when_not_evaluated():
    det = blob([[0, 1, 0.9, 0.6, 0.6, 0.9, 0.9]], 7)
    (out,) = forward_layer(LAYER % "evaluate_difficult_gt: false", [det, GT])
    rows = out.reshape(-1, 5)
    assert rows[0].tolist() == [-1, 1, 1, -1, -1]  # one non-difficult class-1 box
    np.testing.assert_allclose(rows[2], [0, 1, 0.9, 0, 0], rtol=1e-6)


def test_pixel_mode_from_name_size_file(tmp_path):
    sizes = tmp_path / "sizes.txt"
    sizes.write_text("a 10 10\n")
    # in pixels (x10) these boxes overlap by IoU (3*3)/(4*4 + 4*4 - 9) = 9/23 with +1 areas;
    # normalized they would overlap 4/16+... : the threshold 0.35 tells the two apart
    gt = blob([[0, 1, 0, 0.1, 0.1, 0.4, 0.4, 0]], 8)
    det = blob([[0, 1, 0.9, 0.2, 0.2, 0.5, 0.5]], 7)
    layer = LAYER % f'overlap_threshold: 0.35 name_size_file: "{sizes}"'
    (pix,) = forward_layer(layer, [det, gt])
    (norm,) = forward_layer(LAYER % "overlap_threshold: 0.35", [det, gt])
    assert pix.reshape(-1, 5)[2, 3:].tolist() == [1, 0]   # 9/23 = 0.39
    assert norm.reshape(-1, 5)[2, 3:].tolist() == [0, 1]  # (0.2*0.2)/(0.09+0.09-0.04) = 0.29


def test_errors(tmp_path):
    with pytest.raises(LayerError, match="num_classes"):
        forward_layer('type: "DetectionEvaluate"', [blob([[0] * 7], 7), GT])
    with pytest.raises(LayerError, match=r"\[1, 1, D, 7\]"):
        forward_layer(LAYER % "", [np.zeros((1, 1, 2, 6)), GT])
    with pytest.raises(LayerError, match="background"):
        forward_layer(LAYER % "", [blob([[0, 0, 0.5, 0, 0, 1, 1]], 7), GT])
    with pytest.raises(LayerError, match="name_size_file"):
        forward_layer(LAYER % f'name_size_file: "{tmp_path}/missing.txt"', [blob([[0, 1, 0.5, 0, 0, 1, 1]], 7), GT])
