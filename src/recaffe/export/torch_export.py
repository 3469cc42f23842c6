"""Export a recaffe Net as readable PyTorch source: ``<out>.py`` defines
``class <NetName>(torch.nn.Module)`` (depending only on torch) and ``<out>.pth`` holds its
state dict.

Every Caffe param blob is an ``nn.Parameter`` named ``<layer>_<param>`` (``conv1_weight``);
constants derived from params or geometry (folded BatchNorm statistics, average pooling divisor
maps) are buffers. ``forward`` takes the net's inputs by name and has one statement per layer,
commented with the Caffe layer's name and type; it returns the single output, or a tuple in
the order of ``OUTPUTS``. :func:`load_torch_module` imports the file and loads the weights.

Nothing read from the net's files becomes code: layer, blob and net names reach the source only
as ASCII identifiers (``_Identifiers``: other characters become ``_``), as ``ascii`` literals
(``INPUTS``/``OUTPUTS``), or escaped into comments and the docstring (``_comment``/``_doc``: no
newline, line separator, quote or backslash survives unescaped); parameters only as numbers.
"""
from __future__ import annotations

import builtins
import importlib.util
import io
import keyword
import os
import re
import sys
from collections import OrderedDict

import numpy as np
import torch

from ..io.protofiles import atomic_write
from .graph import ExportGraph, Node, build_graph, registrar

# names the generated code uses: never given to a blob or a param
_RESERVED = {"self", "torch", "F", "FLT_MAX", "FLT_MIN"} | set(dir(builtins))
_NOT_IDENTIFIER = re.compile(r"[^0-9A-Za-z_]")


def _comment(text: str) -> str:
    """``text`` for a ``#`` comment: ASCII, every control or non-ASCII character escaped, so no
    newline (nor \\r, \\f, \\u2028, ...) can end the comment."""
    return ascii(str(text))[1:-1]


def _doc(text: str) -> str:
    """``text`` for the module docstring: as ``_comment``, with quotes escaped too (no ``\"\"\"``)."""
    return _comment(text).replace('"', '\\"')

# Helpers the generated file defines when a layer needs them (Caffe's semantics, torch ops only).
_HELPERS = {
    "_caffe_pad_lowest": '''
def _caffe_pad_lowest(x, pads):
    """Pad for MAX pooling with the lowest value of x's type (-FLT_MAX in float32, as Caffe's
    empty windows give; also right under torch.autocast's bfloat16/float16)."""
    return F.pad(x, pads, value=torch.finfo(x.dtype).min)
''',
    "_caffe_stochastic_pool": '''
def _caffe_stochastic_pool(x, kernel, stride, pads):
    """Caffe's STOCHASTIC pooling at test time: sum x^2 / (sum x + FLT_MIN) over each window."""
    x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    total = F.avg_pool2d(x, kernel, stride, divisor_override=1) + FLT_MIN
    return F.avg_pool2d(x * x, kernel, stride, divisor_override=1) / total
''',
    "_caffe_mvn": '''
def _caffe_mvn(x, rows, top_shape, normalize_variance, eps):
    """Caffe's MVN: per row, subtract the mean and optionally divide by (std + eps)."""
    x = x.reshape(rows, -1)
    y = x - x.mean(dim=1, keepdim=True)
    if normalize_variance:
        y = y / (torch.sqrt((y * y).mean(dim=1, keepdim=True)) + eps)
    return y.reshape(top_shape)
''',
    "_caffe_argmax": '''
def _caffe_argmax(x, axis, top_k, out_max_val, top_shape):
    """Caffe's ArgMax: the top_k largest (ties: the larger index first), as float indices, or
    values with an axis; without one, per item, (indices, values) stacked on axis 1."""
    if axis is None:
        x = x.reshape(x.shape[0], -1)
    dim = 1 if axis is None else axis
    values, rev = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
    values = values.narrow(dim, 0, top_k)
    idx = (x.shape[dim] - 1 - rev.narrow(dim, 0, top_k)).to(x.dtype)
    if axis is not None:
        return values if out_max_val else idx
    y = torch.stack([idx, values], 1) if out_max_val else idx
    return y.reshape(top_shape)
''',
}


