"""Logit targets of an attribution (docs/design.md §4): the top logits, explicit tokens, or custom directions.

A target is a direction in the final normed residual at the last position: for token k the demeaned
unembedding u_k − mean_v u_v (its value is "logit k minus the mean logit", pre-softcap, no bias); a
custom target is any vector, e.g. u_a − u_b for logit(a) − logit(b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from sparsetrace.errors import ConfigError

__all__ = ["LogitTarget", "CustomTarget", "logit_difference", "select_targets"]


@dataclass(frozen=True, eq=False)
class LogitTarget:
    """One logit node: ``vector`` [d] read from the final normed residual at the last position."""

    label: str
    token_id: int
    """-1 for a custom direction."""
    probability: float
    """The logit weight w (the model's probability of the token; custom: as given)."""
    vector: Tensor


@dataclass(frozen=True, eq=False)
class CustomTarget:
    """A user direction: ``vector`` [d] in the final normed residual, with a display label and weight."""

    label: str
    vector: Tensor
    weight: float = 1.0


def logit_difference(unembedding: Tensor, a: int, b: int, label: str | None = None, weight: float = 1.0) -> CustomTarget:
    """The direction of logit(a) − logit(b)."""
    v = unembedding[a] - unembedding[b]
    return CustomTarget(label or f"logit({a}) - logit({b})", v.detach().clone(), weight)


TargetSpec = Union[None, Sequence[Union[int, str, CustomTarget]]]


def select_targets(
    logits: Tensor,
    probs: Tensor,
    unembedding: Tensor,
    spec: TargetSpec = None,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    tokenizer=None,
) -> list[LogitTarget]:
    """Targets for the last position.

    ``logits`` [V] pre-softcap, ``probs`` [V] the model's output distribution, ``unembedding`` [V, d].
    ``spec=None``: the smallest top-probability prefix reaching ``desired_logit_prob``, at most
    ``max_n_logits``. Otherwise a list of token ids, single-token strings or CustomTargets.
    """
    if not 1 <= max_n_logits <= 1000:
        raise ConfigError(f"max_n_logits={max_n_logits}; allowed: 1..1000")
    if not 0 < desired_logit_prob <= 1:
        raise ConfigError(f"desired_logit_prob={desired_logit_prob}; allowed: (0, 1]")
    V = unembedding.shape[0]
    mean_u = unembedding.mean(0)
    decode = (lambda i: tokenizer.decode([i])) if tokenizer is not None else (lambda i: f"<{i}>")

    def token_target(i: int) -> LogitTarget:
        if not 0 <= i < V:
            raise ConfigError(f"target token id {i} outside the vocabulary 0..{V - 1}")
        return LogitTarget(decode(i), i, float(probs[i]), (unembedding[i] - mean_u).detach())

    if spec is None:
        p_sorted, idx = probs.sort(descending=True)
        cum = p_sorted.cumsum(0)
        n = int((cum < desired_logit_prob).sum()) + 1
        n = min(n, max_n_logits, V)
        return [token_target(int(i)) for i in idx[:n]]
    if len(spec) == 0:
        raise ConfigError("targets=[]: give at least one target, or None for the top logits")
    out = []
    for t in spec:
        if isinstance(t, CustomTarget):
            if t.vector.shape != (unembedding.shape[1],):
                raise ConfigError(f"custom target {t.label!r} has shape {tuple(t.vector.shape)}, expected ({unembedding.shape[1]},)")
            out.append(LogitTarget(t.label, -1, float(t.weight), t.vector.to(unembedding)))
        elif isinstance(t, str):
            if tokenizer is None:
                raise ConfigError(f"target {t!r} is a string but the model has no tokenizer; give a token id")
            ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ConfigError(f"target {t!r} is {len(ids)} tokens; a logit target must be exactly one token")
            out.append(token_target(ids[0]))
        elif isinstance(t, (int,)) or (isinstance(t, Tensor) and t.ndim == 0):
            out.append(token_target(int(t)))
        else:
            raise ConfigError(f"target {t!r}; allowed: token id, single-token string, CustomTarget")
    return out
