"""Candidates and the contraction: gradients at the MLP writes dotted with every source's write
(docs/design.md §4, "Attribution phases").

A row of A is ``g · v_s`` for every source s: ``g`` the gradient at the source's (layer, position)
from one backward pass, ``v_s`` its write (feature a_s·d_s, error ε, token h0). Feature writes of one
layer are kept in a few :class:`_Bucket` s of positions padded to a common width, with the error
vector as the last column, so that one batched matmul per bucket contracts them all. Every node index
comes from the graph's :class:`NodeLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sparsetrace.graphs import NodeLayout
from sparsetrace.transcoders import TranscoderSet

from .replacement import CleanRun

__all__: list[str] = []

BUCKETS = 3
"""Most buckets of positions per layer in the contraction."""


@dataclass(eq=False)
class _Bucket:
    """Positions of one layer whose groups (features at a (layer, position)) are padded to one width:
    ``W`` [m, d, k + 1] the writes a_s·W_dec[f] of each position's features, zero-padded to k, and the
    group's error vector ε[l, c] as column k, so that one batched matmul contracts them all."""

    pos: np.ndarray  # [m] positions, ascending
    pos_t: Tensor  # the same on the device
    W: Tensor  # [m, d, k + 1]
    err_col: Tensor  # [m] node index of the error node at (layer, pos)
    f_pos: np.ndarray  # [n_f] positions of the bucket's features, ascending
    f_node: Tensor  # [n_f] their candidate (node) index
    f_slot: Tensor  # [n_f] their column in the bucket's [m·(k + 1)] result: index in pos · (k + 1) + column


@dataclass(eq=False)
class Candidates:
    """All active features (candidates for nodes) and their writes, grouped for the contraction.

    ``layout`` is the full layout: every active feature, all errors and tokens, the logits; its
    sources (features | errors | tokens) are the columns of every row. Feature writes are kept per
    layer in ≤ :data:`BUCKETS` buckets of positions with similar group sizes (chosen to minimise the
    padded work): group sizes differ across positions by up to ~4× on real prompts, and padding every
    position to its layer's largest group did 2.5× the needed multiply-adds (and held 2.5× the memory)
    at 32 tokens. ``bucket``/``index``/``column`` [n_feat] locate each feature's write:
    ``buckets[layer][bucket].W[index, :, column]``. ``layer``/``pos``/``feat`` [n_feat] int64 are the
    layout's feature arrays.
    """

    layout: NodeLayout
    layer: np.ndarray
    pos: np.ndarray
    feat: np.ndarray
    buckets: list[list[_Bucket]]  # per layer
    bucket: np.ndarray  # [n_feat]
    index: np.ndarray  # [n_feat]
    column: np.ndarray  # [n_feat]
    tok_index: Tensor  # [T] node index of the token node at pos
    accumulate: bool = False
    """A cross-layer transcoder: a feature sits in the buckets of every layer it writes to, and its
    column sums the products of all of them (a per-layer feature's column is written once)."""

    def writes(self, idx: np.ndarray) -> Tensor:
        """Writes [len(idx), d] of candidate features ``idx`` at their own layer (for a cross-layer
        transcoder: the decoder to the source layer itself, one of the feature's writes)."""
        idx = np.asarray(idx, dtype=np.int64)
        W0 = self.buckets[0][0].W
        out = W0.new_empty(len(idx), W0.shape[1])
        key = self.layer[idx] * BUCKETS + self.bucket[idx]
        for k in np.unique(key):  # one gather per (layer, bucket)
            m = np.flatnonzero(key == k)
            bk = self.buckets[self.layer[idx[m[0]]]][self.bucket[idx[m[0]]]]
            j = idx[m]
            dev = bk.W.device
            out[torch.as_tensor(m, device=dev)] = bk.W[torch.as_tensor(self.index[j], device=dev), :,
                                                       torch.as_tensor(self.column[j], device=dev)]
        return out


