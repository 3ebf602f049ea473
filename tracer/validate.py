"""Validating circuit hypotheses and attribution graphs by intervention (docs/design.md §6).

A hypothesis is a set of graph nodes (feature, error or token node indices; supernodes as lists of
indices) and an action: ``ablate`` (every member × 0), ``scale`` (× value) or ``steer`` (every member
feature set to the activation ``value``). Member s moves from a_s to v_s.

Predictions from the graph (both linear, around the clean run):

direct
    Δ_t = Σ_{s∈H} (v_s/a_s − 1)·A[t, s]. This is what all-layer ``constrained`` patching measures, and
    there it is exact: with patterns, denominators and every MLP output frozen the model is the
    graph's linear replacement model.
total
    Direct effects propagated through feature→feature edges only: downstream feature t responds with
    δa_t = δpre_t (an active feature's activation is locally linear in its pre-activation; the active
    set is kept) and writes (δa_t/a_t)·A[u, t] into every later target u. With J[u, t] = A[u, t]/a_t over
    feature sources t ∉ H (members are clamped; errors and tokens are constants of the replacement model),
    total = (I − J)⁻¹·direct, solved exactly by one forward sweep in layer order (the graph is a DAG).
    It is the first-order prediction of ``iterative`` patching, and is compared with ``unfrozen`` too.
On a pruned graph both only see the kept edges.

Verdict per hypothesis and mode, on its primary target (a logit node): the mode's prediction
(``constrained``: direct; ``iterative``/``unfrozen``: total) p and the measured change m of the demeaned
logit. ``supported`` when |p| ≥ noise_floor, |m| ≥ noise_floor and min_ratio ≤ m/p ≤ max_ratio (so the
signs agree); ``not supported`` otherwise, except ``inconclusive`` when |p| and |m| are both below the
noise floor (nothing predicted, nothing measured). The same rule over every reported target gives the
mode's ``agreement`` (fraction of targets with |p| or |m| ≥ noise floor that satisfy it).

``verify_graph`` re-checks a random sample of stored edges: doubling source s under all-layer
constrained patching must move target t by A[t, s].
"""

from __future__ import annotations

import contextlib
import json
import os
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from sparsetrace._atomic import atomic_write
from sparsetrace.config import RunConfig, ValidationConfig, VerifyConfig
from sparsetrace.errors import ConfigError, FormatError, GraphError
from sparsetrace.graphs import AttributionGraph, NodeKind
from sparsetrace.graphs.records import ValidationRecord, attribution_setting, prune_summary_of
from sparsetrace.transcoders import TranscoderSet

from .interventions import FeatureRef, Intervention, intervene_batch
from ..models.loading import LoadedModel
from .replacement import ReplacementModel

__all__ = [
    "ACTIONS",
    "Hypothesis",
    "ValidationConfig",
    "Prediction",
    "TargetEffect",
    "ModeVerdict",
    "HypothesisResult",
    "ValidationReport",
    "EdgeCheck",
    "VerifyReport",
    "predict",
    "validate",
    "verify_graph",
    "build_hypotheses",
    "auto_hypotheses",
]

ACTIONS = ("ablate", "scale", "steer")
VERDICTS = ("supported", "not supported", "inconclusive")
PREDICTION_OF_MODE = {"constrained": "direct", "iterative": "total", "unfrozen": "total"}


# ---- records ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hypothesis:
    """A set of nodes and what to do to them."""

    name: str
    nodes: tuple[int | tuple[int, ...], ...]
    """Node indices of the graph; a nested tuple/list is a supernode group (its members are flattened)."""
    action: str = "ablate"
    """ablate, scale or steer."""
    value: float = 0.0
    """scale: the factor; steer: the activation every member feature is set to; ablate: unused."""
    target: int = 0
    """The primary target: logit index k (0 = the top logit)."""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"action={self.action!r}; allowed: {', '.join(ACTIONS)}")
        nodes = tuple(tuple(int(i) for i in n) if isinstance(n, (list, tuple, np.ndarray)) else int(n) for n in self.nodes)
        if not nodes or any(isinstance(n, tuple) and not n for n in nodes):
            raise ConfigError(f"hypothesis {self.name!r}: nodes={self.nodes!r}; allowed: a non-empty list of indices / groups")
        object.__setattr__(self, "nodes", nodes)
        if not math.isfinite(float(self.value)):
            raise ConfigError(f"value={self.value!r}; allowed: a finite number")
        object.__setattr__(self, "value", float(self.value))

    def members(self) -> tuple[int, ...]:
        """The flattened, de-duplicated node indices (first-seen order)."""
        out: list[int] = []
        for n in self.nodes:
            for i in n if isinstance(n, tuple) else (n,):
                if i not in out:
                    out.append(i)
        return tuple(out)




