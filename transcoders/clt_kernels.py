"""The sparse decoder of a TopK cross-layer transcoder, and its plain reference (docs/design.md §14).

Source layer s's decoder W_s [F, L − s, d] is read as [F, (L − s)·d]: one row per feature holding its
writes to every target layer. With the top-k ids ``idx [L, N, k]`` and values ``acts [L, N, k]``:

- forward   ŷ[t, n]     = Σ_{s ≤ t} Σ_j acts[s,n,j] · W_s[idx[s,n,j], t − s]       (one ``embedding_bag`` per source)
- ∂acts     ∂a[s,n,j]   = Σ_{t ≥ s} ∂ŷ[t,n] · W_s[idx[s,n,j], t − s]           (a sampled product per source)
- ∂W_s      only the rows of features active in the batch: for each active f,
            ∂W_s[f] = Σ_{(n,j): idx[s,n,j]=f} acts[s,n,j] · ∂ŷ[s:, n]        (a CSR product per source)

The decoder gradient is not an autograd gradient: it is handed to a :class:`RowGrads` sink as
(row ids, rows), so that the optimiser touches only those rows (``clt_train.RowAdam``). The reference
:func:`dense_clt_decode` is plain autograd through dense codes; tests compare values and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import _bag, _gather_dot, _scatter_rows

__all__ = ["RowGrads", "sparse_clt_decode", "dense_clt_decode"]


class RowGrads:
    """Where :func:`sparse_clt_decode` puts the decoder gradients of a backward pass: ``rows[s]`` the
    active feature ids of source s (ascending), ``grads[s]`` their gradient [n_s, L − s, d]."""

    def __init__(self, n_layers: int) -> None:
        self.rows: list[Tensor | None] = [None] * n_layers
        self.grads: list[Tensor | None] = [None] * n_layers

    def dense(self, decoders: list[Tensor]) -> list[Tensor]:
        """The gradients as dense tensors shaped like ``decoders`` (zeros at untouched rows; for tests)."""
        out = []
        for s, W in enumerate(decoders):
            g = torch.zeros_like(W)
            if self.rows[s] is not None:
                g[self.rows[s]] = self.grads[s]
            out.append(g)
        return out


class _SparseCLTDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, idx, sink, *decoders):
        L, N, k = acts.shape
        d = decoders[0].shape[-1]
        out = acts.new_zeros(L, N, d)
        for s, W in enumerate(decoders):
            part = _bag(W.reshape(W.shape[0], -1), idx[s], acts[s])  # [N, (L − s)·d]
            out[s:] += part.view(N, L - s, d).transpose(0, 1)
        ctx.save_for_backward(acts, idx, *decoders)
        ctx.sink = sink
        return out

    @staticmethod
    def backward(ctx, g_out):
        acts, idx, *decoders = ctx.saved_tensors
        L, N, k = acts.shape
        g_acts = torch.empty_like(acts) if ctx.needs_input_grad[0] else None
        for s, W in enumerate(decoders):
            G = g_out[s:].transpose(0, 1).reshape(N, -1)  # [N, (L − s)·d]: this source's targets side by side
            if g_acts is not None:
                g_acts[s] = _gather_dot(W.reshape(W.shape[0], -1), idx[s], G)
            if ctx.sink is not None:
                rows, inv = torch.unique(idx[s], return_inverse=True)
                ctx.sink.rows[s] = rows
                ctx.sink.grads[s] = _scatter_rows(len(rows), inv, acts[s], G).view(len(rows), L - s, -1)
        return (g_acts, None, None) + (None,) * len(decoders)


def sparse_clt_decode(acts: Tensor, idx: Tensor, decoders: list[Tensor], sink: RowGrads | None = None) -> Tensor:
    """Σ_{s ≤ t} Σ_j acts[s,n,j] · decoders[s][idx[s,n,j], t − s] → ŷ [L, N, d] (no bias). ``acts``,
    ``idx`` [L, N, k] (ids distinct per token); ``decoders[s]`` [F, L − s, d]. Backward: the gradient of
    ``acts`` by autograd, the decoders' (active rows only) into ``sink``."""
    return _SparseCLTDecode.apply(acts, idx, sink, *decoders)


def dense_clt_decode(acts: Tensor, idx: Tensor, decoders: list[Tensor]) -> Tensor:
    """Reference of :func:`sparse_clt_decode`: dense codes [N, F] per source, one product per (source,
    target), plain autograd (gradients reach ``decoders`` as ordinary dense gradients)."""
    L, N, _ = acts.shape
    F = decoders[0].shape[0]
    outs = []
    codes = [acts.new_zeros(N, F).scatter(-1, idx[s], acts[s]) for s in range(L)]
    for t in range(L):
        outs.append(sum(codes[s] @ decoders[s][:, t - s] for s in range(t + 1)))
    return torch.stack(outs)
