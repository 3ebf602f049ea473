"""End-to-end `sparsetrace trace` with a warm cache: the command's own time line per phase (issue 23;
docs/models.md).

Per model, the command runs once to warm the model cache (not reported), then ``--repeat`` times, each in
its own process, exactly as a user types it; the table gives the median of each phase of the command's
``--json`` time line (loading = imports + model + transcoders + statistics, attribution = the engine,
labels, pruning, pictures, writing) and the wall time of the process.

    .venv/bin/python benchmarks/trace_e2e.py                        # both embedded models, 6-token prompt
    .venv/bin/python benchmarks/trace_e2e.py --model gemma-3-270m --repeat 5

Needs `make model` (and `make gemma` for Gemma-3-270M). Gemma has no trained set: it runs with
``random:1024:16``, the setting issue 23 names; the default model runs with its shipped set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "The capital of France is"
SETS = {"SmolLM2-135M-Instruct": None, "gemma-3-270m": "random:1024:16"}
PHASES = ("loading", "attribution", "labels", "pruning", "pictures", "writing", "total")


def _command(model: str, out: Path, threads: int) -> list[str]:
    cmd = [str(ROOT / ".venv" / "bin" / "sparsetrace"), "trace", PROMPT, "--out", str(out), "--json"]
    if model != "SmolLM2-135M-Instruct":
        cmd += ["--model", model]
    if SETS.get(model):
        cmd += ["--transcoders", SETS[model]]
    return cmd


def run_once(model: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        done = subprocess.run(_command(model, Path(tmp) / "out", threads), capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"trace on {model} failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}")
    data = json.loads(done.stdout)
    return {**{k: data["seconds"].get(k, 0.0) for k in PHASES}, "wall": round(wall, 3),
            "n_tokens": len(data["tokens"])}


def measure(model: str, repeat: int, threads: int) -> dict:
    run_once(model, threads)  # warm the cache
    runs = [run_once(model, threads) for _ in range(repeat)]
    med = {k: round(statistics.median(r[k] for r in runs), 2) for k in (*PHASES, "wall")}
    return {"model": model, "transcoders": SETS.get(model) or "shipped set", "median": med, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", dest="models", metavar="NAME", choices=sorted(SETS),
                    help="an embedded model (repeatable; default: both)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "trace_e2e.json"))
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat {args.repeat}; allowed: ≥ 1")
    payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_average": os.getloadavg()},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "prompt": PROMPT,
               "command": " ".join([".venv/bin/python", "benchmarks/trace_e2e.py"] + sys.argv[1:]), "results": []}
    for model in args.models or list(SETS):
        print(f"{model} …", flush=True)
        payload["results"].append(measure(model, args.repeat, args.threads))
    payload["machine"]["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(out)
    print("| model | transcoders | " + " | ".join(PHASES) + " | process wall (s) |")
    print("|---|---|" + "---|" * (len(PHASES) + 1))
    for r in payload["results"]:
        m = r["median"]
        print(f"| {r['model']} | {r['transcoders']} | " + " | ".join(f"{m[k]:.1f}" for k in PHASES) + f" | {m['wall']:.1f} |")
    print(f"medians of {args.repeat} runs; load average before/after: {payload['machine']['load_average']} / "
          f"{payload['machine']['load_average_after']}")


if __name__ == "__main__":
    main()
