"""Export a recaffe Net to ONNX (opset 18), built directly with ``onnx.helper``.

Each lowered node becomes one or a few ONNX operators named after the Caffe layer; param blobs
become float32 initializers named ``<layer>_<param>`` (``conv1_weight``, ``conv1_bias``). Input
and output shapes are the net's. The model is checked with ``onnx.checker`` and written
atomically.
"""
from __future__ import annotations

import os

import numpy as np

from ..io.protofiles import atomic_write
from .graph import ExportGraph, Node, build_graph, registrar
from .lowering import FLT_MAX, FLT_MIN

OPSET = 18
INT64_MIN = -(2 ** 63)


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:  # pragma: no cover - onnx is an optional dependency
        raise ImportError("exporting to ONNX needs the onnx package: pip install 'recaffe[export]'") from None
    return onnx, helper, numpy_helper


class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self):
        _, self.helper, self.numpy_helper = _onnx()
        self.nodes = []
        self.initializers = []
        self.names: set[str] = set()

    def unique(self, hint: str) -> str:
        name, k = hint, 1
        while name in self.names:
            name = f"{hint}_{k}"
            k += 1
        self.names.add(name)
        return name

    def const(self, array, hint: str, dtype=np.float32) -> str:
        name = self.unique(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def ints(self, values, hint: str) -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint, np.int64)

    def scalar(self, value: float, hint: str) -> str:
        return self.const(np.float32(value), hint)

    def param(self, node: Node, key: str, shape=None) -> str:
        array = node.params[key].array
        return self.const(array if shape is None else array.reshape(shape), f"{node.layer}_{key}")

    def op(self, node: Node, op_type: str, inputs, out: str | None = None, n_out: int = 1, **attrs):
        """Add one operator; ``out`` names its (single) output, else fresh names are made."""
        if out is not None:
            outputs = [out]
        else:
            outputs = [self.unique(f"{node.layer}/{op_type}") for _ in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outputs,
                                                name=self.unique(f"{node.layer}:{op_type}"), **attrs))
        return outputs[0] if n_out == 1 else outputs


EMITTERS = {}


emits = registrar(EMITTERS)


def _x(n: Node) -> str:
    return n.inputs[0]


def _y(n: Node) -> str:
    return n.outputs[0]


# ------------------------------------------------------------------------------ routing
@emits("Identity")
def _identity(b, n):
    b.op(n, "Identity", [_x(n)], _y(n))


@emits("Concat")
def _concat(b, n):
    b.op(n, "Concat", n.inputs, _y(n), axis=n.attrs["axis"])


@emits("Slice")
def _slice(b, n):
    split = b.ints(n.attrs["sizes"], f"{n.layer}_sizes")
    b.nodes.append(b.helper.make_node("Split", [_x(n), split], list(n.outputs), name=b.unique(n.layer),
                                      axis=n.attrs["axis"]))


def _reshape_to(b, n, x, shape, out=None):
    return b.op(n, "Reshape", [x, b.ints(list(shape), f"{n.layer}_shape")], out)


@emits("Flatten")
def _flatten(b, n):
    a = n.attrs
    shape = n.input_shapes[0]
    _reshape_to(b, n, _x(n), [0] * a["start"] + [-1] + list(shape[a["end"] + 1:]), _y(n))


@emits("Reshape")
def _reshape(b, n):
    # ONNX's 0 copies the input dim at the same index, as Caffe's 0 does inside [start, end)
    a = n.attrs
    shape = n.input_shapes[0]
    _reshape_to(b, n, _x(n), [0] * a["start"] + a["dims"] + list(shape[a["end"]:]), _y(n))


@emits("Crop")
def _crop(b, n):
    axes, starts, ends = zip(*n.attrs["ranges"])
    b.op(n, "Slice", [_x(n), b.ints(starts, f"{n.layer}_starts"), b.ints(ends, f"{n.layer}_ends"),
                      b.ints(axes, f"{n.layer}_axes")], _y(n))


@emits("Tile")
def _tile(b, n):
    reps = [1] * len(n.input_shapes[0])
    reps[n.attrs["axis"]] = n.attrs["tiles"]
    b.op(n, "Tile", [_x(n), b.ints(reps, f"{n.layer}_repeats")], _y(n))


