"""Per-layer transcoders vs one cross-layer transcoder on the default model, at equal training tokens and
equal total feature count (issue 16, item 4; docs/cross-layer.md).

    .venv/bin/python scripts/clt_compare.py                     # F = 256 per layer, k = 16, 200k tokens
    .venv/bin/python scripts/clt_compare.py --n-tokens 8192 --n-features 64 --k 8 --prompts 1   # smoke run

Needs `make model` and the corpora (`.venv/bin/sparsetrace corpus --out runs/corpus-v2
--max-tokens-per-source 6000000`, `.venv/bin/sparsetrace corpus --heldout-only --out runs/heldout-general`).

Both sets are trained by `sparsetrace train` from the same corpus, seed and token stream (the same
harvested activations in the same order; only `--cross-layer` differs), with F features and k active per
layer (so equal total features, and equal active features per token). Each is evaluated by `sparsetrace
evaluate` on both held-out splits (FVU per target layer, KL and CE with all MLPs replaced), and each
traces the same prompts (`sparsetrace trace --json`: replacement and completeness of the full and the
pruned graph). Every step is skipped when its output exists, so an interrupted comparison resumes.
Writes ``--out/compare.json`` and the table ``docs/cross-layer-compare.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sparsetrace.config import EvalConfig

ROOT = Path(__file__).resolve().parent.parent
ST = str(ROOT / ".venv" / "bin" / "sparsetrace")
PROMPTS = list(EvalConfig.report_prompts[:5])
KINDS = {"per-layer": [], "cross-layer": ["--cross-layer"]}


def run(cmd: list[str]) -> str:
    """Run a sparsetrace command; its stdout (the --json object) on success, exit with its stderr otherwise."""
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr.strip()[-2000:]}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / "runs" / "corpus-v2")
    ap.add_argument("--general", type=Path, default=ROOT / "runs" / "heldout-general")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "clt-compare")
    ap.add_argument("--n-tokens", type=int, default=200_000)
    ap.add_argument("--n-features", type=int, default=256)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--shuffle-buffer-tokens", type=int, default=16384,
                    help="smaller than train's default so that the comparison fits in RAM beside a long run")
    ap.add_argument("--eval-sequences", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="trace the first N prompts")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "cross-layer-compare.md")
    a = ap.parse_args()
    a.out, a.corpus, a.general = a.out.resolve(), a.corpus.resolve(), a.general.resolve()
    for p, cmd in ((a.corpus, "sparsetrace corpus --out runs/corpus-v2 --max-tokens-per-source 6000000"),
                   (a.general, "sparsetrace corpus --heldout-only --out runs/heldout-general")):
        if not (p / "manifest.json").is_file():
            sys.exit(f"no corpus in {p}: run .venv/bin/{cmd}")
    tag = f"F{a.n_features}-k{a.k}-{a.n_tokens}"
    base = a.out / tag
    result: dict = {"n_tokens": a.n_tokens, "n_features": a.n_features, "k": a.k, "eval_sequences": a.eval_sequences,
                    "sets": {}}
    for kind, flag in KINDS.items():
        folder = base / kind
        r = result["sets"][kind] = {"folder": str(folder.relative_to(ROOT))}
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            run([ST, "train", "--corpus", str(a.corpus), "--out", str(folder), "--n-features", str(a.n_features),
                 "--k", str(a.k), "--n-tokens", str(a.n_tokens), "--checkpoint-every-tokens", "65536", "--resume",
                 "--shuffle-buffer-tokens", str(a.shuffle_buffer_tokens),
                 "--no-evaluate", "--json", "-q", *flag])
            (folder / "train_seconds.txt").write_text(f"{time.perf_counter() - t:.1f}\n")
        r["train_seconds"] = float((folder / "train_seconds.txt").read_text()) if (folder / "train_seconds.txt").is_file() else None
        r["size_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        for split, corpus in (("corpus-v2 held-out", a.corpus), ("general-domain held-out", a.general)):
            f = folder / f"eval-{corpus.name}-{a.eval_sequences}.json"
            if not f.is_file():
                f.write_text(run([ST, "evaluate", "-t", str(folder), "--corpus", str(corpus), "--n-sequences",
                                  str(a.eval_sequences), "--no-per-layer-ce", "--no-write", "--json", "-q"]))
            e = json.loads(f.read_text())
            r[split] = {"mean_fvu": sum(e["fvu"]) / len(e["fvu"]), "fvu": e["fvu"], "kl_replaced": e["kl_replaced"],
                        "ce_clean": e["ce_clean"], "ce_replaced": e["ce_replaced"], "ce_recovered": e["ce_recovered"],
                        "l0": e["l0"], "dead_fraction": e["dead_fraction"]}
            print(f"{kind} {split}: FVU {r[split]['mean_fvu']:.3f}, KL {e['kl_replaced']:.3f}", flush=True)
        r["graphs"] = []
        for j, prompt in enumerate(PROMPTS[: a.prompts]):
            g = folder / "graphs" / str(j)
            f = g / "result.json"
            if not f.is_file():
                out = run([ST, "trace", prompt, "-t", str(folder), "--out", str(g), "--json", "-q", "--labels", "lens"])
                f.write_text(out)
            d = json.loads(f.read_text())
            r["graphs"].append({"prompt": prompt, "scores": d["scores"], "active_features": d["graph"]["active_features"],
                                "seconds": d["seconds"].get("attribution")})
            print(f"{kind} {prompt!r}: replacement {d['scores']['full']['replacement']:.3f}, completeness "
                  f"{d['scores']['full']['completeness']:.3f}", flush=True)
    (base / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    a.doc.write_text(markdown(result, a))
    print(f"wrote {base / 'compare.json'} and {a.doc}")


def markdown(r: dict, a) -> str:
    """The comparison table, every number from ``r``."""
    s = r["sets"]
    cmd = (f".venv/bin/python scripts/clt_compare.py --n-tokens {a.n_tokens} --n-features {a.n_features} --k {a.k} "
           f"--eval-sequences {a.eval_sequences} --shuffle-buffer-tokens {a.shuffle_buffer_tokens}")
    lines = [
        "# Per-layer transcoders vs a cross-layer transcoder on SmolLM2-135M-Instruct",
        "",
        f"Written by `{cmd}`. Both sets: {r['n_features']} TopK features per layer (k = {r['k']}), so "
        f"{30 * r['n_features']:,} features in all and the same active features per token, trained on the same "
        f"{r['n_tokens']:,} tokens of `runs/corpus-v2` (same seed, same token stream, shuffle buffer "
        f"{a.shuffle_buffer_tokens:,} tokens; `train`'s defaults otherwise). "
        f"Evaluation on {r['eval_sequences']} held-out sequences × 128 tokens of each split.",
        "",
        "| set | split | mean FVU | KL all replaced (nats) | CE clean → replaced | CE recovered | train time | weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, d in s.items():
        for split in ("corpus-v2 held-out", "general-domain held-out"):
            e = d[split]
            t = f"{d['train_seconds']:.0f} s" if d.get("train_seconds") else "n/a"
            lines.append(f"| {kind} | {split} | {e['mean_fvu']:.3f} | {e['kl_replaced']:.3f} | {e['ce_clean']:.3f} → "
                         f"{e['ce_replaced']:.3f} | {e['ce_recovered']:.1f} % | {t} | {d['size_bytes'] / 1e6:.0f} MB |")
    lines += ["", "Graphs (`sparsetrace trace PROMPT -t SET`, default pruning): replacement / completeness of the full "
              "graph, pruned graph in brackets.", "",
              "| prompt | per-layer replacement | cross-layer replacement | per-layer completeness | cross-layer completeness |",
              "|---|---|---|---|---|"]
    for gp, gc in zip(s["per-layer"]["graphs"], s["cross-layer"]["graphs"]):
        p, c = gp["scores"], gc["scores"]
        lines.append(f"| {gp['prompt']!r} | {p['full']['replacement']:.3f} ({p['pruned']['replacement']:.3f}) | "
                     f"{c['full']['replacement']:.3f} ({c['pruned']['replacement']:.3f}) | "
                     f"{p['full']['completeness']:.3f} ({p['pruned']['completeness']:.3f}) | "
                     f"{c['full']['completeness']:.3f} ({c['pruned']['completeness']:.3f}) |".replace("\n", "⏎"))
    n = len(s["per-layer"]["graphs"])
    if n:
        mean = {k: sum(g["scores"]["full"]["replacement"] for g in s[k]["graphs"]) / n for k in s}
        mc = {k: sum(g["scores"]["full"]["completeness"] for g in s[k]["graphs"]) / n for k in s}
        lines.append(f"| mean of {n} | {mean['per-layer']:.3f} | {mean['cross-layer']:.3f} | {mc['per-layer']:.3f} | "
                     f"{mc['cross-layer']:.3f} |")
    lines.append("")
    lines.append("Per target layer FVU (corpus-v2 held-out):")
    lines.append("")
    L = len(s["per-layer"]["corpus-v2 held-out"]["fvu"])
    lines += ["| set | " + " | ".join(str(l) for l in range(L)) + " |", "|---|" + "---|" * L]
    for kind, d in s.items():
        lines.append(f"| {kind} | " + " | ".join(f"{v:.2f}" for v in d["corpus-v2 held-out"]["fvu"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
