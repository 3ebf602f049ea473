"""A hand-written backward through the frozen model (DESIGN.md §4, "a smarter engine").

With attention patterns and norm denominators frozen and the MLPs cut, the frozen model is linear and
its transpose only involves: diagonal norm scales (LayerNorm: plus the centring projection), the value
and output projections with the frozen pattern, and each transcoder's skip. Q/K and the MLPs carry no
gradient, so none of that is computed. Two more savings over autograd:
  * a batch whose reads sit at layers ≤ l_max starts there: layers above contribute nothing;
  * a batch whose reads sit at positions ≤ c_max only needs positions ≤ c_max (causal attention);
  * at a pass's first layer every row's gradient sits at its read position alone, so the value and
    output projections run at that one position and the pattern only spreads the result over the keys
    (:meth:`LinearBackward._attention_transpose_one`).
Parity with the autograd engine is tested on every architecture (tests/test_tracer_linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .models import NormKind, norm_kind
from .replacement import CleanRun, ReplacementModel

__all__ = ["LinearBackward"]


@dataclass(eq=False)
class _Norm:
    """Frozen norm as a linear map: y = scale ⊙ x (LayerNorm: scale ⊙ centre(x)); scale [T, d]."""

    scale: Tensor
    centre: bool

    def transpose(self, g: Tensor) -> Tensor:
        """gᵀ·∂y/∂x for g [B, T', d] (T' ≤ T)."""
        out = g * self.scale[: g.shape[1]]
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
    W_V_heads: Tensor  # [n_q, hd, d] each query head's value projection (GQA: its group's, repeated)


class LinearBackward:
    """Batched transposed frozen model for one prompt. ``backward(reads)`` returns the same gradients as
    autograd through :meth:`ReplacementModel.frozen` (at every MLP write and at the layer-0 input)."""

    def __init__(self, rm: ReplacementModel, run: CleanRun) -> None:
        ad, model = rm.adapter, rm.model
        self.n_layers = rm.n_layers
        self.T = run.n_pos
        self.n_q, self.n_kv, self.hd = ad.attention_shape(model)
        self.layers = []
        for i in range(self.n_layers):
            norms = {k: (None if m is None else self._norm(m, run)) for k, m in ad.layer_norms(model, i).items()}
            W_V, W_O = ad.value_output_weights(model, i)
            tc = rm.transcoders[i]
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
                    W_V_heads=W_V.detach().view(self.n_kv, self.hd, -1).repeat_interleave(self.n_q // self.n_kv, 0),
                )
            )
        self.final_norm = self._norm(ad.final_norm(model), run)
        self.passes = 0
        self.flops = 0
        """Multiply-add FLOPs (2 per MAC) of the matmuls run so far (elementwise norm scales not counted)."""

    def _norm(self, module, run: CleanRun) -> _Norm:
        kind = norm_kind(module)
        r = run.norm_state[id(module)][0].reshape(self.T, 1)  # [T, 1]
        w = module.weight.detach()
        w = (1.0 + w) if kind == NormKind.RMS_OFFSET else w
        return _Norm(scale=(r * w).to(run.h0.dtype), centre=kind == NormKind.LAYER)

    def _attention_transpose(self, layer: _Layer, g: Tensor) -> Tensor:
        """gᵀ through out = concat_h(P_h · V_{kv(h)}) W_Oᵀ, V = x W_Vᵀ; g [B, T', d] → [B, T', d]."""
        B, Tp, _ = g.shape
        nq, nkv, hd = self.n_q, self.n_kv, self.hd
        # heads as the bmm batch and (B, hd) as columns: nq matmuls of (T'×T')·(T'×B·hd), far fewer and
        # larger than B·nq tiny ones
        g_o = (g @ layer.W_O).view(B, Tp, nq, hd).permute(2, 1, 0, 3).reshape(nq, Tp, B * hd)
        g_v = _causal_transpose_product(layer.pattern_t, g_o, Tp).view(nq, Tp, B, hd)  # (nq, T', B, hd)
        if nkv != nq:  # grouped-query attention: query heads share a value head
            g_v = g_v.view(nkv, nq // nkv, Tp, B, hd).sum(1)
        g_v = g_v.permute(2, 1, 0, 3).reshape(B, Tp, nkv * hd)
        return g_v @ layer.W_V

    def _attention_transpose_one(self, layer: _Layer, v: Tensor, c: Tensor, Tp: int) -> Tensor:
        """:meth:`_attention_transpose` of a g that is nonzero at one position per row, g[b] = e_{c_b}⊗v[b]
        (v [B, d], c [B]): the first layer of every pass. Pᵀ then spreads each head's part over the keys
        as an outer product, so the value projection is applied once per head before the spread:
        2·B·(d·q + q·d + T'·n_q·d) FLOPs instead of 2·B·T'·(d·q + kv·d) (q = n_q·hd, kv = n_kv·hd)."""
        B = v.shape[0]
        g_o = (v @ layer.W_O).view(B, self.n_q, self.hd).transpose(0, 1)  # (nq, B, hd)
        u = torch.bmm(g_o, layer.W_V_heads)  # (nq, B, d): each head's value-side write of row b
        coef = layer.pattern_t[:, :Tp, c].permute(2, 1, 0)  # (B, T', nq): P[h, c_b, s]
        return torch.bmm(coef, u.transpose(0, 1))  # (B, T', d)

    def backward(self, reads: list[tuple[int, int, Tensor]]) -> tuple[Tensor, Tensor]:
        """``reads[b] = (layer, pos, vector)``: row b reads ``vector`` at the MLP input x̃ of ``layer``
        (``layer == n_layers``: the final normed residual) at ``pos``. Returns the write gradients
        [L', B, T, d] of layers 0..L'−1 (no write at a layer ≥ L' = min(highest read layer, L) reaches a
        read) and the layer-0 input gradient [B, T, d]."""
        B, T, d = len(reads), self.T, reads[0][2].shape[-1]
        Lp = min(max(l for l, _, _ in reads), self.n_layers)
        grads = torch.zeros(Lp, B, T, d, dtype=self.final_norm.scale.dtype, device=reads[0][2].device)

        def put(l: int, g: Tensor) -> None:
            grads[l, :, : g.shape[1]] = g

        return grads, self.backward_into(reads, put)

    def backward_into(self, reads: list[tuple[int, int, Tensor]], sink: Callable[[int, Tensor], None]) -> Tensor:
        """:meth:`backward` without holding every layer: ``sink(l, g)`` gets layer l's write gradient
        g [B, T', d] (T' = highest read position + 1; later positions have none) as the pass reaches
        it, top layer first. Returns the layer-0 input gradient [B, T, d]."""
        L = self.n_layers
        B = len(reads)
        self.passes += 1
        dev_vec = reads[0][2]
        d = dev_vec.shape[-1]
        l_max = max(l for l, _, _ in reads)
        Tp = max(c for _, c, _ in reads) + 1
        dtype = self.final_norm.scale.dtype
        inject: dict[int, Tensor] = {}
        for b, (l, c, v) in enumerate(reads):
            if l not in inject:
                inject[l] = torch.zeros(B, Tp, d, dtype=dtype, device=dev_vec.device)
            inject[l][b, c] = v.detach().to(dtype)
        g = torch.zeros(B, Tp, d, dtype=dtype, device=dev_vec.device)
        if L in inject:
            g = g + self.final_norm.transpose(inject[L])
        # at the first layer every row's gradient is still at its read position only
        read_pos = torch.tensor([c for _, c, _ in reads], device=dev_vec.device)
        rows = torch.arange(B, device=dev_vec.device)
        first = min(l_max, L - 1)
        # reads at layer l see x̃_l, which no write at a layer ≥ l reaches: start at the highest read
        for l in range(first, -1, -1):
            lay = self.layers[l]
            g_x = inject.get(l)
            if l < l_max:
                # residual after layer l: h' = h_mid + post_mlp(write + x̃ W_skipᵀ)
                g_write = lay.post_mlp.transpose(g) if lay.post_mlp is not None else g
                sink(l, g_write)
                if lay.W_skip is not None:
                    g_skip = g_write @ lay.W_skip
                    g_x = g_skip if g_x is None else g_x + g_skip
            g_mid = g if g_x is None else g + lay.mlp_norm.transpose(g_x)
            # h_mid = h + post_attn(attention(attn_norm(h)))
            g_att = lay.post_attn.transpose(g_mid) if lay.post_attn is not None else g_mid
            if l == first:
                att = self._attention_transpose_one(lay, g_att[rows, read_pos], read_pos, Tp)
            else:
                att = self._attention_transpose(lay, g_att)
            g = g_mid + lay.attn_norm.transpose(att)
            self.flops += self._layer_flops(B, Tp, skip=l < l_max and lay.W_skip is not None, one=l == first)
        return _pad(g, self.T)

    def _layer_flops(self, B: int, Tp: int, skip: bool, one: bool = False) -> int:
        d, q, v = self.final_norm.scale.shape[-1], self.n_q * self.hd, self.n_kv * self.hd
        skip_flops = 2 * B * Tp * d * d if skip else 0
        if one:  # _attention_transpose_one: W_O and W_V at one position, then the spread over T' keys
            return 2 * B * (d * q + q * d + Tp * self.n_q * d) + skip_flops
        # W_O, frozen pattern (the key blocks _causal_transpose_product multiplies), W_V, skip
        return 2 * B * Tp * (d * q + v * d) + skip_flops + 2 * self.n_q * B * self.hd * _pattern_macs(Tp)


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


def _pad(x: Tensor, T: int) -> Tensor:
    """[B, T', d] → [B, T, d] with zeros at positions ≥ T' (they get no gradient: causal attention)."""
    if x.shape[1] == T:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], T - x.shape[1], x.shape[2])], dim=1)