# ------------------------------------------------------------------------------ inner product
@emits("InnerProduct")
def _inner_product(b, n):
    a = n.attrs
    x, shape = _x(n), n.input_shapes[0]
    if len(shape) != 2 or a["axis"] != 1:
        x = b.op(n, "Flatten", [x], axis=a["axis"])
    inputs = [x, b.param(n, "weight")] + ([b.param(n, "bias")] if a["bias"] else [])
    direct = len(n.output_shapes[0]) == 2
    y = b.op(n, "Gemm", inputs, _y(n) if direct else None, transB=0 if a["transpose"] else 1)
    if not direct:
        _reshape_to(b, n, y, n.output_shapes[0], _y(n))


@emits("Embed")
def _embed(b, n):
    idx = b.op(n, "Cast", [_x(n)], to=b.helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)))
    y = b.op(n, "Gather", [b.param(n, "weight"), idx], None if n.attrs["bias"] else _y(n), axis=0)
    if n.attrs["bias"]:
        b.op(n, "Add", [y, b.param(n, "bias")], _y(n))


@emits("Parameter")
def _parameter(b, n):
    b.op(n, "Identity", [b.param(n, "value")], _y(n))


# ------------------------------------------------------------------------------ convolution
@emits("Convolution", "Deconvolution")
def _convolution(b, n):
    a = n.attrs
    op = "Conv" if n.type == "Convolution" else "ConvTranspose"
    w = b.param(n, "weight")
    extra = [b.param(n, "bias")] if a["bias"] else []
    for x, y in zip(n.inputs, n.outputs):  # several bottoms share the weights
        b.op(n, op, [x, w] + extra, y, kernel_shape=a["kernel"], strides=a["stride"],
             pads=a["pad"] + a["pad"], dilations=a["dilation"], group=a["group"])


# ------------------------------------------------------------------------------ pooling
def _pad_explicit(b, n, x, pads, value):
    """Pad H and W by (top, left, bottom, right); negative bottom/right values crop."""
    ph, pw, rh, rw = pads
    if ph or pw or rh > 0 or rw > 0:
        onnx_pads = [0, 0, ph, pw, 0, 0, max(rh, 0), max(rw, 0)]
        x = b.op(n, "Pad", [x, b.ints(onnx_pads, f"{n.layer}_pads"), b.scalar(value, f"{n.layer}_padvalue")])
    if rh < 0 or rw < 0:
        h, w = n.input_shapes[0][2:]
        ends = [h + ph + rh, w + pw + rw]
        x = b.op(n, "Slice", [x, b.ints([0, 0], f"{n.layer}_starts"), b.ints(ends, f"{n.layer}_ends"),
                              b.ints([2, 3], f"{n.layer}_axes")])
    return x


