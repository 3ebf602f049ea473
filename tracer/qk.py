"""QK attribution: why an attention head attended where it did (docs/design.md §13).

In the local replacement model (§3) with the Q/K projections of one layer l computed from the live
residual stream (every norm denominator, QK-norms included, frozen at its clean value; RoPE a fixed
linear map per position; every attention pattern below l frozen), a head's query q_i and key k_j are
affine functions of the graph's sources:

    q_i = q₀ + Σ_a q_a,     q_a = M_i · J(a → (l, i)) · v_a,

with v_a the source's write (a·d for a feature, the error vector, h0[c] for a token), J the frozen
model's Jacobian from the write to layer l's input at position i (every path: residual, frozen attention
of earlier layers, transcoder skips), M_i the Jacobian of the query with respect to layer l's input at i
(attention norm, projection, QK-norm, RoPE) and q₀ the query with every source zeroed (as κ, §4). The
same holds for k_j. So the pre-softcap score s = scaling · q_i·k_j splits exactly into

    s = Σ_{a,b} scaling·q_a·k_b + Σ_a scaling·q_a·k₀ + Σ_b scaling·q₀·k_b + scaling·q₀·k₀ .

Where the model caps scores (Gemma 2: c·tanh(s/c)), s is the score before the cap; the capped score
and the pattern are reported beside it. q, k, the scaling and whether a cap applies are read from the
model's own attention code (its first matmul and its softmax input), not re-implemented.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from sparsetrace.config import QKConfig
from sparsetrace.errors import ConfigError, GraphError, ModelError
from sparsetrace.graphs import AttributionGraph, NodeKind
from sparsetrace.graphs.qk import CONST, HeadLoadings, QKDecomposition, QKSite
from sparsetrace.transcoders import TranscoderSet

from ..models.loading import LoadedModel
from .replacement import CleanRun, ReplacementModel
from .validate import _check_graph, _graph_dtype

__all__ = [
    "QKSite",
    "QKDecomposition",
    "AttentionRow",
    "HeadLoadings",
    "Hop",
    "QKAnalyzer",
    "open_qk",
    "AttentionTap",
    "CONST",
]


class _Stop(Exception):
    """Ends a forward early once what it was run for has been captured."""


class AttentionTap(TorchFunctionMode):
    """While ``armed`` (set by hooks around one attention module), records the model's own operands:
    ``query`` and ``key_t``, the two arguments of the first ``torch.matmul`` (after projections,
    QK-norms, RoPE and the grouped-query repetition), ``capped`` (a ``tanh`` was applied before the
    softmax: a logit softcap) and ``scores``, the softmax input (scaled, capped and masked pre-softmax
    scores). ``stop``: end the forward right after the softmax input is seen."""

    def __init__(self, stop: bool = False) -> None:
        super().__init__()
        self.stop = stop
        self.armed = False
        self.query: Tensor | None = None
        self.key_t: Tensor | None = None
        self.scores: Tensor | None = None
        self.capped = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.armed:
            if func is torch.matmul and self.query is None:
                self.query, self.key_t = args[0], args[1]
            elif func is torch.tanh and self.query is not None and self.scores is None:
                self.capped = True
            elif func is torch.nn.functional.softmax and self.scores is None:
                self.scores = args[0]
                if self.stop:
                    raise _Stop
        return func(*args, **kwargs)

    def specs(self, rm: ReplacementModel, layer: int) -> list:
        """Hooks that arm the tap inside layer ``layer``'s attention module only."""
        att = rm.adapter.attention(rm.model, layer)

        def arm(module, args, kwargs):
            self.armed = True

        def disarm(module, args, output):
            self.armed = False

        return [(att, "pre", arm), (att, "forward", disarm)]


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@dataclass(eq=False)
class AttentionRow:
    """The decompositions of one query's scores against every key it can see (``keys`` [n], ascending),
    with the clean pattern ``pattern`` [n] over them."""

    layer: int
    head: int
    query_pos: int
    keys: np.ndarray
    pattern: np.ndarray
    scores: list[QKDecomposition]

    def derivative(self, nodes: Sequence[int]) -> np.ndarray:
        """[len(nodes), n]: d p_ij / d x at x = 1 when source ``node``'s write is multiplied by x, through
        both the query and every key: p_j·(ds̃_j − Σ_j' p_j' ds̃_j'), ds̃ the slope of the capped score."""
        out = np.zeros((len(nodes), len(self.keys)))
        for r, node in enumerate(nodes):
            ds = np.array([d.score_slope(node) for d in self.scores])
            if self.scores and self.scores[0].softcap is not None:
                c = self.scores[0].softcap
                ds = ds * (1.0 - np.tanh(np.array([d.score for d in self.scores]) / c) ** 2)
            out[r] = self.pattern * (ds - self.pattern @ ds)
        return out

    def query_side_derivative(self, key_pos: int) -> tuple[np.ndarray, np.ndarray]:
        """(query nodes, d p_{i,key_pos} / d x) through the query alone, every key held at its clean value:
        how each query-side source moves the head's attention to ``key_pos``."""
        at = int(np.flatnonzero(self.keys == key_pos)[0])
        d0 = self.scores[at]
        kmat = np.stack([d.k_clean for d in self.scores])  # [n, hd]
        ds = d0.scaling * (d0.Q @ kmat.T)  # [n_q, n]
        if d0.softcap is not None:
            ds = ds * (1.0 - np.tanh(np.array([d.score for d in self.scores]) / d0.softcap) ** 2)
        dp = self.pattern[at] * (ds[:, at] - ds @ self.pattern)
        return d0.q_nodes, dp


