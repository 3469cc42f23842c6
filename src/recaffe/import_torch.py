"""Import a ``torch.nn.Sequential`` as a Caffe deploy net and its weights.

    net, weights = from_torch_sequential(model, (1, 3, 32, 32))
    save_torch_sequential(model, (1, 3, 32, 32), "deploy.prototxt", "model.caffemodel")

The net starts with an Input layer (top ``data``) of ``input_shape`` (batch axis included) and has
one layer per module, chained in order (nested Sequentials are flattened; ``Identity`` adds none).
Every layer's top is named after its layer. It reproduces ``model.eval()``: BatchNorm uses the
running statistics and Dropout is Caffe's (identity in TEST).

Module → layer: Conv2d → Convolution; Linear → InnerProduct (``axis`` = the last axis when the
input has more than two, as torch applies Linear to the last axis); ReLU/LeakyReLU → ReLU
(``negative_slope``); MaxPool2d/AvgPool2d → Pooling; BatchNorm2d → BatchNorm (``use_global_stats``,
blobs mean, variance and a scale factor of 1) followed, when affine, by Scale with a bias;
Dropout → Dropout; Flatten → Flatten; Softmax → Softmax; Sigmoid → Sigmoid; Tanh → TanH.

Pooling: torch rounds output sizes down unless ``ceil_mode``; Caffe rounds up unless
``round_mode: FLOOR``. Both use the same windows (start i*stride - pad) and, for AVE, the same
divisor (the window clipped to the padded input); Caffe, like torch in ceil mode, drops a last window
that would start in the right padding, but Caffe does so only when the layer has padding. So a
floor-mode module becomes ``round_mode: FLOOR`` (left at the default where stride is 1, as the two
roundings then agree), a ceil-mode module the default CEIL, or FLOOR where that is what reproduces
the module's size for ``input_shape``. Where neither does, or no Caffe pooling computes the module's
values (``count_include_pad=False`` with padding, ``divisor_override``, dilation, indices), the
import fails with a ``TorchImportError`` naming the module. Older Caffe builds (before
``round_mode``) read only the nets that do not use it.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from .blob import set_packed_values
from .errors import RecaffeError
from .io.protofiles import write_binary, write_text
from .proto import caffe_pb2

_CEIL = caffe_pb2.PoolingParameter.CEIL
_FLOOR = caffe_pb2.PoolingParameter.FLOOR


class TorchImportError(RecaffeError, ValueError):
    """A module the import cannot express in Caffe; the message names the module's index and type."""


class _Module:
    """One flattened module: its index, path in the model, input and output shapes."""

    def __init__(self, index: int, path: str, module: nn.Module, in_shape, out_shape):
        self.index, self.path, self.module = index, path, module
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def where(self) -> str:
        return f"module {self.index} ({self.path!r}, {type(self.module).__name__})"

    def error(self, message: str) -> TorchImportError:
        return TorchImportError(f"{self.where()}: {message}")


