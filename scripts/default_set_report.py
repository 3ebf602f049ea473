"""Finalise the default transcoder set v2 for SmolLM2-135M and report it beside the set shipped before (issue 22).

    .venv/bin/python scripts/default_set_report.py --run runs/default-v2            # final: ships the set
    .venv/bin/python scripts/default_set_report.py --run runs/default-v2 --from-checkpoint --no-ship   # interim
    .venv/bin/python scripts/default_set_report.py --old-only     # only the old set's side, while the run trains

Needs `make model`, the corpora (`.venv/bin/sparsetrace corpus --out runs/corpus-v2 --max-tokens-per-source
6000000` and `.venv/bin/sparsetrace corpus --heldout-only --out runs/heldout-general`) and the run
(`scripts/long_run.sh`).

1. keeps a copy of the set shipped before in ``--old`` (runs/set-v1), the "old" side of every comparison;
2. loads the new set: the run's final set, or its latest checkpoint with ``--from-checkpoint``;
3. evaluates old and new on ``--eval-sequences`` held-out sequences of 128 tokens of both held-out
   splits (FVU, L0, dead fraction, CE/KL with all MLPs replaced; cached per set in runs/report-cache);
4. writes the new set fp16 with provenance and metrics to ``--ship`` (with ``--no-ship``: to
   runs/set-v2-interim) and computes its feature statistics into its feature_stats/ folder, where
   `trace` finds them with no flag (`sparsetrace features stats`);
5. traces ``PROMPTS`` with both sets through `sparsetrace trace --json` (the user's path): replacement
   and completeness of the full and pruned graphs, influence shares, top features with their labels,
   and the graph picture of each set for the first prompt;
6. writes docs/transcoders-smollm2.md and the JSON of every number in it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sparsetrace._atomic import atomic_write_text
from sparsetrace.config import EvalConfig

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = list(EvalConfig.report_prompts)
SPLITS = {"corpus-v2 held-out": "corpus", "general-domain held-out": "general"}


@functools.lru_cache(maxsize=None)
def set_digest(folder: Path) -> str:
    """A short digest of a set's weight files (names the cached evaluations and traces); read once per
    folder and run (a folder's weights do not change while the script runs)."""
    h = hashlib.sha256()
    for p in sorted(folder.glob("layer_*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def evaluate(lm, folder: Path, corpora: dict, n_sequences: int, cache: Path) -> dict:
    """Held-out metrics of the set in ``folder`` on every split, each split cached by the set's digest."""
    from sparsetrace.transcoders import load_transcoders
    from sparsetrace.transcoders.evaluate import evaluate_transcoders

    digest, ts, out = set_digest(folder), None, {}
    for name, corpus in corpora.items():
        key = cache / f"{digest}-{SPLITS[name]}-{n_sequences}.json"
        if key.is_file():
            out[name] = json.loads(key.read_text())
            continue
        if ts is None:
            ts = load_transcoders(folder)
        t = time.perf_counter()
        ev = evaluate_transcoders(lm, ts, corpus, n_sequences=n_sequences, ctx_len=128, batch=8, per_layer_ce=False)
        out[name] = {**ev.to_dict(), "mean_fvu": float(np.mean(ev.fvu)), "seconds": time.perf_counter() - t,
                     "sequences": n_sequences}
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(key, json.dumps(out[name], indent=1) + "\n")
        print(f"evaluated {folder} on {name}: FVU {out[name]['mean_fvu']:.3f}, KL {ev.kl_replaced:.3f}", flush=True)
    return out


def trace(prompt: str, folder: Path, out: Path, cache: Path) -> dict:
    """`sparsetrace trace --json` with the set in ``folder``; adds influence shares and the top features.
    Cached by the set's digest and the prompt (the graph files stay in ``out``)."""
    from sparsetrace.graphs import AttributionGraph, NodeKind, node_influence
    from sparsetrace.graphs.records import feature_labels_of

    cached = cache / f"trace-{set_digest(folder)}-{hashlib.sha256(prompt.encode()).hexdigest()[:12]}.json"
    if cached.is_file() and (out / "graph.png").is_file():
        return json.loads(cached.read_text())
    cmd = [str(ROOT / ".venv/bin/sparsetrace"), "trace", prompt, "-t", str(folder), "--out", str(out), "--json", "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"trace failed: {' '.join(cmd)}\n{res.stderr}")
    d = json.loads(res.stdout)
    g = AttributionGraph.load(out / "graph.safetensors")
    infl = node_influence(g)
    lay = g.layout
    idx = {k: np.flatnonzero(lay.kind == getattr(NodeKind, k.upper())) for k in ("feature", "error", "token")}
    share = {k: float(infl[i].sum()) for k, i in idx.items()}
    total = sum(share.values())
    info = feature_labels_of(AttributionGraph.load(out / "graph.pruned.safetensors")).info
    top = []
    for i in idx["feature"][np.argsort(-infl[idx["feature"]])[:8]]:
        key = (int(lay.layer[i]), int(lay.feature[i]))
        fi = info.get(key)
        top.append({"node": lay.node_id(int(i)), "token": g.token_strings[int(lay.pos[i])],
                    "influence": float(infl[i]), "activation": float(g.activation[i]),
                    "label": fi.label if fi is not None else None,
                    "contexts": list(fi.contexts or [])[:2] if fi is not None else []})
    res = {"prompt": prompt, "top_logits": d["top_logits"][:3], "scores": d["scores"], "graph": d["graph"],
           "pruned": d["pruned"], "influence_share": {k: v / total for k, v in share.items()},
           "top_features": top, "seconds": d["seconds"]}
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cached, json.dumps(res, indent=1) + "\n")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "default-v2")
    ap.add_argument("--from-checkpoint", action="store_true", help="the run's latest checkpoint, not its final set")
    ap.add_argument("--old", type=Path, default=ROOT / "runs" / "set-v1", help="copy of the set shipped before")
    ap.add_argument("--ship", type=Path, default=ROOT / "transcoders" / "default" / "smollm2-135m")
    ap.add_argument("--no-ship", action="store_true", help="write the new set to runs/set-v2-interim instead")
    ap.add_argument("--corpus", type=Path, default=ROOT / "runs" / "corpus-v2")
    ap.add_argument("--general", type=Path, default=ROOT / "runs" / "heldout-general")
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--stats-sequences", type=int, default=1024)
    ap.add_argument("--stats-top-k", type=int, default=5,
                    help="top contexts kept per feature (5 keeps weights + statistics under 200 MB)")
    ap.add_argument("--n-prompts", type=int, default=len(PROMPTS), help="trace only the first N prompts (a quick check)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--old-only", action="store_true",
                    help="only evaluate and trace the old set (fills the cache while the run trains), then stop")
    a = ap.parse_args()
    for p, cmd in ((a.corpus, "sparsetrace corpus --out runs/corpus-v2 --max-tokens-per-source 6000000"),
                   (a.general, "sparsetrace corpus --heldout-only --out runs/heldout-general")):
        if not (p / "manifest.json").is_file():
            sys.exit(f"no corpus in {p}: run .venv/bin/{cmd}")

    import torch

    from sparsetrace.models.loading import load_model
    from sparsetrace.transcoders import load_transcoders, save_transcoders
    from sparsetrace.transcoders.data import open_corpus
    from sparsetrace.transcoders.training import checkpoint_transcoders

    torch.set_num_threads(2)
    t0 = time.time()
    if not (a.old / "config.json").is_file():
        old_cfg = json.loads((a.ship / "config.json").read_text())
        if old_cfg["training"].get("tokens", 0) > 1_000_000:
            sys.exit(f"{a.ship} already holds a set trained on {old_cfg['training']['tokens']:,} tokens and "
                     f"{a.old} (the set shipped before) is missing: restore it with git")
        shutil.copytree(a.ship, a.old, ignore=shutil.ignore_patterns("feature_stats"))
    lm = load_model(None, device="cpu")
    corpora = {name: open_corpus(a.corpus if k == "corpus" else a.general) for name, k in SPLITS.items()}
    cache = ROOT / "runs" / "report-cache"

    if a.old_only:
        evaluate(lm, a.old, corpora, a.eval_sequences, cache)
        for j, prompt in enumerate(PROMPTS[: a.n_prompts]):
            trace(prompt, a.old, ROOT / "runs" / "report-graphs" / "old" / str(j), cache)
        print("old set evaluated and traced", round(time.time() - t0), "s")
        return
    new = (checkpoint_transcoders(a.run, lm.model_id, lm.adapter.name) if a.from_checkpoint
           else load_transcoders(a.run))
    dest = ROOT / "runs" / "set-v2-interim" if a.no_ship else a.ship
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokens = new.config.training.get("tokens")
    if a.from_checkpoint:
        tokens = json.loads((a.run / "checkpoint" / "latest.json").read_text())["tokens"]
    training = {**new.config.training, "tokens": tokens, "run": str(a.run.relative_to(ROOT)),
                "warm_start_note": "initialised from set v1 (0.7M tokens of the documentation corpus) after the "
                                   "first 5.45M-token run was lost with its machine"}
    new.config = new.config.replace(dtype="float16", training=training)
    save_transcoders(new, tmp, dtype="float16")
    metrics = {"old": evaluate(lm, a.old, corpora, a.eval_sequences, cache),
               "new": evaluate(lm, tmp, corpora, a.eval_sequences, cache)}
    cfg = json.loads((tmp / "config.json").read_text())
    main_split = metrics["new"]["corpus-v2 held-out"]
    cfg["metrics"] = {**{k: main_split[k] for k in ("fvu", "l0", "dead_fraction", "ce_clean", "ce_replaced", "ce_zero",
                                                    "ce_recovered", "kl_replaced", "n_tokens")},
                      "evaluation": {"split": "corpus-v2 held-out", "sequences": a.eval_sequences, "ctx_len": 128},
                      "general_domain": {k: metrics["new"]["general-domain held-out"][k]
                                         for k in ("fvu", "ce_recovered", "kl_replaced", "mean_fvu")}}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    stats = subprocess.run([str(ROOT / ".venv/bin/sparsetrace"), "features", "stats", "--corpus", str(a.corpus),
                            "--out", str(tmp / "feature_stats"), "-t", str(tmp), "--n-sequences",
                            str(a.stats_sequences), "--top-k", str(a.stats_top_k), "-q"], cwd=ROOT)
    if stats.returncode != 0:
        sys.exit("feature statistics failed")
    print("feature stats", round(time.time() - t0), "s", flush=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    size = {p.name: p.stat().st_size for p in dest.rglob("*") if p.is_file()}
    print(f"wrote {dest}: {sum(size.values()) / 1e6:.0f} MB, largest file {max(size.values()) / 1e6:.1f} MB", flush=True)

    graphs = {"old": [], "new": []}
    for side, folder in (("old", a.old), ("new", dest)):
        for j, prompt in enumerate(PROMPTS[: a.n_prompts]):
            out = ROOT / "runs" / "report-graphs" / side / str(j)
            graphs[side].append(trace(prompt, folder, out, cache))
            if j == 0:
                shutil.copy(out / "graph.png", a.docs / "figures" / f"transcoders-smollm2-{side}-capital.png")
            print(f"traced {side} {prompt!r}: replacement {graphs[side][-1]['scores']['full']['replacement']:.3f}",
                  flush=True)
    report = {"written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "interim": a.no_ship,
              "set": str(dest.relative_to(ROOT)), "size_bytes": sum(size.values()),
              "largest_file_bytes": max(size.values()), "training": training,
              "old_training_tokens": json.loads((a.old / "config.json").read_text())["training"].get("tokens"),
              "metrics": metrics, "graphs": graphs, "seconds": time.time() - t0}
    atomic_write_text(a.docs / "transcoders-smollm2.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic_write_text(a.docs / "transcoders-smollm2.md", markdown(report))
    print("done", round(time.time() - t0), "s")


def markdown(r: dict) -> str:
    """The report, every number from ``r``: old vs new side by side."""
    m, tr = r["metrics"], r["training"]
    cfg = tr.get("config", {})
    L = len(m["new"]["corpus-v2 held-out"]["fvu"])
    status = ("**Interim:** the set below is the long run's latest checkpoint, not shipped yet."
              if r["interim"] else f"Shipped in `{r['set']}`.")
    lines = [
        "# The default transcoder set for SmolLM2-135M-Instruct: v2 beside v1",
        "",
        f"Generated by `scripts/default_set_report.py` on {r['written']} (every number: "
        "[transcoders-smollm2.json](transcoders-smollm2.json)). " + status,
        "",
        f"- **v2:** {L} TopK skip transcoders (k = {cfg.get('k')}, 2,304 features each = 4× d_model), fp16, "
        f"{r['size_bytes'] / 1e6:.0f} MB with its feature statistics (largest file {r['largest_file_bytes'] / 1e6:.1f} MB). "
        f"Trained {tr['tokens']:,} tokens per layer on `runs/corpus-v2` (docs/training.md), batch "
        f"{cfg.get('batch_tokens')}" + (f", lr {tr['lr']:.2e}" if tr.get("lr") else "") + f"; {tr['warm_start_note']}.",
        f"- **v1:** the set shipped before: {r['old_training_tokens']:,} tokens per layer of the documentation-only corpus.",
        f"- **Evaluation:** {m['new']['corpus-v2 held-out']['sequences']} held-out sequences × 128 tokens of each split; "
        "FVU = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² (position 0 excluded); KL(clean ‖ all 30 MLPs replaced) per predicted token; "
        "dead = never fired on the evaluated tokens.",
        "",
        "## Held-out quality",
        "",
        "| split | set | mean FVU (max) | L0 | dead fraction | CE clean → all replaced | CE recovered | KL all replaced |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split in SPLITS:
        for side in ("old", "new"):
            e = m[side][split]
            lines.append(
                f"| {split} | {'v1' if side == 'old' else 'v2'} | {np.mean(e['fvu']):.3f} ({max(e['fvu']):.3f}) | "
                f"{np.mean(e['l0']):.1f} | {np.mean(e['dead_fraction']):.3f} | {e['ce_clean']:.3f} → "
                f"{e['ce_replaced']:.3f} | {e['ce_recovered']:.1f} % | {e['kl_replaced']:.3f} |")
    lines += ["", "Per layer FVU (corpus-v2 held-out), v1 → v2:", "",
              "| layer | " + " | ".join(str(l) for l in range(L)) + " |", "|---|" + "---|" * L,
              "| v1 | " + " | ".join(f"{v:.2f}" for v in m["old"]["corpus-v2 held-out"]["fvu"]) + " |",
              "| v2 | " + " | ".join(f"{v:.2f}" for v in m["new"]["corpus-v2 held-out"]["fvu"]) + " |",
              "", "## Graphs", "",
              "`sparsetrace trace PROMPT -t SET` with default pruning. Replacement and completeness scores of the full "
              "graph (pruned graph in brackets). Error share: the error nodes' part of the summed influence on the "
              "logits of all feature, error and token nodes (`graphs.node_influence`).", "",
              "| prompt | top logit | v1 replacement (pruned) | v2 replacement (pruned) | v1 completeness | "
              "v2 completeness | error share v1 → v2 | active features v1 → v2 |",
              "|---|---|---|---|---|---|---|---|"]
    for go, gn in zip(r["graphs"]["old"], r["graphs"]["new"]):
        so, sn = go["scores"], gn["scores"]
        top = gn["top_logits"][0]
        lines.append(
            f"| {go['prompt']!r} | {top['token']!r} {top['probability']:.2f} | {so['full']['replacement']:.3f} "
            f"({so['pruned']['replacement']:.3f}) | {sn['full']['replacement']:.3f} ({sn['pruned']['replacement']:.3f}) | "
            f"{so['full']['completeness']:.3f} | {sn['full']['completeness']:.3f} | "
            f"{go['influence_share']['error']:.2f} → {gn['influence_share']['error']:.2f} | "
            f"{go['graph']['active_features']} → {gn['graph']['active_features']} |".replace("\n", "⏎"))
    lines += ["", "\"The capital of France is\", v1 (left) and v2 (right), as `make trace` draws them:", "",
              "<img src=\"figures/transcoders-smollm2-old-capital.png\" width=\"49%\"> "
              "<img src=\"figures/transcoders-smollm2-new-capital.png\" width=\"49%\">", ""]
    for g in r["graphs"]["new"]:
        lines += [f"### v2: {g['prompt']!r}".replace("\n", "⏎"), "",
                  "| node | at token | influence | label | top contexts |", "|---|---|---|---|---|"]
        for f in g["top_features"]:
            ctx = " · ".join(c.replace("|", "\\|").replace("\n", "⏎") for c in f["contexts"]) or "n/a"
            label = (f["label"] or "n/a").replace("|", "/").replace("\n", "⏎")
            lines.append(f"| {f['node']} | {f['token']!r} | {f['influence']:.3f} | {label} | {ctx} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