@dataclass(frozen=True)
class Hop:
    """An attention hop (layer, head, query ← key) and the share of the graph's logit targets it carries:
    ``weight`` = Σ_k w_k·|p_ij·(g_k · V_j)| (w_k the logit weights, g_k the gradient of logit node k
    at the head's output at i, V_j the head's value at j)."""

    site: QKSite
    weight: float
    pattern: float


@dataclass(eq=False)
class _Sources:
    """The graph's sources as writes: ``node`` [n] graph node indices, ``layer`` [n] (−1: a token, written
    at layer 0's input), ``pos`` [n], ``vec`` [n, d]. An error node stands for everything at its (layer,
    position) that the graph does not name: the write minus b_dec minus the graph's features there."""

    node: np.ndarray
    layer: np.ndarray
    pos: np.ndarray
    vec: Tensor

    def in_cone(self, layer: int, pos: int) -> np.ndarray:
        """Indices of the sources that can reach layer ``layer``'s input at ``pos``."""
        return np.flatnonzero((self.layer < layer) & (self.pos <= pos))


def _graph_sources(graph: AttributionGraph, rm: ReplacementModel, run: CleanRun) -> _Sources:
    lay = graph.layout
    writes = rm.clean_writes(run)
    ts = rm.transcoders
    f = np.arange(lay.features.start, lay.features.stop)
    fl, fp, ff = lay.layer[f].astype(np.int64), lay.pos[f].astype(np.int64), lay.feature[f].astype(np.int64)
    d = run.h0.shape[-1]
    fvec = run.h0.new_zeros(len(f), d)
    named = torch.zeros_like(run.error)  # [L, T, d] the graph's feature writes per (layer, position)
    for l in np.unique(fl):
        m = np.flatnonzero(fl == l)
        ft, pt = torch.as_tensor(ff[m]), torch.as_tensor(fp[m])
        fvec[torch.as_tensor(m)] = run.act[int(l), pt, ft][:, None] * ts[int(l)].W_dec[ft].detach()
        named[int(l)].index_add_(0, pt, fvec[torch.as_tensor(m)])
    e = np.arange(lay.errors.start, lay.errors.stop)
    el, ep = lay.layer[e].astype(np.int64), lay.pos[e].astype(np.int64)
    rest = torch.stack([w - ts[l].b_dec.detach() for l, w in enumerate(writes)]) - named  # [L, T, d]
    rest[:, 0] = 0  # position 0 is a constant (§3)
    evec = rest[torch.as_tensor(el), torch.as_tensor(ep)]
    t = np.arange(lay.tokens.start, lay.tokens.stop)
    tp = lay.pos[t].astype(np.int64)
    tvec = run.h0[torch.as_tensor(tp)]
    return _Sources(
        node=np.r_[f, e, t],
        layer=np.r_[fl, el, np.full(len(t), -1)],
        pos=np.r_[fp, ep, tp],
        vec=torch.cat([fvec, evec, tvec]),
    )


