"""Feature inspection: one-pass statistics equal a naive per-sequence computation, resume is exact,
the token lenses are W_U·d_f and E·e_f, and bad ids are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsetrace.errors import ConfigError, FormatError
from sparsetrace.tracer.features import (
    FeatureStatsConfig,
    compute_feature_stats,
    feature_labels,
    inspect_feature,
    load_feature_stats,
    open_sample,
)
from sparsetrace.models.loading import collect_mlp_io, load_model

from _cli_fixtures import save_tiny_model, write_text_corpus
from conftest import random_transcoders


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    lm = load_model(str(save_tiny_model(root / "model")), device="cpu")
    ts = random_transcoders(lm, n_features=32, k=4)
    sample = open_sample(write_text_corpus(root / "corpus"), lm, ctx_len=12)
    return lm, ts, sample, root


CFG = FeatureStatsConfig(n_sequences=16, ctx_len=12, batch=4, top_k=5, save_every=1)


@torch.no_grad()
def test_stats_match_naive(setup):
    lm, ts, sample, _ = setup
    st = compute_feature_stats(lm, ts, sample, CFG)
    ids = torch.as_tensor(sample.ids(0, 16))
    x, _ = collect_mlp_io(lm, ids, list(range(lm.n_layers)))
    assert st.n_tokens == 16 * 11 and st.position == 16
    edges = CFG.hist_edges
    for l in range(lm.n_layers):
        act = ts[l].encode(x[l])[:, 1:].reshape(-1, ts.n_features).numpy().astype(np.float64)  # position 0 skipped
        np.testing.assert_array_equal(st.fire_count[l], (act > 0).sum(0))
        np.testing.assert_allclose(st.act_sum[l], act.sum(0), rtol=1e-5)
        np.testing.assert_allclose(st.act_max[l], act.max(0), rtol=1e-6)
        for f in range(ts.n_features):
            a = act[:, f][act[:, f] > 0]
            naive = np.histogram(np.clip(a, edges[0], edges[-1]), bins=edges)[0]
            np.testing.assert_array_equal(st.hist[l, f], naive)
            top = np.sort(act[:, f])[::-1][: CFG.top_k]
            np.testing.assert_allclose(st.top_val[l, f], top, rtol=1e-6)
        # the recorded (sequence, position, token) of each top slot really has that activation
        f = int(np.argmax(st.fire_count[l]))
        for v, s, p, t in zip(st.top_val[l, f], st.top_seq[l, f], st.top_pos[l, f], st.top_tok[l, f]):
            if v > 0:
                assert int(ids[s, p]) == t
                assert float(ts[l].encode(x[l])[s, p, f]) == pytest.approx(float(v), rel=1e-6)


def test_resume_continues_exactly(setup, tmp_path):
    lm, ts, sample, _ = setup
    half = FeatureStatsConfig(**{**CFG.to_dict(), "n_sequences": 8, "layers": None})
    compute_feature_stats(lm, ts, sample, half, cache=tmp_path)
    assert load_feature_stats(tmp_path).position == 8
    resumed = compute_feature_stats(lm, ts, sample, CFG, cache=tmp_path)
    once = compute_feature_stats(lm, ts, sample, CFG)
    assert resumed.position == 16
    for name in ("fire_count", "act_sum", "act_max", "hist", "top_val", "top_seq", "top_pos", "top_tok"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(once, name), err_msg=name)
    loaded = load_feature_stats(tmp_path)
    for name in ("fire_count", "act_sum", "act_max", "hist", "top_val", "top_seq", "top_pos", "top_tok"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(once, name), err_msg=name)
        assert getattr(loaded, name).dtype == getattr(once, name).dtype, name
    # the counts and indices are stored as int32 (a shipped set's statistics must stay small)
    from safetensors.numpy import load_file

    stored = load_file(str(tmp_path / "feature_stats.safetensors"))
    assert {k for k, v in stored.items() if v.dtype == np.int32} == {"hist", "top_seq", "top_pos", "top_tok"}


def test_other_transcoders_restart_and_refuse_labels(setup, tmp_path):
    lm, ts, sample, _ = setup
    st = compute_feature_stats(lm, ts, sample, CFG, cache=tmp_path)
    other = random_transcoders(lm, n_features=32, k=4, seed=7)
    fresh = compute_feature_stats(lm, other, sample, CFG, cache=tmp_path)
    assert fresh.identity != st.identity and fresh.position == 16
    with pytest.raises(ConfigError, match="another transcoder set"):
        feature_labels(lm, ts, [(0, 1)], fresh)


@torch.no_grad()
def test_lenses_and_report(setup):
    lm, ts, sample, _ = setup
    st = compute_feature_stats(lm, ts, sample, CFG)
    layer = 1
    f = int(np.argmax(st.fire_count[layer]))
    r = inspect_feature(lm, ts, layer, f, st, sample, n_tokens=5, window=3)
    W_U = lm.model.lm_head.weight.detach()
    E = lm.model.model.embed_tokens.weight.detach()
    out_ids = torch.topk(W_U @ ts[layer].W_dec[f].detach(), 5).indices.tolist()
    in_ids = torch.topk(E @ ts[layer].W_enc[f].detach(), 5).indices.tolist()
    assert [t for t, _ in r.top_output_tokens] == lm.token_strings(out_ids)
    assert [t for t, _ in r.top_input_tokens] == lm.token_strings(in_ids)
    assert r.density == pytest.approx(st.fire_count[layer, f] / st.n_tokens)
    assert sum(r.histogram_counts) == st.fire_count[layer, f]
    assert r.contexts and r.contexts[0].activation == pytest.approx(float(st.top_val[layer, f, 0]))
    c = r.contexts[0]
    assert c.activations[c.focus] == pytest.approx(c.activation, rel=1e-5)
    assert len(c.tokens) == len(c.activations) <= 7
    assert r.label and len(r.label) <= 40
    labels = feature_labels(lm, ts, [(layer, f), (0, 2)], st)
    assert labels[(layer, f)] == r.label and set(labels) == {(layer, f), (0, 2)}


@pytest.mark.parametrize("layer,feature,msg", [(5, 0, "layer=5; allowed: 0..1"), (0, 32, "feature=32; allowed: 0..31")])
def test_out_of_range(setup, layer, feature, msg):
    lm, ts, _, _ = setup
    with pytest.raises(ConfigError, match=msg):
        inspect_feature(lm, ts, layer, feature)


def test_bad_inputs(setup, tmp_path):
    lm, ts, _, _ = setup
    with pytest.raises(ConfigError, match="does not exist"):
        open_sample(tmp_path / "nope", lm, 12)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .txt"):
        open_sample(tmp_path / "empty", lm, 12)
    with pytest.raises(FormatError, match="not a feature statistics cache"):
        load_feature_stats(tmp_path)
    with pytest.raises(ConfigError, match="n_sequences=0"):
        FeatureStatsConfig(n_sequences=0)


# ---- labels (issue 19) -----------------------------------------------------------------------------
def test_word_spans_join_sub_words():
    from sparsetrace.tracer.features import word_spans

    toks = [" The", " cap", "ital", " of", " France", ",", "\n", "2", "0", "2", "4", "(", "x", ")"]
    spans = word_spans(toks)
    assert spans[1] == spans[2] == (1, 3)  # " cap" + "ital" is one word
    assert spans[4] == (4, 5) and spans[5] == (5, 6) and spans[6] == (6, 7)
    assert spans[7] == spans[10] == (7, 11)  # digits glued together
    assert spans[11] == (11, 12) and spans[12] == (12, 13) and spans[13] == (13, 14)


@torch.no_grad()
def test_labels_are_whole_words_scored_on_heldout_text(setup, tmp_path):
    from sparsetrace.tracer.features import (
        LabelConfig,
        compute_feature_labels,
        load_feature_labels,
        save_feature_labels,
        word_spans,
    )

    lm, ts, sample, _ = setup
    st = compute_feature_stats(lm, ts, sample, CFG)
    labels = compute_feature_labels(lm, ts, st, sample, LabelConfig(n_heldout=6, batch=4))
    assert set(labels.labels) == {(l, int(f)) for l in range(lm.n_layers) for f in np.flatnonzero(st.fire_count[l] > 0)}
    # held-out text: the sample's sequences after the 16 the statistics used
    ids = torch.as_tensor(sample.ids(16, 6))
    assert labels.heldout_tokens == ids.numel() - len(ids)
    x, _ = collect_mlp_io(lm, ids, list(range(lm.n_layers)))
    # the tiny word-level tokenizer decodes "the cat" as "the cat": every token is a word
    assert lm.tokenizer.decode(lm.tokenizer("the cat", add_special_tokens=False)["input_ids"]) == "the cat"
    words = []
    for row in ids.tolist():
        toks = lm.token_strings(row)
        words.append(["".join(toks[a:b]).strip().lower() for a, b in word_spans(toks, spaced=True)])
    words = np.array(words)[:, 1:].reshape(-1)
    vocab = set(w for row in sample.ids(0, 16).tolist() for w in lm.token_strings(row))
    for (layer, f), lab in labels.labels.items():
        assert lab.words and all(w.lower() in {v.strip().lower() for v in vocab} for w in lab.words)  # whole words of the text
        fires = (ts[layer].encode(x[layer])[:, 1:, f] > 0).reshape(-1).numpy()
        is_word = np.isin(words, [w.lower() for w in lab.words])
        assert lab.n_fires == fires.sum() and lab.n_word == is_word.sum()
        tp = (fires & is_word).sum()
        assert lab.precision == (pytest.approx(tp / is_word.sum()) if is_word.sum() else None)
        assert lab.recall == (pytest.approx(tp / fires.sum()) if fires.sum() else None)
        assert lab.contexts and all(c.startswith("…") and "[" in c for c in lab.contexts)
    # each context brackets the whole word at one of the feature's top-activating tokens
    l, f = next(iter(labels.labels))
    tops = set()
    for v, s, p in zip(st.top_val[l, f], st.top_seq[l, f], st.top_pos[l, f]):
        if v > 0:
            tops.add(lm.token_strings(sample.ids(int(s), 1)[0])[int(p)].strip())
    assert all(c[c.index("[") + 1 : c.index("]")] in tops for c in labels.labels[(l, f)].contexts)
    save_feature_labels(labels, tmp_path)
    back = load_feature_labels(tmp_path)
    assert back.labels == labels.labels and back.heldout == labels.heldout
    assert (tmp_path / "feature_labels.json.gz").read_bytes() == save_feature_labels(labels, tmp_path).read_bytes()
    assert load_feature_labels(tmp_path / "nothing-here") is None


@torch.no_grad()
def test_describe_features_sources(setup):
    from sparsetrace.tracer.features import LabelConfig, compute_feature_labels, decoder_cosines, describe_features

    lm, ts, sample, _ = setup
    st = compute_feature_stats(lm, ts, sample, CFG)
    labels = compute_feature_labels(lm, ts, st, sample, LabelConfig(n_heldout=2))
    key = next(iter(labels.labels))
    d = describe_features(lm, ts, [key, (0, 31)], st, labels)[key]
    lab = labels.labels[key]
    assert d["source"] == "statistics" and d["short"] == " / ".join(lab.words)
    assert d["label"].startswith(f"{d['short']} — {lab.contexts[0]}")
    assert (d["precision"], d["recall"], d["contexts"]) == (lab.precision, lab.recall, list(lab.contexts))
    assert d["density"] == pytest.approx(st.density(*key))
    # promoted tokens are words seen (at least twice) in the statistics' sample
    assert labels.vocabulary and all(t.lower() in labels.vocabulary for t in d["promoted"])
    seen = [w.strip().lower() for row in sample.ids(0, 16).tolist() for w in lm.token_strings(row)]
    assert labels.vocabulary == {w for w in set(seen) if seen.count(w) >= 2 and w.isalpha()}
    # no statistics: the token lens, which says so, and never a sub-word fragment
    lens = describe_features(lm, ts, [key])[key]
    assert lens["source"] == "token lens" and "(token lens: no feature statistics)" in lens["label"]
    assert all(t.isalpha() for t in lens["promoted"])
    # decoder cosines of every pair above the floor, against torch
    keys = [(0, f) for f in range(8)] + [(1, 3)]
    pairs = decoder_cosines(ts, keys, floor=-1.0)
    assert len(pairs) == len(keys) * (len(keys) - 1) // 2
    a, b, c = pairs[0]
    la, fa = map(int, a.split("."))
    lb, fb = map(int, b.split("."))
    assert c == pytest.approx(float(torch.nn.functional.cosine_similarity(ts[la].W_dec[fa], ts[lb].W_dec[fb], dim=0)), abs=1e-4)
    assert all(p[2] >= 0.3 for p in decoder_cosines(ts, keys, floor=0.3))


def test_bf16_screened_top_rows_equal_the_float32_top():
    """The token lens screens a large vocabulary in bfloat16 and rescores its candidates in float32: the
    result is the float32 top-n, on peaked scores (certified by the bound) and on near-flat ones (where the
    bfloat16 screen alone picks other rows and the float32 fallback has to step in)."""
    from sparsetrace.tracer.features import _top_rows

    g = torch.Generator().manual_seed(0)
    M = torch.randn(40000, 64, generator=g)
    V = torch.randn(24, 64, generator=g)
    V[:12] = M[torch.randint(0, 40000, (12,), generator=g)] * 3  # peaked: one row stands out
    ref_v, ref_i = (V @ M.T).topk(8, dim=1)
    vals, ids = _top_rows(M, M.bfloat16(), V, 8)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(vals, ref_v, rtol=1e-5, atol=1e-5)

    flat = torch.ones(40000, 64) + 1e-3 * torch.randn(40000, 64, generator=g)
    v = torch.randn(4, 64, generator=g)
    ref_v, ref_i = (v @ flat.T).topk(8, dim=1)
    screened = (v.bfloat16() @ flat.bfloat16().T).float().topk(8, dim=1).indices
    assert not torch.equal(screened, ref_i)  # bfloat16 alone would be wrong here
    vals, ids = _top_rows(flat, flat.bfloat16(), v, 8)
    assert torch.equal(ids, ref_i)
