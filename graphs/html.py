"""A single self-contained HTML viewer: inline CSS and JS, no network, the SVG drawn by our own script.

Layout as in :mod:`render` (x = token position, y = layer). Hover a node for its details (kind, layer,
position, token, feature, label, activation, influence); click it to highlight its strongest inputs and
outputs; the slider hides edges weaker than a fraction of the largest |weight|. The page honours
``#click=<node id>`` and ``#threshold=<0..1>`` in its URL (joined with ``&``), which run the same handlers —
useful for links into a figure and for the headless-browser tests.
"""

from __future__ import annotations

import html as _html
import json
import os
from collections.abc import Mapping
from pathlib import Path

from .export import node_table
from .graph import AttributionGraph
from .render import EDGE_COLORS, KIND_STYLE, layered_layout, picture_subgraph
from .supernodes import is_supernode

__all__ = ["to_html", "write_html", "repr_html", "TOP_K"]

TOP_K = 5
"""How many of a clicked node's strongest inputs and outputs are highlighted."""

_TEMPLATE = Path(__file__).with_name("viewer.html")


def _payload(graph: AttributionGraph, labels: Mapping[tuple[int, int], str] | None, title: str) -> dict:
    lay = layered_layout(graph)
    sup = is_supernode(graph.layout)
    nodes = []
    for info in node_table(graph, labels):
        i = info.index
        nodes.append(
            {
                "id": info.node_id,
                "kind": "supernode" if sup[i] else info.kind,
                "layer": info.layer,
                "pos": info.pos,
                "token": info.token,
                "feature": info.feature,
                "label": info.label,
                "activation": info.activation,
                "influence": info.influence,
                "x": float(lay.x[i]),
                "y": float(lay.y[i]),
            }
        )
    adj = graph.adjacency
    edges = [[int(s), int(t), float(w)] for t, s, w in zip(adj.rows().tolist(), adj.indices.tolist(), adj.data.tolist())]
    L = graph.layout.n_layers
    rows = [
        {"y": y, "name": "emb" if layer < 0 else ("logit" if layer >= L else f"L{layer}")}
        for layer, y in lay.row_y.items()
    ]
    columns = [{"x": float(x), "token": graph.token_strings[p], "pos": p} for p, x in enumerate(lay.column_x)]
    return {
        "title": title,
        "nodes": nodes,
        "edges": edges,
        "rows": rows,
        "columns": columns,
        "width": lay.width,
        "height": lay.height,
        "colors": {k: v["fillcolor"] for k, v in KIND_STYLE.items()},
        "edgeColors": EDGE_COLORS,
        "topK": TOP_K,
    }


def to_html(
    graph: AttributionGraph, labels: Mapping[tuple[int, int], str] | None = None, title: str | None = None
) -> str:
    """The viewer page for ``graph`` (prune it first: every node and edge is drawn)."""
    title = title or (graph.prompt[:80] or "attribution graph")
    graph = picture_subgraph(graph, max_nodes=300, max_edges=3000)  # a page that stays responsive
    data = json.dumps(_payload(graph, labels, title), allow_nan=False)
    # "</" inside a <script> block would end it early: JSON allows the escaped form
    data = data.replace("</", "<\\/")
    page = _TEMPLATE.read_text(encoding="utf-8")
    return page.replace("__TITLE__", _html.escape(title)).replace("__GRAPH_DATA__", data)


def write_html(
    graph: AttributionGraph,
    path: str | os.PathLike,
    labels: Mapping[tuple[int, int], str] | None = None,
    title: str | None = None,
) -> Path:
    """:func:`to_html` written atomically to ``path``."""
    from .export import _write_text

    return _write_text(path, to_html(graph, labels, title))


def repr_html(graph: AttributionGraph, max_nodes: int = 300) -> str:
    """For ``AttributionGraph._repr_html_``: the viewer in an ``<iframe srcdoc>`` (isolates its ids and
    script from the notebook), pruned first when the graph has more than ``max_nodes`` nodes."""
    if graph.n_nodes > max_nodes:
        from .prune import prune_graph

        graph = prune_graph(graph)
    doc = _html.escape(to_html(graph), quote=True)
    return f'<iframe srcdoc="{doc}" style="width:100%;height:640px;border:1px solid #ddd"></iframe>'

