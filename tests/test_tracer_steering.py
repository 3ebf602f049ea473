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
