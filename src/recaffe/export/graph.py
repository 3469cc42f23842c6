"""A recaffe Net as a dataflow graph for the exporters: layer order, single-assignment values,
graph inputs and outputs, and one lowered node per exported layer.

The walk follows the net as built (usually TEST phase, weights loaded, current blob shapes):

* inputs: the tops of Input layers and of data layers (Data, DummyData, ImageData, ...), with
  the shapes the net gave them; a data layer's label top that no layer consumes is dropped (a
  TEST net usually leaves it unused), from the inputs and from the outputs;
* Split layers and Dropout in TEST (identity) add no node: their tops are their bottom's value;
  Silence consumes its bottoms and adds nothing;
* outputs: the net's outputs (``net.outputs``) under their blob names;
* in-place layers write a new version of their blob: every value has one producer. The last
  version of a blob carries the blob's name; earlier ones are named ``blob@layer`` (the layer that
  wrote them; ``blob@k``, the k-th version, when that layer has the blob's name).

Each exported layer is lowered by the function registered for its type in
:data:`recaffe.export.lowering.LOWERINGS`; a type with none raises :class:`ExportError`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import RecaffeError
from ..proto import caffe_pb2


class ExportError(RecaffeError, ValueError):
    """A net that cannot be exported; the message names the layer and its type."""


# Layers whose tops are the net's inputs (their data comes from outside the graph).
DATA_TYPES = frozenset({"Input", "Data", "DummyData", "ImageData", "HDF5Data", "MemoryData",
                        "WindowData", "ImageSegData", "DenseImageData"})
# Layers that score a net against labels: no inference equivalent (a deploy net has none).
LOSS_TYPES = frozenset({"SoftmaxWithLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss",
                        "MultinomialLogisticLoss", "SigmoidCrossEntropyLoss", "ContrastiveLoss",
                        "Accuracy"})

# Other types refused with the reason why (filled by the modules that know them, e.g.
# segmentation_ops): type -> the explanation given in the ExportError.
REFUSED: dict[str, str] = {}


@dataclass
class Param:
    """A constant of the exported graph: a Caffe param blob (``learnable``) or a value derived
    from the layer's params and geometry (a folded statistic, a divisor map)."""

    array: np.ndarray
    learnable: bool = True


@dataclass
class Lowered:
    """What a lowering function returns: the node's resolved attributes and constants."""

    attrs: dict = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)


# A lowering returns ALIAS when every top is its first bottom's value (Split, Dropout in TEST).
ALIAS = Lowered(attrs={"alias": True})


@dataclass
class Node:
    layer: str                # the Caffe layer's name
    type: str                 # the Caffe type (Identity: an output renamed, added by the walk)
    inputs: list[str]         # value names
    outputs: list[str]
    input_shapes: list[tuple[int, ...]]
    output_shapes: list[tuple[int, ...]]
    attrs: dict
    params: dict[str, Param]


@dataclass
class ExportGraph:
    name: str
    inputs: list[tuple[str, tuple[int, ...]]]
    outputs: list[tuple[str, tuple[int, ...]]]
    nodes: list[Node]
    output_blobs: list[str]  # the Caffe blob of each output (its name, unless an input took it)


@dataclass
class LayerView:
    """What a lowering function sees: the layer (set up by the net) and its blob shapes."""

    layer: object
    bottom_shapes: list[tuple[int, ...]]
    top_shapes: list[tuple[int, ...]]

    @property
    def param(self) -> caffe_pb2.LayerParameter:
        return self.layer.layer_param

    def blob(self, i: int) -> np.ndarray:
        return np.array(self.layer.blobs[i].data, dtype=np.float32, copy=True)

    def error(self, message: str) -> ExportError:
        return ExportError(f"{self.layer.type} layer {self.layer.name!r}: {message}")