@dataclass(frozen=True, eq=False)
class Prediction:
    """Predicted change of every node's value (features: pre-activation; logits: demeaned logit);
    zero at error and token nodes and at the hypothesis' own members."""

    direct: np.ndarray
    """float64 [N]."""
    total: np.ndarray
    """float64 [N]."""


@dataclass(frozen=True)
class TargetEffect:
    """Predicted and measured change of one target node."""

    node: int
    node_id: str
    label: str
    kind: str
    """logit or feature."""
    predicted_direct: float
    predicted_total: float
    measured: dict[str, float]
    """mode → measured change."""


@dataclass(frozen=True)
class ModeVerdict:
    """The verdict of one hypothesis in one mode, on its primary target."""

    mode: str
    prediction: str
    """direct or total: which prediction this mode is held to."""
    predicted: float
    measured: float
    ratio: float | None
    """measured / predicted (None when the prediction is 0)."""
    verdict: str
    """supported, not supported or inconclusive."""
    agreement: float | None
    """Fraction of the reported targets (logits and features) with an effect that agree; None if none has one."""

    def line(self) -> str:
        r = "n/a" if self.ratio is None else f"{self.ratio:.2f}"
        return (f"{self.verdict} in {self.mode} (predicted {self.prediction} {self.predicted:+.4g}, "
                f"measured {self.measured:+.4g}, ratio {r})")


@dataclass(frozen=True)
class HypothesisResult:
    """Everything about one hypothesis."""

    hypothesis: Hypothesis
    members: tuple[str, ...]
    """Readable ids of the member nodes."""
    target_label: str
    effects: tuple[TargetEffect, ...]
    """Logit targets first, then the reported downstream features."""
    verdicts: tuple[ModeVerdict, ...]

    @property
    def summary(self) -> str:
        return f"{self.hypothesis.name}: " + "; ".join(v.line() for v in self.verdicts)

    def supported_in(self) -> tuple[str, ...]:
        return tuple(v.mode for v in self.verdicts if v.verdict == "supported")


