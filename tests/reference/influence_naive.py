"""Dense numpy references for influence, edge scores, pruning and graph scores (docs/design.md §5).

Deliberately plain: dense N×N matrices, no numba, written from the formulas. They also run on
``dtype=object`` arrays of ``fractions.Fraction`` for exact golden checks.
"""

from __future__ import annotations

import numpy as np


def normalise(a: np.ndarray, remainder: np.ndarray | None = None, keep: np.ndarray | None = None) -> np.ndarray:
    """Â: |A| with rows divided by (Σ_s |A[t, s]| + remainder[t]); zero rows stay zero.

    ``keep``: restrict to these nodes (rows and columns of the others zeroed before normalising)."""
    absa = np.abs(a)
    if keep is not None:
        absa = absa * np.outer(keep, keep)
    rem = np.zeros(a.shape[0], dtype=absa.dtype) if remainder is None else np.asarray(remainder)
    if keep is not None:
        rem = rem * keep
    denom = absa.sum(axis=1) + rem
    out = np.zeros_like(absa)
    nz = denom != 0
    out[nz] = absa[nz] / denom[nz][:, None]
    return out


def influence_power_series(ahat: np.ndarray, w: np.ndarray) -> np.ndarray:
    """wᵀ(Â + Â² + …), summed until the term vanishes (Â is nilpotent on a DAG; ≤ N terms)."""
    total = np.zeros_like(w)
    term = w
    for _ in range(len(w) + 1):
        term = term @ ahat
        if not np.any(term != 0):
            return total
        total = total + term
    raise ValueError("Â is not nilpotent: the graph has a cycle")


def influence_inverse(ahat: np.ndarray, w: np.ndarray) -> np.ndarray:
    """wᵀ((I − Â)⁻¹ − I) via one linear solve (float only)."""
    n = len(w)
    x = np.linalg.solve((np.eye(n) - ahat).T, w)
    return x - w


def edge_scores(ahat: np.ndarray, infl: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Dense score[t, s] = Â[t, s]·(I_t + w_t)."""
    return ahat * (infl + w)[:, None]


def threshold_keep(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Keep-mask of the smallest set of positive scores whose share of the total reaches ``threshold``
    (ties at the cut kept), written as a plain loop."""
    flat = [float(x) for x in np.ravel(scores)]
    positive = sorted((x for x in flat if x > 0), reverse=True)
    if not positive:
        return np.zeros(np.shape(scores), dtype=bool)
    total = sum(positive)
    running = 0.0
    cut = positive[-1]
    for x in positive:
        running += x
        if running >= threshold * total:
            cut = x
            break
    return (np.asarray(scores, dtype=float) >= cut) & (np.asarray(scores, dtype=float) > 0)


def prune_naive(a, remainder, w, kind, node_threshold, edge_threshold):
    """Dense pruning (kinds: 0 feature, 1 error, 2 token, 3 logit). Returns (node_mask, edge_mask [N, N],
    node_influence, edge_scores [N, N])."""
    n = len(w)
    protected = (kind == 2) | (kind == 3)
    infl = influence_power_series(normalise(a, remainder), w)
    node_mask = protected.copy()
    node_mask[~protected] = threshold_keep(infl[~protected], node_threshold)
    ahat2 = normalise(a, remainder, node_mask.astype(float))
    infl2 = influence_power_series(ahat2, w)
    scores = edge_scores(ahat2, infl2, w)
    edge_mask = threshold_keep(scores, edge_threshold) & (a != 0)
    while True:
        edge_mask &= np.outer(node_mask, node_mask)
        new = node_mask.copy()
        for v in range(n):
            if protected[v] or not new[v]:
                continue
            if not edge_mask[:, v].any() or (kind[v] == 0 and not edge_mask[v, :].any()):
                new[v] = False
        if np.array_equal(new, node_mask):
            break
        node_mask = new
    return node_mask, edge_mask, infl, scores


def graph_scores(a, remainder, w, kind):
    """(replacement, completeness) from the dense formulas of docs/design.md §5."""
    ahat = normalise(a, remainder)
    infl = influence_power_series(ahat, w)
    tok = infl[kind == 2].sum()
    err = infl[kind == 1].sum()
    out = infl + w
    non_error = 1 - ahat[:, kind == 1].sum(axis=1)
    return tok / (tok + err), (non_error * out).sum() / out.sum()
