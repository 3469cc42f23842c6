"""examples/faster_rcnn: a Faster R-CNN whose data, anchor-target and proposal-target layers are
Python layers (the user's code, as in py-faster-rcnn) trains end to end with the built-in Proposal,
ROIPooling and SmoothL1Loss: the RPN's classification loss falls and every loss stays finite."""
import pathlib
import sys

import numpy as np

import caffe

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "faster_rcnn"


def test_faster_rcnn_with_python_layers_trains(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.chdir(EXAMPLE.parent.parent)
    text = (EXAMPLE / "solver.prototxt").read_text().replace("max_iter: 300", "max_iter: 40")
    text = text.replace('snapshot_prefix: "examples/faster_rcnn/faster_rcnn_shapes"',
                        f'snapshot_prefix: "{tmp_path}/frcnn"')
    (tmp_path / "solver.prototxt").write_text(text)
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    names = ["rpn_cls_loss", "rpn_loss_bbox", "loss_cls", "loss_bbox"]
    history = []
    for _ in range(40):
        solver.step(1)
        history.append([float(solver.net.blobs[n].data) for n in names])
    h = np.array(history)
    assert np.isfinite(h).all()
    assert h[-10:, 0].mean() < 0.5 * h[:3, 0].mean()  # the RPN learns objectness
    assert solver.net.blobs["rois"].data.shape[1] == 5 and solver.net.blobs["labels"].data.size > 0
    sys.modules.pop("rcnn_layers", None)
