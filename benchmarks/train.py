"""Transcoder-training throughput on SmolLM2-135M (all 30 layers): sparse vs dense TopK kernels.

Measures, each run in its own process so that peak RSS is per run:
  - model forward (activation streaming, every layer's MLP in/out, position 0 and outliers dropped), tokens/s
  - trainer steps on all layers at once (F, k, batch below), tokens/s, for sparse and dense kernels;
    the ``interleaved`` run alternates sparse and dense steps on one buffer (the fair speed ratio on a
    shared machine), the ``sparse`` / ``dense`` runs give each kernel's own peak RSS
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
    """``sparse`` / ``dense``: forward + that trainer alone (its peak RSS). ``interleaved``: both trainers
    on the same buffer, steps alternating, so that load from other processes hits both alike."""
    from sparsetrace.tracer.models import load_model
    from sparsetrace.tracer.training import ModelActivationSource
    from sparsetrace.transcoders.data import open_corpus
    from sparsetrace.transcoders.train import TrainConfig, Trainer

    lm = load_model(None, device="cpu")
    corpus = open_corpus(args.corpus)
    modes = ["sparse", "dense"] if mode == "interleaved" else [mode]
    cfgs = {m: TrainConfig(n_features=args.features, k=args.k, batch_tokens=args.batch, sparse_kernels=(m == "sparse"),
                           shuffle_buffer_tokens=args.batch * args.steps, progress=False) for m in modes}
    cfg = cfgs[modes[0]]
    src = ModelActivationSource(lm, corpus, list(range(lm.n_layers)), ctx_len=cfg.ctx_len,
                                model_batch=cfg.model_batch, outlier_factor=cfg.outlier_factor)
    t = time.perf_counter()
    x, y = src.read(args.batch * args.steps)
    fwd_tps = x.shape[1] / (time.perf_counter() - t)
    trainers = {m: Trainer(cfgs[m], lm.n_layers, lm.d_model) for m in modes}
    spent = {m: 0.0 for m in modes}
    for tr in trainers.values():
        tr.initialize(x, y)
        tr.step(x[:, : args.batch], y[:, : args.batch])  # warm-up step (allocations, first-call costs)
    for s in range(1, args.steps):
        b = slice(s * args.batch, (s + 1) * args.batch)
        for m, tr in trainers.items():
            t = time.perf_counter()
            stats = tr.step(x[:, b], y[:, b])
            spent[m] += time.perf_counter() - t
    out = {"mode": mode, "forward_tokens_per_s": fwd_tps,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    for m in modes:
        tps = (args.steps - 1) * args.batch / spent[m]
        out[f"{m}_train_tokens_per_s"] = tps
        out[f"{m}_step_s"] = spent[m] / (args.steps - 1)
        out[f"{m}_end_to_end_tokens_per_s"] = 1 / (1 / fwd_tps + 1 / tps)
    return out


def kernel_speed(features: int, k: int, d: int = 576, n_tokens: int = 2048, reps: int = 9) -> dict:
    """One layer's TopK encode+decode forward and backward, sparse vs dense, interleaved (fair under load)."""
    from sparsetrace.transcoders.kernels import dense_decode, sparse_decode, topk_encode, topk_encode_dense

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, n_tokens, d, generator=g), torch.randn(1, n_tokens, d, generator=g)
    W_enc = (torch.randn(1, features, d, generator=g) / d**0.5).requires_grad_()
    b_enc = torch.zeros(1, features).requires_grad_()
    W_dec = (0.01 * torch.randn(1, features, d, generator=g)).requires_grad_()
    paths = {"sparse": (topk_encode, sparse_decode), "dense": (topk_encode_dense, dense_decode)}
    times: dict[str, list[float]] = {m: [] for m in paths}
    for rep in range(reps + 1):
        for m, (enc, dec) in paths.items():
            t = time.perf_counter()
            vals, idx = enc(x, W_enc, b_enc, k)
            (dec(torch.relu(vals), idx, W_dec) - y).pow(2).sum().backward()
            if rep:  # the first round is a warm-up
                times[m].append(time.perf_counter() - t)
            W_enc.grad = b_enc.grad = W_dec.grad = None
    # Medians: robust to load spikes from other processes on a shared machine.
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    return {"n_tokens": n_tokens, "d": d, "n_features": features, "k": k,
            "sparse_ms": 1000 * med["sparse"], "dense_ms": 1000 * med["dense"],
            "speedup": med["dense"] / med["sparse"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6, help="steps per mode (first one is a warm-up)")
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--modes", default="interleaved,sparse,dense")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.modes == "kernels":
        # Kernel parity of speed at 1 and 2 threads: on a loaded 2-core machine, 2-thread OpenMP regions
        # stall whenever one thread is descheduled, which hurts the many small sparse ops most.
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append({"threads": threads, "load_average": os.getloadavg()[0], **kernel_speed(args.features, args.k)})
            r = runs[-1]
            print(f"threads={threads} load={r['load_average']:.1f}: sparse {r['sparse_ms']:.0f} ms, "
                  f"dense {r['dense_ms']:.0f} ms, speed-up {r['speedup']:.2f}×")
        _write(ROOT / "benchmarks" / "results" / "train_kernels.json", {"benchmark": "train-kernels", "runs": runs})
        return
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, "-W", "ignore", __file__, "--child", mode, "--features", str(args.features),
               "--k", str(args.k), "--batch", str(args.batch), "--steps", str(args.steps), "--corpus", args.corpus]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    kern = kernel_speed(args.features, args.k)
    print(f"load average {os.getloadavg()[0]:.1f} (shared machine: absolute numbers are noisy)")
    print(f"kernels, one layer, {kern['n_tokens']} tokens, F={args.features}, d=576, k={args.k}, forward+backward: "
          f"sparse {kern['sparse_ms']:.0f} ms, dense {kern['dense_ms']:.0f} ms, speed-up {kern['speedup']:.2f}×")
    print(f"SmolLM2-135M, 30 layers, F={args.features}, k={args.k}, batch={args.batch} tokens, "
          f"{torch.get_num_threads()} threads, fp32")
    print(f"{'run':12s} {'kernels':8s} {'forward tok/s':>14s} {'trainer tok/s':>14s} {'end-to-end':>11s} {'s/step':>8s} {'peak RSS GB':>12s}")
    for r in rows:
        for m in ("sparse", "dense"):
            if f"{m}_step_s" in r:
                print(f"{r['mode']:12s} {m:8s} {r['forward_tokens_per_s']:14.0f} {r[m + '_train_tokens_per_s']:14.0f} "
                      f"{r[m + '_end_to_end_tokens_per_s']:11.0f} {r[m + '_step_s']:8.2f} {r['peak_rss_gb']:12.2f}")
    inter = [r for r in rows if r["mode"] == "interleaved"]
    if inter:
        r = inter[0]
        print(f"sparse/dense trainer speed-up (interleaved, same buffer): "
              f"{r['sparse_train_tokens_per_s'] / r['dense_train_tokens_per_s']:.2f}×")
    result = {
        "benchmark": "train", "model": "SmolLM2-135M-Instruct", "n_layers": 30, "n_features": args.features,
        "k": args.k, "batch_tokens": args.batch, "steps": args.steps, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "rows": rows, "kernels": kern,
        # The machine is shared: other processes' load makes absolute numbers noisy; compare rows of one run.
        "load_average_after": os.getloadavg(),
    }
    _write(ROOT / "benchmarks" / "results" / "train.json", result)


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
