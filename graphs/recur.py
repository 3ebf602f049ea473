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

from sparsetrace.config import MANIFEST_FILE, RecurConfig
from sparsetrace.errors import ConfigError, FormatError

from .graph import AttributionGraph, NodeKind
from .records import feature_key, labels_by_feature

__all__ = ["bootstrap_ci", "roles_of", "load_traced_set", "recur", "RecurReport"]

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


def report_markdown(report: RecurReport, source: str, figure: str | None) -> str:
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
