"""Typed metadata records (graphs/records.py, docs/design.md §8): exact round trips, files written before
the records module, and the readers that use them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _graph_fixtures import golden_graph

from sparsetrace.graphs import AttributionGraph, prune_graph, records
from sparsetrace.graphs.card import build_card
from sparsetrace.graphs.figure import node_texts
from sparsetrace.graphs.records import (DecoderCosines, FeatureInfo, FeatureLabels, FigureRecord, GraphScores, LabelSource,
                                        PruneSummary, ScoresRecord, TranscoderSource, ValidationRecord)

OLD = Path(__file__).resolve().parent / "golden" / "old-metadata.json"


def _old_graph(tmp_path: Path) -> AttributionGraph:
    """The golden graph's pruned graph with the metadata the code before graphs/records.py wrote
    (tests/golden/make_old_metadata.py), saved and loaded as a graph file."""
    sub = prune_graph(golden_graph(), 0.8, 0.98)  # the graph that metadata belongs to
    sub.metadata = json.loads(OLD.read_text())
    sub.save(tmp_path / "old.safetensors")
    return AttributionGraph.load(tmp_path / "old.safetensors")


@pytest.mark.parametrize("cls, d", [
    (GraphScores, {"replacement": 0.25, "completeness": 0.5}),
    (ScoresRecord, {"full": {"replacement": 0.25, "completeness": 0.5}}),
    (ScoresRecord, {"full": {"replacement": 0.25, "completeness": 0.5}, "pruned": {"replacement": 0.2, "completeness": 0.4}}),
    (PruneSummary, {"node_threshold": 0.8, "edge_threshold": 0.98, "n_nodes_before": 12, "n_edges_before": 10,
                    "n_nodes_after": 7, "n_edges_after": 8}),
    (TranscoderSource, {"description": "/sets/a", "random": False, "path": "/sets/a"}),
    (TranscoderSource, {"description": "/sets/a", "random": False, "path": "/sets/a", "spec": None, "seed": 0, "model_arg": None}),
    (TranscoderSource, {"description": "random", "random": True, "spec": "random:8:2", "seed": 3, "model_arg": "m", "note": "x"}),
    (ValidationRecord, {"kind": "ablate", "description": "d", "outcome": "o", "passed": False}),
    (ValidationRecord, {"kind": "ablation", "description": "d", "passed": True, "predicted": 0.5}),
    (FeatureInfo, {"short": "a", "label": "a — b", "source": "statistics", "words": ["a"], "contexts": ["b"],
                   "precision": None, "recall": 0.5, "promoted": [], "density": 0.1}),
    (FeatureInfo, {"label": "a", "source": "token lens"}),
    (LabelSource, {"source": "token lens (no feature statistics)", "statistics": None, "sample": None,
                   "sample_tokens": None, "heldout": None, "heldout_tokens": None}),
    (LabelSource, {"source": "feature statistics"}),
    (DecoderCosines, {"floor": 0.5, "pairs": [["0.3", "1.0", 0.61], ["2.10", "3.4", 0.9]]}),
    (FigureRecord, {"nodes": 6, "edges": 7, "max_nodes": 6, "scores": {"replacement": 0.3, "completeness": 0.7},
                    "spec": "graph.spec.json", "seconds": 1.5}),
    (FigureRecord, {"nodes": 6, "edges": 7, "max_nodes": 6, "scores": None, "spec": "graph.spec.json"}),
    (records.Cut, {"max_nodes": 40, "max_edges": 200, "of_nodes": 900, "of_edges": 5000}),
    (records.Cut, {"max_nodes": 40, "of_nodes": 900}),
    (ScoresRecord, {"full": {"replacement": 0.25, "completeness": 0.5}, "note": "x"}),
    (FeatureInfo, {"short": "a", "label": "b", "later": [1]}),
    (LabelSource, {"source": "s", "statistics": None, "later": 1}),
    (FigureRecord, {"nodes": 1, "edges": 0, "max_nodes": 1, "scores": None, "spec": "s", "seconds": 0.5, "later": 2}),
])
def test_round_trips_are_exact(cls, d):
    out = cls.from_dict(d).to_dict()
    assert out == d and list(out) == list(d)
    assert json.dumps(out) == json.dumps(d)


def test_feature_keys_are_tuples_outside_the_stored_json():
    assert records.parse_feature_key("12.3456") == (12, 3456)
    assert records.feature_key((12, 3456)) == "12.3456"
    dc = DecoderCosines.from_dict({"floor": 0.5, "pairs": [("0.3", "1.0", 0.61)]})
    assert dc.pairs == [((0, 3), (1, 0), 0.61)]


def test_old_graph_file_loads_unchanged(tmp_path):
    old = json.loads(OLD.read_text())
    g = _old_graph(tmp_path)
    assert g.metadata == old
    # typed views of what was stored
    src = records.transcoder_source_of(g)
    assert src.random and src.request.spec == "random:8:2" and src.request.seed == 0 and src.request.model_arg is None
    assert records.prune_summary_of(g) == PruneSummary(0.8, 0.98, 12, 10, 7, 8)
    assert records.is_pruned(g)
    np.testing.assert_array_equal(records.stored_influence(g), old["node_influence"])
    sc = records.scores_of(g)
    assert sc.full.replacement == old["scores"]["full"]["replacement"]
    assert sc.pruned.completeness == old["scores"]["pruned"]["completeness"]
    lab = records.feature_labels_of(g)
    assert lab.labels == {(0, 3): "Paris / France", (1, 0): "→ city"}
    assert lab.info[(0, 3)].precision == 0.75 and lab.info[(1, 0)].source == "token lens"
    assert lab.source.sample_tokens == 1000 and lab.source_name == "feature statistics"
    assert lab.decoder_cosine.pairs == [((0, 3), (1, 0), 0.61)]
    assert records.figure_of(g).nodes == 6 and records.figure_of(g).seconds is None
    val = records.validation_of(g)
    assert [v.kind for v in val] == ["ablate", "verify"] and val[1].extra == {"predicted": 0.5, "measured": 0.49}
    # the card the old code stored is the card the records rebuild
    assert build_card(g) == old["card"]
    # storing every record back leaves the metadata exactly as it was (keys and order)
    records.store_provenance(g, src)
    records.store_scores_record(g, sc)
    records.store_pruning(g, records.prune_summary_of(g))
    records.store_feature_labels(g, lab)
    records.store_figure(g, records.figure_of(g))
    assert g.metadata == old
    assert json.dumps(g.metadata) == json.dumps(old)


def test_node_texts_and_label_records_of_an_old_file(tmp_path):
    g = _old_graph(tmp_path)
    t = node_texts(g)
    assert t[(0, 3)].short == "Paris / France" and t[(0, 3)].source == "statistics" and t[(0, 3)].recall == 0.5
    assert t[(1, 0)].full == "promotes city (token lens: no feature statistics)"
    records.drop_feature_texts(g)
    assert "feature_info" not in g.metadata and "feature_labels" not in g.metadata
    assert g.metadata["labels"]["source"] == "feature statistics" and "decoder_cosine" in g.metadata
    assert node_texts(g) == {}


def test_feature_labels_from_info_write_the_stored_form():
    info = {(2, 7): {"short": "x", "label": "x — y", "source": "statistics", "words": ["x"], "contexts": ["y"],
                     "precision": 0.5, "recall": 0.25, "promoted": ["z"], "density": 0.1}}
    src = LabelSource("feature statistics", "/s", "c", 10, "h", 2)
    lab = FeatureLabels.from_info(info, src, DecoderCosines(0.5, []))
    meta = lab.to_metadata()
    assert meta == {"feature_info": {"2.7": info[(2, 7)]}, "feature_labels": {"2.7": "x"},
                    "feature_labels_source": "feature statistics", "labels": src.to_dict(),
                    "decoder_cosine": {"floor": 0.5, "pairs": []}}
    assert FeatureLabels.from_metadata(meta) == lab


def test_validation_record_claims():
    assert ValidationRecord("ablate", "d", None, True).claim() == "d — confirmed"
    assert ValidationRecord("ablate", None, None, False).claim() == "ablate — not confirmed"
    assert ValidationRecord(extra={"hypothesis": "h"}).claim() == "h — not recorded"
    assert ValidationRecord("k", "d", "3/3 supported", False).claim() == "d — 3/3 supported"


def test_stored_influence_needs_one_entry_per_node():
    g = golden_graph()
    assert records.stored_influence(g) is None
    records.store_influence(g, np.arange(g.n_nodes, dtype=float))
    np.testing.assert_array_equal(records.stored_influence(g), np.arange(g.n_nodes))
    g.metadata["node_influence"] = [1.0]
    assert records.stored_influence(g) is None and not records.is_pruned(g)
    records.store_influence(g, None)
    assert "node_influence" not in g.metadata


def test_provenance_sections_are_read_only_views(tmp_path):
    g = _old_graph(tmp_path)
    prov = records.provenance_of(g)
    assert prov.model["revision"] == "abc" and prov.attribution["max_feature_nodes"] is None
    assert prov.stats["active_features"] == 5 and dict(prov.training) == {} and dict(prov.hook_points) == {}
    with pytest.raises(TypeError):
        prov.model["id"] = "other"  # type: ignore[index]
    assert records.model_id_of(g) == "tiny" and records.attribution_setting(g, "dtype") == "float64"


def test_supernode_names_are_keyed_by_feature_id():
    sn = records.Supernodes({-2: "say-x"}, {-2: ["F0.1@1", "F1.0@1"]})
    meta = sn.to_metadata()
    assert meta == {"supernode_names": {"-2": "say-x"}, "supernode_members": {"-2": ["F0.1@1", "F1.0@1"]}}
    assert records.Supernodes.from_metadata(meta) == sn
    assert records.Supernodes.from_metadata({}).to_metadata() == {}


def test_transcoder_source_says_how_to_load_the_set_again():
    shipped = TranscoderSource("shipped", False, "/sets/a").with_request(None, 0, None)
    assert shipped.set_spec == "/sets/a" and shipped.model_arg is None and shipped.seed == 0
    rnd = TranscoderSource.from_dict({"description": "r", "random": True, "spec": "random:8:2", "seed": 4, "model_arg": "m"})
    assert rnd.set_spec == "random:8:2" and rnd.seed == 4 and rnd.model_arg == "m"
    assert TranscoderSource("x").set_spec is None and TranscoderSource("x").seed is None
