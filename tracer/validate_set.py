"""Circuit hypotheses tested over a traced prompt set (docs/design.md §15).

A hypothesis file (JSON) names supernodes — lists of (layer, feature) at a *role* (a template field's
position or ``end-K``, as ``recur``) — and hypotheses: which supernodes, an action (``ablate``: set
to 0; ``scale``: × value; ``steer``: set to the activation value), and the expected sign of the
effect on a metric. The metric is logit(a) − logit(b), with ``a`` and ``b`` single-token strings
written as templates over the prompt's fields (``" {A}"``) or its targets (``{target0}``)::

    {"metric": {"a": " {A}", "b": " {B}"},
     "supernodes": {"movers": {"role": "end-1", "features": [[20, 1234], [22, 77]]}},
     "hypotheses": [{"name": "ablate movers", "supernodes": ["movers"], "action": "ablate",
                     "expect": "decrease"}]}

For every done prompt of the set and every mode (constrained over all layers, iterative, unfrozen:
tracer/interventions.py), the change of the metric is measured on the model. Per hypothesis and mode
the report gives: the effect per prompt; its mean with a percentile-bootstrap CI over prompts; the
fraction of prompts where the sign is the expected one; the graph's predicted effect (the prompt's
full graph, ``validate.predict``: direct for constrained, total for the others; defined when the
graph has logit nodes for a and b, and steered members are active) and its Pearson correlation with
the measured one; a baseline of random feature sets of equal size and activation mass (each member
replaced by a feature at its layer and position whose activation is among the ``K_NEAR`` nearest to
the member's; an inactive member by an inactive feature); and faithfulness: with every feature node of
the graph outside the circuit (the union of the file's supernodes) set to 0, the metric's share of
the full model's, normalised by the model with every feature node at 0:
(m_circuit − m_empty) / (m_full − m_empty).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sparsetrace.config import EXPECTS, ValidateSetConfig
from sparsetrace.errors import ConfigError, GraphError
from sparsetrace.graphs import AttributionGraph
from sparsetrace.graphs.recur import TracedPrompt, bootstrap_ci

from .interventions import Intervention, intervene_batch
from .prompt_sets import fill_template, role_position
from .validate import ACTIONS, PREDICTION_OF_MODE, Hypothesis, _graph_dtype, predict

__all__ = ["SetHypothesis", "HypothesisFile", "load_hypotheses", "validate_set", "K_NEAR"]

K_NEAR = 5
"""Random baseline: a member's stand-in is drawn from the K_NEAR features nearest in activation."""
FILE_KEYS = ("metric", "supernodes", "hypotheses")
HYP_KEYS = ("name", "supernodes", "action", "value", "expect")


@dataclass(frozen=True)
class SetHypothesis:
    name: str
    supernodes: tuple[str, ...]
    action: str = "ablate"
    value: float = 0.0
    expect: str = "decrease"


@dataclass(frozen=True)
class HypothesisFile:
    metric: dict[str, str]
    """``a`` and ``b``: templates of single-token strings."""
    supernodes: dict[str, tuple[str, tuple[tuple[int, int], ...]]]
    """name → (role, ((layer, feature), …))."""
    hypotheses: tuple[SetHypothesis, ...]
    sha256: str = ""


def _fail(where: str, text: str) -> ConfigError:
    return ConfigError(f"{where}: {text}")


def _parse_supernodes(raw: Any, where: str) -> dict[str, tuple[str, tuple[tuple[int, int], ...]]]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(where, "'supernodes' must be a non-empty object {name: {role, features}}")
    out = {}
    for name, d in raw.items():
        w = f"{where}: supernode {name!r}"
        if not isinstance(d, dict) or set(d) != {"role", "features"}:
            raise _fail(w, "allowed: an object with exactly 'role' and 'features'")
        feats = d["features"]
        if not isinstance(d["role"], str) or not isinstance(feats, list) or not feats:
            raise _fail(w, "'role' must be a string and 'features' a non-empty list of [layer, feature]")
        pairs = []
        for p in feats:
            if not (isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)):
                raise _fail(w, f"feature {p!r}; allowed: [layer, feature] with integers")
            pairs.append((p[0], p[1]))
        out[name] = (d["role"], tuple(pairs))
    return out


