"""A pydot graph drawn with matplotlib, for machines without graphviz's ``dot``.

A simple layered (Sugiyama-style) layout: edges that close a cycle (in-place layers: blob -> ReLU
-> same blob) are reversed for ranking; nodes get the longest-path rank from the sources; edges
spanning several ranks pass through virtual points, one per rank, so they go around the nodes;
barycentre sweeps order each rank to reduce crossings; a priority placement keeps the net's main
path straight and puts side nodes (in-place layers, outputs) beside it; ranks follow ``rankdir``
(LR, RL, TB, BT). Nodes keep the graph's labels, shapes (record -> box, octagon, ellipse) and fill
colours; edges are arrows ending at the node outlines, labelled beside their last segment.
Sizes are in points (1 unit = 1/72 inch), so text and boxes match at any dpi.
"""
from __future__ import annotations

import io
import math

import pydot
from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FONT_SIZE = 9.0
_CHAR_W, _LINE_H, _PAD = 0.62 * FONT_SIZE, 1.35 * FONT_SIZE, 6.0
_RANK_GAP, _NODE_GAP, _MARGIN = 45.0, 18.0, 12.0
_VIRTUAL_SIZE = 4.0
_MAX_SIDE, _MAX_AREA = 30000, 1e8  # pixels: below Agg's size limit and ~400 MB of RGBA


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    for escape in ("\\n", "\\l", "\\r"):
        text = text.replace(escape, "\n")
    return text.replace('\\"', '"')


class _Node:
    def __init__(self, name: str, attrs: dict):
        self.name = name
        self.text = _unquote(str(attrs.get("label", name)))
        self.shape = _unquote(str(attrs.get("shape", "ellipse")))
        self.fill = _unquote(str(attrs.get("fillcolor", "white"))) if "filled" in str(
            attrs.get("style", "")) else "white"
        lines = self.text.split("\n")
        self.w = max(len(line) for line in lines) * _CHAR_W + 2 * _PAD
        self.h = len(lines) * _LINE_H + 2 * _PAD
        if self.shape != "record":  # octagons and ellipses need room around the text
            self.w, self.h = self.w * 1.25, self.h * 1.3
        self.rank = 0
        self.order = 0.0
        self.x = self.y = 0.0


def _graph(graph: pydot.Dot) -> tuple[dict[str, _Node], list[tuple[str, str, str]]]:
    nodes: dict[str, _Node] = {}
    for n in graph.get_nodes():
        if n.get_name() not in ("node", "edge", "graph"):
            nodes[n.get_name()] = _Node(n.get_name(), n.get_attributes())
    edges: list[tuple[str, str, str]] = []
    merged: dict[tuple[str, str], int] = {}
    for e in graph.get_edges():
        src, dst = str(e.get_source()), str(e.get_destination())
        for name in (src, dst):
            nodes.setdefault(name, _Node(name, {}))
        label = _unquote(str(e.get_label() or ""))
        if (src, dst) in merged:  # parallel edges (one layer per phase) share one arrow
            i = merged[(src, dst)]
            edges[i] = (src, dst, "\n".join(x for x in (edges[i][2], label) if x))
            continue
        merged[(src, dst)] = len(edges)
        edges.append((src, dst, label))
    return nodes, edges


def _ranks(nodes: dict[str, _Node], edges: list[tuple[str, str, str]]) -> set[tuple[str, str]]:
    """Assign longest-path ranks; return the edges reversed to break cycles."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for src, dst, _ in edges:
        succ[src].append(dst)
    state, back = {}, set()
    for root in nodes:  # iterative DFS in insertion order; grey->grey edges close cycles
        if root in state:
            continue
        stack = [(root, iter(succ[root]))]
        state[root] = "grey"
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = "black"
                stack.pop()
            elif state.get(nxt) == "grey":
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = "grey"
                stack.append((nxt, iter(succ[nxt])))
    dag = {n: [] for n in nodes}
    indegree = {n: 0 for n in nodes}
    for src, dst, _ in edges:
        a, b = (dst, src) if (src, dst) in back else (src, dst)
        if a != b:
            dag[a].append(b)
            indegree[b] += 1
    ready = [n for n in nodes if indegree[n] == 0]
    while ready:  # Kahn's order: every node after all its predecessors
        node = ready.pop(0)
        for nxt in dag[node]:
            nodes[nxt].rank = max(nodes[nxt].rank, nodes[node].rank + 1)
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    return back


def _chains(nodes: dict[str, _Node], edges: list[tuple[str, str, str]],
            back: set[tuple[str, str]]) -> list[list[str]]:
    """Each edge as the list of nodes it passes: a virtual node in every rank it crosses, so long
    edges are routed around the real nodes."""
    chains = []
    for i, (src, dst, _) in enumerate(edges):
        a, b = (dst, src) if (src, dst) in back else (src, dst)
        path = [a]
        for k, rank in enumerate(range(nodes[a].rank + 1, nodes[b].rank)):
            virtual = _Node(f"\0edge{i}.{k}", {"label": "", "shape": "point"})
            virtual.w = virtual.h = _VIRTUAL_SIZE
            virtual.rank = rank
            nodes[virtual.name] = virtual
            path.append(virtual.name)
        path.append(b)
        chains.append(path if (src, dst) not in back else path[::-1])
    return chains


def _order(nodes: dict[str, _Node],
           chains: list[list[str]]) -> tuple[list[list[_Node]], dict[str, list[str]]]:
    """Nodes by rank, each rank ordered by barycentre sweeps; and every node's neighbours."""
    ranks: list[list[_Node]] = [[] for _ in range(max(n.rank for n in nodes.values()) + 1)]
    for n in nodes.values():
        ranks[n.rank].append(n)
    for layer in ranks:
        for i, n in enumerate(layer):
            n.order = float(i)
    neighbours: dict[str, list[str]] = {n: [] for n in nodes}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            neighbours[a].append(b)
            neighbours[b].append(a)
    for sweep in range(6):  # alternate downward and upward barycentre passes
        sequence = ranks[1:] if sweep % 2 == 0 else ranks[-2::-1]
        for layer in sequence:
            for n in layer:
                near = [nodes[m].order for m in neighbours[n.name] if nodes[m].rank != n.rank]
                n.order = sum(near) / len(near) if near else n.order
            layer.sort(key=lambda n: n.order)
            for i, n in enumerate(layer):
                n.order = float(i)
    return ranks, neighbours


