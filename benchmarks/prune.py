"""Benchmark: numba one-sweep influence + pruning vs the dense power-series reference (docs/design.md §5).

Builds random layered attribution graphs (16 layers × 16 positions, 10 logits, ~``--edges`` inputs per
feature/logit row, every edge respecting layer < and position ≤), then times, each in its own subprocess so
that peak RSS is per method:

* sparse: ``sparsetrace.graphs.prune.prune`` (CSR, numba kernels; JIT warm-up excluded, best of 3);
* dense: circuit-tracer's approach in numpy — dense N×N float64, row-normalise, influence by repeated
  vector×matrix products until the term vanishes, dense edge-score matrix, thresholds, fixed point.

The dense path needs three N×N float64 matrices (≈ 2.4 GB at 10k nodes, 60 GB at 50k), so it is skipped
above ``--dense-max`` nodes. Prints a table and writes ``benchmarks/results/prune.json`` (atomically).

    python benchmarks/prune.py                 # 2k, 10k, 50k nodes
    python benchmarks/prune.py --sizes 2000    # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_LAYERS, N_POS, N_LOGITS = 16, 16, 10


def make_graph(n_nodes: int, edges_per_row: int, seed: int = 0):
    from sparsetrace.graphs import Adjacency, AttributionGraph, NodeLayout

    rng = np.random.default_rng(seed)
    n_feat = n_nodes - N_LAYERS * N_POS - N_POS - N_LOGITS
    layout = NodeLayout.build(
        N_LAYERS, N_POS, rng.integers(0, N_LAYERS, n_feat), rng.integers(1, N_POS, n_feat),
        rng.integers(0, 16384, n_feat), N_LOGITS,
    )
    n = layout.n_nodes
    by_layer = np.argsort(lay_layer := layout.layer.astype(np.int64), kind="stable")
    sorted_layer = lay_layer[by_layer]
    rows, cols = [], []
    targets = np.r_[np.arange(layout.features.start, layout.features.stop), np.arange(layout.logits.start, n)]
    for t in targets:
        prefix = int(np.searchsorted(sorted_layer, lay_layer[t], side="left"))  # nodes at earlier layers
        cand = by_layer[rng.integers(0, prefix, 2 * edges_per_row)]
        cand = np.unique(cand[layout.pos[cand] <= layout.pos[t]])[:edges_per_row]
        rows.append(np.full(len(cand), t))
        cols.append(cand)
    r, c = np.concatenate(rows), np.concatenate(cols)
    # heavy-tailed weights, as real attributions are
    w = rng.standard_t(3, size=len(r)).astype(np.float32)
    adj = Adjacency.from_coo(r, c, w, n)
    probs = np.sort(rng.dirichlet(np.ones(N_LOGITS)))[::-1] * 0.95
    return AttributionGraph(
        layout=layout, adjacency=adj, activation=np.ones(n, np.float32), bias=np.zeros(n, np.float32),
        value=np.zeros(n, np.float32), token_ids=np.arange(N_POS), token_strings=[f"t{i}" for i in range(N_POS)],
        logit_token=np.arange(N_LOGITS), logit_probability=probs, logit_label=[f"l{i}" for i in range(N_LOGITS)],
    )


def _threshold_keep(scores: np.ndarray, threshold: float) -> np.ndarray:
    pos = scores[scores > 0]
    if pos.size == 0:
        return np.zeros(scores.shape, bool)
    s = np.sort(pos)[::-1]
    c = np.cumsum(s)
    cut = s[min(int(np.searchsorted(c, threshold * c[-1])), len(s) - 1)]
    return (scores >= cut) & (scores > 0)


def _dense_influence(ahat: np.ndarray, w: np.ndarray) -> np.ndarray:
    total = np.zeros_like(w)
    term = w
    for _ in range(len(w)):
        term = term @ ahat
        if not term.any():
            break
        total += term
    return total


def dense_prune(graph, node_threshold: float = 0.8, edge_threshold: float = 0.98):
    a = np.abs(graph.adjacency.to_dense().astype(np.float64))
    w = graph.logit_weights()
    kind = graph.layout.kind

    def normalise(m):
        d = m.sum(axis=1)
        d[d == 0] = 1
        m /= d[:, None]
        return m

    ahat = normalise(a.copy())
    infl = _dense_influence(ahat, w)
    del ahat
    protected = kind >= 2
    node_mask = protected.copy()
    node_mask[~protected] = _threshold_keep(infl[~protected], node_threshold)
    a[~node_mask] = 0
    a[:, ~node_mask] = 0
    ahat = normalise(a)
    infl2 = _dense_influence(ahat, w)
    ahat *= (infl2 + w)[:, None]  # edge scores, in place
    edge_mask = _threshold_keep(ahat, edge_threshold)
    while True:
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        new = node_mask & (protected | edge_mask.any(axis=0))
        new &= (kind != 0) | edge_mask.any(axis=1)
        if np.array_equal(new, node_mask):
            break
        node_mask = new
    return int(node_mask.sum()), int(edge_mask.sum())


def worker(method: str, n: int, edges: int) -> dict:
    from sparsetrace.graphs.prune import prune

    t0 = time.perf_counter()
    g = make_graph(n, edges)
    build_s = time.perf_counter() - t0
    rss_graph = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method == "sparse":
        prune(make_graph(400, 20, seed=1))  # JIT / cache load outside the timing
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = prune(g)
            times.append(time.perf_counter() - t0)
        kept = (res.n_nodes_kept, res.n_edges_kept)
        secs = min(times)
    else:
        t0 = time.perf_counter()
        kept = dense_prune(g)
        secs = time.perf_counter() - t0
    return {
        "method": method, "n_nodes": g.n_nodes, "n_edges": g.adjacency.nnz, "seconds": secs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_build_mb": rss_graph, "build_seconds": build_s, "nodes_kept": kept[0], "edges_kept": kept[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    ap.add_argument("--edges", type=int, default=200, help="inputs per feature/logit row")
    ap.add_argument("--dense-max", type=int, default=20000, help="skip the dense method above this many nodes")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "prune.json")
    ap.add_argument("--worker", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args.edges)))
        return
    results = []
    for n in args.sizes:
        for method in ("sparse", "dense"):
            if method == "dense" and n > args.dense_max:
                results.append({"method": "dense", "n_nodes": n, "skipped": f"needs ~{3 * n * n * 8 / 1e9:.0f} GB"})
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--worker", method, "--sizes", str(n), "--edges", str(args.edges)],
                capture_output=True, text=True, check=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'nodes':>7} {'edges':>10} {'sparse s':>9} {'dense s':>9} {'speed-up':>9} {'sparse MB':>10} {'dense MB':>10} {'kept (sparse/dense)':>22}")
    for n in args.sizes:
        s = next(r for r in results if r["method"] == "sparse" and r["n_nodes"] == n)
        d = next(r for r in results if r["method"] == "dense" and r["n_nodes"] == n)
        if "skipped" in d:
            dense_s, speed, dense_mb, kept = "skipped", "–", d["skipped"], f"{s['nodes_kept']}/{s['edges_kept']} / –"
        else:
            dense_s, speed = f"{d['seconds']:.3f}", f"{d['seconds'] / s['seconds']:.0f}×"
            dense_mb = f"{d['peak_rss_mb']:.0f}"
            kept = f"{s['nodes_kept']}/{s['edges_kept']} / {d['nodes_kept']}/{d['edges_kept']}"
        print(f"{n:>7} {s['n_edges']:>10} {s['seconds']:>9.3f} {dense_s:>9} {speed:>9} {s['peak_rss_mb']:>10.0f} {dense_mb:>10} {kept:>22}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"edges_per_row": args.edges, "results": results}, f, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
