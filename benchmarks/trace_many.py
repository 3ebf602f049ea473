"""Benchmark: graphs per hour for a prompt set — a shell loop of ``sparsetrace trace`` (one model load
per prompt) against ``sparsetrace trace-many`` with 1 and 2 local workers (one load per worker).

Each variant is a fresh ``sparsetrace`` process timed from the outside (wall clock, model loading
included); every variant writes the same files per prompt (the compact figure included).

    python benchmarks/trace_many.py                 # the default model, the first 4 capitals prompts
    python benchmarks/trace_many.py --n-prompts 8   # more prompts
    python benchmarks/trace_many.py --quick         # a tiny random model (seconds; overheads only)

Prints a table and writes ``benchmarks/results/trace_many.json`` (``trace_many_quick.json`` with
--quick) atomically. The figures depend on the machine's load: other jobs sharing the cores slow the
2-worker run most (it needs both cores); the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sparsetrace._atomic import atomic_write_text
from sparsetrace.tracer.prompt_sets import load_prompt_set, write_prompt_set

ROOT = Path(__file__).resolve().parent.parent
SET = ROOT / "docs" / "prompt-sets" / "capitals.jsonl"
QUICK_PROMPTS = ["the capital of france is", "john gave a drink to", "the cat sat on the", "the big red dog ran",
                 "one two three four", "the sun and the moon"]


def sparsetrace(*args: str) -> float:
    """Run ``sparsetrace ARGS`` in a fresh process; its wall-clock seconds."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "from sparsetrace.cli import main; main()", *args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sparsetrace {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def tiny_model(folder: Path) -> list[str]:
    """The tests' tiny saved model (2 layers, word tokenizer); its model options."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _cli_fixtures import save_tiny_model

    return ["-m", str(save_tiny_model(folder / "model")), "-t", "random:32:4"]


def run(n_prompts: int, quick: bool, work: Path) -> list[dict]:
    if quick:
        opts = tiny_model(work)
        items = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(QUICK_PROMPTS[:n_prompts])]
        (work / "set.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items))
    else:
        opts = []
        write_prompt_set(work / "set.jsonl", load_prompt_set(SET)[:n_prompts])
    items = load_prompt_set(work / "set.jsonl")
    rows = []
    t = 0.0
    for it in items:  # the shell loop: one process (one model load) per prompt
        targets = [a for tg in it.targets for a in ("--target", tg)]
        t += sparsetrace("trace", it.prompt, *targets, "--out", str(work / "loop" / it.id), "-q", *opts)
    rows.append({"variant": "shell loop of `trace`", "workers": 1, "seconds": t})
    for w in (1, 2):
        s = sparsetrace("trace-many", str(work / "set.jsonl"), "--out", str(work / f"many{w}"), "--workers", str(w), "-q", *opts)
        man = json.loads((work / f"many{w}" / "manifest.json").read_text())
        assert man["summary"]["done"] == len(items), man["summary"]
        rows.append({"variant": f"trace-many --workers {w}", "workers": w, "seconds": s})
    for r in rows:
        r["prompts"] = len(items)
        r["graphs_per_hour"] = 3600 * len(items) / r["seconds"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="a tiny random model instead of the default model")
    a = ap.parse_args()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-trace-many-") as tmp:
        rows = run(a.n_prompts, a.quick, Path(tmp))
    load1 = os.getloadavg()
    base = rows[0]["seconds"]
    print(f"{'variant':28s} {'prompts':>7s} {'seconds':>8s} {'graphs/hour':>11s} {'speed-up':>8s}")
    for r in rows:
        r["speedup_vs_loop"] = base / r["seconds"]
        print(f"{r['variant']:28s} {r['prompts']:7d} {r['seconds']:8.1f} {r['graphs_per_hour']:11.1f} {r['speedup_vs_loop']:7.2f}×")
    print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f} on {os.cpu_count()} cores")
    out = ROOT / "benchmarks" / "results" / ("trace_many_quick.json" if a.quick else "trace_many.json")
    atomic_write_text(out, json.dumps({
        "benchmark": "trace_many", "quick": a.quick, "model": "tiny random (tests)" if a.quick else "embedded default",
        "rows": rows, "cpu_count": os.cpu_count(), "load_average_before": load0, "load_average_after": load1,
        "platform": platform.platform(), "python": platform.python_version(), "command": " ".join(sys.argv),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "dask_used": False,
    }, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
