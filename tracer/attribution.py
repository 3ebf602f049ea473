"""The attribution engine: prompt → AttributionGraph with exact edge weights (DESIGN.md §4).

Rows are computed by backward passes through the frozen model (replacement.py): for a batch of B
targets, B copies of the prompt go through one frozen forward whose graph is kept, and each batch
injects the targets' read vectors (encoder rows, logit directions) as output gradients at their
(layer, position). The gradients at every MLP write and at the layer-0 input are then contracted with
the sources' writes: feature a_s·d_s, error ε, token embedding h0.

The source side is a set of (layer, position, vector) writes per node, so a cross-layer transcoder
(a feature writing to several layers) fits by adding more writes for the same node.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sparsetrace.config import AttributionConfig
from sparsetrace.errors import AttributionError, ConfigError
from sparsetrace.graphs import Adjacency, AttributionGraph, NodeLayout
from sparsetrace.graphs.graph import index_dtype
from sparsetrace.transcoders import TranscoderSet

from ._linear import LinearBackward
from ._store import RowStore
from ..models.loading import LoadedModel, resolve_device, resolve_dtype
from .replacement import CleanRun, ReplacementModel
from .targets import LogitTarget, TargetSpec, select_targets

__all__ = ["AttributionConfig", "attribute", "AttributionStats"]

Progress = Callable[[str, int, int], None]




@dataclass(frozen=True)
class AttributionStats:
    """What one attribution cost."""

    n_pos: int
    active_features: int
    feature_nodes: int
    rows_computed: int
    backward_passes: int
    seconds: float
    backward_gflop: float | None = None
    """Matmul FLOPs of the hand-written backward passes (None with backward="autograd")."""
    contraction_gflop: float = 0.0
    """Matmul FLOPs of contracting the gradients with the sources' writes."""
    batch_size: int = 0
    """Target rows per backward pass (the one chosen where the config left it to the engine)."""


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
class _Candidates:
    """All active features (candidates for nodes) and their writes, grouped for the contraction.

    Candidate index space: features (sorted by layer, pos, id) | errors L×T | tokens T — the same
    order as a full NodeLayout without logits. Feature writes are kept per layer in a few
    :class:`_Bucket` s of positions with similar group sizes (≤ 3 per layer, chosen to minimise the
    padded work): group sizes differ across positions by up to ~4× on real prompts, and padding every
    position to its layer's largest group did 2.5× the needed multiply-adds (and held 2.5× the memory)
    at 32 tokens. ``group`` [n_feat] is layer·T + pos (sorted); ``bucket``/``index``/``column``
    [n_feat] locate each feature's write: ``buckets[layer][bucket].W[index, :, column]``.
    """

    layer: np.ndarray
    pos: np.ndarray
    feat: np.ndarray
    layout: NodeLayout  # full layout with all candidates (and the logits)
    layer_start: np.ndarray  # [L+1] first candidate index of each layer
    group: np.ndarray  # [n_feat] layer·T + pos
    buckets: list[list[_Bucket]]  # per layer
    bucket: np.ndarray  # [n_feat]
    index: np.ndarray  # [n_feat]
    column: np.ndarray  # [n_feat]
    tok_index: Tensor  # [T] node index of the token node at pos

    def writes(self, idx: np.ndarray) -> Tensor:
        """Writes [len(idx), d] of candidate features ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        W0 = self.buckets[0][0].W
        out = W0.new_empty(len(idx), W0.shape[1])
        key = self.layer[idx].astype(np.int64) * _BUCKETS + self.bucket[idx]
        for k in np.unique(key):  # one gather per (layer, bucket)
            m = np.flatnonzero(key == k)
            bk = self.buckets[self.layer[idx[m[0]]]][self.bucket[idx[m[0]]]]
            j = idx[m]
            dev = bk.W.device
            out[torch.as_tensor(m, device=dev)] = bk.W[torch.as_tensor(self.index[j], device=dev), :,
                                                       torch.as_tensor(self.column[j], device=dev)]
        return out


_BUCKETS = 3
"""Most buckets of positions per layer in the contraction."""


def _plan_buckets(counts: np.ndarray, most: int = _BUCKETS) -> list[np.ndarray]:
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


def _candidates(run: CleanRun, ts: TranscoderSet, n_logits: int) -> _Candidates:
    act = run.act  # [L, T, F]
    L, T, _ = act.shape
    d = ts.d_in
    dev = act.device
    nz = torch.nonzero(act > 0)  # sorted by (layer, pos, feat)
    layer, pos, feat = (nz[:, i].cpu().numpy() for i in range(3))
    layout = NodeLayout.build(L, T, layer, pos, feat, n_logits)
    group = layer * T + pos
    counts = np.bincount(group, minlength=L * T).reshape(L, T)
    first = np.concatenate([[0], np.cumsum(counts.ravel())[:-1]])
    within = np.arange(len(group)) - first[group]
    starts = np.searchsorted(layer, np.arange(L + 1))
    err_node = np.asarray(layout.error_index(*np.divmod(np.arange(L * T), T)), dtype=np.int64).reshape(L, T)
    bucket = np.zeros(len(group), dtype=np.int64)
    index = np.zeros(len(group), dtype=np.int64)
    buckets = []
    for l in range(L):
        s, e = int(starts[l]), int(starts[l + 1])
        f_layer = np.arange(s, e)
        mine = []
        for b, P in enumerate(_plan_buckets(counts[l])):
            k = max(1, int(counts[l, P].max()))
            slot_of_pos = np.full(T, -1)
            slot_of_pos[P] = np.arange(len(P))
            f = f_layer[slot_of_pos[pos[s:e]] >= 0]  # this bucket's features (ascending: sorted by pos)
            bucket[f], index[f] = b, slot_of_pos[pos[f]]
            W = act.new_zeros(len(P), d, k + 1)
            W[:, :, k] = run.error[l, torch.as_tensor(P, device=dev)]
            if len(f):
                ft = torch.as_tensor(feat[f], device=dev)
                pt = torch.as_tensor(pos[f], device=dev)
                W[torch.as_tensor(index[f], device=dev), :, torch.as_tensor(within[f], device=dev)] = (
                    act[l, pt, ft][:, None] * ts[l].W_dec[ft].detach())
            mine.append(_Bucket(
                pos=P, pos_t=torch.as_tensor(P, device=dev), W=W,
                err_col=torch.as_tensor(err_node[l, P], device=dev), f_pos=pos[f],
                f_node=torch.as_tensor(f, device=dev),
                f_slot=torch.as_tensor(index[f] * (k + 1) + within[f], device=dev)))
        buckets.append(mine)
    tok_index = torch.as_tensor(layout.token_index(np.arange(T)), device=dev)
    return _Candidates(layer, pos, feat, layout, starts, group, buckets, bucket, index, within, tok_index)


def _physical_memory() -> int:
    """Bytes of RAM (Linux/macOS sysconf; a large value where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62


def _row_bounds(cand: _Candidates, err_nonzero: np.ndarray | None = None) -> np.ndarray:
    """[n_feat] the sources in each feature row's causal cone (features and errors at lower layers and
    positions ≤ its own, tokens at positions ≤ its own): no row can have more entries. ``err_nonzero``
    [L, T]: error nodes whose vector is zero (position 0's) have no edges, so they are left out."""
    L, T = cand.layout.n_layers, cand.layout.n_pos
    counts = np.bincount(cand.group, minlength=L * T).reshape(L, T)
    if err_nonzero is not None:
        counts = counts + np.asarray(err_nonzero, dtype=np.int64).reshape(L, T)
    else:
        counts = counts + 1
    below = np.cumsum(counts, axis=0) - counts  # features and errors at layers < l, per position
    cone = np.cumsum(below, axis=1)  # … at positions ≤ c
    l, c = cand.layer.astype(np.int64), cand.pos.astype(np.int64)
    return cone[l, c] + (c + 1)


def _batches(idx: np.ndarray, cand: _Candidates, B: int):
    """Feature rows ``idx`` as backward batches of ≤ B: in (position, layer) order, so that a batch
    spans few positions (its pass runs over positions ≤ its highest) and its rows join the pass at
    their own layers (_linear.py: the rows at or above a layer are a prefix), each batch then sorted by
    layer descending as :meth:`LinearBackward.backward_into` takes them."""
    idx = np.asarray(idx)
    idx = idx[np.lexsort((idx, cand.layer[idx], cand.pos[idx]))]
    for s in range(0, len(idx), B):
        take = idx[s : s + B]
        yield take[np.argsort(-cand.layer[take], kind="stable")]


class _Contraction:
    """Rows [n, n_src] over candidate sources, filled layer by layer from the gradient at each MLP write
    (:meth:`layer`, ``g`` [n, T' − p0, d] at positions p0 … T' − 1: later positions have none) and at
    the layer-0 input (:meth:`embedding`). Only the positions carried are contracted (p0 = 1: position
    0 has no feature or error sources; the first token's edge comes from the engine).

    One buffer serves every batch (a fresh [B, n_src] per batch cost ~2 s of page faults at 32 tokens).
    :meth:`start` zeroes what a batch reads but does not write: everything, unless ``skips_above`` (the
    store does not read a row's features at or above its layer) and the batch reaches no lower position
    than every batch since the last full zeroing — then stale values can only sit in the error columns
    of layers at or above a row's layer, and only those are zeroed."""

    def __init__(self, run: CleanRun, cand: _Candidates, B: int, n_src: int, p0: int = 0,
                 skips_above: bool = False) -> None:
        self.run, self.cand, self.p0, self.skips_above = run, cand, p0, skips_above
        self.buf = run.h0.new_zeros(B, n_src)
        self.rows = self.buf
        self.reach = 0  # highest T' written since the buffer was last zeroed whole
        self.flops = 0

    def start(self, n: int, Tp: int) -> None:
        """Rows for a batch of ``n`` reads at positions < ``Tp``."""
        lay = self.cand.layout
        if self.skips_above and Tp >= self.reach:
            self.buf[:n, lay.errors].zero_()
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
                rows.index_copy_(1, bk.f_node[f0:f1], flat.index_select(1, bk.f_slot[f0:f1] - i0 * k1))

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


class _AutogradBackward:
    """Backward passes over one kept frozen forward of B copies of the prompt.

    The frozen model is linear, so the one forward serves every batch of rows. (Measured here: B copies
    with a plain backward beat one copy with ``is_grads_batched`` (vmap) by ~1.5–2× on CPU.)
    """

    def __init__(self, rm: ReplacementModel, run: CleanRun, batch: int) -> None:
        self.rm, self.run, self.B = rm, run, batch
        T, d = run.n_pos, run.h0.shape[-1]
        self.h0 = run.h0.expand(batch, T, d).clone().requires_grad_(True)
        self.writes = [w.expand(batch, T, d).clone().requires_grad_(True) for w in rm.clean_writes(run)]
        with torch.enable_grad():
            self.out = rm.frozen(run, self.h0, self.writes)
        self.passes = 0

    def backward(self, reads: list[tuple[int, int, Tensor]]) -> tuple[Tensor, Tensor]:
        """``reads[b] = (layer, pos, vector)``: copy b reads ``vector`` at the MLP input of ``layer``
        (``layer == L``: the final normed residual) at ``pos``. Returns the write gradients [L, n, T, d]
        and the layer-0 input gradient [n, T, d] (n = len(reads))."""
        L = self.rm.n_layers
        n = len(reads)
        if not 0 < n <= self.B:
            raise AttributionError(f"{n} reads for a batch of {self.B}")
        outs = self.out.x + [self.out.final]
        gouts: list[Tensor | None] = [None] * (L + 1)
        for b, (l, c, v) in enumerate(reads):
            if gouts[l] is None:
                gouts[l] = torch.zeros_like(outs[l])
            gouts[l][b, c] = v.detach()
        used = [i for i in range(L + 1) if gouts[i] is not None]
        with torch.enable_grad():
            grads = torch.autograd.grad(
                [outs[i] for i in used],
                self.writes + [self.h0],
                [gouts[i] for i in used],
                retain_graph=True,
                allow_unused=True,
            )
        self.passes += 1
        layer_grads = torch.stack([torch.zeros_like(self.h0[:n]) if g is None else g[:n] for g in grads[:L]])
        return layer_grads, grads[L][:n]

    p0 = 0  # every position is carried

    def backward_into(self, reads: list[tuple[int, int, Tensor]],
                      sink: Callable[[int, Tensor], None]) -> tuple[Tensor, None]:
        """:meth:`backward`, handing each layer's write gradient to ``sink(layer, g)``; returns the
        layer-0 input gradient (and None: position 0 is not skipped)."""
        grads, g_emb = self.backward(reads)
        for l in range(grads.shape[0]):
            sink(l, grads[l])
        return g_emb, None


def attribute(
    prompt: str | Sequence[int] | Tensor,
    model: LoadedModel,
    transcoders: TranscoderSet,
    *,
    targets: TargetSpec = None,
    config: AttributionConfig | None = None,
    progress: Progress | None = None,
) -> AttributionGraph:
    """Trace one prompt into an attribution graph.

    ``prompt``: a string (tokenised with the model's tokenizer; BOS prepended where the tokenizer has
    one it does not add) or token ids. ``targets``: None for the top logits, or token ids / strings /
    :class:`CustomTarget`. The graph's metadata carries the config, the stats and provenance.
    """
    cfg = config or AttributionConfig()
    dev, dt = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    ids = _prompt_ids(prompt, model)
    old_dev, old_dt = model.device, model.dtype
    ts_dev, ts_dt = transcoders[0].W_enc.device, transcoders[0].W_enc.dtype
    model.to(dev, dt)
    transcoders.to(dev, dt)
    try:
        return _attribute(ids, model, transcoders, targets, cfg, progress)
    finally:
        model.to(old_dev, old_dt)
        transcoders.to(ts_dev, ts_dt)


def _prompt_ids(prompt, model: LoadedModel) -> Tensor:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("prompt is empty; give some text to trace")
        ids = model.tokenize(prompt)
    else:
        ids = torch.as_tensor(list(prompt) if not isinstance(prompt, Tensor) else prompt, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ConfigError(
            f"prompt has {ids.numel()} token(s); need at least 2 (position 0 is a constant, not nodes)"
        )
    n_ctx = model.n_ctx
    if n_ctx is not None and ids.numel() > n_ctx:
        raise ConfigError(f"prompt has {ids.numel()} tokens; the model's context is {n_ctx}")
    return ids


@torch.no_grad()
def _attribute(
    ids: Tensor, lm: LoadedModel, ts: TranscoderSet, spec: TargetSpec, cfg: AttributionConfig, progress: Progress | None
) -> AttributionGraph:
    t0 = time.perf_counter()
    say = progress or (lambda stage, done, total: None)
    rm = ReplacementModel(lm, ts)
    run = rm.run(ids)
    L, T = rm.n_layers, run.n_pos
    W_U = rm.unembedding()
    probs = run.model_logits[-1].float().softmax(-1)
    tgts: list[LogitTarget] = select_targets(
        run.logits[-1], probs, W_U, spec, max_n_logits=cfg.max_n_logits,
        desired_logit_prob=cfg.desired_logit_prob, tokenizer=lm.tokenizer,
    )
    K = len(tgts)
    cand = _candidates(run, ts, K)
    lay = cand.layout
    n_feat = lay.n_features
    n_src = lay.logits.start  # candidates: features | errors | tokens
    budget = n_feat if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n_feat)
    B = cfg.batch_size or (64 if cfg.max_feature_nodes is not None else min(256, max(64, 16384 // T)))

    if cfg.backward == "linear":
        engine = LinearBackward(rm, run, skip_position0=True)  # position 0 is a constant, not sources
    else:
        engine = _AutogradBackward(rm, run, max(1, min(B, K + budget)))
    np_dt = np.float64 if cfg.dtype == "float64" else np.float32
    every_row = cfg.max_feature_nodes is None  # no ranking needed: each row has its slot in the graph's CSR
    slots = None
    if every_row:
        slots = np.zeros(lay.n_nodes, dtype=np.int64)
        slots[:n_feat] = _row_bounds(cand, run.error.norm(dim=-1).cpu().numpy() > 0)
        slots[lay.logits] = n_src
        capacity = int(slots.sum())
        need = capacity * (np.dtype(np_dt).itemsize + np.dtype(index_dtype(lay.n_nodes)).itemsize)
        mem = _physical_memory()
        if need > mem and cfg.store_threshold == 0:  # an exact row fills its cone: this would run out of memory
            raise AttributionError(
                f"the exact graph of this {T}-token prompt ({n_feat:,} active features) has up to {capacity:,} "
                f"edges ({need / 1e9:.1f} GB), more than this machine's {mem / 1e9:.1f} GB of memory; set "
                f"max_feature_nodes (a row budget, e.g. 4096) and/or store_threshold (e.g. 1e-4)"
            )
        if need > mem:  # thresholded rows keep far fewer entries: stored as they come instead
            slots = None
    store = RowStore(lay.n_nodes, cfg.store_threshold, np_dt, np.r_[cand.layer, np.full(lay.n_nodes - n_feat, L)],
                     slots=slots)

    # with slots the store skips a row's features at or above its layer (zero_from below)
    con = _Contraction(run, cand, B, n_src, engine.p0, skips_above=slots is not None)

    def compute(target_idx: np.ndarray, reads: list[tuple[int, int, Tensor]]) -> None:
        con.start(len(reads), max(c for _, c, _ in reads) + 1)
        g_emb, tok0 = engine.backward_into(reads, con.layer)
        # a feature row has no entries at features of its own layer or above (columns up to n_feat)
        zero_from = np.full(len(target_idx), n_feat)
        f = target_idx < n_feat
        zero_from[f] = cand.layer_start[cand.layer[target_idx[f]]]
        store.add(target_idx, con.embedding(g_emb, tok0), zero_from, n_feat)

    logit_nodes = np.asarray(lay.logit_index(np.arange(K)), dtype=np.int64).reshape(-1)

    def logit_rows() -> None:
        for s in range(0, K, B):
            compute(logit_nodes[s : s + B], [(L, T - 1, t.vector) for t in tgts[s : s + B]])

    if not every_row:  # logit rows first: they rank the features for a row budget
        logit_rows()
        say("rows", K, K + budget)

    visited = np.zeros(n_feat, dtype=bool)
    w = np.zeros(lay.n_nodes)
    w[lay.logits] = [t.probability for t in tgts]
    done = 0
    while done < budget:
        if cfg.max_feature_nodes is None:
            window = np.arange(n_feat)
        else:  # re-rank every 4 batches (circuit-tracer's rhythm) by influence through the rows so far
            infl = store.influence(w)[:n_feat]
            infl[visited] = -np.inf
            window = np.argsort(-infl, kind="stable")[: min(4 * B, budget - done)]
        # the set of rows is the ranking's; only their order and grouping into batches is ours
        for take in _batches(window, cand, B):
            visited[take] = True
            reads = [
                (int(cand.layer[i]), int(cand.pos[i]), ts[int(cand.layer[i])].W_enc[int(cand.feat[i])]) for i in take
            ]
            compute(take.astype(np.int64), reads)
            done += len(take)
            say("rows", (0 if every_row else K) + done, K + budget)
    if every_row:  # the logits are the last nodes
        logit_rows()
        say("rows", K + budget, K + budget)

    # ---- assemble: selected features are nodes; the rest fold into their (layer, pos) error node ----
    keep_node = np.ones(lay.n_nodes, dtype=bool)
    keep_node[:n_feat] = visited
    folded = np.arange(lay.n_nodes)
    unsel = np.flatnonzero(~visited)
    folded[unsel] = lay.error_index(cand.layer[unsel], cand.pos[unsel])
    layout = lay.subset(keep_node)
    adj = store.assemble(keep_node, folded)

    # ---- κ: the frozen model with every source zeroed (it is affine, so value = Σ A + κ exactly) ----
    bias_full, value_full = _bias_and_values(rm, run, cand, tgts)
    activation = np.zeros(lay.n_nodes)
    ix = [torch.as_tensor(a, device=run.act.device) for a in (cand.layer, cand.pos, cand.feat)]
    a = run.act[ix[0], ix[1], ix[2]]
    activation[:n_feat] = a.double().cpu().numpy()
    err_vec = run.error.clone()
    if len(unsel):
        # an unselected feature's write joins its error node
        for l in range(L):
            m = unsel[cand.layer[unsel] == l]
            if len(m):
                err_vec[l].index_add_(0, torch.as_tensor(cand.pos[m], device=err_vec.device), cand.writes(m))
    err_norm = err_vec.norm(dim=-1).double().cpu().numpy()  # [L, T]
    activation[lay.errors] = err_norm[lay.layer[lay.errors], lay.pos[lay.errors]]
    activation[lay.logits] = value_full[lay.logits]

    stats = AttributionStats(
        n_pos=T,
        active_features=n_feat,
        feature_nodes=int(visited.sum()),
        rows_computed=K + done,
        backward_passes=engine.passes,
        seconds=time.perf_counter() - t0,
        backward_gflop=engine.flops / 1e9 if hasattr(engine, "flops") else None,
        contraction_gflop=con.flops / 1e9,
        batch_size=B,
    )
    return AttributionGraph(
        layout=layout,
        adjacency=adj,
        activation=activation[keep_node].astype(np_dt),
        bias=bias_full[keep_node].astype(np_dt),
        value=value_full[keep_node].astype(np_dt),
        token_ids=run.input_ids.cpu().numpy().astype(np.int64),
        token_strings=lm.token_strings(run.input_ids),
        logit_token=np.array([t.token_id for t in tgts], dtype=np.int64),
        logit_probability=np.array([t.probability for t in tgts], dtype=np.float64),
        logit_label=[t.label for t in tgts],
        prompt=lm.tokenizer.decode(run.input_ids) if lm.tokenizer is not None else "",
        metadata={
            "model": {"id": lm.model_id, "architecture": lm.adapter.name, "n_layers": L, "d_model": lm.d_model},
            "transcoders": {k: v for k, v in ts.config.to_dict().items() if k not in ("metrics", "training")},
            "transcoder_training": ts.config.training,
            "transcoder_metrics": ts.config.metrics,
            "attribution": asdict(cfg),
            "stats": asdict(stats),
            "hook_points": {"in": ts.config.hook_in, "out": ts.config.hook_out},
            "position_0": "constant (attention sink): its features and errors are not nodes, they are in κ",
        },
    )


def _bias_and_values(
    rm: ReplacementModel, run: CleanRun, cand: _Candidates, tgts: list[LogitTarget]
) -> tuple[np.ndarray, np.ndarray]:
    """κ and the target values for every candidate node (features and logits; 0 elsewhere)."""
    lay = cand.layout
    L, T = rm.n_layers, run.n_pos
    h0 = torch.zeros_like(run.h0)[None]
    writes = []
    for l, w in enumerate(rm.clean_writes(run)):
        z = rm.transcoders[l].b_dec.expand(T, -1).clone()
        z[0] = w[0]  # position 0 keeps its whole constant MLP output
        writes.append(z[None])
    out = rm.frozen(run, h0, writes)
    bias = np.zeros(lay.n_nodes)
    value = np.zeros(lay.n_nodes)
    for l in range(L):
        sel = np.arange(cand.layer_start[l], cand.layer_start[l + 1])  # features are sorted by layer
        if not len(sel):
            continue
        f = torch.as_tensor(cand.feat[sel], device=run.x.device)
        p = torch.as_tensor(cand.pos[sel], device=run.x.device)
        tc = rm.transcoders[l]
        bias[sel] = ((out.x[l][0, p] * tc.W_enc[f]).sum(-1) + tc.b_enc[f]).double().cpu().numpy()
        value[sel] = run.pre[l, p, f].double().cpu().numpy()
    vec = torch.stack([t.vector for t in tgts]).to(run.final)  # [K, d]
    ln = lay.logits
    bias[ln] = (vec @ out.final[0, T - 1]).double().cpu().numpy()
    value[ln] = (vec @ run.final[T - 1]).double().cpu().numpy()
    return bias, value