def _num(x: float) -> str:
    """A float32 constant in its shortest exact spelling (torch computes scalars in float32)."""
    s = str(np.float32(x))
    if "inf" in s or "nan" in s:
        return f"float({s!r})"  # Python has no inf / nan literal
    return s if ("." in s or "e" in s) else s + ".0"


def _tup(values) -> str:
    values = list(values)
    return "(" + ", ".join(str(int(v)) for v in values) + ("," if len(values) == 1 else "") + ")"


class _Identifiers:
    """Unique Python identifiers for Caffe names."""

    def __init__(self, reserved=()):
        self.used = set(_RESERVED) | set(reserved)
        self.names: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if name in self.names:
            return self.names[name]
        base = _NOT_IDENTIFIER.sub("_", name) or "_"
        # "__x" would be name-mangled inside the class (self.__x is self._Net__x)
        if base[0].isdigit() or keyword.iskeyword(base) or hasattr(torch.nn.Module, base) or base[:2] == "__":
            base = "v_" + base
        ident, k = base, 1
        while ident in self.used:
            ident = f"{base}_{k}"
            k += 1
        self.used.add(ident)
        self.names[name] = ident
        return ident


class _Source:
    """The pieces of the generated module: params, buffers, helpers, forward statements."""

    def __init__(self):
        self.attrs = _Identifiers()
        self.declarations: list[str] = []
        self.state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.helpers: list[str] = []

    def param(self, node: Node, key: str, shape=None) -> str:
        p = node.params[key]
        array = p.array if shape is None else p.array.reshape(shape)
        attr = self.attrs(f"{node.layer}_{key}")
        empty = f"torch.empty({', '.join(str(d) for d in array.shape)})"
        if p.learnable:
            self.declarations.append(f"self.{attr} = torch.nn.Parameter({empty})")
        else:
            self.declarations.append(f"self.register_buffer({attr!r}, {empty})")
        self.state[attr] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return f"self.{attr}"

    def helper(self, name: str) -> str:
        if name not in self.helpers:
            self.helpers.append(name)
        return name


EMITTERS = {}


emits = registrar(EMITTERS)


# Each emitter returns the right-hand side of the layer's statement, given the input identifiers.
@emits("Identity")
def _identity(s, n, xs):
    return xs[0]


@emits("Concat")
def _concat(s, n, xs):
    return f"torch.cat(({', '.join(xs)}), dim={n.attrs['axis']})"


@emits("Slice")
def _slice(s, n, xs):
    return f"torch.split({xs[0]}, {list(n.attrs['sizes'])}, dim={n.attrs['axis']})"


@emits("Flatten")
def _flatten(s, n, xs):
    return f"{xs[0]}.flatten({n.attrs['start']}, {n.attrs['end']})"


@emits("Reshape")
def _reshape(s, n, xs):
    a, x = n.attrs, xs[0]
    dims = [f"{x}.shape[{a['start'] + i}]" if d == 0 else str(d) for i, d in enumerate(a["dims"])]
    parts = ([f"*{x}.shape[:{a['start']}]"] if a["start"] else []) + dims
    if a["end"] < len(n.input_shapes[0]):
        parts.append(f"*{x}.shape[{a['end']}:]")
    return f"{x}.reshape({', '.join(parts)})"


@emits("Crop")
def _crop(s, n, xs):
    index = [":"] * len(n.input_shapes[0])
    for axis, start, end in n.attrs["ranges"]:
        index[axis] = f"{start}:{end}"
    return f"{xs[0]}[{', '.join(index)}]"


@emits("Tile")
def _tile(s, n, xs):
    reps = [1] * len(n.input_shapes[0])
    reps[n.attrs["axis"]] = n.attrs["tiles"]
    return f"{xs[0]}.repeat{_tup(reps)}"


@emits("InnerProduct")
def _inner_product(s, n, xs):
    a = n.attrs
    x = f"{xs[0]}.flatten({a['axis']})" if a["axis"] != len(n.input_shapes[0]) - 1 else xs[0]
    w = s.param(n, "weight")
    bias = s.param(n, "bias") if a["bias"] else None
    if a["transpose"]:  # the weights are (K, num_output)
        return f"torch.matmul({x}, {w})" + (f" + {bias}" if bias else "")
    return f"F.linear({x}, {w}, {bias})"


