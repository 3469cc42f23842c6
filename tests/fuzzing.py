"""Mutation fuzzing of recaffe's readers: one rule, success or a clean recaffe error.

Each target takes small valid seeds (a net prototxt, a solver, a .caffemodel, a .solverstate,
an HDF5 list, an image list, Datum values in an LMDB), mutates them (bit flips, byte changes,
insertions, deletions, truncation, duplicated or dropped lines, i.e. fields given twice, numbers
replaced by huge, negative, zero or NaN values) and feeds them to the reader and what runs on it
(net setup and one forward, solver steps, weight loading). Anything raised that is not a
``RecaffeError`` (``ACCEPTED``) is a failure. Inputs are derived from (target, seed, index), so a
failure is reproduced by its index.

CI runs a few hundred inputs per target (tests/test_fuzz.py); the long mode runs more:

    RECAFFE_FUZZ_N=20000 PYTHONPATH=src python -m pytest -q tests/test_fuzz.py
    PYTHONPATH=src python tests/fuzzing.py --n 20000 [--targets prototxt,caffemodel] [--seed 1]

Resources are bounded: blobs hold at most ``MAX_FUZZ_BLOB`` values while fuzzing (a shape past it
is a BlobError, as a shape past INT_MAX is in Caffe), and nets whose mutated text holds a type that
writes files or imports code (HDF5Output, Python) are skipped; every input runs in a scratch folder.
The command line also limits the address space (``--max-memory-gb``, 8 by default): an allocation
past it fails, and a failed allocation counts as a failure even when it surfaces as a clean error.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import struct
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

from recaffe import blob as _blob
from recaffe.errors import RecaffeError

ACCEPTED = (RecaffeError,)
MAX_FUZZ_BLOB = 1 << 22  # values per blob while fuzzing (16 MiB of float32)

# ------------------------------------------------------------------------------ mutators
INTERESTING_NUMBERS = ["0", "-1", "1", "2147483647", "-2147483648", "4294967295", "2147483648",
                       "9223372036854775807", "18446744073709551616", "1e39", "-1e39", "nan", "inf",
                       "-inf", "1e-45", "3.5", "-0", "65536", "1000000", "0x7fffffff", "99999999999"]
_NUMBER = re.compile(rb"-?\b\d+(\.\d*)?([eE][-+]?\d+)?\b")


def mutate_bytes(data: bytes, r: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(r.choice((1, 1, 1, 2, 3, 8))):
        op = r.randrange(7)
        if not b:
            b += bytes([r.randrange(256)])
            continue
        i = r.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << r.randrange(8)
        elif op == 1:
            b[i] = r.choice((0, 0xFF, 0x7F, 0x80, r.randrange(256)))
        elif op == 2:
            del b[i:i + r.randint(1, 16)]
        elif op == 3:
            b[i:i] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
        elif op == 4:
            del b[r.randrange(len(b) + 1):]  # truncation
        elif op == 5:
            j = r.randrange(len(b))
            lo, hi = min(i, j), max(i, j)
            b[hi:hi] = b[lo:hi][:256]  # a chunk duplicated
        else:
            struct_at = r.randrange(max(1, len(b) - 3))
            b[struct_at:struct_at + 4] = struct.pack("<I", r.choice((0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000,
                                                                     r.getrandbits(32))))
    return bytes(b)


def mutate_text(text: bytes, r: random.Random) -> bytes:
    """Text-aware mutations (numbers, lines) mixed with byte-level ones."""
    for _ in range(r.choice((1, 1, 2, 3))):
        op = r.randrange(8)
        lines = text.split(b"\n")
        if op <= 1:
            numbers = list(_NUMBER.finditer(text))
            if numbers:
                m = r.choice(numbers)
                text = text[:m.start()] + r.choice(INTERESTING_NUMBERS).encode() + text[m.end():]
        elif op == 2 and lines:  # a line (a field) given twice
            i = r.randrange(len(lines))
            lines.insert(i, lines[i])
            text = b"\n".join(lines)
        elif op == 3 and lines:
            del lines[r.randrange(len(lines))]
            text = b"\n".join(lines)
        elif op == 4 and len(lines) > 1:
            i, j = r.randrange(len(lines)), r.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
            text = b"\n".join(lines)
        elif op == 5:
            i = r.randrange(len(text) + 1)
            text = text[:i] + r.choice((b"#\xe9\xff comment\n", b'"', b"{", b"}", b"\\", b"\x00", b"\xff",
                                        b"\xe2\x80\xa8", b" dim: 0 ", b" num_output: 0 ", b" type: \"Pooling\" ",
                                        b" bottom: \"data\" ", b" top: \"data\" ")) + text[i:]
        else:
            text = mutate_bytes(text, r)
    return text


_INTS = (0, 1, -1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, -2**31, 2**32 - 1, 2**63 - 1, 10**9)
_FLOATS = (0.0, -0.0, 1.0, -1.0, 1e-45, 1e38, -1e38, float("inf"), float("-inf"), float("nan"), 0.5)


def _repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; older ones have only .label
    return repeated if repeated is not None else field.label == 3


def _fields(msg, out: list) -> list:
    """Every (message, field, index or None) set in ``msg``, recursively."""
    for field, value in msg.ListFields():
        if _repeated(field):
            out.append((msg, field, None))
            for i, v in enumerate(value):
                if field.type == field.TYPE_MESSAGE:
                    _fields(v, out)
                else:
                    out.append((msg, field, i))
        elif field.type == field.TYPE_MESSAGE:
            out.append((msg, field, None))
            _fields(value, out)
        else:
            out.append((msg, field, None))
    return out


def mutate_message(msg, r: random.Random):
    """Field-level mutations of a parsed proto: odd numbers, dropped, duplicated or cleared fields."""
    for _ in range(r.choice((1, 1, 2, 3))):
        places = _fields(msg, [])
        if not places:
            return msg
        parent, field, index = r.choice(places)
        container = getattr(parent, field.name)
        try:
            if _repeated(field) and index is None:
                n = len(container)
                op = r.randrange(3)
                if op == 0 and n:
                    del container[r.randrange(n):]
                elif op == 1 and n:
                    if field.type == field.TYPE_MESSAGE:
                        container.add().CopyFrom(container[r.randrange(n)])
                    else:
                        container.append(container[r.randrange(n)])
                elif n:
                    del container[r.randrange(n)]
            elif field.type == field.TYPE_MESSAGE:
                parent.ClearField(field.name) if r.random() < 0.5 else None
            else:
                value = _odd_value(field, r, container if index is None else container[index])
                if index is None:
                    setattr(parent, field.name, value)
                else:
                    container[index] = value
        except (ValueError, TypeError):
            pass  # out of the field's range: protobuf refuses to set it
    return msg


def _odd_value(field, r: random.Random, old):
    t = field.type
    if t in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
        return r.choice(_FLOATS)
    if t == field.TYPE_BOOL:
        return not old
    if t == field.TYPE_BYTES:
        return mutate_bytes(old, r)
    if t == field.TYPE_STRING:
        return r.choice(("", "x", "\u00e9", "/", "conv", "data", "ip", "../" * 3, "a" * 300))
    if t == field.TYPE_ENUM:
        return r.choice([v.number for v in field.enum_type.values])
    return r.choice(_INTS) if r.random() < 0.7 else old + r.choice((-1, 1))


def mutate_proto_bytes(data: bytes, msg_type, r: random.Random) -> bytes:
    """Half the time byte-level, half field-level (parse, mutate fields, serialize)."""
    if r.random() < 0.5:
        return mutate_bytes(data, r)
    msg = msg_type()
    msg.ParseFromString(data)
    return mutate_message(msg, r).SerializeToString()


# ------------------------------------------------------------------------------ seeds
NET_SEEDS = [
    b"""name: "fuzz"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 1 group: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" relu_param { negative_slope: 0.1 } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "lrn" type: "LRN" bottom: "pool" top: "lrn" lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 } }
