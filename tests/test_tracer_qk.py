"""Exactness of QK attribution (docs/design.md §13) on tiny random models of every architecture, fp64.

Every check measures independently of the decomposition: the score the real model feeds its softmax
(read by a tap on its own forward), the score of the frozen model with one layer's Q/K live after a
source's write is scaled (an intervention), and finite differences of the pattern.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsetrace.errors import ConfigError
from sparsetrace.graphs import NodeKind
from sparsetrace.models.hooks import hooks
from sparsetrace.tracer.attribution import AttributionConfig, attribute
from sparsetrace.tracer.qk import AttentionTap, QKSite, open_qk
from sparsetrace.tracer.replacement import eager_attention, frozen_norm, norm_state

from conftest import ARCHS, random_transcoders, tiny_lm

PROMPT = [3, 17, 5, 42, 8, 23, 11]
# (layer, head, query, key): the last layer across positions (within Gemma's window of 4), a
# self-score in a middle layer with a head of the second key/value group, and layer 0 (tokens only)
SITES = [QKSite(2, 1, 6, 3), QKSite(1, 3, 5, 5), QKSite(0, 2, 4, 1)]


def _setup(arch, budget=None):
    lm = tiny_lm(arch)
    ts = random_transcoders(lm)
    g = attribute(PROMPT, lm, ts, config=AttributionConfig(dtype="float64", batch_size=16, max_feature_nodes=budget))
    return lm, ts, g


def _real_scores(lm, qa, layer):
    """The real model's softmax input in ``layer`` [n_q, T, T], read on its own forward. HF's norms
    compute in float32 even in a float64 model; as in ``ReplacementModel.run``, each norm is evaluated
    in float64 instead (the live norm, not a frozen one)."""
    tap = AttentionTap()

    def exact(kind, eps):
        return lambda m, args, out: frozen_norm(m, args[0], kind, norm_state(args[0], kind, eps))

    norms = [(m, "forward", exact(k, e)) for m, k, e in qa.rm._norms]
    with torch.no_grad(), eager_attention(lm.model), hooks(norms + tap.specs(qa.rm, layer)), tap:
        lm.model(input_ids=torch.tensor([PROMPT]))
    return tap.scores[0].double()


def _source(qa, node):
    """(layer or None for a token, position, write vector) of graph node ``node``, from the clean run."""
    lay, run, ts = qa.graph.layout, qa.run, qa.rm.transcoders
    kind = NodeKind(int(lay.kind[node]))
    l, c = int(lay.layer[node]), int(lay.pos[node])
    if kind is NodeKind.FEATURE:
        f = int(lay.feature[node])
        return l, c, run.act[l, c, f] * ts[l].W_dec[f]
    if kind is NodeKind.ERROR:
        return l, c, run.error[l, c]
    return None, c, run.h0[c]


def _measure(qa, layer, node, x):
    """The frozen model with layer ``layer``'s Q/K live, source ``node``'s write multiplied by x: its
    tap (query [n_q, T, hd] and softmax input [n_q, T, T])."""
    rm, run = qa.rm, qa.run
    l, c, v = _source(qa, node)
    h0 = run.h0.clone()
    writes = [w.clone() for w in rm.clean_writes(run)]
    if l is None:
        h0[c] += (x - 1.0) * v
    else:
        writes[l][c] += (x - 1.0) * v
    tap = AttentionTap()
    with torch.no_grad(), tap:
        rm.frozen(run, h0[None], [w[None] for w in writes], live_qk=layer, extra=tap.specs(rm, layer))
    return tap.query[0].double(), tap.scores[0].double()


def _probe_nodes(d):
    """Sources worth scaling: the largest query-side and key-side parts, a token before the key (it
    reaches q and k only through earlier attention), an error node, and a source on both sides."""
    qn = d.q_nodes[np.argsort(-np.linalg.norm(d.Q, axis=1))[:2]]
    kn = d.k_nodes[np.argsort(-np.linalg.norm(d.K, axis=1))[:2]]
    both = np.intersect1d(d.q_nodes, d.k_nodes)
    return sorted({*qn.tolist(), *kn.tolist(), *both[:2].tolist()})


@pytest.mark.parametrize("arch", ARCHS)
def test_parts_sum_to_the_models_own_score(arch):
    lm, ts, g = _setup(arch)
    with open_qk(g, lm, ts) as qa:
        decs = qa.decompose(SITES)
        for s, d in zip(SITES, decs):
            real = _real_scores(lm, qa, s.layer)[s.head, s.query_pos, s.key_pos].item()
            assert abs(real) > 1e-5  # not a vanishing score
            assert abs(d.cap(d.total()) - real) <= 1e-9 * max(1.0, abs(real)), (s, d.cap(d.total()), real)
            c = d.closure()
            assert c["query"] < 1e-9 * max(1.0, np.abs(d.q_clean).max()) and c["key"] < 1e-9 * max(1.0, np.abs(d.k_clean).max())
            # the pairs carry something; above layer 0 so does the constant (b_dec, κ's state)
            assert np.abs(d.pairs()).max() > 0 and (s.layer == 0 or abs(d.const_const()) > 0)
            rows = d.rows()
            assert abs(sum(v for _, _, v in rows) - d.score) < 1e-9 * max(1.0, abs(d.score))
            parts = [d.pairs(), d.query_const(), d.const_key(), [d.const_const()]]
            assert len(rows) == sum(np.count_nonzero(p) for p in parts)
            assert [abs(v) for _, _, v in d.rows(5)] == sorted((abs(v) for _, _, v in rows), reverse=True)[:5]
        # query side: sources below the layer at positions ≤ i; key side the same at j
        lay = g.layout
        d = decs[0]
        assert np.all(lay.pos[d.q_nodes] <= 6) and np.all(lay.pos[d.k_nodes] <= 3)
        assert np.all(np.where(lay.kind[d.k_nodes] == NodeKind.TOKEN, -1, lay.layer[d.k_nodes]) < 2)
    if arch == "gemma2":
        assert decs[0].softcap == 50.0
    else:
        assert decs[0].softcap is None


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_row_budget_graph_errors_hold_the_unselected_features(arch):
    lm, ts, g = _setup(arch, budget=5)
    assert g.layout.n_features == 5
    with open_qk(g, lm, ts) as qa:
        (d,) = qa.decompose([SITES[0]])
        real = _real_scores(lm, qa, 2)[1, 6, 3].item()
    assert abs(d.cap(d.total()) - real) <= 1e-9 * max(1.0, abs(real))


@pytest.mark.parametrize("arch", ARCHS)
def test_scaling_a_source_moves_the_score_as_predicted(arch):
    lm, ts, g = _setup(arch)
    s = SITES[0]
    with open_qk(g, lm, ts) as qa:
        (d,) = qa.decompose([s])
        nodes = _probe_nodes(d)
        tok = int(g.layout.token_index(1))  # before the key: reaches both sides through attention only
        nodes.append(tok)
        assert np.abs(d.query_part(tok)).max() > 0 and np.abs(d.key_part(tok)).max() > 0
        moved = 0
        for node in nodes:
            for x in (0.0, 2.0, -1.5):
                _, scores = _measure(qa, s.layer, node, x)
                measured = scores[s.head, s.query_pos, s.key_pos].item()
                predicted = d.cap(d.score_with(node, x))
                assert abs(predicted - measured) <= 1e-9 * max(1.0, abs(measured)), (node, x, predicted, measured)
                moved = max(moved, abs(measured - d.model_score))
        assert moved > 1e-3  # the interventions did move the score


@pytest.mark.parametrize("arch", ARCHS)
def test_pattern_derivative_matches_finite_differences(arch):
    lm, ts, g = _setup(arch)
    layer, head, i = 2, 1, 6
    h = 1e-5
    with open_qk(g, lm, ts) as qa:
        row = qa.attention_row(layer, head, i)
        assert np.isclose(row.pattern.sum(), 1.0)
        nodes = _probe_nodes(row.scores[-1]) + [int(g.layout.token_index(2))]
        pred = row.derivative(nodes)
        keys = torch.as_tensor(row.keys)
        for r, node in enumerate(nodes):
            p = [torch.softmax(_measure(qa, layer, node, 1.0 + e)[1][head, i], -1)[keys].numpy() for e in (h, -h)]
            fd = (p[0] - p[1]) / (2 * h)
            assert np.abs(fd - pred[r]).max() <= 1e-6 * max(1e-3, np.abs(fd).max()), (node, fd, pred[r])
        assert np.abs(pred).max() > 1e-4
        # the query-side part: the query as measured after the intervention, every key held clean
        key_pos = int(row.keys[-2])
        qn, dp = row.query_side_derivative(key_pos)
        st = qa._layer(layer)
        kc = st.k[head, row.keys].double()
        at = int(np.flatnonzero(row.keys == key_pos)[0])
        for node in qn[np.argsort(-np.abs(dp))[:3]]:
            ps = []
            for e in (h, -h):
                q = _measure(qa, layer, int(node), 1.0 + e)[0][head, i]
                s = st.scaling * (kc @ q)
                s = s if st.softcap is None else st.softcap * torch.tanh(s / st.softcap)
                ps.append(torch.softmax(s, -1)[at].item())
            fd = (ps[0] - ps[1]) / (2 * h)
            want = dp[np.flatnonzero(qn == node)[0]]
            assert abs(fd - want) <= 1e-6 * max(1e-3, abs(fd)), (node, fd, want)


def test_bad_sites_are_one_line_errors():
    lm, ts, g = _setup("gemma2")
    with open_qk(g, lm, ts) as qa:
        cases = [
            (QKSite(3, 0, 6, 3), "layer 3; allowed: 0..2"),
            (QKSite(0, 4, 6, 3), "head 4; allowed: 0..3"),
            (QKSite(0, 0, 7, 3), "query position 7; allowed: 0..6"),
            (QKSite(0, 0, 3, 5), "key position 5 is after query position 3; allowed: 0..3"),
            (QKSite(0, 0, 6, 1), "key position 1 is masked for query 6 in layer 0 (sliding window); allowed: 3..6"),
        ]
        for site, msg in cases:
            with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
                qa.decompose([site])


class _ZeroPattern(torch.overrides.TorchFunctionMode):
    """Inside one attention module (armed by hooks), sets pattern entries [head, query, keys] to 0 after
    the model's softmax: an intervention on the frozen pattern."""

    def __init__(self, head, query, keys):
        super().__init__()
        self.head, self.query, self.keys, self.armed = head, query, list(keys), False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.armed and func is torch.nn.functional.softmax:
            out = out.clone()
            out[:, self.head, self.query, self.keys] = 0
        return out

    def specs(self, rm, layer):
        att = rm.adapter.attention(rm.model, layer)
        return [(att, "pre", lambda m, a, k: setattr(self, "armed", True)),
                (att, "forward", lambda m, a, o: setattr(self, "armed", False))]