def build_graph(net) -> ExportGraph:
    """Walk ``net`` in layer order and lower every layer (see the module docstring)."""
    from .lowering import LOWERINGS

    names = list(net.blobs)
    blobs = list(net.blobs.values())
    consumers = Counter(b for ids in net.bottom_id_vecs for b in ids)
    input_names: set[str] = set()
    inputs: list[tuple[str, tuple[int, ...]]] = []
    dropped: set[int] = set()
    current: dict[int, tuple[int, int]] = {}   # blob id -> (blob id, version) of its value now
    versions: Counter = Counter()
    producer: dict[tuple[int, int], str] = {}  # value key -> the layer that wrote it
    pending: list[tuple[Node, list, list]] = []

    for i, layer in enumerate(net.layers):
        lname, ltype = layer.name, layer.type
        bottoms, tops = net.bottom_id_vecs[i], net.top_id_vecs[i]
        if ltype in DATA_TYPES:
            for j, bid in enumerate(tops):
                if ltype != "Input" and j > 0 and consumers[bid] == 0:
                    dropped.add(bid)  # an unused label top
                    continue
                current[bid] = (bid, 0)
                input_names.add(names[bid])
                inputs.append((names[bid], tuple(blobs[bid].shape)))
            continue
        if ltype in LOSS_TYPES:
            raise ExportError(f"{ltype} layer {lname!r} has no inference equivalent: loss and accuracy "
                              f"layers cannot be exported. Export a deploy net (without losses), or "
                              f"the TEST phase of a net whose losses are excluded from it.")
        if ltype in REFUSED:
            raise ExportError(f"{ltype} layer {lname!r}: {REFUSED[ltype]}")
        lower = LOWERINGS.get(ltype)
        if lower is None:
            raise ExportError(f"layer {lname!r} of type {ltype!r} cannot be exported: no mapping for "
                              f"type {ltype!r}. Supported types: {', '.join(sorted(LOWERINGS))}")
        view = LayerView(layer, [tuple(blobs[b].shape) for b in bottoms],
                         [tuple(blobs[t].shape) for t in tops])
        for b in bottoms:
            if b not in current:
                raise ExportError(f"{ltype} layer {lname!r}: bottom {names[b]!r} comes from a dropped "
                                  f"data top")
        lowered = lower(view)
        if lowered.attrs.get("alias"):
            for t in tops:
                current[t] = current[bottoms[0]]
            continue
        in_keys = [current[b] for b in bottoms]
        out_keys = []
        for t in tops:
            versions[t] += 1
            key = (t, versions[t])
            producer[key] = lname
            current[t] = key
            out_keys.append(key)
        node = Node(lname, ltype, [], [], view.bottom_shapes, view.top_shapes, lowered.attrs,
                    lowered.params)
        pending.append((node, in_keys, out_keys))

    def value_name(key: tuple[int, int]) -> str:
        bid, version = key
        name = names[bid]
        if version == 0 or (version == versions[bid] and name not in input_names):
            return name
        layer = producer[key]
        return f"{name}@{layer}" if layer != name else f"{name}@{version}"

    nodes = []
    for node, in_keys, out_keys in pending:
        node.inputs = [value_name(k) for k in in_keys]
        node.outputs = [value_name(k) for k in out_keys]
        nodes.append(node)

    used = {n for node in nodes for n in node.outputs} | input_names
    outputs, output_blobs = [], []
    for name in net.outputs:
        bid = names.index(name)
        if bid in dropped:
            continue
        value = value_name(current[bid])
        shape = tuple(blobs[bid].shape)
        if value != name:
            # an aliased output (Dropout, Split) or an input written in place: rename it
            target = name if name not in used else f"{name}:out"
            nodes.append(Node(name, "Identity", [value], [target], [shape], [shape], {}, {}))
            used.add(target)
            value = target
        outputs.append((value, shape))
        output_blobs.append(name)
    if not outputs:
        raise ExportError(f"net {net.name!r} has no outputs to export")
    return ExportGraph(net.name or "Net", inputs, outputs, nodes, output_blobs)


def registrar(table: dict):
    """A decorator factory filling ``table`` (type name -> function): ``@register("ReLU", ...)``.
    The lowerings and both emitters are such tables, keyed by Caffe type or lowered op."""
    def register(*types: str):
        def deco(fn):
            for t in types:
                table[t] = fn
            return fn
        return deco
    return register
