"""pycaffe's NetSpec: write a net as Python calls and get its ``NetParameter``.

    import caffe
    from caffe import layers as L, params as P

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 28, 28]))
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type='xavier'))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.relu1 = L.ReLU(n.pool1, in_place=True)
    print(n.to_proto())          # the prototxt text, as pycaffe prints it

Behaviour follows pycaffe's ``python/caffe/net_spec.py``:

* ``L.<Type>(*bottoms, ntop=1, in_place=False, **kwargs)`` describes one layer. It returns its
  top (``ntop=1``), a tuple of tops (``ntop>1``) or the layer itself (``ntop=0``).
* A keyword whose name ends in ``param`` (``param``, ``transform_param``, ``loss_param``...) is set
  on the LayerParameter. Any other keyword goes into the layer's own ``<type>_param`` message
  (``ConvolutionParameter`` -> ``convolution_param``, found from the schema's message names); when
  the type has no such message or the message has no such field, it is set on the LayerParameter
  itself (``loss_weight``, ``include``, ``name``...).
* Values: lists fill repeated fields (a scalar given to a repeated field becomes a one-element
  list), dicts fill messages, lists of dicts add repeated messages. Tuples count as lists here
  (pycaffe accepts only lists; this is a convenience and changes no text pycaffe can produce).
* Names: a top assigned to ``n.<name>`` is called ``<name>``; a layer is named after its first
  top; anything unnamed is called ``<Type><k>`` with one counter per type. An in-place layer's top
  is its bottom. Layers are emitted in dependency order, each once.
* ``str(n.to_proto())`` is the text pycaffe printed: fields in the order ``caffe.proto`` declares
  them (so ``stride`` before ``group`` in ``convolution_param``), one line per repeated value,
  floats as the shortest of ``%.6g``/``%.9g`` that reads back as the same float32. The protobuf
  recaffe requires prints fields in field-number order, so importing this module gives
  ``NetParameter`` a ``__str__`` that prints this way (see ``message_to_text``); parsing either
  text gives the same message.
"""
from __future__ import annotations

import math
import struct
from collections import Counter, OrderedDict

from google.protobuf import descriptor as _descriptor

from .proto import caffe_pb2

__all__ = ["Function", "Layers", "NetSpec", "Parameters", "Top", "assign_proto", "layers",
           "message_to_text", "param_name_dict", "params", "to_proto"]


def param_name_dict() -> dict[str, str]:
    """Map a layer type to the stem of its ``*_param`` field, read off the schema:
    ``{'Convolution': 'convolution', 'InnerProduct': 'inner_product', 'LRN': 'lrn', ...}``."""
    mapping = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_stem = field.message_type.name[:-len("Parameter")]
            mapping[type_stem] = field.name[:-len("_param")]
    return mapping


_param_names = param_name_dict()


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple))


