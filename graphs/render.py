"""The full picture of a (pruned) attribution graph with graphviz (``render --full``), and the notebook
``_repr_svg_``. The compact figure for papers is graphs/figure.py (choice) and graphs/_paper.py (drawing).

Layout: x is the token position — one column per position, the token
string under it — and y the layer, embeddings at the bottom and logits at the top. Only layers that hold
a node get a row, so a 26-layer model with a 30-node circuit stays compact. Nodes sharing a (layer,
position) cell sit side by side; a column is as wide as its fullest cell. Positions are pinned and drawn
with ``neato -n2`` (dot's own ranking would move nodes away from their token column).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsetrace.config import ImageConfig
from sparsetrace.errors import ConfigError, RenderError

from .export import NodeInfo, node_table
from .graph import AttributionGraph, NodeKind, _atomic_write
from .records import Cut, cut_of, store_cut
from .supernodes import is_supernode

__all__ = ["Layout", "layered_layout", "render", "to_svg", "repr_svg", "KIND_STYLE", "EDGE_COLORS"]

FORMATS = (".png", ".svg", ".pdf")
DOT_MISSING = "graphviz's `dot` binary was not found; install it with `apt-get install graphviz`"
# colour-blind-safe pair: blue excites, orange inhibits
EDGE_COLORS = {"positive": "#1f77b4", "negative": "#ff7f0e"}
KIND_STYLE = {
    "feature": {"shape": "box", "style": "rounded,filled", "fillcolor": "#d6e6f5"},
    "supernode": {"shape": "box", "style": "filled", "fillcolor": "#e8dcf5", "peripheries": "2"},
    "error": {"shape": "diamond", "style": "filled", "fillcolor": "#e0e0e0"},
    "token": {"shape": "box", "style": "filled", "fillcolor": "#f5f5dc"},
    "logit": {"shape": "box", "style": "filled,bold", "fillcolor": "#fbd5a5"},
}


@dataclass(frozen=True, eq=False)
class Layout:
    """Pinned node positions in points (y grows upwards), plus the axes' tick positions."""

    x: np.ndarray
    """float [N] centre x of every node."""
    y: np.ndarray
    """float [N] centre y of every node."""
    column_x: np.ndarray
    """float [T] centre x of each token position's column."""
    row_y: dict[int, float]
    """layer → y of its row (tokens: -1, logits: n_layers)."""
    width: float
    height: float


def layered_layout(graph: AttributionGraph, node_gap: float = 90.0, row_gap: float | None = None) -> Layout:
    """x = token position (columns as wide as their fullest cell), y = rank of the node's layer.

    ``row_gap=None``: 70 pt, or more when the picture would be over 2.5 times wider than tall."""
    lay = graph.layout
    n = graph.n_nodes
    layers = np.unique(lay.layer) if n else np.array([], dtype=np.int32)
    # slot of each node inside its (layer, pos) cell, in layout order
    cell_count: dict[tuple[int, int], int] = {}
    slot = np.zeros(n, dtype=np.int64)
    for i in range(n):
        key = (int(lay.layer[i]), int(lay.pos[i]))
        slot[i] = cell_count.get(key, 0)
        cell_count[key] = slot[i] + 1
    widest = np.ones(lay.n_pos, dtype=np.int64)
    for (_, p), c in cell_count.items():
        widest[p] = max(widest[p], c)
    col_w = widest * node_gap
    if row_gap is None:
        row_gap = max(70.0, float(col_w.sum()) / 2.5 / max(len(layers) - 1, 1))
    row_y = {int(layer): float(k) * row_gap for k, layer in enumerate(layers)}
    left = np.concatenate([[0.0], np.cumsum(col_w)[:-1]])
    column_x = left + col_w / 2
    x = np.zeros(n)
    y = np.zeros(n)
    for i in range(n):
        key = (int(lay.layer[i]), int(lay.pos[i]))
        m = cell_count[key]
        x[i] = column_x[key[1]] + (slot[i] - (m - 1) / 2) * node_gap
        y[i] = row_y[key[0]]
    height = (len(layers) - 1) * row_gap if len(layers) else 0.0
    return Layout(x=x, y=y, column_x=column_x, row_y=row_y, width=float(col_w.sum()), height=float(height))


def _kind_key(graph: AttributionGraph, info: NodeInfo, sup: np.ndarray) -> str:
    return "supernode" if sup[info.index] else info.kind


def _short(text: str, limit: int = 18) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _escape(text: str) -> str:
    # graphviz label escapes: backslash sequences like \n, \l are interpreted
    return text.replace("\\", "\\\\")


