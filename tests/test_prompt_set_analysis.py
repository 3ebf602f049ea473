"""``recur`` and ``validate-set`` on a set traced from a tiny saved model: recomputed influences and
presence, supernodes, bootstrap intervals, the constrained effect equal to the graph's direct
prediction on every prompt, the random baseline's size and mass, faithfulness, and bad hypothesis
files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsetrace.config import RecurConfig
from sparsetrace.graphs import AttributionGraph
from sparsetrace.graphs.prune import node_influence
from sparsetrace.graphs.recur import bootstrap_ci, roles_of
from sparsetrace.tracer.prompt_sets import generate_prompt_set, write_prompt_set

from _cli_common import files_under, one_line_error, run
from _cli_fixtures import save_tiny_model

TEMPLATE = "{A} and {B} went to the store . {B} gave a drink to"
NAMES = ["john", "mary", "dog", "cat"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    tiny = save_tiny_model(root / "model")
    items = generate_prompt_set(TEMPLATE, {"A": NAMES, "B": NAMES}, [" {A}", " {B}"])[:5]
    write_prompt_set(root / "ioi.jsonl", items)
    out = root / "out"
    r = run("trace-many", root / "ioi.jsonl", "--out", out, "-m", tiny, "-t", "random:32:4", "--no-picture", "-q")
    assert r.exit_code == 0, r.output
    return out


def _entries(out):
    return [e for e in json.loads((out / "manifest.json").read_text())["prompts"] if e["status"] == "done"]


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    assert bootstrap_ci([2.0, 2.0, 2.0], 100, 0.9, rng) == (2.0, 2.0, 2.0)
    m, lo, hi = bootstrap_ci([0.0, 1.0, 2.0, 3.0, float("nan")], 2000, 0.95, np.random.default_rng(1))
    assert m == 1.5 and 0 <= lo < m < hi <= 3
    assert bootstrap_ci([0.0, 1.0, 2.0], 500, 0.95, np.random.default_rng(3)) == bootstrap_ci(
        [0.0, 1.0, 2.0], 500, 0.95, np.random.default_rng(3))
    narrow = bootstrap_ci([0.0, 1.0, 2.0], 2000, 0.5, np.random.default_rng(2))
    wide = bootstrap_ci([0.0, 1.0, 2.0], 2000, 0.99, np.random.default_rng(2))
    assert wide[1] <= narrow[1] and narrow[2] <= wide[2]
    assert all(np.isnan(bootstrap_ci([], 10, 0.9, rng)))


def test_roles_of():
    assert roles_of(5, {"A": 1, "B": 3, "B#2": 4}, "field") == ["end-5", "A", "end-3", "B", "B#2"]
    assert roles_of(3, {"A": 1}, "end") == ["end-3", "end-2", "end-1"]


def test_recur_report(traced, tmp_path):
    r = run("recur", traced, "--out", tmp_path / "rep", "--min-fraction", "0.6", "--cosine", "-1", "--json", "-q")
    assert r.exit_code == 0, r.output
    assert files_under(tmp_path / "rep") == {"recur.md", "recur.json", "recur.png", "circuit.png", "supernodes.json"}
    rep = json.loads((tmp_path / "rep" / "recur.json").read_text())
    entries = _entries(traced)
    assert rep["prompts"] == [e["id"] for e in entries]
    fulls = [AttributionGraph.load(traced / e["id"] / "graph.safetensors") for e in entries]
    pruned = [AttributionGraph.load(traced / e["id"] / "graph.pruned.safetensors") for e in entries]
    infl = [node_influence(g) for g in fulls]
    assert rep["features"], "no recurring feature"
    for f in rep["features"]:
        kept = []
        for j, e in enumerate(entries):
            pos = _role_pos(f["role"], e)
            lay = fulls[j].layout
            hit = np.flatnonzero((lay.layer == f["layer"]) & (lay.pos == pos) & (lay.feature == f["feature"]))
            want = float(infl[j][hit[0]]) if hit.size else 0.0
            assert f["per_prompt"][j] == pytest.approx(want, rel=1e-12, abs=1e-15)
            pl = pruned[j].layout
            kept.append(bool(np.any((pl.layer == f["layer"]) & (pl.pos == pos) & (pl.feature == f["feature"]))))
        assert f["fraction"] == pytest.approx(np.mean(kept)) and f["fraction"] >= 0.6
        assert f["influence"] == pytest.approx(np.mean(f["per_prompt"])) and f["ci"][0] <= f["influence"] <= f["ci"][1]
    means = [f["influence"] for f in rep["features"]]
    assert means == sorted(means, reverse=True)
    # cosine −1 joins every recurring feature with out-edges at a role: at most one supernode per role
    roles = [s["role"] for s in rep["supernodes"]]
    assert len(roles) == len(set(roles))
    rec = {(f["role"], f["layer"], f["feature"]) for f in rep["features"]}
    for s in rep["supernodes"]:
        assert len(s["members"]) >= 2 and all((s["role"], l, f) in rec for l, f in s["members"])
    skel = json.loads((tmp_path / "rep" / "supernodes.json").read_text())
    assert set(skel["supernodes"]) == {s["name"] for s in rep["supernodes"]}
    one_line_error(run("recur", tmp_path, "-q"), 2, "has no manifest.json")


def _role_pos(role: str, entry: dict) -> int:
    if role.startswith("end-"):
        return len(entry["tokens"]) - int(role[4:])
    return entry["positions"][role]


def _hypotheses(traced) -> dict:
    """Two features at the last position (the most influential in the first prompt's full graph) and one
    at the second occurrence of B."""
    e = _entries(traced)[0]
    g = AttributionGraph.load(traced / e["id"] / "graph.safetensors")
    lay, infl = g.layout, node_influence(g)
    last = [i for i in range(lay.features.start, lay.features.stop) if lay.pos[i] == lay.n_pos - 1]
    top = sorted(last, key=lambda i: -infl[i])[:2]
    b2 = [i for i in range(lay.features.start, lay.features.stop) if lay.pos[i] == e["positions"]["B#2"]][0]
    return {"metric": {"a": " {A}", "b": " {B}"},
            "supernodes": {"last": {"role": "end-1", "features": [[int(lay.layer[i]), int(lay.feature[i])] for i in top]},
                           "b2": {"role": "B#2", "features": [[int(lay.layer[b2]), int(lay.feature[b2])]]}},
            "hypotheses": [{"name": "ablate last", "supernodes": ["last"], "action": "ablate", "expect": "decrease"},
                           {"name": "scale b2", "supernodes": "b2", "action": "scale", "value": 2.0, "expect": "increase"}]}


@pytest.fixture(scope="module")
def validated(traced, tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    (root / "h.json").write_text(json.dumps(_hypotheses(traced)))
    r = run("validate-set", traced, root / "h.json", "--out", root / "rep", "--n-random", "4", "--json", "-q")
    assert r.exit_code == 0, r.output
    return root / "rep", json.loads((root / "rep" / "validate_set.json").read_text())


def test_validate_set_files_and_card(validated):
    rep_dir, rep = validated
    assert files_under(rep_dir) == {"validate_set.json", "validate_set.png", "card.md"}
    card = (rep_dir / "card.md").read_text()
    assert "## Causal claims" in card and "ablate last" in card and "random:32:4" in card
    assert rep["hypotheses_sha256"] in json.dumps(rep) and "## Faithfulness" in card


def test_constrained_effect_is_the_graphs_direct_prediction(validated):
    """All-layer constrained patching is the graph's linear replacement model: on every prompt the
    measured change of logit(A) − logit(B) equals the direct prediction from the prompt's graph."""
    _, rep = validated
    n = 0
    for p in rep["per_prompt"]:
        for h in p["hypotheses"]:
            pred, meas = h["predicted"]["direct"], h["measured"]["constrained"]
            assert pred == pred, "the graph has logit nodes for A and B"
            assert meas == pytest.approx(pred, rel=1e-3, abs=1e-5), (p["id"], h["name"])
            n += abs(pred) > 1e-6
    assert n > 0, "every prediction was zero: the test would not see a wrong sign"


def test_summaries_follow_from_the_per_prompt_numbers(validated):
    _, rep = validated
    for hi, r in enumerate(rep["results"]):
        sign = -1 if r["expect"] == "decrease" else 1
        for m, d in r["modes"].items():
            eff = [p["hypotheses"][hi]["measured"][m] for p in rep["per_prompt"]]
            assert d["effect"] == eff and d["mean"] == pytest.approx(np.mean(eff))
            assert d["ci"][0] <= d["mean"] <= d["ci"][1]
            assert d["expected_sign_fraction"] == pytest.approx(np.mean([sign * e > 0 for e in eff]))
            pred = d["predicted"]
            if d["correlation"] is not None:
                assert d["correlation"] == pytest.approx(np.corrcoef(pred, eff)[0, 1])
            rnd = [np.mean(p["hypotheses"][hi]["random"][m]) for p in rep["per_prompt"]]
            assert d["random_mean"] == pytest.approx(np.mean(rnd))
            assert all(len(p["hypotheses"][hi]["random"][m]) == 4 for p in rep["per_prompt"])
    for p in rep["per_prompt"]:
        for m, f in p["faithfulness"].items():
            assert f["full"] == pytest.approx(p["metric_clean"][m])
            assert f["faithfulness"] == pytest.approx((f["circuit"] - f["empty"]) / (f["full"] - f["empty"]))


def test_random_sets_have_equal_size_and_near_mass():
    from sparsetrace.tracer.validate_set import K_NEAR, _random_sets

    acts = {(1, 3): (np.arange(10), np.linspace(0.1, 1.0, 10)), (2, 3): (np.array([4, 7]), np.array([0.5, 0.6]))}
    members = [(1, 3, 9), (2, 3, 4), (0, 3, 5)]  # the last is inactive
    sets, ratios = _random_sets(members, acts, 32, 20, np.random.default_rng(0))
    for s in sets:
        assert len(s) == 3 and not set(s) & set(members)
        assert [(l, c) for l, c, _ in s] == [(l, c) for l, c, _ in members]
        assert s[0][2] in range(9 - K_NEAR, 9) and s[1][2] == 7 and s[2][2] not in (5,)
    assert all(0.5 < r <= 1.0 for r in ratios)
    # inactive members at one (layer, position) get distinct stand-ins (a feature twice in one set is refused)
    sets, _ = _random_sets([(0, 3, 0), (0, 3, 1)], {}, 4, 50, np.random.default_rng(0))
    assert all(s[0] != s[1] and {s[0][2], s[1][2]} == {2, 3} for s in sets)


@pytest.mark.parametrize("edit, fragments", [
    (lambda h: h["supernodes"]["last"]["features"].append([0, 32]), ["supernode 'last'", "feature id 32", "width 32"]),
    (lambda h: h["supernodes"]["last"]["features"].append([7, 0]), ["supernode 'last'", "layer 7", "0..1"]),
    (lambda h: h["hypotheses"][0].update(supernodes=["nope"]), ["hypothesis 1", "'nope' is not defined"]),
    (lambda h: h["hypotheses"][1].update(action="steer", value=None), ["hypothesis 2", "value=None"]),
    (lambda h: h["supernodes"]["b2"].update(role="C"), ["role 'C'", "allowed: A, B, B#2, end-K"]),
    (lambda h: h["metric"].update(a=" {A} {B}"), ["metric a", "2 tokens"]),
    (lambda h: h.update(extra=1), ["unknown key 'extra'"]),
])
def test_bad_hypothesis_files(traced, tmp_path, edit, fragments):
    h = _hypotheses(traced)
    edit(h)
    (tmp_path / "h.json").write_text(json.dumps(h))
    r = run("validate-set", traced, tmp_path / "h.json", "--out", tmp_path / "rep", "--n-random", "0", "-q")
    one_line_error(r, 2, *fragments)
    assert not (tmp_path / "rep").exists()


def test_recur_config_rejects_bad_values():
    from sparsetrace.errors import ConfigError

    with pytest.raises(ConfigError, match="align='middle'"):
        RecurConfig(align="middle")


def test_combined_figure_edges_are_mean_aligned_sums(traced, tmp_path):
    """Every drawn edge of the combined figure is the mean over prompts of the summed edges between the
    two units' members at their aligned positions, recomputed here from each pruned graph's dense
    adjacency; units come in influence order within the node budget."""
    from sparsetrace.config import FigureConfig
    from sparsetrace.graphs.figure import draw_figure
    from sparsetrace.graphs.recur import combined_figure, load_traced_set, recur

    _, tps = load_traced_set(traced)
    report = recur(tps, RecurConfig(min_fraction=0.4, cosine=-1.0))
    assert report.supernodes, "cosine −1 must give a supernode"
    fig = combined_figure(report, tps, FigureConfig(max_nodes=6, max_edges=200, min_edge_share=0.0))
    inner = [u for u in fig.units if u.kind in ("feature", "supernode")]
    assert 0 < len(inner) <= 6 and any(u.kind == "supernode" for u in inner)
    assert [u.influence for u in inner] == sorted((u.influence for u in inner), reverse=True)
    members = {s["name"]: [(s["role"], l, f) for l, f in s["members"]] for s in report.supernodes}
    members.update({f"{r['role']} L{r['layer']} F{r['feature']}": [(r["role"], r["layer"], r["feature"])]
                    for r in report.features})

    def nodes(unit, tp) -> list[int]:
        lay = tp.pruned.layout
        roles = roles_of(lay.n_pos, tp.entry["positions"], "field")
        if unit.kind == "token":
            return [int(lay.token_index(roles.index(unit.key[2:])))]
        if unit.kind == "logit":
            return [int(lay.logit_index(int(unit.key[1:])))]
        out = []
        for role, l, f in members[unit.key]:
            hit = np.flatnonzero((lay.layer == l) & (lay.pos == roles.index(role)) & (lay.feature == f)
                                 & (lay.kind == 0))
            out += hit.tolist()
        return out

    assert len(fig.src) > 0
    dense = [tp.pruned.dense_adjacency() for tp in tps]
    for s, t, w in zip(fig.src, fig.dst, fig.weight):
        want = np.mean([a[np.ix_(nodes(fig.units[t], tp), nodes(fig.units[s], tp))].sum() for a, tp in zip(dense, tps)])
        assert w == pytest.approx(want, rel=1e-6, abs=1e-9)  # float32 sums, another order
    [png] = draw_figure(fig, [tmp_path / "circuit.png"])
    assert png.stat().st_size > 5000
