"""The attribution engine: prompt → AttributionGraph with exact edge weights (docs/design.md §4).

The algorithm, one named phase each:

1. **targets** (:func:`_targets`): the logits to explain and their weights;
2. **candidates** (``_contraction.candidates``): every active feature of the clean run, the full node
   layout (features | errors | tokens | logits) and every source's write;
3. **rows** (:class:`_RowPass`): one row of A per target, by backward passes through the frozen model
   contracted with the sources' writes, kept in a sparse row store — every feature's row, or (with a
   row budget) the logits' and then the most influential features' in windows re-ranked by influence;
4. **fold** (:func:`_fold`): selected features are nodes, the others join the error node at their
   (layer, position), their columns summed into it;
5. **node values and κ** (:func:`_node_values`): activations, values, and κ from the frozen model
   with every source zeroed (it is affine, so value = Σ_s A[t, s] + κ exactly).

Every node index comes from :class:`NodeLayout`. The source side is a set of (layer, position,
vector) writes per node, so a cross-layer transcoder (a feature writing to several layers) fits by
adding more writes for the same node.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from sparsetrace.config import AttributionConfig
from sparsetrace.errors import AttributionError, ConfigError
from sparsetrace.graphs import Adjacency, AttributionGraph, NodeLayout
from sparsetrace.graphs.graph import index_dtype
from sparsetrace.transcoders import TranscoderSet

from ._autograd import AutogradBackward
from ._contraction import Candidates, Contraction, candidates
from ._linear import LinearBackward
from ._store import RowStore
from ..models.loading import LoadedModel, resolve_device, resolve_dtype
from .replacement import CleanRun, ReplacementModel
from .targets import LogitTarget, TargetSpec, select_targets

__all__ = ["AttributionConfig", "attribute", "AttributionStats"]

Progress = Callable[[str, int, int], None]

POSITION_0 = ("constant (attention sink): it has no feature nodes; its error nodes are nodes with a zero "
              "vector and no edges (its MLP output is in κ); its token node is an ordinary source")
"""What the graph's metadata says about position 0 (asserted in tests/test_tracer_reference.py)."""


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
    """The five phases (module docstring), then the graph over the kept nodes."""
    t0 = time.perf_counter()
    rm = ReplacementModel(lm, ts)
    run = rm.run(ids)
    tgts = _targets(rm, run, lm, spec, cfg)  # 1. targets
    cand = candidates(run, ts, len(tgts))  # 2. candidates (tracer/_contraction.py)
    rows = _RowPass(rm, run, cand, tgts, cfg)  # 3. rows
    selected = rows.compute(progress or (lambda stage, done, total: None))
    keep, adj = _fold(rows.store, cand.layout, selected)  # 4. fold
    activation, bias, value = _node_values(rm, run, cand, tgts, selected)  # 5. node values and κ
    stats = AttributionStats(
        n_pos=run.n_pos,
        active_features=cand.layout.n_features,
        feature_nodes=int(selected.sum()),
        rows_computed=rows.done,
        backward_passes=rows.engine.passes,
        seconds=time.perf_counter() - t0,
        backward_gflop=rows.engine.flops / 1e9 if hasattr(rows.engine, "flops") else None,
        contraction_gflop=rows.con.flops / 1e9,
        batch_size=rows.B,
    )
    np_dt = rows.store.dtype
    return AttributionGraph(
        layout=cand.layout.subset(keep),
        adjacency=adj,
        activation=activation[keep].astype(np_dt),
        bias=bias[keep].astype(np_dt),
        value=value[keep].astype(np_dt),
        token_ids=run.input_ids.cpu().numpy().astype(np.int64),
        token_strings=lm.token_strings(run.input_ids),
        logit_token=np.array([t.token_id for t in tgts], dtype=np.int64),
        logit_probability=np.array([t.probability for t in tgts], dtype=np.float64),
        logit_label=[t.label for t in tgts],
        prompt=lm.tokenizer.decode(run.input_ids) if lm.tokenizer is not None else "",
        metadata=_metadata(lm, ts, cfg, stats),
    )


