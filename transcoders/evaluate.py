"""Evaluating a transcoder set on held-out text (docs/design.md §8 provenance, §9 metrics).

Measured on held-out corpus sequences (definitions in :mod:`sparsetrace.transcoders.metrics`):
per layer FVU, L0 and dead fraction; per layer the CE increase (ΔCE) and KL when only that layer's MLP
is replaced by its transcoder; and CE / KL with ALL MLPs replaced, as % CE recovered against
zero-ablating all MLPs.

Position 0 is not modelled (the attention sink, docs/design.md §3: its features are not graph nodes and the
transcoders are not trained on it), so every arm — replaced and zero-ablated — keeps the true MLP output
there, and FVU/L0 skip it. FVU also skips the outlier tokens that training skips.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from sparsetrace.errors import ConfigError, FormatError
from sparsetrace.transcoders.data import Corpus
from sparsetrace.transcoders.io import atomic_write
from sparsetrace.transcoders.metrics import FVUAccumulator, ce_recovered, cross_entropy, kl_divergence
from sparsetrace.transcoders.model import TranscoderSet
from sparsetrace.config import EvalConfig, TrainConfig

from ..models.loading import LoadedModel, collect_mlp_io, splice_mlps
from .training import outlier_mask

__all__ = ["EvalResult", "evaluate_transcoders", "plot_metrics", "write_metrics"]


@dataclass(frozen=True)
class EvalResult:
    """Quality of a transcoder set on held-out tokens (lists are per layer of the set)."""

    fvu: list[float]
    """Σ‖y−ŷ‖²/Σ‖y−ȳ‖² per layer."""
    l0: list[float]
    """Mean active latents per token."""
    dead_fraction: list[float]
    """Fraction of latents that never fired on the evaluated tokens."""
    delta_ce: list[float] | None
    """CE(only this layer replaced) − CE(clean), nats; None when not measured."""
    kl: list[float] | None
    """KL(clean ‖ only this layer replaced), nats per position."""
    ce_clean: float
    ce_replaced: float
    """CE with every layer's MLP replaced by its transcoder."""
    ce_zero: float
    """CE with every layer's MLP output zeroed."""
    kl_replaced: float
    """KL(clean ‖ all replaced)."""
    ce_recovered: float
    """100·(CE_zero − CE_replaced)/(CE_zero − CE_clean), percent."""
    n_tokens: int
    """Predicted positions the CE/KL averages are over."""

    def to_dict(self) -> dict:
        return asdict(self)