def _target_values(qa, out, node):
    l, c, vec, _ = qa._target_read(node)
    x = out.final if l == qa.n_layers else out.x[l]
    return (x[:, c] @ vec).detach().double().numpy()


def _edge_measured(qa, target, source, edit=None, layer=None):
    """A[target, source] measured in the frozen model: one more copy of the source's write (copy 1
    against copy 0), optionally with a pattern edit in ``layer``."""
    rm, run = qa.rm, qa.run
    l, c, v = _source(qa, source)
    h0 = run.h0.expand(2, *run.h0.shape).clone()
    writes = [w.expand(2, *w.shape).clone() for w in rm.clean_writes(run)]
    (h0 if l is None else writes[l])[1, c] += v
    specs = edit.specs(rm, layer) if edit is not None else []
    with torch.no_grad(), (edit if edit is not None else torch.overrides.TorchFunctionMode()):
        out = rm.frozen(run, h0, writes, extra=specs)
    t = _target_values(qa, out, target)
    return t[1] - t[0]


def _cross_edges(g, n):
    """The n largest cross-position edges into feature and logit targets."""
    lay, adj = g.layout, g.adjacency
    rows, cols, vals = adj.rows(), adj.indices, adj.data
    ok = (lay.pos[cols] < lay.pos[rows]) & np.isin(lay.kind[rows], [NodeKind.FEATURE, NodeKind.LOGIT])
    ok &= lay.kind[cols] != NodeKind.LOGIT
    e = np.flatnonzero(ok)
    e = e[np.argsort(-np.abs(vals[e]))[:n]]
    return [(int(rows[i]), int(cols[i]), float(vals[i])) for i in e]