def _constant_writes(rm: ReplacementModel, run: CleanRun) -> tuple[Tensor, list[Tensor]]:
    """h0 and MLP writes of the frozen model with every source zeroed (κ's state, §4): b_dec, and
    position 0's whole constant MLP output."""
    T = run.n_pos
    writes = []
    for l, w in enumerate(rm.clean_writes(run)):
        z = rm.transcoders[l].b_dec.detach().expand(T, -1).clone()
        z[0] = w[0]
        writes.append(z[None])
    return torch.zeros_like(run.h0)[None], writes


@dataclass(eq=False)
class _LayerState:
    """One layer's attention at the clean point: the model's query/key per query head [n_q, T, hd], the
    same with every source zeroed, the softmax input [n_q, T, T], which entries the mask allows, the
    scaling and the softcap; and the kept one-copy graph from layer l's input (a leaf) to q and k, from
    which the per-position Jacobians M are read (``jac``)."""

    q: Tensor
    k: Tensor
    q0: Tensor
    k0: Tensor
    scores: Tensor
    allowed: Tensor
    scaling: float
    softcap: float | None
    leaf: Tensor
    q_live: Tensor
    k_live: Tensor
    jac: dict[tuple[str, int], Tensor] = field(default_factory=dict)

    def jacobian(self, side: str, head: int) -> Tensor:
        """[T, hd, d]: ∂(query or key of ``head`` at t)/∂(layer input at t) for every t (a query or key
        at t depends on the layer input at t alone)."""
        key = (side, head)
        if key not in self.jac:
            out = self.q_live if side == "q" else self.k_live
            hd = out.shape[-1]
            rows = []
            for c in range(hd):  # the graph is one layer's prelude on one copy: hd cheap passes
                (g,) = torch.autograd.grad(out[head, :, c].sum(), self.leaf, retain_graph=True)
                rows.append(g[0])
            self.jac[key] = torch.stack(rows, dim=1).detach()
        return self.jac[key]


