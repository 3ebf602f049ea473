"""Interim report of a long training run: its log, and held-out metrics of its latest checkpoint.

    .venv/bin/python scripts/run_progress.py [--run runs/default-v2] [--evaluate] [--docs docs]

Needs a run started by `scripts/long_run.sh start` (which needs `make model` and a corpus). Reads
``RUN/train_log.jsonl`` (training FVU, L0, dead fraction, tokens/s per logged step) and, with
``--evaluate``, evaluates the latest checkpoint on ``--sequences`` held-out sequences of 128 tokens of
the run's corpus (FVU, L0, dead fraction per layer; CE/KL with all 30 MLPs replaced), and on the
general-domain held-out set when ``--general`` names its built corpus. Writes
``DOCS/training-v2-progress.md``, ``DOCS/training-v2-progress.png`` and ``DOCS/training-v2-progress.json``
(every number in the page). The run may keep going while this runs (it reads the checkpoint files only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(log: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    tokens = [r["tokens"] / 1e6 for r in log]
    L = len(log[0]["fvu"])
    groups = [(0, L // 3), (L // 3, 2 * L // 3), (2 * L // 3, L)]
    for lo, hi in groups:
        ax1.plot(tokens, [sum(r["fvu"][lo:hi]) / (hi - lo) for r in log], label=f"layers {lo}–{hi - 1}", lw=1)
        ax2.plot(tokens, [sum(r["dead_fraction"][lo:hi]) / (hi - lo) for r in log], lw=1)
    ax1.set(xlabel="training tokens (M)", ylabel="training-batch FVU", ylim=(0, 1), title="FVU (training batches)")
    ax1.legend(fontsize=8)
    ax2.set(xlabel="training tokens (M)", ylabel="dead fraction", title="latents not fired for dead_tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "default-v2")
    ap.add_argument("--evaluate", action="store_true", help="evaluate the latest checkpoint on held-out text")
    ap.add_argument("--sequences", type=int, default=64, help="held-out sequences of 128 tokens")
    ap.add_argument("--corpus", type=Path, default=ROOT / "runs" / "corpus-v2", help="the run's corpus (held-out split)")
    ap.add_argument("--general", type=Path, default=None, help="built corpus of the general-domain held-out set")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = ap.parse_args()
    log_file = args.run / "train_log.jsonl"
    if not log_file.is_file():
        sys.exit(f"no run in {args.run} (no train_log.jsonl): start one with `scripts/long_run.sh start`")
    log = read_log(log_file)
    if not log:
        sys.exit(f"{log_file} is empty: the run has not logged a step yet")
    cfg_file = args.run / "checkpoint" / "latest.json"
    latest = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    last = log[-1]
    L = len(last["fvu"])
    run_name = os.path.relpath(args.run.resolve(), ROOT)
    report: dict = {"run": run_name, "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "logged_steps": len(log), "tokens": last["tokens"], "step": last["step"],
                    "tokens_per_s_last": last["tokens_per_s"], "train_fvu_mean_last": sum(last["fvu"]) / L,
                    "train_fvu_last": last["fvu"], "dead_fraction_last": last["dead_fraction"],
                    "checkpoint": latest}
    if args.evaluate and latest is not None:
        from sparsetrace.transcoders.evaluate import evaluate_transcoders
        from sparsetrace.models.loading import load_model
        from sparsetrace.transcoders.training import checkpoint_transcoders
        from sparsetrace.transcoders.data import open_corpus

        lm = load_model(None, device="cpu")
        ts = checkpoint_transcoders(args.run, model_id=lm.model_id, architecture=lm.adapter.name)
        sets = {"corpus held-out": open_corpus(args.corpus)}
        if args.general is not None:
            sets["general-domain held-out"] = open_corpus(args.general)
        report["evaluation"] = {}
        for name, corpus in sets.items():
            t = time.perf_counter()
            ev = evaluate_transcoders(lm, ts, corpus, n_sequences=args.sequences, ctx_len=128, batch=8,
                                      per_layer_ce=False)
            report["evaluation"][name] = {**ev.to_dict(), "seconds": time.perf_counter() - t,
                                          "mean_fvu": sum(ev.fvu) / L, "checkpoint_tokens": latest["tokens"]}
    plot(log, args.docs / "training-v2-progress.png")
    (args.docs / "training-v2-progress.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# Default set v2: the long run in progress",
        "",
        f"Written by `scripts/run_progress.py` on {report['written']} from `{run_name}` "
        f"(numbers: [training-v2-progress.json](training-v2-progress.json)). The run itself: "
        "`scripts/long_run.sh start` (docs/training.md).",
        "",
        f"- **Tokens per layer so far:** {last['tokens']:,} in {last['step']:,} optimiser steps "
        f"(latest checkpoint: {latest['tokens']:,} tokens)." if latest else
        f"- **Tokens per layer so far:** {last['tokens']:,} in {last['step']:,} optimiser steps (no checkpoint yet).",
        f"- **Throughput at the last log line:** {last['tokens_per_s']:.0f} tokens/s for all {L} layers "
        "(the run shares the machine and runs under nice).",
        f"- **Training-batch FVU (last logged step), mean over layers:** {report['train_fvu_mean_last']:.3f}; "
        f"per layer {', '.join(f'{v:.2f}' for v in last['fvu'])}.",
        "",
        "![training curves](training-v2-progress.png)",
        "",
    ]
    run1 = args.docs / "training-v2-progress-run1.json"
    if run1.is_file():
        r1 = json.loads(run1.read_text())
        ev1 = r1.get("evaluation", {})
        lines += [
            f"**The first run** (same recipe, from random init) reached {r1['tokens']:,} tokens before its "
            "checkpoints were lost with its machine (runs/ did not survive to the next working stretch); this "
            "run restarted warm from the shipped set v1 (`train --init-from`). Its last report: "
            f"[training-v2-progress-run1.json](training-v2-progress-run1.json), curves "
            "[training-v2-progress-run1.png](training-v2-progress-run1.png); held-out at "
            f"{r1['checkpoint']['tokens']:,} tokens: "
            + "; ".join(f"{name} mean FVU {ev['mean_fvu']:.3f}, KL {ev['kl_replaced']:.3f} nats" for name, ev in ev1.items())
            + ".",
            "",
        ]
    for name, ev in report.get("evaluation", {}).items():
        lines += [
            f"**Held-out, {name}** ({ev['n_tokens']:,} predicted tokens, checkpoint at {ev['checkpoint_tokens']:,} tokens): "
            f"mean FVU {ev['mean_fvu']:.3f}; L0 mean {sum(ev['l0']) / L:.1f}; dead fraction mean "
            f"{sum(ev['dead_fraction']) / L:.3f}; CE clean {ev['ce_clean']:.3f} → all MLPs replaced "
            f"{ev['ce_replaced']:.3f} ({ev['ce_recovered']:.1f}% recovered); KL(all replaced) {ev['kl_replaced']:.3f} nats.",
            "",
        ]
    (args.docs / "training-v2-progress.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
