"""NodeLayout, Adjacency and AttributionGraph storage (torch-free)."""

from __future__ import annotations

import numpy as np
import pytest

from sparsetrace.errors import FormatError, GraphError
from sparsetrace.graphs import Adjacency, AttributionGraph, NodeKind, NodeLayout


def _layout():
    # features given out of order: build() sorts them by (layer, pos, id)
    return NodeLayout.build(3, 4, feature_layer=[2, 0, 0, 1], feature_pos=[1, 3, 1, 2], feature_id=[9, 4, 7, 2], n_logits=2)


def test_layout_blocks_and_lookups():
    lay = _layout()
    assert (lay.n_features, lay.n_errors, lay.n_tokens, lay.n_logits) == (4, 12, 4, 2)
    assert lay.n_nodes == 22
    np.testing.assert_array_equal(lay.layer[:4], [0, 0, 1, 2])
    np.testing.assert_array_equal(lay.pos[:4], [1, 3, 2, 1])
    np.testing.assert_array_equal(lay.feature[:4], [7, 4, 2, 9])
    assert lay.error_index(0, 0) == 4 and lay.error_index(2, 3) == 4 + 11
    assert lay.token_index(3) == 19 and lay.logit_index(1) == 21
    assert lay.feature_index(1, 2, 2) == 2
    with pytest.raises(GraphError, match="not a node"):
        lay.feature_index(1, 2, 3)
    with pytest.raises(GraphError, match="logit index"):
        lay.logit_index(2)
    assert NodeKind(int(lay.kind[19])) is NodeKind.TOKEN and lay.layer[19] == -1
    assert lay.layer[21] == 3 and lay.pos[21] == 3
    assert [lay.node_id(i) for i in (0, 4, 16, 20)] == ["F0.7@1", "E0@0", "T@0", "L0"]


def test_layout_subset_keeps_order_and_lookups():
    lay = _layout()
    keep = np.ones(lay.n_nodes, bool)
    keep[[1, 5, 17]] = False  # a feature, error (0, 1) and token 1
    sub = lay.subset(keep)
    assert sub.n_features == 3 and sub.n_errors == 11 and sub.n_tokens == 3
    assert sub.error_index(0, 1) == -1 and sub.error_index(0, 2) == 4
    assert sub.token_index(1) == -1
    assert sub == NodeLayout.from_arrays(3, 4, sub.to_arrays())


def test_layout_index_methods_by_counting():
    """The engine's index arithmetic, each method checked against a count written out by hand."""
    L, T = 3, 4
    # features given unsorted: (layer, pos, id)
    feats = [(2, 3, 7), (0, 1, 5), (0, 1, 2), (1, 2, 9), (0, 3, 1), (2, 3, 4), (2, 1, 0)]
    lay = NodeLayout.build(L, T, *np.array(feats).T, n_logits=2)
    srt = sorted(feats)
    assert lay.n_sources == len(feats) + L * T + T == lay.logits.start
    np.testing.assert_array_equal(lay.feature_layer_starts, [0, 3, 4, 7])
    assert lay.features_from(1) == 3 and lay.features_from(L) == 7
    np.testing.assert_array_equal(lay.features_from(np.array([2, 0])), [4, 0])
    assert lay.group(2, 3) == 11
    np.testing.assert_array_equal(lay.feature_group, [l * T + c for l, c, _ in srt])
    counts = np.zeros((L, T), dtype=int)
    for l, c, _ in feats:
        counts[l, c] += 1
    np.testing.assert_array_equal(lay.group_counts, counts)
    np.testing.assert_array_equal(lay.rank_in_group, [sum((l2, c2) == (l, c) for l2, c2, _ in srt[:i])
                                                      for i, (l, c, _) in enumerate(srt)])
    # a feature row's cone: features and errors at lower layers and positions ≤ its own, tokens ≤ its own
    present = np.ones((L, T), dtype=bool)
    present[:, 0] = False
    for i, (l, c, _) in enumerate(srt):
        n_feat = sum(l2 < l and c2 <= c for l2, c2, _ in srt)
        assert lay.cone_sizes()[i] == n_feat + l * (c + 1) + (c + 1)
        assert lay.cone_sizes(present)[i] == n_feat + l * c + (c + 1)
    cap = lay.row_capacity()
    assert cap[lay.logits].tolist() == [lay.n_sources] * 2 and not cap[lay.errors].any() and not cap[lay.tokens].any()
    selected = np.array([True, False, True, True, False, True, True])
    keep, col_map = lay.fold(selected)
    assert keep.sum() == lay.n_nodes - 2 and not keep[[1, 4]].any()
    for i in (1, 4):
        assert col_map[i] == lay.error_index(*srt[i][:2])
    assert np.array_equal(np.delete(col_map, [1, 4]), np.delete(np.arange(lay.n_nodes), [1, 4]))