def _parse_hypothesis(d: Any, i: int, names: set[str], where: str) -> SetHypothesis:
    w = f"{where}: hypothesis {i + 1}"
    if not isinstance(d, dict):
        raise _fail(w, "allowed: an object")
    bad = sorted(set(d) - set(HYP_KEYS))
    if bad:
        raise _fail(w, f"unknown key {bad[0]!r}; allowed: {', '.join(HYP_KEYS)}")
    sn = d.get("supernodes")
    if isinstance(sn, str):
        sn = [sn]
    if not isinstance(sn, list) or not sn:
        raise _fail(w, "'supernodes' must name at least one supernode")
    for s in sn:
        if s not in names:
            raise _fail(w, f"supernode {s!r} is not defined; defined: {', '.join(sorted(names))}")
    action, expect = d.get("action", "ablate"), d.get("expect", "decrease")
    if action not in ACTIONS:
        raise _fail(w, f"action={action!r}; allowed: {', '.join(ACTIONS)}")
    if expect not in EXPECTS:
        raise _fail(w, f"expect={expect!r}; allowed: {', '.join(EXPECTS)}")
    value = d.get("value", 0.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _fail(w, f"value={value!r}; allowed: a finite number")
    if action == "steer" and "value" not in d:
        raise _fail(w, "action 'steer' needs a 'value' (the activation to set)")
    return SetHypothesis(str(d.get("name") or f"hypothesis {i + 1}"), tuple(sn), action, float(value), expect)


def load_hypotheses(path: str | Path) -> HypothesisFile:
    """Read and check a hypothesis file (module docstring); one-line errors naming the entry."""
    path = Path(path)
    where = f"HYPOTHESES {str(path)!r}"
    try:
        blob = path.read_bytes()
        d = json.loads(blob)
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(where, f"not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise _fail(where, f"allowed: an object with keys {', '.join(FILE_KEYS)}")
    bad = sorted(set(d) - set(FILE_KEYS))
    if bad:
        raise _fail(where, f"unknown key {bad[0]!r}; allowed: {', '.join(FILE_KEYS)}")
    metric = d.get("metric")
    if not isinstance(metric, dict) or set(metric) != {"a", "b"} or not all(isinstance(v, str) and v for v in metric.values()):
        raise _fail(where, "'metric' must be {\"a\": TOKEN, \"b\": TOKEN} (templates such as \" {A}\" or \"{target0}\")")
    sn = _parse_supernodes(d.get("supernodes"), where)
    hyps = d.get("hypotheses")
    if not isinstance(hyps, list) or not hyps:
        raise _fail(where, "'hypotheses' must be a non-empty list")
    parsed = tuple(_parse_hypothesis(h, i, set(sn), where) for i, h in enumerate(hyps))
    return HypothesisFile(dict(metric), sn, parsed, hashlib.sha256(blob).hexdigest())


def check_against(hf: HypothesisFile, n_layers: int, n_features: int) -> None:
    """Every (layer, feature) inside the model's layers and the transcoder set's width."""
    for name, (_, feats) in hf.supernodes.items():
        for l, f in feats:
            if not 0 <= l < n_layers:
                raise ConfigError(f"supernode {name!r}: layer {l} of [{l}, {f}]; allowed: 0..{n_layers - 1}")
            if not 0 <= f < n_features:
                raise ConfigError(f"supernode {name!r}: feature id {f} of [{l}, {f}] is beyond the set's width "
                                  f"{n_features}; allowed: 0..{n_features - 1}")


# ---- one prompt -------------------------------------------------------------------------------------------
def _metric_tokens(hf: HypothesisFile, entry: dict, tokenizer) -> tuple[int, int]:
    values = dict(entry.get("fields") or {})
    values.update({f"target{i}": t for i, t in enumerate(entry.get("targets") or [])})
    out = []
    for side in ("a", "b"):
        text = fill_template(hf.metric[side], values, f"metric {side} for prompt {entry['id']!r}")[0]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"metric {side}={hf.metric[side]!r} gives {text!r} for prompt {entry['id']!r}: "
                              f"{len(ids)} tokens; it must be exactly one token")
        out.append(int(ids[0]))
    return out[0], out[1]


def _members(hf: HypothesisFile, names: Sequence[str], entry: dict, n_tokens: int) -> list[tuple[int, int, int]]:
    """(layer, position, feature) of every member of the named supernodes in this prompt."""
    out: list[tuple[int, int, int]] = []
    for name in names:
        role, feats = hf.supernodes[name]
        pos = role_position(role, entry.get("positions") or {}, n_tokens, f"supernode {name!r}, prompt {entry['id']!r}")
        for l, f in feats:
            if (l, pos, f) not in out:
                out.append((l, pos, f))
    return out


def _interventions(members: Sequence[tuple[int, int, int]], action: str, value: float) -> list[Intervention]:
    if action == "ablate":
        return [Intervention.zero_feature(l, c, f) for l, c, f in members]
    if action == "scale":
        return [Intervention.scale_feature(l, c, f, value) for l, c, f in members]
    return [Intervention.set_feature(l, c, f, value) for l, c, f in members]


def _activations(g: AttributionGraph) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """(layer, position) → (feature ids, activations) of the graph's feature nodes."""
    lay = g.layout
    idx = np.arange(lay.features.start, lay.features.stop)
    out: dict[tuple[int, int], tuple[list, list]] = {}
    for i in idx:
        k = (int(lay.layer[i]), int(lay.pos[i]))
        out.setdefault(k, ([], []))
        out[k][0].append(int(lay.feature[i]))
        out[k][1].append(float(g.activation[i]))
    return {k: (np.array(v[0]), np.array(v[1])) for k, v in out.items()}


def _random_sets(members, acts, n_features: int, n: int, rng: np.random.Generator) -> tuple[list[list[tuple[int, int, int]]], list[float]]:
    """``n`` random stand-in sets (module docstring) and each set's activation mass / the members'."""
    taken = set(members)
    mass = sum(_act(acts, m) for m in members)
    sets, ratios = [], []
    for _ in range(n):
        chosen: list[tuple[int, int, int]] = []
        for l, c, f in members:
            a = _act(acts, (l, c, f))
            ids, vals = acts.get((l, c), (np.zeros(0, dtype=int), np.zeros(0)))
            free = [j for j in range(len(ids)) if (l, c, int(ids[j])) not in taken and (l, c, int(ids[j])) not in chosen]
            if a > 0 and free:
                near = sorted(free, key=lambda j: abs(vals[j] - a))[:K_NEAR]
                chosen.append((l, c, int(ids[near[rng.integers(len(near))]])))
            else:
                active = set(ids.tolist())
                while True:
                    g = int(rng.integers(n_features))
                    if g not in active and (l, c, g) not in taken and (l, c, g) not in chosen:
                        break
                chosen.append((l, c, g))
        sets.append(chosen)
        got = sum(_act(acts, m) for m in chosen)
        ratios.append(got / mass if mass > 0 else float("nan"))
    return sets, ratios


def _act(acts, m: tuple[int, int, int]) -> float:
    ids, vals = acts.get((m[0], m[1]), (np.zeros(0, dtype=int), np.zeros(0)))
    hit = np.nonzero(ids == m[2])[0]
    return float(vals[hit[0]]) if hit.size else 0.0


def _predicted(g: AttributionGraph, members, action: str, value: float, a: int, b: int) -> dict[str, float]:
    """The graph's direct and total prediction of Δ(logit a − logit b) (NaN when not defined)."""
    lay = g.layout
    toks = [int(t) for t in g.logit_token]
    nan = {"direct": float("nan"), "total": float("nan")}
    if a not in toks or b not in toks:
        return nan
    nodes = []
    for l, c, f in members:
        try:
            nodes.append(int(lay.feature_index(l, c, f)))
        except GraphError:  # an inactive member is not a node: ablating or scaling it predicts nothing
            if action == "steer":
                return nan
    if not nodes:
        return {"direct": 0.0, "total": 0.0}
    p = predict(g, Hypothesis("h", tuple(nodes), action, value))
    ia, ib = int(lay.logit_index(toks.index(a))), int(lay.logit_index(toks.index(b)))
    return {"direct": float(p.direct[ia] - p.direct[ib]), "total": float(p.total[ia] - p.total[ib])}


def _prompt(tp: TracedPrompt, hf: HypothesisFile, lm, ts, cfg: ValidateSetConfig, rng) -> dict[str, Any]:
    g, entry = tp.full, tp.entry
    T = g.layout.n_pos
    a, b = _metric_tokens(hf, entry, lm.tokenizer)
    acts = _activations(g)
    circuit = _members(hf, list(hf.supernodes), entry, T)
    lay = g.layout
    feats = [(int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])) for i in range(lay.features.start, lay.features.stop)]
    sets: list[list[Intervention]] = []
    rec: dict[str, Any] = {"id": entry["id"], "a": a, "b": b, "hypotheses": []}
    for h in hf.hypotheses:
        members = _members(hf, h.supernodes, entry, T)
        rand, ratios = _random_sets(members, acts, ts.n_features, cfg.n_random, rng)
        first = len(sets)
        sets.append(_interventions(members, h.action, h.value))
        sets += [_interventions(r, h.action, h.value) for r in rand]
        rec["hypotheses"].append({"name": h.name, "members": [list(m) for m in members], "sets": (first, len(sets)),
                                  "mass_ratio": ratios, "predicted": _predicted(g, members, h.action, h.value, a, b)})
    keep = set(circuit)
    sets.append([Intervention.zero_feature(*m) for m in feats if m not in keep])
    sets.append([Intervention.zero_feature(*m) for m in feats])
    ids = [int(t) for t in g.token_ids]
    measured: dict[str, Any] = {}
    with _graph_dtype(g, lm, ts):
        for mode in cfg.modes:
            res = intervene_batch(ids, lm, ts, sets, mode=mode, target_tokens=[a, b], batch_size=cfg.batch_size)
            clean = float(res[0].clean_target_values[0] - res[0].clean_target_values[1])
            delta = [float(r.target_delta[0] - r.target_delta[1]) for r in res]
            measured[mode] = {"clean": clean, "delta": delta}
    for h in rec["hypotheses"]:
        lo, hi = h.pop("sets")
        h["measured"] = {m: measured[m]["delta"][lo] for m in cfg.modes}
        h["random"] = {m: measured[m]["delta"][lo + 1:hi] for m in cfg.modes}
    rec["metric_clean"] = {m: measured[m]["clean"] for m in cfg.modes}
    rec["faithfulness"] = {}
    for m in cfg.modes:
        full = measured[m]["clean"]
        circ, empty = full + measured[m]["delta"][-2], full + measured[m]["delta"][-1]
        rec["faithfulness"][m] = {"full": full, "circuit": circ, "empty": empty,
                                  "faithfulness": (circ - empty) / (full - empty) if full != empty else float("nan")}
    return rec


