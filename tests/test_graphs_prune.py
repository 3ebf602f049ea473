"""Influence and pruning: golden 12-node case, kernel parity with the dense reference, properties."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _graph_fixtures import golden_graph, golden_influence, load_golden, random_graph
from reference import influence_naive as ref
from sparsetrace.errors import ConfigError, GraphError
from sparsetrace.graphs import _kernels
from sparsetrace.graphs.graph import Adjacency
from sparsetrace.graphs.prune import (
    PruneConfig,
    adjacency_influence,
    apply_prune,
    csr_rows,
    cumulative_threshold,
    node_influence,
    prune,
    prune_graph,
    topological_order,
)


# ---- golden: circuit-tracer's tests/test_graph.py case ------------------------------------------------
def test_golden_influence_matches_fractions():
    g = golden_graph()
    np.testing.assert_allclose(node_influence(g), golden_influence(), rtol=0, atol=1e-15)


def test_golden_reference_is_exact_in_fractions():
    """The naive reference in exact rational arithmetic gives the golden fractions exactly."""
    gold = load_golden()
    n = gold["n_nodes"]
    a = np.full((n, n), Fraction(0), dtype=object)
    for t, s, v in gold["edges"]:
        a[t, s] = Fraction(v)
    w = np.full(n, Fraction(0), dtype=object)
    w[11] = Fraction(1)
    infl = ref.influence_power_series(ref.normalise(a, np.full(n, Fraction(0), dtype=object)), w)
    assert list(infl) == [Fraction(x) for x in gold["expected_node_influence"]]


def test_golden_node_pruning_and_edge_scores():
    g = golden_graph()
    gold = load_golden()
    res = prune(g, 0.8, 0.98)
    # node pruning at 0.8 drops exactly node 0, removing edges (0, 9) and (3, 0)
    assert np.flatnonzero(~res.node_mask_after_node_pruning).tolist() == [0, 2, 4, 5, 7]
    rows, cols = g.adjacency.rows(), g.adjacency.indices
    expected = {(t, s): float(Fraction(f)) for t, s, f in gold["expected_edge_scores_after_node_pruning"]["nonzero"]}
    for e in range(g.adjacency.nnz):
        key = (int(rows[e]), int(cols[e]))
        assert res.edge_score[e] == pytest.approx(expected.get(key, 0.0), abs=1e-15), key
    removed = {(int(rows[e]), int(cols[e])) for e in np.flatnonzero(res.edge_score == 0)}
    assert removed == {tuple(x) for x in gold["node_pruning_at_0.8_removes_edges"]}
    # all 8 scored edges are needed for 0.98; the last two (1/8 each) are 0.25/1.625 of the total
    assert res.edge_mask.sum() == 8
    # at 0.8 the six edges scored ≥ 3/16 reach 1.375/1.625; feature 3 then has no kept input and goes,
    # taking its edge into the logit with it: 5 edges remain after the fixed point
    low = prune(g, 0.8, 0.8)
    assert low.edge_mask.sum() == 5 and not low.node_mask[3] and low.n_sweeps == 2
    # feature 0 (node 0) is gone; error node 8 keeps no input but errors do not need one
    assert res.node_mask.tolist() == [False, True, False, True, False, False, True, False, True, True, True, True]


def test_apply_prune_golden():
    g = golden_graph()
    res = prune(g)
    p = apply_prune(g, res)
    assert p.n_nodes == 7 and p.adjacency.nnz == 8
    # the dropped source (node 0 → node 3, |10|) sits in node 3's remainder: Â is unchanged on kept edges
    i3 = p.layout.feature_index(1, 1, 0)
    assert p.adjacency.remainder[i3] == pytest.approx(10.0)
    np.testing.assert_allclose(p.metadata["node_influence"], golden_influence()[res.node_mask])
    assert p.metadata["pruning"]["n_nodes_after"] == 7
    assert prune_graph(g).n_nodes == 7


# ---- kernels vs dense reference -------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("store_threshold", [0.0, 0.3])
def test_kernel_parity_with_reference(seed, store_threshold):
    g = random_graph(seed, n_features=25, store_threshold=store_threshold)
    a, rem, w = g.dense_adjacency(), g.adjacency.remainder, g.logit_weights()
    ahat = ref.normalise(a, rem)
    expected = ref.influence_power_series(ahat, w)
    np.testing.assert_allclose(node_influence(g), expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ref.influence_inverse(ahat, w), expected, rtol=1e-9, atol=1e-12)

    res = prune(g, 0.7, 0.9)
    nm, em, infl, scores = ref.prune_naive(a, rem, w, g.layout.kind, 0.7, 0.9)
    rows, cols = g.adjacency.rows(), g.adjacency.indices
    np.testing.assert_allclose(res.edge_score, scores[rows, cols], rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(res.node_mask, nm)
    np.testing.assert_array_equal(res.edge_mask, em[rows, cols])
    assert em.sum() == res.edge_mask.sum()


def test_remainder_keeps_normalisation():
    """Thresholded storage: kept entries keep their Â value because the remainder counts."""
    g = random_graph(3, n_features=30)
    a = g.dense_adjacency()
    full = Adjacency.from_dense(a)
    cut = Adjacency.from_dense(a, threshold=0.5)
    assert cut.nnz < full.nnz
    indptr, indices, data, rem = (np.asarray(x, dtype=t) for x, t in
                                  ((cut.indptr, np.int64), (cut.indices, np.int64), (cut.data, float), (cut.remainder, float)))
    d_cut = _kernels.row_denominators(*csr_rows(indptr), indices, data, rem, np.ones(cut.n, bool))
    d_full = _kernels.row_denominators(*csr_rows(full.indptr), full.indices, full.data.astype(float),
                                       full.remainder.astype(float), np.ones(full.n, bool))
    np.testing.assert_allclose(d_cut, d_full, rtol=1e-12)
    np.testing.assert_allclose(d_full, np.abs(a).sum(1), rtol=1e-12)


def test_edge_score_kernel_parity():
    g = random_graph(11, n_features=30)
    a, rem, w = g.dense_adjacency(), g.adjacency.remainder, g.logit_weights()
    keep = np.random.default_rng(0).random(g.n_nodes) < 0.7
    keep[g.layout.logits] = True
    ahat = ref.normalise(a, rem, keep.astype(float))
    infl_ref = ref.influence_power_series(ahat, w)
    infl = adjacency_influence(g.adjacency, w, node_mask=keep)
    np.testing.assert_allclose(infl, infl_ref, rtol=1e-12, atol=1e-14)
    adj = g.adjacency
    denom = _kernels.row_denominators(*csr_rows(adj.indptr), adj.indices, adj.data.astype(float),
                                      adj.remainder.astype(float), keep)
    sc = _kernels.edge_scores(adj.indptr, adj.indices, adj.data.astype(float), denom, infl, w, keep)
    np.testing.assert_allclose(sc, ref.edge_scores(ahat, infl_ref, w)[adj.rows(), adj.indices], rtol=1e-12, atol=1e-14)


def test_fixed_point_kernel_chain():
    """A chain token → f0 → f1 → f2 where f2 loses its only out-edge: all three features go, one per sweep."""
    # nodes: 0 f0, 1 f1, 2 f2, 3 token, 4 logit; edges (t, s): (0,3) (1,0) (2,1) (4,3)
    adj = Adjacency.from_coo(np.array([0, 1, 2, 4]), np.array([3, 0, 1, 3]), np.ones(4), 5)
    nodes = np.ones(5, bool)
    edges = np.ones(4, bool)
    protected = np.array([0, 0, 0, 1, 1], bool)
    needs_input = np.array([1, 1, 1, 0, 0], bool)
    sweeps = _kernels.prune_to_fixed_point(adj.indptr, adj.indices, nodes, edges, protected, needs_input)
    assert nodes.tolist() == [False, False, False, True, True]
    assert edges.tolist() == [False, False, False, True]
    assert sweeps == 4


def test_fixed_point_drops_feature_without_input():
    # nodes: 0 f0 (no inputs), 1 error, 2 token, 3 logit; edges into the logit from f0 and the error
    adj = Adjacency.from_coo(np.array([3, 3]), np.array([0, 1]), np.ones(2), 4)
    nodes, edges = np.ones(4, bool), np.ones(2, bool)
    _kernels.prune_to_fixed_point(adj.indptr, adj.indices, nodes, edges, np.array([0, 0, 1, 1], bool),
                                  np.array([1, 0, 0, 0], bool))
    assert nodes.tolist() == [False, True, True, True]
    assert edges.tolist() == [False, True]


# ---- topological order and cycles ----------------------------------------------------------------------
def test_topological_order_on_shuffled_dag():
    rng = np.random.default_rng(5)
    n = 30
    perm = rng.permutation(n)  # rank of each node: edges go from lower rank to higher rank
    t, s = np.nonzero((perm[:, None] > perm[None, :]) & (rng.random((n, n)) < 0.2))
    adj = Adjacency.from_coo(t, s, np.ones(len(t)), n)
    order = topological_order(adj)
    where = np.empty(n, int)
    where[order] = np.arange(n)
    assert sorted(order.tolist()) == list(range(n))
    assert (where[t] < where[s]).all()  # every target before each of its sources


def test_cycle_is_an_error():
    adj = Adjacency.from_coo(np.array([1, 2, 0, 3]), np.array([0, 1, 2, 2]), np.ones(4), 4)
    with pytest.raises(GraphError, match="not a DAG: 3 nodes"):
        topological_order(adj)
    with pytest.raises(GraphError, match="not a DAG"):
        adjacency_influence(adj, np.array([0, 0, 0, 1.0]))


# ---- thresholds ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", None, True])
def test_threshold_validation(bad):
    with pytest.raises(ConfigError, match=r"node_threshold must be a number in \(0, 1\]"):
        PruneConfig(node_threshold=bad)
    if bad is not None:  # None means "use the default" in prune()
        with pytest.raises(ConfigError, match=r"edge_threshold must be a number in \(0, 1\], got"):
            prune(golden_graph(), 0.8, bad)


def test_cumulative_threshold():
    s = np.array([0.5, 0.0, 0.3, 0.2, 0.2])  # total 1.2
    assert cumulative_threshold(s, 0.4) == 0.5  # 0.5/1.2 = 0.417
    assert cumulative_threshold(s, 0.5) == 0.3  # 0.8/1.2
    assert cumulative_threshold(s, 0.7) == 0.2  # ties at 0.2 kept together
    assert cumulative_threshold(s, 1.0) == 0.2
    assert cumulative_threshold(np.zeros(3), 0.5) == float("inf")


def test_threshold_one_keeps_everything_with_influence():
    g = random_graph(8, n_features=30)
    res = prune(g, 1.0, 1.0)
    infl = res.node_influence
    prunable = g.layout.kind < 2
    np.testing.assert_array_equal(res.node_mask_after_node_pruning[prunable], infl[prunable] > 0)


def test_defaults_come_from_config():
    g = random_graph(2)
    assert prune(g).config == PruneConfig()
    assert prune(g, config=PruneConfig(0.5, 0.9)).config == PruneConfig(0.5, 0.9)


# ---- property: DAG sweep == power series == inverse ------------------------------------------------
@st.composite
def random_dags(draw):
    n = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.floats(0.05, 0.9))
    rng = np.random.default_rng(seed)
    rank = rng.permutation(n)  # a hidden topological order unrelated to the indices
    mask = (rank[:, None] > rank[None, :]) & (rng.random((n, n)) < density)
    a = np.where(mask, rng.normal(size=(n, n)), 0.0)
    rem = np.where(rng.random(n) < 0.3, rng.uniform(0, 2, n), 0.0)
    w = np.where(rng.random(n) < 0.3, rng.uniform(0, 1, n), 0.0)
    return a, rem, w


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags())
def test_property_sweep_equals_power_series_and_inverse(dag):
    a, rem, w = dag
    t, s = np.nonzero(a)
    adj = Adjacency.from_coo(t, s, a[t, s], len(w), rem)
    ahat = ref.normalise(a, rem)
    series = ref.influence_power_series(ahat, w)
    inverse = ref.influence_inverse(ahat, w)
    sweep = adjacency_influence(adj, w)
    np.testing.assert_allclose(sweep, series, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sweep, inverse, rtol=1e-8, atol=1e-10)


def test_graphs_package_never_imports_torch():
    """docs/design.md §1: a saved graph can be pruned, scored, exported and rendered without torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import sparsetrace.graphs, sparsetrace.graphs.prune, sparsetrace.graphs.scores, sparsetrace.graphs.export\n"
        "import sparsetrace.graphs.supernodes, sparsetrace.graphs.render, sparsetrace.graphs.html\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