layer { name: "ip" type: "InnerProduct" bottom: "lrn" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" softmax_param { axis: 1 } }
""",
    b"""name: "fuzz2"
input: "a"
input_shape { dim: 2 dim: 4 dim: 3 dim: 3 }
layer { name: "dummy" type: "DummyData" top: "b" dummy_data_param { shape { dim: 2 dim: 4 dim: 3 dim: 3 }
  data_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "b" top: "cat" concat_param { axis: 1 } }
layer { name: "slice" type: "Slice" bottom: "cat" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 3 } }
layer { name: "deconv" type: "Deconvolution" bottom: "s1" top: "up"
  convolution_param { num_output: 2 kernel_size: 2 stride: 2 weight_filler { type: "msra" } } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "s2" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "pow" type: "Power" bottom: "crop" top: "pow" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "flat" type: "Flatten" bottom: "pow" top: "flat" }
layer { name: "resh" type: "Reshape" bottom: "flat" top: "resh" reshape_param { shape { dim: 0 dim: -1 dim: 1 } } }
layer { name: "ave" type: "Pooling" bottom: "s2" top: "ave" pooling_param { pool: AVE kernel_h: 2 kernel_w: 1 pad_h: 1 pad_w: 0 } }
layer { name: "drop" type: "Dropout" bottom: "ave" top: "ave" dropout_param { dropout_ratio: 0.5 } }
layer { name: "tile" type: "Tile" bottom: "ave" top: "tile" tile_param { axis: 1 tiles: 2 } }
layer { name: "red" type: "Reduction" bottom: "tile" top: "red" reduction_param { operation: SUMSQ axis: 1 } }
layer { name: "argmax" type: "ArgMax" bottom: "flat" top: "am" argmax_param { top_k: 2 axis: 1 } }
""",
    b"""name: "fuzz3"
layer { name: "x" type: "Input" top: "x" top: "label" input_param { shape { dim: 3 dim: 6 } shape { dim: 3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h" inner_product_param { num_output: 4 axis: 1
  weight_filler { type: "uniform" min: -0.5 max: 0.5 } } param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 } }
layer { name: "sig" type: "Sigmoid" bottom: "h" top: "h" }
layer { name: "prelu" type: "PReLU" bottom: "h" top: "p" }
layer { name: "ip2" type: "InnerProduct" bottom: "p" top: "score" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
  loss_param { ignore_label: 2 normalization: VALID } }
layer { name: "acc" type: "Accuracy" bottom: "score" bottom: "label" top: "acc" accuracy_param { top_k: 1 } }
layer { name: "mvn" type: "MVN" bottom: "h" top: "mvn" mvn_param { normalize_variance: true eps: 1e-9 } }
layer { name: "elu" type: "ELU" bottom: "mvn" top: "elu" }
layer { name: "emb" type: "Embed" bottom: "label" top: "emb" embed_param { num_output: 2 input_dim: 3 } }
""",
    b"""name: "fuzz4"
layer { name: "seq" type: "Input" top: "x" top: "cont" top: "target"
  input_param { shape { dim: 3 dim: 2 dim: 4 } shape { dim: 3 dim: 2 } shape { dim: 3 dim: 2 dim: 5 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
  recurrent_param { num_output: 5 weight_filler { type: "uniform" min: -0.1 max: 0.1 } } }
layer { name: "rnn" type: "RNN" bottom: "h" bottom: "cont" top: "r" recurrent_param { num_output: 5 } }
layer { name: "eu" type: "EuclideanLoss" bottom: "r" bottom: "target" top: "l1" loss_weight: 0.5 }
layer { name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "h" bottom: "target" top: "l2" }
layer { name: "perm" type: "Reshape" bottom: "r" top: "r2" reshape_param { shape { dim: 6 dim: 5 } } }
layer { name: "hinge" type: "Dropout" bottom: "r2" top: "r3" }
layer { name: "bias" type: "Bias" bottom: "r3" top: "r4" bias_param { axis: 1 num_axes: 1 } }
layer { name: "abs" type: "AbsVal" bottom: "r4" top: "r5" }
layer { name: "log" type: "Log" bottom: "r5" top: "r6" log_param { shift: 1 } }
layer { name: "exp" type: "Exp" bottom: "r6" top: "r7" exp_param { base: 2 scale: 0.5 } }
layer { name: "thr" type: "Threshold" bottom: "r7" top: "r8" threshold_param { threshold: 1 } }
layer { name: "split" type: "Split" bottom: "r8" top: "s1" top: "s2" }
layer { name: "filter" type: "Softmax" bottom: "s1" top: "sm" softmax_param { axis: -1 } }
layer { name: "bnll" type: "BNLL" bottom: "s2" top: "bn" }
layer { name: "tanh" type: "TanH" bottom: "bn" top: "th" }
""",
]

_SKIP_TYPES = re.compile(rb"HDF5Output|Python|Data\"|WindowData|ImageData|MemoryData")

SOLVER_SEEDS = [
    b"""net_param { %s }
base_lr: 0.1 lr_policy: "step" gamma: 0.5 stepsize: 1 momentum: 0.9 weight_decay: 0.0005
max_iter: 3 display: 1 average_loss: 2 iter_size: 1 clip_gradients: 10 type: "SGD"
random_seed: 1 regularization_type: "L2" snapshot: 0
""",
    b"""net_param { %s }
base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75 type: "Adam" momentum: 0.9 momentum2: 0.999 delta: 1e-8
max_iter: 3 display: 0 test_iter: 1 test_interval: 2 test_initialization: false
""",
    b"""net_param { %s }
base_lr: 0.01 lr_policy: "multistep" gamma: 0.1 stepvalue: 1 stepvalue: 2 type: "RMSProp" rms_decay: 0.98
max_iter: 3 iter_size: 2 regularization_type: "L1" weight_decay: 0.001
""",
    b"""net_param { %s }
base_lr: 0.01 lr_policy: "poly" power: 0.5 max_iter: 3 type: "Nesterov" momentum: 0.5
""",
    b"""net_param { %s }
base_lr: 0.01 lr_policy: "sigmoid" gamma: -0.001 stepsize: 2 type: "AdaDelta" momentum: 0.95 delta: 1e-6
max_iter: 3
""",
    b"""net_param { %s }
base_lr: 1 lr_policy: "exp" gamma: 0.9 type: "AdaGrad" max_iter: 3
""",
]

_LOSS_NET = (b'layer { name: "x" type: "DummyData" top: "x" top: "label" dummy_data_param { '
             b'shape { dim: 3 dim: 6 } shape { dim: 3 } data_filler { type: "gaussian" } '
             b'data_filler { type: "constant" value: 1 } } } '
             b'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "s" inner_product_param { num_output: 3 '
             b'weight_filler { type: "gaussian" std: 0.1 } } } '
             b'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "s" bottom: "label" top: "loss" }')


@contextlib.contextmanager
def bounded():
    """Blob sizes capped, logging off, numpy warnings quiet, in a scratch folder."""
    old_max, old_cwd = _blob.MAX_BLOB_COUNT, os.getcwd()
    logger = logging.getLogger("recaffe")
    old_level = logger.level
    with tempfile.TemporaryDirectory(prefix="recaffe-fuzz-") as scratch, warnings.catch_warnings(), \
            np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        _blob.MAX_BLOB_COUNT = MAX_FUZZ_BLOB
        logger.setLevel(logging.CRITICAL)
        os.chdir(scratch)
        try:
            yield scratch
        finally:
            os.chdir(old_cwd)
            _blob.MAX_BLOB_COUNT = old_max
            logger.setLevel(old_level)


# ------------------------------------------------------------------------------ targets
class Target:
    """A reader under fuzz: ``prepare`` writes what every input shares (once), ``run`` feeds one
    input (a ``random.Random``) through it."""
    name = ""

    def prepare(self, scratch: str) -> None:
        self.scratch = scratch

    def run(self, r: random.Random) -> None:
        raise NotImplementedError


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _net(path_or_param, phase=None):
    from recaffe.net import Net
    from recaffe.proto import caffe_pb2
    return Net(path_or_param, caffe_pb2.TEST if phase is None else phase)


class PrototxtTarget(Target):
    """Net prototxt: parse, upgrade, set up, one forward (and a backward in TRAIN)."""
    name = "prototxt"

    def run(self, r):
        from recaffe.proto import caffe_pb2
        text = mutate_text(r.choice(NET_SEEDS), r)
        if _SKIP_TYPES.search(text):
            return
        path = _write("net.prototxt", text)
        phase = r.choice((caffe_pb2.TRAIN, caffe_pb2.TEST))
        net = _net(path, phase)
        net.forward()
        if phase == caffe_pb2.TRAIN:
            net.backward()


class SolverTarget(Target):
    """Solver prototxt (with its net inline): parse, upgrade, solver init, two steps."""
    name = "solver"

    def run(self, r):
        from recaffe.io.netfiles import read_solver_text
        from recaffe.solvers import create_solver
        text = mutate_text(r.choice(SOLVER_SEEDS) % _LOSS_NET, r)
        if _SKIP_TYPES.search(text.replace(b'"DummyData"', b"")):
            return
        path = _write("solver.prototxt", text)
        param = read_solver_text(path)
        param.snapshot = 0  # nothing written outside the scratch folder
        param.snapshot_prefix = os.path.join(self.scratch, "snap")
        param.snapshot_after_train = False
        param.ClearField("net")
        param.ClearField("train_net")
        del param.test_net[:]
        if param.test_iter and max(param.test_iter) > 5:
            del param.test_iter[:]
        param.iter_size = min(param.iter_size, 4)  # a huge iter_size is valid, just long (as in Caffe)
        solver = create_solver(param, source=path)
        solver.step(2)


class CaffemodelTarget(Target):
    """.caffemodel bytes loaded into the net they came from (Net.copy_from)."""
    name = "caffemodel"

    def prepare(self, scratch):
        super().prepare(scratch)
        from recaffe.io.protofiles import parse_text
        from recaffe.proto import caffe_pb2
        self.params = [parse_text(s.decode(), caffe_pb2.NetParameter()) for s in NET_SEEDS]
        self.models = []
        for i, p in enumerate(self.params):
            net = _net(p)
            self.models.append(net.to_proto().SerializeToString())

    def run(self, r):
        i = r.randrange(len(self.params))
        net = _net(self.params[i])
        from recaffe.proto import caffe_pb2
        if r.random() < 0.8:
            path = _write("w.caffemodel", mutate_proto_bytes(self.models[i], caffe_pb2.NetParameter, r))
        else:
            path = _random_weights_h5(r, net)
        net.copy_from(path)
        net.forward()


class SolverstateTarget(Target):
    """.solverstate bytes (binary proto) and .solverstate.h5 files of random layouts, restored."""
    name = "solverstate"

    def prepare(self, scratch):
        super().prepare(scratch)
        from recaffe.io.protofiles import parse_text
        from recaffe.proto import caffe_pb2
        from recaffe.solvers import create_solver
        self.param = parse_text((SOLVER_SEEDS[0] % _LOSS_NET).decode(), caffe_pb2.SolverParameter())
        self.param.snapshot_prefix = os.path.join(scratch, "seed")
        solver = create_solver(self.param)
        solver.step(1)
        state_file = solver.snapshot()
        with open(state_file, "rb") as f:
            self.state = f.read()
        self.solver = create_solver(self.param)

    def run(self, r):
        from recaffe.proto import caffe_pb2
        if r.random() < 0.75:
            path = _write("s.solverstate", mutate_proto_bytes(self.state, caffe_pb2.SolverState, r))
        else:
            path = _random_state_h5(r)
        self.solver.restore(path)
        self.solver.step(1)


def _random_array(r: random.Random):
    kind = r.choice(("f4", "f8", "i4", "u1", "S5", "bool", "c8"))
    shape = tuple(r.choice((0, 1, 2, 3, 6)) for _ in range(r.choice((0, 1, 1, 2, 3))))
    return np.zeros(shape, dtype=kind) if kind.startswith("S") else \
        (np.random.default_rng(r.getrandbits(32)).standard_normal(shape) * 3).astype(kind)


def _random_weights_h5(r: random.Random, net) -> str:
    """A .caffemodel.h5 of the net's layers with random datasets (shapes, types, extra groups)."""
    import h5py
    path = "w.caffemodel.h5"
    with h5py.File(path, "w") as f:
        top = f.create_group(r.choice(("data", "data", "data", "diff", "weights")))
        for name, layer in zip(net.layer_names, net.layers):
            if r.random() < 0.2:
                continue
            g = top.require_group(r.choice((name, name, "other", name + "/x")))
            for j, blob in enumerate(layer.blobs):
                key = str(j if r.random() < 0.9 else j + 5)
                if key in g:
                    continue
                g[key] = np.zeros(blob.shape, np.float32) if r.random() < 0.6 else _random_array(r)
            if r.random() < 0.1 and "extra" not in g:
                g["extra"] = _random_array(r)
    return path


def _random_state_h5(r: random.Random) -> str:
    import h5py
    path = "s.solverstate.h5"
    with h5py.File(path, "w") as f:
        for key in ("iter", "current_step", "learned_net", "history"):
            if r.random() < 0.1:
                continue
            if key == "history" and r.random() < 0.8:
                g = f.create_group("history")
                for i in range(r.choice((0, 1, 2, 3))):
                    g[str(i if r.random() < 0.9 else i + 7)] = _random_array(r)
            elif key == "learned_net" and r.random() < 0.5:
                f[key] = r.choice(("", "missing.caffemodel", "\xe9", "/"))
            elif key in ("iter", "current_step") and r.random() < 0.6:
                f[key] = np.array([r.choice((0, 1, 5, -1, 2**31 - 1))], r.choice(("i4", "i8", "f4")))
            else:
                f[key] = _random_array(r)
    return path


class HDF5ListTarget(Target):
    """HDF5Data: a mutated list file naming good, fake, missing and odd HDF5 files."""
    name = "hdf5_list"

    def prepare(self, scratch):
        super().prepare(scratch)
        import h5py
        with h5py.File(os.path.join(scratch, "good.h5"), "w") as f:
            f["data"] = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
            f["label"] = np.arange(4, dtype=np.float32)
        _write(os.path.join(scratch, "fake.h5"), b"just text, named .h5\n")
        _write(os.path.join(scratch, "empty.h5"), b"")
        self.list_seed = b"good.h5\n%s/good.h5\n" % scratch.encode()

    def run(self, r):
        import h5py
        with h5py.File("odd.h5", "w") as f:
            for key in ("data", "label"):
                if r.random() < 0.9:
                    f[key] = _random_array(r)
        names = [b"good.h5", b"fake.h5", b"empty.h5", b"odd.h5", b"missing.h5", b"", b"odd.h5 good.h5", b"."]
        text = b"\n".join(r.choice(names) for _ in range(r.randint(1, 3)))
        text = mutate_text(text if r.random() < 0.7 else self.list_seed, r) if r.random() < 0.5 else text
        _write("list.txt", text)
        batch = r.choice((1, 2, 3, 5, 0))
        shuffle = r.choice(("true", "false"))
        net = _net_text(f'layer {{ name: "h5" type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
                        f'source: "list.txt" batch_size: {batch} shuffle: {shuffle} }} }}')
        for _ in range(3):
            net.forward()


def _net_text(text: str, phase=None):
    from recaffe.io.protofiles import parse_text
    from recaffe.proto import caffe_pb2
    return _net(parse_text(text, caffe_pb2.NetParameter()), phase)


def _png(r: random.Random) -> bytes:
    import io

    from PIL import Image
    a = np.random.default_rng(r.getrandbits(32)).integers(0, 256, (r.randint(1, 6), r.randint(1, 6), 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=r.choice(("PNG", "JPEG", "BMP")))
    return buf.getvalue()


class ImageListTarget(Target):
    """ImageData: a mutated list file (names, labels) of good, mutated and non-image files."""
    name = "image_list"

    def prepare(self, scratch):
        super().prepare(scratch)
        r = random.Random(0)
        self.images = [_png(r) for _ in range(4)]
        for i, data in enumerate(self.images):
            _write(os.path.join(scratch, f"good{i}.img"), data)

    def run(self, r):
        _write("bad.img", mutate_bytes(r.choice(self.images), r))
        # mostly valid lines, so that most inputs get as far as decoding and transforming
        names = [b"good0.img", b"good1.img", b"good2.img", b"bad.img", b"bad.img", b"bad.img", b"missing.png",
                 b"list.txt"]
        lines = []
        for _ in range(r.randint(1, 4)):
            label = r.choice((b"0", b"1", b"7")) if r.random() < 0.85 else \
                r.choice((b"-3", b"x", b"", b"1 2", b"99999999999999999999"))
            lines.append(r.choice(names) + b" " + label)
        text = b"\n".join(lines)
        if r.random() < 0.25:
            text = mutate_text(text, r)
        _write("list.txt", text)
        opts = r.choice(("", "", "new_height: 4 new_width: 5", "is_color: false", "shuffle: true", "rand_skip: 2",
                         "new_height: 1 new_width: 9") + (("new_height: 3",) if r.random() < 0.1 else ()))
        crop = r.choice(("", "transform_param { crop_size: 2 mirror: true }",
                         "transform_param { scale: 0.5 mean_value: 1 mean_value: 2 mean_value: 3 }",
                         "transform_param { crop_size: 9 }"))
        net = _net_text(f'layer {{ name: "img" type: "ImageData" top: "data" top: "label" {crop} '
                        f'image_data_param {{ source: "list.txt" batch_size: {r.choice((1, 2, 3))} {opts} }} }}',
                        r.choice((0, 1)))
        try:
            for _ in range(2):
                net.forward()
        finally:
            _close_layers(net)


def _close_layers(net) -> None:
    for layer in net.layers:
        close = getattr(layer, "close", None)
        if close is not None:
            close()


class DatumTarget(Target):
    """Data layer over an LMDB whose values are mutated Datum protos (raw and encoded)."""
    name = "lmdb_datum"

    def prepare(self, scratch):
        super().prepare(scratch)
        from recaffe.proto import caffe_pb2
        r = random.Random(1)
        raw = caffe_pb2.Datum(channels=3, height=4, width=5, label=1,
                              data=bytes(r.randrange(256) for _ in range(60)))
        floats = caffe_pb2.Datum(channels=1, height=2, width=3, label=2, float_data=[0.5] * 6)
        encoded = caffe_pb2.Datum(channels=3, height=3, width=4, label=0, encoded=True, data=_png(r))
        self.seeds = [d.SerializeToString() for d in (raw, floats, encoded)]
        self.count = 0

    def run(self, r):
        from recaffe.data.db import NEW, open_db
        from recaffe.proto import caffe_pb2
        self.count += 1
        path = os.path.join(self.scratch, f"db{self.count % 2}")
        import shutil
        shutil.rmtree(path, ignore_errors=True)
        db = open_db("lmdb", path, NEW)
        txn = db.new_transaction()
        for k in range(r.randint(1, 3)):
            seed = r.choice(self.seeds)
            txn.put(f"{k:08d}", mutate_proto_bytes(seed, caffe_pb2.Datum, r) if r.random() < 0.9 else seed)
        txn.commit()
        db.close()
        transform = r.choice(("", "transform_param { crop_size: 2 mirror: true }",
                              "transform_param { force_color: true }", "transform_param { force_gray: true }",
                              "transform_param { scale: 0.1 mean_value: 5 }"))
        net = _net_text(f'layer {{ name: "d" type: "Data" top: "data" top: "label" {transform} '
                        f'data_param {{ source: "{path}" backend: LMDB batch_size: {r.choice((1, 2, 4))} }} }}',
                        r.choice((0, 1)))
        try:
            for _ in range(2):
                net.forward()
        finally:
            _close_layers(net)


TARGETS = {t.name: t for t in (PrototxtTarget, SolverTarget, CaffemodelTarget, SolverstateTarget,
                                HDF5ListTarget, ImageListTarget, DatumTarget)}


# ------------------------------------------------------------------------------ driver
_ALLOCATION = re.compile(r"can't allocate memory|out of memory|Cannot allocate memory", re.I)

class Failure:
    def __init__(self, target: str, index: int, exc: BaseException):
        self.target, self.index = target, index
        self.kind = type(exc).__name__
        self.message = str(exc).splitlines()[0][:200] if str(exc) else ""
        tb = traceback.extract_tb(exc.__traceback__)
        self.where = f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else "?"

    def key(self) -> tuple[str, str, str]:
        return self.target, self.kind, self.where

    def __str__(self) -> str:
        return f"{self.target}[{self.index}] {self.kind} at {self.where}: {self.message}"


def fuzz(name: str, n: int, seed: int = 0, start: int = 0, time_limit: float | None = None,
         progress: int = 0):
    """Run ``n`` inputs of target ``name``; returns (inputs run, clean errors, failures, slowest)."""
    target = TARGETS[name]()
    failures: list[Failure] = []
    clean = 0
    slowest = (0.0, -1)
    t_end = None if time_limit is None else time.monotonic() + time_limit
    done = 0
    with bounded() as scratch:
        target.prepare(scratch)
        for i in range(start, start + n):
            if t_end is not None and time.monotonic() > t_end:
                break
            r = random.Random(f"{name}/{seed}/{i}")
            t0 = time.monotonic()
            try:
                target.run(r)
            except ACCEPTED as e:
                if _ALLOCATION.search(str(e)):  # a huge allocation that failed (--max-memory-gb) is a bug
                    failures.append(Failure(name, i, e))
                    continue
                clean += 1
                if os.environ.get("RECAFFE_FUZZ_VERBOSE"):
                    print(f"  clean {name}[{i}]: {str(e)[:160]!r}")
            except Exception as e:  # noqa: BLE001 - anything else is what we are looking for
                failures.append(Failure(name, i, e))
            dt = time.monotonic() - t0
            if dt > slowest[0]:
                slowest = (dt, i)
            done += 1
            if progress and done % progress == 0:
                print(f"  {name}: {done} inputs, {clean} clean errors, {len(failures)} failures", flush=True)
    return done, clean, failures, slowest


def reproduce(name: str, index: int, seed: int = 0) -> None:
    """Run one input with the exception left to propagate (for debugging a failure)."""
    target = TARGETS[name]()
    with bounded() as scratch:
        target.prepare(scratch)
        target.run(random.Random(f"{name}/{seed}/{index}"))


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="inputs per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--targets", default=",".join(TARGETS), help="names, each optionally name:n")
    ap.add_argument("--reproduce", type=int, default=None, help="run this index of one target, with traceback")
    ap.add_argument("--max-memory-gb", type=float, default=8.0,
                    help="address-space limit: an input allocating more fails instead of exhausting the machine")
    args = ap.parse_args(argv)
    if args.max_memory_gb > 0:
        import resource
        limit = int(args.max_memory_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if args.reproduce is not None:
        reproduce(args.targets, args.reproduce, args.seed)
        return 0
    total_fail = 0
    for name in args.targets.split(","):
        t0 = time.monotonic()
        n = int(name.split(":")[1]) if ":" in name else args.n
        name = name.split(":")[0]
        done, clean, failures, slowest = fuzz(name, n, args.seed, args.start, progress=1000)
        groups: dict = {}
        for f in failures:
            groups.setdefault(f.key(), []).append(f)
        print(f"{name}: {done} inputs, {clean} clean errors, {len(failures)} failures in {len(groups)} places, "
              f"{time.monotonic() - t0:.0f} s, slowest {slowest[0]:.2f} s (#{slowest[1]})", flush=True)
        for fs in groups.values():
            print(f"  {len(fs)}x {fs[0]}", flush=True)
        total_fail += len(failures)
    return 1 if total_fail else 0


if __name__ == "__main__":
    sys.exit(main())
