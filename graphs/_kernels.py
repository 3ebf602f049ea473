"""Private numba kernels on the CSR edge store (rows = targets, ``indices`` = sources).

Array-only: every function takes and returns plain numpy arrays; validation and wrapping live in
``prune.py``. The attribution engine's row store (tracer/_store.py) ranks features with the same
:func:`row_denominators` and :func:`influence_sweep`. Each kernel has a parity test against the dense
numpy reference in ``tests/reference/influence_naive.py`` (docs/design.md §7);
tests/test_numba_cache.py runs those parity
tests again with ``NUMBA_DISABLE_JIT=1`` (these lines as plain Python) and with ``NUMBA_BOUNDSCHECK=1``.

Kernels are ``sparsetrace._numba.kernel`` functions: cached per CPU and thread count, compiled under a
cross-process lock; none calls a parallel kernel (issue 20).
"""

from __future__ import annotations

import numpy as np

from sparsetrace._numba import kernel


@kernel
def reverse_topological_order(indptr, indices, n):
    """Kahn's algorithm on the reversed edges: a node is emitted once every node it feeds has been.

    Returns ``(order [n] int64, n_emitted)``; ``n_emitted < n`` means the edges contain a cycle
    (a self-loop included). The order puts every target before all of its sources, which is what the
    one-sweep influence needs: I_t is final before it is pushed to t's sources.
    """
    out_degree = np.zeros(n, dtype=np.int64)
    for e in range(indptr[n]):
        out_degree[indices[e]] += 1
    order = np.empty(n, dtype=np.int64)
    head = 0
    tail = 0
    for v in range(n - 1, -1, -1):  # reverse index order: logits first, a stable, readable order
        if out_degree[v] == 0:
            order[tail] = v
            tail += 1
    while head < tail:
        t = order[head]
        head += 1
        for e in range(indptr[t], indptr[t + 1]):
            s = indices[e]
            out_degree[s] -= 1
            if out_degree[s] == 0:
                order[tail] = s
                tail += 1
    return order, tail


@kernel
def row_denominators(targets, starts, ends, indices, data, remainder, node_mask):
    """Per row r (target node ``targets[r]``, entries ``starts[r] : ends[r]``): Σ|A[t, s]| over kept
    sources s, plus the target's stored ``remainder``. A CSR is ``(arange(n), indptr[:-1], indptr[1:])``
    (``prune.csr_rows``); the row store passes its blocks' rows.

    The remainder is the absolute mass thresholded storage dropped, so counting it keeps Â identical to
    the un-thresholded one. Sources outside ``node_mask`` are *not* counted: a node-pruned graph is
    renormalised over its surviving sources (circuit-tracer's golden edge scores, prune-12.json).
    Rows whose target is outside the mask get 0.
    """
    out = np.zeros(targets.shape[0], dtype=np.float64)
    for r in range(targets.shape[0]):
        t = targets[r]
        if not node_mask[t]:
            continue
        acc = np.float64(remainder[t])
        for e in range(starts[r], ends[r]):
            if node_mask[indices[e]]:
                acc += abs(np.float64(data[e]))
        out[r] = acc
    return out


@kernel
def influence_sweep(infl, w, visit, targets, starts, ends, indices, data, denom, node_mask):
    """I = wᵀ(Â + Â² + …), accumulated into ``infl`` in place: for each row r in ``visit``, in order,
    I_s += (I_t + w_t)·|A[t, s]| / denom[r] for its target t = targets[r] and every stored source s.

    Rows are given as in :func:`row_denominators` (``denom`` from it). Exact when ``visit`` puts every
    target before its sources (:func:`reverse_topological_order` on a CSR; the row store sweeps its
    rows by layer descending), I_t then being final when it is pushed. The only influence sweep in the
    project: pruning and the engine's row budget both call it. Rows with a zero denominator have no
    inputs and push nothing (Â's row stays 0, docs/design.md §5).
    """
    for k in range(visit.shape[0]):
        r = visit[k]
        t = targets[r]
        if not node_mask[t] or denom[r] == 0.0:
            continue
        push = (infl[t] + w[t]) / denom[r]
        if push == 0.0:
            continue
        for e in range(starts[r], ends[r]):
            s = indices[e]
            if node_mask[s]:
                infl[s] += push * abs(np.float64(data[e]))


@kernel
def edge_scores(indptr, indices, data, denom, infl, w, node_mask):
    """score[e] = Â[t, s]·(I_t + w_t) for every stored entry e = (t, s); 0 where t or s is pruned."""
    n = indptr.shape[0] - 1
    out = np.zeros(indices.shape[0], dtype=np.float64)
    for t in range(n):
        if not node_mask[t] or denom[t] == 0.0:
            continue
        scale = (infl[t] + w[t]) / denom[t]
        for e in range(indptr[t], indptr[t + 1]):
            if node_mask[indices[e]]:
                out[e] = scale * abs(np.float64(data[e]))
    return out


@kernel
def prune_to_fixed_point(indptr, indices, node_mask, edge_mask, protected, needs_input):
    """Drop nodes without a kept out-edge (unless ``protected``) and nodes flagged ``needs_input``
    without a kept in-edge, drop the edges that touch them, and repeat until nothing changes.

    Works in place on copies made by the caller; returns the number of sweeps (≥ 1).
    """
    n = indptr.shape[0] - 1
    has_out = np.zeros(n, dtype=np.bool_)
    has_in = np.zeros(n, dtype=np.bool_)
    sweeps = 0
    changed = True
    while changed:
        sweeps += 1
        changed = False
        has_out[:] = False
        has_in[:] = False
        for t in range(n):
            for e in range(indptr[t], indptr[t + 1]):
                if edge_mask[e]:
                    if node_mask[t] and node_mask[indices[e]]:
                        has_in[t] = True
                        has_out[indices[e]] = True
                    else:
                        edge_mask[e] = False
        for v in range(n):
            if node_mask[v] and not protected[v]:
                if (not has_out[v]) or (needs_input[v] and not has_in[v]):
                    node_mask[v] = False
                    changed = True
    return sweeps


@kernel
def induced_entries(indptr, indices, node_mask):
    """The stored entries (t, s) with both t and s in ``node_mask``: ``(sub_indptr [n+1], entry [E'])``,
    ``entry`` indexing the original arrays row by row (rows outside the mask are empty), so that the
    passes after node pruning touch only the node-pruned graph."""
    n = indptr.shape[0] - 1
    sub_indptr = np.zeros(n + 1, dtype=np.int64)
    for t in range(n):
        c = 0
        if node_mask[t]:
            for e in range(indptr[t], indptr[t + 1]):
                if node_mask[indices[e]]:
                    c += 1
        sub_indptr[t + 1] = sub_indptr[t] + c
    entry = np.empty(sub_indptr[n], dtype=np.int64)
    k = 0
    for t in range(n):
        if node_mask[t]:
            for e in range(indptr[t], indptr[t + 1]):
                if node_mask[indices[e]]:
                    entry[k] = e
                    k += 1
    return sub_indptr, entry