@pytest.mark.parametrize("arch", ARCHS)
def test_head_loadings_add_up_to_the_edge_and_match_pattern_ablation(arch):
    lm, ts, g = _setup(arch)
    with open_qk(g, lm, ts) as qa:
        edges = _cross_edges(g, 3)
        assert any(g.layout.kind[t] == NodeKind.LOGIT for t, _, _ in _cross_edges(g, 10**6))
        edges += [e for e in _cross_edges(g, 10**6) if g.layout.kind[e[0]] == NodeKind.LOGIT][:1]
        for t, s, a in edges:
            hl = qa.head_loadings(t, s)
            assert hl.stored == pytest.approx(a, abs=0)
            assert abs(hl.loading.sum() - a) <= 1e-9 * max(1.0, abs(a)), (t, s, hl.loading.sum(), a)
            assert abs(hl.edge - a) <= 1e-9 * max(1.0, abs(a))
            # zeroing head (m, h)'s hop into the target's position removes exactly its loading
            m, h = np.unravel_index(np.argmax(np.abs(hl.loading)), hl.loading.shape)
            ct = int(g.layout.pos[t]) if g.layout.kind[t] == NodeKind.FEATURE else len(PROMPT) - 1
            edit = _ZeroPattern(int(h), ct, [c for c in range(ct)])
            after = _edge_measured(qa, t, s, edit, int(m))
            assert abs((a - after) - hl.loading[m, h]) <= 1e-9 * max(1.0, abs(a)), (a, after, hl.loading[m, h])
            assert abs(hl.loading[m, h]) > 1e-6