def _average_pool_with_empty_windows(b, n, geo):
    """AveragePool over the zero-padded bottom. Windows lying wholly in the bottom/right padding
    (CEIL without pad, stride > kernel) hold only zeros: the bottom is padded just enough for the
    others (at most kernel - 1) and zeros are appended to the pooled output for them. onnxruntime
    folds a zero Pad into the pool's pads and refuses pads >= kernel: the model would not load."""
    a = n.attrs
    (kh, kw), (sh, sw) = a["kernel"], a["stride"]
    ph, pw, rh, rw = a["pads"]
    h, w = n.input_shapes[0][2:]
    oh, ow = n.output_shapes[0][2:]
    rh, rw = min(rh, kh - 1), min(rw, kw - 1)
    empty = (oh - ((ph + h + rh - kh) // sh + 1), ow - ((pw + w + rw - kw) // sw + 1))
    x = _pad_explicit(b, n, _x(n), [ph, pw, rh, rw], 0.0)
    mean = b.op(n, "AveragePool", [x], **geo)
    if any(empty):
        zeros = [0, 0, 0, 0, 0, 0, empty[0], empty[1]]
        mean = b.op(n, "Pad", [mean, b.ints(zeros, f"{n.layer}_empty_windows"),
                               b.scalar(0.0, f"{n.layer}_padvalue")])
    return mean


@emits("Pooling")
def _pooling(b, n):
    a = n.attrs
    geo = dict(kernel_shape=a["kernel"], strides=a["stride"])
    method = a["method"]
    kk = a["kernel"][0] * a["kernel"][1]
    if method == "ave" and "divisor" in n.params:
        mean = _average_pool_with_empty_windows(b, n, geo)
        with np.errstate(divide="ignore"):  # a divisor of 0 (empty window): 0 * inf = NaN, Caffe's 0 / 0
            factor = kk / n.params["divisor"].array.astype(np.float64)
        b.op(n, "Mul", [mean, b.const(factor, f"{n.layer}_divisor_factor")], _y(n))
        return
    x = _pad_explicit(b, n, _x(n), a["pads"], -FLT_MAX if method == "max" else 0.0)
    if method == "max":
        b.op(n, "MaxPool", [x], _y(n), **geo)
    elif method == "ave":
        b.op(n, "AveragePool", [x], _y(n), **geo)  # every window divides by kh * kw
    else:
        sq = b.op(n, "Mul", [x, x])
        num = b.op(n, "AveragePool", [sq], **geo)
        den = b.op(n, "Add", [b.op(n, "AveragePool", [x], **geo), b.scalar(FLT_MIN / kk, f"{n.layer}_eps")])
        b.op(n, "Div", [num, den], _y(n))


# ------------------------------------------------------------------------------ neurons
@emits("ReLU")
def _relu(b, n):
    slope = n.attrs["negative_slope"]
    if slope == 0:
        b.op(n, "Relu", [_x(n)], _y(n))
    else:
        b.op(n, "LeakyRelu", [_x(n)], _y(n), alpha=slope)


@emits("PReLU")
def _prelu(b, n):
    # (C, 1, ...) broadcasts over the channel axis; a shared slope is (1, 1, ...)
    shape = (n.params["slope"].array.size,) + (1,) * (n.attrs["ndim"] - 2)
    b.op(n, "PRelu", [_x(n), b.param(n, "slope", shape)], _y(n))


@emits("Sigmoid", "TanH", "AbsVal")
def _unary(b, n):
    b.op(n, {"Sigmoid": "Sigmoid", "TanH": "Tanh", "AbsVal": "Abs"}[n.type], [_x(n)], _y(n))


@emits("BNLL")
def _bnll(b, n):
    # log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|)), overflow-free as Caffe computes it
    x = _x(n)
    e = b.op(n, "Exp", [b.op(n, "Neg", [b.op(n, "Abs", [x])])])
    log = b.op(n, "Log", [b.op(n, "Add", [e, b.scalar(1.0, f"{n.layer}_one")])])
    b.op(n, "Add", [b.op(n, "Relu", [x]), log], _y(n))


@emits("ELU")
def _elu(b, n):
    b.op(n, "Elu", [_x(n)], _y(n), alpha=n.attrs["alpha"])


def _chain(b, n, x, steps):
    """Apply (op, constant or None) steps; the last writes the node's output."""
    if not steps:
        return b.op(n, "Identity", [x], _y(n))
    for i, (op, value) in enumerate(steps):
        inputs = [x] if value is None else [x, b.scalar(value, f"{n.layer}_{op.lower()}")]
        x = b.op(n, op, inputs, _y(n) if i == len(steps) - 1 else None)
    return x


@emits("Power")
def _power(b, n):
    a = n.attrs
    if a["power"] * a["scale"] == 0:
        # Caffe ignores the input: 1 for power 0, else shift^power (in float32)
        with np.errstate(over="ignore"):  # float32 overflow gives inf, as the layer computes
            value = 1.0 if a["power"] == 0 else float(np.float32(a["shift"]) ** np.float32(a["power"]))
        shape = b.op(n, "Shape", [_x(n)])
        b.op(n, "ConstantOfShape", [shape], _y(n),
             value=b.numpy_helper.from_array(np.array([value], dtype=np.float32)))
        return
    steps = []
    if a["scale"] != 1:
        steps.append(("Mul", a["scale"]))
    if a["shift"] != 0:
        steps.append(("Add", a["shift"]))
    if a["power"] != 1:
        steps.append(("Pow", a["power"]))
    _chain(b, n, _x(n), steps)


@emits("Exp")
def _exp(b, n):
    a = n.attrs
    steps = ([("Mul", a["inner"])] if a["inner"] != 1 else []) + [("Exp", None)]
    if a["outer"] != 1:
        steps.append(("Mul", a["outer"]))
    _chain(b, n, _x(n), steps)


@emits("Log")
def _log(b, n):
    a = n.attrs
    steps = [("Mul", a["scale"])] if a["scale"] != 1 else []
    if a["shift"] != 0:
        steps.append(("Add", a["shift"]))
    steps.append(("Log", None))
    if a["base_scale"] != 1:
        steps.append(("Mul", a["base_scale"]))
    _chain(b, n, _x(n), steps)


@emits("Clip")
def _clip(b, n):
    a = n.attrs
    b.op(n, "Clip", [_x(n), b.scalar(a["min"], f"{n.layer}_min"), b.scalar(a["max"], f"{n.layer}_max")],
         _y(n))


@emits("Swish")
def _swish(b, n):
    x, beta = _x(n), n.attrs["beta"]
    t = x if beta == 1 else b.op(n, "Mul", [x, b.scalar(beta, f"{n.layer}_beta")])
    b.op(n, "Mul", [x, b.op(n, "Sigmoid", [t])], _y(n))


@emits("Threshold")
def _threshold(b, n):
    gt = b.op(n, "Greater", [_x(n), b.scalar(n.attrs["threshold"], f"{n.layer}_threshold")])
    b.op(n, "Cast", [gt], _y(n), to=b.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)))