# ---- the set ----------------------------------------------------------------------------------------------
def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    pts = [(p, q) for p, q in zip(x, y) if p == p and q == q]
    if len(pts) < 3:
        return None
    a, b = np.array(pts).T
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _summary(per: list[dict], hf: HypothesisFile, cfg: ValidateSetConfig, rng) -> list[dict]:
    out = []
    for hi, h in enumerate(hf.hypotheses):
        rows = [p["hypotheses"][hi] for p in per]
        sign = -1.0 if h.expect == "decrease" else 1.0
        modes = {}
        for m in cfg.modes:
            eff = [r["measured"][m] for r in rows]
            kind = PREDICTION_OF_MODE[m]
            pred = [r["predicted"][kind] for r in rows]
            rand = [float(np.mean(r["random"][m])) if r["random"][m] else float("nan") for r in rows]
            beyond = [float(np.mean([sign * x >= sign * r["measured"][m] for x in r["random"][m]])) if r["random"][m]
                      else float("nan") for r in rows]
            mean, lo, hi_ = bootstrap_ci(eff, cfg.n_bootstrap, cfg.confidence, rng)
            rmean, rlo, rhi = bootstrap_ci(rand, cfg.n_bootstrap, cfg.confidence, rng)
            modes[m] = {
                "effect": eff, "mean": mean, "ci": [lo, hi_],
                "expected_sign_fraction": float(np.mean([sign * e > 0 for e in eff])),
                "predicted_kind": kind, "predicted": pred, "correlation": _pearson(pred, eff),
                "random_mean": rmean, "random_ci": [rlo, rhi],
                "random_beyond_fraction": float(np.nanmean(beyond)) if any(b == b for b in beyond) else None,
            }
        ratios = [x for r in rows for x in r["mass_ratio"] if x == x]
        out.append({"name": h.name, "supernodes": list(h.supernodes), "action": h.action, "value": h.value,
                    "expect": h.expect, "size": [len(r["members"]) for r in rows],
                    "random_mass_ratio": float(np.mean(ratios)) if ratios else None, "modes": modes})
    return out


