"""Run the trained shapes SSD on test images, export it to ONNX, and check that onnxruntime finds
the same detections. Run after train_ssd_shapes.sh, from the repository root:

    python examples/ssd/detect_and_export.py [--weights examples/ssd/ssd_shapes_iter_600.caffemodel]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
from PIL import Image

import caffe

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = {1: "circle", 2: "square", 3: "triangle"}
MEAN = np.array([104, 117, 123], dtype=np.float32).reshape(3, 1, 1)


def load(path: str) -> np.ndarray:
    """An image as the net's input: BGR, mean subtracted, (1, 3, 96, 96)."""
    rgb = np.asarray(Image.open(path).convert("RGB").resize((96, 96), Image.BILINEAR), dtype=np.float32)
    return (rgb[..., ::-1].transpose(2, 0, 1) - MEAN)[None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=os.path.join(HERE, "ssd_shapes_iter_600.caffemodel"))
    ap.add_argument("--images", type=int, default=5)
    args = ap.parse_args(argv)
    deploy = os.path.join(HERE, "ssd_shapes_deploy.prototxt")
    net = caffe.Net(deploy, caffe.TEST, weights=args.weights)
    onnx_path = os.path.join(HERE, "ssd_shapes.onnx")
    subprocess.run([sys.executable, "-m", "recaffe.cli.main", "export", f"-model={deploy}",
                    f"-weights={args.weights}", "-format=onnx", f"-out={onnx_path}"], check=True)
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    test_list = os.path.join(HERE, "shapes", "test.txt")
    worst = 0.0
    with open(test_list) as f:
        images = [line.split()[0] for line in f][:args.images]
    for name in images:
        x = load(os.path.join(HERE, "shapes", name))
        net.blobs["data"].data[...] = x
        ours = net.forward()["detection_out"].reshape(-1, 7).copy()
        theirs = session.run(None, {"data": x})[0].reshape(-1, 7)
        if ours.shape != theirs.shape:
            print(f"{name}: recaffe found {len(ours)} detections, onnxruntime {len(theirs)}")
            return 1
        worst = max(worst, float(np.abs(ours - theirs).max()) if ours.size else 0.0)
        found = ", ".join(f"{NAMES.get(int(r[1]), '?')} {r[2]:.2f} at ({r[3]:.2f}, {r[4]:.2f}, {r[5]:.2f}, "
                          f"{r[6]:.2f})" for r in ours if r[1] >= 0)
        print(f"{name}: {found or 'nothing'}")
    print(f"onnxruntime agrees with recaffe on {len(images)} images: largest difference {worst:.2g}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