# ------------------------------------------------------------------------------ normalization
@emits("LRN")
def _lrn(b, n):
    a = n.attrs
    x = _x(n)
    if a["region"] == "across":
        # ONNX LRN: x / (bias + alpha / size * sum of squares over size channels)^beta = Caffe's
        b.op(n, "LRN", [x], _y(n), size=a["size"], alpha=a["alpha"], beta=a["beta"], bias=a["k"])
        return
    # WITHIN_CHANNEL: x * (1 + alpha * mean of x^2 over a size x size window, zero padded)^-beta
    pad = (a["size"] - 1) // 2
    sq = _pad_explicit(b, n, b.op(n, "Mul", [x, x]), [pad, pad, pad, pad], 0.0)
    mean = b.op(n, "AveragePool", [sq], kernel_shape=[a["size"]] * 2, strides=[1, 1])
    scale = b.op(n, "Add", [b.op(n, "Mul", [mean, b.scalar(a["alpha"], f"{n.layer}_alpha")]),
                            b.scalar(1.0, f"{n.layer}_one")])
    power = b.op(n, "Pow", [scale, b.scalar(-a["beta"], f"{n.layer}_beta")])
    b.op(n, "Mul", [x, power], _y(n))


@emits("BatchNorm")
def _batch_norm(b, n):
    centered = b.op(n, "Sub", [_x(n), b.param(n, "mean")])
    b.op(n, "Div", [centered, b.param(n, "std")], _y(n))


@emits("Scale")
def _scale(b, n):
    a = n.attrs
    if "scale" in n.params:
        s = b.param(n, "scale", a["shape"])
    else:
        s = _reshape_to(b, n, n.inputs[1], a["shape"])
    y = b.op(n, "Mul", [_x(n), s], None if a["bias"] else _y(n))
    if a["bias"]:
        b.op(n, "Add", [y, b.param(n, "bias", a["bias_shape"])], _y(n))


@emits("Bias")
def _bias(b, n):
    shape = n.attrs["shape"]
    bias = b.param(n, "bias", shape) if "bias" in n.params else _reshape_to(b, n, n.inputs[1], shape)
    b.op(n, "Add", [_x(n), bias], _y(n))


def _legacy(shape, i):
    return shape[i] if i < len(shape) else 1


@emits("MVN")
def _mvn(b, n):
    a = n.attrs
    shape = n.input_shapes[0]
    rows = _legacy(shape, 0) * (1 if a["across_channels"] else _legacy(shape, 1))
    v = _reshape_to(b, n, _x(n), [rows, -1])
    axes = b.ints([1], f"{n.layer}_axes")
    y = b.op(n, "Sub", [v, b.op(n, "ReduceMean", [v, axes], keepdims=1)])
    if a["normalize_variance"]:
        var = b.op(n, "ReduceMean", [b.op(n, "Mul", [y, y]), axes], keepdims=1)
        std = b.op(n, "Add", [b.op(n, "Sqrt", [var]), b.scalar(a["eps"], f"{n.layer}_eps")])
        y = b.op(n, "Div", [y, std])
    _reshape_to(b, n, y, n.output_shapes[0], _y(n))


@emits("Softmax")
def _softmax(b, n):
    b.op(n, "Softmax", [_x(n)], _y(n), axis=n.attrs["axis"])


