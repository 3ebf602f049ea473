"""Training a cross-layer transcoder (docs/design.md §14), beside the per-layer trainer (train.py).

:class:`CLTTrainer` has the interface :func:`train.fit` drives (``initialize``, ``step``,
``state_tensors``, ``load_state_tensors``, ``to_transcoders``), so the loop, the shuffle buffers, the
logging and the checkpoints (between buffers, resumed bit for bit) are the per-layer trainer's own,
unchanged. All L layers' (x̃, y) come from one model forward (``training.ModelActivationSource``).

One step, in normalised units (x̃_s / rms_x[s], y_t / rms_y[t], as the per-layer trainer):
  encoders   dense TopK selection per source layer (``kernels.topk_encode``: sparse backward);
  decoders   ŷ_t = Σ_{s ≤ t} a_s W_dec[s][:, t − s] + b_dec[t] + x̃_t W_skip[t]ᵀ with the sparse kernel of
             ``clt_kernels.py``: forward and backward touch only the active features' decoder rows;
  loss       Σ_t FVU_t (FVU per target layer on the batch);
  optimiser  Adam on the encoders, biases and skips; on the decoders a row-sparse ("lazy") Adam
             (:class:`RowAdam`): only the rows of features active in the batch get their moments and
             weights updated, with the bias correction of the global step (torch's SparseAdam rule).
TopK only (ReLU/JumpReLU CLTs can be imported, not trained here); no AuxK yet.

Memory (float32): decoders F·d·L(L+1)/2 values, ×3 with the two Adam moments, plus the encoders
(L·F·d, ×4 with their gradient and moments) — :func:`memory_plan`. SmolLM2-135M (L = 30, d = 576) at
F = 2304 per layer: 2.39 GB of decoders, 7.2 GB with their moments, 8.0 GB in all; inside 24 GB.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparsetrace.config import EvalConfig, TrainConfig
from sparsetrace.errors import ConfigError

from ..models.loading import LoadedModel, collect_mlp_io, splice_mlps
from .clt import CrossLayerTranscoder, CrossLayerTranscoderConfig
from .clt_io import load_clt, save_clt
from .clt_kernels import RowGrads, sparse_clt_decode
from .data import Corpus
from .kernels import low_matmul, topk_encode
from .metrics import FVUAccumulator, ce_recovered, cross_entropy, kl_divergence
from .train import StepStats, Trainer, fit

__all__ = ["CLTTrainer", "RowAdam", "memory_plan", "train_clt", "evaluate_clt", "CLTEvalResult"]


def memory_plan(n_layers: int, d: int, n_features: int) -> dict[str, int]:
    """Bytes of float32 training state: decoders (+ 2 Adam moments; their gradients are row-sparse,
    at most the batch's active rows), encoders, biases and skips (+ gradient + 2 moments)."""
    L, d, F = n_layers, d, n_features
    dec = F * d * L * (L + 1) // 2 * 4
    dense = (L * F * d + L * F + L * d + L * d * d) * 4
    return {"decoders": dec, "decoder_adam": 2 * dec, "dense": dense, "dense_grad_adam": 3 * dense,
            "total": 3 * dec + 4 * dense}


class RowAdam:
    """Adam on row subsets of a list of tensors: a step updates only the rows given (lazy Adam).

    For rows r with gradient g at global step t (1-based): m ← β1 m + (1 − β1) g, v ← β2 v + (1 − β2) g²,
    p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε) — torch's Adam formula, on the touched rows."""

    def __init__(self, params: list[Tensor], betas: tuple[float, float], eps: float) -> None:
        self.params, self.betas, self.eps = params, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, rows: list[Tensor | None], grads: list[Tensor | None], lr: float, t: int) -> None:
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        for p, m, v, r, g in zip(self.params, self.exp_avg, self.exp_avg_sq, rows, grads):
            if r is None:
                continue
            mr = m[r].mul_(b1).add_(g, alpha=1 - b1)
            vr = v[r].mul_(b2).addcmul_(g, g, value=1 - b2)
            m[r], v[r] = mr, vr
            p[r] = p[r].addcdiv_(mr, (vr.sqrt() / math.sqrt(bc2)).add_(self.eps), value=-lr / bc1)


