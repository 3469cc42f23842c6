"""How much of a LeNet training iteration the Data layer costs, with and without prefetching.

    python benchmarks/data_layer_bench.py [--iters 200] [--backend lmdb|leveldb] [--threads N]

Converts the bundled MNIST sample to a temporary database, then trains LeNet
(examples/mnist/lenet_train_test.prototxt, batch 64, scale 1/256) with:

1. the Data layer reading the database with its background prefetch (Caffe's default, prefetch 4);
2. the same with ``prefetch: 0`` (each batch read and transformed inside forward);
3. an Input layer holding one batch already in memory (compute only);
4. plain PyTorch: the same LeNet and SGD, fed batches from a uint8 tensor in memory.

For (1) and (2) it prints the median time spent in the Data layer's forward and its share of the
iteration. The ratios compare each training iteration with plain PyTorch's in-memory iteration,
in the same process. Medians over ``--iters`` iterations after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lenet_bench import TorchLeNet, recaffe_solver, timed  # noqa: E402

from recaffe.data.mnist import convert_mnist, read_images, read_labels  # noqa: E402
from recaffe.io.protofiles import parse_text  # noqa: E402
from recaffe.proto import caffe_pb2  # noqa: E402
from recaffe.solvers import create_solver  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MNIST = os.path.join(HERE, "..", "examples", "mnist")
IMAGES = os.path.join(MNIST, "data", "train-images-idx3-ubyte.gz")
LABELS = os.path.join(MNIST, "data", "train-labels-idx1-ubyte.gz")


def data_solver(db: str, backend: str, prefetch: int):
    """LeNet's train net with its Data layer reading ``db``."""
    net = parse_text(open(os.path.join(MNIST, "lenet_train_test.prototxt")).read(), caffe_pb2.NetParameter())
    keep = []
    for lp in net.layer:
        if lp.type == "Data" and any(r.phase == caffe_pb2.TEST for r in lp.include):
            continue
        if lp.type == "Data":
            lp.data_param.source = db
            lp.data_param.backend = getattr(caffe_pb2.DataParameter, backend.upper())
            lp.data_param.prefetch = prefetch
        keep.append(lp)
    del net.layer[:]
    net.layer.extend(keep)
    sp = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=0.0005, lr_policy="inv",
                                   gamma=0.0001, power=0.75, random_seed=1)
    sp.net_param.CopyFrom(net)
    return create_solver(sp)


def time_data_layer(solver):
    """Wrap the Data layer's run_forward to record how long each call takes."""
    layer = next(lyr for lyr in solver.net.layers if lyr.layer_param.type == "Data")
    spent = []
    inner = layer.run_forward

    def timed_forward(bottom, top):
        t = time.perf_counter()
        out = inner(bottom, top)
        spent.append(time.perf_counter() - t)
        return out
    layer.run_forward = timed_forward
    return spent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--backend", default="lmdb", choices=["lmdb", "leveldb"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warm = 20
    batch = 64
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, f"mnist_train_{args.backend}")
        convert_mnist(IMAGES, LABELS, db, args.backend)
        for name, prefetch in (("Data layer, prefetch 4", 4), ("Data layer, prefetch 0", 0)):
            solver = data_solver(db, args.backend, prefetch)
            spent = time_data_layer(solver)
            timed(lambda: solver.step(1), warm)
            del spent[:]
            its = timed(lambda: solver.step(1), args.iters)
            results[name] = (statistics.median(its), statistics.median(spent))
            solver.net.layers[0].close()

    solver = recaffe_solver(batch)
    g = np.random.default_rng(0)
    solver.net.blobs["data"].data[...] = g.random((batch, 1, 28, 28), dtype=np.float32)
    solver.net.blobs["label"].data[...] = g.integers(0, 10, batch)
    timed(lambda: solver.step(1), warm)
    results["Input layer (in memory)"] = (statistics.median(timed(lambda: solver.step(1), args.iters)), 0.0)

    images = torch.from_numpy(np.array(read_images(IMAGES)))
    labels = torch.from_numpy(read_labels(LABELS).astype(np.int64))
    model = TorchLeNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    cursor = [0]

    def pt_step():
        i = cursor[0]
        cursor[0] = (i + batch) % (len(images) - batch)
        x = images[i:i + batch].unsqueeze(1).float().mul_(0.00390625)
        y = labels[i:i + batch]
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
    timed(pt_step, warm)
    pt = statistics.median(timed(pt_step, args.iters))

    print(f"LeNet training iteration, batch {batch}, {args.backend}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.iters} iterations (medians)")
    print(f"{'':28s} {'iteration':>10s} {'data layer':>11s} {'share':>6s} {'vs PyTorch':>10s}")
    for name, (it, data) in results.items():
        share = f"{100 * data / it:5.1f}%" if data else "     -"
        data_s = f"{data * 1e3:9.3f}ms" if data else "          -"
        print(f"{name:28s} {it * 1e3:8.2f}ms {data_s} {share} {it / pt:9.2f}x")
    print(f"{'plain PyTorch (in memory)':28s} {pt * 1e3:8.2f}ms {'':11s} {'':6s} {1.0:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
