"""Attribution cost on the embedded default model (SmolLM2-135M-Instruct), CPU.

For each prompt length: active features, rows computed, backward passes, seconds, peak RSS. Each case
runs in its own subprocess so that peak RSS is per case. Prints a table and writes JSON.

    .venv/bin/python benchmarks/attribution.py                 # 16 and 64 tokens
    .venv/bin/python benchmarks/attribution.py --tokens 16 --transcoders random
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
TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "salt, grain and cloth. Over the centuries the town grew into a regional capital with a cathedral, "
    "a university and a busy port that connected it to the rest of the continent and beyond. In the "
    "nineteenth century the railway arrived, the old walls were torn down, and new districts of workshops, "
    "schools and markets spread along the valley while the population doubled in a single generation."
)


def child(args: argparse.Namespace) -> None:
    import torch

    from sparsetrace.tracer.attribution import AttributionConfig, attribute
    from sparsetrace.tracer.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(None, device=args.device)
    ts, ts_label = _transcoders(lm, args.transcoders)
    ids = lm.tokenize(TEXT)[: args.tokens]
    assert len(ids) == args.tokens, f"benchmark text has only {len(ids)} tokens"
    cfg = AttributionConfig(
        batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes, device=args.device
    )
    t0 = time.perf_counter()
    g = attribute(ids, lm, ts, config=cfg)
    secs = time.perf_counter() - t0
    st = g.metadata["stats"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB → MB on Linux
    print(
        json.dumps(
            {
                "tokens": args.tokens,
                "transcoders": ts_label,
                "max_feature_nodes": args.max_feature_nodes,
                "batch_size": args.batch_size,
                "active_features": st["active_features"],
                "feature_nodes": st["feature_nodes"],
                "rows_computed": st["rows_computed"],
                "backward_passes": st["backward_passes"],
                "edges_stored": int(g.adjacency.nnz),
                "seconds": round(secs, 2),
                "peak_rss_mb": round(rss, 1),
            }
        )
    )


def _transcoders(lm, spec: str):
    from sparsetrace.transcoders import TranscoderSet, TranscoderSetConfig, load_transcoders

    if spec == "random":
        cfg = TranscoderSetConfig(lm.model_id, lm.adapter.name, lm.n_layers, lm.d_model, 4608, "topk", 32)
        return TranscoderSet.random(cfg, seed=0), "random TopK F=4608 k=32"
    return load_transcoders(spec), spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--transcoders", default=None, help="a set folder, or 'random' (default: the shipped set if present)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--budget-above", type=int, default=32, help="use --max-feature-nodes for prompts longer than this")
    ap.add_argument("--max-feature-nodes", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(HERE / "results" / "attribution.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.transcoders is None:
        shipped = HERE.parent / "transcoders" / "default" / "smollm2-135m"
        args.transcoders = str(shipped) if (shipped / "config.json").is_file() else "random"
    if args.child:
        args.tokens = args.tokens[0]
        args.max_feature_nodes = None if args.max_feature_nodes <= 0 else args.max_feature_nodes
        return child(args)

    results = []
    for n in args.tokens:
        budget = args.max_feature_nodes if n > args.budget_above else 0
        cmd = [sys.executable, __file__, "--child", "--tokens", str(n), "--transcoders", args.transcoders,
               "--batch-size", str(args.batch_size), "--max-feature-nodes", str(budget),
               "--threads", str(args.threads), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"case {n} tokens failed")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cols = ["tokens", "max_feature_nodes", "active_features", "feature_nodes", "rows_computed",
            "backward_passes", "edges_stored", "seconds", "peak_rss_mb"]
    print(f"transcoders: {results[0]['transcoders']}; device {args.device}, {args.threads} threads, fp32, batch {args.batch_size}")
    print(" | ".join(f"{c:>15}" for c in cols))
    for r in results:
        print(" | ".join(f"{str(r[c]):>15}" for c in cols))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d"), "results": results}
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
