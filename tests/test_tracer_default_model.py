"""The engine on the real embedded default (SmolLM2-135M-Instruct) with a small random transcoder set:
exactness does not need trained transcoders (issue 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsetrace.graphs import AttributionGraph, NodeKind
from sparsetrace.tracer.attribution import AttributionConfig, attribute
from sparsetrace.tracer.replacement import ReplacementModel

from conftest import random_transcoders

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def setup(default_lm):
    ts = random_transcoders(default_lm, n_features=512, k=8, seed=3)
    return default_lm, ts


def test_default_model_shape_and_bos(default_lm):
    assert default_lm.adapter.name == "llama"
    assert (default_lm.n_layers, default_lm.d_model) == (30, 576)
    ids = default_lm.tokenize(PROMPT)
    assert int(ids[0]) == default_lm.tokenizer.bos_token_id  # prepended: its tokenizer does not add one
    assert default_lm.token_strings(ids)[1:] == ["The", " capital", " of", " France", " is"]


def test_replacement_reproduces_real_logits(setup):
    lm, ts = setup
    rm = ReplacementModel(lm, ts)
    ids = lm.tokenize(PROMPT)
    run = rm.run(ids)
    with torch.no_grad():
        real = lm.model(input_ids=ids[None]).logits[0]
        out = rm.frozen(run, run.h0[None], [w[None] for w in rm.clean_writes(run)])
    replaced = out.final[0] @ rm.unembedding().T
    assert (replaced - real).abs().max().item() <= 1e-4
    assert run.error[:, 1:].norm() > 0  # random transcoders: the error nodes carry real weight


def test_graph_for_capital_of_france(setup, tmp_path):
    lm, ts = setup
    g = attribute(PROMPT, lm, ts, config=AttributionConfig(batch_size=64))
    lay = g.layout
    assert g.logit_label[0] == " Paris"
    assert 0.6 < g.logit_probability[0] < 0.9
    assert lay.n_features == 30 * 5 * 8  # TopK: k per layer per non-BOS position
    rows = np.r_[np.arange(lay.n_features), np.arange(lay.logits.start, lay.logits.stop)]
    A = g.dense_adjacency().astype(np.float64)
    scale = np.abs(g.value[rows]).max()
    np.testing.assert_allclose(A[rows].sum(1) + g.bias[rows], g.value[rows], atol=2e-6 * scale, rtol=0)
    r = g.adjacency.rows()
    assert lay.can_feed(r, g.adjacency.indices).all()

    # column test on a few sources of each kind, on the real model
    rm = ReplacementModel(lm, ts)
    run = rm.run(lm.tokenize(PROMPT))
    srcs = [0, lay.n_features // 2, lay.n_features - 1, int(lay.error_index(10, 3)), int(lay.token_index(2))]
    B = len(srcs)
    h0 = run.h0[None].repeat(B, 1, 1)
    writes = [w[None].repeat(B, 1, 1) for w in rm.clean_writes(run)]
    for b, i in enumerate(srcs):
        l, c = int(lay.layer[i]), int(lay.pos[i])
        if lay.kind[i] == NodeKind.FEATURE:
            f = int(lay.feature[i])
            writes[l][b, c] += run.act[l, c, f] * ts[l].W_dec[f]
        elif lay.kind[i] == NodeKind.ERROR:
            writes[l][b, c] += run.error[l, c]
        else:
            h0[b, c] += run.h0[c]
    with torch.no_grad():
        base = rm.frozen(run, run.h0[None], [w[None] for w in rm.clean_writes(run)])
        moved = rm.frozen(run, h0, writes)
    W_U = rm.unembedding()
    paris = (W_U[int(g.logit_token[0])] - W_U.mean(0))
    delta = (moved.final[:, -1] - base.final[:, -1]) @ paris
    expected = A[lay.logit_index(0), srcs]
    np.testing.assert_allclose(delta.numpy(), expected, atol=1e-3 * max(1.0, np.abs(expected).max()), rtol=0)

    path = g.save(tmp_path / "g.safetensors")
    back = AttributionGraph.load(path)
    np.testing.assert_array_equal(back.dense_adjacency(), g.dense_adjacency())