# ------------------------------------------------------------------------------ elementwise
@emits("Eltwise")
def _eltwise(b, n):
    a = n.attrs
    xs = n.inputs
    if a["op"] == "max":
        b.op(n, "Max", xs, _y(n))
        return
    if a["op"] == "prod":
        y = xs[0]
        for i, x in enumerate(xs[1:], 1):
            y = b.op(n, "Mul", [y, x], _y(n) if i == len(xs) - 1 else None)
        return

    def term(x, c):
        return x if c == 1 else b.op(n, "Mul", [x, b.scalar(c, f"{n.layer}_coeff")])

    y = term(xs[0], a["coeffs"][0])
    for i, (x, c) in enumerate(zip(xs[1:], a["coeffs"][1:]), 1):
        y = b.op(n, "Add", [y, term(x, c)], _y(n) if i == len(xs) - 1 else None)


@emits("Reduction")
def _reduction(b, n):
    a = n.attrs
    flat = b.op(n, "Flatten", [_x(n)], axis=a["axis"])  # (outer, inner)
    op = {"asum": "ReduceL1", "sumsq": "ReduceSumSquare"}.get(a["op"], "ReduceSum")
    r = b.op(n, op, [flat, b.ints([1], f"{n.layer}_axes")], keepdims=0)
    if a["coeff"] != 1:  # MEAN: coeff / inner, folded by the lowering
        r = b.op(n, "Mul", [r, b.scalar(a["coeff"], f"{n.layer}_coeff")])
    _reshape_to(b, n, r, n.output_shapes[0], _y(n))


@emits("ArgMax")
def _argmax(b, n):
    a = n.attrs
    x, axis = _x(n), a["axis"]
    if axis is None:
        x, axis = b.op(n, "Flatten", [x], axis=1), 1
    # TopK puts the lower index first among ties; Caffe the higher: search the reversed axis
    rev = b.op(n, "Slice", [x, b.ints([-1], f"{n.layer}_starts"), b.ints([INT64_MIN], f"{n.layer}_ends"),
                            b.ints([axis], f"{n.layer}_axes"), b.ints([-1], f"{n.layer}_steps")])
    values, idx = b.op(n, "TopK", [rev, b.ints([a["top_k"]], f"{n.layer}_k")], n_out=2, axis=axis,
                       largest=1, sorted=1)
    idx = b.op(n, "Sub", [b.ints(a["dim"] - 1, f"{n.layer}_last"), idx])
    idx = b.op(n, "Cast", [idx], to=b.helper.np_dtype_to_tensor_dtype(np.dtype(np.float32)))
    if a["axis"] is not None:
        b.op(n, "Identity", [values if a["out_max_val"] else idx], _y(n))
        return
    if a["out_max_val"]:
        one = b.ints([1], f"{n.layer}_unsqueeze")
        idx = b.op(n, "Concat", [b.op(n, "Unsqueeze", [idx, one]), b.op(n, "Unsqueeze", [values, one])],
                   axis=1)
    _reshape_to(b, n, idx, n.output_shapes[0], _y(n))


# ------------------------------------------------------------------------------ the model
def _output_dims(graph: ExportGraph, name: str, shape) -> list:
    """The declared output shape; a node with attrs["dynamic_axis"] (DetectionOutput's rows) leaves
    that axis symbolic."""
    dims = list(shape)
    for node in graph.nodes:
        if name in node.outputs and "dynamic_axis" in node.attrs:
            dims[node.attrs["dynamic_axis"]] = f"{name}_rows"
    return dims


def to_onnx(graph: ExportGraph):
    """The ONNX ModelProto of an export graph (checked with onnx.checker)."""
    onnx, helper, _ = _onnx()
    b = _Builder()
    for name, _ in graph.inputs + graph.outputs:
        b.names.add(name)
    for node in graph.nodes:
        b.names.update(node.outputs)
    for node in graph.nodes:
        EMITTERS[node.type](b, node)
    elem = onnx.TensorProto.FLOAT
    g = helper.make_graph(
        b.nodes, graph.name,
        [helper.make_tensor_value_info(name, elem, list(shape)) for name, shape in graph.inputs],
        [helper.make_tensor_value_info(name, elem, _output_dims(graph, name, shape))
         for name, shape in graph.outputs],
        initializer=b.initializers)
    opset = helper.make_opsetid("", OPSET)
    model = helper.make_model(g, opset_imports=[opset], producer_name="recaffe",
                              ir_version=helper.find_min_ir_version_for([opset]))
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(net, path: str | os.PathLike):
    """Write ``net`` (set up, weights loaded) as an ONNX model at ``path``; returns the model."""
    model = to_onnx(build_graph(net))
    atomic_write(path, model.SerializeToString())
    return model
