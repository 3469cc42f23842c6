"""Net drawing: a NetParameter as a graph (pycaffe's caffe/draw.py).

Layers are ``record`` boxes labelled ``name (Type)`` (+ kernel size/stride/pad for Convolution,
Deconvolution and Pooling, + learning-rate multipliers on request), coloured by type; in-place
layers are green; blobs are grey octagons (a blob last seen as a layer's top keeps graphviz's plain
ellipse, as in pycaffe); edges out of Data/Convolution/InnerProduct layers carry the batch size or
``num_output``. Nodes are named by their labels, as pycaffe names them.

Rendering: graphviz's ``dot`` through pydot when it is installed. Without it, ``.dot``/``.gv``/
``.raw`` files get pydot's DOT text, and images (png, svg, pdf, jpg, ...) are drawn by
:mod:`recaffe.draw_fallback` with matplotlib (a simple layered layout). The log says which.

Choices where pycaffe is loose: ``rankdir`` must be LR, TB, BT or RL (dot would fail later);
an ``include``/``exclude`` rule without a ``phase`` matches every phase (pycaffe reads it as
TRAIN); the shared style dicts are never modified (pycaffe mutates LAYER_STYLE_DEFAULT).
"""
from __future__ import annotations

import os
import shutil

try:
    import pydot
except ImportError as e:  # an optional dependency: recaffe[tools]
    raise ImportError("drawing nets needs pydot: pip install 'recaffe[tools]' (pydot, matplotlib)") from e

from .errors import RecaffeError
from .io.protofiles import atomic_write
from .log import get_logger
from .proto import caffe_pb2

log = get_logger(__name__)

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}
RANKDIRS = ("LR", "TB", "BT", "RL")
_LAYER_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
                 "InnerProduct": "#CC33FF"}
_LEARNING_TYPES = ("Convolution", "Deconvolution", "InnerProduct")
# formats whose output is the graph's text; written without graphviz when dot is absent
TEXT_FORMATS = ("dot", "gv", "raw")


class DrawError(RecaffeError, ValueError):
    pass


def get_pooling_types_dict() -> dict[int, str]:
    """PoolingParameter.PoolMethod number -> name (MAX, AVE, STOCHASTIC)."""
    return {v.number: k for k, v in caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR.values_by_name.items()}


def get_edge_label(layer: caffe_pb2.LayerParameter) -> str:
    """The label of a layer's top edges: ``Batch N`` for Data, ``num_output`` for conv/IP."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return '""'


def get_layer_lr_mult(layer: caffe_pb2.LayerParameter) -> tuple[float, float]:
    """(weights, bias) lr_mult of a Convolution/Deconvolution/InnerProduct layer (1.0 when unset)."""
    if layer.type not in _LEARNING_TYPES:
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    mults = [p.lr_mult for p in layer.param]
    if len(mults) > 2:
        raise ValueError(f"layer {layer.name}: could not parse the learning rate multiplier "
                         f"({len(mults)} param entries)")
    return tuple(mults + [1.0] * (2 - len(mults)))


def get_layer_label(layer: caffe_pb2.LayerParameter, rankdir: str, display_lrm: bool = False) -> str:
    """The quoted node label: words joined by spaces when vertical (TB/BT), by newlines otherwise."""
    separator = " " if rankdir in ("TB", "BT") else r"\n"
    parts = [layer.name]
    if layer.type == "Pooling":
        parts.append(f"({layer.type} {get_pooling_types_dict()[layer.pooling_param.pool]})")
    else:
        parts.append(f"({layer.type})")
    if layer.type in ("Convolution", "Deconvolution", "Pooling"):
        if layer.type == "Pooling":
            p = layer.pooling_param
            kernel, stride, pad = p.kernel_size, p.stride, p.pad
        else:  # pycaffe shows the first of the repeated values only
            p = layer.convolution_param
            kernel = p.kernel_size[0] if len(p.kernel_size) else 1
            stride = p.stride[0] if len(p.stride) else 1
            pad = p.pad[0] if len(p.pad) else 0
        parts.append(separator.join([f"kernel size: {kernel}", f"stride: {stride}", f"pad: {pad}"]))
    if display_lrm and layer.type in _LEARNING_TYPES:
        weights, bias = get_layer_lr_mult(layer)
        if weights or bias:
            parts.append(f"lr mult: {weights:.1f}, {bias:.1f}")
    return '"%s"' % separator.join(parts)


def choose_color_by_layertype(layertype: str) -> str:
    return _LAYER_COLORS.get(layertype, "#6495ED")


def _in_phase(layer: caffe_pb2.LayerParameter, phase) -> bool:
    if phase is None:
        return True
    if len(layer.include) and len(layer.exclude):
        raise ValueError(f"layer {layer.name} has both include and exclude specified.")
    matches = [not r.HasField("phase") or r.phase == phase for r in layer.include]
    if len(layer.include):
        return any(matches)
    return not any(not r.HasField("phase") or r.phase == phase for r in layer.exclude)


def get_pydot_graph(caffe_net: caffe_pb2.NetParameter, rankdir: str, label_edges: bool = True,
                    phase=None, display_lrm: bool = False) -> pydot.Dot:
    """The net as a pydot digraph; ``phase`` (caffe.TRAIN/TEST) keeps only that phase's layers."""
    if rankdir not in RANKDIRS:
        raise DrawError(f"rankdir must be one of {', '.join(RANKDIRS)}, got {rankdir!r}")
    if len(caffe_net.layers) and not len(caffe_net.layer):
        raise DrawError(f"net {caffe_net.name!r} uses the V1 layer format (`layers {{ ... }}`); "
                        "upgrade it with upgrade_net_proto_text first")
    graph = pydot.Dot(caffe_net.name or "Net", graph_type="digraph", rankdir=rankdir)
    nodes: dict[str, pydot.Node] = {}
    edges: list[tuple[str, str, str]] = []
    for layer in caffe_net.layer:
        if not _in_phase(layer, phase):
            continue
        key = f"{layer.name}_{layer.type}"
        label = get_layer_label(layer, rankdir, display_lrm)
        if len(layer.bottom) == 1 and len(layer.top) == 1 and layer.bottom[0] == layer.top[0]:
            nodes[key] = pydot.Node(label, **NEURON_LAYER_STYLE)  # in place
        else:
            nodes[key] = pydot.Node(label, **dict(LAYER_STYLE_DEFAULT,
                                                   fillcolor=choose_color_by_layertype(layer.type)))
        for bottom in layer.bottom:
            nodes[bottom + "_blob"] = pydot.Node(bottom, **BLOB_STYLE)
            edges.append((bottom + "_blob", key, '""'))
        for top in layer.top:
            nodes[top + "_blob"] = pydot.Node(top)
            edges.append((key, top + "_blob", get_edge_label(layer) if label_edges else '""'))
    for node in nodes.values():
        graph.add_node(node)
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(nodes[src], nodes[dst], label=label))
    return graph