def test_can_feed_is_the_dag_order():
    lay = _layout()
    # node 0: F at layer 0 pos 1; node 2: layer 1 pos 2; node 3: layer 2 pos 1
    t = np.array([2, 2, 0, 0, 0])
    s = np.array([0, 3, lay.token_index(1), lay.token_index(2), 2])
    np.testing.assert_array_equal(lay.can_feed(t, s), [True, False, True, False, False])


def test_adjacency_dense_coo_roundtrip_and_threshold():
    rng = np.random.default_rng(0)
    a = np.tril(rng.normal(size=(6, 6)), -1)
    a[np.abs(a) < 0.3] = 0
    adj = Adjacency.from_dense(a)
    np.testing.assert_array_equal(adj.to_dense(), a)
    assert adj.remainder.sum() == 0
    r, c = np.nonzero(a)
    adj2 = Adjacency.from_coo(np.r_[r, r[:1]], np.r_[c, c[:1]], np.r_[a[r, c], [1.0]], 6)
    expected = a.copy()
    expected[r[0], c[0]] += 1.0  # duplicates are summed
    np.testing.assert_allclose(adj2.to_dense(), expected)
    th = Adjacency.from_dense(a, threshold=0.5)
    kept = th.to_dense()
    dropped = np.abs(a).sum(1) - np.abs(kept).sum(1)
    np.testing.assert_allclose(th.remainder, dropped)
    assert np.all(np.abs(kept[kept != 0]) > 0.5 * np.abs(a).max(1, keepdims=True).repeat(6, 1)[kept != 0])


def test_adjacency_subset_moves_lost_mass_to_remainder():
    a = np.array([[0, 0, 0], [2.0, 0, 0], [-1.0, 3.0, 0]])
    sub = Adjacency.from_dense(a).subset(np.array([True, False, True]))
    np.testing.assert_array_equal(sub.to_dense(), [[0, 0], [-1.0, 0]])
    np.testing.assert_array_equal(sub.remainder, [0, 3.0])


def _graph():
    lay = _layout()
    n = lay.n_nodes
    rng = np.random.default_rng(1)
    a = np.zeros((n, n), np.float32)
    for t in list(range(4)) + [20, 21]:
        for s in range(n):
            if lay.can_feed(np.array([t]), np.array([s]))[0]:
                a[t, s] = rng.normal()
    return AttributionGraph(
        layout=lay,
        adjacency=Adjacency.from_dense(a),
        activation=rng.random(n).astype(np.float32),
        bias=rng.normal(size=n).astype(np.float32),
        value=rng.normal(size=n).astype(np.float32),
        token_ids=np.array([1, 5, 6, 7]),
        token_strings=["<s>", "a", " b", " c"],
        logit_token=np.array([10, 11]),
        logit_probability=np.array([0.7, 0.2]),
        logit_label=[" x", " y"],
        prompt="a b c",
        metadata={"model": {"id": "m"}, "scores": {"replacement": 0.5}},
    )


def test_graph_save_load_roundtrip(tmp_path):
    g = _graph()
    p = g.save(tmp_path / "g.safetensors")
    assert [f.name for f in tmp_path.iterdir()] == ["g.safetensors"]  # no temp files left
    back = AttributionGraph.load(p)
    assert back.layout == g.layout
    np.testing.assert_array_equal(back.dense_adjacency(), g.dense_adjacency())
    for name in ("activation", "bias", "value", "token_ids", "logit_token", "logit_probability"):
        np.testing.assert_array_equal(getattr(back, name), getattr(g, name))
    assert back.token_strings == g.token_strings and back.logit_label == g.logit_label
    assert back.prompt == g.prompt and back.metadata == g.metadata
    np.testing.assert_array_equal(back.logit_weights()[g.layout.logits], [0.7, 0.2])


