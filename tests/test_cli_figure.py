"""``render`` (compact figure by default, --full), ``figure`` (a spec, JSON or YAML) and the labels of
``trace``: what they write and report, and one-line errors with no partial files for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsetrace.graphs import AttributionGraph
from sparsetrace.graphs.figure import FigureSpec, node_ids, subgraph_scores
from sparsetrace.graphs.graph import NodeKind

from _cli_common import files_under, one_line_error, run
from _cli_fixtures import save_tiny_model, write_text_corpus


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig")
    model = save_tiny_model(root / "model")
    g = root / "trace"
    r = run("trace", "the capital of france is", "-m", model, "-t", "random:32:4", "--out", g, "--max-nodes", "4", "--json", "-q")
    assert r.exit_code == 0, r.output
    return root, model, g, json.loads(r.stdout)


def test_trace_draws_the_compact_figure_and_records_it(env):
    _, _, g, data = env
    spec = json.loads((g / "graph.spec.json").read_text())
    pruned = AttributionGraph.load(g / "graph.pruned.safetensors")
    full = AttributionGraph.load(g / "graph.safetensors")
    inner = [x for x in spec["nodes"] if x[0] in "FE"] + [grp["name"] for grp in spec["groups"]]
    assert len(inner) == 4 == spec["drawn"]["nodes"] - sum(1 for x in spec["nodes"] if x[0] in "TL")
    # the figure's scores: features not drawn folded into error nodes of the full graph
    idx = {nid: i for i, nid in enumerate(node_ids(full.layout))}
    mask = np.zeros(full.n_nodes, bool)
    for nid in spec["nodes"] + [x for grp in spec["groups"] for x in grp["nodes"]]:
        if full.layout.kind[idx[nid]] == NodeKind.FEATURE:
            mask[idx[nid]] = True
    expected = subgraph_scores(full, mask).to_dict()
    assert spec["scores"] == pytest.approx(expected)
    assert pruned.metadata["figure"]["scores"] == pytest.approx(expected)
    assert data["figure"]["nodes"] == spec["drawn"]["nodes"]
    card = (g / "card.md").read_text()
    assert f"| figure ({spec['drawn']['nodes']} nodes) |" in card and "## Feature labels" in card
    assert "token lens (no feature statistics)" in card
    assert (g / "graph.png").read_bytes()[:4] == b"\x89PNG" and b"<text" not in (g / "graph.svg").read_bytes()


def test_render_compact_full_and_html(env, tmp_path):
    _, _, g, _ = env
    r = run("render", g, "--out", tmp_path / "fig.pdf", "--max-nodes", "2", "--width", "3.3", "--html", tmp_path / "v.html", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert files_under(tmp_path) == {"fig.pdf", "fig.spec.json", "v.html"}
    assert (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF") and b"/FontFile2" in (tmp_path / "fig.pdf").read_bytes()
    spec = json.loads((tmp_path / "fig.spec.json").read_text())
    assert spec["width"] == 3.3 and spec["graph"].endswith("graph.safetensors")
    assert d["nodes"] == spec["drawn"]["nodes"] and d["scores"] == spec["scores"]
    r = run("render", g, "--out", tmp_path / "full.svg", "--full", "-q")
    assert r.exit_code == 0, r.output
    assert "positive edge" in (tmp_path / "full.svg").read_text()  # graphviz's legend


def test_figure_from_a_yaml_spec(env, tmp_path):
    _, _, g, _ = env
    pruned = AttributionGraph.load(g / "graph.pruned.safetensors")
    ids = node_ids(pruned.layout)
    feats = [ids[i] for i in range(pruned.layout.features.start, pruned.layout.features.stop)][:3]
    (tmp_path / "s.yaml").write_text(
        f"title: my circuit\nnodes: [{feats[2]}, L0, T@5]\ngroups:\n  - name: pair\n    nodes: [{feats[0]}, {feats[1]}]\n"
        f"labels: {{L0: top logit}}\n")
    r = run("figure", g, "--spec", tmp_path / "s.yaml", "--out", tmp_path / "a.svg", "--out", tmp_path / "a.png", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert files_under(tmp_path) == {"s.yaml", "a.svg", "a.png", "a.spec.json"}
    saved = json.loads((tmp_path / "a.spec.json").read_text())
    assert saved["nodes"] == [feats[2], "L0", "T@5"] and saved["groups"] == [{"name": "pair", "nodes": feats[:2]}]
    assert saved["title"] == "my circuit" and saved["labels"] == {"L0": "top logit"}
    full = AttributionGraph.load(g / "graph.safetensors")
    idx = {nid: i for i, nid in enumerate(node_ids(full.layout))}
    mask = np.zeros(full.n_nodes, bool)
    mask[[idx[f] for f in feats]] = True
    assert d["scores"] == pytest.approx(subgraph_scores(full, mask).to_dict()) == saved["scores"]
    assert d["nodes"] == 4
    # the saved spec redraws the same figure
    r2 = run("figure", g, "--spec", tmp_path / "a.spec.json", "--out", tmp_path / "b.svg", "-q")
    assert r2.exit_code == 0, r2.output
    assert (tmp_path / "b.svg").read_bytes() == (tmp_path / "a.svg").read_bytes()
    assert FigureSpec.load(tmp_path / "b.spec.json") == FigureSpec.load(tmp_path / "a.spec.json")
    text = run("figure", g, "--spec", tmp_path / "s.yaml", "--out", tmp_path / "c.png").stdout
    assert "subgraph scores: replacement" in text and "(full graph: replacement" in text


def _spec(tmp_path, doc) -> str:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    return str(p)


@pytest.mark.parametrize("doc,fragments", [
    ({"nodes": ["F9.999@3", "L0"]}, ["spec bad.json: nodes names node 'F9.999@3', which the graph does not have", "allowed: node ids"]),
    ({"nodes": ["L0"], "groups": [{"name": "g", "nodes": []}]}, ["group 'g' is empty", "allowed: a list of one or more node ids"]),
    ({"nodes": ["L0"], "groups": [{"name": "g", "nodes": ["T@1", "T@2"]}]}, ["group 'g' mixes token nodes", "allowed: features only"]),
    ({"nodes": ["L0"], "size": 3}, ["unknown key 'size'", "allowed: title, nodes, groups"]),
])
def test_bad_specs_are_one_line_errors_without_files(env, tmp_path, doc, fragments):
    _, _, g, _ = env
    spec = _spec(tmp_path, doc)
    r = run("figure", g, "--spec", spec, "--out", tmp_path / "x.svg", "--out", tmp_path / "x.png")
    one_line_error(r, 1, *fragments)
    assert files_under(tmp_path) == {"bad.json"}


def test_bad_options_are_one_line_errors_without_files(env, tmp_path):
    root, model, g, _ = env
    one_line_error(run("render", g, "--out", tmp_path / "x.png", "--max-nodes", "0"), 2, "Invalid value for '--max-nodes'", "x>=1")
    one_line_error(run("figure", g, "--out", tmp_path / "x.png", "--max-nodes", "0"), 2, "'--max-nodes'", "x>=1")
    one_line_error(run("figure", g, "--out", tmp_path / "x.jpg"), 1, "--out", "allowed suffixes: .png, .svg, .pdf")
    one_line_error(run("render", g, "--out", tmp_path / "x.png", "--width", "40"), 2, "'--width'", "1<=x<=20")
    (tmp_path / "broken.yaml").write_text("nodes: [L0\n")
    one_line_error(run("figure", g, "--spec", tmp_path / "broken.yaml", "--out", tmp_path / "x.png"), 1, "is not valid YAML")
    # context labels need feature statistics
    one_line_error(run("render", g, "--out", tmp_path / "x.png", "--labels", "contexts"), 1,
                   "--labels contexts", "no labels from feature statistics", "allowed: --labels auto or ids")
    one_line_error(run("figure", g, "--out", tmp_path / "x.png", "--labels", "contexts"), 1, "--labels contexts")
    r = run("trace", "the cat", "-m", model, "-t", "random:16:2", "--out", tmp_path / "t", "--labels", "contexts")
    one_line_error(r, 1, "--labels contexts needs feature statistics", "allowed: --labels auto or lens")
    assert files_under(tmp_path) == {"broken.yaml"}


def test_trace_labels_from_statistics(env, tmp_path):
    """`features stats` writes scored labels; `trace` uses them given --feature-stats, and picks up a
    set's own feature_stats/ folder when none is given."""
    root, model, _, _ = env
    from sparsetrace.tracer.features import load_feature_labels
    from sparsetrace.models.loading import load_model
    from sparsetrace.transcoders import save_transcoders

    from conftest import random_transcoders

    corpus = write_text_corpus(tmp_path / "text")
    folder = save_transcoders(random_transcoders(load_model(str(model), device="cpu"), n_features=16, k=2), tmp_path / "set")
    common = ["-m", model, "-t", folder]
    r = run("features", "stats", "--corpus", corpus, "--out", folder / "feature_stats", "--n-sequences", "12", "--ctx-len", "12",
            "--heldout-sequences", "4", *common, "--json", "-q")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    labels = load_feature_labels(folder / "feature_stats")
    assert d["labels"] == len(labels.labels) > 0 and "4 held-out sequences" in d["labels_heldout"]
    r = run("trace", "the cat sat on the mat", "--out", tmp_path / "t", *common, "--labels", "contexts", "-q")
    assert r.exit_code == 0, r.output
    meta = AttributionGraph.load(tmp_path / "t" / "graph.pruned.safetensors").metadata
    assert meta["labels"]["statistics"] == str(folder / "feature_stats")
    scored = [v for v in meta["feature_info"].values() if v["source"] == "statistics"]
    assert scored
    for v in scored:
        key = next(k for k, x in meta["feature_info"].items() if x is v)
        lab = labels.labels[tuple(int(x) for x in key.split("."))]
        assert v["short"] == " / ".join(lab.words) and v["precision"] == lab.precision and v["recall"] == lab.recall
        assert v["label"].startswith(v["short"] + " — " + lab.contexts[0])
    card = (tmp_path / "t" / "card.md").read_text()
    assert "Scored on 4 held-out sequences" in card
    # --labels lens ignores them
    r = run("trace", "the cat sat on the mat", "--out", tmp_path / "t2", *common, "--labels", "lens", "--no-picture", "-q")
    assert r.exit_code == 0, r.output
    meta = AttributionGraph.load(tmp_path / "t2" / "graph.pruned.safetensors").metadata
    assert meta["feature_labels_source"] == "token lens (no feature statistics)"
    # `features show` reads the set's own statistics with no flag; without their corpus (a shipped set
    # on another machine) it shows the contexts stored with the label instead
    (l, f), lab = next(iter(labels.labels.items()))
    d = json.loads(run("features", "show", str(l), str(f), *common, "--json", "-q").stdout)
    assert d["density"] is not None and d["contexts"] and d["label_contexts"] == list(lab.contexts)
    corpus.rename(tmp_path / "moved")
    r = run("features", "show", str(l), str(f), *common)
    assert r.exit_code == 0, r.output
    assert "contexts stored with the label" in r.output and lab.contexts[0] in r.output
