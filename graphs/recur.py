"""What recurs across a traced prompt set (docs/design.md §15). Torch-free: reads ``trace-many``'s folder.

Alignment. Every token position of a prompt gets a *role*: with ``align="field"`` the template field
whose last token sits there (``B``, ``B#2`` for the second occurrence; the manifest's ``positions``),
else ``end-K`` (K tokens from the end, ``end-1`` is the last); with ``align="end"`` always ``end-K``.
A feature across prompts is the key (role, layer, feature id).

Per prompt, a key's *influence* is its node's influence on the probability-weighted logits in the
prompt's full graph (:func:`~sparsetrace.graphs.prune.node_influence`; 0 where it is not active), and
it is *present* when the pruned graph kept it. A key recurs when present in at least ``min_fraction``
of the prompts. Means come with percentile-bootstrap confidence intervals over prompts.

Supernodes across prompts. For each role, the recurring features there get one out-edge vector each:
the signed weights they send, in the pruned graphs, to aligned targets (other keys, and logit k, the
prompt's k-th target), summed over prompts. Features whose vectors have cosine ≥ ``cosine`` are joined
(single linkage); groups of two or more are supernodes, written in the hypothesis-file form that
``validate-set`` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sparsetrace.config import MANIFEST_FILE, FigureConfig, RecurConfig
from sparsetrace.errors import ConfigError, FormatError

from .graph import AttributionGraph, NodeKind
from .records import feature_key, feature_labels_of, labels_by_feature

__all__ = ["bootstrap_ci", "roles_of", "load_traced_set", "recur", "RecurReport", "combined_figure"]

Key = tuple[str, int, int]
"""(role, layer, feature id)."""


def bootstrap_ci(values: Sequence[float], n_bootstrap: int, confidence: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and its percentile-bootstrap interval (resampling the
    values with replacement ``n_bootstrap`` times). NaN values are left out; none left gives NaNs."""
    x = np.asarray([v for v in values if v == v], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    means = x[rng.integers(0, x.size, size=(n_bootstrap, x.size))].mean(1)
    a = (1 - confidence) / 2
    return float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def roles_of(n_tokens: int, positions: Mapping[str, int], align: str) -> list[str]:
    """The role of every position (module docstring)."""
    roles = [f"end-{n_tokens - p}" for p in range(n_tokens)]
    if align == "field":
        for name in sorted(positions, key=lambda r: (positions[r], r), reverse=True):
            roles[positions[name]] = name
    return roles


@dataclass(eq=False)
class TracedPrompt:
    """One done prompt of a traced set."""

    entry: dict[str, Any]
    full: AttributionGraph
    pruned: AttributionGraph


def load_traced_set(folder: str | Path, minimum: int = 2) -> tuple[dict[str, Any], list[TracedPrompt]]:
    """The manifest and the done prompts' full and pruned graphs of a ``trace-many`` folder (at least
    ``minimum`` of them)."""
    root = Path(folder)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"DIR {str(root)!r} has no {MANIFEST_FILE}; make one with `sparsetrace trace-many PROMPTS --out DIR`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{str(path)!r} is not valid JSON ({exc.msg})") from None
    done = []
    for e in manifest.get("prompts", []):
        if e.get("status") != "done":
            continue
        folder_ = root / e["id"]
        done.append(TracedPrompt(e, AttributionGraph.load(folder_ / "graph.safetensors"),
                                 AttributionGraph.load(folder_ / "graph.pruned.safetensors")))
    if len(done) < minimum:
        raise ConfigError(f"DIR {str(root)!r} has {len(done)} traced prompt(s); at least {minimum} needed")
    return manifest, done


def _feature_keys(g: AttributionGraph, roles: list[str]) -> tuple[np.ndarray, list[Key]]:
    lay = g.layout
    idx = np.arange(lay.features.start, lay.features.stop)
    idx = idx[lay.feature[idx] >= 0]
    return idx, [(roles[int(lay.pos[i])], int(lay.layer[i]), int(lay.feature[i])) for i in idx]


