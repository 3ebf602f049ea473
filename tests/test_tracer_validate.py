"""Hypothesis validation and graph verification (tracer/validate.py) on tiny random models."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import tempfile

import numpy as np
import pytest
import torch

from sparsetrace.errors import ConfigError, GraphError
from sparsetrace.graphs import Adjacency, Supernode, group_nodes, prune_graph
from sparsetrace.tracer.attribution import AttributionConfig, attribute
from sparsetrace.tracer.interventions import Intervention, intervene
from sparsetrace.tracer.validate import Hypothesis, ValidationConfig, predict, validate, verify_graph

from conftest import random_transcoders, tiny_lm

PROMPT = [3, 17, 5, 42, 8, 23, 11]


@functools.lru_cache(maxsize=None)
def _setup(arch="gpt2", dtype="float64", budget=None):
    lm = tiny_lm(arch)
    ts = random_transcoders(lm)
    g = attribute(PROMPT, lm, ts, config=AttributionConfig(dtype=dtype, max_feature_nodes=budget))
    return lm, ts, g


def _top_feature(g, k=0):
    lay = g.layout
    A = g.dense_adjacency()
    return int(lay.features.start + np.argmax(np.abs(A[lay.logits.start + k, lay.features])))


def _tampered(g, factor):
    """The graph with every weight into logit rows multiplied by ``factor`` (a wrong prediction)."""
    adj = g.adjacency
    data = adj.data.copy()
    data[g.layout.kind[adj.rows()] == 3] *= factor
    return dataclasses.replace(g, adjacency=Adjacency(adj.indptr, adj.indices, data, adj.n, adj.remainder))


def test_verdicts_right_and_wrong_prediction():
    lm, ts, g = _setup()
    i = _top_feature(g)
    hyp = [Hypothesis("top feature", (i,), "ablate"), Hypothesis("doubled", ([i],), "scale", 2.0)]
    cfg = ValidationConfig(modes=("constrained",), noise_floor=1e-3)
    right = validate(g, lm, ts, hyp, cfg)
    for res in right.results:
        (v,) = res.verdicts
        assert v.verdict == "supported" and v.prediction == "direct"
        assert v.ratio == pytest.approx(1.0, abs=1e-9)
        assert v.agreement == 1.0
        assert res.supported_in() == ("constrained",)
        assert "supported in constrained" in res.summary
    A = g.dense_adjacency()
    assert right.results[0].verdicts[0].predicted == pytest.approx(-A[g.layout.logits.start, i], abs=1e-12)
    # the same measurement judged against a graph whose logit edges are wrong
    for factor in (-1.0, 10.0):
        wrong = validate(_tampered(g, factor), lm, ts, hyp, cfg)
        for res in wrong.results:
            assert res.verdicts[0].verdict == "not supported"
            assert res.verdicts[0].measured == pytest.approx(right.results[0].verdicts[0].measured * (1 if res is wrong.results[0] else -1), abs=1e-12)


def test_total_prediction_is_first_order_exact_for_iterative():
    """A tiny scaling keeps every active set: iterative patching then follows (I − J)⁻¹·direct."""
    lm, ts, g = _setup("llama")
    lay = g.layout
    i = int(lay.features.start)  # a layer-0 feature: its effects propagate through later features
    eps = 1e-4
    h = Hypothesis("tiny", (i,), "scale", 1 + eps)
    p = predict(g, h)
    iv = Intervention.scale_feature(int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i]), 1 + eps)
    lm.to(dtype=torch.float64), ts.to(dtype=torch.float64)  # the graph's dtype
    try:
        r = intervene(PROMPT, lm, ts, [iv], mode="iterative", target_tokens=[int(t) for t in g.logit_token])
    finally:
        lm.to(dtype=torch.float32), ts.to(dtype=torch.float32)
    meas = r.target_delta.numpy()
    tot, direct = p.total[lay.logits], p.direct[lay.logits]
    assert np.abs(tot - direct).max() > 1e-2 * np.abs(tot).max()  # propagation matters here
    np.testing.assert_allclose(meas, tot, atol=1e-3 * np.abs(tot).max(), rtol=0)


def test_report_json_png_and_inconclusive():
    lm, ts, g = _setup()
    i = _top_feature(g)
    hyp = [Hypothesis("top", (i, [i + 1, i + 2]), "steer", 0.5, target=0),
           Hypothesis("error", (g.layout.error_index(1, 4),), "ablate")]
    rep = validate(g, lm, ts, hyp)
    assert [v.mode for v in rep.results[0].verdicts] == ["constrained", "iterative", "unfrozen"]
    assert [v.prediction for v in rep.results[0].verdicts] == ["direct", "total", "total"]
    effects = rep.results[0].effects
    assert [e.kind for e in effects[: g.layout.n_logits]] == ["logit"] * g.layout.n_logits
    assert any(e.kind == "feature" for e in effects)
    for e in effects:  # constrained is the linear model: measured == direct on every target
        assert e.measured["constrained"] == pytest.approx(e.predicted_direct, abs=1e-9)
    d = json.loads(rep.to_json())
    assert d["results"][0]["hypothesis"]["nodes"] == [i, [i + 1, i + 2]]
    assert d["results"][1]["verdicts"][0]["mode"] == "constrained"
    with tempfile.TemporaryDirectory() as tmp:
        png = rep.save_plot(pathlib.Path(tmp) / "v.png")
        js = rep.save_json(pathlib.Path(tmp) / "v.json")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads(js.read_text()) == d
        assert sorted(p.name for p in pathlib.Path(tmp).iterdir()) == ["v.json", "v.png"]  # no temp files left
    huge = validate(g, lm, ts, hyp[:1], ValidationConfig(modes=("constrained",), noise_floor=1e6))
    assert huge.results[0].verdicts[0].verdict == "inconclusive"


@pytest.mark.parametrize("dtype,budget", [("float64", None), ("float32", None), ("float64", 8)])
def test_verify_graph_passes(dtype, budget):
    lm, ts, g = _setup("gemma2", dtype, budget)
    rep = verify_graph(g, lm, ts, n_samples=60, seed=1)
    assert rep.passed and rep.n_checked == 60
    assert rep.max_abs_error < (1e-10 if dtype == "float64" else 1e-4)
    assert {c.source_id[0] for c in rep.checks} >= {"F", "E", "T"}
    assert lm.dtype == torch.float32  # the model is given back in its own dtype
    rep2 = verify_graph(prune_graph(g), lm, ts, n_samples=20)
    assert rep2.passed
    assert json.loads(rep.to_json())["n_checked"] == 60


def test_verify_graph_fails_on_wrong_edges():
    lm, ts, g = _setup("gemma2")
    bad = _tampered(g, 1.01)
    rep = verify_graph(bad, lm, ts, n_samples=400, seed=0)
    assert not rep.passed
    assert any(not c.passed for c in rep.checks if c.target_id.startswith("L"))
    assert all(c.passed for c in rep.checks if c.target_id.startswith("F"))
    assert "FAIL" in rep.summary()


def test_validation_errors():
    lm, ts, g = _setup()
    lay = g.layout
    with pytest.raises(ConfigError, match="action='mean'; allowed: ablate, scale, steer"):
        Hypothesis("x", (1,), "mean")
    with pytest.raises(ConfigError, match="action='steer' on E1@4"):
        validate(g, lm, ts, [Hypothesis("x", (lay.error_index(1, 4),), "steer", 1.0)])
    with pytest.raises(ConfigError, match="target=99; allowed: 0.."):
        validate(g, lm, ts, [Hypothesis("x", (0,), target=99)])
    with pytest.raises(GraphError, match="is a logit"):
        validate(g, lm, ts, [Hypothesis("x", (lay.logits.start,))])
    with pytest.raises(ConfigError, match="modes="):
        ValidationConfig(modes=("frozen",))
    grouped = group_nodes(g, [Supernode("s", (0, 1))])
    with pytest.raises(GraphError, match="supernodes"):
        verify_graph(grouped, lm, ts)
    other = random_transcoders(lm, seed=5)
    with pytest.raises(GraphError, match="other transcoders"):
        verify_graph(g, lm, other)


def test_error_nodes_of_row_budget_graphs_hold_unselected_features():
    """With a row budget, an error node is ε plus the active features that are not nodes: ablating it
    under all-layer constrained patching moves every target by exactly −A[t, e]."""
    lm, ts, g = _setup("gemma2", "float64", 8)
    e = g.layout.error_index(1, 4)
    rep = validate(g, lm, ts, [Hypothesis("err", (e,), "ablate")], ValidationConfig(modes=("constrained",), noise_floor=0.0))
    A = g.dense_adjacency()
    for eff in rep.results[0].effects:
        assert eff.measured["constrained"] == pytest.approx(eff.predicted_direct, abs=1e-9)
    assert eff.predicted_direct == pytest.approx(-A[eff.node, e], abs=1e-12)
    assert np.abs(A[g.layout.logits, e]).max() > 1e-3