def plan_buckets(counts: np.ndarray, most: int = BUCKETS) -> list[np.ndarray]:
    """Positions split into ≤ ``most`` buckets by group size, minimising Σ_bucket |bucket|·(its largest
    group + 1) (the padded multiply-adds); split points searched among ≤ 64 quantiles of the sorted
    sizes. Returns each bucket's positions, ascending."""
    order = np.argsort(counts, kind="stable")
    k1 = counts[order] + 1
    n = len(k1)
    cand = np.unique(np.linspace(0, n, min(n, 64) + 1).round().astype(np.int64))[1:-1]  # split indices
    best, cuts = n * int(k1[-1]), []
    for a in cand if most >= 2 else ():  # two buckets: [0, a) [a, n)
        c = a * int(k1[a - 1]) + (n - a) * int(k1[-1])
        if c < best:
            best, cuts = c, [a]
    if most >= 3 and len(cand) > 1:  # three: [0, a) [a, b) [b, n)
        A, B = np.meshgrid(cand, cand, indexing="ij")
        c = A * k1[A - 1] + (B - A) * k1[B - 1] + (n - B) * int(k1[-1])
        c = np.where(B > A, c, np.iinfo(np.int64).max)
        i = np.unravel_index(np.argmin(c), c.shape)
        if c[i] < best:
            best, cuts = c[i], [int(A[i]), int(B[i])]
    edges = [0, *cuts, n]
    return [np.sort(order[edges[i] : edges[i + 1]]) for i in range(len(edges) - 1)]


def candidates(run: CleanRun, ts: TranscoderSet, n_logits: int) -> Candidates:
    """Every active feature of the clean run as a candidate node, with its write bucketed (a cross-layer
    transcoder's feature: one write per target layer, in that layer's buckets; docs/design.md §14)."""
    act = run.act  # [L, T, F]
    L, T, _ = act.shape
    nz = torch.nonzero(act > 0)  # sorted by (layer, pos, feat)
    layout = NodeLayout.build(L, T, *(nz[:, i].cpu().numpy() for i in range(3)), n_logits)
    f = layout.features
    layer, pos, feat = (a[f].astype(np.int64) for a in (layout.layer, layout.pos, layout.feature))
    n = len(layer)
    bucket, index = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    column = layout.rank_in_group.copy()
    buckets = [_layer_buckets(run, ts, layout, l, bucket, index, column) for l in range(L)]
    tok_index = torch.as_tensor(layout.token_index(np.arange(T)), device=act.device)
    return Candidates(layout, layer, pos, feat, buckets, bucket, index, column, tok_index,
                      accumulate=bool(getattr(ts, "cross_layer", False)))


def _layer_buckets(run: CleanRun, ts: TranscoderSet, layout: NodeLayout, l: int, bucket: np.ndarray,
                   index: np.ndarray, column: np.ndarray) -> list[_Bucket]:
    """The buckets of the writes landing at layer ``l``: from the features of every source layer s with
    l in ``ts.targets(s)`` (l itself for a per-layer set; 0 … l for a CLT), grouped by position, sources
    in ascending order within a group. Fills ``bucket``/``index``/``column`` of layer l's own features."""
    act, dev, T = run.act, run.act.device, layout.n_pos
    starts = layout.feature_layer_starts
    sources = [s for s in range(l + 1) if l in ts.targets(s)]
    parts = [np.arange(starts[s], starts[s + 1]) for s in sources]
    f_all = np.concatenate(parts)
    src = np.concatenate([np.full(len(p), s) for s, p in zip(sources, parts)])
    counts = sum(layout.group_counts[s] for s in sources)  # [T] writes landing at (l, c)
    offset = np.cumsum([np.zeros(T, dtype=np.int64)] + [layout.group_counts[s] for s in sources[:-1]], axis=0)
    pos = layout.pos[f_all].astype(np.int64)
    within = offset[np.searchsorted(sources, src), pos] + layout.rank_in_group[f_all]
    order = np.argsort(pos, kind="stable")  # by position; a per-layer set's features already are
    f_all, src, pos, within = f_all[order], src[order], pos[order], within[order]
    own = src == l
    column[f_all[own]] = within[own]
    out = []
    for b, P in enumerate(plan_buckets(counts)):
        k = max(1, int(counts[P].max()))
        slot_of_pos = np.full(T, -1)
        slot_of_pos[P] = np.arange(len(P))
        mine = slot_of_pos[pos] >= 0  # this bucket's features (ascending by position)
        f, slot = f_all[mine], slot_of_pos[pos[mine]]
        bucket[f[own[mine]]], index[f[own[mine]]] = b, slot[own[mine]]
        W = act.new_zeros(len(P), ts.d_in, k + 1)
        W[:, :, k] = run.error[l, torch.as_tensor(P, device=dev)]
        for s in sources:
            m = src[mine] == s
            if not m.any():
                continue
            ft = torch.as_tensor(layout.feature[f[m]], device=dev)
            pt = torch.as_tensor(pos[mine][m], device=dev)
            W[torch.as_tensor(slot[m], device=dev), :, torch.as_tensor(within[mine][m], device=dev)] = (
                act[s, pt, ft][:, None] * ts.decoder_rows(s, ft)[:, l - s].detach())
        out.append(_Bucket(
            pos=P, pos_t=torch.as_tensor(P, device=dev), W=W,
            err_col=torch.as_tensor(layout.error_index(np.full(len(P), l), P), device=dev), f_pos=pos[mine],
            f_node=torch.as_tensor(f, device=dev),
            f_slot=torch.as_tensor(slot * (k + 1) + within[mine], device=dev)))
    return out