def _flatten(model: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in model.named_children():
        path = prefix + name
        if type(child) is nn.Sequential:
            out += _flatten(child, path + ".")
        else:
            out.append((path, child))
    return out


def _trace(model: nn.Sequential, input_shape: Sequence[int]) -> list[_Module]:
    """Run the modules one by one on zeros (in eval mode, restored after) to learn every shape."""
    flat = _flatten(model)
    modes = [m.training for m in model.modules()]
    param = next(model.parameters(), None)
    x = torch.zeros(tuple(input_shape), dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else None)
    found = []
    try:
        model.eval()
        with torch.no_grad():
            for index, (path, module) in enumerate(flat):
                try:
                    y = module(x)
                except Exception as e:  # noqa: BLE001 - reported with the module named
                    raise TorchImportError(f"module {index} ({path!r}, {type(module).__name__}) fails "
                                           f"on an input of shape {tuple(x.shape)}: {e}") from e
                if not isinstance(y, torch.Tensor):
                    raise TorchImportError(f"module {index} ({path!r}, {type(module).__name__}) does not "
                                           "return one tensor")
                found.append(_Module(index, path, module, x.shape, y.shape))
                x = y
    finally:
        for m, training in zip(model.modules(), modes):
            m.training = training
    return found


# ------------------------------------------------------------------------------ converters
def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _set_repeated(field, values: tuple[int, int], default: int | None) -> None:
    """Caffe's N-D geometry fields: nothing at the default, one value for both axes, else one each."""
    if values[0] == values[1]:
        if values[0] != default:
            field.append(values[0])
    else:
        field.extend(values)


def _conv(m: _Module, lp) -> list:
    c: nn.Conv2d = m.module
    if c.padding_mode != "zeros":
        raise m.error(f"padding_mode {c.padding_mode!r}: Caffe's Convolution pads with zeros only")
    kernel, stride, dilation = _pair(c.kernel_size), _pair(c.stride), _pair(c.dilation)
    if c.padding == "valid":
        pad = (0, 0)
    elif c.padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            raise m.error("padding='same' pads unevenly here, and Caffe pads both sides equally")
        pad = (total[0] // 2, total[1] // 2)
    else:
        pad = _pair(c.padding)
    lp.type = "Convolution"
    p = lp.convolution_param
    p.num_output = c.out_channels
    p.bias_term = c.bias is not None
    if c.groups != 1:
        p.group = c.groups
    _set_repeated(p.kernel_size, kernel, None)
    _set_repeated(p.stride, stride, 1)
    _set_repeated(p.pad, pad, 0)
    _set_repeated(p.dilation, dilation, 1)
    return [c.weight] + ([c.bias] if c.bias is not None else [])


def _linear(m: _Module, lp) -> list:
    f: nn.Linear = m.module
    lp.type = "InnerProduct"
    p = lp.inner_product_param
    p.num_output = f.out_features
    p.bias_term = f.bias is not None
    if len(m.in_shape) != 2:  # torch applies Linear to the last axis
        p.axis = len(m.in_shape) - 1
    return [f.weight] + ([f.bias] if f.bias is not None else [])


def _relu(m: _Module, lp) -> list:
    lp.type = "ReLU"
    if isinstance(m.module, nn.LeakyReLU):
        lp.relu_param.negative_slope = m.module.negative_slope
    return []


def _caffe_pooled(size: int, k: int, s: int, p: int, mode: int, any_pad: bool) -> int:
    a = size + 2 * p - k
    o = (-(-a // s) if mode == _CEIL else a // s) + 1
    if any_pad and (o - 1) * s >= size + p:  # Caffe drops a last window starting in the padding
        o -= 1
    return o


def _pool(m: _Module, lp) -> list:
    pool = m.module
    if len(m.in_shape) != 4:
        raise m.error(f"Caffe pools 4-D blobs (N, C, H, W); the input here has shape {m.in_shape}")
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    pad = _pair(pool.padding)
    lp.type = "Pooling"
    p = lp.pooling_param
    if isinstance(pool, nn.MaxPool2d):
        if _pair(pool.dilation) != (1, 1):
            raise m.error("dilated pooling has no Caffe equivalent")
        if pool.return_indices:
            raise m.error("return_indices has no Caffe equivalent in a Sequential")
        p.pool = caffe_pb2.PoolingParameter.MAX
    else:
        if pool.divisor_override is not None:
            raise m.error("divisor_override has no Caffe equivalent")
        if not pool.count_include_pad and any(pad):
            raise m.error("count_include_pad=False with padding: Caffe's AVE pooling divides by "
                          "the window including the padding")
        p.pool = caffe_pb2.PoolingParameter.AVE
    if pool.ceil_mode:
        modes = (_CEIL, _FLOOR)
    else:
        modes = (_CEIL,) if stride == (1, 1) else (_FLOOR,)
    size, want = m.in_shape[2:], m.out_shape[2:]
    for mode in modes:
        got = tuple(_caffe_pooled(size[i], kernel[i], stride[i], pad[i], mode, any(pad)) for i in range(2))
        if got == want:
            break
    else:
        raise m.error(f"no Caffe pooling gives its output size {want} for an input of {size} "
                      f"(kernel {kernel}, stride {stride}, pad {pad}, ceil_mode {pool.ceil_mode})")
    if mode != _CEIL:
        p.round_mode = mode
    for name, values in (("kernel", kernel), ("stride", stride), ("pad", pad)):
        if values[0] == values[1]:
            if name == "kernel" or values[0] != (1 if name == "stride" else 0):
                setattr(p, "kernel_size" if name == "kernel" else name, values[0])
        else:
            setattr(p, name + "_h", values[0])
            setattr(p, name + "_w", values[1])
    return []


def _batch_norm(m: _Module, lp) -> list:
    bn: nn.BatchNorm2d = m.module
    if bn.running_mean is None:
        raise m.error("track_running_stats=False normalizes with batch statistics; a deploy net "
                      "needs running statistics")
    lp.type = "BatchNorm"
    lp.batch_norm_param.use_global_stats = True
    lp.batch_norm_param.eps = bn.eps
    return [bn.running_mean, bn.running_var, torch.ones(1)]


def _simple(caffe_type: str):
    def convert(m: _Module, lp) -> list:
        lp.type = caffe_type
        return []
    return convert


def _dropout(m: _Module, lp) -> list:
    lp.type = "Dropout"
    lp.dropout_param.dropout_ratio = m.module.p
    return []


def _flatten_layer(m: _Module, lp) -> list:
    lp.type = "Flatten"
    if m.module.start_dim != 1:
        lp.flatten_param.axis = m.module.start_dim
    if m.module.end_dim != -1:
        lp.flatten_param.end_axis = m.module.end_dim
    return []


def _softmax(m: _Module, lp) -> list:
    lp.type = "Softmax"
    dim = m.module.dim
    if dim is None:  # torch's implicit choice for dim=None
        dim = 0 if len(m.in_shape) in (0, 1, 3) else 1
    if dim != 1:
        lp.softmax_param.axis = dim
    return []


_CONVERTERS = {
    nn.Conv2d: ("conv", _conv),
    nn.Linear: ("fc", _linear),
    nn.ReLU: ("relu", _relu),
    nn.LeakyReLU: ("relu", _relu),
    nn.MaxPool2d: ("pool", _pool),
    nn.AvgPool2d: ("pool", _pool),
    nn.BatchNorm2d: ("bn", _batch_norm),
    nn.Dropout: ("drop", _dropout),
    nn.Flatten: ("flatten", _flatten_layer),
    nn.Softmax: ("prob", _softmax),
    nn.Sigmoid: ("sigmoid", _simple("Sigmoid")),
    nn.Tanh: ("tanh", _simple("TanH")),
}


# ----------------------------------------------------------------------------------- the net
def _blob_proto(values: torch.Tensor) -> caffe_pb2.BlobProto:
    """A float BlobProto of the tensor's shape."""
    array = values.detach().cpu().to(torch.float32).numpy()
    proto = caffe_pb2.BlobProto()
    proto.shape.dim.extend(array.shape)
    set_packed_values(proto, "data", array)
    return proto


def _layer_name(kind: str, path: str, taken: set[str]) -> str:
    base = path.replace(".", "_")
    name = kind + base if base[:1].isdigit() else base
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def from_torch_sequential(model: nn.Sequential, input_shape: Sequence[int], name: str = "net"
                          ) -> tuple[caffe_pb2.NetParameter, caffe_pb2.NetParameter]:
    """The deploy net (no weights) and the weights net (every layer with its blobs, as Caffe's
    snapshots hold them) for ``model`` fed with ``input_shape`` (N, C, H, W or N, D...)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"from_torch_sequential needs a torch.nn.Sequential, got {type(model).__name__}")
    if len(input_shape) < 2:
        raise ValueError(f"input_shape {tuple(input_shape)} must include the batch axis")
    modules = _trace(model, input_shape)
    net = caffe_pb2.NetParameter(name=name)
    weights = caffe_pb2.NetParameter(name=name)
    data = net.layer.add(name="data", type="Input", top=["data"])
    data.input_param.shape.add().dim.extend(int(d) for d in input_shape)
    weights.layer.add().CopyFrom(data)
    bottom, taken = "data", {"data"}
    for m in modules:
        if type(m.module) is nn.Identity:
            continue
        kind, convert = _CONVERTERS.get(type(m.module), (None, None))
        if convert is None:
            supported = ", ".join(sorted(t.__name__ for t in _CONVERTERS))
            raise m.error(f"is not supported (supported: Sequential, Identity, {supported})")
        lp = caffe_pb2.LayerParameter(name=_layer_name(kind, m.path, taken), bottom=[bottom])
        blobs = convert(m, lp)
        lp.top.append(lp.name)
        layers = [(lp, blobs)]
        if isinstance(m.module, nn.BatchNorm2d) and m.module.affine:
            scale = caffe_pb2.LayerParameter(name=_layer_name("scale", m.path, taken), type="Scale",
                                             bottom=[lp.name])
            scale.top.append(scale.name)
            scale.scale_param.bias_term = True
            layers.append((scale, [m.module.weight, m.module.bias]))
        for layer, blobs in layers:
            net.layer.add().CopyFrom(layer)
            stored = weights.layer.add()
            stored.CopyFrom(layer)
            stored.blobs.extend(_blob_proto(b) for b in blobs)
            bottom = layer.top[0]
    return net, weights


def save_torch_sequential(model: nn.Sequential, input_shape: Sequence[int], prototxt_path: str | os.PathLike,
                          caffemodel_path: str | os.PathLike, name: str = "net") -> None:
    """Write ``model`` as a deploy prototxt and a .caffemodel (each written atomically)."""
    net, weights = from_torch_sequential(model, input_shape, name)
    write_text(prototxt_path, net)
    write_binary(caffemodel_path, weights)
