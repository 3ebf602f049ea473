"""Training every layer's transcoder at once from streamed MLP activations (docs/design.md §9).

The model-free half of training: :class:`TrainConfig` (its defaults live in ``sparsetrace.config``),
:class:`Trainer` (the parameters of all trained layers stacked as ``[L, F, d]``, one optimiser step per
batch ``(x [L,N,d], y [L,N,d])``) and :func:`fit`, the loop that reads shuffle buffers from an
:class:`ActivationSource`, steps, logs and checkpoints. Running the model that produces the activations
lives in ``sparsetrace.transcoders.training``.

Training happens in normalised units: x̃ and y are divided by their RMS per layer (measured on the first
buffer) so that one learning rate fits every layer; :meth:`Trainer.to_transcoders` folds the scales back
into the weights, so a saved transcoder acts on raw activations.

Checkpoints are safetensors (weights, Adam moments, dead-latent counters, the shuffle RNG) plus JSON
(step, tokens, data position); they are taken only between shuffle buffers, so no buffer contents need
saving and a resumed run is bit-for-bit the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import save_file
from torch import Tensor

from sparsetrace.config import TrainConfig
from sparsetrace.errors import ConfigError, FormatError

from .io import _write_json, atomic_write, read_safetensors
from .kernels import dense_decode, low_matmul, sparse_decode, topk_encode, topk_encode_dense
from .model import Transcoder

__all__ = ["TrainConfig", "Trainer", "StepStats", "ActivationSource", "fit", "FitResult", "CHECKPOINT_DIR"]

CHECKPOINT_DIR = "checkpoint"


def fast_dtype(device: str | torch.device = "cpu") -> str:
    """``bfloat16`` where matrix products in it are native (a CUDA device that supports it; a CPU
    with AVX512-BF16 or AMX-BF16), else ``float32`` (bf16 products would be emulated, slower)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if dev.type != "cpu":
        return "float32"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"




@dataclass(frozen=True)
class StepStats:
    """What one optimiser step measured (per trained layer, in the trainer's layer order)."""

    loss: float
    """The total loss that was minimised (Σ over layers)."""
    fvu: Tensor
    """[L] FVU of this batch (normalised units; FVU is scale-free)."""
    l0: Tensor
    """[L] mean active latents per token."""
    dead_fraction: Tensor
    """[L] fraction of latents that have not fired for ``dead_tokens`` tokens."""
    lr: float


class _JumpReLU(torch.autograd.Function):
    """a = pre·H(pre − θ); ∂a/∂θ = −θ/ε · K((pre − θ)/ε) with a rectangle K (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        rect = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype)
        g_theta = -(theta / ctx.eps) * rect * g
        return g * (pre > theta), g_theta.sum_to_size(theta.shape), None


class _Step(torch.autograd.Function):
    """H(pre − θ) with the straight-through gradient ∂/∂θ = −1/ε · K((pre − θ)/ε); used for the L0 term."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        rect = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, (-(1.0 / ctx.eps) * rect * g).sum_to_size(theta.shape), None