@dataclass(frozen=True)
class ValidationReport:
    """Predicted vs measured effects of a list of hypotheses on one graph's prompt."""

    prompt: str
    token_ids: tuple[int, ...]
    config: ValidationConfig
    results: tuple[HypothesisResult, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Atomic write of :meth:`to_json`."""
        text = self.to_json()
        return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def save_plot(self, path: str | os.PathLike) -> Path:
        """A PNG: per hypothesis, a bar chart of the primary target (predictions vs each mode's measured
        change) and a scatter of predicted vs measured over all its targets. Atomic write."""
        fig = _plot(self)
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))

    def summary(self) -> str:
        return "\n".join(r.summary for r in self.results)

    def records(self) -> list[ValidationRecord]:
        """One record per hypothesis for the graph and its card: what was tested, the verdict per mode,
        and whether it was supported in any mode."""
        return [ValidationRecord(r.hypothesis.action, f"{r.hypothesis.name} → {r.target_label!r}",
                                 "; ".join(v.line() for v in r.verdicts), bool(r.supported_in()))
                for r in self.results]


@dataclass(frozen=True)
class EdgeCheck:
    """One re-checked edge: doubling ``source`` moved ``target`` by ``measured`` (the graph says ``weight``)."""

    target: int
    source: int
    target_id: str
    source_id: str
    weight: float
    measured: float
    abs_error: float
    rel_error: float
    passed: bool


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_graph`."""

    n_edges: int
    """Stored edges the sample was drawn from (checkable ones)."""
    n_checked: int
    n_skipped: int
    """Stored edges that cannot be checked (custom logit targets; error sources of pruned row-budget graphs)."""
    max_abs_error: float
    max_rel_error: float
    atol: float
    rtol: float
    dtype: str
    passed: bool
    """Every checked edge has |measured − A| ≤ atol + rtol·|A|."""
    checks: tuple[EdgeCheck, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def record(self) -> ValidationRecord:
        """The record of this check for the graph and its card."""
        return ValidationRecord("verify", f"{self.n_checked} edges re-checked by all-layer constrained patching",
                                self.summary(), self.passed)

    def summary(self) -> str:
        word = "PASS" if self.passed else "FAIL"
        return (f"{word}: {self.n_checked} edges re-checked by all-layer constrained patching ({self.dtype}); "
                f"max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g} "
                f"(tolerance {self.atol:g} + {self.rtol:g}·|A|); {self.n_skipped} edges not checkable")


# ---- helpers ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _graph_dtype(graph: AttributionGraph, lm: LoadedModel, ts: TranscoderSet) -> Iterator[None]:
    """Run in the dtype the graph was attributed in (its metadata), as ``attribute`` did; restore after."""
    name = attribution_setting(graph, "dtype", "float32")
    dt = {"float32": torch.float32, "float64": torch.float64}.get(name)
    if dt is None:
        raise GraphError(f"graph metadata attribution.dtype={name!r}; allowed: float32, float64")
    old, ts_old = lm.dtype, ts[0].W_enc.dtype
    lm.to(dtype=dt)
    ts.to(dtype=dt)
    try:
        yield
    finally:
        lm.to(dtype=old)
        ts.to(dtype=ts_old)


def _check_graph(graph: AttributionGraph, lm: LoadedModel, ts: TranscoderSet):
    """Refuse grouped graphs and graphs made with another model or transcoder set; return the clean run."""
    lay = graph.layout
    if np.any(lay.feature[lay.features] < 0):
        raise GraphError("graph has supernodes (grouped features); pass the ungrouped graph and give groups as lists of node indices")
    if lay.n_layers != lm.n_layers:
        raise GraphError(f"graph has {lay.n_layers} layers, model {lm.model_id!r} has {lm.n_layers}")
    run = ReplacementModel(lm, ts).run(torch.as_tensor(graph.token_ids))
    f = lay.features
    if lay.n_features:
        act = run.act[lay.layer[f], lay.pos[f], lay.feature[f]].double().cpu().numpy()
        ga = graph.activation[f].astype(np.float64)
        err = np.abs(act - ga).max() / max(np.abs(ga).max(), 1e-12)
        if err > 1e-3:
            raise GraphError(
                f"the graph's feature activations differ from this model + transcoder set's by {err:.2g} "
                "(relative); was it made with other transcoders or another model?"
            )
    return run


def _as_interventions(
    graph: AttributionGraph, members: Sequence[int], action: str, value: float, run=None
) -> list[Intervention]:
    """The interventions of a hypothesis. In a row-budget graph an error node is everything at its
    (layer, position) that the graph does not name: ε plus the active features that are not nodes
    (attribution folded them in), so with the clean ``run`` given those features get the same action."""
    lay = graph.layout
    fold = run is not None and attribution_setting(graph, "max_feature_nodes") is not None
    out = []
    for i in members:
        if not 0 <= i < graph.n_nodes:
            raise GraphError(f"node {i} outside 0..{graph.n_nodes - 1}")
        kind = NodeKind(int(lay.kind[i]))
        l, c = int(lay.layer[i]), int(lay.pos[i])
        if kind is NodeKind.LOGIT:
            raise GraphError(f"node {lay.node_id(i)} is a logit; a hypothesis is made of features, errors or tokens")
        if kind is NodeKind.FEATURE:
            f = int(lay.feature[i])
            out.append(
                Intervention.zero_feature(l, c, f) if action == "ablate"
                else Intervention.scale_feature(l, c, f, value) if action == "scale"
                else Intervention.set_feature(l, c, f, value)
            )
            continue
        if action == "steer":
            raise ConfigError(f"action='steer' on {lay.node_id(i)} ({kind.name.lower()}); allowed for errors/tokens: ablate, scale")
        x = 0.0 if action == "ablate" else value
        if kind is NodeKind.TOKEN:
            out.append(Intervention.scale_token(c, x))
            continue
        out.append(Intervention.scale_error(l, c, x))
        if fold and c > 0:
            fs = lay.features
            named = set(lay.feature[fs][(lay.layer[fs] == l) & (lay.pos[fs] == c)].tolist())
            for f in torch.nonzero(run.act[l, c] > 0).flatten().tolist():
                if f not in named:
                    out.append(Intervention.scale_feature(l, c, f, x))
    return out


def _factors(graph: AttributionGraph, members: Sequence[int], action: str, value: float) -> np.ndarray:
    """v_s/a_s − 1 per member."""
    if action == "ablate":
        return np.full(len(members), -1.0)
    if action == "scale":
        return np.full(len(members), value - 1.0)
    a = graph.activation[list(members)].astype(np.float64)
    if np.any(a == 0):
        raise GraphError("cannot steer a node whose activation is 0 (v/a undefined)")
    return value / a - 1.0


def predict(graph: AttributionGraph, hypothesis: Hypothesis) -> Prediction:
    """The graph's direct and total predictions for a hypothesis (module docstring)."""
    members = list(hypothesis.members())
    _as_interventions(graph, members, hypothesis.action, hypothesis.value)  # validates the members
    fac = np.zeros(graph.n_nodes)
    fac[members] = _factors(graph, members, hypothesis.action, hypothesis.value)
    adj, lay = graph.adjacency, graph.layout
    rows = adj.rows()
    w = adj.data.astype(np.float64)
    direct = np.bincount(rows, weights=w * fac[adj.indices], minlength=graph.n_nodes)
    # J[u, t] = A[u, t] / a_t over feature sources t outside the hypothesis
    is_src = np.zeros(graph.n_nodes, dtype=bool)
    is_src[lay.features] = True
    is_src[members] = False
    a = graph.activation.astype(np.float64)
    scale = np.where(is_src & (a != 0), 1.0 / np.where(a != 0, a, 1.0), 0.0)
    jw = w * scale[adj.indices]
    total = direct.copy()
    # forward sweep in layer order: a target's feature sources sit at strictly lower layers
    order = np.r_[np.arange(lay.features.start, lay.features.stop), np.arange(lay.logits.start, lay.logits.stop)]
    for l in np.unique(lay.layer[order]):
        ts_ = order[lay.layer[order] == l]
        for t in ts_:
            s, e = adj.indptr[t], adj.indptr[t + 1]
            if e > s:
                total[t] = direct[t] + float(jw[s:e] @ total[adj.indices[s:e]])
    direct[members] = 0.0
    total[members] = 0.0
    direct[lay.errors] = total[lay.errors] = 0.0
    direct[lay.tokens] = total[lay.tokens] = 0.0
    return Prediction(direct, total)


def _judge(p: float, m: float, cfg: ValidationConfig) -> tuple[str, float | None]:
    ratio = m / p if p != 0 else None
    small_p, small_m = abs(p) < cfg.noise_floor, abs(m) < cfg.noise_floor
    if small_p and small_m:
        return "inconclusive", ratio
    if small_p or small_m:
        return "not supported", ratio
    ok = ratio is not None and cfg.min_ratio <= ratio <= cfg.max_ratio
    return ("supported" if ok else "not supported"), ratio


# ---- validation -------------------------------------------------------------------------------
def validate(
    graph: AttributionGraph,
    lm: LoadedModel,
    transcoders: TranscoderSet,
    hypotheses: Sequence[Hypothesis],
    config: ValidationConfig | None = None,
) -> ValidationReport:
    """Predict each hypothesis' effects from the graph, measure them in each mode on the real model
    (the graph's prompt, in the graph's dtype) and judge them (module docstring)."""
    cfg = config or ValidationConfig()
    if not hypotheses:
        raise ConfigError("hypotheses=[]; give at least one Hypothesis")
    lay = graph.layout
    K = lay.n_logits
    for h in hypotheses:
        if not isinstance(h, Hypothesis):
            raise ConfigError(f"hypothesis {h!r}; allowed: Hypothesis records")
        if not 0 <= h.target < K:
            raise ConfigError(f"hypothesis {h.name!r}: target={h.target}; allowed: 0..{K - 1} (logit index)")
        if graph.logit_token[h.target] < 0:
            raise ConfigError(f"hypothesis {h.name!r}: target {h.target} is a custom direction; pick a token logit")
    preds = [predict(graph, h) for h in hypotheses]
    logit_k = [k for k in range(K) if graph.logit_token[k] >= 0]
    feat_nodes: list[list[int]] = []
    for h, p in zip(hypotheses, preds):
        tot = np.abs(p.total[lay.features])
        top = np.argsort(-tot, kind="stable")[: cfg.n_feature_targets]
        feat_nodes.append([int(lay.features.start + j) for j in top if tot[j] > 0])
    union = sorted({i for fs in feat_nodes for i in fs})
    refs = [FeatureRef(int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])) for i in union]
    measured: dict[str, list] = {}
    with _graph_dtype(graph, lm, transcoders):
        run = _check_graph(graph, lm, transcoders)
        sets = [_as_interventions(graph, list(h.members()), h.action, h.value, run) for h in hypotheses]
        for mode in cfg.modes:
            measured[mode] = intervene_batch(
                [int(t) for t in graph.token_ids], lm, transcoders, sets, mode=mode,
                target_tokens=[int(graph.logit_token[k]) for k in logit_k], features=refs, batch_size=cfg.batch_size,
            )
    results = []
    for hi, (h, p) in enumerate(zip(hypotheses, preds)):
        effects = []
        for j, k in enumerate(logit_k):
            node = int(lay.logit_index(k))
            meas = {m: float(measured[m][hi].target_delta[j]) for m in cfg.modes}
            effects.append(TargetEffect(node, lay.node_id(node), graph.logit_label[k], "logit",
                                        float(p.direct[node]), float(p.total[node]), meas))
        for i in feat_nodes[hi]:
            j = union.index(i)
            meas = {m: float(measured[m][hi].feature_pre_delta[j]) for m in cfg.modes}
            effects.append(TargetEffect(i, lay.node_id(i), lay.node_id(i), "feature",
                                        float(p.direct[i]), float(p.total[i]), meas))
        prim = effects[logit_k.index(h.target)]
        verdicts = []
        for m in cfg.modes:
            kind = PREDICTION_OF_MODE[m]
            pv = prim.predicted_direct if kind == "direct" else prim.predicted_total
            verdict, ratio = _judge(pv, prim.measured[m], cfg)
            judged = []
            for e in effects:
                q = e.predicted_direct if kind == "direct" else e.predicted_total
                v, _ = _judge(q, e.measured[m], cfg)
                if v != "inconclusive":
                    judged.append(v == "supported")
            agreement = float(np.mean(judged)) if judged else None
            verdicts.append(ModeVerdict(m, kind, pv, prim.measured[m], ratio, verdict, agreement))
        results.append(HypothesisResult(h, tuple(lay.node_id(i) for i in h.members()),
                                        graph.logit_label[h.target], tuple(effects), tuple(verdicts)))
    return ValidationReport(graph.prompt, tuple(int(t) for t in graph.token_ids), cfg, tuple(results))


