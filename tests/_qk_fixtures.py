"""Synthetic QK results on a graph (plain functions): decompositions whose parts add up to their score by
construction, and head loadings that add up to their edge, for the format and viewer tests."""

from __future__ import annotations

import numpy as np

from sparsetrace.graphs import NodeKind
from sparsetrace.graphs.qk import HeadLoadings, QKDecomposition, QKSite


def _side(g, layer: int, pos: int, hd: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    lay = g.layout
    src = np.isin(lay.kind, [NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TOKEN])
    nodes = np.flatnonzero(src & (lay.layer < layer) & (lay.pos <= pos)).astype(np.int64)
    M = rng.normal(size=(len(nodes), hd))
    const = rng.normal(size=hd)
    return nodes, M, const, const + M.sum(0)


def fake_decomposition(g, site: QKSite, hd: int = 8, seed: int = 0, hop_weight: float | None = 0.5) -> QKDecomposition:
    rng = np.random.default_rng(seed)
    qn, Q, q0, q = _side(g, site.layer, site.query_pos, hd, rng)
    kn, K, k0, k = _side(g, site.layer, site.key_pos, hd, rng)
    scaling = hd**-0.5
    return QKDecomposition(site=site, scaling=scaling, softcap=None, q_nodes=qn, Q=Q, q_const=q0, q_clean=q, k_nodes=kn, K=K,
                           k_const=k0, k_clean=k, model_score=scaling * float(q @ k), pattern=0.4, hop_weight=hop_weight)


def fake_loadings(g, target: int, source: int, n_heads: int = 4, seed: int = 0) -> HeadLoadings:
    rng = np.random.default_rng(seed)
    load = np.zeros((g.layout.n_layers, n_heads))
    load[:, : n_heads // 2] = rng.normal(size=(g.layout.n_layers, n_heads // 2))
    return HeadLoadings(target, source, load, float(load.sum()), None)


def cross_edge(g) -> tuple[int, int]:
    """The strongest edge of the graph whose source sits at an earlier position than its target."""
    lay, adj = g.layout, g.adjacency
    rows, cols = adj.rows(), adj.indices
    ok = np.flatnonzero((lay.pos[cols] < lay.pos[rows]) & (lay.kind[rows] == NodeKind.FEATURE))
    best = ok[np.argmax(np.abs(adj.data[ok]))]
    return int(rows[best]), int(cols[best])