# ---- 1. targets ---------------------------------------------------------------------------------
def _targets(rm: ReplacementModel, run: CleanRun, lm: LoadedModel, spec: TargetSpec,
             cfg: AttributionConfig) -> list[LogitTarget]:
    """The logit targets: their read vectors and weights (the model's own next-token probabilities)."""
    probs = run.model_logits[-1].float().softmax(-1)
    return select_targets(run.logits[-1], probs, rm.unembedding(), spec, max_n_logits=cfg.max_n_logits,
                          desired_logit_prob=cfg.desired_logit_prob, tokenizer=lm.tokenizer)


# ---- 3. rows ------------------------------------------------------------------------------------
class _RowPass:
    """Rows of A for the logits and the selected features: batches of reads (a target's read vector
    at its layer and position) → one backward pass each → the contraction → the row store.

    Without a row budget every feature's row is computed, in an order that keeps batches within few
    positions, then the logits'. With one (``max_feature_nodes``), the logits' rows come first and the
    features are taken in windows of 4 batches, each window the most influential unvisited features
    through the rows stored so far (circuit-tracer's rhythm)."""

    def __init__(self, rm: ReplacementModel, run: CleanRun, cand: Candidates, tgts: list[LogitTarget],
                 cfg: AttributionConfig) -> None:
        lay = cand.layout
        self.rm, self.cand, self.tgts, self.cfg = rm, cand, tgts, cfg
        self.every_row = cfg.max_feature_nodes is None  # no ranking: each row has its slot in the graph's CSR
        self.budget = lay.n_features if self.every_row else min(cfg.max_feature_nodes, lay.n_features)
        self.B = cfg.batch_size or (min(256, max(64, 16384 // run.n_pos)) if self.every_row else 64)
        if cfg.backward == "linear":
            self.engine = LinearBackward(rm, run, skip_position0=True)  # position 0 is a constant, not sources
        else:
            self.engine = AutogradBackward(rm, run, max(1, min(self.B, len(tgts) + self.budget)))
        self.store = _row_store(lay, run, cfg, self.every_row)
        # with slots the store skips a row's features at or above its layer (zero_from below)
        self.con = Contraction(run, cand, self.B, self.engine.p0, skips_above=self.store.slots is not None)
        self.selected = np.zeros(lay.n_features, dtype=bool)
        self.done = 0  # rows computed

    def compute(self, say: Progress) -> np.ndarray:
        """Every row; returns the selected features [n_features] bool."""
        total = len(self.tgts) + self.budget
        if not self.every_row:  # logit rows first: they rank the features for a row budget
            self._logit_rows()
            say("rows", self.done, total)
        while self.selected.sum() < self.budget:
            # the set of rows is the window's; only their order and grouping into batches is ours
            for take in _batches(self._window(), self.cand, self.B):
                self.selected[take] = True
                self._batch(take, [self._read(i) for i in take])
                say("rows", self.done, total)
        if self.every_row:  # the logits are the last nodes
            self._logit_rows()
            say("rows", total, total)
        return self.selected

    def _window(self) -> np.ndarray:
        """The next features to compute: all of them, or the most influential unvisited ones."""
        lay = self.cand.layout
        if self.every_row:
            return np.arange(lay.n_features)
        w = np.zeros(lay.n_nodes)
        w[lay.logits] = [t.probability for t in self.tgts]
        infl = self.store.influence(w)[lay.features]
        infl[self.selected] = -np.inf
        left = self.budget - int(self.selected.sum())
        return np.arange(lay.n_nodes)[lay.features][np.argsort(-infl, kind="stable")[: min(4 * self.B, left)]]

    def _read(self, i: int) -> tuple[int, int, Tensor]:
        """Feature node ``i``'s read: its encoder row at its (layer, position)."""
        l = int(self.cand.layer[i])
        return l, int(self.cand.pos[i]), self.rm.transcoders[l].W_enc[int(self.cand.feat[i])]

    def _logit_rows(self) -> None:
        lay, L, T = self.cand.layout, self.rm.n_layers, self.cand.layout.n_pos
        nodes = np.asarray(lay.logit_index(np.arange(len(self.tgts))), dtype=np.int64).reshape(-1)
        for s in range(0, len(self.tgts), self.B):
            self._batch(nodes[s : s + self.B], [(L, T - 1, t.vector) for t in self.tgts[s : s + self.B]])

    def _batch(self, target_idx: np.ndarray, reads: list[tuple[int, int, Tensor]]) -> None:
        """One backward pass: the rows of nodes ``target_idx`` from ``reads`` [(layer, position, vector)]."""
        lay = self.cand.layout
        target_idx = np.asarray(target_idx, dtype=np.int64)
        self.con.start(len(reads), max(c for _, c, _ in reads) + 1)
        g_emb, tok0 = self.engine.backward_into(reads, self.con.layer)
        # a row has no entries at features of its own layer or above: those columns are not scanned
        zero_from = np.asarray(lay.features_from(lay.layer[target_idx]), dtype=np.int64)
        self.store.add(target_idx, self.con.embedding(g_emb, tok0), zero_from, lay.features.stop)
        self.done += len(target_idx)


def _row_store(lay: NodeLayout, run: CleanRun, cfg: AttributionConfig, every_row: bool) -> RowStore:
    """The store: with every row, each node's row gets a slot sized by its causal cone (the exact graph
    is then the store's buffer), unless that would not fit in memory; else rows are kept as they come."""
    np_dt = np.float64 if cfg.dtype == "float64" else np.float32
    slots = lay.row_capacity(run.error.norm(dim=-1).cpu().numpy() > 0) if every_row else None
    if slots is not None:
        capacity = int(slots.sum())
        need = capacity * (np.dtype(np_dt).itemsize + np.dtype(index_dtype(lay.n_nodes)).itemsize)
        mem = _physical_memory()
        if need > mem and cfg.store_threshold == 0:  # an exact row fills its cone: this would run out of memory
            raise AttributionError(
                f"the exact graph of this {lay.n_pos}-token prompt ({lay.n_features:,} active features) has up to "
                f"{capacity:,} edges ({need / 1e9:.1f} GB), more than this machine's {mem / 1e9:.1f} GB of memory; "
                f"set max_feature_nodes (a row budget, e.g. 4096) and/or store_threshold (e.g. 1e-4)"
            )
        if need > mem:  # thresholded rows keep far fewer entries: stored as they come instead
            slots = None
    return RowStore(lay.n_nodes, cfg.store_threshold, np_dt, lay.layer, slots=slots)


def _physical_memory() -> int:
    """Bytes of RAM (Linux/macOS sysconf; a large value where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62


def _batches(idx: np.ndarray, cand: Candidates, B: int) -> Iterator[np.ndarray]:
    """Feature rows ``idx`` as backward batches of ≤ B: in (position, layer) order, so that a batch
    spans few positions (its pass runs over positions ≤ its highest) and its rows join the pass at
    their own layers (_linear.py: the rows at or above a layer are a prefix), each batch then sorted by
    layer descending as :meth:`LinearBackward.backward_into` takes them."""
    idx = np.asarray(idx)
    idx = idx[np.lexsort((idx, cand.layer[idx], cand.pos[idx]))]
    for s in range(0, len(idx), B):
        take = idx[s : s + B]
        yield take[np.argsort(-cand.layer[take], kind="stable")]


# ---- 4. fold ------------------------------------------------------------------------------------
def _fold(store: RowStore, lay: NodeLayout, selected: np.ndarray) -> tuple[np.ndarray, Adjacency]:
    """The graph's nodes (``keep`` [n_nodes]) and its adjacency: unselected features' columns summed
    into the error node at their (layer, position); their rows (none were computed) dropped."""
    keep, col_map = lay.fold(selected)
    return keep, store.assemble(keep, col_map)


# ---- 5. node values and κ -----------------------------------------------------------------------
def _node_values(rm: ReplacementModel, run: CleanRun, cand: Candidates, tgts: list[LogitTarget],
                 selected: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(activation, κ, value) [n_nodes] over the full layout. Activation: a feature's a, an error
    node's ‖ε + the writes of the unselected features folded into it‖, a logit's value."""
    lay = cand.layout
    bias, value = _bias_and_values(rm, run, cand, tgts)
    activation = np.zeros(lay.n_nodes)
    ix = [torch.as_tensor(a, device=run.act.device) for a in (cand.layer, cand.pos, cand.feat)]
    activation[lay.features] = run.act[ix[0], ix[1], ix[2]].double().cpu().numpy()
    err_vec = run.error.clone()
    unsel = np.arange(lay.n_nodes)[lay.features][~selected]
    for l in range(rm.n_layers) if len(unsel) else ():  # an unselected feature's write joins its error node
        m = unsel[cand.layer[unsel] == l]
        if len(m):
            err_vec[l].index_add_(0, torch.as_tensor(cand.pos[m], device=err_vec.device), cand.writes(m))
    err_norm = err_vec.norm(dim=-1).double().cpu().numpy()  # [L, T]
    activation[lay.errors] = err_norm[lay.layer[lay.errors], lay.pos[lay.errors]]
    activation[lay.logits] = value[lay.logits]
    return activation, bias, value


def _bias_and_values(
    rm: ReplacementModel, run: CleanRun, cand: Candidates, tgts: list[LogitTarget]
) -> tuple[np.ndarray, np.ndarray]:
    """κ and the target values for every candidate node (features and logits; 0 elsewhere): κ is the
    target's value in the frozen model with h0 = 0 and each MLP write = b_dec (position 0 keeps its
    whole constant MLP output)."""
    lay = cand.layout
    T = run.n_pos
    writes = []
    for l, w in enumerate(rm.clean_writes(run)):
        z = rm.transcoders[l].b_dec.expand(T, -1).clone()
        z[0] = w[0]  # position 0 keeps its whole constant MLP output
        writes.append(z[None])
    out = rm.frozen(run, torch.zeros_like(run.h0)[None], writes)
    bias = np.zeros(lay.n_nodes)
    value = np.zeros(lay.n_nodes)
    starts = lay.feature_layer_starts
    for l in range(rm.n_layers):
        sel = np.arange(starts[l], starts[l + 1])
        if not len(sel):
            continue
        f = torch.as_tensor(cand.feat[sel], device=run.x.device)
        p = torch.as_tensor(cand.pos[sel], device=run.x.device)
        tc = rm.transcoders[l]
        bias[sel] = ((out.x[l][0, p] * tc.W_enc[f]).sum(-1) + tc.b_enc[f]).double().cpu().numpy()
        value[sel] = run.pre[l, p, f].double().cpu().numpy()
    vec = torch.stack([t.vector for t in tgts]).to(run.final)  # [K, d]
    bias[lay.logits] = (vec @ out.final[0, T - 1]).double().cpu().numpy()
    value[lay.logits] = (vec @ run.final[T - 1]).double().cpu().numpy()
    return bias, value


def _metadata(lm: LoadedModel, ts: TranscoderSet, cfg: AttributionConfig, stats: AttributionStats) -> dict:
    """The graph's provenance: model, transcoders, config, stats, hook points, position 0."""
    return {
        "model": {"id": lm.model_id, "architecture": lm.adapter.name, "n_layers": lm.n_layers, "d_model": lm.d_model},
        "transcoders": {k: v for k, v in ts.config.to_dict().items() if k not in ("metrics", "training")},
        "transcoder_training": ts.config.training,
        "transcoder_metrics": ts.config.metrics,
        "attribution": asdict(cfg),
        "stats": asdict(stats),
        "hook_points": {"in": ts.config.hook_in, "out": ts.config.hook_out},
        "position_0": POSITION_0,
    }