def _settle(layer: list[_Node], want: dict[str, float], priority: dict[str, int], size) -> list[float]:
    """Centres for one rank: nodes taken by priority go to their wanted place, as far as the nodes
    already placed (and room for those between) allow; the order never changes."""
    pos: list[float | None] = [None] * len(layer)
    for i in sorted(range(len(layer)), key=lambda i: -priority[layer[i].name]):
        lo, hi = -math.inf, math.inf
        room = size(layer[i]) / 2
        for j in range(i - 1, -1, -1):
            room += _NODE_GAP + size(layer[j])
            if pos[j] is not None:
                lo = pos[j] + room - size(layer[j]) / 2
                break
        room = size(layer[i]) / 2
        for j in range(i + 1, len(layer)):
            room += _NODE_GAP + size(layer[j])
            if pos[j] is not None:
                hi = pos[j] - room + size(layer[j]) / 2
                break
        pos[i] = min(max(want[layer[i].name], lo), hi)
    return pos


def _across(ranks: list[list[_Node]], neighbours: dict[str, list[str]], nodes: dict[str, _Node],
            size) -> dict[str, float]:
    """Positions across the ranks (a priority layout): each node near the mean of its neighbours in
    the rank it is placed from; long-edge points and nodes with neighbours on both sides (the
    net's main path) win over side branches such as in-place layers, so chains stay straight."""
    pos: dict[str, float] = {}
    for layer in ranks:
        c = 0.0
        for n in layer:
            pos[n.name] = c + size(n) / 2
            c += size(n) + _NODE_GAP
    priority = {n: (1000 if nodes[n].shape == "point" else 0)
                + len({m for m in near if nodes[m].rank != nodes[n].rank})
                + len({nodes[m].rank for m in near if nodes[m].rank != nodes[n].rank})
                for n, near in neighbours.items()}
    # nodes with a single neighbour: in-place layers beside their blob, the net's outputs
    leaves = {n for n, near in neighbours.items() if len(set(near)) == 1}
    for sweep in range(7):  # down, up, ..., down: the last pass aligns every node under its parents
        sequence = ranks[1:] if sweep % 2 == 0 else ranks[-2::-1]
        for layer in sequence:
            side = layer[0].rank + (-1 if sweep % 2 == 0 else 1)
            want = {}
            for n in layer:
                near = ([m for m in set(neighbours[n.name]) if nodes[m].rank == side]
                        or [m for m in set(neighbours[n.name]) if nodes[m].rank != n.rank])
                near = [m for m in near if m not in leaves] or near  # leaves follow, not lead
                want[n.name] = sum(pos[m] for m in near) / len(near) if near else pos[n.name]
            for n, c in zip(layer, _settle(layer, want, priority, size)):
                pos[n.name] = c
    low = min(pos[n.name] - size(n) / 2 for layer in ranks for n in layer)
    return {k: v - low + _MARGIN for k, v in pos.items()}


def _place(ranks: list[list[_Node]], neighbours: dict[str, list[str]], nodes: dict[str, _Node],
           rankdir: str) -> tuple[float, float]:
    """Set node centres; return the drawing's (width, height) in points."""
    vertical = rankdir in ("TB", "BT")
    size = (lambda n: n.w) if vertical else (lambda n: n.h)
    across = _across(ranks, neighbours, nodes, size)
    breadth = max(across[n.name] + size(n) / 2 for layer in ranks for n in layer) + _MARGIN
    along = _MARGIN
    for layer in ranks:
        depth = max((n.h if vertical else n.w) for n in layer)
        for n in layer:
            middle = along + depth / 2
            n.x, n.y = (across[n.name], middle) if vertical else (middle, across[n.name])
        along += depth + _RANK_GAP
    total_along = along - _RANK_GAP + _MARGIN
    width, height = (breadth, total_along) if vertical else (total_along, breadth)
    for layer in ranks:  # matplotlib's y grows upwards; flip for TB and keep rows top-down for LR
        for n in layer:
            if rankdir == "RL":
                n.x = width - n.x
            if rankdir in ("TB", "LR", "RL"):
                n.y = height - n.y
    return width, height


