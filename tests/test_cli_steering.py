"""``sparsetrace steer`` and the position syntax of ``intervene`` on a tiny saved model (docs/design.md §16):
the baseline and steered continuations from the same seeds, sweeps with table and plot, run records,
``--record-to`` in a graph's card, and every bad input as a one-line error with exit 2 and nothing written."""

from __future__ import annotations

import json

import pytest

from sparsetrace.graphs import AttributionGraph

from _cli_common import files_under, one_line_error, run
from _cli_fixtures import save_tiny_model

PROMPT = "john gave a drink to"  # 6 tokens: a BOS and 5 words
SET = ("-t", "random:16:2")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    model = save_tiny_model(root / "model")
    g = root / "trace"
    r = run("trace", PROMPT, "-m", model, *SET, "--out", g, "--no-picture", "-q")
    assert r.exit_code == 0, r.output
    return model, g


def _steer(model, out, *args):
    return run("steer", PROMPT, "-m", model, *SET, "--out", out, *args)


def _library(model):
    from sparsetrace.cli._common import resolve_transcoders
    from sparsetrace.models.loading import load_model

    lm = load_model(str(model))
    ts, _ = resolve_transcoders("random:16:2", lm, str(model), 0)
    return lm, ts


def test_greedy_steering_json_matches_the_library_and_the_record(env, tmp_path):
    from sparsetrace.tracer.interventions import Intervention, generate

    model, _ = env
    r = _steer(model, tmp_path / "o", "--add", "1:*+gen:5=40", "--ablate", "0:1..2:3", "-n", "4", "--json", "-q")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    lm, ts = _library(model)
    ivs = [Intervention.add_feature(1, slice(0, 6), 5, 40.0), Intervention.zero_feature(0, slice(1, 3), 3)]
    gen = [Intervention.add_feature(1, slice(None), 5, 40.0)]
    (s,) = d["samples"]
    assert s["baseline_ids"] == list(generate(PROMPT, lm, ts, [], max_new_tokens=4).new_ids)
    assert s["steered_ids"] == list(generate(PROMPT, lm, ts, ivs, generated=gen, max_new_tokens=4).new_ids)
    assert s["steered_ids"] != s["baseline_ids"]  # α = 40 on a random set moves the greedy text
    assert d["decoding"]["greedy"] and d["decoding"]["seeds"] == [0]
    assert [i["positions"] for i in d["interventions"]] == ["*+gen", "1..2"]
    assert d["model"]["arg"] == str(model) and d["transcoders"]["n_features"] == 16
    (path,) = d["files"]
    rec = json.loads(open(path).read())
    assert rec == {k: v for k, v in d.items() if k != "files"}
    assert files_under(tmp_path / "o") == {rec["file"]}


def test_sampled_baseline_uses_the_same_seeds(env, tmp_path):
    from sparsetrace.tracer.interventions import generate

    model, _ = env
    r = _steer(model, tmp_path / "o", "--add", "1:gen:5=3", "-n", "3", "--temperature", "1.5", "--top-p", "0.9",
               "--top-k", "20", "--samples", "2", "--seed", "4", "--json", "-q")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    lm, ts = _library(model)
    assert [s["seed"] for s in d["samples"]] == [4, 5]
    for s in d["samples"]:
        ref = generate(PROMPT, lm, ts, [], max_new_tokens=3, do_sample=True, temperature=1.5, top_p=0.9, top_k=20,
                       seed=s["seed"])
        assert s["baseline_ids"] == list(ref.new_ids)
    # generated positions only: the prompt is untouched, so the metric does not move
    assert d["metric"]["steered"] == d["metric"]["clean"]


