"""A single self-contained HTML viewer: inline CSS and JS written for it (no library, no network).

Layout: x is the token position (one column per position, as wide as its fullest (layer, position) cell
and its token), y the layer — embeddings at the bottom, logits at the top, only layers holding a node get
a row. The page opens fitted to the window; scroll zooms about the cursor, dragging the background pans,
``+``/``-``/``0`` zoom and fit. Clicking a node opens a side panel: its label with the label's held-out
score, activation, influence, top contexts and top output tokens (from the feature statistics, when the
trace had them), and its strongest input and output edges (clickable). Hovering a node highlights its
strongest paths up to the logits and down to the tokens (each node's ``PATH_FANOUT`` strongest edges,
followed transitively). Nodes can be pinned (button, or shift-click), grouped into named supernodes,
and the result downloaded as a figure spec for ``sparsetrace figure``; "load default figure" starts from
the automatic figure's spec. A search box finds nodes by label or id.

Edges: each node's ``TOP_K`` strongest inputs and outputs (by |weight|); an edge's ``share`` is its
|weight| over the target's total absolute input, and the slider hides edges below a share (it starts where
about ``MAX_VISIBLE_EDGES`` show; the panel and hover paths use every edge the page carries). The URL hash
``#click=<node id>&threshold=<share>&pin=<id>,<id>&qk=<k>`` runs the same handlers (links into a figure, tests).

QK results stored with the graph (``graph.qk``, docs/design.md §13) get a panel section listing the
stored attention scores; clicking one shows its exact split (score, pattern, the four term sums and the
``QKConfig.top`` largest (query-side, key-side) parts, with their nodes outlined in the graph). A node's
panel lists the head loadings of its stored cross-position edges (each head links to its stored score at
the target's position) and the stored scores it takes part in; an edge with stored loadings is
clickable (a wide invisible path over it) and opens its target's panel with those loadings outlined.
"""

from __future__ import annotations

import html as _html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sparsetrace.config import QKConfig

from .export import node_table
from .graph import AttributionGraph, NodeKind
from .records import Cut, feature_labels_of, scores_of, store_cut, store_influence, stored_influence
from .render import EDGE_COLORS, KIND_STYLE
from .supernodes import is_supernode

__all__ = ["to_html", "write_html", "repr_html", "viewer_layout", "TOP_K", "PATH_FANOUT", "MAX_NODES"]

TOP_K = 8
"""Strongest inputs and outputs of every node that the page carries (and the panel lists)."""
PATH_FANOUT = 3
"""Hover paths follow each node's this many strongest visible edges."""
MAX_NODES = 2500
"""Larger graphs are cut to their most influential nodes (tokens and logits always stay)."""
LABEL_ZOOM = 1.6
"""Feature labels are drawn from this zoom on (and always for pinned, selected and found nodes)."""

_TEMPLATE = Path(__file__).with_name("viewer.html")
NODE_GAP = 16.0
LINE_GAP = 13.0
ROW_GAP = 30.0
ASPECT = 1.3
"""Width / height the viewer's layout aims for (the canvas of a 1280×800 window beside the panel)."""
MAX_VISIBLE_EDGES = 2500
"""The slider starts at the share that shows about this many edges (all of them when fewer)."""


