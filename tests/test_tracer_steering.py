"""Additive steering (op "add") and the sampling filter (docs/design.md §16), on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from sparsetrace.errors import ConfigError
from sparsetrace.models.hooks import hooks
from sparsetrace.tracer.interventions import Intervention, filter_logits, generate, intervene

from conftest import ARCHS, random_transcoders, tiny_lm

PROMPT = [3, 17, 5, 42, 8, 23, 11]


def _setup(arch):
    lm = tiny_lm(arch, 0)
    ts = random_transcoders(lm, seed=1)
    lm.to(dtype=torch.float64)
    ts.to(dtype=torch.float64)
    return lm, ts


def _manual_logits(lm, ts, layer, positions, feature, alpha, ids):
    """The real model with α · W_dec[f] added to the MLP output of ``layer`` at ``positions`` by a plain hook."""
    d = ts[layer].W_dec[feature]

    def hook(module, args, output):
        out = output.clone()
        for c in positions:
            if c < out.shape[1]:
                out[:, c] += alpha * d
        return out

    mlp = lm.adapter.mlp(lm.model, layer)
    with torch.no_grad(), hooks([(mlp, "forward", hook)]):
        return lm.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_add_changes_mlp_output_by_alpha_times_decoder_row(arch):
    """Against a plain hook adding α · d_f inside the same unfrozen forward (a no-op intervention keeps
    the path; HF's own norms compute in float32, so the plain HF forward differs by rounding)."""
    lm, ts = _setup(arch)
    layer, f, alpha = 1, 5, 2.5
    res = intervene(PROMPT, lm, ts, [Intervention.add_feature(layer, slice(1, 4), f, alpha)], mode="unfrozen")
    d = ts[layer].W_dec[f]

    def hook(module, args, output):
        out = output.clone()
        out[:, 1:4] += alpha * d
        return out

    with hooks([(lm.adapter.mlp(lm.model, layer), "forward", hook)]):
        manual = intervene(PROMPT, lm, ts, [Intervention.scale_token(0, 1.0)], mode="unfrozen")
    torch.testing.assert_close(res.logits, manual.logits, atol=1e-12, rtol=1e-12)
    assert (res.logits - res.clean_logits).abs().max() > 1e-2  # the steering moved the logits
    hf = _manual_logits(lm, ts, layer, [1, 2, 3], f, alpha, PROMPT)[-1]
    torch.testing.assert_close(res.logits, hf, atol=1e-4, rtol=1e-4)


def test_add_in_constrained_mode_is_linear_in_alpha():
    lm, ts = _setup(ARCHS[0])
    d = [intervene(PROMPT, lm, ts, [Intervention.add_feature(0, 2, 3, a)], mode="constrained").target_delta
         for a in (1.0, 3.0)]
    torch.testing.assert_close(d[1], 3 * d[0], atol=1e-9, rtol=1e-9)


def test_add_on_generated_positions_matches_manual_hook():
    lm, ts = _setup(ARCHS[0])
    layer, f, alpha, n = 2, 7, 4.0, 5
    iv = Intervention.add_feature(layer, slice(None), f, alpha)
    out = generate(PROMPT, lm, ts, [iv], max_new_tokens=n, apply_to_generated=True, stop_at_eos=False)
    seq = list(PROMPT)
    for _ in range(n):  # the manual hook adds at every position, generated ones included
        seq.append(int(_manual_logits(lm, ts, layer, range(len(seq)), f, alpha, seq)[-1].argmax()))
    assert list(out.new_ids) == seq[len(PROMPT):]


def test_add_only_on_features():
    with pytest.raises(ConfigError, match="op='add'"):
        Intervention(0, 1, None, 1.0, "add")


def _reference_filter(logits, top_k, top_p):
    keep = set(range(len(logits)))
    if top_k is not None:
        kth = sorted(logits.tolist(), reverse=True)[top_k - 1]
        keep = {i for i in keep if logits[i] >= kth}
    if top_p < 1:
        masked = torch.tensor([logits[i] if i in keep else -math.inf for i in range(len(logits))])
        p = masked.softmax(-1).tolist()
        order = sorted(range(len(p)), key=lambda i: -p[i])
        mass, kept = 0.0, set()
        for i in order:
            kept.add(i)
            mass += p[i]
            if mass >= top_p:
                break
        keep &= kept
    return keep


@pytest.mark.parametrize("top_k,top_p", [(None, 1.0), (3, 1.0), (None, 0.5), (5, 0.7), (None, 1e-6), (1, 0.9)])
def test_filter_logits_matches_plain_reference(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(12, generator=g, dtype=torch.float64) * 2
        kept = {i for i, v in enumerate(filter_logits(logits, top_k, top_p).tolist()) if v != -math.inf}
        assert kept == _reference_filter(logits, top_k, top_p)


def test_same_seed_same_samples():
    lm, ts = _setup(ARCHS[0])
    iv = [Intervention.add_feature(1, slice(None), 2, 3.0)]
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, seed=7, stop_at_eos=False)
    a = generate(PROMPT, lm, ts, iv, apply_to_generated=True, **kw)
    b = generate(PROMPT, lm, ts, iv, apply_to_generated=True, **kw)
    assert a.new_ids == b.new_ids
    assert generate(PROMPT, lm, ts, [], **kw).new_ids == generate(PROMPT, lm, ts, [], **kw).new_ids


@pytest.mark.parametrize("top_p", [0.0, 1.5, float("nan")])
def test_generate_rejects_top_p_outside_unit_interval(top_p):
    lm, ts = _setup(ARCHS[0])
    with pytest.raises(ConfigError, match="top_p"):
        generate(PROMPT, lm, ts, [], max_new_tokens=1, do_sample=True, top_p=top_p)


# ---- specs, positions and runs (tracer/steering.py) -------------------------------------------
from sparsetrace.tracer.steering import Decoding, build, parse_positions, parse_spec, parse_values, steer  # noqa: E402


@pytest.mark.parametrize("text,expected,gen", [
    ("2", [2], False), ("-1", [6], False), ("1..3", [1, 2, 3], False), ("-3..-1", [4, 5, 6], False),
    ("5..", [5, 6], False), ("..1", [0, 1], False), ("*", list(range(7)), False), ("*+gen", list(range(7)), True),
    ("0..0+gen", [0], True), ("gen", [], True), ("3..-4", [3], False),
])
def test_positions_resolve_inclusive_ranges(text, expected, gen):
    p = parse_positions(text, "--add")
    assert p.resolve(7, "--add") == expected and p.generated is gen


@pytest.mark.parametrize("text,match", [
    ("7", "position 7 is beyond the prompt; allowed: -7..6"), ("-8", "position -8 is beyond"),
    ("4..2", "range 4..2 is empty"), ("2..9", "position 9 is beyond"), ("-1..0", "range -1..0 is empty"),
])
def test_positions_outside_the_prompt_or_empty_are_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_positions(text, "--add").resolve(7, "--add")


@pytest.mark.parametrize("option,text,match", [
    ("--add", "1:x:5=1", "position 'x'"), ("--add", "1:*:5=inf", "α='inf'; allowed: a finite number"),
    ("--add", "1:*:5", "no value"), ("--ablate", "1:2:5=3", "takes no value"), ("--set", "1:2=3", "2 field"),
    ("--scale-error", "1:*+gen=2", "take feature options only"), ("--scale-token", "gen=2", "feature options only"),
    ("--add", "a:1:5=1", "must be integers"), ("--add", "-2:1:5=1", "negative layer"),
])
def test_bad_specs(option, text, match):
    with pytest.raises(ConfigError, match=match):
        parse_spec(option, text)


def test_values_finite():
    assert parse_values("0, 2.5,-4") == (0.0, 2.5, -4.0)
    for bad in ("", "1,nan", "1,x"):
        with pytest.raises(ConfigError, match="--sweep"):
            parse_values(bad)


def test_spec_builds_the_interventions_it_says():
    lm, ts = _setup(ARCHS[0])
    specs = [parse_spec("--add", "1:1..3:5=2.5"), parse_spec("--ablate", "0:-1:2"), parse_spec("--scale-token", "*=0.5"),
             parse_spec("--set", "2:gen:4=3")]
    prompt, gen = build(specs, len(PROMPT))
    assert prompt == [Intervention.add_feature(1, slice(1, 4), 5, 2.5), Intervention.zero_feature(0, slice(6, 7), 2),
                      Intervention.scale_token(slice(0, 7), 0.5)]
    assert gen == [Intervention.set_feature(2, slice(None), 4, 3.0)]


def test_generated_only_interventions_match_manual_hook():
    """``generated=``: the addition acts at generated positions only, never on the prompt."""
    lm, ts = _setup(ARCHS[0])
    layer, f, alpha, n = 2, 7, 4.0, 5
    out = generate(PROMPT, lm, ts, [], generated=[Intervention.add_feature(layer, slice(None), f, alpha)],
                   max_new_tokens=n, stop_at_eos=False)
    seq = list(PROMPT)
    for _ in range(n):
        seq.append(int(_manual_logits(lm, ts, layer, range(len(PROMPT), len(seq)), f, alpha, seq)[-1].argmax()))
    assert list(out.new_ids) == seq[len(PROMPT):]
    assert out.new_ids[0] == generate(PROMPT, lm, ts, [], max_new_tokens=1).new_ids[0]  # the first token is unsteered


def test_steer_baseline_and_steered_come_from_the_same_seeds():
    lm, ts = _setup(ARCHS[0])
    specs = [parse_spec("--add", "1:*+gen:5=6")]
    dec = Decoding(max_new_tokens=4, temperature=1.3, top_p=0.9, top_k=20, samples=2, seed=11)
    out = steer(PROMPT, lm, ts, specs, decoding=dec)
    prompt, gen = build(specs, len(PROMPT))
    kw = dict(max_new_tokens=4, do_sample=True, temperature=1.3, top_p=0.9, top_k=20)
    for s, seed in zip(out["samples"], (11, 12)):
        assert s["seed"] == seed
        assert s["baseline_ids"] == list(generate(PROMPT, lm, ts, [], seed=seed, **kw).new_ids)
        assert s["steered_ids"] == list(generate(PROMPT, lm, ts, prompt, generated=gen, seed=seed, **kw).new_ids)
    res = intervene(PROMPT, lm, ts, prompt, mode="unfrozen")
    top = int(res.clean_logits.argmax())
    assert out["metric"]["tokens"] == [top]
    assert out["metric"]["steered"] == pytest.approx(float(res.logits[top] - res.logits.mean()), abs=1e-9)


def test_sweep_metric_at_zero_is_the_clean_metric_and_matches_intervene():
    lm, ts = _setup(ARCHS[0])
    specs = [parse_spec("--add", "1:-3..:5", swept=True), parse_spec("--ablate", "0:2:1")]
    out = steer(PROMPT, lm, ts, specs, decoding=Decoding(max_new_tokens=3), sweep=[0.0, 5.0], metric_kind="prob",
                metric_tokens="#3,#9")
    rows = out["sweep"]["rows"]
    assert [r["value"] for r in rows] == [0.0, 5.0]
    p5 = intervene(PROMPT, lm, ts, build(specs, len(PROMPT), 5.0)[0], mode="unfrozen").probabilities
    assert rows[1]["metric"] == pytest.approx(float(p5[3] + p5[9]), abs=1e-9)
    p0 = intervene(PROMPT, lm, ts, [Intervention.zero_feature(0, 2, 1)], mode="unfrozen").probabilities
    assert rows[0]["metric"] == pytest.approx(float(p0[3] + p0[9]), abs=1e-9)  # α = 0 adds nothing
    assert rows[0]["continuation_ids"] == list(generate(PROMPT, lm, ts, build(specs, len(PROMPT), 0.0)[0],
                                                        max_new_tokens=3).new_ids)


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=float("nan")), "--temperature nan"), (dict(temperature=-1.0), "--temperature"),
    (dict(top_p=0.0), r"--top-p 0.0; allowed: a number in \(0, 1\]"), (dict(top_p=1.5), "--top-p"),
    (dict(samples=3), "--samples 3 with --temperature 0"), (dict(top_k=-1), "--top-k"),
    (dict(max_new_tokens=0), "--max-new-tokens"),
])
def test_bad_decoding(kw, match):
    with pytest.raises(ConfigError, match=match):
        Decoding(**kw)
