"""Attribution with a cross-layer transcoder vs a per-layer set of the same width, side by side
(issue 16, item 5; docs/cross-layer.md).

On the embedded default model (SmolLM2-135M-Instruct, 30 layers, d = 576), CPU, fp32, every active
feature's row (no row budget, exact). For each prompt length (default 8, 32 and 128 tokens, from
``CrossLayerConfig.benchmark_tokens``) two cases run, each in its own subprocess so that peak RSS is
per case:

* ``per-layer``: a random TopK per-layer set, F features per layer, k active;
* ``cross-layer``: a random TopK CLT with the same F and k per source layer (so the same number of
  features and of active features per token; each feature writes to its layer and every later one).

Both are random (exactness does not need training; the cost depends on shapes and active counts, and
random encoders give every layer its k active features per token). Reported per case: active features,
rows, seconds, peak RSS, edges stored, the contraction's GFLOP, and the CLT / per-layer ratios.

    .venv/bin/python benchmarks/clt_attribution.py             # 8, 32, 128 tokens, F = 2304, k = 32
    .venv/bin/python benchmarks/clt_attribution.py --quick     # 8 tokens, F = 256, k = 8
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
KINDS = ("per-layer", "cross-layer")


def _transcoders(lm, kind: str, n_features: int, k: int):
    """A random TopK per-layer set or CLT of ``n_features`` per layer."""
    kw = dict(model_id=lm.model_id, architecture=lm.adapter.name, n_layers=lm.n_layers, d_in=lm.d_model,
              n_features=n_features, activation="topk", k=k, skip=True)
    if kind == "cross-layer":
        from sparsetrace.transcoders import CrossLayerTranscoder, CrossLayerTranscoderConfig

        return CrossLayerTranscoder.random(CrossLayerTranscoderConfig(**kw), seed=0)
    from sparsetrace.transcoders import TranscoderSet, TranscoderSetConfig

    return TranscoderSet.random(TranscoderSetConfig(**kw), seed=0)


def child(args: argparse.Namespace) -> None:
    import torch

    from sparsetrace.models.loading import load_model
    from sparsetrace.tracer.attribution import AttributionConfig, attribute

    torch.set_num_threads(args.threads)
    lm = load_model(None, device="cpu")
    ts = _transcoders(lm, args.kind, args.n_features, args.k)
    ids = lm.tokenize(TEXT_FILE.read_text())[: args.tokens]
    if len(ids) != args.tokens:
        raise SystemExit(f"benchmark text has only {len(ids)} tokens")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    g = attribute(ids, lm, ts, config=AttributionConfig(device="cpu", max_feature_nodes=args.max_feature_nodes))
    secs = time.perf_counter() - t0
    st = g.metadata["stats"]
    print(json.dumps({
        "kind": args.kind, "tokens": args.tokens, "n_features": args.n_features, "k": args.k, "threads": args.threads,
        "max_feature_nodes": args.max_feature_nodes, "active_features": st["active_features"], "rows_computed": st["rows_computed"],
        "backward_passes": st["backward_passes"], "edges_stored": int(g.adjacency.nnz), "seconds": round(secs, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_attribution_mb": round(rss0, 1),
        "backward_gflop": round(st["backward_gflop"] or 0.0, 2), "contraction_gflop": round(st["contraction_gflop"], 2),
    }))


def table(results: list[dict]) -> list[str]:
    """One row per prompt length: per-layer and cross-layer side by side, with the ratios."""
    by = {(r["tokens"], r["kind"]): r for r in results if "error" not in r}
    out = ["| tokens | active features | seconds per-layer / CLT (×) | peak RSS GB per-layer / CLT (×) |"
           " edges stored per-layer / CLT | contraction GFLOP per-layer / CLT |",
           "|---|---|---|---|---|---|"]
    for n in sorted({r["tokens"] for r in results}):
        p, c = by.get((n, "per-layer")), by.get((n, "cross-layer"))
        if p is None or c is None:
            errs = [r for r in results if r["tokens"] == n and "error" in r]
            out.append(f"| {n} | failed: {'; '.join(r['kind'] + ': ' + r['error'] for r in errs)} |")
            continue
        out.append(
            f"| {n} | {p['active_features']:,} / {c['active_features']:,} |"
            f" {p['seconds']:.1f} / {c['seconds']:.1f} ({c['seconds'] / max(p['seconds'], 1e-9):.1f}×) |"
            f" {p['peak_rss_mb'] / 1024:.2f} / {c['peak_rss_mb'] / 1024:.2f} ({c['peak_rss_mb'] / p['peak_rss_mb']:.1f}×) |"
            f" {p['edges_stored'] / 1e6:.2f} M / {c['edges_stored'] / 1e6:.2f} M |"
            f" {p['contraction_gflop']:.1f} / {c['contraction_gflop']:.1f} |")
    return out


def main() -> None:
    from sparsetrace.config import CrossLayerConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="*", default=None,
                    help=f"prompt lengths (default {CrossLayerConfig.benchmark_tokens})")
    ap.add_argument("--n-features", type=int, default=None, help="features per layer (default 2304; --quick 256)")
    ap.add_argument("--k", type=int, default=None, help="active features per token and layer (default 32; --quick 8)")
    ap.add_argument("--quick", action="store_true", help="8 tokens, F = 256, k = 8: a smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-feature-nodes", type=int, default=None,
                    help="row budget (the same for both cases; default: every active feature's row, exact)")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/results/clt_attribution[_quick].json)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.tokens = args.tokens[0]  # a child runs one length
        return child(args)
    tokens = args.tokens or list(CrossLayerConfig.benchmark_quick_tokens if args.quick else CrossLayerConfig.benchmark_tokens)
    n_features = args.n_features or (256 if args.quick else 2304)
    k = args.k or (8 if args.quick else 32)
    out_path = Path(args.out or HERE / "results" / ("clt_attribution_quick.json" if args.quick else "clt_attribution.json"))
    if not TEXT_FILE.is_file():
        raise SystemExit(f"{TEXT_FILE} not found (Debian's base-files ships it)")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join([".venv/bin/python", "benchmarks/clt_attribution.py"] + sys.argv[1:]),
               "load_average_before": [round(x, 2) for x in os.getloadavg()],
               "results": []}
    for n in tokens:
        for kind in KINDS:
            cmd = [sys.executable, __file__, "--child", "--kind", kind, "--tokens", str(n), "--n-features",
                   str(n_features), "--k", str(k), "--threads", str(args.threads)]
            if args.max_feature_nodes is not None:
                cmd += ["--max-feature-nodes", str(args.max_feature_nodes)]
            print(f"{kind} {n} tokens …", flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:  # recorded; the other cases still run
                why = f"exit {res.returncode}" + (" (killed: out of memory)" if res.returncode == -9 else "")
                print(why, res.stderr[-2000:], file=sys.stderr)
                payload["results"].append({"kind": kind, "tokens": n, "error": why})
            else:
                payload["results"].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(payload["results"][-1]), flush=True)
            payload["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            _write(payload, out_path)
    budget = f"row budget {args.max_feature_nodes}" if args.max_feature_nodes is not None else "every row"
    print(f"random TopK, F = {n_features} per layer, k = {k}, {budget}; CPU, {args.threads} threads, fp32; load average "
          f"{payload['load_average_before'][0]} before, {payload['load_average_after'][0]} after")
    print("\n".join(table(payload["results"])))
    print(f"wrote {out_path}")


def _write(payload: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