def _faithfulness(per: list[dict], cfg: ValidateSetConfig, rng) -> dict[str, Any]:
    out = {}
    for m in cfg.modes:
        vals = [p["faithfulness"][m]["faithfulness"] for p in per]
        mean, lo, hi = bootstrap_ci(vals, cfg.n_bootstrap, cfg.confidence, rng)
        out[m] = {"per_prompt": vals, "mean": mean, "ci": [lo, hi]}
    return out


def validate_set(traced: Sequence[TracedPrompt], hf: HypothesisFile, lm, ts, config: ValidateSetConfig | None = None,
                 say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run every hypothesis of ``hf`` on every traced prompt (module docstring); the report as a dict."""
    cfg = config or ValidateSetConfig()
    check_against(hf, lm.n_layers, ts.n_features)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    per = []
    for i, tp in enumerate(traced, 1):
        per.append(_prompt(tp, hf, lm, ts, cfg, rng))
        say(f"[{i}/{len(traced)}] {tp.entry['id']}")
    return {"config": asdict(cfg), "metric": hf.metric, "hypotheses_sha256": hf.sha256,
            "supernodes": {k: {"role": r, "features": [list(p) for p in fs]} for k, (r, fs) in hf.supernodes.items()},
            "prompts": [tp.entry["id"] for tp in traced], "per_prompt": per,
            "results": _summary(per, hf, cfg, rng), "faithfulness": _faithfulness(per, cfg, rng)}


# ---- report files -----------------------------------------------------------------------------------------
MODE_COLORS = {"constrained": "#1f5fa8", "iterative": "#d9822b", "unfrozen": "#2e8b57"}


def plot(report: dict[str, Any]):
    """A matplotlib Figure: per hypothesis, each mode's per-prompt effects with the mean and its CI beside
    the random baseline's (left), and predicted vs measured effect per prompt (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = report["results"]
    modes = report["config"]["modes"]
    fig = Figure(figsize=(10, 3.0 * len(res) + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(res), 2, squeeze=False, gridspec_kw={"width_ratios": [1.4, 1]})
    pct = int(round(report["config"]["confidence"] * 100))
    for (ax, sc), r in zip(axes, res):
        for j, m in enumerate(modes):
            d, col = r["modes"][m], MODE_COLORS.get(m, "k")
            x = 2 * j
            ax.scatter(np.full(len(d["effect"]), x) + np.linspace(-0.15, 0.15, len(d["effect"])), d["effect"],
                       s=12, color=col, alpha=0.6)
            ax.errorbar([x + 0.35], [d["mean"]], yerr=[[d["mean"] - d["ci"][0]], [d["ci"][1] - d["mean"]]],
                        fmt="s", color=col, capsize=4)
            if d["random_mean"] == d["random_mean"]:
                ax.errorbar([x + 0.8], [d["random_mean"]], yerr=[[d["random_mean"] - d["random_ci"][0]],
                                                                  [d["random_ci"][1] - d["random_mean"]]],
                            fmt="D", color="0.55", capsize=4)
            ok = [(p, q) for p, q in zip(d["predicted"], d["effect"]) if p == p]
            if ok:
                p, q = np.array(ok).T
                corr = d["correlation"]
                sc.scatter(p, q, s=14, color=col, label=f"{m} ({d['predicted_kind']}" + (f", r={corr:.2f})" if corr is not None else ")"))
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_xticks([2 * j + 0.4 for j in range(len(modes))], modes, fontsize=8)
        ax.set_ylabel(f"Δ {report['metric']['a'].strip()} − {report['metric']['b'].strip()}", fontsize=8)
        ax.set_title(f"{r['name']}: per prompt (dots), mean ± {pct}% CI (square), random sets (grey)", fontsize=8)
        lim = [v for m in modes for v in r["modes"][m]["effect"] + [x for x in r["modes"][m]["predicted"] if x == x]]
        if lim:
            lo, hi = min(lim + [0.0]), max(lim + [0.0])
            sc.plot([lo, hi], [lo, hi], color="0.6", lw=0.7, ls="--")
        sc.set_xlabel("graph-predicted Δ", fontsize=8)
        sc.set_ylabel("measured Δ", fontsize=8)
        sc.set_title("predicted vs measured", fontsize=8)
        if sc.collections:
            sc.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def _fmt_ci(mean: float, ci: Sequence[float]) -> str:
    return f"{mean:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def card_markdown(report: dict[str, Any], provenance: dict[str, Any]) -> str:
    """The set's provenance card: where the graphs, model, transcoders and hypotheses came from, and each
    causal claim with its confidence interval."""
    cfg = report["config"]
    pct = int(round(cfg["confidence"] * 100))
    n = len(report["prompts"])
    metric = f"logit({report['metric']['a'].strip()!r}) − logit({report['metric']['b'].strip()!r})"
    lines = ["# Provenance card: circuit hypotheses over a prompt set", ""]
    lines += [f"- **{k}**: {v}" for k, v in provenance.items()]
    lines += [f"- **metric**: {metric}, templates over each prompt's fields",
              f"- **intervals**: {pct}% percentile bootstrap over the {n} prompts ({cfg['n_bootstrap']} resamples, "
              f"seed {cfg['seed']}); random baseline: {cfg['n_random']} sets per prompt of equal size and activation mass",
              "", "## Causal claims", ""]
    for r in report["results"]:
        members = ", ".join(f"{s} ({report['supernodes'][s]['role']}: "
                            + " ".join(f"L{l}/F{f}" for l, f in report["supernodes"][s]["features"]) + ")"
                            for s in r["supernodes"])
        act = {"ablate": "Ablating", "scale": f"Scaling ×{r['value']:g}", "steer": f"Steering to {r['value']:g}"}[r["action"]]
        lines.append(f"**{r['name']}** — {act} {members}; expected: {r['expect']}.")
        lines.append("")
        lines.append("| mode | mean effect [CI] | expected sign | graph prediction (r) | random sets [CI] | random ≥ effect |")
        lines.append("|---|---|---|---|---|---|")
        for m, d in r["modes"].items():
            corr = "n/a" if d["correlation"] is None else f"{d['correlation']:.2f}"
            beyond = "n/a" if d["random_beyond_fraction"] is None else f"{d['random_beyond_fraction']:.2f}"
            rnd = "n/a" if d["random_mean"] != d["random_mean"] else _fmt_ci(d["random_mean"], d["random_ci"])
            lines.append(f"| {m} | {_fmt_ci(d['mean'], d['ci'])} | {round(d['expected_sign_fraction'] * n)}/{n} | "
                         f"{d['predicted_kind']} ({corr}) | {rnd} | {beyond} |")
        ratio = r["random_mass_ratio"]
        lines += ["", f"Random sets' activation mass / the hypothesis': {ratio:.2f} on average." if ratio is not None
                  else "Random sets: the hypothesis' features are inactive here (mass 0).", ""]
    lines += ["## Faithfulness", "",
              "(m_circuit − m_empty) / (m_full − m_empty): every feature node outside the file's supernodes set to 0 "
              "(circuit), every feature node set to 0 (empty).", "", "| mode | mean [CI] |", "|---|---|"]
    for m, d in report["faithfulness"].items():
        lines.append(f"| {m} | {_fmt_ci(d['mean'], d['ci'])} |")
    lines.append("")
    return "\n".join(lines)
