"""``sparsetrace qk`` (docs/design.md §13): tables and JSON on a tiny Gemma 2 (softcap, sliding window),
and bad input as one-line usage errors (exit 2) that write nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sparsetrace.graphs import AttributionGraph
from test_graphs_html import payload

from _cli_common import files_under, one_line_error, run
from _cli_fixtures import save_tiny_model

PROMPT = "john and mary went to the store john gave a drink to"  # 13 tokens


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qk")
    model = save_tiny_model(root / "model", arch="gemma2", n_layers=3)
    out = root / "trace"
    r = run("trace", PROMPT, "-m", model, "-t", "random:32:4", "--out", out, "--no-picture", "-q", "--dtype", "float64")
    assert r.exit_code == 0, r.output
    return out


def _json(*args):
    r = run("qk", *args, "--json", "-q")
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_one_score_table_and_json(graph_dir):
    r = run("qk", graph_dir, "--layer", "2", "--head", "1", "--query-pos", "-1", "--key-pos", "10", "--top", "4")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("L2.H1  query 12 'to' ← key 10 'a': score ") and "softcap 50" in lines[0]
    assert len(lines) == 3 + 4
    (s,) = _json(graph_dir, "--layer", "2", "--head", "1", "--query-pos", "12", "--key-pos", "10", "--top", "4")["scores"]
    assert (s["layer"], s["head"], s["query_pos"], s["key_pos"]) == (2, 1, 12, 10)
    assert abs(sum(s["terms"].values()) - s["score"]) < 1e-9
    assert abs(s["capped_score"] - s["model_score"]) < 1e-9 and s["closure"]["score"] < 1e-9
    assert len(s["rows"]) == 4 and s["rows"][0]["query_label"].startswith(("F", "E", "T", "constant"))
    assert [abs(x["value"]) for x in s["rows"]] == sorted((abs(x["value"]) for x in s["rows"]), reverse=True)


def test_default_selects_the_heaviest_hops(graph_dir):
    scores = _json(graph_dir, "--hops", "3")["scores"]
    w = [s["hop_weight"] for s in scores]
    assert len(scores) == 3 and w == sorted(w, reverse=True) and w[-1] > 0
    assert all(1 <= s["key_pos"] < s["query_pos"] for s in scores)
    only = _json(graph_dir, "--hops", "2", "--layer", "1", "--query-pos", "-1")["scores"]
    assert len(only) == 2 and all(s["layer"] == 1 and s["query_pos"] == 12 for s in only)


def test_edge_head_loadings(graph_dir):
    d = _json(graph_dir, "--edge", "L0,T@1")["loadings"]
    assert d["target"] == "L0" and d["source"] == "T@1"
    assert abs(d["sum"] - d["stored_edge"]) < 1e-9 and abs(d["edge"] - d["stored_edge"]) < 1e-9
    assert np.asarray(d["loading"]).shape == (3, 4)
    r = run("qk", graph_dir, "--edge", "L0,T@1")
    assert r.exit_code == 0 and r.stdout.startswith("edge T@1 → L0: ")


@pytest.mark.parametrize("args,fragments", [
    (["--layer", "3"], ["--layer 3; allowed: 0..2"]),
    (["--layer", "1", "--head", "4", "--query-pos", "5", "--key-pos", "4"], ["head 4; allowed: 0..3"]),
    (["--query-pos", "13"], ["--query-pos 13; allowed: 0..12 or -13..-1"]),
    (["--key-pos", "-14"], ["--key-pos -14; allowed: 0..12 or -13..-1"]),
    (["--query-pos", "3", "--key-pos", "5"], ["--key-pos 5 is after --query-pos 3; allowed: 0..3"]),
    (["--layer", "0", "--head", "0", "--query-pos", "12", "--key-pos", "2"],
     ["key position 2 is masked for query 12 in layer 0 (sliding window); allowed: 9..12"]),
    (["--edge", "L0"], ["--edge 'L0'; allowed form: TARGET,SOURCE"]),
    (["--edge", "L0,F9.9@9"], ["node 'F9.9@9' is not in the graph"]),
    (["--edge", "T@3,T@1"], ["token node; allowed: a feature or a logit"]),
    (["--edge", "L0,T@12"], ["stays at position 12; head loadings are for cross-position edges"]),
])
def test_bad_input_is_a_one_line_usage_error(graph_dir, args, fragments):
    before = files_under(graph_dir)
    one_line_error(run("qk", graph_dir, *args, "--save", "-q"), 2, *fragments, "(see 'sparsetrace qk --help')")
    assert files_under(graph_dir) == before


def test_graph_without_what_qk_needs(graph_dir, tmp_path):
    g = AttributionGraph.load(graph_dir / "graph.safetensors")
    src = g.metadata.pop("transcoder_source")
    g.save(tmp_path / "no-set.safetensors")
    one_line_error(run("qk", tmp_path / "no-set.safetensors", "-q"), 2,
                   "does not record where its model (", ") is or its transcoder set; pass --model ID|PATH and "
                   "--transcoders DIR (the ones it was traced with)")
    g.metadata["transcoder_source"] = {**src, "model_arg": None}
    g.save(tmp_path / "no-model.safetensors")
    one_line_error(run("qk", tmp_path / "no-model.safetensors", "-q"), 2,
                   "does not record where its model (", "pass --model ID|PATH (the ones it was traced with)")
    g.metadata["transcoder_source"] = {**src, "spec": None, "path": None}
    g.save(tmp_path / "no-set2.safetensors")
    one_line_error(run("qk", tmp_path / "no-set2.safetensors", "-q"), 2,
                   "does not record its transcoder set; pass --transcoders DIR")
    (tmp_path / "empty").mkdir()
    one_line_error(run("qk", tmp_path / "empty", "-q"), 2, "is a folder without graph.safetensors")


def test_save_stores_the_results_in_the_graph_files_and_viewer(graph_dir, tmp_path):
    folder = tmp_path / "trace"
    shutil.copytree(graph_dir, folder)
    site = ["--layer", "2", "--head", "1", "--query-pos", "12", "--key-pos", "10"]
    d = _json(folder, *site, "--top", "3", "--save")
    names = ["graph.safetensors", "graph.pruned.safetensors", "graph.html"]
    assert d["saved"] == [str(folder / n) for n in names]
    full = AttributionGraph.load(folder / "graph.safetensors")
    (dec,), loads = full.qk.for_layout(full.layout)
    assert loads == [] and (dec.site.layer, dec.site.head, dec.site.query_pos, dec.site.key_pos) == (2, 1, 12, 10)
    (s,) = d["scores"]
    assert [(q, k, v) for q, k, v in dec.rows(3)] == [(r["query"], r["key"], r["value"]) for r in s["rows"]]
    assert dec.score == s["score"] and abs(dec.total() - dec.score) < 1e-9
    # the head loadings of an edge join them; the same score again replaces the first
    e = _json(folder, "--edge", "L0,T@1", "--save")["loadings"]
    _json(folder, *site, "--save")
    for name in names[:2]:
        g = AttributionGraph.load(folder / name)
        assert [x.site.key_pos for x in g.qk.scores] == [10] and len(g.qk.loadings) == 1
        assert g.qk.node_ids[g.qk.loadings[0].source] == "T@1"
        assert np.allclose(g.qk.loadings[0].loading, e["loading"], rtol=0, atol=1e-12)
    qk = payload((folder / "graph.html").read_text())["qk"]
    assert len(qk["scores"]) == 1 and qk["loadings"][0]["target"] == "L0" and qk["loadings"][0]["source"] == "T@1"
    # a graph file on its own: only that file is written
    shutil.copy(graph_dir / "graph.safetensors", tmp_path / "g.safetensors")
    assert _json(tmp_path / "g.safetensors", *site, "--save")["saved"] == [str(tmp_path / "g.safetensors")]
