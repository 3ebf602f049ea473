"""Replacement and completeness scores of an attribution graph (docs/design.md §5).

    replacement  = I(tokens) / (I(tokens) + I(errors))
    completeness = Σ_i (1 − Σ_{j∈errors} Â[i, j])·(I_i + w_i) / Σ_i (I_i + w_i)

Replacement asks how much of the logits' influence reaches the prompt through features rather than
stopping at error nodes; completeness asks what share of every node's input (weighted by how much the node
matters) is explained by non-error nodes. For a pruned graph, every pruned feature is folded into the error
node at its (layer, position): its edges into kept nodes become edges from that error node, so what pruning
removed is counted as unexplained instead of vanishing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparsetrace.errors import GraphError

from . import _kernels
from .graph import Adjacency, AttributionGraph, NodeKind
from .prune import PruneResult, _index_array, csr_rows, node_influence, topological_order
from .records import GraphScores, ScoresRecord, store_scores_record  # GraphScores: re-exported here

__all__ = ["GraphScores", "graph_scores", "fold_pruned", "pruned_graph_scores", "store_scores"]


def _error_fraction(graph: AttributionGraph) -> np.ndarray:
    """float64 [N]: Σ_{j∈errors} Â[i, j] per row i (the remainder counts in the denominator)."""
    adj = graph.adjacency
    indptr = np.ascontiguousarray(adj.indptr, dtype=np.int64)
    indices = _index_array(adj.indices)
    data = np.ascontiguousarray(adj.data, dtype=np.float64)
    denom = _kernels.row_denominators(*csr_rows(indptr), indices, data, adj.remainder.astype(np.float64),
                                      np.ones(adj.n, bool))
    rows = adj.rows()
    from_error = graph.layout.kind[indices] == NodeKind.ERROR
    safe = np.where(denom > 0, denom, 1.0)
    contrib = np.abs(data[from_error]) / safe[rows[from_error]]
    return np.bincount(rows[from_error], weights=contrib, minlength=adj.n)


def graph_scores(graph: AttributionGraph) -> GraphScores:
    """Replacement and completeness of ``graph`` as it is (no folding)."""
    infl = node_influence(graph)
    w = graph.logit_weights()
    kind = graph.layout.kind
    tok = float(infl[kind == NodeKind.TOKEN].sum())
    err = float(infl[kind == NodeKind.ERROR].sum())
    # no influence reaches tokens or errors only when the logits have no inputs: nothing is unexplained
    replacement = tok / (tok + err) if tok + err > 0 else 1.0
    out = infl + w
    total = float(out.sum())
    completeness = float(((1.0 - _error_fraction(graph)) * out).sum() / total) if total > 0 else 1.0
    return GraphScores(replacement=replacement, completeness=completeness)


def fold_pruned(graph: AttributionGraph, node_mask: np.ndarray) -> AttributionGraph:
    """The graph on the kept nodes plus every error node, each pruned feature folded into the error
    node at its (layer, position): its out-edges are re-sourced there (summed with the error's own), its
    in-edges dropped. Pruned error nodes are kept (they are the folding targets); tokens and logits always
    stay. GraphError if a pruned feature has no error node at its (layer, position)."""
    layout = graph.layout
    node_mask = np.asarray(node_mask, dtype=bool)
    if node_mask.shape != (graph.n_nodes,):
        raise GraphError(f"node_mask has shape {node_mask.shape}, graph has {graph.n_nodes} nodes")
    kind = layout.kind
    keep = node_mask | (kind != NodeKind.FEATURE)
    folded = np.flatnonzero(~keep)
    target_of = np.arange(graph.n_nodes)
    if len(folded):
        err = np.asarray(layout.error_index(layout.layer[folded], layout.pos[folded]))
        if np.any(err < 0):
            bad = folded[np.flatnonzero(err < 0)[0]]
            raise GraphError(f"cannot fold {layout.node_id(int(bad))}: the graph has no error node at its (layer, position)")
        target_of[folded] = err
    adj = graph.adjacency
    rows = adj.rows()
    live = keep[rows]  # rows of folded features are dropped; their inputs do not matter any more
    rerouted = Adjacency.from_coo(
        rows[live], target_of[adj.indices[live]], adj.data[live], adj.n, adj.remainder
    )
    return dataclasses.replace(graph, adjacency=rerouted).subgraph(keep)


def pruned_graph_scores(graph: AttributionGraph, pruned: PruneResult | np.ndarray) -> GraphScores:
    """Scores of the pruned graph: :func:`graph_scores` of :func:`fold_pruned` with the kept-node mask."""
    mask = pruned.node_mask if isinstance(pruned, PruneResult) else pruned
    return graph_scores(fold_pruned(graph, mask))


def store_scores(graph: AttributionGraph, pruned: PruneResult | np.ndarray | None = None) -> dict:
    """Compute the scores and store them as the graph's :class:`~sparsetrace.graphs.records.ScoresRecord`
    (``{"full": {...}}`` and, given a pruning, ``"pruned"``); returns the stored dict. The graph's topology
    is checked once (a cycle raises)."""
    topological_order(graph.adjacency, graph.layout.node_id)
    full = graph_scores(graph)
    return store_scores_record(graph, ScoresRecord(full, pruned_graph_scores(graph, pruned) if pruned is not None else None))