def _lines(lines: Sequence[str]) -> str:
    """A multi-line graphviz label; user text is escaped so it cannot inject graphviz escapes."""
    return "\\n".join(_escape(x) for x in lines)


def _legend_html() -> str:
    rows = []
    for name, style in KIND_STYLE.items():
        rows.append(f'<TR><TD BGCOLOR="{style["fillcolor"]}" WIDTH="18"> </TD><TD ALIGN="LEFT">{name}</TD></TR>')
    rows.append(f'<TR><TD><FONT COLOR="{EDGE_COLORS["positive"]}">━━</FONT></TD><TD ALIGN="LEFT">positive edge</TD></TR>')
    rows.append(f'<TR><TD><FONT COLOR="{EDGE_COLORS["negative"]}">━━</FONT></TD><TD ALIGN="LEFT">negative edge</TD></TR>')
    rows.append('<TR><TD COLSPAN="2" ALIGN="LEFT">width ∝ |weight|</TD></TR>')
    return '<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="2" COLOR="#999999">' + "".join(rows) + "</TABLE>>"


def build_dot(
    graph: AttributionGraph,
    labels: Mapping[tuple[int, int], str] | None = None,
    supernodes: Sequence[tuple[str, Sequence[int]]] = (),
    title: str | None = None,
    legend: bool = True,
):
    """The ``graphviz.Digraph`` (engine neato, positions pinned) that :func:`render` draws."""
    import graphviz

    table = node_table(graph, labels)
    lay = layered_layout(graph)
    sup = is_supernode(graph.layout)
    g = graphviz.Digraph("attribution", engine="neato")
    g.attr("graph", bgcolor="white", outputorder="edgesfirst", pad="0.3", fontname="Helvetica",
           **({"label": _escape(title), "labelloc": "t", "fontsize": "14"} if title else {}))
    g.attr("node", fontname="Helvetica", fontsize="9", margin="0.04,0.02", height="0.3", width="0.5")
    g.attr("edge", arrowsize="0.4")

    def put(name: str, x: float, y: float, **attrs) -> None:
        g.node(name, pos=f"{x:.1f},{y:.1f}!", **attrs)

    # supernode boxes around their members are drawn first so that they sit underneath
    for k, (name, members) in enumerate(supernodes):
        m = np.asarray(list(members), dtype=np.int64)
        x0, x1 = lay.x[m].min() - 45, lay.x[m].max() + 45
        y0, y1 = lay.y[m].min() - 25, lay.y[m].max() + 35
        put(f"group{k}", (x0 + x1) / 2, (y0 + y1) / 2, shape="box", style="dashed,rounded", color="#7b4fa6",
            label=_escape(name), labelloc="t", fontcolor="#7b4fa6", fixedsize="true",
            width=f"{(x1 - x0) / 72:.2f}", height=f"{(y1 - y0) / 72:.2f}")

    for info in table:
        key = _kind_key(graph, info, sup)
        lines = [_short(info.label)]
        if info.kind == "feature":
            lines.append(f"a={info.activation:.3g}")
        put(f"n{info.index}", lay.x[info.index], lay.y[info.index], label=_lines(lines),
            tooltip=_escape(info.node_id), **KIND_STYLE[key])

    adj = graph.adjacency
    wmax = float(np.abs(adj.data).max()) if adj.nnz else 1.0
    order = np.argsort(np.abs(adj.data), kind="stable")  # strongest edges drawn last, on top
    rows = adj.rows()
    for e in order:
        w = float(adj.data[e])
        g.edge(f"n{adj.indices[e]}", f"n{rows[e]}",
               color=EDGE_COLORS["positive" if w >= 0 else "negative"],
               penwidth=f"{0.4 + 3.6 * abs(w) / wmax:.2f}")

    # axes: token strings under their columns, layer names left of their rows
    bottom = min(lay.row_y.values(), default=0.0) - 45
    for p, cx in enumerate(lay.column_x):
        put(f"tok{p}", cx, bottom, shape="plaintext", fontsize="10",
            label=_lines([repr(_short(graph.token_strings[p], 14)), str(p)]))
    L = graph.layout.n_layers
    for layer, yy in lay.row_y.items():
        name = "emb" if layer < 0 else ("logit" if layer >= L else f"L{layer}")
        put(f"row{layer}", -60, yy, shape="plaintext", fontsize="10", fontcolor="#666666", label=name)
    if legend:
        top = max(lay.row_y.values(), default=0.0)
        put("legend", lay.width + 110, top, shape="plaintext", label=_legend_html())
    return g