def _place(graph: AttributionGraph, per_line: int):
    lay = graph.layout
    n = graph.n_nodes
    T = lay.n_pos
    cells: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        if lay.kind[i] != NodeKind.LOGIT:
            cells.setdefault((int(lay.layer[i]), int(lay.pos[i])), []).append(i)
    widest = np.zeros(T)
    lines: dict[int, int] = {}
    for (layer, p), m in cells.items():
        widest[p] = max(widest[p], min(len(m), per_line) * NODE_GAP)
        lines[layer] = max(lines.get(layer, 1), -(-len(m) // per_line))
    text_w = np.array([7.5 * len(t) + 24 for t in graph.token_strings])
    col_w = np.maximum(np.maximum(widest, text_w), 48.0)
    col_w[-1] = max(col_w[-1], lay.n_logits * 26.0)
    column_x = np.concatenate([[0.0], np.cumsum(col_w)[:-1]]) + col_w / 2
    row_y: dict[int, float] = {}
    y0 = 0.0
    for layer in sorted({int(x) for x in lay.layer}):
        row_y[layer] = y0
        y0 += (lines.get(layer, 1) - 1) * LINE_GAP + ROW_GAP
    x = np.zeros(n)
    y = np.zeros(n)
    for (layer, p), m in cells.items():
        k = np.arange(len(m))
        line, slot = k // per_line, k % per_line
        in_line = np.minimum(len(m) - line * per_line, per_line)
        x[m] = column_x[p] + (slot - (in_line - 1) / 2) * NODE_GAP
        y[m] = row_y[layer] + line * LINE_GAP
    lg = np.arange(lay.logits.start, lay.logits.stop)
    if len(lg):
        x[lg] = column_x[-1] + (np.arange(len(lg)) - (len(lg) - 1) / 2) * 26.0
        y[lg] = row_y[int(lay.layer[lg[0]])] + ROW_GAP * 0.6
    height = float(y0)
    return x, y, column_x, row_y, float(col_w.sum()), height


def viewer_layout(graph: AttributionGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, float], float, float]:
    """(x [N], y [N], column_x [T], row_y {layer: y}, width, height) in page pixels, y up.

    Nodes of one (layer, position) cell sit side by side, ``NODE_GAP`` apart, wrapping onto further lines
    of their layer's band after ``per_line`` nodes; ``per_line`` is chosen so that the picture's aspect
    is closest to a laptop window's (``ASPECT``). A column is at least as wide as its token's text;
    logits share one row above the last layer. In a node's (layer, position) cell, nodes keep the
    graph's order."""
    best = None
    for per_line in (4, 6, 8, 12, 16, 24, 32, 48, 10**6):
        placed = _place(graph, per_line)
        width, height = placed[4], placed[5]
        score = abs(np.log((width + 100) / (height + 120) / ASPECT))
        if best is None or score < best[0] - 1e-9:
            best = (score, placed)
    return best[1]


def _edge_subset(graph: AttributionGraph, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, weight, share) of every edge among some node's ``k`` strongest inputs or outputs."""
    adj = graph.adjacency
    if adj.nnz == 0:
        z = np.zeros(0, np.int64)
        return z, z, np.zeros(0), np.zeros(0)
    rows = adj.rows()
    cols = adj.indices.astype(np.int64)
    w = adj.data.astype(np.float64)
    a = np.abs(w)
    mass = np.bincount(rows, weights=a, minlength=adj.n) + adj.remainder.astype(np.float64)
    keep = np.zeros(adj.nnz, bool)
    for end in (rows, cols):  # rank each entry within its target row, then within its source column
        order = np.lexsort((-a, end))
        first = np.searchsorted(end[order], end[order], side="left")
        rank = np.arange(len(order)) - first
        keep[order[rank < k]] = True
    share = a / np.where(mass[rows] > 0, mass[rows], 1.0)
    return cols[keep], rows[keep], w[keep], share[keep]


def _start_threshold(share: np.ndarray) -> float:
    """The slider's first position: the share at which about ``MAX_VISIBLE_EDGES`` edges show."""
    if len(share) <= MAX_VISIBLE_EDGES:
        return 0.0
    return float(np.floor(np.sort(share)[::-1][MAX_VISIBLE_EDGES] * 100 + 1) / 100)


def _payload(graph: AttributionGraph, labels: Mapping[tuple[int, int], str] | None, title: str,
             spec: Any = None) -> dict:
    from .figure import node_texts

    x, y, column_x, row_y, width, height = viewer_layout(graph)
    sup = is_supernode(graph.layout)
    texts = node_texts(graph)
    info = feature_labels_of(graph).info or {}
    nodes = []
    for n in node_table(graph, labels):
        i = n.index
        kind = "supernode" if sup[i] else n.kind
        d: dict[str, Any] = {"id": n.node_id, "kind": kind, "layer": n.layer, "pos": n.pos, "token": n.token,
                             "label": n.label, "activation": n.activation, "influence": n.influence,
                             "x": round(float(x[i]), 2), "y": round(float(y[i]), 2)}
        if kind == "token":
            d["label"] = n.token.replace("\n", "⏎").strip() or repr(n.token)
        if kind == "logit":
            k = i - graph.layout.logits.start
            d["label"] = (graph.logit_label[k].replace("\n", "⏎").strip() or repr(graph.logit_label[k])) + \
                f" {float(graph.logit_probability[k]):.2f}"
        if kind == "feature":
            t = texts.get((n.layer, n.feature))
            full = info[(n.layer, n.feature)].to_dict() if (n.layer, n.feature) in info else {}
            if t is not None:
                d.update(label=t.short or n.label, full=t.full, source=t.source, precision=t.precision, recall=t.recall)
            for key in ("contexts", "promoted", "density"):
                if full.get(key) not in (None, []):
                    d[key] = full[key]
        nodes.append(d)
    src, dst, w, share = _edge_subset(graph, TOP_K)
    edges = [[int(s), int(t), float(f"{v:.4g}"), round(float(f), 4)] for s, t, v, f in zip(src, dst, w, share)]
    L = graph.layout.n_layers
    rows = [{"y": yy, "name": "emb" if layer < 0 else ("logit" if layer >= L else f"L{layer}")} for layer, yy in row_y.items()]
    columns = [{"x": float(cx), "token": graph.token_strings[p].replace("\n", "⏎"), "pos": p} for p, cx in enumerate(column_x)]
    spec_d = spec.to_dict() if spec is not None and hasattr(spec, "to_dict") else spec
    if spec_d is not None:
        spec_d = {k: v for k, v in spec_d.items() if k in ("title", "nodes", "groups", "labels")}
    return {
        "title": title,
        "nodes": nodes,
        "edges": edges,
        "rows": rows,
        "columns": columns,
        "width": width,
        "height": height,
        "colors": {k: v["fillcolor"] for k, v in KIND_STYLE.items()},
        "edgeColors": EDGE_COLORS,
        "kinds": sorted({d["kind"] for d in nodes}),
        "panelEdges": TOP_K,
        "pathFanout": PATH_FANOUT,
        "labelZoom": LABEL_ZOOM,
        "defaultSpec": spec_d,
        "threshold": _start_threshold(share),
        "scores": _scores(graph),
        "qk": graph.qk.viewer_data(QKConfig().top) if graph.qk is not None else None,
    }


def _scores(graph: AttributionGraph) -> dict | None:
    """The stored scores as the viewer shows them (None when the graph was never scored)."""
    s = scores_of(graph)
    return s.to_dict() if s is not None else None


def _cut(graph: AttributionGraph, max_nodes: int) -> AttributionGraph:
    """The graph with only its ``max_nodes`` most influential feature and error nodes (tokens and logits
    stay), its stored per-node influence carried along."""
    from .prune import node_influence

    lay = graph.layout
    inner = np.isin(lay.kind, [NodeKind.FEATURE, NodeKind.ERROR])
    if inner.sum() <= max_nodes:
        return graph
    infl = stored_influence(graph)
    infl = infl if infl is not None else node_influence(graph)
    cand = np.flatnonzero(inner)
    keep = ~inner
    keep[cand[np.argsort(-infl[cand], kind="stable")[:max_nodes]]] = True
    sub = graph.subgraph(keep)
    store_influence(sub, infl[keep])
    store_cut(sub, "viewer_cut", Cut(max_nodes, graph.n_nodes))
    return sub


def to_html(
    graph: AttributionGraph,
    labels: Mapping[tuple[int, int], str] | None = None,
    title: str | None = None,
    spec: Any = None,
) -> str:
    """The viewer page for ``graph`` (give it the pruned graph). ``spec``: a FigureSpec (or its dict)
    that "load default figure" pins."""
    title = title or (graph.prompt[:80] or "attribution graph")
    graph = _cut(graph, MAX_NODES)  # a page that stays responsive
    data = json.dumps(_payload(graph, labels, title, spec), allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    # "</" inside a <script> block would end it early: JSON allows the escaped form
    data = data.replace("</", "<\\/")
    page = _TEMPLATE.read_text(encoding="utf-8")
    return page.replace("__TITLE__", _html.escape(title)).replace("__GRAPH_DATA__", data)


def write_html(
    graph: AttributionGraph,
    path: str | os.PathLike,
    labels: Mapping[tuple[int, int], str] | None = None,
    title: str | None = None,
    spec: Any = None,
) -> Path:
    """:func:`to_html` written atomically to ``path``."""
    from .export import _write_text

    return _write_text(path, to_html(graph, labels, title, spec))


def repr_html(graph: AttributionGraph, max_nodes: int = 300) -> str:
    """For ``AttributionGraph._repr_html_``: the viewer in an ``<iframe srcdoc>`` (isolates its ids and
    script from the notebook), pruned first when the graph has more than ``max_nodes`` nodes."""
    if graph.n_nodes > max_nodes:
        from .prune import prune_graph

        graph = prune_graph(graph)
    doc = _html.escape(to_html(graph), quote=True)
    return f'<iframe srcdoc="{doc}" style="width:100%;height:640px;border:1px solid #ddd"></iframe>'
