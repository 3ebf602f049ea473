"""Attribution cost on the embedded models (SmolLM2-135M-Instruct by default; ``--model gemma-3-270m``,
repeatable), CPU: short and long prompts, and the floor (issue 2; issue 8, items 3 and 4; issue 23).

A case is ``TOKENS[:BUDGET[:BATCH[:THRESHOLD]]]``: prompt length, row budget (``max_feature_nodes``;
0 = every active feature), rows per backward pass (0 = the engine's automatic choice), and the per-row storage threshold (edges with
|w| ≤ THRESHOLD·max|row| go to the row's remainder; 0 = exact). Each case runs in its own subprocess, so
peak RSS is per case. Per case: active features, rows, backward passes, stored edges, seconds, peak RSS,
the dropped share of each row's absolute mass (mean / max), and the floor:

* ``executed GFLOP``: the matmul FLOPs the engine ran (backward passes, as counted by the engine and
  checked against torch's profiler in tests/test_tracer_linear.py, plus the contraction);
* ``minimal GFLOP``: what the rows need at least — each row alone from its own layer and position
  (layers below it, positions up to it, causal half of each attention pattern), plus the contraction;
* ``GFLOP/s``: an fp32 matmul of the engine's typical shape, measured in the same process just before;
* ``× floor``: seconds / (minimal GFLOP / GFLOP/s).

Prompts are the first TOKENS tokens of the GPL-3 text that every Debian machine carries
(/usr/share/common-licenses/GPL-3); the short cases use the same text.

    .venv/bin/python benchmarks/attribution.py                                   # 16:0 64:4096
    .venv/bin/python benchmarks/attribution.py --model SmolLM2-135M-Instruct --model gemma-3-270m --cases 8:0 32:0 \
        --transcoders random:1024:8 --threads 1 --out benchmarks/results/attribution-gemma.json   # the two embedded models
    .venv/bin/python benchmarks/attribution.py --cases 512:1024:32:1e-3 512:8192:32:1e-3 2048:1024:16:1e-3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT_FILE = Path("/usr/share/common-licenses/GPL-3")


def _matmul_gflops(threads: int, seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of (4096 × 576) @ (576 × 576), the engine's most common product (B·T' × d times d × d)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 576), torch.randn(576, 576)
    for _ in range(5):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 4096 * 576 * 576 * n / (time.perf_counter() - t0) / 1e9


def _minimal_backward_flops(lm, layer, pos) -> int:
    """Σ over rows (target at MLP input of ``layer`` — n_layers for logits — and position ``pos``) of the
    matmul FLOPs of a backward started at that row alone: attention V/O at layers ≤ its layer over
    positions 1..pos (causal half; position 0, a constant, only through each attention's key-0 row; the
    first layer at the row's own position only, then spread over the keys, as tracer/_linear.py does),
    skip at layers below it."""
    import numpy as np

    nq, nkv, hd = lm.adapter.attention_shape(lm.model)
    d, L = lm.d_model, lm.n_layers
    layer, tp = np.asarray(layer, dtype=np.int64), np.asarray(pos, dtype=np.int64)  # positions 1..pos
    n_att = np.minimum(layer + 1, L)  # layers whose attention is on the path
    n_skip = np.minimum(layer, L)
    per_pos = 2 * (d * nq * hd + nkv * hd * d)
    first = 2 * (d * nq * hd + nq * hd * d + tp * nq * d)
    att = (n_att - 1) * (tp * per_pos + 2 * nq * hd * (tp * (tp + 1) // 2 + tp)) + first
    return int((att + n_skip * tp * 2 * d * d).sum())


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from sparsetrace.tracer.attribution import AttributionConfig, attribute
    from sparsetrace.models.loading import load_model

    rate = _matmul_gflops(args.threads)
    torch.set_num_threads(args.threads)
    t_load = time.perf_counter()
    lm = load_model(args.model, device=args.device)
    t_load = time.perf_counter() - t_load
    ts, ts_label = _transcoders(lm, args.transcoders)
    ids = lm.tokenize(TEXT_FILE.read_text())[: args.tokens]
    assert len(ids) == args.tokens, f"benchmark text has only {len(ids)} tokens"
    cfg = AttributionConfig(batch_size=args.batch_size or None, max_feature_nodes=args.max_feature_nodes or None,
                            device=args.device, store_threshold=args.threshold)
    t0 = time.perf_counter()
    g = attribute(ids, lm, ts, config=cfg)
    secs = time.perf_counter() - t0
    st = g.metadata["stats"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB → MB on Linux
    lay, adj = g.layout, g.adjacency
    rows = np.r_[np.arange(lay.n_features), np.arange(lay.logits.start, lay.logits.stop)]
    r_layer = np.where(np.arange(len(rows)) < lay.n_features, lay.layer[rows], lm.n_layers)
    r_pos = np.where(np.arange(len(rows)) < lay.n_features, lay.pos[rows], lay.n_pos - 1)
    minimal = _minimal_backward_flops(lm, r_layer, r_pos) / 1e9 + st["contraction_gflop"]
    executed = st["backward_gflop"] + st["contraction_gflop"]
    absmass = np.add.reduceat(np.abs(adj.data.astype(np.float64)), adj.indptr[:-1][np.diff(adj.indptr) > 0])
    total = np.zeros(adj.n)
    total[np.diff(adj.indptr) > 0] = absmass
    total += adj.remainder
    dropped = adj.remainder[rows] / np.where(total[rows] > 0, total[rows], 1)
    print(json.dumps({
        "model": lm.model_id, "vocabulary": int(lm.adapter.unembedding(lm.model).shape[0]),
        "load_seconds": round(t_load, 2), "tokens": args.tokens, "transcoders": ts_label, "max_feature_nodes": args.max_feature_nodes or None,
        "batch_size": st["batch_size"], "store_threshold": args.threshold, "threads": args.threads,
        "active_features": st["active_features"], "feature_nodes": st["feature_nodes"],
        "rows_computed": st["rows_computed"], "backward_passes": st["backward_passes"],
        "edges_stored": int(adj.nnz), "seconds": round(secs, 2), "peak_rss_mb": round(rss, 1),
        "dropped_mass_mean": float(dropped.mean()), "dropped_mass_max": float(dropped.max()),
        "executed_gflop": round(executed, 1), "minimal_gflop": round(minimal, 1),
        "matmul_gflops": round(rate, 1), "x_floor": round(secs / (minimal / rate), 2),
        "x_executed": round(secs / (executed / rate), 2),
    }))


def _transcoders(lm, spec: str):
    from sparsetrace.transcoders import TranscoderSet, TranscoderSetConfig, load_transcoders

    if spec == "random" or spec.startswith("random:"):  # random: 4 × d_model features and k = 32, as the shipped set
        F, k = (int(x) for x in spec.split(":")[1:]) if ":" in spec else (4 * lm.d_model, 32)
        cfg = TranscoderSetConfig(lm.model_id, lm.adapter.name, lm.n_layers, lm.d_model, F, "topk", k)
        return TranscoderSet.random(cfg, seed=0), f"random TopK F={F} k={k}"
    return load_transcoders(spec), spec


def _default_transcoders(model: str | None) -> str:
    """The shipped set for the default model when present; random for any other model."""
    from sparsetrace.config import EMBEDDED_MODELS, embedded_model

    shipped = HERE.parent / "transcoders" / "default" / "smollm2-135m"
    default = model is None or embedded_model(model) is EMBEDDED_MODELS[0]
    return str(shipped) if default and (shipped / "config.json").is_file() else "random"


def _parse_case(text: str) -> tuple[int, int, int, float]:
    parts = text.split(":")
    if not 1 <= len(parts) <= 4:
        raise SystemExit(f"case {text!r}: expected TOKENS[:BUDGET[:BATCH[:THRESHOLD]]]")
    defaults = ["0", "0", "0", "0"]  # batch 0: the engine's automatic choice
    parts += defaults[len(parts):]
    return int(parts[0]), int(parts[1]), int(parts[2]), float(parts[3])


def markdown(results: list[dict]) -> list[str]:
    """The table of docs/performance.md §3–4."""
    out = ["| model | tokens | row budget | batch | threshold | active features | rows | backward passes | edges stored |"
           " seconds | peak RSS GB | dropped mass mean / max | executed GFLOP | minimal GFLOP | matmul GFLOP/s | × floor |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            out.append(f"| {r.get('model', '')} | {r['case']} | failed: {r['error']} |")
            continue
        out.append(
            f"| {r.get('model', 'SmolLM2-135M-Instruct')} | {r['tokens']} | {r['max_feature_nodes'] or 'none (exact)'} | {r['batch_size']} | {r['store_threshold']:g} |"
            f" {r['active_features']:,} | {r['rows_computed']:,} | {r['backward_passes']} | {r['edges_stored'] / 1e6:.1f} M |"
            f" {r['seconds']:.1f} | {r['peak_rss_mb'] / 1024:.2f} | {r['dropped_mass_mean']:.3f} / {r['dropped_mass_max']:.3f} |"
            f" {r['executed_gflop']:,.0f} | {r['minimal_gflop']:,.0f} | {r['matmul_gflops']:.0f} | {r['x_floor']:.2f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=["16:0", "64:4096"])
    ap.add_argument("--model", action="append", dest="models", metavar="NAME|PATH",
                    help="an embedded model's name, a GGUF or an HF folder (repeatable; default: the default model)")
    ap.add_argument("--transcoders", default=None, help="a set folder, 'random' (F = 4·d_model, k = 32) or random:F:K (default: the shipped set if present "
                    "for the default model, else random)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(HERE / "results" / "attribution.json"))
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of these result files")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-model", dest="model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-feature-nodes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threshold", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.table:
        print("\n".join(markdown([r for f in args.table for r in json.loads(Path(f).read_text())["results"]])))
        return
    if not TEXT_FILE.is_file():
        raise SystemExit(f"{TEXT_FILE} not found (Debian's base-files ships it)")

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_average": os.getloadavg()},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join([".venv/bin/python", "benchmarks/attribution.py"] + sys.argv[1:]),
               "results": []}
    results = payload["results"]
    for model, case in [(m, c) for m in (args.models or [None]) for c in args.cases]:
        n, budget, batch, thr = _parse_case(case)
        spec = args.transcoders or _default_transcoders(model)
        cmd = [sys.executable, __file__, "--child", "--tokens", str(n), "--transcoders", spec,
               "--batch-size", str(batch), "--max-feature-nodes", str(budget), "--threshold", str(thr),
               "--threads", str(args.threads), "--device", args.device] + (["--child-model", model] if model else [])
        print(f"{model or 'default model'}: case {case} …", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:  # recorded, and the other cases still run
            why = f"exit {out.returncode}" + (" (killed: out of memory)" if out.returncode == -9 else "")
            print(why, out.stderr[-2000:], file=sys.stderr)
            results.append({"model": model, "case": case, "error": why})
        else:
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        _write(payload, Path(args.out))  # after every case: a long run keeps what it measured
    print(f"transcoders: {args.transcoders or 'shipped set (default model), else random'}; device {args.device}, "
          f"{args.threads} threads, fp32")
    print("\n".join(markdown(results)))
    print(f"wrote {args.out}")


def _write(payload: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, out)

if __name__ == "__main__":
    main()
