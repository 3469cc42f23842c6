"""examples/ssd at a tiny scale: make_shapes -> convert_annoset -> the NetSpec nets -> a few training
steps and a detection test (the full run is the example itself, not a unit test)."""
import importlib.util
import pathlib

import numpy as np

import caffe
from recaffe.data.annoset import convert_annoset

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "ssd"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ssd_shapes_pipeline_trains_and_tests(tmp_path):
    shapes, nets = load("make_shapes"), load("make_nets")
    shapes.main([str(tmp_path / "shapes"), "--train", "8", "--test", "4"])
    for split in ("trainval", "test"):
        convert_annoset(str(tmp_path / "shapes") + "/", str(tmp_path / "shapes" / f"{split}.txt"),
                        str(tmp_path / f"shapes_{split}_lmdb"), anno_type="detection",
                        label_map_file=str(tmp_path / "shapes" / "labelmap.prototxt"), encoded=True,
                        encode_type="png")
    text = nets.train_test_net().replace("examples/ssd/", f"{tmp_path}/").replace("batch_size: 16", "batch_size: 4")
    (tmp_path / "net.prototxt").write_text(text.replace("batch_size: 10", "batch_size: 4"))
    (tmp_path / "deploy.prototxt").write_text(nets.deploy_net())
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path}/net.prototxt" type: "Adam" base_lr: 0.001 lr_policy: "fixed" max_iter: 3 '
        f'test_iter: 1 test_interval: 1000 eval_type: "detection" snapshot_prefix: "{tmp_path}/s" random_seed: 1')
    solver = caffe.get_solver(str(tmp_path / "solver.prototxt"))
    solver.step(3)
    assert np.isfinite(solver.net.blobs["mbox_loss"].data).all()
    result = solver.test(0)
    assert set(result) == {"detection_eval"} and 0.0 <= result["detection_eval"] <= 1.0
    # the deploy net takes the trained weights and emits DetectionOutput rows
    solver.net.save(str(tmp_path / "w.caffemodel"))
    net = caffe.Net(str(tmp_path / "deploy.prototxt"), caffe.TEST, weights=str(tmp_path / "w.caffemodel"))
    assert net.forward()["detection_out"].shape[-1] == 7
