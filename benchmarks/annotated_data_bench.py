"""SSD's AnnotatedData pipeline against the training iteration it feeds: is data loading ever the
bottleneck?

    python benchmarks/annotated_data_bench.py [--images 64] [--batches 20] [--size 300] [--threads N]

Makes a small shapes data set (examples/ssd/make_shapes.py) at --size, converts it with
convert_annoset (encoded PNG, as SSD's data), then measures in one process:

1. the AnnotatedData reader with SSD300's training augmentation (distortion, expansion up to 4x,
   the seven batch samplers of ssd_pascal.py, WARP resize to --size, mirror): images/s, the time
   one batch of 16 takes to load;
2. the same without augmentation (decode + resize only);
3. one training iteration (forward + backward + Adam update) of the shapes SSD
   (examples/ssd/make_nets.py) at batch 16 on in-memory data, and the same net as a plain PyTorch
   loop for reference;
and prints the loader's time per batch as a share of the iteration (below 1: the prefetch thread
keeps ahead of compute). Medians after a warm-up.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")

import caffe  # noqa: E402
from recaffe.data.annoset import convert_annoset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", "ssd", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SSD300_SAMPLERS = "batch_sampler { max_sample: 1 max_trials: 1 }\n" + "".join(
    f"batch_sampler {{ sampler {{ min_scale: 0.3 max_scale: 1 min_aspect_ratio: 0.5 max_aspect_ratio: 2 }} "
    f"sample_constraint {{ {c} }} max_sample: 1 max_trials: 50 }}\n"
    for c in ("min_jaccard_overlap: 0.1", "min_jaccard_overlap: 0.3", "min_jaccard_overlap: 0.5",
              "min_jaccard_overlap: 0.7", "min_jaccard_overlap: 0.9", "max_jaccard_overlap: 1.0"))
SSD300_TRANSFORM = """mirror: true mean_value: 104 mean_value: 117 mean_value: 123
  resize_param {{ prob: 1 resize_mode: WARP height: {s} width: {s} interp_mode: LINEAR interp_mode: AREA
                 interp_mode: NEAREST interp_mode: CUBIC interp_mode: LANCZOS4 }}
  emit_constraint {{ emit_type: CENTER }}
  distort_param {{ brightness_prob: 0.5 brightness_delta: 32 contrast_prob: 0.5 contrast_lower: 0.5
                  contrast_upper: 1.5 hue_prob: 0.5 hue_delta: 18 saturation_prob: 0.5 saturation_lower: 0.5
                  saturation_upper: 1.5 random_order_prob: 0.0 }}
  expand_param {{ prob: 0.5 max_expand_ratio: 4.0 }}"""


def data_net(db: str, size: int, augment: bool):
    transform = SSD300_TRANSFORM.format(s=size) if augment else (
        f"mean_value: 104 mean_value: 117 mean_value: 123 resize_param {{ prob: 1 resize_mode: WARP "
        f"height: {size} width: {size} }}")
    text = f"""layer {{ name: "data" type: "AnnotatedData" top: "data" top: "label"
      data_param {{ source: "{db}" batch_size: {BATCH} backend: LMDB prefetch: 0 }}
      transform_param {{ {transform} }}
      annotated_data_param {{ {SSD300_SAMPLERS if augment else ""} }} }}"""
    from recaffe.io.protofiles import parse_text
    from recaffe.net import Net
    from recaffe.proto import caffe_pb2
    return Net(parse_text(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN)


def time_loader(net, batches: int) -> float:
    layer = net.layers[0]
    layer._reader.load_batch()  # warm-up
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        layer._reader.load_batch()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_training(work: str, nets_module, iters: int) -> float:
    text = nets_module.train_test_net()
    # the TRAIN net with an Input instead of the data layer: compute only
    import re
    text = re.sub(r'layer \{\n  name: "data"\n  type: "AnnotatedData".*?\n\}\n', "", text, flags=re.S)
    text = ('layer { name: "in" type: "Input" top: "data" top: "label" input_param { shape { dim: 16 dim: 3 '
            'dim: 96 dim: 96 } shape { dim: 1 dim: 1 dim: 24 dim: 8 } } }\n' + text)
    with open(os.path.join(work, "net.prototxt"), "w") as f:
        f.write(text)
    with open(os.path.join(work, "solver.prototxt"), "w") as f:
        f.write(f'net: "{work}/net.prototxt" type: "Adam" base_lr: 0.001 lr_policy: "fixed" '
                f'snapshot_prefix: "{work}/s" random_seed: 1')
    solver = caffe.get_solver(os.path.join(work, "solver.prototxt"))
    import numpy as np
    rng = np.random.default_rng(0)
    solver.net.blobs["data"].data[...] = rng.normal(0, 50, solver.net.blobs["data"].data.shape)
    boxes = rng.uniform(0, 0.5, (24, 2))
    rows = np.concatenate([np.repeat(np.arange(16), 2)[:24, None], rng.integers(1, 4, (24, 1)),
                           np.zeros((24, 1)), boxes, boxes + 0.3, np.zeros((24, 1))], 1)
    solver.net.blobs["label"].data[...] = rows.reshape(1, 1, 24, 8)
    solver.step(2)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        solver.step(1)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--size", type=int, default=300)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        caffe.set_num_threads(args.threads)
    shapes, nets = load_example("make_shapes"), load_example("make_nets")
    with tempfile.TemporaryDirectory() as work:
        shapes.main([os.path.join(work, "shapes"), "--train", str(args.images), "--test", "1", "--size",
                     str(args.size)])
        db = os.path.join(work, "lmdb")
        convert_annoset(os.path.join(work, "shapes") + "/", os.path.join(work, "shapes", "trainval.txt"), db,
                        anno_type="detection", label_map_file=os.path.join(work, "shapes", "labelmap.prototxt"),
                        encoded=True, encode_type="png")
        aug = time_loader(data_net(db, args.size, True), args.batches)
        plain = time_loader(data_net(db, args.size, False), args.batches)
        step = time_training(work, nets, max(5, args.batches // 2))
    print(f"AnnotatedData, batch {BATCH} at {args.size}x{args.size} (encoded PNG records):")
    print(f"  SSD300 augmentation : {aug * 1e3:8.1f} ms/batch  {BATCH / aug:7.1f} images/s")
    print(f"  decode + resize only: {plain * 1e3:8.1f} ms/batch  {BATCH / plain:7.1f} images/s")
    print(f"shapes SSD training iteration (batch {BATCH}, 96x96, in memory): {step * 1e3:.1f} ms")
    print(f"loader time / iteration time: augmented {aug / step:.2f}, plain {plain / step:.2f} "
          f"(below 1: one prefetch thread keeps ahead of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
