"""QK attribution cost on the embedded default model (SmolLM2-135M-Instruct, 30 layers, 9 query heads of
64 dims, 3 key/value heads), CPU (issue 17; docs/design.md §13).

A case is ``TOKENS:HOPS``: prompt length and the number of attention hops explained. Each case runs in its
own subprocess (peak RSS per case): the graph is traced first (row budget 512 features, fp32, not timed
as QK), then the QK steps are timed one by one —

* ``open``: the clean run and the sources (what every QK command pays once);
* ``select``: ranking every hop by its weight on the logits (one frozen forward of K copies + backward);
* ``decompose``: splitting the HOPS selected scores (per layer: the model's own q/k at the clean point and
  with sources zeroed, the query/key Jacobians M, then 2·64 Jacobian rows per score through the frozen
  model, contracted with every source);
* ``loadings``: head loadings of the graph's largest cross-position edge into the top logit.

Prompts are the first TOKENS tokens of /usr/share/common-licenses/GPL-3 (as benchmarks/attribution.py).
The machine this ran on was shared and heavily loaded: read the seconds as upper bounds.

    .venv/bin/python benchmarks/qk.py                # 16:4 64:4
    .venv/bin/python benchmarks/qk.py --quick        # 16:1, to results/qk_quick.json
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


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from sparsetrace.config import AttributionConfig, QKConfig
    from sparsetrace.graphs import NodeKind
    from sparsetrace.models.loading import load_model
    from sparsetrace.tracer.attribution import attribute
    from sparsetrace.tracer.qk import open_qk
    from sparsetrace.transcoders import load_transcoders

    torch.set_num_threads(args.threads)
    T, n_hops = (int(x) for x in args.case.split(":"))
    lm = load_model(None, device="cpu")
    ts = load_transcoders(Path(__file__).resolve().parents[1] / "transcoders" / "default" / "smollm2-135m")
    ids = lm.tokenize(TEXT_FILE.read_text())[:T]
    t0 = time.perf_counter()
    g = attribute(ids, lm, ts, config=AttributionConfig(max_feature_nodes=512))
    t_trace = time.perf_counter() - t0
    res = {"case": args.case, "tokens": T, "hops": n_hops, "nodes": int(g.n_nodes), "trace_s": t_trace}
    cfg = QKConfig(n_hops=n_hops, batch_size=args.batch)
    t0 = time.perf_counter()
    with open_qk(g, lm, ts, cfg) as qa:
        res["open_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hops = qa.select_hops()
        res["select_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        decs = qa.decompose([h.site for h in hops])
        res["decompose_s"] = time.perf_counter() - t0
        res["layers"] = len({h.site.layer for h in hops})
        res["max_closure"] = max(d.closure()["score"] for d in decs)
        res["sources_per_side"] = float(np.mean([len(d.q_nodes) + len(d.k_nodes) for d in decs]) / 2)
        lay, adj = g.layout, g.adjacency
        t = lay.logits.start
        cols, vals = adj.row(t)
        cross = (lay.pos[cols] < lay.pos[t]) & (lay.kind[cols] != NodeKind.LOGIT)
        s = int(cols[cross][np.argmax(np.abs(vals[cross]))])
        t0 = time.perf_counter()
        hl = qa.head_loadings(t, s)
        res["loadings_s"] = time.perf_counter() - t0
        res["loadings_gap"] = abs(hl.loading.sum() - hl.edge)
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=["16:4", "64:4"], help="TOKENS:HOPS")
    ap.add_argument("--quick", action="store_true", help="one small case (16:1)")
    ap.add_argument("--batch", type=int, default=32, help="QKConfig.batch_size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="default: results/qk.json (--quick: results/qk_quick.json)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        child(args)
        return
    cases = ["16:1"] if args.quick else args.cases
    args.out = args.out or HERE / "results" / ("qk_quick.json" if args.quick else "qk.json")
    rows = []
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case, "--batch", str(args.batch), "--threads", str(args.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if p.returncode != 0:
            sys.exit(f"case {case} failed:\n{p.stderr[-2000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    cols = ["tokens", "hops", "layers", "nodes", "sources_per_side", "trace_s", "open_s", "select_s", "decompose_s",
            "loadings_s", "peak_rss_gb", "max_closure", "loadings_gap"]
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>14.4g}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: a shared machine, seconds are upper bounds)")
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
           "cpus": os.cpu_count(), "threads": args.threads, "batch": args.batch, "load_average": os.getloadavg(),
           "note": "shared, heavily loaded machine: seconds are upper bounds", "cases": rows}
    from sparsetrace._atomic import atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)

    atomic_write_text(args.out, json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
