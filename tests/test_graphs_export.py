"""Export: networkx / node-link / GraphML round-trips on values, circuit-tracer JSON schema, CSV, atomicity."""

from __future__ import annotations

import csv
import json
import os

import networkx as nx
import numpy as np
import pytest

from _graph_fixtures import golden_graph, random_graph
from sparsetrace.errors import FormatError
from sparsetrace.graphs.export import (
    from_networkx,
    node_table,
    read_graphml,
    read_node_link_json,
    to_circuit_tracer_json,
    to_networkx,
    write_circuit_tracer_json,
    write_csv,
    write_graphml,
    write_node_link_json,
)
from sparsetrace.graphs.prune import node_influence, prune_graph
from sparsetrace.graphs.supernodes import Supernode, group_nodes


def assert_same_graph(a, b):
    assert a.layout == b.layout
    np.testing.assert_array_equal(a.adjacency.indptr, b.adjacency.indptr)
    np.testing.assert_array_equal(a.adjacency.indices, b.adjacency.indices)
    np.testing.assert_array_equal(a.adjacency.data, b.adjacency.data)
    np.testing.assert_array_equal(a.adjacency.remainder, b.adjacency.remainder)
    for name in ("activation", "bias", "value", "token_ids", "logit_token", "logit_probability"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.token_strings == b.token_strings and a.logit_label == b.logit_label and a.prompt == b.prompt
    assert a.metadata == b.metadata


def test_networkx_attributes_and_roundtrip():
    g = prune_graph(random_graph(1, n_features=30, store_threshold=0.2))
    G = to_networkx(g, labels={(int(g.layout.layer[0]), int(g.layout.feature[0])): "says France"})
    assert G.number_of_nodes() == g.n_nodes and G.number_of_edges() == g.adjacency.nnz
    first = G.nodes[g.layout.node_id(0)]
    assert first["kind"] == "feature" and first["label"] == "says France"
    assert first["influence"] == pytest.approx(g.metadata["node_influence"][0])
    tok = G.nodes["T@1"]
    assert tok["kind"] == "token" and tok["token"] == "tok1" and tok["layer"] == -1
    t, s = int(g.adjacency.rows()[0]), int(g.adjacency.indices[0])
    e = G.edges[g.layout.node_id(s), g.layout.node_id(t)]
    w = float(g.adjacency.data[0])
    assert e["weight"] == w and e["abs_weight"] == abs(w) and e["sign"] == (1 if w >= 0 else -1)
    assert_same_graph(from_networkx(G), g)
    # influence computed on the networkx side agrees with ours through the exported weights
    assert nx.is_directed_acyclic_graph(G)


def test_node_link_json_roundtrip(tmp_path):
    g = random_graph(2, n_features=20)
    p = write_node_link_json(g, tmp_path / "g.json")
    data = json.loads(p.read_text())
    assert {"nodes", "links"} <= set(data)
    assert nx.is_isomorphic(nx.node_link_graph(data, edges="links"), to_networkx(g))
    assert_same_graph(read_node_link_json(p), g)


def test_graphml_roundtrip(tmp_path):
    g = group_nodes(random_graph(3, n_features=20), [Supernode("grp", (0, 1))])
    p = write_graphml(g, tmp_path / "g.graphml")
    assert p.read_text().startswith("<?xml")
    assert_same_graph(read_graphml(p), g)
    with pytest.raises(FormatError, match="not a readable GraphML"):
        (tmp_path / "bad.graphml").write_text("<graphml")
        read_graphml(tmp_path / "bad.graphml")


def test_from_networkx_rejects_foreign_graphs():
    with pytest.raises(FormatError, match="not made by sparsetrace"):
        from_networkx(nx.DiGraph([(1, 2)]))


def test_circuit_tracer_json_golden():
    g = golden_graph()
    g.logit_token[:] = [42]
    out = to_circuit_tracer_json(g, slug="golden", scan="test-scan", labels={(0, 1): "tokens feature"})
    assert out["metadata"] == {
        "slug": "golden", "scan": "test-scan", "prompt": "tok0 tok1", "prompt_tokens": ["tok0", "tok1"],
        "node_threshold": None, "schema_version": 1,
    }
    assert out["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    by_id = {n["node_id"]: n for n in out["nodes"]}
    assert list(by_id) == ["0_3_0", "0_1_1", "0_2_1", "1_0_1", "1_5_1", "0_-1_0", "0_-1_1", "1_-1_0", "1_-1_1",
                           "E_5_0", "E_7_1", "3_42_1"]
    f = by_id["0_1_1"]
    assert f == {
        "node_id": "0_1_1", "feature": 1, "layer": "0", "ctx_idx": 1, "feature_type": "cross layer transcoder",
        "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "0_1-0",
        "clerp": "tokens feature", "influence": pytest.approx(1 / 3 / (20 / 12)), "activation": float(g.activation[1]),
    }
    assert by_id["0_-1_1"]["feature_type"] == "mlp reconstruction error" and by_id["0_-1_1"]["activation"] is None
    assert by_id["E_5_0"]["feature_type"] == "embedding" and by_id["E_5_0"]["layer"] == "E"
    assert by_id["E_5_0"]["reverse_ctx_idx"] == 1
    logit = by_id["3_42_1"]
    assert logit["feature_type"] == "logit" and logit["layer"] == "3" and logit["is_target_logit"] is True
    assert logit["token_prob"] == 1.0 and logit["clerp"] == 'Output "out0" (p=1.000)'
    # cumulative shares: the largest influences (1/3, 1/3 of a 20/12 total) come first
    shares = sorted(n["influence"] for n in out["nodes"])
    assert shares[-1] == pytest.approx(1.0)
    links = {(ln["source"], ln["target"]): ln["weight"] for ln in out["links"]}
    assert len(links) == 10 and links[("E_5_0", "0_3_0")] == 10.0 and links[("1_-1_1", "3_42_1")] == 10.0


def test_circuit_tracer_json_custom_logit_and_supernodes(tmp_path):
    g = golden_graph()
    g.logit_token[:] = [-1]
    out = to_circuit_tracer_json(g, "s", supernodes=[("pair", (0, 1))], pinned_ids=["0_3_0"], node_threshold=0.8)
    ids = [n["node_id"] for n in out["nodes"]]
    assert ids[-1] == "3_c0_1" and len(set(ids)) == len(ids)
    assert out["qParams"]["supernodes"] == [["pair", "0_3_0", "0_1_1"]]
    assert out["qParams"]["pinnedIds"] == ["0_3_0"] and out["metadata"]["node_threshold"] == 0.8
    p = write_circuit_tracer_json(prune_graph(golden_graph()), tmp_path / "ct.json", slug="x")
    data = json.loads(p.read_text())
    assert data["metadata"]["node_threshold"] == 0.8 and len(data["nodes"]) == 7 and len(data["links"]) == 8


def test_csv(tmp_path):
    g = prune_graph(golden_graph())
    np_, ep = write_csv(g, tmp_path / "nodes.csv", tmp_path / "edges.csv", labels={(0, 1): "a, \"quoted\" label"})
    rows = list(csv.DictReader(np_.open()))
    assert len(rows) == 7
    assert rows[0]["node_id"] == "F0.1@1" and rows[0]["label"] == 'a, "quoted" label'
    assert float(rows[0]["influence"]) == pytest.approx(1 / 3)
    edges = list(csv.DictReader(ep.open()))
    assert len(edges) == 8 and {"source": "T@0", "target": "F0.1@1", "weight": "10.0"} in edges


def test_writes_are_atomic(tmp_path, monkeypatch):
    g = golden_graph()
    target = tmp_path / "g.graphml"
    target.write_text("old")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nx, "write_graphml", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_graphml(g, target)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["g.graphml"]  # no temp file left behind
    with pytest.raises(FormatError, match="does not exist"):
        write_csv(g, tmp_path / "nope" / "n.csv", tmp_path / "e.csv")


def test_node_table_influence_default_and_override():
    g = golden_graph()
    assert node_table(g)[0].influence is None
    t = node_table(g, influence=node_influence(g))
    assert t[1].influence == pytest.approx(1 / 3) and t[11].label == "out0 (p=1.000)"
    with pytest.raises(FormatError, match="influence must have 12 entries"):
        node_table(g, influence=np.zeros(3))