class QKAnalyzer:
    """QK attribution on one graph (use :func:`open_qk`): score decompositions, attention rows, head
    loadings of edges and the selection of the hops worth explaining."""

    def __init__(self, graph: AttributionGraph, rm: ReplacementModel, run: CleanRun, config: QKConfig) -> None:
        self.graph, self.rm, self.run, self.config = graph, rm, run, config
        self.n_layers = rm.n_layers
        self.n_q, self.n_kv, self.hd = rm.adapter.attention_shape(rm.model)
        self.n_pos = run.n_pos
        self.sources = _graph_sources(graph, rm, run)
        self._const = _constant_writes(rm, run)
        self._layers: dict[int, _LayerState] = {}

    # ---- checks -------------------------------------------------------------------------------
    def check_site(self, site: QKSite) -> None:
        """A one-line ConfigError naming the bad value and the allowed ones."""
        L, T = self.n_layers, self.n_pos
        if not 0 <= site.layer < L:
            raise ConfigError(f"layer {site.layer}; allowed: 0..{L - 1}")
        if not 0 <= site.head < self.n_q:
            raise ConfigError(f"head {site.head}; allowed: 0..{self.n_q - 1}")
        if not 0 <= site.query_pos < T:
            raise ConfigError(f"query position {site.query_pos}; allowed: 0..{T - 1} (the prompt has {T} tokens)")
        if not 0 <= site.key_pos < T:
            raise ConfigError(f"key position {site.key_pos}; allowed: 0..{T - 1} (the prompt has {T} tokens)")
        if site.key_pos > site.query_pos:
            raise ConfigError(
                f"key position {site.key_pos} is after query position {site.query_pos}; allowed: 0..{site.query_pos}"
            )
        allowed = self._layer(site.layer).allowed[site.head, site.query_pos].cpu().numpy()
        if not allowed[site.key_pos]:
            ok = np.flatnonzero(allowed)
            raise ConfigError(
                f"key position {site.key_pos} is masked for query {site.query_pos} in layer {site.layer} "
                f"(sliding window); allowed: {ok.min()}..{ok.max()}"
            )

    # ---- one layer's attention ------------------------------------------------------------------
    def _tap(self, layer: int, h0: Tensor, writes: list[Tensor], leaf: Tensor | None = None) -> AttentionTap:
        """A frozen forward with layer ``layer``'s Q/K live, stopped at its softmax; ``leaf`` replaces
        the layer's input (for Jacobians)."""
        rm = self.rm
        tap = AttentionTap(stop=True)
        extra = tap.specs(rm, layer)
        if leaf is not None:
            def feed(module, args, kwargs):
                return ((leaf,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": leaf})

            extra = [(rm.adapter.layers(rm.model)[layer], "pre", feed)] + extra
        try:
            with tap:
                rm.frozen(self.run, h0, writes, live_qk=layer, extra=extra)
        except _Stop:
            pass
        if tap.scores is None or tap.query is None:
            raise ModelError(f"could not read layer {layer}'s attention scores (no eager matmul/softmax seen)")
        return tap

    def _layer_input(self, layer: int) -> Tensor:
        box = {}

        def grab(module, args, kwargs):
            box["x"] = _hidden(args, kwargs).detach()
            raise _Stop

        writes = [w[None] for w in self.rm.clean_writes(self.run)]
        try:
            self.rm.frozen(self.run, self.run.h0[None], writes, extra=[(self.rm.adapter.layers(self.rm.model)[layer], "pre", grab)])
        except _Stop:
            pass
        return box["x"]

    def _layer(self, layer: int) -> _LayerState:
        if layer in self._layers:
            return self._layers[layer]
        run = self.run
        with torch.no_grad():
            zero = self._tap(layer, *self._const)
        leaf = self._layer_input(layer).clone().requires_grad_(True)
        with torch.enable_grad():
            tap = self._tap(layer, run.h0[None], [w[None] for w in self.rm.clean_writes(run)], leaf=leaf)
        att = self.rm.adapter.attention(self.rm.model, layer)
        scaling = float(getattr(att, "scaling", self.hd**-0.5))
        softcap = float(att.attn_logit_softcapping) if tap.capped else None
        q, k = tap.query[0], tap.key_t[0].transpose(-1, -2)  # [n_q, T, hd]
        scores = tap.scores[0].detach()
        allowed = scores > torch.finfo(scores.dtype).min / 2
        s = scaling * (q @ k.transpose(-1, -2)).detach()
        capped = s if softcap is None else softcap * torch.tanh(s / softcap)
        err = (capped - scores)[allowed].abs().max().item()
        tol = (1e-9 if s.dtype == torch.float64 else 1e-3) * max(1.0, s.abs().max().item())
        if err > tol:
            raise ModelError(
                f"layer {layer}'s attention scores are not scaling·q·k (softcap {softcap}); off by {err:.3g}: "
                "this attention is not supported by QK attribution"
            )
        st = _LayerState(
            q=q.detach(), k=k.detach(), q0=zero.query[0].detach(), k0=zero.key_t[0].transpose(-1, -2).detach(),
            scores=scores, allowed=allowed, scaling=scaling, softcap=softcap, leaf=leaf, q_live=q, k_live=k,
        )
        self._layers[layer] = st
        return st

    # ---- Jacobian rows from sources to a layer's input --------------------------------------------
    def _source_rows(self, layer: int, reads: list[tuple[int, Tensor]]) -> Tensor:
        """[len(reads), n_sources]: read b = (pos, vector) is vectorᵀ · (layer ``layer``'s input at pos);
        entry [b, s] is that read's linear response to source s's write (J v_s). Autograd through the
        frozen model, ``config.batch_size`` copies per forward, the forward kept for every chunk."""
        rm, run, S = self.rm, self.run, self.sources
        B = max(1, min(self.config.batch_size, len(reads)))
        T, d = run.n_pos, run.h0.shape[-1]
        out = run.h0.new_zeros(len(reads), len(S.node))
        box = {}

        def grab(module, args, kwargs):
            box["x"] = _hidden(args, kwargs)
            raise _Stop

        with torch.enable_grad():
            h0 = run.h0.expand(B, T, d).clone().requires_grad_(True)
            writes = [w.detach().expand(B, T, d).clone().requires_grad_(l < layer) for l, w in enumerate(rm.clean_writes(run))]
            try:
                rm.frozen(run, h0, writes, extra=[(rm.adapter.layers(rm.model)[layer], "pre", grab)])
            except _Stop:
                pass
            x = box["x"]
            leaves = [h0] + writes[:layer]
            for s0 in range(0, len(reads), B):
                chunk = reads[s0 : s0 + B]
                go = torch.zeros_like(x)
                for b, (c, v) in enumerate(chunk):
                    go[b, c] = v
                grads = torch.autograd.grad(x, leaves, go, retain_graph=s0 + B < len(reads), allow_unused=True)
                out[s0 : s0 + len(chunk)] = self._contract(grads, len(chunk), layer)
        return out

    def _contract(self, grads: Sequence[Tensor | None], n: int, layer: int) -> Tensor:
        S = self.sources
        out = S.vec.new_zeros(n, len(S.node))
        for l in range(-1, layer):
            g = grads[l + 1]
            m = np.flatnonzero(S.layer == l)
            if g is None or not len(m):
                continue
            mt = torch.as_tensor(m)
            out[:, mt] = torch.einsum("bkd,kd->bk", g[:n, torch.as_tensor(S.pos[m])], S.vec[mt])
        return out

    # ---- decompositions ---------------------------------------------------------------------------
    def decompose(self, sites: Sequence[QKSite]) -> list[QKDecomposition]:
        """The exact split of each site's pre-softcap score (module docstring), in the order given."""
        for s in sites:
            self.check_site(s)
        out: dict[int, QKDecomposition] = {}
        for layer in sorted({s.layer for s in sites}):
            mine = [(n, s) for n, s in enumerate(sites) if s.layer == layer]
            st = self._layer(layer)
            reads: list[tuple[int, Tensor]] = []
            where: dict[tuple[str, int, int], int] = {}
            for _, s in mine:
                for side, pos in (("q", s.query_pos), ("k", s.key_pos)):
                    key = (side, s.head if side == "q" else s.head // (self.n_q // self.n_kv), pos)
                    if key not in where:
                        where[key] = len(reads)
                        M = st.jacobian(side, s.head)[pos]  # [hd, d]
                        reads += [(pos, M[c]) for c in range(self.hd)]
            rows = self._source_rows(layer, reads)  # [n_reads, n_src]
            for n, s in mine:
                out[n] = self._assemble(s, st, rows, where)
        return [out[n] for n in range(len(sites))]

    def _assemble(self, s: QKSite, st: _LayerState, rows: Tensor, where: dict) -> QKDecomposition:
        grp = self.n_q // self.n_kv
        S = self.sources
        qa = where[("q", s.head, s.query_pos)]
        ka = where[("k", s.head // grp, s.key_pos)]
        qm = S.in_cone(s.layer, s.query_pos)
        km = S.in_cone(s.layer, s.key_pos)
        f64 = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
        return QKDecomposition(
            site=s,
            scaling=st.scaling,
            softcap=st.softcap,
            q_nodes=S.node[qm],
            Q=f64(rows[qa : qa + self.hd][:, torch.as_tensor(qm)].T),
            q_const=f64(st.q0[s.head, s.query_pos]),
            q_clean=f64(st.q[s.head, s.query_pos]),
            k_nodes=S.node[km],
            K=f64(rows[ka : ka + self.hd][:, torch.as_tensor(km)].T),
            k_const=f64(st.k0[s.head, s.key_pos]),
            k_clean=f64(st.k[s.head, s.key_pos]),
            model_score=float(st.scores[s.head, s.query_pos, s.key_pos]),
            pattern=float(self.run.patterns[s.layer, s.head, s.query_pos, s.key_pos]),
        )

    def attention_row(self, layer: int, head: int, query_pos: int) -> AttentionRow:
        """Decompositions of query ``query_pos`` against every key the mask allows."""
        self.check_site(QKSite(layer, head, query_pos, query_pos))
        allowed = self._layer(layer).allowed[head, query_pos].cpu().numpy()
        keys = np.flatnonzero(allowed[: query_pos + 1])
        decs = self.decompose([QKSite(layer, head, query_pos, int(j)) for j in keys])
        pat = self.run.patterns[layer, head, query_pos, torch.as_tensor(keys)].double().cpu().numpy()
        return AttentionRow(layer, head, query_pos, keys, pat, decs)


    # ---- heads: loadings of an edge, hops worth explaining -------------------------------------
    def _head_forward(self, writes_delta: Tensor | None, B: int) -> tuple:
        """A frozen forward of B copies (copy 1 gets ``writes_delta`` = (layer or −1, pos, vector) added
        when given) with a zero tensor Z_m [B, T, n_q·hd] added to every output projection's input (so
        its gradient is the gradient at each head's output) and every value projection's output
        captured [B, T, n_kv·hd]. Returns (FrozenOutput, Z list, V list)."""
        rm, run = self.rm, self.run
        T, d = run.n_pos, run.h0.shape[-1]
        h0 = run.h0.expand(B, T, d).clone()
        writes = [w.detach().expand(B, T, d).clone() for w in rm.clean_writes(run)]
        if writes_delta is not None:
            l, c, v = writes_delta
            (h0 if l < 0 else writes[l])[1, c] += v
        Z = [h0.new_zeros(B, T, self.n_q * self.hd, requires_grad=True) for _ in range(self.n_layers)]
        V: list[Tensor | None] = [None] * self.n_layers
        fused = rm.adapter.qk == "fused"
        specs = []
        for m in range(self.n_layers):
            att = rm.adapter.attention(rm.model, m)

            def add(module, args, kwargs, z=Z[m]):
                return (args[0] + z,) + tuple(args[1:]), kwargs

            def grab(module, args, output, m=m):
                V[m] = output[..., 2 * output.shape[-1] // 3 :] if fused else output

            specs += [(att.c_proj if fused else att.o_proj, "pre", add), (att.c_attn if fused else att.v_proj, "forward", grab)]
        with torch.enable_grad():
            out = rm.frozen(run, h0, writes, extra=specs)
        return out, Z, V

    def _heads(self, v: Tensor) -> Tensor:
        """[..., T, n_kv·hd] values → [..., n_q, T, hd], each query head with its group's value."""
        grp = self.n_q // self.n_kv
        x = v.reshape(*v.shape[:-1], self.n_kv, self.hd).movedim(-2, -3)
        return x.repeat_interleave(grp, dim=-3)

    def _target_read(self, node: int) -> tuple[int, int, Tensor, str]:
        """(layer or n_layers for a logit, position, read vector, label) of target node ``node``."""
        lay, g = self.graph.layout, self.graph
        kind = NodeKind(int(lay.kind[node]))
        if kind is NodeKind.FEATURE:
            l, f = int(lay.layer[node]), int(lay.feature[node])
            return l, int(lay.pos[node]), self.rm.transcoders[l].W_enc[f].detach(), "feature"
        if kind is NodeKind.LOGIT:
            tok = int(g.logit_token[node - lay.logits.start])
            if tok < 0:
                raise ConfigError(f"target {lay.node_id(node)} is a custom direction; head loadings need a feature or token logit")
            W_U = self.rm.unembedding().detach()
            return self.n_layers, self.n_pos - 1, W_U[tok] - W_U.mean(0), "logit"
        raise ConfigError(f"target {lay.node_id(node)} is a {kind.name.lower()} node; allowed: a feature or a logit")

    def _read(self, out, l: int, c: int, vec: Tensor) -> Tensor:
        """[B] the value read by ``vec`` at (l, c) of a frozen forward (l = n_layers: the final residual)."""
        x = out.final if l == self.n_layers else out.x[l]
        return x[:, c] @ vec

    def head_loadings(self, target: int, source: int) -> HeadLoadings:
        """How the cross-position edge A[target, source] splits over heads (:class:`HeadLoadings`):
        loading[m, h] = Σ_{c' ≠ c_t} p^{m,h}[c_t, c']·(g_m[c_t, h] · ΔV^{m,h}[c']), g_m the target's gradient
        at head h's output (position c_t), ΔV the source's exact change of the head's value at c'."""
        lay = self.graph.layout
        n = self.graph.n_nodes
        for name, i in (("target", target), ("source", source)):
            if not 0 <= i < n:
                raise ConfigError(f"{name} node {i}; allowed: 0..{n - 1}")
        lt, ct, vec, _ = self._target_read(target)
        hit = np.flatnonzero(self.sources.node == source)
        if not len(hit):
            raise ConfigError(f"source {lay.node_id(source)} is a {NodeKind(int(lay.kind[source])).name.lower()} node; allowed: a feature, error or token")
        k = int(hit[0])
        ls, cs = int(self.sources.layer[k]), int(self.sources.pos[k])
        if ls >= lt or cs > ct:
            raise ConfigError(f"{lay.node_id(source)} cannot feed {lay.node_id(target)} (it must sit at a lower layer and a position ≤ the target's)")
        if cs == ct:
            raise ConfigError(
                f"{lay.node_id(source)} → {lay.node_id(target)} stays at position {ct}; head loadings are for cross-position edges"
            )
        out, Z, V = self._head_forward((ls, cs, self.sources.vec[k]), B=2)
        with torch.enable_grad():
            val = self._read(out, lt, ct, vec.to(out.final.dtype))
            grads = torch.autograd.grad(val[0], Z[: lt + 1], allow_unused=True)  # x̃_l reads layer l's attention too
        load = np.zeros((self.n_layers, self.n_q))
        for m, g in enumerate(grads):
            if g is None:
                continue
            gm = g[0, ct].view(self.n_q, self.hd)  # [n_q, hd]
            dv = self._heads((V[m][1] - V[m][0]).detach())  # [n_q, T, hd]
            p = self.run.patterns[m][:, ct].clone()  # [n_q, T] the pattern row of the target's position
            p[:, ct] = 0  # a hop changes position
            load[m] = torch.einsum("ht,htd,hd->h", p.to(dv.dtype), dv, gm).double().cpu().numpy()
        edge = float((val[1] - val[0]).item())
        cols, vals = self.graph.adjacency.row(target)
        at = np.flatnonzero(cols == source)
        return HeadLoadings(target, source, load, edge, float(vals[at[0]]) if len(at) else None)

    def select_hops(self, n_hops: int | None = None, *, layer: int | None = None, head: int | None = None,
                    query_pos: int | None = None, key_pos: int | None = None) -> list[Hop]:
        """The ``n_hops`` (default ``config.n_hops``) attention hops (query i ← key j < i, j ≥
        ``config.min_key_pos``) with the largest weight Σ_k w_k·|p_ij·(g_k · V_j)| (:class:`Hop`), among
        those matching the given layer/head/positions."""
        n_hops = self.config.n_hops if n_hops is None else n_hops
        if n_hops < 1:
            raise ConfigError(f"n_hops={n_hops}; allowed: ≥ 1")
        g = self.graph
        lay = g.layout
        logits = [i for i in range(lay.n_logits) if int(g.logit_token[i]) >= 0]
        if not logits:
            raise GraphError("the graph has no token logit targets to rank hops by")
        W_U = self.rm.unembedding().detach()
        vecs = torch.stack([W_U[int(g.logit_token[i])] - W_U.mean(0) for i in logits])
        w = torch.as_tensor(g.logit_probability[logits], dtype=vecs.dtype)
        T = self.n_pos
        weight = np.zeros((self.n_layers, self.n_q, T, T))
        out, Z, V = self._head_forward(None, B=len(logits))
        with torch.enable_grad():
            val = (out.final[:, T - 1] * vecs.to(out.final.dtype)).sum()
            grads = torch.autograd.grad(val, Z, allow_unused=True)
        i_, j_ = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
        ok = (j_ < i_) & (j_ >= self.config.min_key_pos)
        for m, gr in enumerate(grads):
            if gr is None:
                continue
            G = gr.detach().view(len(logits), T, self.n_q, self.hd)
            Vh = self._heads(V[m][0].detach())  # [n_q, T, hd]
            c = torch.einsum("kihd,hjd->khij", G, Vh) * self.run.patterns[m][None].to(G.dtype)
            weight[m] = torch.einsum("k,khij->hij", w.to(c.dtype), c.abs()).double().cpu().numpy()
        for name, val_, size in (("layer", layer, self.n_layers), ("head", head, self.n_q), ("query position", query_pos, T),
                                 ("key position", key_pos, T)):
            if val_ is not None and not 0 <= val_ < size:
                raise ConfigError(f"{name} {val_}; allowed: 0..{size - 1}")
        mask = np.broadcast_to(ok, weight.shape).copy()
        if layer is not None:
            mask[np.arange(self.n_layers) != layer] = False
        if head is not None:
            mask[:, np.arange(self.n_q) != head] = False
        if query_pos is not None:
            mask[:, :, np.arange(T) != query_pos] = False
        if key_pos is not None:
            mask[:, :, :, np.arange(T) != key_pos] = False
        cand = np.flatnonzero(mask & (weight > 0))
        if not len(cand):
            raise ConfigError("no attention hop matches (a hop needs a key before its query, at position ≥ "
                              f"{self.config.min_key_pos})")
        best = cand[np.argsort(-weight.ravel()[cand], kind="stable")[:n_hops]]
        out_hops = []
        for b in best:
            m, h, i, j = (int(x) for x in np.unravel_index(b, weight.shape))
            out_hops.append(Hop(QKSite(m, h, i, j), float(weight.ravel()[b]), float(self.run.patterns[m, h, i, j])))
        return out_hops


@contextlib.contextmanager
def open_qk(graph: AttributionGraph, lm: LoadedModel, ts: TranscoderSet, config: QKConfig | None = None) -> Iterator[QKAnalyzer]:
    """A :class:`QKAnalyzer` for ``graph`` traced with ``lm`` and ``ts``: runs in the graph's dtype (restored
    after), refuses graphs with supernodes or made with another model or set."""
    if np.any(graph.layout.feature[graph.layout.features] < 0):
        raise GraphError("graph has supernodes (grouped features); QK attribution needs the ungrouped graph")
    with _graph_dtype(graph, lm, ts):
        run = _check_graph(graph, lm, ts)
        yield QKAnalyzer(graph, ReplacementModel(lm, ts), run, config or QKConfig())