def _plot(report: ValidationReport):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(report.results)
    fig = Figure(figsize=(11, 3.4 * n))
    FigureCanvasAgg(fig)
    modes = report.config.modes
    colors = {"constrained": "tab:blue", "iterative": "tab:orange", "unfrozen": "tab:green"}
    for r, res in enumerate(report.results):
        ax = fig.add_subplot(n, 2, 2 * r + 1)
        prim = next(e for e in res.effects if e.label == res.target_label and e.kind == "logit")
        names = ["pred. direct", "pred. total"] + [f"meas. {m}" for m in modes]
        vals = [prim.predicted_direct, prim.predicted_total] + [prim.measured[m] for m in modes]
        cols = ["0.35", "0.6"] + [colors[m] for m in modes]
        ax.bar(range(len(vals)), vals, color=cols)
        ax.set_xticks(range(len(vals)), names, rotation=20, fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{res.hypothesis.name}: Δ logit {res.target_label!r}", fontsize=9)
        ax2 = fig.add_subplot(n, 2, 2 * r + 2)
        lo, hi = 0.0, 0.0
        for m in modes:
            kind = PREDICTION_OF_MODE[m]
            xs = [e.predicted_direct if kind == "direct" else e.predicted_total for e in res.effects]
            ys = [e.measured[m] for e in res.effects]
            ax2.scatter(xs, ys, s=14, color=colors[m], label=f"{m} vs {kind}", alpha=0.8)
            lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
        ax2.plot([lo, hi], [lo, hi], color="k", lw=0.6, ls="--")
        ax2.set_xlabel("predicted change", fontsize=8)
        ax2.set_ylabel("measured change", fontsize=8)
        ax2.legend(fontsize=7)
        ax2.set_title("; ".join(f"{v.mode}: {v.verdict}" for v in res.verdicts), fontsize=8)
    fig.tight_layout()
    return fig


# ---- verify -----------------------------------------------------------------------------------
def verify_graph(
    graph: AttributionGraph,
    lm: LoadedModel,
    transcoders: TranscoderSet,
    n_samples: int = VerifyConfig.n_samples,
    seed: int = RunConfig.seed,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    batch_size: int = VerifyConfig.batch_size,
) -> VerifyReport:
    """Re-check ``n_samples`` random stored edges on the real model: doubling source s under all-layer
    constrained patching (frozen patterns, denominators and MLP outputs) must move target t by A[t, s].

    Runs in the graph's dtype. Default tolerance |measured − A| ≤ atol + rtol·|A|: float64 1e-8 + 1e-6·|A|,
    float32 2e-3 + 1e-2·|A|. An error node of a row-budget graph also holds the unselected features at its
    (layer, position), so they are doubled with it.
    """
    if n_samples < 1:
        raise ConfigError(f"n_samples={n_samples}; allowed: ≥ 1")
    dtype = attribution_setting(graph, "dtype", "float32")
    d_atol, d_rtol = (1e-8, 1e-6) if dtype == "float64" else (2e-3, 1e-2)
    atol = d_atol if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    if atol < 0 or rtol < 0:
        raise ConfigError(f"atol={atol}, rtol={rtol}; allowed: ≥ 0")
    lay, adj = graph.layout, graph.adjacency
    rows, cols = adj.rows(), adj.indices
    budget = attribution_setting(graph, "max_feature_nodes") is not None
    # a pruned row-budget graph: its error nodes hold the unselected features but not the pruned ones,
    # which can no longer be told apart, so their edges are not checked
    fold_ambiguous = budget and prune_summary_of(graph) is not None
    token_of = np.full(graph.n_nodes, -1, dtype=np.int64)
    token_of[lay.logits] = graph.logit_token
    t_ok = (lay.kind[rows] == NodeKind.FEATURE) | ((lay.kind[rows] == NodeKind.LOGIT) & (token_of[rows] >= 0))
    s_ok = np.isin(lay.kind[cols], [NodeKind.FEATURE, NodeKind.ERROR, NodeKind.TOKEN])
    if fold_ambiguous:
        s_ok &= lay.kind[cols] != NodeKind.ERROR
    ok = np.flatnonzero(t_ok & s_ok)
    if len(ok) == 0:
        raise GraphError("the graph has no checkable edges")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(ok, size=min(n_samples, len(ok)), replace=False))
    sources = sorted({int(cols[e]) for e in pick})
    t_feat = sorted({int(rows[e]) for e in pick if lay.kind[rows[e]] == NodeKind.FEATURE})
    t_logit = sorted({int(rows[e]) for e in pick if lay.kind[rows[e]] == NodeKind.LOGIT})
    refs = [FeatureRef(int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])) for i in t_feat]
    tokens = [int(graph.logit_token[i - lay.logits.start]) for i in t_logit]
    with _graph_dtype(graph, lm, transcoders):
        run = _check_graph(graph, lm, transcoders)
        sets = []
        sets = [_as_interventions(graph, [s], "scale", 2.0, run) for s in sources]
        res = intervene_batch(
            [int(t) for t in graph.token_ids], lm, transcoders, sets, mode="constrained",
            target_tokens=tokens, features=refs, batch_size=batch_size,
        )
    checks = []
    for e in pick:
        t, s = int(rows[e]), int(cols[e])
        r = res[sources.index(s)]
        if lay.kind[t] == NodeKind.FEATURE:
            m = float(r.feature_pre_delta[t_feat.index(t)])
        else:
            m = float(r.target_delta[t_logit.index(t)])
        w = float(adj.data[e])
        err = abs(m - w)
        checks.append(EdgeCheck(t, s, lay.node_id(t), lay.node_id(s), w, m, err, err / max(abs(w), 1e-30),
                                err <= atol + rtol * abs(w)))
    return VerifyReport(
        n_edges=int(len(ok)), n_checked=len(checks), n_skipped=int(adj.nnz - len(ok)),
        max_abs_error=max(c.abs_error for c in checks), max_rel_error=max(c.rel_error for c in checks),
        atol=atol, rtol=rtol, dtype=dtype, passed=all(c.passed for c in checks), checks=tuple(checks),
    )


