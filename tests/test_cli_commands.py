"""The other commands on a tiny saved model: prune, render, export, card, features, intervene, validate,
verify, corpus → train → evaluate, and --help of every command."""

from __future__ import annotations

import json

import networkx as nx
import pytest

from sparsetrace.graphs import AttributionGraph

from _cli_common import files_under, run
from _cli_fixtures import save_tiny_model, write_text_corpus


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmds")
    model = save_tiny_model(root / "model")
    corpus = write_text_corpus(root / "text")
    g = root / "trace"
    r = run("trace", "john gave a drink to", "-m", model, "-t", "random:16:2", "--out", g, "-q")
    assert r.exit_code == 0, r.output
    return root, model, corpus, g


def test_prune_writes_graph_and_card(env, tmp_path):
    _, _, _, g = env
    r = run("prune", g, "--out", tmp_path / "p.safetensors", "--node-threshold", "0.5", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert files_under(tmp_path) == {"p.safetensors", "card.md"}
    p = AttributionGraph.load(tmp_path / "p.safetensors")
    assert p.metadata["pruning"]["node_threshold"] == 0.5 and p.n_nodes == data["nodes"][1]
    assert "| node threshold | 0.5 |" in (tmp_path / "card.md").read_text()


def test_render_and_html(env, tmp_path):
    _, _, _, g = env
    r = run("render", g, "--out", tmp_path / "g.svg", "--html", tmp_path / "g.html", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert "<script" in (tmp_path / "g.html").read_text()
    # an unpruned graph file is pruned first
    r = run("render", g / "graph.safetensors", "--out", tmp_path / "full.png")
    assert r.exit_code == 0 and "pruning first" in r.output


@pytest.mark.parametrize("fmt", ["networkx-json", "graphml", "frontend"])
def test_export_to_stdout_and_file(env, tmp_path, fmt):
    _, _, _, g = env
    r = run("export", g, "-f", fmt, "--out", "-")
    assert r.exit_code == 0, r.output
    r2 = run("export", g, "-f", fmt, "--out", tmp_path / "x", "-q")
    assert r2.exit_code == 0
    assert (tmp_path / "x").read_text() == r.stdout
    pruned = AttributionGraph.load(g / "graph.pruned.safetensors")
    if fmt == "networkx-json":
        G = nx.node_link_graph(json.loads(r.stdout), directed=True, edges="links")
        assert G.number_of_nodes() == pruned.n_nodes
    elif fmt == "frontend":
        d = json.loads(r.stdout)
        assert len(d["nodes"]) == pruned.n_nodes and d["metadata"]["provenance"]["card_version"] == 1


def test_export_csv(env, tmp_path):
    _, _, _, g = env
    r = run("export", g, "-f", "csv", "--out", tmp_path / "graph.csv", "-q")
    assert r.exit_code == 0, r.output
    assert files_under(tmp_path) == {"graph.nodes.csv", "graph.edges.csv"}


def test_card_prints_markdown_and_json(env):
    _, _, _, g = env
    r = run("card", g)
    assert r.exit_code == 0 and r.stdout.startswith("# Provenance card")
    d = json.loads(run("card", g, "--json").stdout)
    assert d["transcoders"]["random"] is True


def test_features_stats_and_show(env, tmp_path):
    _, model, corpus, _ = env
    common = ["-m", model, "-t", "random:16:2"]
    r = run("features", "stats", "--corpus", corpus, "--out", tmp_path / "fs", "--n-sequences", "8", "--ctx-len", "12", *common, "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_tokens"] == 8 * 11
    assert files_under(tmp_path / "fs") == {"feature_stats.safetensors", "feature_stats.json", "feature_labels.json.gz"}
    r = run("features", "show", "0", "1", "--stats", tmp_path / "fs", *common)
    assert r.exit_code == 0, r.output
    assert "feature L0.1:" in r.stdout and "top output tokens (W_U·d_f)" in r.stdout
    d = json.loads(run("features", "show", "0", "1", "--stats", tmp_path / "fs", *common, "--json").stdout)
    assert d["layer"] == 0 and d["feature"] == 1 and len(d["top_output_tokens"]) == 10
    # labels from the statistics reach a trace
    r = run("trace", "the cat sat", "--out", tmp_path / "t", "--feature-stats", tmp_path / "fs", *common, "--no-picture", "-q")
    assert r.exit_code == 0, r.output
    meta = AttributionGraph.load(tmp_path / "t" / "graph.pruned.safetensors").metadata
    assert meta["feature_labels_source"] == "feature statistics"


def test_intervene_reports_causal_effects(env):
    _, model, _, _ = env
    r = run("intervene", "john gave a drink to", "-m", model, "-t", "random:16:2", "--scale-error", "1:-1=0",
            "--mode", "constrained", "--generate", "2", "--json", "-q")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["evidence"] == "causal (intervention)" and len(d["targets"]) == 5
    assert any(abs(t["delta"]) > 0 for t in d["targets"])
    assert set(d["generation"]) >= {"clean", "intervened"}


def test_validate_and_verify_record_in_the_card(env, tmp_path):
    import shutil

    _, _, _, g = env
    work = tmp_path / "g"
    shutil.copytree(g, work)
    r = run("validate", work, "--auto", "1", "--mode", "constrained", "--no-plot", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["results"]) == 1
    r = run("verify", work, "--n-samples", "8", "-q")
    assert r.exit_code == 0, r.output
    card = AttributionGraph.load(work / "graph.pruned.safetensors").metadata["card"]
    assert [v["kind"] for v in card["validation"]] == ["ablate", "verify"]
    assert sum(c["evidence"].startswith("causal") for c in card["claims"]) == 2
    assert "validation.json" in files_under(work)
    assert not [f for f in files_under(work) if f.startswith(".")]


def test_corpus_train_evaluate(env, tmp_path):
    _, model, corpus, _ = env
    r = run("corpus", "--out", tmp_path / "c", "--no-debian", "--no-stdlib", "--text", corpus, "-m", model, "--json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_tokens"] > 100
    r = run("train", "--corpus", tmp_path / "c", "--out", tmp_path / "set", "-m", model, "--n-features", "16", "--k", "2",
            "--n-tokens", "256", "--batch-tokens", "64", "--shuffle-buffer-tokens", "128", "--ctx-len", "16",
            "--no-evaluate", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "set" / "config.json").is_file()
    r = run("evaluate", "-t", tmp_path / "set", "--corpus", tmp_path / "c", "-m", model, "--n-sequences", "2",
            "--ctx-len", "16", "--json", "-q")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert len(m["fvu"]) == 2 and m["n_tokens"] > 0
    cfg = json.loads((tmp_path / "set" / "config.json").read_text())
    assert cfg["metrics"]["ce_recovered"] == m["ce_recovered"]
    # the trained set traces, and its card reports training data and quality
    r = run("trace", "the cat sat", "-m", model, "-t", tmp_path / "set", "--out", tmp_path / "t", "--no-picture", "-q")
    assert r.exit_code == 0, r.output
    card = AttributionGraph.load(tmp_path / "t" / "graph.pruned.safetensors").metadata["card"]
    assert card["transcoders"]["random"] is False
    assert card["reconstruction"]["ce_recovered_percent"] == m["ce_recovered"]
    assert card["transcoders"]["training_tokens"] == cfg["training"]["tokens"]


def test_help_of_every_command():
    from sparsetrace.cli._main import COMMANDS

    for name in COMMANDS:
        r = run(name, "--help")
        assert r.exit_code == 0 and "Usage: sparsetrace" in r.output, name
    r = run("--help")
    assert "_SPARSETRACE_COMPLETE=bash_source sparsetrace" in r.output
