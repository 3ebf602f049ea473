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
from sparsetrace.tracer.models import collect_mlp_io, load_model

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
    np.testing.assert_array_equal(loaded.top_val, once.top_val)


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