def picture_subgraph(graph: AttributionGraph, max_nodes: int = 150, max_edges: int = 1000) -> AttributionGraph:
    """What a picture can show: the ``max_nodes`` most influential feature/error nodes (tokens and logits
    always stay) and the ``max_edges`` strongest edges among them; the rest goes into each row's
    remainder. A pruned graph of an early or weak transcoder set can keep a thousand nodes and 10⁵ edges,
    which graphviz cannot lay out in reasonable time and nobody can read. Returns ``graph`` itself when
    it is within both limits."""
    from .graph import Adjacency, NodeKind
    from .prune import node_influence

    if max_nodes < 1 or max_edges < 1:
        raise ConfigError(f"max_nodes={max_nodes}, max_edges={max_edges}; both must be ≥ 1")
    lay = graph.layout
    inner = np.isin(lay.kind, [NodeKind.FEATURE, NodeKind.ERROR])
    if inner.sum() <= max_nodes and graph.adjacency.nnz <= max_edges:
        return graph
    keep = ~inner
    if inner.sum() > max_nodes:
        infl = node_influence(graph)
        cand = np.flatnonzero(inner)
        keep[cand[np.argsort(-infl[cand], kind="stable")[:max_nodes]]] = True
    else:
        keep |= inner
    sub = graph.subgraph(keep)
    adj = sub.adjacency
    if adj.nnz > max_edges:
        top = np.argsort(-np.abs(adj.data), kind="stable")[:max_edges]
        drop = np.ones(adj.nnz, bool)
        drop[top] = False
        rows = adj.rows()
        rem = adj.remainder + np.bincount(rows[drop], weights=np.abs(adj.data[drop]), minlength=adj.n).astype(adj.remainder.dtype)
        adj = Adjacency.from_coo(rows[~drop], adj.indices[~drop], adj.data[~drop], adj.n, rem)
        sub.adjacency = adj
    store_cut(sub, "picture", Cut(max_nodes, graph.n_nodes, max_edges, int(graph.adjacency.nnz)))
    return sub


def _check_dot() -> None:
    if shutil.which("dot") is None:
        raise RenderError(DOT_MISSING)


def _pipe(g, fmt: str) -> bytes:
    import graphviz

    _check_dot()
    try:
        return g.pipe(format=fmt, neato_no_op=2, quiet=True)
    except graphviz.ExecutableNotFound:
        raise RenderError(DOT_MISSING) from None
    except graphviz.CalledProcessError as exc:
        raise RenderError(f"graphviz failed to render the graph: {exc.stderr!r}") from None


def render(
    graph: AttributionGraph,
    path: str | os.PathLike,
    labels: Mapping[tuple[int, int], str] | None = None,
    supernodes: Sequence[tuple[str, Sequence[int]]] = (),
    title: str | None = None,
    legend: bool = True,
    dpi: int = ImageConfig.dpi,
) -> Path:
    """Draw ``graph`` (prune it first) to PNG, SVG or PDF, chosen by the suffix of ``path``; atomic.

    ``supernodes``: (name, node indices) pairs drawn as dashed boxes around their members; supernodes of a
    grouped graph (:func:`group_nodes`) are drawn as double-bordered nodes."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"path must end in one of {', '.join(FORMATS)}, got {str(path)!r}")
    if dpi <= 0:
        raise ConfigError(f"dpi must be positive, got {dpi!r}")
    if not supernodes:  # supernode boxes index nodes of the graph as given
        graph = picture_subgraph(graph)
        shown = cut_of(graph, "picture")
        if shown and title:
            title = f"{title} — top {graph.n_nodes} of {shown.of_nodes} nodes, {graph.adjacency.nnz} of {shown.of_edges} edges"
    g = build_dot(graph, labels, supernodes, title, legend)
    g.attr("graph", size="30,20")  # inches: bounds the bitmap (30 in × dpi) whatever the graph
    if suffix == ".png":
        g.attr("graph", dpi=str(dpi))
    data = _pipe(g, suffix[1:])

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(path, write)
    return path


def to_svg(graph: AttributionGraph, labels: Mapping[tuple[int, int], str] | None = None, **kwargs) -> str:
    """The SVG text of :func:`render`'s picture."""
    if not kwargs.get("supernodes"):
        graph = picture_subgraph(graph)
    return _pipe(build_dot(graph, labels, **kwargs), "svg").decode("utf-8")


def repr_svg(graph: AttributionGraph, max_nodes: int = 200) -> str:
    """For ``AttributionGraph._repr_svg_``: the picture, pruned first when the graph has more than
    ``max_nodes`` nodes (an unpruned graph would be unreadable and slow to lay out)."""
    if graph.n_nodes > max_nodes:
        from .prune import prune_graph

        graph = prune_graph(graph)
    return to_svg(graph)
