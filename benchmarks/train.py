"""Transcoder-training throughput on SmolLM2-135M, all 30 layers, fp32 vs bf16 side by side in one run.

Each dtype runs in its own process (so peak RSS is its own) and measures, with the default recipe of
``TrainConfig`` unless overridden:
  - forward alone: the activation-harvesting model forward (every layer's MLP in/out, position 0 and
    outliers dropped, gathered into the shuffle buffer), tokens/s
  - step alone: trainer steps on all 30 layers on that buffer, tokens/s (the first step is a warm-up)
  - end to end: the real training loop (``fit``: buffer reads and steps one after the other) over
    ``--buffers`` shuffle buffers, tokens/s, and its ratio to 1 / (1/forward + 1/step)
  - peak RSS of the process
``fp32`` runs the model forward and the trainer's products in float32; ``bf16`` both in bfloat16
(weights, gradients and Adam state stay float32 in both). ``--modes kernels`` times one layer's sparse
vs dense TopK kernels at 1 and 2 threads instead. Prints a table and writes benchmarks/results/train.json.

    python benchmarks/train.py [--features F] [--k K] [--batch B] [--buffer-tokens N] [--buffers 2]

Needs the default model (``make model``); builds a small stdlib-only corpus in runs/corpus-bench on
first use (~15 s, no network).
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
CORPUS = ROOT / "runs" / "corpus-bench"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _config(args, dtype: str, n_tokens: int):
    from sparsetrace.transcoders.train import TrainConfig

    over = {"n_tokens": n_tokens, "shuffle_buffer_tokens": args.buffer_tokens, "progress": False,
            "model_dtype": dtype, "matmul_dtype": dtype, "checkpoint_every_tokens": 0, "log_every_steps": 10**9}
    for name in ("features", "k", "batch"):
        if getattr(args, name) is not None:
            over[{"features": "n_features", "batch": "batch_tokens"}.get(name, name)] = getattr(args, name)
    return TrainConfig(**over)


def measure(tag: str, args) -> dict:
    """One dtype: forward alone, step alone, then the real loop, in this process."""
    from sparsetrace._memory import keep_freed_memory
    from sparsetrace.models.loading import load_model
    from sparsetrace.transcoders.training import ModelActivationSource
    from sparsetrace.transcoders.data import open_corpus
    from sparsetrace.transcoders.train import Trainer, fit

    keep_freed_memory()  # as train_transcoders does
    lm = load_model(None, device="cpu")
    dtype = DTYPES[tag]
    lm.to(dtype=getattr(torch, dtype))
    corpus = open_corpus(args.corpus)
    cfg = _config(args, dtype, args.buffer_tokens * args.buffers)
    L = lm.n_layers
    src = ModelActivationSource(lm, corpus, list(range(L)), ctx_len=cfg.ctx_len, model_batch=cfg.model_batch,
                                outlier_factor=cfg.outlier_factor, reuse_buffer=True)
    src.read(cfg.batch_tokens)  # warm-up forward (first-call costs)
    t = time.perf_counter()
    x, y = src.read(args.buffer_tokens)
    fwd_tps = x.shape[1] / (time.perf_counter() - t)
    trainer = Trainer(cfg, L, lm.d_model)
    trainer.initialize(x, y)
    B = cfg.batch_tokens
    n_steps = min(args.steps, x.shape[1] // B)
    trainer.step(x[:, :B], y[:, :B])  # warm-up step
    t = time.perf_counter()
    for s in range(1, n_steps):
        trainer.step(x[:, s * B : (s + 1) * B], y[:, s * B : (s + 1) * B])
    step_tps = (n_steps - 1) * B / (time.perf_counter() - t)
    del x, y
    src.seek(0)
    t = time.perf_counter()
    res = fit(Trainer(cfg, L, lm.d_model), src)
    e2e_s = time.perf_counter() - t
    return {"dtype": tag, "model_dtype": dtype, "matmul_dtype": dtype, "n_features": trainer.n_features, "k": cfg.k,
            "batch_tokens": B, "buffer_tokens": args.buffer_tokens, "threads": torch.get_num_threads(),
            "forward_tokens_per_s": fwd_tps, "step_tokens_per_s": step_tps,
            "parts_tokens_per_s": 1 / (1 / fwd_tps + 1 / step_tps),
            "end_to_end_tokens": res.tokens, "end_to_end_seconds": e2e_s, "end_to_end_tokens_per_s": res.tokens / e2e_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


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
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}  # medians: robust to load spikes
    return {"n_tokens": n_tokens, "d": d, "n_features": features, "k": k,
            "sparse_ms": 1000 * med["sparse"], "dense_ms": 1000 * med["dense"], "speedup": med["dense"] / med["sparse"]}


def _ensure_corpus(path: Path) -> None:
    if (path / "manifest.json").is_file():
        return
    if path != CORPUS:
        sys.exit(f"--corpus {str(path)!r} is not a built corpus; build one with `sparsetrace corpus --out {path}`")
    from sparsetrace.models.loading import load_model
    from sparsetrace.transcoders.data import build_corpus

    print(f"building a stdlib-only benchmark corpus in {path} (once)", flush=True)
    build_corpus(path, load_model(None, device="cpu").tokenizer, debian_packages=(), max_tokens=3_000_000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=None, help="latents per layer (default: TrainConfig's)")
    ap.add_argument("--k", type=int, default=None, help="TopK k (default: TrainConfig's)")
    ap.add_argument("--batch", type=int, default=None, help="tokens per optimiser step (default: TrainConfig's)")
    ap.add_argument("--buffer-tokens", type=int, default=16384, help="shuffle buffer (forward-alone sample)")
    ap.add_argument("--buffers", type=int, default=2, help="shuffle buffers in the end-to-end loop")
    ap.add_argument("--steps", type=int, default=6, help="timed steps in step-alone (+1 warm-up)")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16; or 'kernels'")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from sparsetrace.transcoders.train import TrainConfig

    cfg = TrainConfig()
    if args.modes == "kernels":
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append({"threads": threads, "load_average": os.getloadavg()[0],
                         **kernel_speed(args.features or cfg.features_for(576), args.k or cfg.k)})
            r = runs[-1]
            print(f"threads={threads} load={r['load_average']:.1f}: sparse {r['sparse_ms']:.0f} ms, "
                  f"dense {r['dense_ms']:.0f} ms, speed-up {r['speedup']:.2f}×")
        _write(args.out.with_name("train_kernels.json"), {"benchmark": "train-kernels", "runs": runs})
        return
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in DTYPES]
    if bad:
        sys.exit(f"--modes {args.modes!r}: unknown {bad}; allowed: a comma list of {', '.join(DTYPES)}, or 'kernels'")
    _ensure_corpus(args.corpus)
    rows = []
    for mode in modes:
        cmd = [sys.executable, "-W", "ignore", __file__, "--child", mode, "--buffer-tokens", str(args.buffer_tokens),
               "--buffers", str(args.buffers), "--steps", str(args.steps), "--corpus", str(args.corpus)]
        for name in ("features", "k", "batch"):
            if getattr(args, name) is not None:
                cmd += [f"--{name}", str(getattr(args, name))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"the {mode} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    r0 = rows[0]
    print(f"SmolLM2-135M, 30 layers, F={r0['n_features']}, k={r0['k']}, batch={r0['batch_tokens']} tokens, "
          f"buffer={r0['buffer_tokens']}, {r0['threads']} threads; load average {os.getloadavg()[0]:.1f}")
    print(f"{'dtype':6s} {'forward tok/s':>14s} {'step tok/s':>11s} {'1/(1/f+1/s)':>12s} {'end-to-end':>11s} "
          f"{'e2e/parts':>10s} {'peak RSS GB':>12s}")
    for r in rows:
        print(f"{r['dtype']:6s} {r['forward_tokens_per_s']:14.0f} {r['step_tokens_per_s']:11.0f} "
              f"{r['parts_tokens_per_s']:12.0f} {r['end_to_end_tokens_per_s']:11.0f} "
              f"{r['end_to_end_tokens_per_s'] / r['parts_tokens_per_s']:10.2f} {r['peak_rss_gb']:12.2f}")
    result = {"benchmark": "train", "model": "SmolLM2-135M-Instruct", "n_layers": 30, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "rows": rows,
              "load_average_after": os.getloadavg()}
    _write(args.out, result)


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