# ---- hypotheses from node ids (NodeLayout.parse_nodes) ----------------------------------------
def _valued(flag: str, text: str) -> tuple[str, float]:
    """``NODES=VALUE`` → (NODES, VALUE); a ConfigError naming ``flag`` otherwise."""
    if "=" not in text:
        raise ConfigError(f"{flag} {text!r}; allowed form: NODES=VALUE, e.g. F3.12@5=0.5")
    nodes, val = text.rsplit("=", 1)
    try:
        return nodes, float(val)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: {val!r} is not a number") from None


def auto_hypotheses(graph: AttributionGraph, target: int, n: int) -> list[Hypothesis]:
    """Ablate each of the ``n`` most influential features (by influence on the targets), one at a time."""
    from sparsetrace.graphs.prune import node_influence

    infl = node_influence(graph)
    feats = [i for i in infl.argsort()[::-1] if graph.layout.kind[i] == NodeKind.FEATURE][:n]
    if not feats:
        raise ConfigError("the graph has no feature nodes to validate; give --ablate/--scale/--steer")
    return [Hypothesis(f"ablate {graph.layout.node_id(int(i))}", (int(i),), "ablate", 0.0, target) for i in feats]


def build_hypotheses(graph: AttributionGraph, ablates: Sequence[str] = (), scales: Sequence[str] = (),
                     steers: Sequence[str] = (), target: int = ValidationConfig.target,
                     auto: int = ValidationConfig.auto) -> list[Hypothesis]:
    """Hypotheses from node-id strings — ``ablates`` (``NODES``), ``scales`` (``NODES=FACTOR``), ``steers``
    (``NODES=ACTIVATION``), with NODES as :meth:`NodeLayout.parse_nodes` reads them — or, when none is given,
    :func:`auto_hypotheses` with ``auto`` features. Errors name the ``validate`` option (--ablate/--scale/--steer)."""
    hs = [Hypothesis(f"ablate {text}", graph.layout.parse_nodes(text), "ablate", 0.0, target) for text in ablates]
    for flag, action, items in (("--scale", "scale", scales), ("--steer", "steer", steers)):
        for text in items:
            nodes, v = _valued(flag, text)
            hs.append(Hypothesis(f"{action} {nodes}×{v:g}" if action == "scale" else f"steer {nodes}={v:g}",
                                 graph.layout.parse_nodes(nodes), action, v, target))
    return hs if hs else auto_hypotheses(graph, target, auto)
