"""Finalise and report the default transcoder set for SmolLM2-135M (issue 4).

    .venv/bin/python scripts/default_set_report.py --run runs/smollm2-f2304 \
        --corpus runs/corpus-smollm2 --ship transcoders/default/smollm2-135m --docs docs

1. loads the trained set (the run's final set, or its latest checkpoint with --from-checkpoint);
2. evaluates it on held-out text (FVU, L0, dead fraction, per-layer spliced ΔCE/KL, CE/KL with all MLPs
   replaced, % CE recovered vs zero-ablation) and fits the least-squares affine baseline per layer
   (ŷ = x̃ W_skipᵀ + b on training tokens, FVU on held-out tokens);
3. writes the shipped copy (fp16 safetensors + config.json with provenance and metrics + metrics.png);
4. computes feature statistics on a corpus sample and traces three prompts, listing each graph's top
   features by influence with their top-activating contexts and top output tokens;
5. writes docs/transcoders-smollm2.md and the JSON of every number in it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "def add(a, b):\n    return a",
]


def affine_baseline(lm, corpus, n_train: int, n_heldout: int, ridge: float = 1e-3) -> list[float]:
    """Held-out FVU per layer of the least-squares affine map x̃ → y (ridge-regularised)."""
    from sparsetrace.transcoders.training import ModelActivationSource
    from sparsetrace.transcoders.metrics import fvu

    L = lm.n_layers
    kw = dict(ctx_len=128, model_batch=8, outlier_factor=10.0)
    x, y = ModelActivationSource(lm, corpus, list(range(L)), **kw).read(n_train)
    xh, yh = ModelActivationSource(lm, corpus, list(range(L)), split="heldout", **kw).read(n_heldout)
    out = []
    for l in range(L):
        X = torch.cat([x[l].double(), torch.ones(x.shape[1], 1, dtype=torch.float64)], 1)
        A = X.T @ X + ridge * torch.eye(X.shape[1], dtype=torch.float64) * X.shape[0]
        W = torch.linalg.solve(A, X.T @ y[l].double())
        Xh = torch.cat([xh[l].double(), torch.ones(xh.shape[1], 1, dtype=torch.float64)], 1)
        out.append(float(fvu(yh[l].double(), Xh @ W)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--ship", required=True)
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--from-checkpoint", action="store_true")
    ap.add_argument("--eval-sequences", type=int, default=32)
    ap.add_argument("--stats-sequences", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from sparsetrace.graphs import NodeKind, node_influence
    from sparsetrace.tracer.attribution import AttributionConfig, attribute
    from sparsetrace.transcoders.evaluate import evaluate_transcoders, plot_metrics
    from sparsetrace.tracer.features import FeatureStatsConfig, compute_feature_stats, inspect_feature, open_sample
    from sparsetrace.models.loading import load_model
    from sparsetrace.transcoders.training import checkpoint_transcoders
    from sparsetrace.transcoders import load_transcoders, save_transcoders
    from sparsetrace.transcoders.data import open_corpus

    t0 = time.time()
    lm = load_model(None)
    corpus = open_corpus(a.corpus)
    run = Path(a.run)
    ts = checkpoint_transcoders(run, lm.model_id, lm.adapter.name) if a.from_checkpoint else load_transcoders(run)
    print(f"loaded set: {ts.config.n_layers} layers × {ts.config.n_features} features, k={ts.config.k}", flush=True)

    ev = evaluate_transcoders(lm, ts, corpus, n_sequences=a.eval_sequences, ctx_len=128)
    print("evaluated", round(time.time() - t0), "s", flush=True)
    base = affine_baseline(lm, corpus, n_train=16384, n_heldout=4096)
    print("affine baseline", round(time.time() - t0), "s", flush=True)

    metrics = {**ev.to_dict(), "affine_baseline_fvu": base,
               "evaluation": {"split": "heldout", "sequences": a.eval_sequences, "ctx_len": 128}}
    cfg = ts.config.replace(metrics=metrics, dtype="float16")
    ts.config = cfg
    ship = Path(a.ship)
    tmp = ship.with_name(ship.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_transcoders(ts, tmp, dtype="float16")
    plot_metrics(ev, tmp / "metrics.png")
    if ship.exists():
        shutil.rmtree(ship)
    tmp.rename(ship)
    shipped = load_transcoders(ship)
    print("shipped", ship, sum(p.stat().st_size for p in ship.iterdir()) / 1e6, "MB", flush=True)

    sample = open_sample(a.corpus, lm, ctx_len=64)
    stats = compute_feature_stats(lm, shipped, sample, FeatureStatsConfig(n_sequences=a.stats_sequences, ctx_len=64),
                                  cache=run / "feature_stats")
    print("feature stats", round(time.time() - t0), "s", flush=True)

    graphs = []
    for prompt in PROMPTS:
        g = attribute(prompt, lm, shipped, config=AttributionConfig())
        infl = node_influence(g)
        lay = g.layout
        feats = np.flatnonzero(lay.kind == NodeKind.FEATURE)
        errs = np.flatnonzero(lay.kind == NodeKind.ERROR)
        toks = np.flatnonzero(lay.kind == NodeKind.TOKEN)
        top = feats[np.argsort(-infl[feats])[:8]]
        items = []
        for i in top:
            rep = inspect_feature(lm, shipped, int(lay.layer[i]), int(lay.feature[i]), stats, sample, n_tokens=6)
            items.append({
                "node": lay.node_id(int(i)), "token": g.token_strings[int(lay.pos[i])], "influence": float(infl[i]),
                "activation": float(g.activation[i]), "label": rep.label, "density": rep.density,
                "top_output_tokens": [t for t, _ in rep.top_output_tokens],
                "contexts": ["".join(f"[[{t}]]" if j == c.focus else t for j, t in enumerate(c.tokens)) for c in rep.contexts[:3]],
            })
        share = {"features": float(infl[feats].sum()), "errors": float(infl[errs].sum()), "tokens": float(infl[toks].sum())}
        graphs.append({"prompt": prompt, "top_logits": list(zip(g.logit_label, map(float, g.logit_probability)))[:5],
                       "active_features": int(lay.n_features), "influence_share": share, "top_features": items,
                       "seconds": g.metadata["stats"]["seconds"]})
        print("traced", repr(prompt), round(g.metadata["stats"]["seconds"], 1), "s", flush=True)

    report = {"config": {k: v for k, v in cfg.to_dict().items() if k != "metrics"}, "metrics": metrics,
              "corpus": json.loads((Path(a.corpus) / "manifest.json").read_text()), "graphs": graphs}
    docs = Path(a.docs)
    (docs / "transcoders-smollm2.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    shutil.copy(ship / "metrics.png", docs / "transcoders-smollm2-metrics.png")
    (docs / "transcoders-smollm2.md").write_text(markdown(report, ship))
    print("done", round(time.time() - t0), "s")


def markdown(r: dict, ship: Path) -> str:
    """The quality report (issue 4, item 3–4), every number from ``r``."""
    m, c, tr = r["metrics"], r["config"], r["config"]["training"]
    L = len(m["fvu"])
    size = sum(p.stat().st_size for p in ship.iterdir()) / 1e6
    src = r["corpus"]["sources"]
    lines = [
        "# The default transcoder set for SmolLM2-135M-Instruct",
        "",
        "Generated by `scripts/default_set_report.py` (every number below is in `transcoders-smollm2.json`).",
        "",
        f"- **Set:** {L} TopK skip transcoders (k = {c['k']}, {c['n_features']} features each = {c['n_features'] // c['d_in']}× d_model), "
        f"hook points `{c['hook_in']}` → `{c['hook_out']}`, stored fp16 in `{ship}` ({size:.0f} MB).",
        f"- **Training:** {tr.get('tokens', 'not recorded')} tokens per layer (all layers from one model forward), "
        f"batch {tr.get('config', {}).get('batch_tokens', 'n/a')} tokens, lr {tr.get('lr', 'n/a')}; full config in `config.json`.",
        f"- **Corpus:** {r['corpus']['n_tokens']:,} tokens in {r['corpus']['n_documents']:,} documents (Debian documentation "
        "packages + CPython's standard library), 1 % of documents held out. Per source: "
        + ", ".join(f"{k} {v['tokens']:,}" for k, v in src.items()) + ".",
        f"- **Evaluation:** held-out split, {m['evaluation']['sequences']} sequences × {m['evaluation']['ctx_len']} tokens "
        f"({m['n_tokens']:,} predicted positions); position 0 excluded from FVU/L0.",
        "",
        "## Definitions",
        "- FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over held-out tokens (ȳ: the mean MLP output); 0 is perfect, 1 is the mean predictor.",
        "- L0: mean number of active features per token. Dead fraction: features that never fire on the evaluated tokens.",
        "- Spliced ΔCE / KL: CE increase and KL(clean ‖ spliced) when only that layer's MLP is replaced by its transcoder.",
        "- All-MLPs-replaced CE recovered = 100 · (CE_zero − CE_replaced) / (CE_zero − CE_clean), CE_zero with every MLP output zeroed.",
        "- Affine baseline: a least-squares affine map x̃ → y per layer (W_skip and a bias only), fitted on training tokens.",
        "",
        "## Whole model",
        "",
        "| CE clean | CE all replaced | CE all zero-ablated | CE recovered | KL all replaced | mean FVU | mean affine-baseline FVU |",
        "|---|---|---|---|---|---|---|",
        f"| {m['ce_clean']:.3f} | {m['ce_replaced']:.3f} | {m['ce_zero']:.3f} | {m['ce_recovered']:.1f} % | {m['kl_replaced']:.3f} | "
        f"{np.mean(m['fvu']):.3f} | {np.mean(m['affine_baseline_fvu']):.3f} |",
        "",
        "## Per layer",
        "",
        "| layer | FVU | affine FVU | L0 | dead | spliced ΔCE | spliced KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for l in range(L):
        dce = f"{m['delta_ce'][l]:.4f}" if m.get("delta_ce") else "n/a"
        kl = f"{m['kl'][l]:.4f}" if m.get("kl") else "n/a"
        lines.append(f"| {l} | {m['fvu'][l]:.3f} | {m['affine_baseline_fvu'][l]:.3f} | {m['l0'][l]:.1f} | "
                     f"{m['dead_fraction'][l]:.3f} | {dce} | {kl} |")
    lines += ["", "![FVU and L0 per layer](transcoders-smollm2-metrics.png)", "", "## Graphs from this set", ""]
    for g in r["graphs"]:
        logits = ", ".join(f"{t!r} {p:.2f}" for t, p in g["top_logits"])
        sh = g["influence_share"]
        lines += [f"### {g['prompt']!r}", "",
                  f"Top logits: {logits}. {g['active_features']} active features; attribution {g['seconds']:.1f} s. "
                  f"Influence on the logits: features {sh['features']:.2f}, error nodes {sh['errors']:.2f}, tokens {sh['tokens']:.2f}.",
                  "", "| node | at token | influence | activation | label | top output tokens | top contexts ([[max]]) |",
                  "|---|---|---|---|---|---|---|"]
        for f in g["top_features"]:
            ctx = " · ".join(x.replace("|", "\\|").replace("\n", "⏎") for x in f["contexts"]) or "n/a"
            outs = ", ".join(repr(t) for t in f["top_output_tokens"]).replace("|", "\\|")
            lines.append(f"| {f['node']} | {f['token']!r} | {f['influence']:.3f} | {f['activation']:.2f} | "
                         f"{f['label'].replace('|', '/')} | {outs} | {ctx} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