def test_head_loadings_refuse_same_position_and_non_edges():
    lm, ts, g = _setup("llama")
    lay = g.layout
    with open_qk(g, lm, ts) as qa:
        f = [i for i in range(lay.features.start, lay.features.stop) if lay.layer[i] == 2 and lay.pos[i] == 5][0]
        tok5, tok6 = int(lay.token_index(5)), int(lay.token_index(6))
        with pytest.raises(ConfigError, match="stays at position 5; head loadings are for cross-position edges"):
            qa.head_loadings(f, tok5)
        with pytest.raises(ConfigError, match="cannot feed"):
            qa.head_loadings(f, tok6)
        with pytest.raises(ConfigError, match="token node; allowed: a feature or a logit"):
            qa.head_loadings(tok6, tok5)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_hop_weight_is_the_logit_change_of_removing_the_hop(arch):
    lm, ts, g = _setup(arch)
    with open_qk(g, lm, ts) as qa:
        hops = qa.select_hops(3)
        assert len(hops) == 3 and hops[0].weight >= hops[1].weight >= hops[2].weight > 0
        logits = np.arange(g.layout.logits.start, g.layout.logits.stop)
        for hop in hops:
            s = hop.site
            assert s.key_pos < s.query_pos and s.key_pos >= 1
            rm, run = qa.rm, qa.run
            writes = [w[None] for w in rm.clean_writes(run)]
            base = rm.frozen(run, run.h0[None], writes)
            edit = _ZeroPattern(s.head, s.query_pos, [s.key_pos])
            with torch.no_grad(), edit:
                cut = rm.frozen(run, run.h0[None], writes, extra=edit.specs(rm, s.layer))
            delta = np.array([(_target_values(qa, cut, k) - _target_values(qa, base, k))[0] for k in logits])
            want = float(np.sum(g.logit_probability * np.abs(delta)))
            assert abs(hop.weight - want) <= 1e-9 * max(1.0, want), (s, hop.weight, want)
        only = qa.select_hops(2, layer=1, head=0)
        assert all(h.site.layer == 1 and h.site.head == 0 for h in only)
