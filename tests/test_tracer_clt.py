"""Cross-layer transcoders in the tracer (docs/design.md §14), on tiny random models of every
architecture with random CLTs.

References are written out here, independently of the engine: ŷ_t = Σ_{s ≤ t} a_s W_dec[s][:, t − s]
+ b_dec[t] + skip with whole decoders; feature interventions add (v − a)·W_dec[s][f, t − s] at every
target t ≥ s; a CLT whose cross-layer decoders (t > s) are zero is a per-layer set and must give the
per-layer results.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sparsetrace.models.hooks import hooks
from sparsetrace.tracer.interventions import FeatureRef, Intervention, generate, intervene
from sparsetrace.tracer.replacement import ReplacementModel, eager_attention
from sparsetrace.transcoders import TranscoderSet, TranscoderSetConfig

from conftest import ARCHS, random_clt, tiny_lm

PROMPT = [3, 17, 5, 42, 8, 23, 11]
TOL = {"float64": 1e-9, "float32": 1e-4}


@functools.lru_cache(maxsize=None)
def _setup(arch, dtype="float64", activation="topk", seed=0):
    """(model, CLT) cast to ``dtype``; cached: tests only read them."""
    lm = tiny_lm(arch, seed)
    clt = random_clt(lm, activation=activation, seed=seed + 1)
    dt = torch.float64 if dtype == "float64" else torch.float32
    lm.to(dtype=dt)
    clt.to(dtype=dt)
    return lm, clt


def _dense_writes(clt, acts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Σ_{s ≤ t} acts[s] W_dec[s][:, t − s] + b_dec[t] per target t, with whole decoders."""
    L = clt.n_layers
    return [clt.b_dec[t] + sum(acts[s] @ clt.decoder(s)[:, t - s] for s in range(t + 1)) for t in range(L)]


def _as_per_layer(lm, clt) -> TranscoderSet:
    """The per-layer set with the CLT's encoders, skips and same-layer decoders."""
    c = clt.config
    ts = TranscoderSet.empty(TranscoderSetConfig(model_id=c.model_id, architecture=c.architecture, n_layers=c.n_layers,
                                                 d_in=c.d_in, n_features=c.n_features, activation=c.activation,
                                                 k=c.k, skip=c.skip), dtype=clt.b_enc.dtype)
    with torch.no_grad():
        for l, tc in enumerate(ts):
            for name in ("W_enc", "b_enc", "b_dec", "threshold", "W_skip"):
                getattr(tc, name).copy_(getattr(clt[l], name))
            tc.W_dec.copy_(clt.decoder(l)[:, 0])
    return ts


def _local_only(clt):
    """A copy of the CLT with every cross-layer decoder column (target > source) zeroed."""
    import copy

    out = copy.deepcopy(clt)
    with torch.no_grad():
        for s in range(out.n_layers):
            out.W_dec[s][:, 1:] = 0
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_replacement_reproduces_logits_and_errors_are_what_the_clt_misses(arch, dtype):
    lm, clt = _setup(arch, dtype)
    rm = ReplacementModel(lm, clt)
    run = rm.run(torch.tensor(PROMPT))
    with torch.no_grad():
        out = rm.frozen(run, run.h0[None], [w[None] for w in rm.clean_writes(run)])
        real = lm.model(input_ids=torch.tensor([PROMPT])).logits[0]
    replaced = out.final[0] @ rm.unembedding().T
    tol = TOL[dtype] * max(1.0, run.logits.abs().max().item())
    torch.testing.assert_close(replaced, run.logits, rtol=0, atol=tol)
    # against the unhooked HF model: it computes norms in float32 even in float64 (float32 precision)
    cap = rm.adapter.logit_softcap(rm.model)
    torch.testing.assert_close(torch.tanh(replaced / cap) * cap if cap else replaced, real, rtol=0, atol=1e-4)
    # ε_l = y_l − (Σ_{s ≤ l} a_s W_dec[s][:, l − s] + b_dec[l] + skip), zero at position 0
    L = clt.n_layers
    acts = [run.act[s] for s in range(L)]
    assert all(a[1:].ne(0).any() for a in acts)
    ref = _dense_writes(clt, acts)
    for l in range(L):
        want = run.y[l] - ref[l] - clt[l].skip(run.x[l])
        want[0] = 0
        torch.testing.assert_close(run.error[l], want, rtol=0, atol=tol)
    assert run.error[:, 1:].abs().max() > 1e-3


