"""sparsetrace's trainer vs sparsify's (EleutherAI, PyPI ``eai-sparsify``) at equal tokens (issue 8, part 2).

Same model (the embedded SmolLM2-135M-Instruct, a local HF folder), same layers (0 and 15 by default), same
width (2304 latents) and k (32), skip transcoders (MLP input → MLP output) for both, the same training
sequences in the same order (ctx 256, 8 sequences per model batch, read from one corpus built by
``sparsetrace corpus``), each tool with its own recipe otherwise:

* sparsify 1.3.3: its defaults (signum + schedule-free, lr 5e-3/√(F/2¹⁴), FVU loss, no AuxK), one
  optimiser step per batch of 8 sequences; it trains on every position, position 0 included.
* sparsetrace: its defaults (Adam, lr 2e-4/√(F/2¹⁴), AuxK, least-squares skip init, position 0 and outlier
  tokens skipped) with the optimiser batch set to the same 2048 tokens and a 10-step warm-up (the
  default 100 would be most of a 146-step run).

``--model-dtype bfloat16`` runs the model forward of BOTH tools in bf16 and trains both in fp32. sparsify:
the model handed to its Trainer in bf16, its coders' forward fed fp32 copies of the activations (a bf16
model on CPU fails in its encoder otherwise: its bf16 autocast is CUDA-only); ours:
``TrainConfig.model_dtype``. Scoring always uses the fp32 model. ``--our-model-dtype`` sets ours alone
(e.g. sparsify at its CPU default, fp32, against ours with a bf16 forward: a different precision, reported
as such).

Each tool runs in its own subprocess (2 threads, fp32, CPU; sparsify in its own venv, it pulls
``datasets`` and friends); seconds are the training call only (model loading excluded) and tokens/s are
LM tokens read (sequences × 256) per second, and trained tokens per second (ours skips position 0). A
finished sparsify run in ``--work`` (its ``sparsify.json``) is reused, so ours can be re-measured alone.
Both sets are then scored by ONE function on the same
held-out sequences (position 0 excluded): FVU = Σ‖y−ŷ‖²/Σ‖y−ȳ‖², L0 and dead fraction.

    python -m venv benchmarks/_venvs/sparsify
    benchmarks/_venvs/sparsify/bin/pip install torch==2.13.0 eai-sparsify
    .venv/bin/sparsetrace corpus --out runs/corpus-bench --no-stdlib --package manpages --package debian-handbook \
        --package jargon-text --max-tokens 2000000 --heldout-fraction 0.05     # 1.35M tokens, 5026 / 249 sequences
    .venv/bin/python benchmarks/vs_sparsify.py --corpus runs/corpus-bench
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SP_PYTHON = HERE / "_venvs" / "sparsify" / "bin" / "python"
RESULTS = HERE / "results" / "vs_sparsify.json"
CTX, MODEL_BATCH = 256, 8


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB → MB on Linux


# ---------------------------------------------------------------- sparsify (its venv) -----------
def child_sparsify(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from datasets import Dataset
    from sparsify import SaeConfig, Trainer, TrainConfig
    from transformers import AutoModel

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    ids = np.load(work / "train_ids.npy")
    ds = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    model = AutoModel.from_pretrained(args.model_dir, dtype=getattr(torch, args.model_dtype))
    cfg = TrainConfig(
        SaeConfig(num_latents=args.n_features, k=args.k, transcode=True, skip_connection=True),
        batch_size=MODEL_BATCH,
        hookpoints=[f"layers.{l}.mlp" for l in args.layers],
        log_to_wandb=False,
        save_every=10**9,
        save_dir=str(work / "sparsify"),
        run_name="run",
    )
    if args.model_dtype != "float32":
        # A bf16 model on CPU fails in sparsify's encoder ("mat1 and mat2 must have the same dtype": its
        # bf16 autocast is CUDA-only). Its coders get the activations cast to fp32 instead — the same as
        # ours: bf16 model forward, fp32 training. (A CPU bf16 autocast around fit() ran but diverged:
        # held-out FVU 179 / 60.)
        from sparsify.sparse_coder import SparseCoder

        forward = SparseCoder.forward

        def fp32_forward(self, x, y=None, **kw):
            if kw.get("total_variance") is not None:
                kw["total_variance"] = kw["total_variance"].float()
            return forward(self, x.float(), None if y is None else y.float(), **kw)

        SparseCoder.forward = fp32_forward
    trainer = Trainer(cfg, ds, model)
    t0 = time.perf_counter()
    trainer.fit()
    secs = time.perf_counter() - t0
    rec = {"tool": "sparsify", "seconds": round(secs, 2), "sequences": int(ids.shape[0]), "model_dtype": args.model_dtype,
           "peak_rss_mb": round(_rss_mb(), 1), "out": str(work / "sparsify" / "run")}
    (work / "sparsify.json").write_text(json.dumps(rec))
    print(json.dumps(rec))


# ---------------------------------------------------------------- sparsetrace (our venv) --------
def child_ours(args: argparse.Namespace) -> None:
    import torch

    from sparsetrace.models.loading import load_model
    from sparsetrace.transcoders.training import train_transcoders
    from sparsetrace.transcoders.data import open_corpus
    from sparsetrace.transcoders.train import TrainConfig

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    lm = load_model(args.model_dir, device="cpu")
    corpus = open_corpus(args.corpus)
    read = [0]  # sequences the trainer asked the corpus for (LM tokens read = read × 256)
    sequences = corpus.sequences

    def counted(*a, **k):
        out = sequences(*a, **k)
        read[0] += len(out)
        return out

    corpus.sequences = counted
    cfg = TrainConfig(
        n_features=args.n_features, k=args.k, skip=True, layers=tuple(args.layers),
        n_tokens=args.sequences * (CTX - 1),  # position 0 is never trained on
        batch_tokens=2048, warmup_steps=10, ctx_len=CTX, model_batch=MODEL_BATCH,
        checkpoint_every_tokens=0, progress=False, model_dtype=args.our_model_dtype or args.model_dtype,
    )
    t0 = time.perf_counter()
    train_transcoders(lm, corpus, cfg, work / "ours")
    secs = time.perf_counter() - t0
    print(json.dumps({"tool": "sparsetrace", "seconds": round(secs, 2), "sequences": read[0],
                      "model_dtype": args.our_model_dtype or args.model_dtype,
                      "trained_tokens": cfg.n_tokens, "peak_rss_mb": round(_rss_mb(), 1), "out": str(work / "ours")}))


# ---------------------------------------------------------------- data and scoring (our venv) ---
def child_prepare(args: argparse.Namespace) -> None:
    import numpy as np

    from sparsetrace.models.loading import fetch_default_model
    from sparsetrace.transcoders.data import open_corpus

    work = Path(args.work)
    corpus = open_corpus(args.corpus)
    train = corpus.sequences("train", 0, args.sequences, CTX)
    held = corpus.sequences("heldout", 0, args.heldout_sequences, CTX)
    if len(train) < args.sequences or len(held) < args.heldout_sequences:
        raise SystemExit(f"corpus too small: {len(train)} train / {len(held)} held-out sequences of {CTX}")
    np.save(work / "train_ids.npy", train)
    np.save(work / "heldout_ids.npy", held)
    print(json.dumps({"model_dir": str(fetch_default_model()), "train_tokens": int(train.size),
                      "heldout_tokens": int(held.size)}))


def child_score(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from sparsetrace.models.loading import collect_mlp_io, load_model
    from sparsetrace.transcoders.formats import import_sparsify_coder
    from sparsetrace.transcoders.io import load_transcoders
    from sparsetrace.transcoders.metrics import FVUAccumulator

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    lm = load_model(args.model_dir, device="cpu")
    held = torch.from_numpy(np.load(work / "heldout_ids.npy"))
    ours = load_transcoders(work / "ours")
    sets = {
        "sparsetrace": {l: ours[i] for i, l in enumerate(args.layers)},
        "sparsify": {l: import_sparsify_coder(work / "sparsify" / "run" / f"layers.{l}.mlp") for l in args.layers},
    }
    acc = {(n, l): FVUAccumulator() for n in sets for l in args.layers}
    l0 = {(n, l): [] for n in sets for l in args.layers}
    fired = {(n, l): torch.zeros(sets[n][l].n_features, dtype=torch.bool) for n in sets for l in args.layers}
    with torch.no_grad():
        for s in range(0, len(held), MODEL_BATCH):
            x, y = collect_mlp_io(lm, held[s : s + MODEL_BATCH], list(args.layers))  # [L, B, T, d]
            x, y = x[:, :, 1:].flatten(1, 2), y[:, :, 1:].flatten(1, 2)  # position 0 excluded
            for n, tcs in sets.items():
                for i, l in enumerate(args.layers):
                    a = tcs[l].encode(x[i])
                    acc[n, l].update(y[i], tcs[l].decode(a, x[i]))
                    l0[n, l].append(float((a != 0).sum(-1).double().mean()))
                    fired[n, l] |= (a != 0).any(0)
    out = {n: {str(l): {"fvu": round(acc[n, l].value(), 4), "l0": round(float(np.mean(l0[n, l])), 2),
                        "dead_fraction": round(1 - float(fired[n, l].double().mean()), 4)} for l in args.layers}
           for n in sets}
    out["heldout_tokens_scored"] = int(held.shape[0] * (held.shape[1] - 1))
    print(json.dumps(out))


# ---------------------------------------------------------------- parent ------------------------
def _run(cmd: list[str], env: dict) -> dict:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed (exit {p.returncode}):\n" + "\n".join((p.stderr or p.stdout).splitlines()[-20:]))
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="a corpus folder built by `sparsetrace corpus`")
    ap.add_argument("--sequences", type=int, default=1168, help="training sequences of 256 tokens (1168 ≈ 299k tokens)")
    ap.add_argument("--heldout-sequences", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 15])
    ap.add_argument("--n-features", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the model forward, for both tools (transcoders train in float32 in both)")
    ap.add_argument("--our-model-dtype", choices=["float32", "bfloat16"], default=None,
                    help="ours only (default: --model-dtype): e.g. sparsify at its CPU default fp32, ours with a bf16 forward")
    ap.add_argument("--sp-python", default=str(SP_PYTHON))
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", choices=["prepare", "sparsify", "ours", "score"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        {"prepare": child_prepare, "sparsify": child_sparsify, "ours": child_ours, "score": child_score}[args.child](args)
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="vs_sparsify_"))
    work.mkdir(parents=True, exist_ok=True)
    if (work / "ours").exists():
        raise SystemExit(f"{work / 'ours'} exists: give a fresh --work folder (or remove it to retrain ours)")
    reuse = (work / "sparsify.json").is_file()  # a finished sparsify run in this folder is reused
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    script = str(Path(__file__).resolve())
    common = ["--corpus", str(Path(args.corpus).resolve()), "--work", str(work), "--threads", str(args.threads),
              "--sequences", str(args.sequences), "--heldout-sequences", str(args.heldout_sequences),
              "--layers", *map(str, args.layers), "--n-features", str(args.n_features), "--k", str(args.k),
              "--model-dtype", args.model_dtype] + (["--our-model-dtype", args.our_model_dtype] if args.our_model_dtype else [])
    prep = _run([sys.executable, script, "--child", "prepare"] + common, env)
    common += ["--model-dir", prep["model_dir"]]
    print(f"work {work}: {prep['train_tokens']} training tokens, {prep['heldout_tokens']} held-out", flush=True)
    print("sparsify …" + (" (reusing the finished run in the work folder)" if reuse else ""), flush=True)
    sp = json.loads((work / "sparsify.json").read_text()) if reuse else _run([args.sp_python, script, "--child", "sparsify"] + common, env)
    if reuse:
        if sp.get("model_dtype", "float32") != args.model_dtype:
            raise SystemExit(f"{work / 'sparsify.json'} is a {sp.get('model_dtype', 'float32')} run; this is --model-dtype {args.model_dtype}")
        sp["reused_from"] = str(work)
    print(f"  {sp['seconds']} s", flush=True)
    print("sparsetrace …", flush=True)
    ours = _run([sys.executable, script, "--child", "ours"] + common, env)
    print(f"  {ours['seconds']} s", flush=True)
    score = _run([sys.executable, script, "--child", "score"] + common, env)
    sp["trained_tokens"] = sp["sequences"] * CTX  # sparsify trains on every position
    for r in (sp, ours):
        r["lm_tokens_per_s"] = round(r["sequences"] * CTX / r["seconds"], 1)
        r["trained_tokens_per_s"] = round(r["trained_tokens"] / r["seconds"], 1)
    res = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([".venv/bin/python", "benchmarks/vs_sparsify.py"] + sys.argv[1:]),
        "setup": {"model_dtype": args.model_dtype, "our_model_dtype": args.our_model_dtype or args.model_dtype, "layers": args.layers, "n_features": args.n_features, "k": args.k, "ctx": CTX,
                  "sequences_per_batch": MODEL_BATCH, "training_sequences": args.sequences,
                  "heldout_tokens_scored": score.pop("heldout_tokens_scored"), "threads": args.threads,
                  "sparsify": _versions(args.sp_python, env)},
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "sparsify": sp | {"heldout": score["sparsify"]},
        "sparsetrace": ours | {"heldout": score["sparsetrace"]},
        "speedup_tokens_per_s": round(ours["lm_tokens_per_s"] / sp["lm_tokens_per_s"], 2),
        "speedup_trained_tokens_per_s": round(ours["trained_tokens_per_s"] / sp["trained_tokens_per_s"], 2),
    }
    print("\n".join(markdown(res)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


def markdown(res: dict) -> list[str]:
    layers = res["setup"]["layers"]
    rows = ["| tool | seconds | LM tokens/s | trained tokens/s | peak RSS GB | " + " | ".join(f"FVU L{l} | L0 L{l} | dead L{l}" for l in layers) + " |",
            "|---|---|---|---|---|" + "---|---|---|" * len(layers)]
    for name in ("sparsify", "sparsetrace"):
        r = res[name]
        cells = " | ".join(f"{r['heldout'][str(l)]['fvu']} | {r['heldout'][str(l)]['l0']} | {r['heldout'][str(l)]['dead_fraction']}"
                           for l in layers)
        rows.append(f"| {name} | {r['seconds']} | {r['lm_tokens_per_s']} | {r['trained_tokens_per_s']} |"
                    f" {r['peak_rss_mb'] / 1024:.2f} | {cells} |")
    rows.append(f"speed-up: {res['speedup_tokens_per_s']}× LM tokens/s, {res['speedup_trained_tokens_per_s']}× trained tokens/s")
    return rows


def _versions(py: str, env: dict) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['eai-sparsify','transformers','torch']}))")
    try:
        return json.loads(subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout)
    except Exception as exc:  # noqa: BLE001 - informational only
        return {"error": str(exc)}


if __name__ == "__main__":
    main()