class Trainer:
    """The stacked parameters of L transcoders and one Adam step per batch.

    Shapes: W_enc [L,F,d_in], b_enc [L,F], W_dec [L,F,d_out], b_dec [L,d_out], W_skip [L,d_out,d_in].
    Parameters are created zero; :meth:`initialize` sets them from the first buffer (docs/design.md §9).
    """

    PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "log_threshold")

    def __init__(
        self, config: TrainConfig, n_layers: int, d_in: int, d_out: int | None = None, layer_ids: list[int] | None = None
    ) -> None:
        d_out = d_in if d_out is None else d_out
        config = config.resolved("cpu")  # the trainer's tensors live on the CPU
        self.config, self.n_layers, self.d_in, self.d_out = config, n_layers, d_in, d_out
        self.layer_ids = list(range(n_layers)) if layer_ids is None else list(layer_ids)
        if len(self.layer_ids) != n_layers:
            raise ConfigError(f"layer_ids={self.layer_ids}; allowed: {n_layers} layer ids")
        self.n_features = F = config.features_for(d_in)
        if config.activation == "topk" and config.k > F:
            raise ConfigError(f"k={config.k}; allowed: 1..n_features ({F})")
        L = n_layers
        z = lambda *s: torch.zeros(*s, dtype=torch.float32)  # noqa: E731
        self.params: dict[str, Tensor] = {
            "W_enc": z(L, F, d_in), "b_enc": z(L, F), "W_dec": z(L, F, d_out), "b_dec": z(L, d_out),
        }
        if config.skip:
            self.params["W_skip"] = z(L, d_out, d_in)
        if config.activation == "jumprelu":
            self.params["log_threshold"] = z(L, F)
        for p in self.params.values():
            p.requires_grad_(True)
        self.rms_x = torch.ones(L)
        self.rms_y = torch.ones(L)
        # Tokens since each latent last fired (dead-latent detection for AuxK).
        self.since_fired = torch.zeros(L, F, dtype=torch.int64)
        self.step_count = 0
        self._warm: list[Transcoder] | None = None
        self.lr = config.lr_for(F)
        self.optimizer = torch.optim.Adam(
            list(self.params.values()), lr=self.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True
        )

    # ---- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor) -> None:
        """Set scales and parameters from a sample ``x [L,M,d_in], y [L,M,d_out]`` (docs/design.md §9).

        Each layer's random encoder comes from its own generator seeded by (seed, layer id), so a layer
        trains identically whichever other layers share the trainer (layer-parallel runs)."""
        cfg, p = self.config, self.params
        # Statistics are accumulated in fp64 over chunks of tokens: a 16k-token buffer of 30 layers is
        # 1.1 GB per tensor in fp32, and whole-buffer fp64 copies would quadruple that.
        M = x.shape[1]
        if cfg.normalize:
            self.rms_x = (_chunked_sum(x, lambda c: c.pow(2).sum(dim=(1, 2))) / (M * x.shape[2])).sqrt().float().clamp_min(1e-12)
            self.rms_y = (_chunked_sum(y, lambda c: c.pow(2).sum(dim=(1, 2))) / (M * y.shape[2])).sqrt().float().clamp_min(1e-12)
        mx = (_chunked_sum(x, lambda c: c.sum(1)) / M / self.rms_x.double()[:, None]).float()  # (L, d) normalised units
        my = (_chunked_sum(y, lambda c: c.sum(1)) / M / self.rms_y.double()[:, None]).float()
        L, F, d = p["W_enc"].shape
        # Rows of norm ≈ 1: with unit-RMS inputs the pre-activations start at O(1).
        for l, lid in enumerate(self.layer_ids):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + lid)
            p["W_enc"][l].copy_(torch.randn(F, d, generator=g) / math.sqrt(d))
        p["b_enc"].copy_(-torch.einsum("lfd,ld->lf", p["W_enc"], mx))
        p["W_dec"].zero_()
        b_dec = my.clone()
        if "W_skip" in p:
            if cfg.skip_init == "lstsq":
                p["W_skip"].copy_(self._ridge_fit(x, y, mx, my))
                # Keep ŷ's mean equal to ȳ at init: b_dec = ȳ − W_skip x̄.
                b_dec -= torch.einsum("loi,li->lo", p["W_skip"], mx)
            else:
                p["W_skip"].zero_()
        p["b_dec"].copy_(b_dec)
        if "log_threshold" in p:
            p["log_threshold"].fill_(math.log(cfg.jumprelu_init_threshold))
        if self._warm is not None:
            self._apply_warm_start(self._warm)

    def warm_start(self, transcoders: list[Transcoder]) -> None:
        """Initialise from trained transcoders (one per trained layer, raw units) instead of at random.

        Applied by :meth:`initialize` once the first buffer has set the scales: the inverse of the fold in
        :meth:`to_transcoders` re-expresses each transcoder in this run's normalised units, so
        ``to_transcoders()`` right after initialisation gives the same functions back."""
        cfg = self.config
        if len(transcoders) != self.n_layers:
            raise ConfigError(f"init_from: {len(transcoders)} transcoders; allowed: one per trained layer ({self.n_layers})")
        for lid, tc in zip(self.layer_ids, transcoders):
            got = (tc.d_in, tc.d_out, tc.n_features, tc.activation, tc.k, tc.has_skip)
            want = (self.d_in, self.d_out, self.n_features, cfg.activation, cfg.k if cfg.activation == "topk" else None, cfg.skip)
            if got != want:
                raise ConfigError(
                    f"init_from: layer {lid} has (d_in, d_out, n_features, activation, k, skip)={got}; "
                    f"allowed: this run's {want}"
                )
        self._warm = transcoders

    @torch.no_grad()
    def _apply_warm_start(self, transcoders: list[Transcoder]) -> None:
        p = self.params
        for l, tc in enumerate(transcoders):
            sx, sy = float(self.rms_x[l]), float(self.rms_y[l])
            p["W_enc"][l].copy_(tc.W_enc.float() * sx)
            p["b_enc"][l].copy_(tc.b_enc.float())
            p["W_dec"][l].copy_(tc.W_dec.float() / sy)
            p["b_dec"][l].copy_(tc.b_dec.float() / sy)
            if "W_skip" in p:
                p["W_skip"][l].copy_(tc.W_skip.float() * (sx / sy))
            if "log_threshold" in p:
                p["log_threshold"][l].copy_(tc.threshold.float().clamp_min(1e-12).log())

    def _normalise(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x / self.rms_x.view(-1, 1, 1), y / self.rms_y.view(-1, 1, 1)

    def _ridge_fit(self, x: Tensor, y: Tensor, mx: Tensor, my: Tensor, ridge: float = 1e-3) -> Tensor:
        """Per layer, W minimising ‖ỹ − x̃ Wᵀ‖² + ridge·M·‖W‖² on centred normalised data → [L, o, i].

        XᵀX and XᵀY are accumulated over token chunks in fp64."""
        sx = self.rms_x.double().view(-1, 1, 1)
        sy = self.rms_y.double().view(-1, 1, 1)
        mx64, my64 = mx.double().unsqueeze(1), my.double().unsqueeze(1)
        xtx = xty = 0
        for s in range(0, x.shape[1], _STAT_CHUNK):
            xc = x[:, s : s + _STAT_CHUNK].double() / sx - mx64  # (L, m, i)
            yc = y[:, s : s + _STAT_CHUNK].double() / sy - my64  # (L, m, o)
            xtx = xtx + xc.transpose(1, 2) @ xc
            xty = xty + xc.transpose(1, 2) @ yc
        eye = torch.eye(x.shape[-1], dtype=torch.float64)
        # The system is symmetric positive definite: Cholesky, one layer at a time. (torch 2.13's CPU
        # batched LU solve failed here with OMP_NUM_THREADS=2 — "Pivots given to lu_solve must all be
        # greater or equal to 1" — on well-conditioned matrices.)
        w = torch.stack([torch.cholesky_solve(b, torch.linalg.cholesky(a))
                         for a, b in zip(xtx + ridge * x.shape[1] * eye, xty)])  # (L, i, o)
        return w.transpose(1, 2).float()

    # ---- the forward ------------------------------------------------------------------------------
    def forward(self, xn: Tensor) -> tuple[Tensor, Tensor, Tensor, tuple | None, Tensor]:
        """Normalised x̃ [L,N,d] → (ŷ [L,N,d], l0 [L], penalty (scalar), AuxK context or None,
        fired [L,F] bool). Pure: the dead-latent counters are updated by :meth:`step`."""
        cfg, p = self.config, self.params
        low = getattr(torch, cfg.matmul_dtype)
        aux = None
        if cfg.activation == "topk":
            dead = self.since_fired >= cfg.dead_tokens
            # k_aux does not depend on how many latents are dead (entries beyond them are -inf and
            # contribute exactly 0), so layers stay independent of each other.
            k_aux = min(cfg.k_aux or self.d_in // 2, self.n_features)
            use_aux = cfg.auxk_coef > 0 and bool(dead.any())
            decode = sparse_decode if cfg.sparse_kernels else dense_decode
            if cfg.sparse_kernels:
                outs = topk_encode(xn, p["W_enc"], p["b_enc"], cfg.k, dead if use_aux else None, k_aux, select_dtype=low)
            else:
                outs = topk_encode_dense(xn, p["W_enc"], p["b_enc"], cfg.k, dead if use_aux else None, k_aux)
            vals, idx = outs[0], outs[1]
            acts = torch.relu(vals)
            yhat = decode(acts, idx, p["W_dec"])
            if use_aux:
                a_vals, a_idx = outs[2], outs[3]
                a_acts = torch.where(torch.isfinite(a_vals), torch.relu(a_vals), torch.zeros_like(a_vals))
                aux = (decode(a_acts, a_idx, p["W_dec"]),)
            with torch.no_grad():
                fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
                fired.view(-1).index_fill_(0, _fired_rows(idx, acts, self.n_features), True)
                l0 = (acts > 0).sum(-1).double().mean(-1)
            penalty = yhat.new_zeros(())
        else:
            pre = torch.baddbmm(p["b_enc"].unsqueeze(1), xn, p["W_enc"].transpose(1, 2))  # (L, N, F)
            if cfg.activation == "relu":
                code = torch.relu(pre)
                dec_norm = p["W_dec"].norm(dim=-1)  # (L, F)
                penalty = cfg.l1_coef * (code * dec_norm.unsqueeze(1)).sum(-1).mean(-1).sum()
            else:
                theta = p["log_threshold"].exp().unsqueeze(1)  # (L, 1, F)
                code = _JumpReLU.apply(pre, theta, cfg.jumprelu_bandwidth)
                penalty = cfg.l0_coef * _Step.apply(pre, theta, cfg.jumprelu_bandwidth).sum(-1).mean(-1).sum()
            yhat = torch.bmm(code, p["W_dec"])
            with torch.no_grad():
                fired = (code > 0).any(1)
                l0 = (code > 0).sum(-1).double().mean(-1)
        yhat = yhat + p["b_dec"].unsqueeze(1)
        if "W_skip" in p:
            yhat = yhat + low_matmul(xn, p["W_skip"], low)
        return yhat, l0, penalty, aux, fired

    def step(self, x: Tensor, y: Tensor) -> StepStats:
        """One Adam step on raw activations ``x [L,N,d_in], y [L,N,d_out]``."""
        cfg = self.config
        xn, yn = self._normalise(x, y)
        yhat, l0, penalty, aux, fired = self.forward(xn)
        self.since_fired += xn.shape[1]
        self.since_fired.masked_fill_(fired, 0)
        err = yn - yhat
        total_var = (yn - yn.mean(1, keepdim=True)).pow(2).sum(dim=(1, 2))  # (L,)
        fvu = err.pow(2).sum(dim=(1, 2)) / total_var
        loss = fvu.sum() + penalty
        if aux is not None:
            # AuxK: the dead latents reconstruct the residual (Gao et al. 2024 §A.2), as a fraction of its variance.
            e = err.detach()
            e_var = (e - e.mean(1, keepdim=True)).pow(2).sum(dim=(1, 2)).clamp_min(1e-12)
            loss = loss + cfg.auxk_coef * ((aux[0] - e).pow(2).sum(dim=(1, 2)) / e_var).sum()
        lr = self.lr * cfg.lr_scale(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        dead = (self.since_fired >= cfg.dead_tokens).double().mean(-1)
        return StepStats(float(loss.detach()), fvu.detach(), l0, dead, lr)

    # ---- state ------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """Everything a bit-for-bit resume needs, as named tensors (safetensors, no pickle)."""
        out = {f"param.{k}": v.detach().clone() for k, v in self.params.items()}
        for k, v in self.params.items():
            st = self.optimizer.state.get(v, {})
            for name in ("exp_avg", "exp_avg_sq", "step"):
                if name in st:
                    out[f"adam.{k}.{name}"] = st[name].detach().clone().reshape(st[name].shape)
        out["rms_x"], out["rms_y"] = self.rms_x.clone(), self.rms_y.clone()
        out["since_fired"] = self.since_fired.clone()
        out["step_count"] = torch.tensor([self.step_count], dtype=torch.int64)
        return out

    def load_state_tensors(self, t: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                if f"param.{k}" not in t or t[f"param.{k}"].shape != v.shape:
                    raise FormatError(f"checkpoint lacks param.{k} of shape {tuple(v.shape)}")
                v.copy_(t[f"param.{k}"])
                st = {n: t[f"adam.{k}.{n}"].clone() for n in ("exp_avg", "exp_avg_sq", "step") if f"adam.{k}.{n}" in t}
                if st:
                    self.optimizer.state[v] = st
        self.rms_x, self.rms_y = t["rms_x"].clone(), t["rms_y"].clone()
        self.since_fired = t["since_fired"].clone()
        self.step_count = int(t["step_count"][0])

    @torch.no_grad()
    def to_transcoders(self) -> list[Transcoder]:
        """One :class:`Transcoder` per trained layer acting on raw activations (normalisation folded in).

        Trained: ŷ/s_y = W_dec·σ(W_enc·x/s_x + b_enc) + b_dec + W_skip·x/s_x, hence
        W_enc ← W_enc/s_x, W_dec ← s_y·W_dec, b_dec ← s_y·b_dec, W_skip ← (s_y/s_x)·W_skip.
        """
        cfg, p = self.config, self.params
        out = []
        for l in range(self.n_layers):
            sx, sy = float(self.rms_x[l]), float(self.rms_y[l])
            tc = Transcoder(self.d_in, self.n_features, cfg.activation, cfg.k, d_out=self.d_out, skip=cfg.skip)
            tc.W_enc.copy_(p["W_enc"][l] / sx)
            tc.b_enc.copy_(p["b_enc"][l])
            tc.W_dec.copy_(p["W_dec"][l] * sy)
            tc.b_dec.copy_(p["b_dec"][l] * sy)
            if cfg.skip:
                tc.W_skip.copy_(p["W_skip"][l] * (sy / sx))
            if cfg.activation == "jumprelu":
                tc.threshold.copy_(p["log_threshold"][l].exp())
            out.append(tc)
        return out


def _fired_rows(idx: Tensor, acts: Tensor, n_features: int) -> Tensor:
    """Flat ids (l·F + f) of latents with a positive activation somewhere in the batch."""
    L = idx.shape[0]
    flat = idx + (torch.arange(L, device=idx.device) * n_features).view(L, 1, 1)
    return flat[acts > 0]


_STAT_CHUNK = 2048


def _chunked_sum(t: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    """Σ over token chunks of f(chunk in fp64); t [L, M, d]."""
    return sum(f(t[:, s : s + _STAT_CHUNK].double()) for s in range(0, t.shape[1], _STAT_CHUNK))


# ---- the loop ------------------------------------------------------------------------------------
class ActivationSource(Protocol):
    """Where :func:`fit` reads activations from; ``position`` makes it resumable."""

    position: int
    """Opaque resumable position (e.g. sequences consumed); restored with :meth:`seek`."""

    def read(self, n_tokens: int) -> tuple[Tensor, Tensor]:
        """The next ``n_tokens`` tokens' ``(x [L,n,d_in], y [L,n,d_out])`` (fewer only at the end of the data)."""

    def seek(self, position: int) -> None: ...


@dataclass(frozen=True)
class FitResult:
    """The end of :func:`fit`."""

    transcoders: list[Transcoder]
    """One per trained layer, raw-activation units."""
    tokens: int
    steps: int
    last_stats: StepStats | None
    scales: tuple[Tensor, Tensor]
    """(rms_x [L], rms_y [L]) used for normalisation."""


Logger = Callable[[dict[str, Any]], None]


def fit(
    trainer: Trainer,
    source: ActivationSource,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    *,
    rank: int = 0,
    world_size: int = 1,
    log: Logger | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    layer_ids: list[int] | None = None,
    n_layers_total: int | None = None,
) -> FitResult:
    """Train until ``config.n_tokens`` tokens; checkpoint under ``out_dir/checkpoint`` between buffers.

    With several ranks (layer-parallel), every rank reads the same activations and trains its own
    layers; ``reduce`` (an all-reduce sum) combines the per-layer statistics for logging.
    """
    cfg = trainer.config
    ckpt = Checkpointer(Path(out_dir) / CHECKPOINT_DIR, rank, world_size) if out_dir is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens = 0
    if resume and ckpt is not None and ckpt.exists():
        meta = ckpt.load(trainer, gen)
        tokens = meta["tokens"]
        source.seek(meta["position"])
        initialised = True
    else:
        initialised = False
    layer_ids = list(range(trainer.n_layers)) if layer_ids is None else layer_ids
    n_total = n_layers_total or trainer.n_layers
    bar = _progress(cfg, rank, tokens)
    try:
        stats, tokens = _train_loop(trainer, source, ckpt, gen, tokens, initialised, bar, rank, log, reduce,
                                    layer_ids, n_total)
    except BaseException:
        if ckpt is not None:
            ckpt.wait(raise_error=False)  # finish the file being written; the original error wins
        raise
    finally:
        if bar is not None:
            bar.close()
    if ckpt is not None:
        ckpt.wait()
    return FitResult(trainer.to_transcoders(), tokens, trainer.step_count, stats, (trainer.rms_x, trainer.rms_y))


def _train_loop(trainer, source, ckpt, gen, tokens, initialised, bar, rank, log, reduce, layer_ids, n_total):
    """Read buffers and step until ``total_steps``; checkpoint between buffers. → (last stats, tokens)."""
    cfg = trainer.config
    since_ckpt, stats = 0, None
    t0, tok0 = time.perf_counter(), tokens
    while trainer.step_count < cfg.total_steps:
        # never read past what the remaining steps train on (the last buffer may be shorter)
        x, y = source.read(min(cfg.shuffle_buffer_tokens, (cfg.total_steps - trainer.step_count) * cfg.batch_tokens))
        n = x.shape[1]
        if n < cfg.batch_tokens:
            break  # the data ran out
        if not initialised:
            trainer.initialize(x, y)
            initialised = True
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - cfg.batch_tokens + 1, cfg.batch_tokens):
            if trainer.step_count >= cfg.total_steps:
                break
            b = perm[s : s + cfg.batch_tokens]
            stats = trainer.step(x[:, b], y[:, b])
            tokens += cfg.batch_tokens
            since_ckpt += cfg.batch_tokens
            if trainer.step_count % cfg.log_every_steps == 0 or trainer.step_count == cfg.total_steps:
                rec = _record(stats, trainer, tokens, tokens - tok0, time.perf_counter() - t0, layer_ids, n_total, reduce)
                if log is not None and rank == 0:
                    log(rec)
                if bar is not None:
                    bar.set_postfix_str(_group_fvu(rec["fvu"]), refresh=False)
            if bar is not None:
                bar.update(cfg.batch_tokens)
        if ckpt is not None and cfg.checkpoint_every_tokens and since_ckpt >= cfg.checkpoint_every_tokens:
            if trainer.step_count < cfg.total_steps:
                ckpt.save(trainer, gen, {"tokens": tokens, "position": source.position, "step": trainer.step_count})
            since_ckpt = 0
    return stats, tokens


def _record(stats, trainer, tokens, new_tokens, elapsed, layer_ids, n_total, reduce) -> dict[str, Any]:
    """A JSON log record with per-layer stats over ALL layers (other ranks' filled in by ``reduce``)."""
    per = torch.zeros(3, n_total, dtype=torch.float64)
    ids = torch.tensor(layer_ids)
    per[0, ids], per[1, ids], per[2, ids] = stats.fvu.double(), stats.l0.double(), stats.dead_fraction.double()
    loss = torch.tensor([stats.loss], dtype=torch.float64)
    if reduce is not None:
        per, loss = reduce(per), reduce(loss)
    return {
        "step": trainer.step_count,
        "tokens": tokens,
        "lr": stats.lr,
        "loss": float(loss[0]),
        "tokens_per_s": new_tokens / max(elapsed, 1e-9),
        "fvu": [round(v, 6) for v in per[0].tolist()],
        "l0": [round(v, 3) for v in per[1].tolist()],
        "dead_fraction": [round(v, 5) for v in per[2].tolist()],
        "time": time.time(),
    }


def _group_fvu(fvu: list[float], groups: int = 3) -> str:
    """'fvu 0-9 .12 | 10-19 .08 | …': running FVU averaged over layer groups for the progress bar."""
    n = len(fvu)
    size = max(1, math.ceil(n / groups))
    parts = []
    for s in range(0, n, size):
        chunk = fvu[s : s + size]
        parts.append(f"L{s}-{s + len(chunk) - 1} {sum(chunk) / len(chunk):.3f}")
    return "fvu " + " | ".join(parts)


def _progress(cfg: TrainConfig, rank: int, tokens: int):
    if not cfg.progress or rank != 0:
        return None
    from tqdm.auto import tqdm

    total = cfg.total_steps * cfg.batch_tokens
    return tqdm(total=total, initial=tokens, unit="tok", unit_scale=True, dynamic_ncols=True, desc="train")


# ---- checkpoints ----------------------------------------------------------------------------------
def _same_run_so_far(saved: TrainConfig, now: TrainConfig, step: int) -> bool:
    """Whether a run of ``now`` would have taken the checkpoint's ``step`` steps exactly as ``saved`` did: the
    configs differ in ``n_tokens`` only and the learning rate of every step taken is the same under both
    (before either schedule's decay), so resuming with a new token budget equals a run started with it."""
    if replace(saved, n_tokens=now.n_tokens) != now:
        return False
    return all(saved.lr_scale(s) == now.lr_scale(s) for s in range(step))


class Checkpointer:
    """``checkpoint/ckpt_{tokens}/rank{r}.safetensors`` + ``rank{r}.json``; ``latest.json`` names the last
    complete one and is written (atomically, by rank 0) only after every rank has written its files.

    With one rank the files are written by a background thread (docs/design.md §9): :meth:`save` copies
    the state and returns, training goes on while the ~1 GB file is written, and the next :meth:`save`
    or :meth:`wait` joins it (re-raising its error). A process killed meanwhile leaves ``latest.json``
    on the previous complete checkpoint, because every file is written atomically and ``latest.json`` last.
    """

    def __init__(self, folder: Path, rank: int = 0, world_size: int = 1) -> None:
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def exists(self) -> bool:
        return (self.folder / "latest.json").is_file()

    def save(self, trainer: Trainer, gen: torch.Generator, meta: dict[str, Any]) -> Path:
        """Snapshot the trainer and the shuffle RNG now; write them (in the background with one rank)."""
        self.wait()
        sub = self.folder / f"ckpt_{meta['tokens']:012d}"
        sub.mkdir(parents=True, exist_ok=True)
        tensors = trainer.state_tensors()
        tensors["rng_state"] = gen.get_state()
        full = {**meta, "world_size": self.world_size, "rank": self.rank, "config": trainer.config.to_dict()}
        if self.world_size == 1:
            self._writer = threading.Thread(target=self._write_in_background, args=(sub, tensors, full, meta), daemon=True)
            self._writer.start()
        else:
            self._write(sub, tensors, full, meta)
        return sub

    def wait(self, raise_error: bool = True) -> None:
        """Block until the checkpoint being written is complete; re-raise the writer's error."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        err, self._error = self._error, None
        if err is not None and raise_error:
            raise err

    def _write_in_background(self, sub: Path, tensors: dict[str, Tensor], full: dict, meta: dict) -> None:
        try:
            self._write(sub, tensors, full, meta)
        except BaseException as e:  # re-raised by wait() in the training thread
            self._error = e

    def _write(self, sub: Path, tensors: dict[str, Tensor], full: dict, meta: dict) -> None:
        atomic_write(sub / f"rank{self.rank}.safetensors", lambda tmp: save_file(tensors, tmp))
        _write_json(sub / f"rank{self.rank}.json", full)
        self._barrier()
        if self.rank == 0:
            prev = self._latest_name()
            _write_json(self.folder / "latest.json", {"checkpoint": sub.name, **meta})
            if prev and prev != sub.name:
                shutil.rmtree(self.folder / prev, ignore_errors=True)
        self._barrier()

    def _latest_name(self) -> str | None:
        if not self.exists():
            return None
        return json.loads((self.folder / "latest.json").read_text())["checkpoint"]

    def load(self, trainer: Trainer, gen: torch.Generator) -> dict[str, Any]:
        sub = self.folder / self._latest_name()
        meta = json.loads((sub / f"rank{self.rank}.json").read_text())
        if meta["world_size"] != self.world_size:
            raise ConfigError(
                f"world_size={self.world_size}; the checkpoint in {str(sub)!r} was written with {meta['world_size']}"
            )
        saved = TrainConfig.from_dict(meta["config"])
        if saved != trainer.config:
            diff = {k: (v, getattr(trainer.config, k)) for k, v in asdict(saved).items() if getattr(trainer.config, k) != v}
            if not _same_run_so_far(saved, trainer.config, meta["step"]):
                raise ConfigError(f"resume with a different training config: {diff} (checkpoint, now); allowed: "
                                  "only n_tokens may change, while every step taken had the same learning rate under both")
        t = read_safetensors(sub / f"rank{self.rank}.safetensors")
        gen.set_state(t.pop("rng_state"))
        trainer.load_state_tensors(t)
        return meta

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