def _boundary(n: _Node, towards: tuple[float, float]) -> tuple[float, float]:
    """Where the ray from ``n``'s centre to ``towards`` leaves its outline (arrows end there)."""
    dx, dy = towards[0] - n.x, towards[1] - n.y
    if n.shape == "point" or (dx == 0 and dy == 0):
        return n.x, n.y
    hw, hh = n.w / 2, n.h / 2
    if n.shape in ("record", "box", "octagon"):
        t = min(hw / abs(dx) if dx else math.inf, hh / abs(dy) if dy else math.inf)
        if n.shape == "octagon":  # the corners are cut along |x| + |y| = hw + hh - cut
            t = min(t, (hw + hh - _octagon_cut(n)) / (abs(dx) + abs(dy)))
    else:
        t = 1 / math.hypot(dx / hw, dy / hh)
    return n.x + t * dx, n.y + t * dy


def _octagon_cut(n: _Node) -> float:
    return min(n.w, n.h) * 0.29


def _patch(n: _Node):
    style = dict(facecolor=n.fill, edgecolor="black", linewidth=0.8)
    if n.shape == "record" or n.shape == "box":
        return patches.Rectangle((n.x - n.w / 2, n.y - n.h / 2), n.w, n.h, **style)
    if n.shape == "octagon":
        cut = _octagon_cut(n)
        hw, hh = n.w / 2, n.h / 2
        corners = [(-hw + cut, -hh), (hw - cut, -hh), (hw, -hh + cut), (hw, hh - cut),
                   (hw - cut, hh), (-hw + cut, hh), (-hw, hh - cut), (-hw, -hh + cut)]
        return patches.Polygon([(n.x + dx, n.y + dy) for dx, dy in corners], closed=True, **style)
    return patches.Ellipse((n.x, n.y), n.w, n.h, **style)


def render(graph: pydot.Dot, ext: str = "png", dpi: float = 96.0) -> bytes:
    """``graph`` drawn as image format ``ext`` (any format matplotlib writes: png, svg, pdf, ...)."""
    nodes, edges = _graph(graph)
    rankdir = _unquote(str(graph.get("rankdir") or "TB"))
    fig = Figure()
    canvas = FigureCanvasAgg(fig)
    if ext not in canvas.get_supported_filetypes():
        raise ValueError(f"cannot draw format {ext!r} without graphviz's dot (matplotlib writes: "
                         f"{', '.join(sorted(canvas.get_supported_filetypes()))})")
    if not nodes:
        nodes = {"": _Node("", {"label": "(empty net)", "shape": "plaintext"})}
    back = _ranks(nodes, edges)
    chains = _chains(nodes, edges, back)
    ranks, neighbours = _order(nodes, chains)
    width, height = _place(ranks, neighbours, nodes, rankdir)
    dpi = min(dpi, _MAX_SIDE * 72.0 / max(width, height), math.sqrt(_MAX_AREA / (width * height)) * 72.0)
    fig.set_size_inches(width / 72.0, height / 72.0)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    for n in nodes.values():
        if n.shape == "point":
            continue
        if n.shape not in ("plaintext", "plain", "none"):
            ax.add_patch(_patch(n))
        ax.text(n.x, n.y, n.text, ha="center", va="center", fontsize=FONT_SIZE, linespacing=1.2)
    pairs = {(s, d) for s, d, _ in edges}
    vertical = rankdir in ("TB", "BT")
    for (src, dst, label), chain in zip(edges, chains):
        points = [(nodes[name].x, nodes[name].y) for name in chain]
        curved = len(chain) == 2 and ((src, dst) in back or (dst, src) in pairs)  # a cycle's 2 arrows
        points[0] = _boundary(nodes[chain[0]], points[1])
        points[-1] = _boundary(nodes[chain[-1]], points[-2])
        for k, (p, q) in enumerate(zip(points, points[1:])):
            last = k == len(points) - 2
            ax.add_patch(patches.FancyArrowPatch(
                p, q, arrowstyle="-|>" if last else "-", mutation_scale=9, linewidth=0.8, color="black",
                shrinkA=0, shrinkB=0, connectionstyle=f"arc3,rad={0.3 if curved else 0.0}"))
        if label:  # beside the middle of the last segment, as graphviz puts edge labels
            (px, py), (qx, qy) = points[-2], points[-1]
            ax.text((px + qx) / 2 + (3 if vertical else 0), (py + qy) / 2 + (0 if vertical else 3),
                    label, ha="left" if vertical else "center", va="center" if vertical else "bottom",
                    fontsize=FONT_SIZE - 1)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=ext, dpi=dpi)
    return buffer.getvalue()

