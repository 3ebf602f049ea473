"""Graph builders shared by the tests/test_graphs_*.py files (plain functions, not conftest fixtures)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from sparsetrace.graphs import Adjacency, AttributionGraph, NodeLayout

# a copy of ../shared/golden/prune-12.json, so the suite runs wherever the repo is cloned
GOLDEN = Path(__file__).resolve().parent / "golden" / "prune-12.json"


def load_golden() -> dict:
    return json.loads(GOLDEN.read_text())


def golden_graph() -> AttributionGraph:
    """circuit-tracer's 12-node case as an AttributionGraph whose node indices equal the JSON's.

    Layout (2 layers, 2 positions): features 0..4 at (layer, pos) = (0,0) (0,1) (0,1) (1,1) (1,1),
    errors 5..8 at (0,0) (0,1) (1,0) (1,1), tokens 9, 10, logit 11; every golden edge respects the DAG."""
    g = load_golden()
    layout = NodeLayout.build(2, 2, [0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [3, 1, 2, 0, 5], n_logits=1)
    assert layout.n_nodes == g["n_nodes"]
    t, s, v = zip(*g["edges"])
    adj = Adjacency.from_coo(np.array(t), np.array(s), np.array(v, dtype=np.float64), layout.n_nodes)
    assert layout.can_feed(np.array(t), np.array(s)).all()
    return _wrap(layout, adj, np.array([1.0]), token_ids=np.array([5, 7]))


def golden_influence() -> np.ndarray:
    return np.array([float(Fraction(x)) for x in load_golden()["expected_node_influence"]])


def _wrap(layout: NodeLayout, adj: Adjacency, probs: np.ndarray, token_ids=None, seed: int = 0) -> AttributionGraph:
    rng = np.random.default_rng(seed)
    n = layout.n_nodes
    k = layout.n_logits
    T = layout.n_pos
    act = np.zeros(n)
    act[layout.features] = rng.uniform(0.5, 3.0, layout.n_features)
    act[layout.errors] = rng.uniform(0.1, 1.0, layout.n_errors)
    dense_rowsum = np.bincount(adj.rows(), weights=adj.data, minlength=n)
    bias = np.zeros(n)
    bias[layout.features] = rng.normal(size=layout.n_features) * 0.1
    value = dense_rowsum + bias
    token_ids = np.arange(100, 100 + T) if token_ids is None else np.asarray(token_ids)
    return AttributionGraph(
        layout=layout,
        adjacency=adj,
        activation=act,
        bias=bias,
        value=value,
        token_ids=np.asarray(token_ids, dtype=np.int64),
        token_strings=[f"tok{i}" for i in range(T)],
        logit_token=np.arange(200, 200 + k, dtype=np.int64),
        logit_probability=np.asarray(probs, dtype=np.float64),
        logit_label=[f"out{i}" for i in range(k)],
        prompt=" ".join(f"tok{i}" for i in range(T)),
    )


def random_graph(
    seed: int,
    n_layers: int = 3,
    n_pos: int = 4,
    n_features: int = 20,
    n_logits: int = 2,
    edge_prob: float = 0.5,
    store_threshold: float = 0.0,
) -> AttributionGraph:
    """A random layered attribution graph: edges only where ``layout.can_feed`` allows, into feature and
    logit rows; signed normal weights; ``store_threshold`` > 0 drops small entries into the remainder."""
    rng = np.random.default_rng(seed)
    fl = rng.integers(0, n_layers, n_features)
    fp = rng.integers(0, n_pos, n_features)
    fi = rng.choice(10_000, n_features, replace=False)
    layout = NodeLayout.build(n_layers, n_pos, fl, fp, fi, n_logits)
    n = layout.n_nodes
    idx = np.arange(n)
    allowed = layout.can_feed(idx[:, None], idx[None, :])
    rows_ok = np.zeros(n, dtype=bool)
    rows_ok[layout.features] = True
    rows_ok[layout.logits] = True
    mask = allowed & rows_ok[:, None] & (rng.random((n, n)) < edge_prob)
    a = np.where(mask, rng.normal(size=(n, n)), 0.0)
    adj = Adjacency.from_dense(a, threshold=store_threshold)
    probs = rng.dirichlet(np.ones(n_logits)) * rng.uniform(0.5, 1.0)
    return _wrap(layout, adj, probs, seed=seed)