def test_sweep_writes_table_plot_and_card_entry(env, tmp_path):
    import shutil

    model, g0 = env
    g = tmp_path / "g"
    shutil.copytree(g0, g)
    r = _steer(model, tmp_path / "o", "--add", "1:-2..:5", "--sweep", "0,4,8", "--metric", "logit-diff",
               "--metric-tokens", "mary,john", "-n", "3", "--record-to", g)
    assert r.exit_code == 0, r.output
    assert "logit 'mary' − logit 'john'" in r.output and "baseline" in r.output
    rec_files = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert [f.rsplit(".", 1)[1] for f in rec_files] == ["json", "png"]
    assert (tmp_path / "o" / rec_files[1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads((tmp_path / "o" / rec_files[0]).read_text())
    rows = rec["sweep"]["rows"]
    assert [x["value"] for x in rows] == [0.0, 4.0, 8.0]
    assert rows[0]["metric"] == pytest.approx(rec["metric"]["clean"], abs=1e-5)  # α = 0 is the clean run
    assert rows[0]["continuation"] == rec["samples"][0]["baseline"]
    assert set(rec_files) <= {p.name for p in g.iterdir()}
    card = (g / "card.md").read_text()
    assert "## Steering runs (causal evidence)" in card and "--add 1:-2..:5" in card
    for name in ("graph.safetensors", "graph.pruned.safetensors"):
        (entry,) = AttributionGraph.load(g / name).metadata["steering"]
        assert entry["record"] == rec["file"] and "swept 0: " in entry["outcome"]
    assert not [p for p in g.iterdir() if p.name.startswith(".")]  # no staging left


def test_intervene_takes_ranges_stars_and_add_and_keeps_the_old_form(env):
    model, _ = env
    old = run("intervene", PROMPT, "-m", model, *SET, "--set", "0:-1:3=2", "--mode", "unfrozen", "--json", "-q")
    new = run("intervene", PROMPT, "-m", model, *SET, "--set", "0:5..5:3=2", "--mode", "unfrozen", "--json", "-q")
    assert old.exit_code == 0 and new.exit_code == 0, (old.output, new.output)
    a, b = json.loads(old.stdout), json.loads(new.stdout)
    assert a["targets"] == b["targets"] and a["interventions"][0]["position"] == -1
    r = run("intervene", PROMPT, "-m", model, *SET, "--add", "1:*+gen:5=40", "--generate", "3", "--json", "-q")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["interventions"][0]["position"] == "*+gen" and d["interventions"][0]["generated"]
    assert d["generation"]["clean"] != d["generation"]["intervened"]


BAD = [
    (("--add", "1:6:5=1"), "position 6 is beyond the prompt; allowed: -6..5"),
    (("--add", "1:3..1:5=1"), "the range 3..1 is empty"),
    (("--add", "1:*:5=nan"), "α='nan'; allowed: a finite number"),
    (("--add", "1:*:5=1", "--temperature", "inf"), "--temperature inf; allowed: a finite number ≥ 0"),
    (("--add", "1:*:5=1", "--top-p", "0"), "--top-p 0.0; allowed: a number in (0, 1]"),
    (("--add", "1:*:5=1", "--top-p", "1.5"), "--top-p 1.5; allowed: a number in (0, 1]"),
    (("--add", "1:*:16=1"), "feature 16 in an intervention; allowed: 0..15"),
    (("--add", "2:*:1=1"), "layer 2; allowed: 0..1"),
    (("--add", "1:*:5",), "no value"),
    (("--add", "1:*:5=1", "--sweep", "0,1"), "--sweep: no option to sweep"),
    (("--add", "1:*:5", "--sweep", "0,x"), "--sweep 0,x: value='x' is not a number"),
    (("--add", "1:*:5=1", "--samples", "2"), "--samples 2 with --temperature 0"),
    (("--scale-error", "1:*+gen=2"), "take feature options only"),
    (("--add", "1:*:5=1", "--metric-tokens", "mary john"), "--metric-tokens 'mary john' is 2 tokens"),
    (("--add", "1:*:5=1", "--metric", "logit-diff"), "--metric logit-diff needs --metric-tokens"),
    ((), "no intervention given"),
]


@pytest.mark.parametrize("args,fragment", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, tmp_path, args, fragment):
    model, _ = env
    one_line_error(_steer(model, tmp_path / "o", *args, "-q"), 2, fragment)
    assert files_under(tmp_path) == set()


def test_record_to_a_folder_that_is_not_a_graph_folder(env, tmp_path):
    model, _ = env
    (tmp_path / "notgraph").mkdir()
    for target in (tmp_path / "notgraph", tmp_path / "missing"):
        r = _steer(model, tmp_path / "o", "--add", "1:*:5=1", "--record-to", target, "-q")
        one_line_error(r, 2, f"--record-to {str(target)!r} is not a graph folder; allowed: a folder with graph.safetensors")
    assert files_under(tmp_path) == {"notgraph"}