def _feature(run, layer):
    """An active feature (layer, position, id) after position 0."""
    nz = torch.nonzero(run.act[layer, 1:] > 0)
    c, f = (int(v) for v in nz[len(nz) // 2])
    return layer, c + 1, f


@pytest.mark.parametrize("arch", ARCHS)
def test_constrained_feature_write_lands_on_every_target_layer(arch):
    """All-layer constrained: setting feature (s, c, f) to v is the frozen model with (v − a)·W_dec[s][f, t − s]
    added to the write of every layer t ≥ s (the linear replacement model of the graph)."""
    lm, clt = _setup(arch)
    rm = ReplacementModel(lm, clt)
    run = rm.run(torch.tensor(PROMPT))
    s, c, f = _feature(run, 0)
    v = 3.0 * float(run.act[s, c, f]) + 0.5
    res = intervene(PROMPT, lm, clt, [Intervention.set_feature(s, c, f, v)], mode="constrained",
                    features=[FeatureRef(2, -1, 0)])
    writes = [w[None].clone() for w in rm.clean_writes(run)]
    for t in range(s, clt.n_layers):
        writes[t][0, c] += (v - run.act[s, c, f]) * clt.decoder(s)[f, t - s]
    with torch.no_grad():
        out = rm.frozen(run, run.h0[None], writes)
    W_U = rm.unembedding()
    logits = out.final[0, -1] @ W_U.T
    want = logits[list(res.target_tokens)] - logits.mean()
    torch.testing.assert_close(res.target_values, want, rtol=0, atol=1e-9)
    pre = out.x[2][0, -1] @ clt[2].W_enc[0] + clt[2].b_enc[0]
    torch.testing.assert_close(res.feature_pre_activations[0], pre, rtol=0, atol=1e-9)
    assert (res.target_delta.abs().max() > 1e-6)


def _iterative_reference(rm, run, clamps: dict, err_scale: dict):
    """Frozen patterns and norms; each layer re-encoded, clamped, decoded with whole decoders, plus the clean
    error (scaled where asked). ``clamps[(l, c, f)] = v``, ``err_scale[(l, c)] = x``."""
    clt = rm.transcoders
    L = clt.n_layers
    acts = [clt[l].activate(run.pre[l]) for l in range(L)]
    eps = [run.y[t] - w - clt[t].skip(run.x[t]) for t, w in enumerate(_dense_writes(clt, acts))]
    live: list = [None] * L

    def mlp(l):
        def fn(x):
            a = clt[l].encode(x[0]).clone()
            for (ll, c, f), v in clamps.items():
                if ll == l:
                    a[c, f] = v
            live[l] = a
            y = clt.b_dec[l] + sum(live[s] @ clt.decoder(s)[:, l - s] for s in range(l + 1)) + clt[l].skip(x[0])
            e = eps[l].clone()
            for (ll, c), k in err_scale.items():
                if ll == l:
                    e[c] = e[c] * k
            return (y + e)[None]

        return fn

    with torch.no_grad():
        return rm.frozen(run, run.h0[None], mlp=[mlp(l) for l in range(L)])


@pytest.mark.parametrize("arch", ARCHS)
def test_iterative_propagates_through_the_clt(arch):
    lm, clt = _setup(arch)
    rm = ReplacementModel(lm, clt)
    run = rm.run(torch.tensor(PROMPT))
    s, c, f = _feature(run, 0)
    ivs = [Intervention.set_feature(s, c, f, 2.0), Intervention.scale_error(1, 3, 0.5)]
    res = intervene(PROMPT, lm, clt, ivs, mode="iterative", features=[FeatureRef(2, -1, 1)])
    out = _iterative_reference(rm, run, {(s, c, f): 2.0}, {(1, 3): 0.5})
    logits = out.final[0, -1] @ rm.unembedding().T
    torch.testing.assert_close(res.target_values, logits[list(res.target_tokens)] - logits.mean(), rtol=0, atol=1e-9)
    pre = out.x[2][0, -1] @ clt[2].W_enc[1] + clt[2].b_enc[1]
    torch.testing.assert_close(res.feature_pre_activations[0], pre, rtol=0, atol=1e-9)
    # no intervention: the real model
    clean = _iterative_reference(rm, run, {}, {})
    torch.testing.assert_close(clean.final[0] @ rm.unembedding().T, run.logits, rtol=0, atol=1e-9)
    torch.testing.assert_close(res.clean_logits, run.logits[-1], rtol=0, atol=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_unfrozen_adds_the_write_at_every_target_layer(arch):
    """The real model with hooks adding (v − a_live)·W_dec[s][f, t − s] at every t ≥ s, and an error node
    scaled by x: (x − 1)·(y − ŷ(x̃_live)) with ŷ from whole decoders and every earlier layer's live activations."""
    lm, clt = _setup(arch)
    rm = ReplacementModel(lm, clt)
    run = rm.run(torch.tensor(PROMPT))
    s, c, f = _feature(run, 0)
    el, ec, ex = 2, 4, 0.25
    res = intervene(PROMPT, lm, clt, [Intervention.set_feature(s, c, f, 1.5), Intervention.scale_error(el, ec, ex)],
                    mode="unfrozen")
    L = clt.n_layers
    live: list = [None] * L
    box = {}

    def hook(l):
        def fn(module, args, output):
            x = args[0][0]
            a = clt[l].encode(x)
            live[l] = a
            out = output.clone()
            if l == s:
                box["delta"] = 1.5 - a[c, f]
            if l >= s:
                out[0, c] += box["delta"] * clt.decoder(s)[f, l - s]
            if l == el:
                y_hat = clt.b_dec[l] + sum(live[q][ec] @ clt.decoder(q)[:, l - q] for q in range(l + 1)) + clt[l].skip(x[ec])
                out[0, ec] += (ex - 1) * (output[0, ec] - y_hat)
            return out

        return fn

    with torch.no_grad(), hooks([(rm.adapter.mlp(rm.model, l), "forward", hook(l)) for l in range(L)]), eager_attention(rm.model):
        logits = lm.model(input_ids=torch.tensor([PROMPT])).logits[0, -1]
    cap = rm.adapter.logit_softcap(rm.model)
    # the result reports pre-softcap logits. Unfrozen mode evaluates norms itself; HF casts them to
    # float32 even in float64: float32 precision
    ours = torch.tanh(res.logits / cap) * cap if cap else res.logits
    tol = 1e-5 * logits.abs().max().item()
    torch.testing.assert_close(ours, logits, rtol=0, atol=tol)
    assert (res.logits - res.clean_logits).abs().max() > 100 * tol  # the interventions did something


@pytest.mark.parametrize("mode", ["constrained", "iterative", "unfrozen"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_clt_without_cross_layer_decoders_is_the_per_layer_set(arch, mode):
    lm, clt = _setup(arch)
    local = _local_only(clt)
    ts = _as_per_layer(lm, local)
    run = ReplacementModel(lm, local).run(torch.tensor(PROMPT))
    s, c, f = _feature(run, 1)
    ivs = [Intervention.scale_feature(s, c, f, 0.0), Intervention.scale_error(2, 2, 3.0), Intervention.scale_token(3, 0.5)]
    refs = [FeatureRef(2, -1, 3), FeatureRef(1, 2, 0)]
    a = intervene(PROMPT, lm, local, ivs, mode=mode, features=refs)
    b = intervene(PROMPT, lm, ts, ivs, mode=mode, features=refs)
    for name in ("logits", "target_values", "feature_pre_activations", "feature_activations", "clean_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-10)
    assert a.target_tokens == b.target_tokens


@pytest.mark.parametrize("mode", ["constrained", "iterative", "unfrozen"])
@pytest.mark.parametrize("arch", ARCHS)
def test_setting_own_value_changes_nothing(arch, mode):
    lm, clt = _setup(arch)
    run = ReplacementModel(lm, clt).run(torch.tensor(PROMPT))
    s, c, f = _feature(run, 0)
    res = intervene(PROMPT, lm, clt, [Intervention.set_feature(s, c, f, float(run.act[s, c, f])),
                                      Intervention.scale_error(1, 2, 1.0)], mode=mode)
    torch.testing.assert_close(res.logits, res.clean_logits, rtol=0, atol=1e-10)


def test_partial_constrained_range_mixes_frozen_and_live_layers():
    """Constrained over [1, 2): layer 1's output is frozen (clean + additions); layers 0 and 2 re-encode.
    A feature of layer 0 set to v: its write to layer 1 is the addition (v − a)·W_dec[0][f, 1], its write
    to layer 2 is decoded from layer 0's live (clamped) activations."""
    lm, clt = _setup("llama")
    rm = ReplacementModel(lm, clt)
    run = rm.run(torch.tensor(PROMPT))
    s, c, f = _feature(run, 0)
    res = intervene(PROMPT, lm, clt, [Intervention.set_feature(s, c, f, 2.5)], mode="constrained", layers=(1, 2))
    L = clt.n_layers
    acts = [clt[l].activate(run.pre[l]) for l in range(L)]
    eps = [run.y[t] - w - clt[t].skip(run.x[t]) for t, w in enumerate(_dense_writes(clt, acts))]
    writes = rm.clean_writes(run)
    used: list = [None] * L

    def mlp(l):
        def fn(x):
            if l == 1:
                used[1] = acts[1]
                y = writes[1] + clt[1].skip(x[0])
                y[c] += (2.5 - acts[0][c, f]) * clt.decoder(0)[f, 1]
                return y[None]
            a = clt[l].encode(x[0]).clone()
            if l == 0:
                a[c, f] = 2.5
            used[l] = a
            return (clt.b_dec[l] + sum(used[q] @ clt.decoder(q)[:, l - q] for q in range(l + 1))
                    + clt[l].skip(x[0]) + eps[l])[None]

        return fn

    with torch.no_grad():
        out = rm.frozen(run, run.h0[None], mlp=[mlp(l) for l in range(L)])
    logits = out.final[0, -1] @ rm.unembedding().T
    torch.testing.assert_close(res.target_values, logits[list(res.target_tokens)] - logits.mean(), rtol=0, atol=1e-9)


def test_generation_with_and_without_cache():
    lm, clt = _setup("qwen3")
    run = ReplacementModel(lm, clt).run(torch.tensor(PROMPT))
    s, c, f = _feature(run, 0)
    ivs = [Intervention.set_feature(s, c, f, 4.0), Intervention.scale_error(1, 2, 0.0)]
    a = generate(PROMPT, lm, clt, ivs, max_new_tokens=5, use_cache=True, apply_to_generated=True)
    b = generate(PROMPT, lm, clt, ivs, max_new_tokens=5, use_cache=False, apply_to_generated=True)
    assert a.new_ids == b.new_ids and len(a.new_ids) == 5


# ---- attribution ------------------------------------------------------------------------------------
import numpy as np  # noqa: E402

from sparsetrace.config import AttributionConfig  # noqa: E402
from sparsetrace.graphs import NodeKind  # noqa: E402
from sparsetrace.tracer.attribution import attribute  # noqa: E402

ATOL = {"float64": (1e-9, 1e-9), "float32": (5e-4, 1e-5)}  # (pre-activations, demeaned logits), as per-layer


@functools.lru_cache(maxsize=None)
def _graph(arch, dtype="float64", backward="linear", budget=None):
    lm, clt = _setup(arch, dtype)
    cfg = AttributionConfig(dtype=dtype, batch_size=16, backward=backward, max_feature_nodes=budget)
    return attribute(PROMPT, lm, clt, config=cfg)


def _graph_targets(rm, g, out) -> np.ndarray:
    """Target values [B, n_feature_nodes + n_logits] read from a frozen forward's outputs."""
    lay, clt = g.layout, rm.transcoders
    cols = []
    for i in range(lay.features.start, lay.features.stop):
        l, c, f = int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])
        cols.append(out.x[l][:, c] @ clt[l].W_enc[f] + clt[l].b_enc[f])
    W_U = rm.unembedding()
    for tok in g.logit_token:
        cols.append(out.final[:, -1] @ (W_U[int(tok)] - W_U.mean(0)))
    return torch.stack(cols, dim=1).double().numpy()


def _rows(lay):
    return np.r_[np.arange(lay.features.start, lay.features.stop), np.arange(lay.logits.start, lay.logits.stop)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_column_test(arch, dtype):
    """One more copy of each source — a feature: a·W_dec[s][f, t − s] added at EVERY target t ≥ s — moves
    every target by exactly its adjacency column."""
    lm, clt = _setup(arch, dtype)
    g = _graph(arch, dtype)
    rm = ReplacementModel(lm, clt)
    run = rm.run(torch.tensor(PROMPT))
    lay = g.layout
    A = g.dense_adjacency().astype(np.float64)
    sources = [i for i in range(lay.logits.start) if not (lay.kind[i] == NodeKind.ERROR and lay.pos[i] == 0)]
    B = len(sources)
    h0 = run.h0[None].repeat(B, 1, 1)
    writes = [w[None].repeat(B, 1, 1) for w in rm.clean_writes(run)]
    for b, i in enumerate(sources):
        kind, l, c = NodeKind(int(lay.kind[i])), int(lay.layer[i]), int(lay.pos[i])
        if kind is NodeKind.FEATURE:
            f = int(lay.feature[i])
            for t in range(l, clt.n_layers):
                writes[t][b, c] += run.act[l, c, f] * clt.decoder(l)[f, t - l]
        elif kind is NodeKind.ERROR:
            writes[l][b, c] += run.error[l, c]
        else:
            h0[b, c] += run.h0[c]
    with torch.no_grad():
        base = _graph_targets(rm, g, rm.frozen(run, run.h0[None], [w[None] for w in rm.clean_writes(run)]))
        moved = _graph_targets(rm, g, rm.frozen(run, h0, writes))
    delta = moved - base
    expected = A[np.ix_(_rows(lay), sources)].T
    nf = lay.n_features
    tol_f, tol_l = ATOL[dtype]
    rtol = 0 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(delta[:, :nf], expected[:, :nf], atol=tol_f, rtol=rtol)
    np.testing.assert_allclose(delta[:, nf:], expected[:, nf:], atol=tol_l, rtol=rtol)
    assert np.abs(expected).max() > 1e-3


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_row_test(arch, dtype):
    """Σ_s A[t, s] + κ_t equals the clean pre-activation / demeaned logit."""
    lm, clt = _setup(arch, dtype)
    g = _graph(arch, dtype)
    rm = ReplacementModel(lm, clt)
    run = rm.run(torch.tensor(PROMPT))
    lay = g.layout
    rows = _rows(lay)
    lhs = g.dense_adjacency().astype(np.float64)[rows].sum(1) + g.bias[rows]
    with torch.no_grad():
        clean = _graph_targets(rm, g, rm.frozen(run, run.h0[None], [w[None] for w in rm.clean_writes(run)]))[0]
    pre = np.array([run.pre[int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])].item() for i in range(lay.n_features)])
    tol_f, tol_l = ATOL[dtype]
    np.testing.assert_allclose(clean[: lay.n_features], pre, atol=tol_f * 10, rtol=0)
    np.testing.assert_allclose(lhs[: lay.n_features], clean[: lay.n_features], atol=tol_f, rtol=0)
    np.testing.assert_allclose(lhs[lay.n_features :], clean[lay.n_features :], atol=tol_l, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_structure_dag_and_nilpotent(arch):
    g = _graph(arch)
    lay, adj = g.layout, g.adjacency
    r = adj.rows()
    assert lay.can_feed(r, adj.indices).all(), "an edge goes backwards in layer or position"
    assert not np.isin(lay.kind[r], [NodeKind.ERROR, NodeKind.TOKEN]).any()
    A = np.abs(g.dense_adjacency())
    P = np.eye(len(A))
    for _ in range(lay.n_layers + 2):
        P = P @ A
    assert np.abs(P).max() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_linearity_under_constrained_patching(arch):
    """All-layer constrained: scaling a source by x moves every logit target by (x − 1)·A[t, s], for x = 0, 2, 3
    (a feature's write lands on every target layer)."""
    lm, clt = _setup(arch)
    g = _graph(arch)
    lay = g.layout
    A = g.dense_adjacency().astype(np.float64)
    # the feature of the lowest layer with the largest total effect on the logits
    low = [i for i in range(lay.n_features) if lay.layer[i] == 0 and lay.pos[i] > 0]
    i = max(low, key=lambda j: np.abs(A[lay.logits, j]).sum())
    l, c, f = int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])
    for x in (0.0, 2.0, 3.0):
        res = intervene(PROMPT, lm, clt, [Intervention.scale_feature(l, c, f, x)], mode="constrained",
                        target_tokens=[int(t) for t in g.logit_token])
        np.testing.assert_allclose(res.target_delta.numpy(), (x - 1) * A[lay.logits, i], atol=1e-9, rtol=0)
    assert np.abs(A[lay.logits, i]).max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_autograd_backward_and_row_order_give_the_same_graph(arch):
    a, b = _graph(arch), _graph(arch, backward="autograd")
    np.testing.assert_allclose(a.dense_adjacency(), b.dense_adjacency(), atol=1e-10, rtol=0)
    np.testing.assert_allclose(a.bias, b.bias, atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_clt_without_cross_layer_decoders_gives_the_per_layer_graph(arch):
    lm, clt = _setup(arch)
    local = _local_only(clt)
    cfg = AttributionConfig(dtype="float64", batch_size=16)
    a = attribute(PROMPT, lm, local, config=cfg)
    b = attribute(PROMPT, lm, _as_per_layer(lm, local), config=cfg)
    assert np.array_equal(a.layout.feature, b.layout.feature)
    np.testing.assert_allclose(a.dense_adjacency(), b.dense_adjacency(), atol=1e-12, rtol=0)
    np.testing.assert_allclose(a.bias, b.bias, atol=1e-12, rtol=0)


def test_row_budget_folds_unselected_features_and_rows_still_sum():
    lm, clt = _setup("llama")
    full = _graph("llama")
    g = _graph("llama", budget=8)
    assert g.layout.n_features == 8 < full.layout.n_features
    rows = _rows(g.layout)
    lhs = g.dense_adjacency().astype(np.float64)[rows].sum(1) + g.bias[rows]
    np.testing.assert_allclose(lhs, g.value[rows], atol=1e-9, rtol=0)


def test_graph_pipeline_verify_validate_and_card_say_cross_layer():
    """Pruning, scores, exports, verify and validate run unchanged on a CLT graph; the card says cross-layer."""
    from sparsetrace.graphs import build_card, graph_scores, prune_graph, to_circuit_tracer_json
    from sparsetrace.graphs.card import card_markdown
    from sparsetrace.tracer.validate import Hypothesis, ValidationConfig, validate, verify_graph

    lm, clt = _setup("qwen2")
    g = _graph("qwen2")
    assert g.metadata["transcoders"]["kind"] == "cross-layer"
    p = prune_graph(g)
    assert 0 < p.layout.n_features <= g.layout.n_features
    s = graph_scores(g)
    assert 0 <= s.replacement <= 1 and 0 <= s.completeness <= 1
    ct = to_circuit_tracer_json(p, "clt")
    assert len(ct["nodes"]) == p.layout.n_nodes
    rep = verify_graph(g, lm, clt, n_samples=32)
    assert rep.passed and rep.n_checked == 32, rep.max_abs_error
    lay = g.layout
    A = g.dense_adjacency()
    i = int(lay.features.start + np.argmax(np.abs(A[lay.logits.start, lay.features])))
    res = validate(g, lm, clt, [Hypothesis("top", (i,), "ablate")], ValidationConfig(modes=("constrained",), noise_floor=1e-6))
    (v,) = res.results[0].verdicts
    assert v.verdict == "supported" and v.ratio == pytest.approx(1.0, abs=1e-8)
    card = build_card(g)
    assert card["transcoders"]["kind"] == "cross-layer"
    assert "cross-layer" in card_markdown(card)
    per_layer = attribute(PROMPT, lm, _as_per_layer(lm, clt), config=AttributionConfig(dtype="float64"))
    assert build_card(per_layer)["transcoders"]["kind"] == "per-layer"