@emits("Embed")
def _embed(s, n, xs):
    y = f"F.embedding({xs[0]}.long(), {s.param(n, 'weight')})"
    return y + (f" + {s.param(n, 'bias')}" if n.attrs["bias"] else "")


@emits("Parameter")
def _parameter(s, n, xs):
    return s.param(n, "value")


@emits("Convolution", "Deconvolution")
def _convolution(s, n, xs):
    a = n.attrs
    d = len(a["kernel"])
    w = s.param(n, "weight")
    bias = s.param(n, "bias") if a["bias"] else "None"
    options = ""  # torch's defaults left out: stride 1, padding 0, dilation 1, groups 1
    for key, arg, default in (("stride", "stride", 1), ("pad", "padding", 0), ("dilation", "dilation", 1)):
        if any(v != default for v in a[key]):
            options += f", {arg}={_tup(a[key])}"
    if a["group"] != 1:
        options += f", groups={a['group']}"
    op = f"F.conv{d}d" if n.type == "Convolution" else f"F.conv_transpose{d}d"
    return ", ".join(f"{op}({x}, {w}, {bias}{options})" for x in xs)


@emits("Pooling")
def _pooling(s, n, xs):
    a = n.attrs
    ph, pw, rh, rw = a["pads"]
    kernel, stride = _tup(a["kernel"]), _tup(a["stride"])
    if a["method"] == "stochastic":
        return f"{s.helper('_caffe_stochastic_pool')}({xs[0]}, {kernel}, {stride}, {_tup(a['pads'])})"
    x = xs[0]
    if any(a["pads"]):  # Caffe's windows: explicit padding (negative: crop), then floor mode
        if a["method"] == "max":  # the lowest value of x's type: -FLT_MAX, and bf16/fp16 under autocast
            x = f"{s.helper('_caffe_pad_lowest')}({x}, {_tup((pw, rw, ph, rh))})"
        else:
            x = f"F.pad({x}, {_tup((pw, rw, ph, rh))})"
    if a["method"] == "max":
        return f"F.max_pool2d({x}, {kernel}, {stride})"
    if "divisor" in n.params:  # window sums over Caffe's divisors
        return f"F.avg_pool2d({x}, {kernel}, {stride}, divisor_override=1) / {s.param(n, 'divisor')}"
    return f"F.avg_pool2d({x}, {kernel}, {stride})"


@emits("ReLU")
def _relu(s, n, xs):
    slope = n.attrs["negative_slope"]
    return f"F.relu({xs[0]})" if slope == 0 else f"F.leaky_relu({xs[0]}, {_num(slope)})"


@emits("PReLU")
def _prelu(s, n, xs):
    return f"F.prelu({xs[0]}, {s.param(n, 'slope')})"


@emits("Sigmoid")
def _sigmoid(s, n, xs):
    return f"torch.sigmoid({xs[0]})"


@emits("TanH")
def _tanh(s, n, xs):
    return f"torch.tanh({xs[0]})"


@emits("AbsVal")
def _abs(s, n, xs):
    return f"torch.abs({xs[0]})"


@emits("BNLL")
def _bnll(s, n, xs):
    x = xs[0]
    return f"torch.clamp({x}, min=0) + torch.log1p(torch.exp(-torch.abs({x})))"


@emits("ELU")
def _elu(s, n, xs):
    return f"F.elu({xs[0]}, {_num(n.attrs['alpha'])})"


@emits("Power")
def _power(s, n, xs):
    a, y = n.attrs, xs[0]
    if a["power"] * a["scale"] == 0:  # Caffe ignores the input
        with np.errstate(over="ignore"):  # float32 overflow gives inf, as the layer computes
            value = 1.0 if a["power"] == 0 else float(np.float32(a["shift"]) ** np.float32(a["power"]))
        return f"torch.full_like({y}, {_num(value)})"
    if a["scale"] != 1:
        y = f"{y} * {_num(a['scale'])}"
    if a["shift"] != 0:
        y = f"({y} + {_num(a['shift'])})"
    if a["power"] != 1:
        y = f"torch.pow({y}, {_num(a['power'])})"
    return y


@emits("Exp")
def _exp(s, n, xs):
    a = n.attrs
    y = f"torch.exp({xs[0]})" if a["inner"] == 1 else f"torch.exp({xs[0]} * {_num(a['inner'])})"
    return y if a["outer"] == 1 else f"{y} * {_num(a['outer'])}"