@dataclass
class RecurReport:
    """What recurs: per key presence and influence per prompt, summaries, supernodes."""

    prompts: list[str]
    config: RecurConfig
    features: list[dict[str, Any]]
    """Recurring keys, by mean influence: role, layer, feature, label, fraction present, mean and CI,
    per-prompt influence."""
    supernodes: list[dict[str, Any]]
    """name, role, members [(layer, feature)], mean influence and CI of the members' sum."""
    n_keys: int
    """Distinct keys present in some pruned graph."""
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"prompts": self.prompts, "config": asdict(self.config), "n_keys": self.n_keys,
                "features": self.features, "supernodes": self.supernodes}


def _label(labels: dict[str, str], layer: int, feat: int) -> str:
    return labels.get(feature_key((layer, feat)), "")


def recur(traced: Sequence[TracedPrompt], config: RecurConfig | None = None) -> RecurReport:
    """Recurring features and supernodes across ``traced`` (module docstring)."""
    from .prune import node_influence

    cfg = config or RecurConfig()
    rng = np.random.default_rng(cfg.seed)
    n = len(traced)
    infl: dict[Key, np.ndarray] = {}
    present: dict[Key, np.ndarray] = {}
    labels: dict[str, str] = {}
    out_edges: list[dict[Key, dict[Any, float]]] = []
    for j, tp in enumerate(traced):
        roles = roles_of(tp.full.layout.n_pos, tp.entry.get("positions") or {}, cfg.align)
        I = node_influence(tp.full)
        idx, keys = _feature_keys(tp.full, roles)
        for i, k in zip(idx, keys):
            infl.setdefault(k, np.zeros(n))[j] = I[i]
        pidx, pkeys = _feature_keys(tp.pruned, roles)
        for k in pkeys:
            present.setdefault(k, np.zeros(n, dtype=bool))[j] = True
        for key, text in labels_by_feature(tp.pruned).items():
            labels.setdefault(feature_key(key), text)
        out_edges.append(_aligned_out_edges(tp.pruned, roles, dict(zip(pidx.tolist(), pkeys))))
    rows = []
    for k, pres in present.items():
        frac = float(pres.mean())
        if frac < cfg.min_fraction:
            continue
        vals = infl.get(k, np.zeros(n))
        mean, lo, hi = bootstrap_ci(vals, cfg.n_bootstrap, cfg.confidence, rng)
        rows.append({"role": k[0], "layer": k[1], "feature": k[2], "label": _label(labels, k[1], k[2]),
                     "fraction": frac, "influence": mean, "ci": [lo, hi], "per_prompt": vals.tolist()})
    rows.sort(key=lambda r: (-r["influence"], r["role"], r["layer"], r["feature"]))
    supers = _supernodes(rows, out_edges, infl, n, cfg, rng)
    return RecurReport([tp.entry["id"] for tp in traced], cfg, rows, supers, len(present), labels)


def _aligned_out_edges(g: AttributionGraph, roles: list[str], key_of: dict[int, Key]) -> dict[Key, dict[Any, float]]:
    """Per feature key of ``g``: its out-edges as {aligned target: weight} (targets: keys, ("logit", k))."""
    lay, adj = g.layout, g.adjacency
    rows = adj.rows()
    out: dict[Key, dict[Any, float]] = {}
    logit0 = lay.logits.start
    for e in range(adj.nnz):
        s = int(adj.indices[e])
        if s not in key_of:
            continue
        t = int(rows[e])
        if lay.kind[t] == NodeKind.LOGIT:
            tk: Any = ("logit", t - logit0)
        elif t in key_of:
            tk = key_of[t]
        else:
            continue
        d = out.setdefault(key_of[s], {})
        d[tk] = d.get(tk, 0.0) + float(adj.data[e])
    return out


