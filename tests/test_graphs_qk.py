"""QK results in the graph file (docs/design.md §13, graphs/qk.py): they round-trip exactly, name nodes by
id so pruned graphs keep them, merge by site and edge, and version-1 files (no QK part) still load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from sparsetrace.errors import FormatError, GraphError
from sparsetrace.graphs import AttributionGraph
from sparsetrace.graphs.graph import GRAPH_FORMAT_VERSION
from sparsetrace.graphs.prune import prune_graph
from sparsetrace.graphs.qk import QKSite, QKStore

from _graph_fixtures import random_graph
from _qk_fixtures import cross_edge, fake_decomposition, fake_loadings

SITES = [QKSite(2, 1, 3, 1), QKSite(1, 0, 2, 2)]


def _graph_with_qk():
    g = random_graph(3, n_layers=3, n_pos=4, n_features=30)
    decs = [fake_decomposition(g, s, seed=k) for k, s in enumerate(SITES)]
    decs[1].hop_weight = None
    t, s = cross_edge(g)
    g.qk = QKStore.from_results(g.layout, decs, [fake_loadings(g, t, s)])
    return g, decs, (t, s)


def _same(a, b):
    assert a.site == b.site and a.hop_weight == b.hop_weight and a.softcap == b.softcap
    for name in ("q_nodes", "Q", "q_const", "q_clean", "k_nodes", "K", "k_const", "k_clean"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.scaling, a.model_score, a.pattern) == (b.scaling, b.model_score, b.pattern)
    assert a.rows() == b.rows()


def test_round_trip_is_exact(tmp_path):
    g, decs, (t, s) = _graph_with_qk()
    g.save(tmp_path / "g.safetensors")
    back = AttributionGraph.load(tmp_path / "g.safetensors")
    got, loads = back.qk.for_layout(back.layout)
    for a, b in zip(decs, got, strict=True):
        _same(a, b)
        assert abs(b.total() - b.score) <= 1e-12 * max(1.0, abs(b.score))
    (hl,) = loads
    assert (hl.target, hl.source) == (t, s) and hl.stored is None
    assert np.array_equal(hl.loading, g.qk.loadings[0].loading) and hl.loading.sum() == pytest.approx(hl.edge, abs=1e-12)
    with safe_open(str(tmp_path / "g.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["sparsetrace"])["version"] == GRAPH_FORMAT_VERSION == 2


def test_version_1_file_without_qk_still_loads(tmp_path):
    g, _, _ = _graph_with_qk()
    g.qk = None
    g.save(tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="np") as f:
        header = json.loads(f.metadata()["sparsetrace"])
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    assert "qk" not in header and not any(k.startswith("qk.") for k in arrays)
    header["version"] = 1  # what version-1 sparsetrace wrote: the same file, older number
    save_file(arrays, str(tmp_path / "old.safetensors"), metadata={"sparsetrace": json.dumps(header)})
    old = AttributionGraph.load(tmp_path / "old.safetensors")
    assert old.qk is None and old.n_nodes == g.n_nodes
    assert np.array_equal(old.adjacency.data, g.adjacency.data)


def test_pruned_graph_keeps_the_results_by_node_id(tmp_path):
    g, decs, _ = _graph_with_qk()
    pruned = prune_graph(g, 0.5, 0.9)
    assert pruned.n_nodes < g.n_nodes and pruned.qk is g.qk
    with pytest.raises(GraphError, match=r"the graph lacks \d+ node\(s\) the stored QK results name, e.g. "):
        pruned.qk.for_layout(pruned.layout)
    pruned.save(tmp_path / "p.safetensors")
    data = AttributionGraph.load(tmp_path / "p.safetensors").qk.viewer_data(5)
    ids = {g.layout.node_id(i) for i in range(g.n_nodes)}
    first = data["scores"][0]
    assert (first["layer"], first["head"], first["query_pos"], first["key_pos"]) == (2, 1, 3, 1)
    want = decs[0].rows(5)
    assert [r[2] for r in first["rows"]] == [pytest.approx(v, rel=1e-5) for _, _, v in want]
    assert [r[0] for r in first["rows"]] == [None if q < 0 else g.layout.node_id(q) for q, _, _ in want]
    assert all(r[1] is None or r[1] in ids for r in first["rows"])
    assert sum(first["terms"]) == pytest.approx(decs[0].score, rel=1e-5)


def test_merge_replaces_the_same_site_and_edge():
    g, decs, (t, s) = _graph_with_qk()
    again = fake_decomposition(g, SITES[0], seed=9, hop_weight=2.0)
    other = fake_decomposition(g, QKSite(2, 3, 3, 0), seed=4)
    store = g.qk.merged(QKStore.from_results(g.layout, [again, other], [fake_loadings(g, t, s, seed=5)]))
    got, loads = store.for_layout(g.layout)
    assert [d.site for d in got] == [SITES[1], SITES[0], QKSite(2, 3, 3, 0)]
    _same(got[1], again)
    _same(got[0], decs[1])
    assert len(loads) == 1 and np.array_equal(loads[0].loading, fake_loadings(g, t, s, seed=5).loading)


def test_incomplete_qk_part_is_a_format_error(tmp_path):
    g, _, _ = _graph_with_qk()
    g.save(tmp_path / "g.safetensors")
    with safe_open(str(tmp_path / "g.safetensors"), framework="np") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in f.keys() if k != "qk.1.K"}
    save_file(arrays, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(FormatError, match=r"bad.safetensors'?: incomplete QK results \(missing 'qk.1.K'\)"):
        AttributionGraph.load(tmp_path / "bad.safetensors")
    header = json.loads(meta["sparsetrace"])
    header["qk"]["version"] = 99
    save_file({k: f for k, f in arrays.items()}, str(tmp_path / "new.safetensors"), metadata={"sparsetrace": json.dumps(header)})
    with pytest.raises(FormatError, match="QK results of version 99; this sparsetrace reads ≤ 1"):
        AttributionGraph.load(tmp_path / "new.safetensors")
