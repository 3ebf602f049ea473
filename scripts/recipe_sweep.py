"""Choose the training recipe by measurement: a sweep on three layers at a fixed token budget.

    .venv/bin/python scripts/recipe_sweep.py --corpus runs/corpus-v2 --out runs/sweep [--tokens 500000]

Needs a built corpus (`sparsetrace corpus --out runs/corpus-v2`) and the default model (`make model`).

1. Harvests the MLP inputs/outputs of three layers (early, middle, late; default 4, 15, 26) for
   ``--tokens`` training tokens, once, with the same forward, outlier filter and bf16 model dtype as
   `sparsetrace train` (stored in bf16, which is exactly what that forward produces), and cached in
   ``OUT/acts.safetensors`` so that a rerun or a longer grid skips it.
2. Trains every config of the grid on exactly those tokens in the same order (one factor at a time
   around the base recipe: optimiser batch, learning rate, schedule, k, AuxK, skip).
3. Evaluates each on held-out sequences: FVU and L0 per layer, and the spliced KL / ΔCE of each layer
   replaced alone (``evaluate_transcoders``).
4. Prints a table and writes ``OUT/sweep.json`` (every row, resumable: finished configs are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The base recipe of the sweep: TrainConfig's defaults with these changes (the candidate for the long run).
BASE: dict = {"batch_tokens": 1024}
# name → overrides on top of BASE; one factor at a time
GRID: dict[str, dict] = {
    "base": {},
    "batch256": {"batch_tokens": 256},
    "batch512": {"batch_tokens": 512},
    "batch2048": {"batch_tokens": 2048},
    "batch4096": {"batch_tokens": 4096},
    "lr_x0.5": {"lr_scale": 0.5},
    "lr_x2": {"lr_scale": 2.0},
    "constant_lr": {"decay_fraction": 0.0},
    "decay_0.5": {"decay_fraction": 0.5},
    "k48": {"k": 48},
    "k64": {"k": 64},
    "no_auxk": {"auxk_coef": 0.0},
    "no_skip": {"skip": False, "skip_init": "zero"},
}


class MemorySource:
    """An ActivationSource over harvested tensors ``[L, N, d]`` (bf16), handed out as float32."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.position = x, y, 0

    def seek(self, position: int) -> None:
        self.position = int(position)

    def read(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = slice(self.position, min(self.position + n_tokens, self.x.shape[1]))
        self.position = s.stop
        return self.x[:, s].float(), self.y[:, s].float()


def harvest(lm, corpus, layers: list[int], n_tokens: int, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from sparsetrace.transcoders.training import ModelActivationSource
    from sparsetrace.transcoders.io import atomic_write
    from sparsetrace.transcoders.train import TrainConfig

    if path.is_file():
        t = load_file(path)
        if t["layers"].tolist() == layers and t["x"].shape[1] >= n_tokens:
            return t["x"][:, :n_tokens], t["y"][:, :n_tokens]
    cfg = TrainConfig()
    src = ModelActivationSource(lm, corpus, list(range(lm.n_layers)), keep=layers, ctx_len=cfg.ctx_len,
                                model_batch=cfg.model_batch, outlier_factor=cfg.outlier_factor)
    X = torch.empty(len(layers), n_tokens, lm.d_model, dtype=torch.bfloat16)
    Y = torch.empty_like(X)
    n, t0 = 0, time.perf_counter()
    while n < n_tokens:
        x, y = src.read(min(65536, n_tokens - n))
        if x.shape[1] == 0:
            sys.exit(f"the corpus ran out after {n:,} tokens; use a smaller --tokens")
        X[:, n : n + x.shape[1]], Y[:, n : n + x.shape[1]] = x, y  # bf16 forward: the cast is exact
        n += x.shape[1]
        print(f"  harvested {n:,} / {n_tokens:,} tokens ({n / (time.perf_counter() - t0):.0f} tok/s)", flush=True)
    tensors = {"x": X, "y": Y, "layers": torch.tensor(layers)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return X, Y


def run_one(name: str, over: dict, lm, corpus, X, Y, layers, args) -> dict:
    from sparsetrace.transcoders.evaluate import evaluate_transcoders
    from sparsetrace.transcoders.model import TranscoderSet, TranscoderSetConfig
    from sparsetrace.transcoders.train import TrainConfig, Trainer, fit

    over = {**BASE, **over}
    lr_scale = over.pop("lr_scale", 1.0)
    base = TrainConfig(n_tokens=X.shape[1], progress=False, checkpoint_every_tokens=0, log_every_steps=50, **over)
    cfg = TrainConfig(**{**base.to_dict(), "layers": None, "lr": base.lr_for(base.features_for(lm.d_model)) * lr_scale})
    trainer = Trainer(cfg, len(layers), lm.d_model, layer_ids=layers)
    log: list[dict] = []
    t = time.perf_counter()
    res = fit(trainer, MemorySource(X, Y), log=log.append)
    train_s = time.perf_counter() - t
    sc = TranscoderSetConfig(model_id=lm.model_id, architecture=lm.adapter.name, n_layers=len(layers),
                             d_in=lm.d_model, n_features=trainer.n_features, activation=cfg.activation, k=cfg.k,
                             skip=cfg.skip, training={"layers": layers})
    ts = TranscoderSet(sc, res.transcoders)
    t = time.perf_counter()
    ev = evaluate_transcoders(lm, ts, corpus, n_sequences=args.eval_sequences, ctx_len=128, batch=8, layers=layers)
    return {"name": name, "budget": X.shape[1], "overrides": {**over, "lr_scale": lr_scale}, "lr": cfg.lr, "batch_tokens": cfg.batch_tokens,
            "k": cfg.k, "tokens": res.tokens, "steps": res.steps, "train_seconds": train_s,
            "eval_seconds": time.perf_counter() - t, "eval_sequences": args.eval_sequences, "layers": layers, "fvu": ev.fvu, "l0": ev.l0,
            "dead_fraction": ev.dead_fraction, "kl": ev.kl, "delta_ce": ev.delta_ce,
            "mean_fvu": sum(ev.fvu) / len(ev.fvu), "mean_kl": sum(ev.kl) / len(ev.kl),
            "train_fvu_last": log[-1]["fvu"] if log else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"))
    ap.add_argument("--tokens", type=int, default=500_000, help="training tokens per config (the same for all)")
    ap.add_argument("--layers", default="4,15,26")
    ap.add_argument("--configs", default=",".join(GRID), help=f"comma list of {', '.join(GRID)}")
    ap.add_argument("--eval-sequences", type=int, default=16, help="held-out sequences of 128 tokens")
    args = ap.parse_args()
    names = args.configs.split(",")
    bad = [n for n in names if n not in GRID]
    if bad:
        sys.exit(f"--configs: unknown {bad}; allowed: {', '.join(GRID)}")
    if not (args.corpus / "manifest.json").is_file():
        sys.exit(f"--corpus {str(args.corpus)!r} is not a built corpus; build one with "
                 f"`sparsetrace corpus --out {args.corpus}`")
    from sparsetrace._memory import keep_freed_memory
    from sparsetrace.models.loading import load_model
    from sparsetrace.transcoders.data import open_corpus
    from sparsetrace.transcoders.train import fast_dtype

    keep_freed_memory()
    args.out.mkdir(parents=True, exist_ok=True)
    lm = load_model(None, device="cpu")
    corpus = open_corpus(args.corpus)
    layers = [int(v) for v in args.layers.split(",")]
    lm.to(dtype=getattr(torch, fast_dtype("cpu")))
    X, Y = harvest(lm, corpus, layers, args.tokens, args.out / "acts.safetensors")
    lm.to(dtype=torch.float32)  # evaluation runs the model as users do
    out_json = args.out / "sweep.json"
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    done = {(r["name"], r["budget"]) for r in rows}
    for name in names:
        if (name, X.shape[1]) in done:
            continue
        print(f"{name}: training on {X.shape[1]:,} tokens of layers {layers}", flush=True)
        rows.append(run_one(name, GRID[name], lm, corpus, X, Y, layers, args))
        r = rows[-1]
        print(f"  FVU {[round(v, 3) for v in r['fvu']]}  KL {[round(v, 3) for v in r['kl']]}  "
              f"({r['train_seconds']:.0f} s + {r['eval_seconds']:.0f} s)", flush=True)
        tmp = out_json.with_suffix(".tmp")
        tmp.write_text(json.dumps({"corpus": str(args.corpus), "layers": layers, "rows": rows}, indent=1) + "\n")
        os.replace(tmp, out_json)
    print(f"\n{'config':12s} {'batch':>6s} {'lr':>8s} {'k':>3s} " + " ".join(f"{'FVU L' + str(l):>8s}" for l in layers)
          + f" {'mean FVU':>9s} " + " ".join(f"{'KL L' + str(l):>8s}" for l in layers) + f" {'mean KL':>8s}")
    for r in rows:
        if r["budget"] != X.shape[1]:
            continue
        print(f"{r['name']:12s} {r['batch_tokens']:6d} {r['lr']:8.2e} {r['k']:3d} "
              + " ".join(f"{v:8.4f}" for v in r["fvu"]) + f" {r['mean_fvu']:9.4f} "
              + " ".join(f"{v:8.4f}" for v in r["kl"]) + f" {r['mean_kl']:8.4f}")


if __name__ == "__main__":
    main()
