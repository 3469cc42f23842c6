"""LeNet speed: recaffe against a plain PyTorch module of the same net, in the same process.

    python benchmarks/lenet_bench.py [--iters 100] [--batch 64] [--threads N]

Times (1) forward+backward of the train net and (2) a full training iteration (solver.step(1):
clear diffs, forward, backward, SGD update with momentum and weight decay) against the same work in
plain PyTorch (zero_grad, forward, backward, torch.optim.SGD.step). Data comes from Input blobs so
that only compute is measured. Runs alternate between the two to share the machine's noise, and
medians are reported with the ratio recaffe / PyTorch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from recaffe.io.protofiles import parse_text  # noqa: E402
from recaffe.proto import caffe_pb2  # noqa: E402
from recaffe.solvers import create_solver  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LENET = os.path.join(HERE, "..", "examples", "mnist", "lenet_train_test.prototxt")


def recaffe_solver(batch: int):
    net = parse_text(open(LENET).read(), caffe_pb2.NetParameter())
    layers = [lp for lp in net.layer if lp.type != "Data" and lp.type != "Accuracy"]
    del net.layer[:]
    net.layer.add().CopyFrom(parse_text(
        f'name: "data" type: "Input" top: "data" top: "label" input_param {{ shape {{ dim: {batch} dim: 1 '
        f'dim: 28 dim: 28 }} shape {{ dim: {batch} }} }}', caffe_pb2.LayerParameter()))
    net.layer.extend(layers)
    sp = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, weight_decay=0.0005, lr_policy="inv",
                                   gamma=0.0001, power=0.75, random_seed=1)
    sp.net_param.CopyFrom(net)
    return create_solver(sp)


class TorchLeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 20, 5)
        self.conv2 = torch.nn.Conv2d(20, 50, 5)
        self.ip1 = torch.nn.Linear(800, 500)
        self.ip2 = torch.nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2, 2)
        x = F.max_pool2d(self.conv2(x), 2, 2)
        x = F.relu(self.ip1(x.flatten(1)))
        return self.ip2(x)


def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = np.random.default_rng(0)
    data = g.random((args.batch, 1, 28, 28), dtype=np.float32)
    labels = g.integers(0, 10, args.batch)

    solver = recaffe_solver(args.batch)
    net = solver.net
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = labels

    model = TorchLeNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    x = torch.from_numpy(data)
    y = torch.from_numpy(labels)

    def rc_fwd_bwd():
        net.forward_loss()
        net.backward_from_to()

    def pt_fwd_bwd():
        loss = F.cross_entropy(model(x), y)
        loss.backward()

    def rc_iter():
        solver.step(1)

    def pt_iter():
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()  # the solver reads its loss every iteration too

    results = {}
    for name, rc, pt in (("forward+backward", rc_fwd_bwd, pt_fwd_bwd), ("training iteration", rc_iter, pt_iter)):
        for fn in (rc, pt):
            timed(fn, 10)  # warm up
        rc_t, pt_t = [], []
        for _ in range(max(1, args.iters // 10)):  # alternate in chunks to share the machine's noise
            rc_t += timed(rc, 10)
            pt_t += timed(pt, 10)
        results[name] = (statistics.median(rc_t), statistics.median(pt_t))
    print(f"LeNet, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.iters} iterations each (medians)")
    print(f"{'':20s} {'recaffe':>10s} {'PyTorch':>10s} {'ratio':>7s}")
    for name, (a, b) in results.items():
        print(f"{name:20s} {a * 1e3:8.2f}ms {b * 1e3:8.2f}ms {a / b:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