def _replacement(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap an MLP replacement so that position 0 keeps its true output (see module docstring)."""

    def f(x: Tensor, y: Tensor) -> Tensor:
        out = fn(x, y)
        return torch.cat([y[:, :1], out[:, 1:].to(y.dtype)], dim=1)

    return f


@torch.no_grad()
def evaluate_transcoders(
    lm: LoadedModel,
    transcoders: TranscoderSet,
    corpus: Corpus,
    *,
    n_sequences: int = EvalConfig.n_sequences,
    ctx_len: int = EvalConfig.ctx_len,
    batch: int = EvalConfig.batch,
    split: str = EvalConfig.split,
    per_layer_ce: bool = EvalConfig.per_layer_ce,
    layers: list[int] | None = None,
    out_dir: str | os.PathLike | None = None,
    outlier_factor: float = TrainConfig.outlier_factor,
) -> EvalResult:
    """Evaluate ``transcoders`` (layer i of the set replaces model layer ``layers[i]``, default
    ``training["layers"]`` of the set's config, else 0..n−1) on ``n_sequences`` held-out sequences.

    With ``out_dir`` (the set's folder), the metrics are written into its ``config.json`` and a PNG
    plot ``metrics.png`` of FVU and L0 per layer is saved beside it.
    """
    layers = layers or transcoders.config.training.get("layers") or list(range(len(transcoders)))
    if len(layers) != len(transcoders):
        raise ConfigError(f"layers={layers}: {len(layers)} ids for a set of {len(transcoders)} transcoders")
    if n_sequences <= 0 or batch <= 0:
        raise ConfigError(f"n_sequences={n_sequences}, batch={batch}; allowed: positive integers")
    bos = lm.tokenizer.bos_token_id if lm.prepend_bos else None
    tcs = {l: transcoders[i].to(lm.device) for i, l in enumerate(layers)}
    L, F = len(layers), transcoders.n_features
    acc = [FVUAccumulator() for _ in layers]
    l0_sum = torch.zeros(L, dtype=torch.float64)
    fires = torch.zeros(L, F, dtype=torch.int64)
    n_fvu_tok = 0
    sums = {"clean": 0.0, "replaced": 0.0, "zero": 0.0, "kl": 0.0}
    d_ce = torch.zeros(L, dtype=torch.float64)
    d_kl = torch.zeros(L, dtype=torch.float64)
    n_pred = 0
    for start in range(0, n_sequences, batch):
        ids_np = corpus.sequences(split, start, min(batch, n_sequences - start), ctx_len, bos)
        if len(ids_np) == 0:
            break
        ids = torch.from_numpy(ids_np).to(lm.device)
        # Reconstruction metrics on the true activations (positions ≥ 1, outliers skipped).
        x, y = collect_mlp_io(lm, ids, layers)  # (L, B, T, d)
        x = x[:, :, 1:].reshape(L, -1, x.shape[-1])
        y = y[:, :, 1:].reshape(L, -1, y.shape[-1])
        keep = outlier_mask(x, y, outlier_factor)
        for i, l in enumerate(layers):
            tc = tcs[l]
            a = tc.encode(x[i, keep])
            acc[i].update(y[i, keep], tc.decode(a, x[i, keep]))
            l0_sum[i] += float((a > 0).sum())
            fires[i] += (a > 0).sum(0).cpu()
        n_fvu_tok += int(keep.sum())
        # Faithfulness: CE/KL with MLPs spliced.
        clean = lm.model(input_ids=ids).logits
        ce_clean = cross_entropy(clean, ids)
        with splice_mlps(lm, {l: _replacement(lambda x_, y_, tc=tcs[l]: tc(x_)) for l in layers}):
            rep = lm.model(input_ids=ids).logits
        with splice_mlps(lm, {l: _replacement(lambda x_, y_: torch.zeros_like(y_)) for l in layers}):
            zero = lm.model(input_ids=ids).logits
        sums["clean"] += float(ce_clean.sum())
        sums["replaced"] += float(cross_entropy(rep, ids).sum())
        sums["zero"] += float(cross_entropy(zero, ids).sum())
        sums["kl"] += float(kl_divergence(clean[:, :-1], rep[:, :-1]).sum())
        if per_layer_ce:
            for i, l in enumerate(layers):
                with splice_mlps(lm, {l: _replacement(lambda x_, y_, tc=tcs[l]: tc(x_))}):
                    one = lm.model(input_ids=ids).logits
                d_ce[i] += float((cross_entropy(one, ids) - ce_clean).sum())
                d_kl[i] += float(kl_divergence(clean[:, :-1], one[:, :-1]).sum())
        n_pred += ce_clean.numel()
    if n_pred == 0:
        raise ConfigError(f"split {split!r} of the corpus has no sequence of ctx_len={ctx_len}")
    ce = {k: v / n_pred for k, v in sums.items()}
    result = EvalResult(
        fvu=[a.value() for a in acc],
        l0=(l0_sum / max(n_fvu_tok, 1)).tolist(),
        dead_fraction=(fires == 0).double().mean(1).tolist(),
        delta_ce=(d_ce / n_pred).tolist() if per_layer_ce else None,
        kl=(d_kl / n_pred).tolist() if per_layer_ce else None,
        ce_clean=ce["clean"],
        ce_replaced=ce["replaced"],
        ce_zero=ce["zero"],
        kl_replaced=ce["kl"],
        ce_recovered=ce_recovered(ce["clean"], ce["replaced"], ce["zero"]),
        n_tokens=n_pred,
    )
    if out_dir is not None:
        write_metrics(out_dir, result, {"split": split, "n_sequences": n_sequences, "ctx_len": ctx_len})
        plot_metrics(result, Path(out_dir) / "metrics.png")
    return result


def write_metrics(folder: str | os.PathLike, result: EvalResult, how: dict) -> None:
    """Put ``result`` into the ``metrics`` of the set's ``config.json`` (atomic rewrite)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FormatError(f"{str(path)!r} does not exist: not a transcoder set folder")
    cfg = json.loads(path.read_text())
    cfg["metrics"] = {**result.to_dict(), "evaluation": how}
    text = json.dumps(cfg, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plot_metrics(result: EvalResult, path: str | os.PathLike) -> Path:
    """PNG with FVU and L0 per layer (matplotlib's object API: no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    xs = list(range(len(result.fvu)))
    ax1.plot(xs, result.fvu, marker="o")
    ax1.set(xlabel="layer", ylabel="FVU (held-out)", title=f"FVU; CE recovered {result.ce_recovered:.1f}%")
    ax2.plot(xs, result.l0, marker="o", color="C1")
    ax2.set(xlabel="layer", ylabel="L0", title="active latents per token")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