class Contraction:
    """Rows [n, n_src] over candidate sources, filled layer by layer from the gradient at each MLP write
    (:meth:`layer`, ``g`` [n, T' − p0, d] at positions p0 … T' − 1: later positions have none) and at
    the layer-0 input (:meth:`embedding`). Only the positions carried are contracted (p0 = 1: position
    0 has no feature or error sources; the first token's edge comes from the engine).

    One buffer serves every batch (a fresh [B, n_src] per batch cost ~2 s of page faults at 32 tokens).
    :meth:`start` zeroes what a batch reads but does not write: everything, unless ``skips_above`` (the
    store does not read a row's features at or above its layer) and the batch reaches no lower position
    than every batch since the last full zeroing — then stale values can only sit in the error columns
    of layers at or above a row's layer, and only those are zeroed."""

    def __init__(self, run: CleanRun, cand: Candidates, B: int, p0: int = 0, skips_above: bool = False) -> None:
        # feature columns that accumulate (a CLT) must start at zero in every batch: no partial zeroing
        self.run, self.cand, self.p0, self.skips_above = run, cand, p0, skips_above and not cand.accumulate
        self.buf = run.h0.new_zeros(B, cand.layout.n_sources)
        self.rows = self.buf
        self.reach = 0  # highest T' written since the buffer was last zeroed whole
        self.flops = 0

    def start(self, n: int, Tp: int) -> None:
        """Rows for a batch of ``n`` reads at positions < ``Tp``."""
        if self.skips_above and Tp >= self.reach:
            self.buf[:n, self.cand.layout.errors].zero_()
        else:
            self.buf.zero_()
            self.reach = 0
        self.reach = max(self.reach, Tp)
        self.rows = self.buf[:n]

    def layer(self, l: int, g: Tensor) -> None:
        """``g`` [n, T' − p0, d]: the first n rows (the others have no gradient at this layer)."""
        n, P, d = g.shape
        p0 = self.p0
        Tp = p0 + P
        rows = self.rows[:n]
        g_t = g.transpose(0, 1)  # (P, n, d), a view
        for bk in self.cand.buckets[l]:
            i0, i1 = np.searchsorted(bk.pos, [p0, Tp])
            if i1 == i0:
                continue
            k1 = bk.W.shape[-1]
            # the carried positions are p0 … T' − 1: a bucket holding all of them takes g as it is
            gb = g_t if i1 - i0 == P else g_t.index_select(0, bk.pos_t[i0:i1] - p0)
            out = torch.bmm(gb, bk.W[i0:i1])  # (m, n, k + 1)
            self.flops += 2 * (i1 - i0) * n * d * k1
            flat = out.permute(1, 0, 2).reshape(n, (i1 - i0) * k1)
            rows.index_copy_(1, bk.err_col[i0:i1], flat[:, k1 - 1 :: k1])
            f0, f1 = np.searchsorted(bk.f_pos, [p0, Tp])
            if f1 > f0:
                vals = flat.index_select(1, bk.f_slot[f0:f1] - i0 * k1)
                if self.cand.accumulate:  # a CLT feature: one term per target layer
                    rows.index_add_(1, bk.f_node[f0:f1], vals)
                else:
                    rows.index_copy_(1, bk.f_node[f0:f1], vals)

    def embedding(self, g_emb: Tensor, tok0: Tensor | None = None) -> Tensor:
        """``g_emb`` [n, T' − p0, d] (T' ≤ T: tokens at later positions get no gradient, their edges stay
        0); ``tok0`` [n]: the first token's edge when position 0 is skipped. Returns the rows."""
        p0, P = self.p0, g_emb.shape[1]
        tok = self.cand.tok_index
        self.rows[:, tok[p0 : p0 + P]] = torch.einsum("btd,td->bt", g_emb, self.run.h0[p0 : p0 + P])
        if p0:
            self.rows[:, tok[0]] = tok0
        self.flops += 2 * g_emb.numel()
        return self.rows