@emits("Log")
def _log(s, n, xs):
    a, y = n.attrs, xs[0]
    if a["scale"] != 1:
        y = f"{y} * {_num(a['scale'])}"
    if a["shift"] != 0:
        y = f"{y} + {_num(a['shift'])}"
    y = f"torch.log({y})"
    return y if a["base_scale"] == 1 else f"{y} * {_num(a['base_scale'])}"


@emits("Clip")
def _clip(s, n, xs):
    return f"torch.clamp({xs[0]}, {_num(n.attrs['min'])}, {_num(n.attrs['max'])})"


@emits("Swish")
def _swish(s, n, xs):
    x, beta = xs[0], n.attrs["beta"]
    return f"{x} * torch.sigmoid({x if beta == 1 else f'{x} * {_num(beta)}'})"


@emits("Threshold")
def _threshold(s, n, xs):
    return f"({xs[0]} > {_num(n.attrs['threshold'])}).to({xs[0]}.dtype)"


@emits("LRN")
def _lrn(s, n, xs):
    a, x = n.attrs, xs[0]
    if a["region"] == "across":  # torch divides alpha by size over the channel window, as Caffe
        return (f"F.local_response_norm({x}, {a['size']}, alpha={_num(a['alpha'])}, "
                f"beta={_num(a['beta'])}, k={_num(a['k'])})")
    pad = (a["size"] - 1) // 2  # WITHIN_CHANNEL: mean over a zero-padded size x size window
    return (f"{x} * (F.avg_pool2d({x} * {x}, {a['size']}, 1, {pad}, count_include_pad=True) * "
            f"{_num(a['alpha'])} + 1).pow({_num(-a['beta'])})")


@emits("BatchNorm")
def _batch_norm(s, n, xs):
    return f"({xs[0]} - {s.param(n, 'mean')}) / {s.param(n, 'std')}"


@emits("Scale")
def _scale(s, n, xs):
    a = n.attrs
    if "scale" in n.params:
        factor = s.param(n, "scale", a["shape"])
    else:
        factor = f"{xs[1]}.reshape{_tup(a['shape'])}"
    y = f"{xs[0]} * {factor}"
    return y + (f" + {s.param(n, 'bias', a['bias_shape'])}" if a["bias"] else "")


@emits("Bias")
def _bias(s, n, xs):
    shape = n.attrs["shape"]
    bias = s.param(n, "bias", shape) if "bias" in n.params else f"{xs[1]}.reshape{_tup(shape)}"
    return f"{xs[0]} + {bias}"


@emits("MVN")
def _mvn(s, n, xs):
    a = n.attrs
    shape = n.input_shapes[0]
    legacy = [shape[i] if i < len(shape) else 1 for i in range(2)]
    rows = legacy[0] * (1 if a["across_channels"] else legacy[1])
    return (f"{s.helper('_caffe_mvn')}({xs[0]}, {rows}, {_tup(n.output_shapes[0])}, "
            f"{a['normalize_variance']}, {_num(a['eps'])})")


@emits("Softmax")
def _softmax(s, n, xs):
    return f"torch.softmax({xs[0]}, {n.attrs['axis']})"


@emits("Eltwise")
def _eltwise(s, n, xs):
    a = n.attrs
    if a["op"] == "prod":
        return " * ".join(xs)
    if a["op"] == "max":
        y = xs[0]
        for x in xs[1:]:
            y = f"torch.maximum({y}, {x})"
        return y
    c = a["coeffs"]
    y = xs[0] if c[0] == 1 else f"{xs[0]} * {_num(c[0])}"
    for x, coeff in zip(xs[1:], c[1:]):
        y = f"torch.add({y}, {x})" if coeff == 1 else f"torch.add({y}, {x}, alpha={_num(coeff)})"
    return y


@emits("Reduction")
def _reduction(s, n, xs):
    a = n.attrs
    x = f"{xs[0]}.flatten({a['axis']})"
    x = {"asum": f"{x}.abs()", "sumsq": f"{x}.square()"}.get(a["op"], x)
    y = f"{x}.sum(-1)"
    return y if a["coeff"] == 1 else f"{y} * {_num(a['coeff'])}"


