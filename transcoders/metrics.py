"""Reconstruction and faithfulness metrics of transcoders (docs/design.md §9). Pure functions on tensors.

Definitions (y: true MLP outputs, ŷ: transcoder reconstructions, over N tokens, d dims):

- **FVU** (fraction of variance unexplained) = Σ_n ‖y_n − ŷ_n‖² / Σ_n ‖y_n − ȳ‖², ȳ = mean over the N
  tokens. 0 = perfect reconstruction, 1 = no better than always predicting the mean ȳ.
- **L0** = mean number of non-zero latent activations per token.
- **dead fraction** = fraction of latents that never fire (activation > 0) on the evaluated tokens.
- **CE recovered (%)** = 100 · (CE_zero − CE_replaced) / (CE_zero − CE_clean): how much of the loss
  increase caused by zero-ablating the MLPs the transcoders win back. 100 % = as good as the real MLPs,
  0 % = no better than zeros.
- **KL** = mean over predicted positions of KL(p_clean ‖ p_replaced) of the next-token distributions, in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["fvu", "FVUAccumulator", "l0", "dead_fraction", "ce_recovered", "kl_divergence", "cross_entropy"]


def fvu(y: Tensor, yhat: Tensor) -> Tensor:
    """Σ‖y−ŷ‖² / Σ‖y−ȳ‖² over all tokens; y, ŷ [..., d] (leading dims are tokens). fp64 scalar."""
    y64, e = y.reshape(-1, y.shape[-1]).double(), (y - yhat).reshape(-1, y.shape[-1]).double()
    return e.pow(2).sum() / (y64 - y64.mean(0)).pow(2).sum()


@dataclass
class FVUAccumulator:
    """Streaming FVU over batches: Σ‖y−ȳ‖² = Σ‖y‖² − N‖ȳ‖² (accumulated in fp64)."""

    sq_err: float = 0.0
    sum_y: Tensor | None = None
    sum_sq_y: float = 0.0
    n: int = 0

    def update(self, y: Tensor, yhat: Tensor) -> None:
        y64 = y.reshape(-1, y.shape[-1]).double()
        self.sq_err += float((y64 - yhat.reshape(-1, y.shape[-1]).double()).pow(2).sum())
        s = y64.sum(0)
        self.sum_y = s if self.sum_y is None else self.sum_y + s
        self.sum_sq_y += float(y64.pow(2).sum())
        self.n += y64.shape[0]

    def value(self) -> float:
        if self.n == 0 or self.sum_y is None:
            return float("nan")
        total = self.sum_sq_y - float(self.sum_y.pow(2).sum()) / self.n
        return self.sq_err / total


def l0(acts: Tensor) -> float:
    """Mean number of non-zero entries per token; acts [..., F]."""
    return float((acts != 0).reshape(-1, acts.shape[-1]).sum(-1).double().mean())


def dead_fraction(fire_counts: Tensor) -> float:
    """Fraction of latents whose fire count (over the evaluated tokens) is 0; fire_counts [F]."""
    return float((fire_counts == 0).double().mean())


def ce_recovered(ce_clean: float, ce_replaced: float, ce_zero: float) -> float:
    """100 · (CE_zero − CE_replaced) / (CE_zero − CE_clean), in percent."""
    if ce_zero == ce_clean:
        return float("nan")
    return 100.0 * (ce_zero - ce_replaced) / (ce_zero - ce_clean)


def cross_entropy(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-position next-token cross-entropy [B, T−1] (nats) of logits [B,T,V] on input_ids [B,T]."""
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -lp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p ‖ q) per position [...] (nats) from logits [..., V]."""
    lp = torch.log_softmax(logits_p.double(), dim=-1)
    lq = torch.log_softmax(logits_q.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)