class CLTTrainer:
    """A TopK cross-layer transcoder over all L layers of a model, trained in normalised units (see the
    module docstring). Parameters: W_enc [L,F,d], b_enc [L,F], b_dec [L,d], W_skip [L,d,d] (Adam) and
    W_dec[s] [F, L − s, d] (:class:`RowAdam`)."""

    DENSE = ("W_enc", "b_enc", "b_dec", "W_skip")

    def __init__(self, config: TrainConfig, n_layers: int, d: int) -> None:
        config = config.resolved("cpu")
        if config.activation != "topk":
            raise ConfigError(f"activation={config.activation!r} with cross_layer=True; allowed: topk")
        if config.layers is not None and list(config.layers) != list(range(n_layers)):
            raise ConfigError(f"layers={config.layers} with cross_layer=True; a CLT covers every layer (layers=None)")
        self.config, self.n_layers, self.d_in, self.d_out = config, n_layers, d, d
        self.layer_ids = list(range(n_layers))
        self.n_features = F = config.features_for(d)
        if config.k > F:
            raise ConfigError(f"k={config.k}; allowed: 1..n_features ({F})")
        L = n_layers
        z = lambda *s: torch.zeros(*s, dtype=torch.float32)  # noqa: E731
        self.params: dict[str, Tensor] = {"W_enc": z(L, F, d), "b_enc": z(L, F), "b_dec": z(L, d)}
        if config.skip:
            self.params["W_skip"] = z(L, d, d)
        for p in self.params.values():
            p.requires_grad_(True)
        self.decoders = [z(F, L - s, d) for s in range(L)]
        self.rms_x, self.rms_y = torch.ones(L), torch.ones(L)
        self.since_fired = torch.zeros(L, F, dtype=torch.int64)
        self.step_count = 0
        self.lr = config.lr_for(F)
        betas = (config.beta1, config.beta2)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=self.lr, betas=betas, eps=config.eps, fused=True)
        self.row_adam = RowAdam(self.decoders, betas, config.eps)

    # ---- initialisation (the per-layer trainer's, decoders zero) -------------------------------------
    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor) -> None:
        """Scales, encoders, b_dec and the skip from the first buffer exactly as ``Trainer.initialize``
        (a per-layer trainer over the same layers and seed starts from the same encoders); decoders 0."""
        ref = Trainer(self.config, self.n_layers, self.d_in, layer_ids=self.layer_ids)
        ref.initialize(x, y)
        self.rms_x, self.rms_y = ref.rms_x, ref.rms_y
        for k in self.params:
            self.params[k].copy_(ref.params[k])
        for W in self.decoders:
            W.zero_()

    # ---- one step -------------------------------------------------------------------------------------
    def forward(self, xn: Tensor, sink: RowGrads | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised x̃ [L,N,d] → (ŷ [L,N,d], l0 [L], fired [L,F] bool)."""
        cfg, p = self.config, self.params
        low = getattr(torch, cfg.matmul_dtype)
        vals, idx = topk_encode(xn, p["W_enc"], p["b_enc"], cfg.k, select_dtype=low)
        acts = torch.relu(vals)
        yhat = sparse_clt_decode(acts, idx, self.decoders, sink) + p["b_dec"].unsqueeze(1)
        if "W_skip" in p:
            yhat = yhat + low_matmul(xn, p["W_skip"], low)
        with torch.no_grad():
            L = idx.shape[0]
            flat = (idx + (torch.arange(L) * self.n_features).view(L, 1, 1))[acts > 0]
            fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
            fired.view(-1).index_fill_(0, flat, True)
            l0 = (acts > 0).sum(-1).double().mean(-1)
        return yhat, l0, fired

    def step(self, x: Tensor, y: Tensor) -> StepStats:
        """One step on raw activations ``x, y [L,N,d]`` (all layers)."""
        cfg = self.config
        xn, yn = x / self.rms_x.view(-1, 1, 1), y / self.rms_y.view(-1, 1, 1)
        sink = RowGrads(self.n_layers)
        yhat, l0, fired = self.forward(xn, sink)
        self.since_fired += xn.shape[1]
        self.since_fired.masked_fill_(fired, 0)
        total_var = (yn - yn.mean(1, keepdim=True)).pow(2).sum(dim=(1, 2))
        fvu = (yn - yhat).pow(2).sum(dim=(1, 2)) / total_var  # [L] per target layer
        loss = fvu.sum()
        lr = self.lr * cfg.lr_scale(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.row_adam.step(sink.rows, sink.grads, lr, self.step_count + 1)
        self.step_count += 1
        dead = (self.since_fired >= cfg.dead_tokens).double().mean(-1)
        return StepStats(float(loss.detach()), fvu.detach(), l0, dead, lr)

    # ---- state ------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """Everything a bit-for-bit resume needs (safetensors, no pickle)."""
        out = {f"param.{k}": v.detach().clone() for k, v in self.params.items()}
        for k, v in self.params.items():
            st = self.optimizer.state.get(v, {})
            for name in ("exp_avg", "exp_avg_sq", "step"):
                if name in st:
                    out[f"adam.{k}.{name}"] = st[name].detach().clone()
        for s, W in enumerate(self.decoders):
            out[f"param.W_dec.{s}"] = W.clone()
            out[f"adam.W_dec.{s}.exp_avg"] = self.row_adam.exp_avg[s].clone()
            out[f"adam.W_dec.{s}.exp_avg_sq"] = self.row_adam.exp_avg_sq[s].clone()
        out["rms_x"], out["rms_y"] = self.rms_x.clone(), self.rms_y.clone()
        out["since_fired"] = self.since_fired.clone()
        out["step_count"] = torch.tensor([self.step_count], dtype=torch.int64)
        return out

    def load_state_tensors(self, t: dict[str, Tensor]) -> None:
        from sparsetrace.errors import FormatError

        with torch.no_grad():
            for k, v in self.params.items():
                if f"param.{k}" not in t or t[f"param.{k}"].shape != v.shape:
                    raise FormatError(f"checkpoint lacks param.{k} of shape {tuple(v.shape)}")
                v.copy_(t[f"param.{k}"])
                st = {n: t[f"adam.{k}.{n}"].clone() for n in ("exp_avg", "exp_avg_sq", "step") if f"adam.{k}.{n}" in t}
                if st:
                    self.optimizer.state[v] = st
            for s, W in enumerate(self.decoders):
                if t.get(f"param.W_dec.{s}") is None or t[f"param.W_dec.{s}"].shape != W.shape:
                    raise FormatError(f"checkpoint lacks param.W_dec.{s} of shape {tuple(W.shape)}")
                W.copy_(t[f"param.W_dec.{s}"])
                self.row_adam.exp_avg[s].copy_(t[f"adam.W_dec.{s}.exp_avg"])
                self.row_adam.exp_avg_sq[s].copy_(t[f"adam.W_dec.{s}.exp_avg_sq"])
        self.rms_x, self.rms_y = t["rms_x"].clone(), t["rms_y"].clone()
        self.since_fired = t["since_fired"].clone()
        self.step_count = int(t["step_count"][0])

    @torch.no_grad()
    def to_transcoders(self, model_id: str = "unknown", architecture: str = "llama",
                       training: dict | None = None) -> CrossLayerTranscoder:
        """The CLT on raw activations: W_enc[s] / s_x[s]; W_dec[s][:, t − s] · s_y[t]; b_dec[t] · s_y[t];
        W_skip[t] · s_y[t]/s_x[t]."""
        cfg, p = self.config, self.params
        L, F, d = self.n_layers, self.n_features, self.d_in
        ccfg = CrossLayerTranscoderConfig(model_id=model_id, architecture=architecture, n_layers=L, d_in=d,
                                          n_features=F, activation="topk", k=cfg.k, skip=cfg.skip,
                                          training=training or {})
        clt = CrossLayerTranscoder(ccfg)
        sx, sy = self.rms_x, self.rms_y
        clt.W_enc.copy_(p["W_enc"] / sx.view(L, 1, 1))
        clt.b_enc.copy_(p["b_enc"])
        clt.b_dec.copy_(p["b_dec"] * sy.view(L, 1))
        for s in range(L):
            clt.W_dec[s].copy_(self.decoders[s] * sy[s:].view(1, L - s, 1))
        if cfg.skip:
            clt.W_skip.copy_(p["W_skip"] * (sy / sx).view(L, 1, 1))
        return clt


# ---- the driver ------------------------------------------------------------------------------------
def train_clt(lm: LoadedModel, corpus: Corpus, config: TrainConfig, out_dir: str | os.PathLike,
              resume: bool = False) -> CrossLayerTranscoder:
    """Train a CLT over every layer of ``lm`` and save it to ``out_dir`` (our CLT format); checkpoints and
    logs as :func:`training.train_transcoders` (single process). Returns the saved CLT, loaded back."""
    from sparsetrace._memory import keep_freed_memory

    from .training import LOG_FILE, ModelActivationSource, _git_version, _truncate_log

    keep_freed_memory()
    config = config.resolved(lm.device)
    L = lm.n_layers
    bos = lm.tokenizer.bos_token_id if lm.prepend_bos else None
    available = corpus.n_sequences("train", config.ctx_len, bos) * (config.ctx_len - 1)
    if available < config.n_tokens:
        raise ConfigError(f"n_tokens={config.n_tokens:,}: the corpus's train split has {available:,} trainable tokens "
                          f"at ctx_len={config.ctx_len}; allowed: at most that, or a larger corpus")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "checkpoint" / "latest.json").exists():
        raise ConfigError(f"{str(out)!r} already has a checkpoint; pass resume=True to continue it or use a new folder")
    trainer = CLTTrainer(config, L, lm.d_model)
    source = ModelActivationSource(lm, corpus, collect=list(range(L)), ctx_len=config.ctx_len,
                                   model_batch=config.model_batch, outlier_factor=config.outlier_factor,
                                   reuse_buffer=True)
    log_file = out / LOG_FILE
    if resume:
        _truncate_log(log_file, out / "checkpoint" / "latest.json")
    elif log_file.exists():
        log_file.unlink()

    def log(rec: dict[str, Any]) -> None:
        with open(log_file, "a") as f:
            f.write(json.dumps(rec) + "\n")

    old = lm.dtype
    lm.to(dtype=getattr(torch, config.model_dtype))
    try:
        result = fit(trainer, source, out, resume, log=log)
    finally:
        lm.to(dtype=old)
    training = {"layers": list(range(L)), "corpus": str(corpus.path), "corpus_recipe": corpus.manifest.get("recipe"),
                "corpus_sources": corpus.manifest.get("sources"), "tokens": result.tokens, "steps": result.steps,
                "config": config.to_dict(), "lr": config.lr_for(trainer.n_features), "code_version": _git_version()}
    clt = trainer.to_transcoders(lm.model_id, lm.adapter.name, training)
    save_clt(clt, out, dtype="float32")
    return load_clt(out)


# ---- evaluation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CLTEvalResult:
    """Held-out quality of a CLT: FVU per target layer, L0 and dead fraction per source layer, and CE/KL
    with every MLP replaced (the names of ``evaluate.EvalResult``; no per-layer ΔCE: a CLT replaces all
    MLPs together)."""

    fvu: list[float]
    l0: list[float]
    dead_fraction: list[float]
    ce_clean: float
    ce_replaced: float
    ce_zero: float
    kl_replaced: float
    ce_recovered: float
    n_tokens: int

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _clt_splice(clt: CrossLayerTranscoder) -> dict:
    """MLP replacements for :func:`splice_mlps` that run the CLT on the replaced forward: layer l encodes its
    live x̃ and outputs Σ_{s ≤ l} a_s W_dec[s][:, l − s] + b_dec[l] + skip; position 0 keeps its true output."""
    acts: dict[int, Tensor] = {}

    def make(l: int):
        def fn(x: Tensor, y: Tensor) -> Tensor:
            acts[l] = clt[l].encode(x)
            out = clt.decode_layer(l, [acts[s] for s in range(l + 1)], x)
            return torch.cat([y[:, :1], out[:, 1:].to(y.dtype)], dim=1)

        return fn

    return {l: make(l) for l in range(clt.n_layers)}


@torch.no_grad()
def evaluate_clt(lm: LoadedModel, clt: CrossLayerTranscoder, corpus: Corpus, *,
                 n_sequences: int = EvalConfig.n_sequences, ctx_len: int = EvalConfig.ctx_len,
                 batch: int = EvalConfig.batch, split: str = EvalConfig.split,
                 outlier_factor: float = TrainConfig.outlier_factor) -> CLTEvalResult:
    """FVU per target layer (positions ≥ 1, outliers skipped, as ``evaluate_transcoders``), L0 and dead
    fraction per source layer, and CE / KL with all MLPs replaced by the CLT against zero-ablation."""
    from .training import outlier_mask

    if n_sequences <= 0 or batch <= 0:
        raise ConfigError(f"n_sequences={n_sequences}, batch={batch}; allowed: positive integers")
    L, F = clt.n_layers, clt.n_features
    bos = lm.tokenizer.bos_token_id if lm.prepend_bos else None
    acc = [FVUAccumulator() for _ in range(L)]
    l0 = torch.zeros(L, dtype=torch.float64)
    fires = torch.zeros(L, F, dtype=torch.int64)
    sums = {"clean": 0.0, "replaced": 0.0, "zero": 0.0, "kl": 0.0}
    n_tok = n_pred = 0
    for start in range(0, n_sequences, batch):
        ids_np = corpus.sequences(split, start, min(batch, n_sequences - start), ctx_len, bos)
        if len(ids_np) == 0:
            break
        ids = torch.from_numpy(ids_np).to(lm.device)
        x, y = collect_mlp_io(lm, ids)
        x, y = (t[:, :, 1:].reshape(L, -1, t.shape[-1]) for t in (x, y))
        keep = outlier_mask(x, y, outlier_factor)
        acts = [clt[s].encode(x[s, keep]) for s in range(L)]
        for t in range(L):
            acc[t].update(y[t, keep], clt.decode_layer(t, acts, x[t, keep]))
            l0[t] += float((acts[t] > 0).sum())
            fires[t] += (acts[t] > 0).sum(0).cpu()
        n_tok += int(keep.sum())
        clean = lm.model(input_ids=ids).logits
        with splice_mlps(lm, _clt_splice(clt)):
            rep = lm.model(input_ids=ids).logits
        with splice_mlps(lm, {l: (lambda x_, y_: torch.cat([y_[:, :1], torch.zeros_like(y_[:, 1:])], 1)) for l in range(L)}):
            zero = lm.model(input_ids=ids).logits
        ce_clean = cross_entropy(clean, ids)
        sums["clean"] += float(ce_clean.sum())
        sums["replaced"] += float(cross_entropy(rep, ids).sum())
        sums["zero"] += float(cross_entropy(zero, ids).sum())
        sums["kl"] += float(kl_divergence(clean[:, :-1], rep[:, :-1]).sum())
        n_pred += ce_clean.numel()
    if n_pred == 0:
        raise ConfigError(f"split {split!r} of the corpus has no sequence of ctx_len={ctx_len}")
    ce = {k: v / n_pred for k, v in sums.items()}
    return CLTEvalResult(fvu=[a.value() for a in acc], l0=(l0 / max(n_tok, 1)).tolist(),
                         dead_fraction=(fires == 0).double().mean(1).tolist(), ce_clean=ce["clean"],
                         ce_replaced=ce["replaced"], ce_zero=ce["zero"], kl_replaced=ce["kl"],
                         ce_recovered=ce_recovered(ce["clean"], ce["replaced"], ce["zero"]), n_tokens=n_pred)