@emits("ArgMax")
def _argmax(s, n, xs):
    a = n.attrs
    return (f"{s.helper('_caffe_argmax')}({xs[0]}, {a['axis']}, {a['top_k']}, {a['out_max_val']}, "
            f"{_tup(n.output_shapes[0])})")


# ------------------------------------------------------------------------------ the module
def class_name(graph: ExportGraph) -> str:
    name = _NOT_IDENTIFIER.sub("_", graph.name) or "Net"
    clash = name[0].isdigit() or keyword.iskeyword(name) or name in _RESERVED or name in _HELPERS
    return "Net_" + name if clash else name


def to_torch_source(graph: ExportGraph) -> tuple[str, "OrderedDict[str, torch.Tensor]"]:
    """The generated module's source and its state dict."""
    s = _Source()
    values = _Identifiers(reserved=_HELPERS)
    args = [values(name) for name, _ in graph.inputs]
    body = []
    for node in graph.nodes:
        xs = [values(v) for v in node.inputs]
        rhs = EMITTERS[node.type](s, node, xs)
        outs = ", ".join(values(v) for v in node.outputs)
        what = "output" if node.type == "Identity" else node.type
        body.append(f"{outs} = {rhs}  # {_comment(node.layer)} ({what})")
    outs = [values(name) for name, _ in graph.outputs]
    body.append(f"return {outs[0]}" if len(outs) == 1 else f"return {', '.join(outs)}")
    cls = class_name(graph)
    ins = ", ".join(f"{_doc(name)} {_tup(shape)}" for name, shape in graph.inputs)
    outs_doc = ", ".join(f"{_doc(name)} {_tup(shape)}" for name, shape in graph.outputs)
    lines = [
        f'"""{cls}: the Caffe net \'{_doc(graph.name)}\', generated by recaffe (caffe export).',
        "",
        f"Inputs: {ins}. Outputs: {outs_doc}.",
        f"Weights: model = {cls}(); model.load_state_dict(torch.load(<this file>.pth)).",
        '"""',
        "import torch",
        "import torch.nn.functional as F",
        "",
        f"__all__ = [{cls!r}]",
        "",
        "FLT_MAX = 3.4028234663852886e+38",
        "FLT_MIN = 1.1754943508222875e-38",
    ]
    for h in s.helpers:
        lines += ["", _HELPERS[h].rstrip("\n")]
    lines += ["", "", f"class {cls}(torch.nn.Module):",
              f"    INPUTS = {tuple(n for n, _ in graph.inputs)!a}",
              f"    OUTPUTS = {tuple(n for n, _ in graph.outputs)!a}",
              "", "    def __init__(self):", "        super().__init__()"]
    lines += [f"        {d}" for d in s.declarations]
    lines += ["", f"    def forward(self, {', '.join(args)}):"]
    lines += [f"        {b}" for b in body]
    return "\n".join(lines) + "\n", s.state


def _paths(out: str | os.PathLike) -> tuple[str, str]:
    base = os.fspath(out)
    root, ext = os.path.splitext(base)
    if ext in (".py", ".pth"):
        base = root
    return base + ".py", base + ".pth"


def export_torch(net, out: str | os.PathLike) -> tuple[str, str]:
    """Write ``<out>.py`` (the module) and ``<out>.pth`` (its state dict) of ``net`` (set up,
    weights loaded); returns both paths."""
    return write_torch(build_graph(net), out)


def write_torch(graph: ExportGraph, out: str | os.PathLike) -> tuple[str, str]:
    """Write an export graph as ``<out>.py`` and ``<out>.pth``; returns both paths."""
    source, state = to_torch_source(graph)
    py_path, pth_path = _paths(out)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(pth_path, buf.getvalue())
    atomic_write(py_path, source.encode("utf-8"))
    return py_path, pth_path


def load_torch_module(path: str | os.PathLike) -> torch.nn.Module:
    """Import a generated ``<out>.py`` and return its module with ``<out>.pth`` loaded, in eval mode."""
    py_path, pth_path = _paths(path)
    name = f"recaffe_exported_{abs(hash(os.path.abspath(py_path)))}"
    spec = importlib.util.spec_from_file_location(name, py_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    model = getattr(module, module.__all__[0])()
    model.load_state_dict(torch.load(pth_path, weights_only=True))
    return model.eval()