def find_dot() -> str | None:
    """Path of graphviz's ``dot`` program, or None (tests monkeypatch this to force the fallback)."""
    return shutil.which("dot")


def render(graph: pydot.Dot, ext: str = "png", renderer: str = "auto") -> bytes:
    """``graph`` encoded as ``ext``. renderer: 'auto' (dot if installed), 'dot' or 'matplotlib'."""
    if renderer not in ("auto", "dot", "matplotlib"):
        raise DrawError(f"renderer must be auto, dot or matplotlib, got {renderer!r}")
    ext = ext.lower()
    dot = find_dot() if renderer != "matplotlib" else None
    if renderer == "dot" and dot is None:
        raise DrawError("graphviz's 'dot' program was not found on PATH (install graphviz, or use "
                        "renderer='matplotlib')")
    if ext == "raw" or (ext in TEXT_FORMATS and dot is None):
        log.info("Writing the graph as DOT text (pydot)")
        return graph.to_string().encode("utf-8")
    if dot is not None:
        log.info("Rendering %s with graphviz (%s)", ext, dot)
        try:
            return graph.create(prog=dot, format=ext)
        except (AssertionError, OSError) as e:  # pydot reports dot's failures as AssertionError
            raise DrawError(f"graphviz's dot could not render format {ext!r}: {e}") from None
    try:
        from . import draw_fallback
    except ImportError as e:
        raise DrawError(f"cannot draw {ext}: graphviz's dot is not installed and matplotlib is "
                        "missing (pip install 'recaffe[tools]')") from e
    log.info("Rendering %s with matplotlib (graphviz's dot %s)", ext,
             "not used" if renderer == "matplotlib" else "not found")
    try:
        return draw_fallback.render(graph, ext)
    except ValueError as e:
        raise DrawError(str(e)) from None


def draw_net(caffe_net: caffe_pb2.NetParameter, rankdir: str, ext: str = "png", phase=None,
             display_lrm: bool = False, renderer: str = "auto") -> bytes:
    """The net drawn as ``ext`` (png, svg, pdf, dot, ...): the file's bytes."""
    return render(get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm), ext, renderer)


def draw_net_to_file(caffe_net: caffe_pb2.NetParameter, filename: str | os.PathLike, rankdir: str = "LR",
                     phase=None, display_lrm: bool = False, renderer: str = "auto") -> None:
    """Draw the net into ``filename``, in the format its extension names (``.raw``: DOT text)."""
    filename = os.fspath(filename)
    ext = filename[filename.rfind(".") + 1:] if "." in os.path.basename(filename) else ""
    if not ext:
        raise DrawError(f"{filename}: no file extension to choose the image format from")
    atomic_write(filename, draw_net(caffe_net, rankdir, ext, phase, display_lrm, renderer))
