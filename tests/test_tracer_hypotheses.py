"""Hypotheses from readable node ids and validation records (tracer/validate.py, graphs/folder.py;
docs/design.md §6, §8): what ``sparsetrace validate``/``verify`` call."""

from __future__ import annotations

import numpy as np
import pytest

from _graph_fixtures import golden_graph

from sparsetrace.errors import ConfigError
from sparsetrace.graphs import AttributionGraph, NodeKind, node_influence, prune_graph, records
from sparsetrace.graphs.folder import record_validation
from sparsetrace.graphs.records import ValidationRecord
from sparsetrace.tracer.validate import Hypothesis, auto_hypotheses, build_hypotheses


def _ids(g):
    return {g.layout.node_id(i): i for i in range(g.n_nodes)}


def test_parse_nodes_reads_ids_and_groups():
    g = golden_graph()
    ids = _ids(g)
    f = [k for k in ids if k.startswith("F")]
    e = [k for k in ids if k.startswith("E")]
    assert g.layout.parse_nodes(f"{f[0]},{e[1]}") == (ids[f[0]], ids[e[1]])
    assert g.layout.parse_nodes(f"{f[0]}+{f[1]}, {e[0]}") == ((ids[f[0]], ids[f[1]]), ids[e[0]])
    with pytest.raises(ConfigError, match=r"node 'F9.9@0' is not in the graph; allowed: ids like"):
        g.layout.parse_nodes("F9.9@0")


def test_build_hypotheses_from_options():
    g = golden_graph()
    ids = _ids(g)
    f0, f1 = [k for k in ids if k.startswith("F")][:2]
    hs = build_hypotheses(g, ablates=[f0], scales=[f"{f1}=0.5"], steers=[f"{f0}+{f1}=2"], target=0)
    assert hs == [Hypothesis(f"ablate {f0}", (ids[f0],), "ablate", 0.0, 0),
                  Hypothesis(f"scale {f1}×0.5", (ids[f1],), "scale", 0.5, 0),
                  Hypothesis(f"steer {f0}+{f1}=2", ((ids[f0], ids[f1]),), "steer", 2.0, 0)]
    with pytest.raises(ConfigError, match=r"--scale 'F0.3@0'; allowed form: NODES=VALUE"):
        build_hypotheses(g, scales=["F0.3@0"])
    with pytest.raises(ConfigError, match=r"--steer 'x=y': 'y' is not a number"):
        build_hypotheses(g, steers=["x=y"])


def test_without_options_the_most_influential_features_are_ablated():
    g = golden_graph()
    infl = node_influence(g)
    feats = [i for i in range(g.n_nodes) if g.layout.kind[i] == NodeKind.FEATURE]
    top = sorted(feats, key=lambda i: -infl[i])[:2]
    hs = build_hypotheses(g, target=0, auto=2)
    assert hs == auto_hypotheses(g, 0, 2)
    assert [h.nodes for h in hs] == [(i,) for i in top]
    assert all(h.action == "ablate" and h.name == f"ablate {g.layout.node_id(h.nodes[0])}" for h in hs)


def test_record_validation_appends_to_both_graphs_and_the_card(tmp_path):
    full = golden_graph()
    pruned = prune_graph(full)
    full.save(tmp_path / "graph.safetensors")
    pruned.save(tmp_path / "graph.pruned.safetensors")
    rec = ValidationRecord("verify", "3 edges re-checked", "PASS", True)
    written = record_validation(tmp_path / "graph.safetensors", [rec],
                                {"extra.txt": lambda p: p.write_text("x", encoding="utf-8")})
    assert written == ["graph.safetensors", "graph.pruned.safetensors", "card.md", "extra.txt"]
    for name in written[:2]:
        g = AttributionGraph.load(tmp_path / name)
        assert records.validation_of(g) == [rec]
        assert records.card_of(g)["validation"] == [rec.to_dict()]
    assert "3 edges re-checked — PASS" in (tmp_path / "card.md").read_text()
    assert (tmp_path / "extra.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)  # no staging folder left


def test_a_failed_extra_file_leaves_the_graphs_untouched(tmp_path):
    g = golden_graph()
    g.save(tmp_path / "graph.safetensors")
    before = (tmp_path / "graph.safetensors").read_bytes()

    def fail(p):
        raise OSError("disk full")

    with pytest.raises(OSError):
        record_validation(tmp_path / "graph.safetensors", [ValidationRecord("k", "d", "o", True)], {"x": fail})
    assert (tmp_path / "graph.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.safetensors"]
    assert np.array_equal(AttributionGraph.load(tmp_path / "graph.safetensors").activation, g.activation)