def assign_proto(proto, name: str, value) -> None:
    """Set field ``name`` of message ``proto`` from a Python value (recursively): lists fill
    repeated fields, dicts fill sub-messages, other values are assigned as they are. A whole float
    given to an integer field is taken as that integer: model scripts written for Python 2 compute
    sizes with ``/`` (the SSD fork's model_libs: ``pad = (kernel_size - 1) / 2``).

    An unknown field raises AttributeError (the caller uses that to fall back to the
    LayerParameter, as pycaffe does)."""
    field = getattr(proto, name)
    value = _whole_floats_as_ints(proto, name, value)
    is_repeated = hasattr(field, "extend")
    if is_repeated and not _is_list(value):
        value = [value]
    if _is_list(value):
        if not is_repeated:
            # An AttributeError, as pycaffe's failed extend(), so the caller falls back the same way.
            raise AttributeError(f"field {name!r} of {type(proto).__name__} is not repeated; got {value!r}")
        if value and isinstance(value[0], dict):
            for item in value:
                sub = field.add()
                for k, v in item.items():
                    assign_proto(sub, k, v)
        else:
            field.extend(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            assign_proto(field, k, v)
    else:
        setattr(proto, name, value)


_FD = _descriptor.FieldDescriptor
_INT_TYPES = {_FD.TYPE_INT32, _FD.TYPE_INT64, _FD.TYPE_UINT32, _FD.TYPE_UINT64, _FD.TYPE_SINT32, _FD.TYPE_SINT64}


def _whole_floats_as_ints(proto, name: str, value):
    fd = proto.DESCRIPTOR.fields_by_name.get(name)
    if fd is None or fd.type not in _INT_TYPES:
        return value

    def conv(v):
        return int(v) if isinstance(v, float) and v.is_integer() else v

    return [conv(v) for v in value] if _is_list(value) else conv(value)


class _NoSuchTop(AttributeError, KeyError):
    """``n.missing``: pycaffe raises KeyError; being an AttributeError too keeps hasattr() working."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class Top:
    """One output blob of a layer (``fn``), the ``n``-th of its tops."""

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """A NetParameter with every layer needed to compute this top (names are automatic)."""
        return to_proto(self)

    def _update(self, params: dict) -> None:
        self.fn._update(params)

    def _to_proto(self, layers, names, autonames) -> None:
        return self.fn._to_proto(layers, names, autonames)

    def __repr__(self) -> str:
        return f"<Top {self.n} of {self.fn.type_name} layer>"


class Function:
    """One layer: its type, its input Tops and its keyword parameters."""

    def __init__(self, type_name: str, inputs, params: dict):
        self.type_name = type_name
        for index, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(inp)})")
        self.inputs = inputs
        self.params = params
        # ntop and in_place shape the layer; they are not proto fields.
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names, autonames) -> str:
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top: Top, names, autonames) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _update(self, params: dict) -> None:
        self.params.update(params)

    def _to_proto(self, layers, names, autonames) -> None:
        if self in layers:
            return
        # Inputs first: their layers come earlier in the net and get their names first.
        bottom_names = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottom_names.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            for top in self.tops:
                layer.top.append(self._get_top_name(top, names, autonames))
        layer.name = self._get_name(names, autonames)

        for key, value in self.params.items():
            if key.endswith("param"):
                assign_proto(layer, key, value)
                continue
            try:
                assign_proto(getattr(layer, _param_names[self.type_name] + "_param"), key, value)
            except (AttributeError, KeyError):
                # The type has no *_param message, or the message has no such field.
                assign_proto(layer, key, value)
        layers[self] = layer

    def __repr__(self) -> str:
        return f"<{self.type_name} layer with {self.ntop} top(s)>"


def to_proto(*tops: Top) -> caffe_pb2.NetParameter:
    """A NetParameter with every layer needed to compute ``tops``, all names automatic."""
    layers: OrderedDict = OrderedDict()
    autonames: Counter = Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


class NetSpec:
    """Tops assigned as attributes (``n.conv1 = L.Convolution(...)``) or items (``n['conv1']``)
    take those names; ``to_proto()`` emits every layer they need, in dependency order."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # keep copy/pickle/inspect from seeing tops here
        try:
            return self.tops[name]
        except KeyError:
            raise _NoSuchTop(f"NetSpec has no top named {name!r} (tops: {list(self.tops)})") from None

    def __setitem__(self, key: str, value) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str):
        return self.__getattr__(item)

    def __delitem__(self, name: str) -> None:
        del self.tops[name]

    def keys(self) -> list[str]:
        return list(self.tops)

    def vals(self) -> list:
        return list(self.tops.values())

    def update(self, name: str, params: dict) -> None:
        """Add or change keyword parameters of the layer behind top ``name``."""
        self.tops[name]._update(params)

    def to_proto(self) -> caffe_pb2.NetParameter:
        # A value assigned under several names takes the last one, as in pycaffe.
        names = {v: k for k, v in self.tops.items()}
        autonames: Counter = Counter()
        layers: OrderedDict = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``layers.<Type>(*bottoms, **kwargs)`` describes a layer of that type (any name works,
    as in pycaffe: the type is checked when the net is built)."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops

        layer_fn.__name__ = name
        return layer_fn