def test_graph_load_rejects_bad_files(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        AttributionGraph.load(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError, match="not a readable"):
        AttributionGraph.load(bad)
    p = _graph().save(tmp_path / "g.safetensors")
    data = p.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError):
        AttributionGraph.load(trunc)


def test_graph_rejects_inconsistent_arrays():
    g = _graph()
    with pytest.raises(GraphError, match="activation"):
        AttributionGraph(**{**g.__dict__, "activation": g.activation[:-1]})


def test_subgraph_keeps_logits_and_remainders():
    g = _graph()
    keep = np.ones(g.n_nodes, bool)
    keep[0] = False
    sub = g.subgraph(keep)
    assert sub.n_nodes == g.n_nodes - 1
    lost = np.abs(g.dense_adjacency()[:, 0])
    np.testing.assert_allclose(sub.adjacency.remainder, lost[keep], rtol=1e-6)
    keep[-1] = False
    with pytest.raises(GraphError, match="logit"):
        g.subgraph(keep)


def test_graph_networkx_and_notebook_methods():
    import shutil

    g = _graph()
    back = AttributionGraph.from_networkx(g.to_networkx())
    np.testing.assert_allclose(back.dense_adjacency(), g.dense_adjacency(), rtol=1e-6)
    assert back.layout == g.layout
    html = g._repr_html_()
    assert "<iframe" in html and "srcdoc" in html
    if shutil.which("dot"):
        svg = g._repr_svg_()
        assert svg.lstrip().startswith("<?xml") or "<svg" in svg[:500]
        assert svg.count("<g id=\"node") >= 6


def test_atomic_write_mode_and_no_leftovers(tmp_path):
    import os

    from sparsetrace._atomic import atomic_write, atomic_write_text

    p = atomic_write_text(tmp_path / "a.txt", "hi")
    umask = os.umask(0)
    os.umask(umask)
    assert (p.stat().st_mode & 0o777) == (0o666 & ~umask)

    def boom(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("fail")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "b.txt", boom)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(FormatError, match="does not exist"):
        atomic_write_text(tmp_path / "missing" / "c.txt", "x")


def test_picture_subgraph_keeps_most_influential_nodes_and_strongest_edges():
    from sparsetrace.graphs.prune import node_influence
    from sparsetrace.graphs.render import picture_subgraph

    g = _graph()
    assert picture_subgraph(g, max_nodes=100, max_edges=10_000) is g  # within limits: unchanged
    infl = node_influence(g)
    sub = picture_subgraph(g, max_nodes=5, max_edges=12)
    inner = np.isin(g.layout.kind, [NodeKind.FEATURE, NodeKind.ERROR])
    cand = np.flatnonzero(inner)
    kept = cand[np.argsort(-infl[cand], kind="stable")[:5]]
    assert sub.layout.n_features + sub.layout.n_errors == 5
    assert sub.layout.n_tokens == g.layout.n_tokens and sub.layout.n_logits == g.layout.n_logits
    np.testing.assert_array_equal(np.sort(g.layout.feature[kept][g.layout.kind[kept] == NodeKind.FEATURE]),
                                  np.sort(sub.layout.feature[: sub.layout.n_features]))
    assert sub.adjacency.nnz == 12
    full = g.subgraph(np.isin(np.arange(g.n_nodes), kept) | ~inner)
    strongest = np.sort(np.abs(full.adjacency.data))[-12:]
    np.testing.assert_allclose(np.sort(np.abs(sub.adjacency.data)), strongest)
    # nothing is lost from the row normalisation: kept |w| + remainder = the subgraph's
    np.testing.assert_allclose(np.abs(sub.dense_adjacency()).sum(1) + sub.adjacency.remainder,
                               np.abs(full.dense_adjacency()).sum(1) + full.adjacency.remainder, rtol=1e-6)
