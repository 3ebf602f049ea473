"""Attribution graphs: layout, storage, influence and pruning, scores, export, rendering (torch-free).

The names below are imported on first use (PEP 562), so that one submodule (or a config) does not
pull in numba and every other submodule.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Adjacency": ".graph",
    "AttributionGraph": ".graph",
    "NodeKind": ".graph",
    "NodeLayout": ".graph",
    "PruneConfig": "sparsetrace.config",
    "PruneResult": ".prune",
    "apply_prune": ".prune",
    "node_influence": ".prune",
    "prune_graph": ".prune",
    "GraphScores": ".scores",
    "graph_scores": ".scores",
    "store_scores": ".scores",
    "Supernode": ".supernodes",
    "auto_supernodes": ".supernodes",
    "group_nodes": ".supernodes",
    "from_networkx": ".export",
    "to_circuit_tracer_json": ".export",
    "to_networkx": ".export",
    "write_html": ".html",
    "FigureConfig": "sparsetrace.config",
    "FigureGroup": ".figure",
    "FigureSpec": ".figure",
    "auto_spec": ".figure",
    "build_figure": ".figure",
    "draw_figure": ".figure",
    "subgraph_scores": ".figure",
    "build_card": ".card",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