def _supernodes(rows: list[dict], out_edges: list[dict], infl: dict[Key, np.ndarray], n: int, cfg: RecurConfig,
                rng: np.random.Generator) -> list[dict[str, Any]]:
    result = []
    by_role: dict[str, list[Key]] = {}
    for r in rows:
        by_role.setdefault(r["role"], []).append((r["role"], r["layer"], r["feature"]))
    for role in sorted(by_role):
        keys = by_role[role]
        if len(keys) < 2:
            continue
        targets: dict[Any, int] = {}
        vec: dict[Key, dict[int, float]] = {k: {} for k in keys}
        for per in out_edges:
            for k in keys:
                for tk, w in per.get(k, {}).items():
                    col = targets.setdefault(tk, len(targets))
                    vec[k][col] = vec[k].get(col, 0.0) + w
        m = np.zeros((len(keys), max(len(targets), 1)))
        for i, k in enumerate(keys):
            for c, w in vec[k].items():
                m[i, c] = w
        norm = np.linalg.norm(m, axis=1)
        live = norm > 0
        unit = np.where(live[:, None], m / np.where(live, norm, 1.0)[:, None], 0.0)
        sim = unit @ unit.T
        parent = list(range(len(keys)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                if live[i] and live[j] and sim[i, j] >= cfg.cosine:
                    a, b = find(i), find(j)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
        groups: dict[int, list[int]] = {}
        for i in range(len(keys)):
            if live[i]:
                groups.setdefault(find(i), []).append(i)
        for members in sorted(groups.values(), key=lambda g: g[0]):
            if len(members) < 2:
                continue
            ks = [keys[i] for i in members]
            total = np.sum([infl.get(k, np.zeros(n)) for k in ks], axis=0)
            mean, lo, hi = bootstrap_ci(total, cfg.n_bootstrap, cfg.confidence, rng)
            layers = [k[1] for k in ks]
            result.append({"name": f"{role} L{min(layers)}-{max(layers)} #{len(result)}", "role": role,
                           "members": [[k[1], k[2]] for k in ks], "influence": mean, "ci": [lo, hi]})
    return result


# ---- report files ------------------------------------------------------------------------------------------
def hypothesis_skeleton(report: RecurReport, metric: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The supernodes as a ``validate-set`` hypothesis file (one ablation hypothesis per supernode; the
    expected sign is left for the user to state: ``decrease`` is written as the common case)."""
    sn = {s["name"]: {"role": s["role"], "features": s["members"]} for s in report.supernodes}
    hyps = [{"name": f"ablate {name}", "supernodes": [name], "action": "ablate", "expect": "decrease"} for name in sn]
    return {"metric": dict(metric or {"a": "{target0}", "b": "{target1}"}), "supernodes": sn, "hypotheses": hyps}


def report_markdown(report: RecurReport, source: str, figure: str | None, circuit: str | None = None) -> str:
    """The report as markdown: the table of recurring features, the supernodes, and the two figures
    (``figure``: influence with CIs; ``circuit``: the combined circuit figure) when given."""
    cfg = report.config
    pct = int(round(cfg.confidence * 100))
    lines = [
        f"# What recurs: {source}",
        "",
        f"{len(report.prompts)} traced prompts; positions aligned by {cfg.align!r}; a feature recurs when its "
        f"pruned graphs keep it at the aligned position in ≥ {cfg.min_fraction:g} of the prompts "
        f"({len(report.features)} of {report.n_keys} kept keys). Influence: on the probability-weighted logits, "
        f"from each prompt's full graph (0 where inactive); {pct}% percentile-bootstrap intervals over prompts "
        f"({cfg.n_bootstrap} resamples, seed {cfg.seed}).",
        "",
    ]
    if figure:
        lines += [f"![recurring features]({figure})", ""]
    lines += [f"| role | layer | feature | label | present | mean influence | {pct}% CI |", "|---|---|---|---|---|---|---|"]
    for r in report.features[: cfg.top]:
        lines.append(f"| {r['role']} | {r['layer']} | {r['feature']} | {r['label'].replace('|', '/')} | "
                     f"{r['fraction']:.2f} | {r['influence']:.4f} | [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] |")
    lines += ["", "## Supernodes across prompts", ""]
    if not report.supernodes:
        lines.append(f"None: no two recurring features at one role have out-edge cosine ≥ {cfg.cosine:g}.")
    for s in report.supernodes:
        members = ", ".join(f"L{l} F{f}" + (f" ({_label(report.labels, l, f)})" if _label(report.labels, l, f) else "")
                            for l, f in s["members"])
        lines.append(f"- **{s['name']}** (role {s['role']}): {members}; summed influence {s['influence']:.4f} "
                     f"[{s['ci'][0]:.4f}, {s['ci'][1]:.4f}]")
    if circuit:
        lines += ["", "## The recurring circuit", "",
                  "Supernodes across prompts (purple, ×members) and recurring features outside them, at their "
                  "roles' positions in the first prompt; edges: mean over prompts of the summed aligned edges of "
                  "the pruned graphs.", "", f"![recurring circuit]({circuit})"]
    lines += ["", "`supernodes.json` holds them as a `sparsetrace validate-set` hypothesis file (edit the expected signs).", ""]
    return "\n".join(lines)


def plot(report: RecurReport):
    """A matplotlib Figure: the top recurring features' mean influence with CIs (left) and each prompt's
    influence (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report.features[: report.config.top]
    n = max(len(rows), 1)
    fig = Figure(figsize=(10, 1.2 + 0.32 * n))
    FigureCanvasAgg(fig)
    ax, hm = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    names = [f"{r['role']}  L{r['layer']} F{r['feature']}" + (f"  {r['label'][:22]}" if r["label"] else "") for r in rows]
    y = np.arange(len(rows))[::-1]
    if rows:
        m = np.array([r["influence"] for r in rows])
        lo = m - np.array([r["ci"][0] for r in rows])
        hi = np.array([r["ci"][1] for r in rows]) - m
        ax.errorbar(m, y, xerr=[lo, hi], fmt="o", color="#1f5fa8", ecolor="#7aa6d6", capsize=3)
        ax.set_yticks(y, names, fontsize=7)
        per = np.array([r["per_prompt"] for r in rows])
        im = hm.imshow(per, aspect="auto", cmap="Blues", vmin=0)
        hm.set_yticks([])
        hm.set_xticks(np.arange(len(report.prompts)), report.prompts, rotation=60, ha="right", fontsize=6)
        fig.colorbar(im, ax=hm, fraction=0.05, label="influence")
    pct = int(round(report.config.confidence * 100))
    ax.set_xlabel(f"mean influence ({pct}% bootstrap CI)")
    ax.set_title(f"Recurring features ({len(report.prompts)} prompts)", fontsize=9)
    hm.set_title("influence per prompt", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


# ---- the combined figure ---------------------------------------------------------------------------------
Source = Any
"""An aligned edge end: a feature key, ("token", role) or ("logit", k)."""


def _aligned_edges(g: AttributionGraph, roles: list[str]) -> tuple[dict[tuple[Source, Source], float], dict[Source, float]]:
    """Every edge of ``g`` between aligned ends (sources: features and tokens; targets: features and
    logits) summed per (source, target), and each aligned target's input mass: the absolute weight of
    all its in-edges (errors included) plus its row's remainder."""
    lay, adj = g.layout, g.adjacency
    end: dict[int, Source] = {}
    for i in range(g.n_nodes):
        k = int(lay.kind[i])
        if k == NodeKind.FEATURE and int(lay.feature[i]) >= 0:
            end[i] = (roles[int(lay.pos[i])], int(lay.layer[i]), int(lay.feature[i]))
        elif k == NodeKind.TOKEN:
            end[i] = ("token", roles[int(lay.pos[i])])
        elif k == NodeKind.LOGIT:
            end[i] = ("logit", i - lay.logits.start)
    rows = adj.rows()
    weights: dict[tuple[Source, Source], float] = {}
    mass: dict[Source, float] = {}
    for e in range(adj.nnz):
        t = end.get(int(rows[e]))
        if t is None or t[0] == "token":
            continue
        w = float(adj.data[e])
        mass[t] = mass.get(t, 0.0) + abs(w)
        s = end.get(int(adj.indices[e]))
        if s is not None and s[0] != "logit":
            weights[(s, t)] = weights.get((s, t), 0.0) + w
    for i, t in end.items():
        if t[0] != "token":
            mass[t] = mass.get(t, 0.0) + float(adj.remainder[i])
    return weights, mass


def _field_name(role: str) -> str | None:
    """The template field of a field role (``B#2`` → ``B``); None for ``end-K``."""
    return None if role.startswith("end-") else role.split("#")[0]


def _target_label(traced: Sequence[TracedPrompt], k: int) -> str:
    """``{FIELD}`` when target k is that field's value (up to spaces) in every prompt, else its text when
    one for all, else ``target k``."""
    values = [(tp.entry.get("targets") or [""] * (k + 1))[k] if len(tp.entry.get("targets") or []) > k else None
              for tp in traced]
    if None not in values:
        fields = traced[0].entry.get("fields") or {}
        for name in fields:
            if all(v.strip() == str((tp.entry.get("fields") or {}).get(name, "")).strip() for v, tp in zip(values, traced)):
                return "{" + name + "}"
        if len(set(values)) == 1:
            return values[0].strip()
    return f"target {k}"


def _candidates(report: RecurReport) -> list[tuple[float, str, str, list[Key], str]]:
    """(mean influence, kind, role, member keys, name) of every supernode and every recurring feature
    outside them, by influence."""
    grouped = {(s["role"], l, f) for s in report.supernodes for l, f in s["members"]}
    out = [(s["influence"], "supernode", s["role"], [(s["role"], l, f) for l, f in s["members"]], s["name"])
           for s in report.supernodes]
    for r in report.features:
        k = (r["role"], r["layer"], r["feature"])
        if k not in grouped:
            out.append((r["influence"], "feature", r["role"], [k], f"{r['role']} L{r['layer']} F{r['feature']}"))
    out.sort(key=lambda c: (-c[0], c[4]))
    return out


def _unit_label(report: RecurReport, kind: str, members: list[Key], per_key: dict[Key, float], name: str) -> str:
    """A feature's label (else L/F ids); a supernode's: its most influential member's label (else its name)."""
    best = max(members, key=lambda k: per_key.get(k, 0.0))
    text = _label(report.labels, best[1], best[2])
    if kind == "feature":
        return text or f"L{best[1]} F{best[2]}"
    return text or name


def combined_figure(report: RecurReport, traced: Sequence[TracedPrompt], config: FigureConfig | None = None,
                    title: str | None = None):
    """The recurring circuit as one compact figure (graphs/figure.py's :class:`~.figure.Figure`, drawn by
    :func:`~.figure.draw_figure`): the supernodes across prompts and the recurring features outside
    them, most influential first, up to ``config.max_nodes``, at their roles' positions in the first
    prompt (template fields written ``{NAME}``); the tokens and target logits they connect to.

    An edge's weight is the mean over prompts of the summed aligned edges between the two units'
    members in the pruned graphs (0 in a prompt whose graph lacks them); its share is |weight| over the
    target's mean input mass (:func:`_aligned_edges`). Edges are picked as the per-prompt figure picks
    them (each unit's strongest in- and out-edge first, ``config.max_edges`` in all)."""
    from .figure import Figure, FigureSpec, Unit, _pick_edges

    cfg = config or FigureConfig()
    n = len(traced)
    rep = traced[0]
    rep_roles = roles_of(rep.full.layout.n_pos, rep.entry.get("positions") or {}, report.config.align)
    pos_of = {r: p for p, r in enumerate(rep_roles)}
    weights: dict[tuple[Source, Source], float] = {}
    mass: dict[Source, float] = {}
    for tp in traced:
        roles = roles_of(tp.pruned.layout.n_pos, tp.entry.get("positions") or {}, report.config.align)
        w, m = _aligned_edges(tp.pruned, roles)
        for k, v in w.items():
            weights[k] = weights.get(k, 0.0) + v / n
        for k, v in m.items():
            mass[k] = mass.get(k, 0.0) + v / n
    per_key = {(r["role"], r["layer"], r["feature"]): r["influence"] for r in report.features}

    units: list[Unit] = []
    unit_of: dict[Source, int] = {}
    for infl, kind, role, members, name in _candidates(report):
        if len(units) >= cfg.max_nodes:
            break
        if role not in pos_of:
            continue
        layers = np.array([k[1] for k in members], dtype=float)
        wts = np.maximum([per_key.get(k, 0.0) for k in members], 0.0)
        layer = float((layers * wts).sum() / wts.sum()) if wts.sum() > 0 else float(layers.mean())
        for k in members:
            unit_of[k] = len(units)
        units.append(Unit(name, kind, tuple(range(len(members))), _unit_label(report, kind, members, per_key, name),
                          layer, float(pos_of[role]), float(infl), None, (int(layers.min()), int(layers.max()))))
    tokens = list(rep.full.token_strings)
    for p, r in enumerate(rep_roles):
        if _field_name(r):
            tokens[p] = "{" + _field_name(r) + "}"
    feeds = sorted({s[1] for (s, t) in weights if s[0] == "token" and unit_of.get(t, -1) >= 0 and s[1] in pos_of},
                   key=lambda r: pos_of[r])
    for r in feeds:
        unit_of[("token", r)] = len(units)
        units.append(Unit(f"T@{r}", "token", (pos_of[r],), tokens[pos_of[r]], -1.0, float(pos_of[r]), 0.0))
    n_logits = min(len(rep.full.logit_label), cfg.max_logits)
    probs = [float(np.mean([tp.full.logit_probability[k] if len(tp.full.logit_probability) > k else 0.0 for tp in traced]))
             for k in range(n_logits)]
    reached = sorted({t[1] for (s, t) in weights if t[0] == "logit" and t[1] < n_logits and unit_of.get(s, -1) >= 0})
    for k in reached:
        unit_of[("logit", k)] = len(units)
        units.append(Unit(f"L{k}", "logit", (k,), f"{_target_label(traced, k)} {probs[k]:.2f}",
                          float(rep.full.layout.n_layers), float(len(tokens) - 1), probs[k]))

    edge_w: dict[tuple[int, int], float] = {}
    for (s, t), w in weights.items():
        us, ut = unit_of.get(s), unit_of.get(t)
        if us is not None and ut is not None and us != ut:
            edge_w[(us, ut)] = edge_w.get((us, ut), 0.0) + w
    unit_mass = np.zeros(len(units))
    for k, v in mass.items():
        if k in unit_of:
            unit_mass[unit_of[k]] += v
    pairs = [p for p, w in edge_w.items() if w != 0]
    src = np.array([p[0] for p in pairs], dtype=np.int64)
    dst = np.array([p[1] for p in pairs], dtype=np.int64)
    weight = np.array([edge_w[p] for p in pairs], dtype=np.float64)
    share = np.abs(weight) / np.where(unit_mass[dst] > 0, unit_mass[dst], 1.0) if pairs else np.zeros(0)
    importance = np.array([max(u.influence, 0.0) for u in units])
    keep = _pick_edges(src, dst, share, importance, cfg.max_edges, cfg.min_edge_share)
    label_source = feature_labels_of(rep.pruned).source
    source = (label_source.source if label_source is not None else None) or "none recorded"
    fig_title = title if title is not None else (
        f"Recurring across {n} prompts: " + (rep.entry.get("template") or rep.entry.get("prompt", "")))
    return Figure(units=units, src=src[keep], dst=dst[keep], weight=weight[keep], share=share[keep],
                  token_strings=tokens, n_layers=rep.full.layout.n_layers, title=fig_title, scores=None,
                  n_graph_nodes=report.n_keys, label_source=source, spec=FigureSpec(title=fig_title, width=cfg.width))
