"""Influence on the logits and graph pruning (docs/design.md §5), on the sparse CSR store.

Â is the row-normalised |A|: each target's incoming absolute weights, *plus* the row's stored
``remainder`` (mass that thresholded storage dropped), sum to 1, so storing a graph with a threshold
does not change Â on the edges that were kept. Rows without inputs stay 0.

Influence ``I = wᵀ(Â + Â² + …)`` is exact in one O(edges) sweep over a reverse topological order:
``I_s = Σ_t (I_t + w_t)·Â[t, s]``. circuit-tracer iterates dense vector×matrix products instead
(O(depth·N²)); ``benchmarks/prune.py`` compares the two.

Pruning, as circuit-tracer's ``prune_graph`` (its golden 12-node case is ``tests/test_graphs_prune.py``):
1. node pruning: the smallest set of feature/error nodes whose cumulative share of influence reaches
   ``node_threshold``; tokens and logits always stay;
2. edge pruning: influence recomputed on the node-pruned graph (renormalised over the surviving sources),
   edge score ``Â'[t, s]·(I'_t + w_t)``, the smallest set of edges reaching ``edge_threshold``;
3. repeatedly drop nodes without a kept out-edge, and features without a kept in-edge (tokens and logits
   stay), until nothing changes.
"Smallest set" keeps every item whose score is ≥ the score at which the sorted cumulative share first
reaches the threshold, so ties are kept together and the result does not depend on sort stability;
items with score 0 are never needed and never kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from sparsetrace.config import PruneConfig, _check_fraction
from sparsetrace.errors import GraphError

from . import _kernels
from .graph import Adjacency, AttributionGraph, NodeKind
from .records import PruneSummary, store_influence, store_pruning

__all__ = [
    "PruneConfig",
    "PruneResult",
    "node_influence",
    "adjacency_influence",
    "topological_order",
    "cumulative_threshold",
    "prune",
    "apply_prune",
    "prune_graph",
]


@dataclass(frozen=True, eq=False)
class PruneResult:
    """What :func:`prune` decided, aligned with the *input* graph."""

    node_mask: np.ndarray
    """bool [N]: nodes kept after the fixed point (all tokens and logits are true)."""
    edge_mask: np.ndarray
    """bool [E]: stored adjacency entries kept, aligned with ``graph.adjacency.indices``."""
    node_influence: np.ndarray
    """float64 [N]: I on the full graph, the influence of each node on the weighted logits."""
    edge_score: np.ndarray
    """float64 [E]: Â'[t, s]·(I'_t + w_t) on the node-pruned graph (0 for edges touching pruned nodes)."""
    node_mask_after_node_pruning: np.ndarray
    """bool [N]: step 1's mask, before edge pruning and the fixed point."""
    config: PruneConfig
    """The thresholds used."""
    n_sweeps: int
    """Sweeps the fixed point (step 3) needed; 1 means nothing was dropped there."""

    @property
    def n_nodes_kept(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges_kept(self) -> int:
        return int(self.edge_mask.sum())


# ---- array-level wrappers around the kernels ------------------------------------------------------
def _csr(adj: Adjacency) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # the kernels read float32 or float64 data (they accumulate in float64): no copy of a float32 graph
    data = adj.data if adj.data.dtype in (np.float32, np.float64) else adj.data.astype(np.float64)
    return (
        np.ascontiguousarray(adj.indptr, dtype=np.int64),
        _index_array(adj.indices),
        np.ascontiguousarray(data),
        np.ascontiguousarray(adj.remainder, dtype=np.float64),
    )


def _index_array(indices: np.ndarray) -> np.ndarray:
    """int32 or int64 indices as they are (the kernels take either; no copy of a large graph's index)."""
    return np.ascontiguousarray(indices, dtype=indices.dtype if indices.dtype in (np.int32, np.int64) else np.int64)


def topological_order(adjacency: Adjacency, node_ids=None) -> np.ndarray:
    """int64 [N]: every target before all of its sources; GraphError if the edges contain a cycle.

    ``node_ids`` (optional callable index → str) names the nodes in the error message."""
    indptr, indices, _, _ = _csr(adjacency)
    order, emitted = _kernels.reverse_topological_order(indptr, indices, adjacency.n)
    if emitted < adjacency.n:
        stuck = np.setdiff1d(np.arange(adjacency.n), order[:emitted])
        names = [node_ids(int(i)) if node_ids else str(int(i)) for i in stuck[:5]]
        raise GraphError(
            f"the adjacency is not a DAG: {len(stuck)} nodes lie on or feed into a cycle, e.g. {', '.join(names)}"
        )
    return order


def adjacency_influence(
    adjacency: Adjacency, weights: np.ndarray, node_mask: np.ndarray | None = None, order: np.ndarray | None = None
) -> np.ndarray:
    """float64 [N]: I = wᵀ(Â + Â² + …) for a bare adjacency and weights w [N].

    With ``node_mask``, the graph restricted to those nodes, renormalised over surviving sources.
    ``order`` may pass a precomputed :func:`topological_order` (any order of the full graph stays valid
    for a sub-graph)."""
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.shape != (adjacency.n,):
        raise GraphError(f"weights must have shape ({adjacency.n},), got {w.shape}")
    mask = np.ones(adjacency.n, dtype=np.bool_) if node_mask is None else np.ascontiguousarray(node_mask, dtype=np.bool_)
    if order is None:
        order = topological_order(adjacency)
    indptr, indices, data, rem = _csr(adjacency)
    return _influence(indptr, indices, data, rem, w, order, mask)[0]


def csr_rows(indptr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CSR's rows as the kernels take them: ``(targets, starts, ends)`` = (0…n−1, indptr[:-1], indptr[1:])."""
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    return np.arange(len(indptr) - 1, dtype=np.int64), indptr[:-1], indptr[1:]


def _influence(indptr, indices, data, rem, w, order, mask) -> tuple[np.ndarray, np.ndarray]:
    """(influence [N], row denominators [N]) of a CSR restricted to ``mask``."""
    rows = csr_rows(indptr)
    denom = _kernels.row_denominators(*rows, indices, data, rem, mask)
    infl = np.zeros(len(w), dtype=np.float64)
    _kernels.influence_sweep(infl, w, order, *rows, indices, data, denom, mask)
    return infl, denom


def node_influence(graph: AttributionGraph) -> np.ndarray:
    """float64 [N]: each node's influence on the logits, weighted by the logit probabilities."""
    order = topological_order(graph.adjacency, graph.layout.node_id)
    return adjacency_influence(graph.adjacency, graph.logit_weights(), order=order)


def cumulative_threshold(scores: np.ndarray, threshold: float) -> float:
    """The score s* such that {scores ≥ s*} is the smallest set whose share of the total reaches
    ``threshold`` (ties kept together); ``inf`` when no score is positive."""
    _check_fraction("threshold", threshold)
    pos = np.asarray(scores, dtype=np.float64)
    pos = pos[pos > 0]
    if pos.size == 0:
        return float("inf")
    s = np.sort(pos)[::-1]
    c = np.cumsum(s)
    # the total is the last cumulative sum itself, so a threshold of 1 is reached exactly at the end
    idx = min(int(np.searchsorted(c, threshold * c[-1], side="left")), len(s) - 1)
    return float(s[idx])


def _keep(scores: np.ndarray, threshold: float) -> np.ndarray:
    thr = cumulative_threshold(scores, threshold)
    return (scores >= thr) & (scores > 0)


# ---- the pruning itself -----------------------------------------------------------------------------
def prune(
    graph: AttributionGraph,
    node_threshold: float | None = None,
    edge_threshold: float | None = None,
    *,
    config: PruneConfig | None = None,
) -> PruneResult:
    """Decide which nodes and edges to keep (module docstring). Explicit thresholds override ``config``."""
    base = config or PruneConfig()
    cfg = PruneConfig(
        node_threshold=base.node_threshold if node_threshold is None else node_threshold,
        edge_threshold=base.edge_threshold if edge_threshold is None else edge_threshold,
    )
    layout = graph.layout
    adj = graph.adjacency
    n = adj.n
    w = graph.logit_weights()
    order = topological_order(adj, layout.node_id)
    indptr, indices, data, rem = _csr(adj)
    everything = np.ones(n, dtype=np.bool_)

    # 1. node pruning on the full graph
    infl, _ = _influence(indptr, indices, data, rem, w, order, everything)
    protected = (layout.kind == NodeKind.TOKEN) | (layout.kind == NodeKind.LOGIT)
    prunable = ~protected
    node_mask = protected.copy()
    node_mask[prunable] = _keep(infl[prunable], cfg.node_threshold)

    # 2. edge pruning on the node-pruned graph (its entries only: the other edges' scores are 0)
    sub_indptr, entry = _kernels.induced_entries(indptr, indices, node_mask)
    sub_indices, sub_data = indices[entry], data[entry]
    infl2, denom2 = _influence(sub_indptr, sub_indices, sub_data, rem, w, order, node_mask)
    sub_score = _kernels.edge_scores(sub_indptr, sub_indices, sub_data, denom2, infl2, w, node_mask)
    sub_keep = _keep(sub_score, cfg.edge_threshold)

    # 3. fixed point: nodes need a kept out-edge; features also a kept in-edge
    final_nodes = node_mask.copy()
    needs_input = np.ascontiguousarray(layout.kind == NodeKind.FEATURE)
    sweeps = _kernels.prune_to_fixed_point(
        sub_indptr, sub_indices, final_nodes, sub_keep, np.ascontiguousarray(protected), needs_input
    )
    score = np.zeros(len(indices))
    score[entry] = sub_score
    edge_mask = np.zeros(len(indices), dtype=np.bool_)
    edge_mask[entry] = sub_keep
    return PruneResult(
        node_mask=final_nodes,
        edge_mask=edge_mask,
        node_influence=infl,
        edge_score=score,
        node_mask_after_node_pruning=node_mask,
        config=cfg,
        n_sweeps=int(sweeps),
    )


def apply_prune(graph: AttributionGraph, result: PruneResult) -> AttributionGraph:
    """The pruned graph: kept nodes (``graph.subgraph``) and kept edges only.

    Dropped edges' absolute weight goes into their row's ``remainder`` (as ``subgraph`` does for dropped
    sources), so the pruned graph's Â equals the original Â on every kept edge. The metadata gains the
    :class:`~sparsetrace.graphs.records.PruneSummary` (thresholds and sizes) and the stored influence
    (full-graph I of each kept node; :func:`~sparsetrace.graphs.records.stored_influence`)."""
    adj = graph.adjacency
    if result.edge_mask.shape != (adj.nnz,) or result.node_mask.shape != (adj.n,):
        raise GraphError("the PruneResult was computed for another graph (mask sizes differ)")
    rows = adj.rows()
    keep = result.edge_mask
    lost = np.bincount(rows[~keep], weights=np.abs(adj.data[~keep]).astype(np.float64), minlength=adj.n)
    masked = Adjacency.from_coo(
        rows[keep], adj.indices[keep], adj.data[keep], adj.n, (adj.remainder + lost).astype(adj.dtype)
    )
    out = dataclasses.replace(graph, adjacency=masked).subgraph(result.node_mask)
    summary = PruneSummary(result.config.node_threshold, result.config.edge_threshold, int(adj.n), int(adj.nnz),
                           result.n_nodes_kept, result.n_edges_kept)
    store_pruning(out, summary)
    store_influence(out, result.node_influence[result.node_mask])
    return out


def prune_graph(
    graph: AttributionGraph, node_threshold: float | None = None, edge_threshold: float | None = None
) -> AttributionGraph:
    """:func:`prune` then :func:`apply_prune`."""
    return apply_prune(graph, prune(graph, node_threshold, edge_threshold))
