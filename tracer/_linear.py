"""A hand-written backward through the frozen model (docs/design.md §4).

With attention patterns and norm denominators frozen and the MLPs cut, the frozen model is linear and
its transpose only involves: diagonal norm scales (LayerNorm: plus the centring projection), the value
and output projections with the frozen pattern, and each transcoder's skip. Q/K and the MLPs carry no
gradient, so none of that is computed. More savings over autograd:
  * each row joins a pass at its own layer: rows are sorted by layer, highest first, so the rows with a
    gradient at a layer are a prefix of the batch and a batch spanning layers does no work on zeros;
  * a batch whose reads sit at positions ≤ c_max only needs positions ≤ c_max (causal attention);
  * at a row's first layer its gradient sits at its read position alone, so the value and output
    projections run at that one position and the pattern only spreads the result over the keys
    (:meth:`LinearBackward._attention_transpose_one`);
  * position 0 (the attention sink, whose features and errors are constants) can be left out of every
    pass: its one source, the first token, gets its edge from the key-0 terms of each attention and a
    precomputed position-0 recurrence (:meth:`LinearBackward._position0_values`).
Parity with the autograd engine is tested on every architecture (tests/test_tracer_linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..models.loading import NormKind, norm_kind
from .replacement import CleanRun, ReplacementModel

__all__ = ["LinearBackward"]


@dataclass(eq=False)
class _Norm:
    """Frozen norm as a linear map: y = scale ⊙ x (LayerNorm: scale ⊙ centre(x)); scale [T, d] = r ⊗ w,
    r [T] the frozen denominators, w [d] the weight (Gemma: 1 + weight)."""

    scale: Tensor
    centre: bool
    r: Tensor
    w: Tensor

    def fold_into(self, W: Tensor) -> Tensor:
        """W [k, d] with the transpose's weight (and centring) folded into its columns: for rows g [k],
        transpose(g W) at position t = r[t] · (g · fold_into(W))."""
        Wf = W * self.w
        return Wf - Wf.mean(-1, keepdim=True) if self.centre else Wf

    def transpose(self, g: Tensor, p0: int = 0) -> Tensor:
        """gᵀ·∂y/∂x for g [B, T', d] at positions p0 … p0 + T' − 1."""
        out = g * self.scale[p0 : p0 + g.shape[1]]
        return out - out.mean(-1, keepdim=True) if self.centre else out

    def forward_at(self, x: Tensor, pos: int) -> Tensor:
        """y for one vector x [d] at position ``pos``."""
        xc = x - x.mean(-1, keepdim=True) if self.centre else x
        return xc * self.scale[pos]

    def transpose_at(self, v: Tensor, pos: Tensor) -> Tensor:
        """The same for vectors v [n, d] that sit at positions ``pos`` [n]."""
        out = v * self.scale[pos]
        return out - out.mean(-1, keepdim=True) if self.centre else out


@dataclass(eq=False)
class _Layer:
    attn_norm: _Norm
    mlp_norm: _Norm
    post_attn: _Norm | None
    post_mlp: _Norm | None
    W_V: Tensor  # [n_kv·hd, d]
    W_O: Tensor  # [d, n_q·hd]
    W_skip: Tensor | None  # [d, d] (y = x̃ W_skipᵀ)
    pattern_t: Tensor  # [n_q, T, T] the frozen pattern transposed (a view): P_t[h, key, query]
    W_V_in: Tensor  # [n_kv·hd, d] W_V with attn_norm's transpose folded in (its r[key] is applied apart)
    W_V_heads_in: Tensor  # [n_q, hd, d] the same per query head (GQA: its group's, repeated)


class LinearBackward:
    """Batched transposed frozen model for one prompt. ``backward(reads)`` returns the same gradients as
    autograd through :meth:`ReplacementModel.frozen` (at every MLP write and at the layer-0 input)."""

    def __init__(self, rm: ReplacementModel, run: CleanRun, skip_position0: bool = False) -> None:
        ad, model = rm.adapter, rm.model
        self.n_layers = rm.n_layers
        self.T = run.n_pos
        self.n_q, self.n_kv, self.hd = ad.attention_shape(model)
        self.layers = []
        for i in range(self.n_layers):
            norms = {k: (None if m is None else self._norm(m, run)) for k, m in ad.layer_norms(model, i).items()}
            W_V, W_O = ad.value_output_weights(model, i)
            tc = rm.transcoders[i]
            grp = self.n_q // self.n_kv
            W_V_in = norms["attn"].fold_into(W_V.detach())
            self.layers.append(
                _Layer(
                    attn_norm=norms["attn"],
                    mlp_norm=norms["mlp"],
                    post_attn=norms["post_attn"],
                    post_mlp=norms["post_mlp"],
                    W_V=W_V.detach(),
                    W_O=W_O.detach(),
                    W_skip=None if tc.W_skip is None else tc.W_skip.detach(),
                    pattern_t=run.patterns[i].transpose(1, 2),  # a view: BLAS reads it transposed, no copy
                    W_V_in=W_V_in,
                    W_V_heads_in=W_V_in.view(self.n_kv, self.hd, -1).repeat_interleave(grp, 0),
                )
            )
        self.final_norm = self._norm(ad.final_norm(model), run)
        self.p0 = 1 if skip_position0 else 0
        """First position carried by the passes. 1: position 0 (whose features and errors are constants,
        not sources) is left out of every pass; its one source, the first token, gets its gradient from
        the key-0 terms of each attention (:meth:`_position0_values`)."""
        self.v0 = self._position0_values(run) if skip_position0 else None
        self.last_token0: Tensor | None = None
        """After :meth:`backward` with position 0 skipped: the first token's edge of each read [B]."""
        self.passes = 0
        self.flops = 0
        """Multiply-add FLOPs (2 per MAC) of the matmuls run so far (elementwise norm scales not counted)."""

    def _norm(self, module, run: CleanRun) -> _Norm:
        kind = norm_kind(module)
        r = run.norm_state[id(module)][0].reshape(self.T, 1)  # [T, 1]
        w = module.weight.detach()
        w = ((1.0 + w) if kind == NormKind.RMS_OFFSET else w).to(run.h0.dtype)
        r = r.to(run.h0.dtype)
        return _Norm(scale=r * w, centre=kind == NormKind.LAYER, r=r[:, 0], w=w)

    def _position0_values(self, run: CleanRun) -> list[Tensor]:
        """Per layer, each query head's value vector at key 0 [n_q, hd] as a linear function of the
        first token's embedding alone: position 0 attends only to itself, so the frozen model's
        linear part there is one closed recurrence (attention with its pattern weight, skip, norms).
        The first token's edge from a row is then Σ_layers Σ_h Σ_q P_h[q, 0]·(g_o[q, h] · v0_h)."""
        r = run.h0[0].to(self.final_norm.scale.dtype)
        grp = self.n_q // self.n_kv
        out = []
        for i, lay in enumerate(self.layers):
            # (nq, hd): each query head's value (GQA: its group's)
            vh = (lay.W_V @ lay.attn_norm.forward_at(r, 0)).view(self.n_kv, self.hd).repeat_interleave(grp, 0)
            out.append(vh)
            att = lay.W_O @ (vh * run.patterns[i][:, 0, 0, None].to(vh.dtype)).reshape(-1)
            r = r + (lay.post_attn.forward_at(att, 0) if lay.post_attn is not None else att)
            if lay.W_skip is not None:
                w = lay.W_skip @ lay.mlp_norm.forward_at(r, 0)
                r = r + (lay.post_mlp.forward_at(w, 0) if lay.post_mlp is not None else w)
        return out

    def _attention_transpose(self, layer: _Layer, g: Tensor, acc: Tensor, p0: int = 0, tok0: Tensor | None = None,
                             v0: Tensor | None = None) -> None:
        """acc += attn_normᵀ(gᵀ through out = concat_h(P_h · V_{kv(h)}) W_Oᵀ, V = x W_Vᵀ); g, acc [B, T', d]
        at positions p0 … p0 + T' − 1. With p0 = 1, key 0's share goes to ``tok0`` [B] (through ``v0``).

        attn_norm's weight (and centring) is folded into W_V (``W_V_in``) and its per-key r into the
        pattern, so the last product accumulates straight into ``acc``: no elementwise pass over [B, T', d]."""
        B, Tp, _ = g.shape
        nq, nkv, hd = self.n_q, self.n_kv, self.hd
        grp = nq // nkv
        # heads as the bmm batch and (B, hd) as columns: nq matmuls of (T'×T')·(T'×B·hd), far fewer and
        # larger than B·nq tiny ones
        g_o = (g @ layer.W_O).view(B, Tp, nq, hd).permute(2, 1, 0, 3).reshape(nq, Tp, B * hd)
        if p0:  # u_h = Σ_q P_h[q, 0] g_o[q, h]; the first token's edge gets u_h · v0_h
            u = torch.bmm(layer.pattern_t[:, :1, p0 : p0 + Tp], g_o).view(nq, B, hd)
            tok0 += (u * v0[:, None, :]).sum((0, 2))
        r = layer.attn_norm.r[p0 : p0 + Tp]
        if Tp <= CAUSAL_BLOCK:
            # one product per value head: its query heads' patterns side by side (keys scaled by r) times
            # their g_o stacked (a view), so grouped-query attention needs no sum over the group
            P_s = layer.pattern_t[:, p0 : p0 + Tp, p0 : p0 + Tp] * r[None, :, None]  # (nq, key, query)
            P_cat = P_s.view(nkv, grp, Tp, Tp).transpose(1, 2).reshape(nkv, Tp, grp * Tp)
            g_v = torch.bmm(P_cat, g_o.reshape(nkv, grp * Tp, B * hd)).view(nkv, Tp, B, hd)  # a view unless B = 1
            g_v = g_v.permute(2, 1, 0, 3).reshape(B * Tp, nkv * hd)
        else:
            g_v = _causal_transpose_product(layer.pattern_t[:, p0:, p0:], g_o, Tp).view(nq, Tp, B, hd)
            if nkv != nq:  # grouped-query attention: query heads share a value head
                g_v = g_v.view(nkv, grp, Tp, B, hd).sum(1)
            # the per-key r applied while laying the result out by rows
            g_v = (g_v.permute(2, 1, 0, 3) * r[None, :, None, None]).reshape(B * Tp, nkv * hd)
        acc2 = acc.view(B * Tp, -1)
        torch.addmm(acc2, g_v, layer.W_V_in, out=acc2)  # (out=, not addmm_: the profiler counts its FLOPs)

    def _attention_transpose_one(self, layer: _Layer, v: Tensor, c: Tensor, acc: Tensor, p0: int = 0,
                                 tok0: Tensor | None = None, v0: Tensor | None = None) -> None:
        """:meth:`_attention_transpose` of a g that is nonzero at one position per row, g[b] = e_{c_b}⊗v[b]
        (v [B, d], c [B]): a row's first layer. Pᵀ then spreads each head's part over the keys as an
        outer product, so the value projection is applied once per head before the spread:
        2·B·(d·q + q·d + T'·n_q·d) FLOPs instead of 2·B·T'·(d·q + kv·d) (q = n_q·hd, kv = n_kv·hd).
        acc [B, T', d] (keys p0 … p0 + T' − 1) gets the result; with p0 = 1, key 0's share goes to ``tok0``."""
        B, Tp = v.shape[0], p0 + acc.shape[1]
        g_o = (v @ layer.W_O).view(B, self.n_q, self.hd).transpose(0, 1)  # (nq, B, hd)
        u = torch.bmm(g_o, layer.W_V_heads_in)  # (nq, B, d): each head's value-side write of row b
        if p0:
            tok0 += (layer.pattern_t[:, 0, c] * (g_o * v0[:, None, :]).sum(-1)).sum(0)
        # (B, T' − p0, nq): P[h, c_b, s]·r[s]
        coef = (layer.pattern_t[:, p0:Tp, c] * layer.attn_norm.r[p0:Tp, None]).permute(2, 1, 0)
        torch.baddbmm(acc, coef, u.transpose(0, 1), out=acc)

    def backward(self, reads: list[tuple[int, int, Tensor]]) -> tuple[Tensor, Tensor]:
        """``reads[b] = (layer, pos, vector)``: row b reads ``vector`` at the MLP input x̃ of ``layer``
        (``layer == n_layers``: the final normed residual) at ``pos``, in any order. Returns the write
        gradients [L', B, T, d] of layers 0..L'−1 (no write at a layer ≥ L' = min(highest read layer, L)
        reaches a read) and the layer-0 input gradient [B, T, d] (with position 0 skipped, its rows
        are zero and the first token's edges are in :attr:`last_token0`)."""
        B, T, d = len(reads), self.T, reads[0][2].shape[-1]
        Lp = min(max(l for l, _, _ in reads), self.n_layers)
        grads = torch.zeros(Lp, B, T, d, dtype=self.final_norm.scale.dtype, device=reads[0][2].device)
        order = sorted(range(B), key=lambda b: -reads[b][0])  # backward_into takes layers descending
        where = torch.tensor(order, device=grads.device)
        p0 = self.p0

        def put(l: int, g: Tensor) -> None:
            grads[l, where[: g.shape[0]], p0 : p0 + g.shape[1]] = g

        g_emb, tok0 = self.backward_into([reads[b] for b in order], put)
        out = torch.zeros(B, T, d, dtype=g_emb.dtype, device=g_emb.device)
        out[where, p0 : p0 + g_emb.shape[1]] = g_emb
        self.last_token0 = None
        if tok0 is not None:
            self.last_token0 = torch.empty_like(tok0)
            self.last_token0[where] = tok0
        return grads, out

    def backward_into(self, reads: list[tuple[int, int, Tensor]],
                      sink: Callable[[int, Tensor], None]) -> tuple[Tensor, Tensor | None]:
        """:meth:`backward` for reads sorted by layer descending, without holding every layer:
        ``sink(l, g)`` gets layer l's write gradient g [n, T' − p0, d] at positions p0 … T' − 1 for the
        first n rows, those reading above layer l (the others have none there), with T' = highest read
        position + 1 (later positions have none), as the pass reaches it, top layer first; g is only
        valid during the call. Returns the layer-0 input gradient [B, T' − p0, d] at positions p0 … T' − 1
        and, with position 0 skipped, the first token's edge [B] (else None).

        Rows join the pass at their own layer (sorted, the rows at or above a layer are a prefix of the
        batch), so a batch that spans layers does no work on rows that are still zero; a row's first
        layer runs the one-position attention transpose."""
        L, p0 = self.n_layers, self.p0
        B = len(reads)
        layer = [min(l, L) for l, _, _ in reads]
        if any(a < b for a, b in zip(layer, layer[1:])):
            raise ValueError("backward_into takes reads sorted by layer, highest first")
        if p0 and min(c for _, c, _ in reads) < p0:
            raise ValueError("a read at position 0, but this engine skips position 0")
        self.passes += 1
        dev = reads[0][2].device
        d = reads[0][2].shape[-1]
        Tp = max(c for _, c, _ in reads) + 1
        P = Tp - p0  # positions carried
        dtype = self.final_norm.scale.dtype
        pos = torch.tensor([c for _, c, _ in reads], device=dev)
        at = pos - p0  # index into the carried positions
        vec = torch.stack([v.detach().to(dtype) for _, _, v in reads])  # [B, d]
        g = torch.zeros(B, P, d, dtype=dtype, device=dev)
        tok0 = torch.zeros(B, dtype=dtype, device=dev) if p0 else None
        n_logit = sum(1 for l in layer if l == L)
        if n_logit:
            g[torch.arange(n_logit, device=dev), at[:n_logit]] = self.final_norm.transpose_at(vec[:n_logit], pos[:n_logit])

        def above(l: int) -> int:  # rows reading at a layer > l: a prefix
            return sum(1 for x in layer if x > l)

        # reads at layer l see x̃_l, which no write at a layer ≥ l reaches: start at the highest read
        for l in range(min(layer[0], L - 1), -1, -1):
            lay = self.layers[l]
            v0 = self.v0[l] if p0 else None
            n_w = above(l)  # rows with a gradient at layer l's output (their reads are above it)
            n = above(l - 1)  # … and those that join here (reads at l): all rows with a gradient below
            # rows that join here, and logit rows at the top layer, still sit at their read position alone
            n_spread = n_w if l < L - 1 else 0
            if n_w:
                # residual after layer l: h' = h_mid + post_mlp(write + x̃ W_skipᵀ)
                g_write = lay.post_mlp.transpose(g[:n_w], p0) if lay.post_mlp is not None else g[:n_w]
                sink(l, g_write)
                if lay.W_skip is not None:
                    g[:n_w] += lay.mlp_norm.transpose(g_write @ lay.W_skip, p0)
            if n > n_w:  # this layer's reads
                g[torch.arange(n_w, n, device=dev), at[n_w:n]] += lay.mlp_norm.transpose_at(vec[n_w:n], pos[n_w:n])
            # h_mid = h + post_attn(attention(attn_norm(h))): the attention's share accumulates into g
            g_att = lay.post_attn.transpose(g[:n], p0) if lay.post_attn is not None else g[:n]
            if n > n_spread:
                fresh = torch.arange(n_spread, n, device=dev)
                self._attention_transpose_one(lay, g_att[fresh, at[n_spread:n]], pos[n_spread:n], g[n_spread:n], p0,
                                              None if tok0 is None else tok0[n_spread:n], v0)
            if n_spread:
                self._attention_transpose(lay, g_att[:n_spread], g[:n_spread], p0,
                                          None if tok0 is None else tok0[:n_spread], v0)
            self.flops += self._layer_flops(n_spread, P, skip=False) + self._layer_flops(n - n_spread, Tp, skip=False, one=True)
            if n_w and lay.W_skip is not None:
                self.flops += 2 * n_w * P * d * d
        return g, tok0

    def _layer_flops(self, B: int, Tp: int, skip: bool, one: bool = False) -> int:
        """``Tp``: positions carried (``one``: the highest read position + 1)."""
        d, q, v = self.final_norm.scale.shape[-1], self.n_q * self.hd, self.n_kv * self.hd
        skip_flops = 2 * B * Tp * d * d if skip else 0
        if one:  # _attention_transpose_one: W_O and W_V at one position, then the spread over the keys
            return 2 * B * (d * q + q * d + (Tp - self.p0) * self.n_q * d) + skip_flops
        # W_O, frozen pattern (the key blocks _causal_transpose_product multiplies; key 0's row), W_V, skip
        return (2 * B * Tp * (d * q + v * d) + skip_flops
                + 2 * self.n_q * B * self.hd * (_pattern_macs(Tp) + (Tp if self.p0 else 0)))


CAUSAL_BLOCK = 256
"""Key positions per block of the transposed pattern product; prompts up to this length use one block."""


def _pattern_macs(Tp: int) -> int:
    """(key, query) pairs :func:`_causal_transpose_product` multiplies per head and column."""
    return sum(min(CAUSAL_BLOCK, Tp - j0) * (Tp - j0) for j0 in range(0, Tp, CAUSAL_BLOCK))


def _causal_transpose_product(P_t: Tensor, g: Tensor, Tp: int) -> Tensor:
    """Pᵀ·g for causal patterns, P_t = Pᵀ [nq, T, T] (zero where key > query), g [nq, T', C] → [nq, T', C].

    Key block [j0, j1) only receives from queries ≥ j0, so the zero upper part of Pᵀ is skipped block by
    block: about half the multiply-adds of one dense (T'×T')·(T'×C) product for long prompts."""
    out = g.new_empty(g.shape)
    for j0 in range(0, Tp, CAUSAL_BLOCK):  # one block (a plain product) up to CAUSAL_BLOCK positions
        j1 = min(j0 + CAUSAL_BLOCK, Tp)
        torch.bmm(P_t[:, j0:j1, j0:Tp], g[:, j0:Tp], out=out[:, j0:j1])
    return out
