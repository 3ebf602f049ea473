"""Replacement / completeness scores: hand-computed golden values, dense reference, folding."""

from __future__ import annotations

import numpy as np
import pytest

from _graph_fixtures import golden_graph, random_graph
from reference import influence_naive as ref
from sparsetrace.errors import GraphError
from sparsetrace.graphs.prune import prune
from sparsetrace.graphs.scores import GraphScores, fold_pruned, graph_scores, pruned_graph_scores, store_scores


def test_golden_scores_by_hand():
    # I(tokens) = 1/4 + 1/6 = 5/12, I(errors) = 1/3 + 1/4 = 7/12; completeness numerator 25/12 over 32/12
    s = graph_scores(golden_graph())
    assert s.replacement == pytest.approx(5 / 12, abs=1e-15)
    assert s.completeness == pytest.approx(25 / 32, abs=1e-15)


def test_golden_folded_scores_by_hand():
    g = golden_graph()
    res = prune(g)
    f = fold_pruned(g, res.node_mask)
    # pruned features 0, 2, 4 go; node 0 (layer 0, pos 0) folds into error node 5: edge 3←0 becomes 3←5
    assert f.n_nodes == 9
    e5 = f.layout.error_index(0, 0)
    f3 = f.layout.feature_index(1, 1, 0)
    src, wts = f.adjacency.row(f3)
    assert e5 in src.tolist() and wts[src.tolist().index(e5)] == 10.0
    s = pruned_graph_scores(g, res)
    # tokens 1/6 + 1/6, errors 1/12 + 1/3 + 1/4: replacement 1/3; completeness 23/12 over 31/12
    assert s.replacement == pytest.approx(1 / 3, abs=1e-15)
    assert s.completeness == pytest.approx(23 / 31, abs=1e-15)


def test_folding_sums_into_existing_error_edges():
    g = random_graph(4, n_features=30)
    res = prune(g, 0.5, 0.9)
    f = fold_pruned(g, res.node_mask)
    # every logit row keeps its total signed input: folding moves weight between sources, never drops it
    for k in range(g.layout.n_logits):
        before = g.adjacency.row(g.layout.logit_index(k))[1].sum()
        after = f.adjacency.row(f.layout.logit_index(k))[1].sum()
        assert after == pytest.approx(before, rel=1e-12)
    assert f.layout.n_errors == g.layout.n_errors
    assert f.layout.n_features == int(res.node_mask[g.layout.features].sum())


@pytest.mark.parametrize("seed", range(4))
def test_scores_match_dense_reference(seed):
    g = random_graph(seed, n_features=25, store_threshold=0.2 * (seed % 2))
    rep, comp = ref.graph_scores(g.dense_adjacency(), g.adjacency.remainder, g.logit_weights(), g.layout.kind)
    s = graph_scores(g)
    assert s.replacement == pytest.approx(rep, rel=1e-12)
    assert s.completeness == pytest.approx(comp, rel=1e-12)
    assert 0 <= s.replacement <= 1 and 0 <= s.completeness <= 1


def test_no_errors_means_perfect_scores():
    g = golden_graph()
    from sparsetrace.graphs.graph import Adjacency
    import dataclasses

    adj = g.adjacency
    keep = g.layout.kind[adj.indices] != 1
    rows = adj.rows()
    clean = Adjacency.from_coo(rows[keep], adj.indices[keep], adj.data[keep], adj.n)
    s = graph_scores(dataclasses.replace(g, adjacency=clean))
    assert s == GraphScores(1.0, 1.0)


def test_store_scores():
    g = golden_graph()
    out = store_scores(g, prune(g))
    assert g.metadata["scores"] is out
    assert out["full"]["replacement"] == pytest.approx(5 / 12)
    assert out["pruned"]["completeness"] == pytest.approx(23 / 31)
    assert set(store_scores(g)) == {"full"}


def test_fold_needs_an_error_node():
    g = golden_graph()
    keep = np.ones(g.n_nodes, bool)
    keep[g.layout.error_index(0, 0)] = False
    sub = g.subgraph(keep)
    mask = np.ones(sub.n_nodes, bool)
    mask[0] = False  # feature at (0, 0) whose error node is gone
    with pytest.raises(GraphError, match=r"cannot fold F0\.3@0"):
        fold_pruned(sub, mask)
    with pytest.raises(GraphError, match="node_mask has shape"):
        fold_pruned(g, np.ones(3, bool))
