"""Supernodes: manual grouping aggregates exactly; automatic grouping finds parallel out-edge vectors."""

from __future__ import annotations

import numpy as np
import pytest

from _graph_fixtures import _wrap, golden_graph, random_graph
from sparsetrace.errors import ConfigError, GraphError
from sparsetrace.graphs.graph import Adjacency, NodeLayout
from sparsetrace.graphs.prune import node_influence
from sparsetrace.graphs.supernodes import Supernode, auto_supernodes, group_nodes, is_supernode


def test_manual_group_golden():
    g = golden_graph()
    # group features 1 (layer 0) and 3 (layer 1): edge 3←1 is internal
    sg = group_nodes(g, [Supernode("say-x", (1, 3))])
    assert sg.n_nodes == 11
    s = int(np.flatnonzero(is_supernode(sg.layout))[0])
    assert sg.layout.layer[s] == 0 and sg.layout.pos[s] == 1 and sg.layout.feature[s] == -2
    assert sg.metadata["supernode_names"] == {"-2": "say-x"}
    assert sg.metadata["supernode_members"]["-2"] == ["F0.1@1", "F1.0@1"]
    assert sg.activation[s] == pytest.approx(g.activation[1] + g.activation[3])
    a = sg.dense_adjacency()
    logit = sg.layout.logit_index(0)
    assert a[logit, s] == 20.0  # 10 from each member, summed
    # inputs: tokens 9, 10 (into 1) and f0, error 6 (into 3); the internal 3←1 edge goes to the remainder
    src, w = sg.adjacency.row(s)
    assert sorted(sg.layout.node_id(int(i)) for i in src) == ["E0@1", "F0.3@0", "T@0", "T@1"]
    assert sg.adjacency.remainder[s] == 10.0
    assert g.metadata == {}  # the input is not mutated


def test_grouping_keeps_influence_of_parallel_members():
    """Two features at one layer feeding only the logit: their group carries the sum of their influence."""
    g = golden_graph()
    sg = group_nodes(g, [Supernode("pair", (0, 1))])  # both layer 0, disjoint inputs except token 9
    s = int(np.flatnonzero(is_supernode(sg.layout))[0])
    i0 = node_influence(g)
    assert node_influence(sg)[s] == pytest.approx(i0[0] + i0[1])


def test_group_errors():
    g = golden_graph()
    with pytest.raises(GraphError, match="E0@0 is not a feature"):
        group_nodes(g, [Supernode("bad", (5,))])
    with pytest.raises(GraphError, match="in both 'a' and 'b'"):
        group_nodes(g, [Supernode("a", (0, 1)), Supernode("b", (1, 3))])
    with pytest.raises(GraphError, match="has no members"):
        group_nodes(g, [Supernode("e", ())])


def _parallel_graph():
    """Four features at position 1, layer 0: f0 and f1 send proportional out-edges, f2 the opposite sign
    pattern, f3 only its own target."""
    layout = NodeLayout.build(2, 2, [0, 0, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 2, 3, 10, 11], n_logits=1)
    t4, t5, lg = 4, 5, layout.logit_index(0)
    edges = [
        (t4, 0, 1.0), (t5, 0, 2.0), (lg, 0, 0.5),
        (t4, 1, 2.0), (t5, 1, 4.0), (lg, 1, 1.0),
        (t4, 2, -1.0), (t5, 2, 2.0),
        (lg, 3, 1.0),
        (lg, t4, 1.0), (lg, t5, 1.0),
    ]
    t, s, v = map(np.array, zip(*edges))
    return _wrap(layout, Adjacency.from_coo(t, s, v.astype(float), layout.n_nodes), np.array([1.0]))


def test_auto_supernodes():
    g = _parallel_graph()
    groups = auto_supernodes(g, layers=(0, 0), threshold=0.99)
    assert [grp.nodes for grp in groups] == [(0, 1)]
    assert groups[0].name == "p1 L0-0 #0"
    # a lower threshold adds f2 (cosine with f0 = 3/sqrt(5.25*5) ≈ 0.585) but never f3 (≈ 0.218)
    assert [grp.nodes for grp in auto_supernodes(g, (0, 0), threshold=0.5)] == [(0, 1, 2)]
    # layer 1 only: its two features both send exactly 1.0 to the logit
    assert [grp.nodes for grp in auto_supernodes(g, (1, 1), threshold=0.999)] == [(4, 5)]
    assert auto_supernodes(g, (1, 1), threshold=0.999, min_size=3) == []
    grouped = group_nodes(g, groups)
    assert grouped.n_nodes == g.n_nodes - 1


def test_auto_supernodes_validation():
    g = _parallel_graph()
    with pytest.raises(ConfigError, match=r"threshold must be a cosine similarity in \[-1, 1\], got 1.5"):
        auto_supernodes(g, threshold=1.5)
    with pytest.raises(ConfigError, match="low ≤ high"):
        auto_supernodes(g, layers=(1, 0))


def test_auto_on_random_graph_is_a_partition():
    g = random_graph(3, n_features=40, n_pos=2)
    groups = auto_supernodes(g, threshold=0.3)
    members = [i for grp in groups for i in grp.nodes]
    assert len(members) == len(set(members))
    grouped = group_nodes(g, groups)
    assert grouped.n_nodes == g.n_nodes - len(members) + len(groups)
    # total signed weight into the logits is preserved by summing
    np.testing.assert_allclose(
        grouped.dense_adjacency()[grouped.layout.logits].sum(), g.dense_adjacency()[g.layout.logits].sum()
    )
