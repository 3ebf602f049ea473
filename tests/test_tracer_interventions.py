"""Interventions (docs/design.md §6) on tiny random models.

The bridge test doubles graph sources under all-layer constrained patching and checks that every target
moves by exactly its adjacency column; the others check identities every mode must satisfy.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from sparsetrace.errors import ConfigError
from sparsetrace.graphs import NodeKind
from sparsetrace.tracer.attribution import AttributionConfig, attribute
from sparsetrace.tracer.interventions import (
    MODES,
    FeatureRef,
    Intervention,
    generate,
    intervene,
    intervene_batch,
)
from sparsetrace.tracer.replacement import ReplacementModel

from conftest import ARCHS, random_transcoders, tiny_lm

PROMPT = [3, 17, 5, 42, 8, 23, 11]
TOL = {"float64": (1e-9, 1e-9), "float32": (5e-4, 1e-5)}  # (pre-activations, demeaned logits)


@functools.lru_cache(maxsize=None)
def _setup(arch, dtype="float64", seed=0):
    """(model, transcoders, graph), cast to ``dtype``; cached: tests only read them."""
    lm = tiny_lm(arch, seed)
    ts = random_transcoders(lm, seed=seed + 1)
    g = attribute(PROMPT, lm, ts, config=AttributionConfig(dtype=dtype, batch_size=32))
    dt = torch.float64 if dtype == "float64" else torch.float32
    lm.to(dtype=dt)
    ts.to(dtype=dt)
    return lm, ts, g


def _refs(g):
    lay = g.layout
    return [FeatureRef(int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])) for i in range(lay.n_features)]


def _double(lay, i) -> Intervention:
    """One more copy of source node i, as an intervention."""
    kind = NodeKind(int(lay.kind[i]))
    l, c = int(lay.layer[i]), int(lay.pos[i])
    if kind is NodeKind.FEATURE:
        return Intervention.scale_feature(l, c, int(lay.feature[i]), 2.0)
    if kind is NodeKind.ERROR:
        return Intervention.scale_error(l, c, 2.0)
    return Intervention.scale_token(c, 2.0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_all_layer_constrained_reproduces_graph_columns(arch, dtype):
    lm, ts, g = _setup(arch, dtype)
    lay = g.layout
    A = g.dense_adjacency().astype(np.float64)
    rng = np.random.default_rng(0)
    feats = rng.choice(np.arange(lay.features.start, lay.features.stop), 8, replace=False)
    errs = [lay.error_index(l, c) for l in range(lay.n_layers) for c in (1, 3, lay.n_pos - 1)]
    toks = [lay.token_index(c) for c in (0, 2, lay.n_pos - 1)]
    sources = [int(i) for i in [*feats, *errs, *toks]]
    res = intervene_batch(
        PROMPT, lm, ts, [[_double(lay, i)] for i in sources], mode="constrained",
        target_tokens=[int(t) for t in g.logit_token], features=_refs(g), batch_size=32,
    )
    tol_f, tol_l = TOL[dtype]
    for i, r in zip(sources, res):
        np.testing.assert_allclose(r.feature_pre_delta.double().numpy(), A[lay.features, i], atol=tol_f, rtol=0)
        np.testing.assert_allclose(r.target_delta.double().numpy(), A[lay.logits, i], atol=tol_l, rtol=0)
    assert np.abs(A[:, sources]).max() > 1e-3  # not trivially empty
    kinds = {NodeKind(int(lay.kind[i])) for i in sources if np.abs(A[:, i]).max() > 1e-6}
    assert kinds == {NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TOKEN}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_scaling_is_linear_under_constrained_patching(arch):
    """Set to v ⇒ targets move by (v/a − 1)·A[t, s], for v ≠ 2a too (zero, negative, steering)."""
    lm, ts, g = _setup(arch)
    lay = g.layout
    A = g.dense_adjacency()
    i = int(np.argmax(np.abs(A[lay.logits, lay.features]).sum(0)))
    l, c, f, a = int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i]), float(g.activation[i])
    vals = [0.0, -1.5 * a, 3.0]
    sets = [[Intervention.set_feature(l, c, f, v)] for v in vals] + [[Intervention.zero_feature(l, c, f)]]
    res = intervene_batch(PROMPT, lm, ts, sets, target_tokens=[int(t) for t in g.logit_token])
    for v, r in zip(vals + [0.0], res):
        np.testing.assert_allclose(r.target_delta.numpy(), (v / a - 1) * A[lay.logits, i], atol=1e-9, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_setting_own_value_changes_nothing(arch, mode):
    lm, ts, g = _setup(arch)
    lay = g.layout
    ivs = [Intervention.set_feature(int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i]), float(g.activation[i]))
           for i in range(lay.features.start, lay.features.stop, 3)]
    ivs += [Intervention.scale_error(1, slice(1, None), 1.0), Intervention.scale_token(2, 1.0)]
    r = intervene(PROMPT, lm, ts, ivs, mode=mode, features=_refs(g))
    torch.testing.assert_close(r.logits, r.clean_logits, atol=1e-12, rtol=0)
    torch.testing.assert_close(r.feature_pre_activations, r.clean_feature_pre_activations, atol=1e-12, rtol=0)
    torch.testing.assert_close(r.feature_activations, r.clean_feature_activations, atol=1e-12, rtol=0)
    # and the baseline itself is the real model's clean run (pre-softcap logits)
    run = ReplacementModel(lm, ts).run(torch.tensor(PROMPT))
    torch.testing.assert_close(r.clean_logits, run.logits[-1], atol=1e-9, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "gpt2"])
def test_iterative_equals_constrained_on_last_layer(arch):
    lm, ts, g = _setup(arch)
    L = lm.n_layers
    run = ReplacementModel(lm, ts).run(torch.tensor(PROMPT))
    f = int(run.act[L - 1, -1].argmax())
    ivs = [Intervention.set_feature(L - 1, -1, f, 5.0), Intervention.scale_error(L - 1, 3, -2.0),
           Intervention.zero_feature(L - 1, slice(1, 4), int(run.act[L - 1, 2].argmax()))]
    a = intervene(PROMPT, lm, ts, ivs, mode="iterative")
    b = intervene(PROMPT, lm, ts, ivs, mode="constrained")
    c = intervene(PROMPT, lm, ts, ivs, mode="constrained", layers=(L - 1, L))
    assert (a.logits - a.clean_logits).abs().max() > 1e-2
    torch.testing.assert_close(a.logits, b.logits, atol=1e-10, rtol=0)
    torch.testing.assert_close(a.logits, c.logits, atol=1e-10, rtol=0)
    # an earlier intervention does propagate differently in the two modes (iterative re-encodes)
    early = [Intervention.scale_feature(0, 2, int(run.act[0, 2].argmax()), 3.0)]
    d, e = (intervene(PROMPT, lm, ts, early, mode=m) for m in ("iterative", "constrained"))
    assert (d.logits - e.logits).abs().max() > 1e-6


def test_constrained_empty_range_is_iterative():
    lm, ts, g = _setup("qwen2")
    ivs = [Intervention.scale_feature(0, 3, int(g.layout.feature[0]), 0.0), Intervention.scale_token(1, 0.5)]
    a = intervene(PROMPT, lm, ts, ivs, mode="iterative")
    b = intervene(PROMPT, lm, ts, ivs, mode="constrained", layers=(1, 1))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_single(mode):
    lm, ts, g = _setup("gemma2")
    lay = g.layout
    refs = _refs(g)[:6]
    sets = [
        [Intervention.zero_feature(int(lay.layer[0]), int(lay.pos[0]), int(lay.feature[0]))],
        [Intervention.scale_error(1, slice(2, 5), 0.0), Intervention.scale_token(-1, 1.5)],
        [Intervention.set_feature(0, slice(1, None), 7, 2.0)],
        [],
    ]
    batched = intervene_batch(PROMPT, lm, ts, sets, mode=mode, features=refs, batch_size=3)
    for s, rb in zip(sets, batched):
        r1 = intervene(PROMPT, lm, ts, s, mode=mode, features=refs)
        torch.testing.assert_close(rb.logits, r1.logits, atol=1e-12, rtol=0)
        torch.testing.assert_close(rb.probabilities, r1.probabilities, atol=1e-12, rtol=0)
        torch.testing.assert_close(rb.feature_pre_activations, r1.feature_pre_activations, atol=1e-12, rtol=0)
        torch.testing.assert_close(rb.target_delta, r1.target_delta, atol=1e-12, rtol=0)
    assert batched[3].target_delta.abs().max() < 1e-12  # rows of one batch agree to rounding
    assert batched[1].target_delta.abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_generation_with_and_without_cache(arch):
    lm, ts, g = _setup(arch)
    ivs = [Intervention.set_feature(1, 2, 5, 30.0), Intervention.scale_error(0, -1, 0.0)]
    for kw in (dict(), dict(do_sample=True, seed=3, temperature=1.5, top_k=20)):
        for gen_too in (False, True):
            a = generate(PROMPT, lm, ts, ivs, max_new_tokens=8, use_cache=True, apply_to_generated=gen_too, **kw)
            b = generate(PROMPT, lm, ts, ivs, max_new_tokens=8, use_cache=False, apply_to_generated=gen_too, **kw)
            assert a.new_ids == b.new_ids and len(a.new_ids) == 8
            assert a.prompt_ids == tuple(PROMPT)
    # the first new token is the unfrozen intervention's argmax (interventions act at prompt positions)
    r = intervene(PROMPT, lm, ts, ivs, mode="unfrozen")
    first = generate(PROMPT, lm, ts, ivs, max_new_tokens=1)
    assert first.new_ids[0] == int(r.probabilities.argmax())


def test_generation_interventions_change_tokens_and_seed_is_reproducible():
    lm, ts, g = _setup("llama")
    base = generate(PROMPT, lm, ts, [], max_new_tokens=10)
    steer = [Intervention.set_feature(lm.n_layers - 1, slice(1, None), 0, 200.0)]
    held = generate(PROMPT, lm, ts, steer, max_new_tokens=10, apply_to_generated=True)
    assert held.new_ids != base.new_ids
    s1 = generate(PROMPT, lm, ts, steer, max_new_tokens=10, do_sample=True, seed=7)
    s2 = generate(PROMPT, lm, ts, steer, max_new_tokens=10, do_sample=True, seed=7)
    assert s1.new_ids == s2.new_ids


def test_intervention_records_and_errors():
    iv = Intervention(2, 3, 7, 1.5)
    assert (iv.kind, iv.op) == ("feature", "set")
    assert Intervention.scale_error(1, slice(1, 3), 0.5).kind == "error"
    assert Intervention.zero_token(0) == Intervention(-1, 0, None, 0.0, "scale")
    with pytest.raises(ConfigError, match="op='set' on a error"):
        Intervention(1, 2, None, 3.0)
    with pytest.raises(ConfigError, match="op='mul'; allowed: set, scale"):
        Intervention(1, 2, 3, 3.0, "mul")
    with pytest.raises(ConfigError, match="layer=-2"):
        Intervention(-2, 0, 1, 0.0)
    with pytest.raises(ConfigError, match="value=nan"):
        Intervention(0, 0, 1, float("nan"))
    lm = tiny_lm("llama")
    ts = random_transcoders(lm)
    with pytest.raises(ConfigError, match="mode='frozen'; allowed: constrained, iterative, unfrozen"):
        intervene(PROMPT, lm, ts, [], mode="frozen")
    with pytest.raises(ConfigError, match=r"layers=\(0, 9\); allowed: 0 ≤ a ≤ b ≤ 3"):
        intervene(PROMPT, lm, ts, [], layers=(0, 9))
    with pytest.raises(ConfigError, match="position=7; allowed: -7..6"):
        intervene(PROMPT, lm, ts, [Intervention.zero_feature(0, 7, 1)])
    with pytest.raises(ConfigError, match="layer=3; allowed: 0..2"):
        intervene(PROMPT, lm, ts, [Intervention.zero_feature(3, 1, 1)])
    with pytest.raises(ConfigError, match="twice"):
        intervene(PROMPT, lm, ts, [Intervention.zero_feature(0, 1, 1), Intervention.set_feature(0, slice(0, 3), 1, 2.0)])