class _ParamConstants:
    """The constants of one ``<Name>Parameter`` message (its enum values), by name."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, param_name: str):
        if param_name.startswith("__") and param_name.endswith("__"):
            raise AttributeError(param_name)
        message = getattr(caffe_pb2, self._name + "Parameter", None)
        if message is None:
            raise AttributeError(f"caffe.proto has no message {self._name}Parameter")
        try:
            return getattr(message, param_name)
        except AttributeError:
            raise AttributeError(f"{self._name}Parameter has no constant {param_name!r}") from None


class Parameters:
    """``params.Pooling.MAX`` is ``caffe_pb2.PoolingParameter.MAX`` (enum values by name)."""

    def __getattr__(self, name: str) -> _ParamConstants:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _ParamConstants(name)


layers = Layers()
params = Parameters()


# --------------------------------------------------------------------------- text format
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "'": "\\'", "\\": "\\\\"}


def _is_repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)
    return flag if flag is not None else field.label == _FD.LABEL_REPEATED


def _float32(x: float) -> float | None:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return None


def _format_float(value: float, single: bool) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    # C's round-trip printing: FLT_DIG/DBL_DIG significant digits, more only when needed.
    short, full = (6, 9) if single else (15, 17)
    text = "%.*g" % (short, value)
    same = _float32(float(text)) == _float32(value) if single else float(text) == value
    return text if same else "%.*g" % (full, value)


def _format_string(value, is_bytes: bool) -> str:
    raw = value if is_bytes else value.encode("utf-8")
    parts = []
    for byte in raw:
        ch = chr(byte)
        if ch in _ESCAPES:
            parts.append(_ESCAPES[ch].encode("ascii"))
        elif byte < 0x20 or byte == 0x7F or (is_bytes and byte >= 0x80):
            parts.append(b"\\%03o" % byte)
        else:
            parts.append(bytes([byte]))  # UTF-8 text of string fields passes through as it is
    return '"' + b"".join(parts).decode("utf-8", errors="backslashreplace") + '"'


def _format_scalar(field, value) -> str:
    t = field.type
    if t == _FD.TYPE_FLOAT:
        return _format_float(value, True)
    if t == _FD.TYPE_DOUBLE:
        return _format_float(value, False)
    if t == _FD.TYPE_BOOL:
        return "true" if value else "false"
    if t == _FD.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else str(value)
    if t in (_FD.TYPE_STRING, _FD.TYPE_BYTES):
        return _format_string(value, t == _FD.TYPE_BYTES)
    return str(value)


def _print_message(msg, indent: str, out: list) -> None:
    for field in msg.DESCRIPTOR.fields:  # declaration order
        if _is_repeated(field):
            values = getattr(msg, field.name)
            if not len(values):
                continue
        elif not msg.HasField(field.name):
            continue
        else:
            values = [getattr(msg, field.name)]
        if field.type in (_FD.TYPE_MESSAGE, _FD.TYPE_GROUP):
            for sub in values:
                out.append(f"{indent}{field.name} {{\n")
                _print_message(sub, indent + "  ", out)
                out.append(f"{indent}}}\n")
        else:
            for v in values:
                out.append(f"{indent}{field.name}: {_format_scalar(field, v)}\n")


def message_to_text(msg) -> str:
    """A message in pycaffe's text format: protobuf's text syntax with fields in declaration order
    and C-style round-trip floats (the text pycaffe's ``str(net_param)`` gave)."""
    out: list[str] = []
    _print_message(msg, "", out)
    return "".join(out)


def _net_parameter_str(self) -> str:
    return message_to_text(self)


# str(n.to_proto()) must print as pycaffe did; protobuf's message classes cannot be subclassed,
# so the method is set on the class (printing only: parsing and serialising are untouched).
caffe_pb2.NetParameter.__str__ = _net_parameter_str
