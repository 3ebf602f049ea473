"""Transcoder-training throughput on SmolLM2-135M (all 30 layers): sparse vs dense TopK kernels.

Measures, each mode in its own process so that peak RSS is per mode:
  - model forward (activation streaming, every layer's MLP in/out, position 0 and outliers dropped), tokens/s
  - trainer steps on all layers at once (F, k, batch below), tokens/s, for sparse and dense kernels
  - end-to-end tokens/s = 1 / (1/forward + 1/trainer) (the two run one after the other)
and peak RSS. Prints a table and writes benchmarks/results/train.json.

    python benchmarks/train.py [--features 4608] [--k 32] [--batch 1024] [--steps 6]
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

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "runs" / "corpus-smollm2"


def measure(mode: str, args) -> dict:
    from sparsetrace.tracer.models import load_model
    from sparsetrace.tracer.training import ModelActivationSource
    from sparsetrace.transcoders.data import open_corpus
    from sparsetrace.transcoders.train import TrainConfig, Trainer

    lm = load_model(None, device="cpu")
    corpus = open_corpus(args.corpus)
    cfg = TrainConfig(n_features=args.features, k=args.k, batch_tokens=args.batch, sparse_kernels=(mode == "sparse"),
                      shuffle_buffer_tokens=args.batch * args.steps, progress=False)
    src = ModelActivationSource(lm, corpus, list(range(lm.n_layers)), ctx_len=cfg.ctx_len,
                                model_batch=cfg.model_batch, outlier_factor=cfg.outlier_factor)
    t = time.perf_counter()
    x, y = src.read(args.batch * args.steps)
    fwd_s = time.perf_counter() - t
    fwd_tps = x.shape[1] / fwd_s
    trainer = Trainer(cfg, lm.n_layers, lm.d_model)
    trainer.initialize(x, y)
    trainer.step(x[:, : args.batch], y[:, : args.batch])  # warm-up step (allocations, first-call costs)
    t = time.perf_counter()
    for s in range(1, args.steps):
        b = slice(s * args.batch, (s + 1) * args.batch)
        stats = trainer.step(x[:, b], y[:, b])
    train_s = time.perf_counter() - t
    train_tps = (args.steps - 1) * args.batch / train_s
    return {
        "mode": mode,
        "forward_tokens_per_s": fwd_tps,
        "train_tokens_per_s": train_tps,
        "end_to_end_tokens_per_s": 1 / (1 / fwd_tps + 1 / train_tps),
        "step_s": train_s / (args.steps - 1),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "last_fvu_mean": float(stats.fvu.mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6, help="steps per mode (first one is a warm-up)")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--modes", default="sparse,dense")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, "-W", "ignore", __file__, "--child", mode, "--features", str(args.features),
               "--k", str(args.k), "--batch", str(args.batch), "--steps", str(args.steps), "--corpus", args.corpus]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"load average {os.getloadavg()[0]:.1f} (shared machine: absolute numbers are noisy)")
    print(f"SmolLM2-135M, 30 layers, F={args.features}, k={args.k}, batch={args.batch} tokens, "
          f"{torch.get_num_threads()} threads, fp32")
    print(f"{'mode':8s} {'forward tok/s':>14s} {'trainer tok/s':>14s} {'end-to-end':>11s} {'s/step':>8s} {'peak RSS GB':>12s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['forward_tokens_per_s']:14.0f} {r['train_tokens_per_s']:14.0f} "
              f"{r['end_to_end_tokens_per_s']:11.0f} {r['step_s']:8.2f} {r['peak_rss_gb']:12.2f}")
    by = {r["mode"]: r for r in rows}
    if "sparse" in by and "dense" in by:
        print(f"sparse/dense trainer speed-up: {by['sparse']['train_tokens_per_s'] / by['dense']['train_tokens_per_s']:.2f}×")
    result = {
        "benchmark": "train", "model": "SmolLM2-135M-Instruct", "n_layers": 30, "n_features": args.features,
        "k": args.k, "batch_tokens": args.batch, "steps": args.steps, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "rows": rows,
        # The machine is shared: other processes' load makes absolute numbers noisy; compare rows of one run.
        "load_average_after": os.getloadavg(),
    }
    path = ROOT / "benchmarks" / "results" / "train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
