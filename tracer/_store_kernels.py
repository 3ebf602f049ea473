"""The row store's numba kernels (tracer/_store.py): array-only, numpy in and out, no torch.

Every kernel is a ``sparsetrace._numba.kernel`` (cached per CPU and thread count, compiled under a
cross-process lock). None calls another: a cached kernel calling a parallel one crashed whenever it was
loaded from the cache (issue 20), so :func:`_compress` is plain Python calling ``_cuts``,
``_kept_per_row`` and ``_fill_slots`` in turn. tests/test_tracer_store.py checks them against numpy;
tests/test_numba_cache.py runs each compiled, loaded from the cache, and with ``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from sparsetrace._numba import kernel

__all__: list[str] = []


@kernel(parallel=True)
def _cuts(blk, threshold):
    """Per row of a dense block [b, n]: entries with |w| ≤ cut are dropped (threshold · max|row|; 0: only zeros)."""
    b, n = blk.shape
    cut = np.zeros(b)
    if threshold > 0:
        for i in prange(b):
            m = 0.0
            for j in range(n):
                a = abs(np.float64(blk[i, j]))
                if a > m:
                    m = a
            cut[i] = threshold * m
    return cut


@kernel(parallel=True)
def _fill_slots(blk, cut, cols, vals, starts, limits, skip_lo, skip_hi):
    """Row i's kept entries (columns ascending) go to cols/vals[starts[i] : limits[i]], rows in
    parallel (each has its own slot). Columns skip_lo[i] ≤ j < skip_hi of row i are known to be zero
    and not read. Returns the entries written per row and the dropped absolute mass per row (float64)."""
    b, n = blk.shape
    counts = np.zeros(b, dtype=np.int64)
    dropped = np.zeros(b)
    over = np.zeros(b, dtype=np.bool_)
    for i in prange(b):
        e = starts[i]
        lim = limits[i]
        c = cut[i]
        dr = 0.0
        for seg in range(2):
            j0 = 0 if seg == 0 else max(skip_hi, skip_lo[i])
            j1 = min(skip_lo[i], n) if seg == 0 else n
            for j in range(j0, j1):
                v = blk[i, j]
                a = abs(np.float64(v))
                if a > c:
                    if e >= lim:
                        over[i] = True
                        break
                    cols[e] = j
                    vals[e] = v
                    e += 1
                else:
                    dr += a
        counts[i] = e - starts[i]
        dropped[i] = dr
    if over.any():
        raise ValueError("row store capacity exceeded")
    return counts, dropped


@kernel
def _compact(cols, vals, starts, counts):
    """Move row r's ``counts[r]`` entries from ``starts[r]`` (ascending) to right after row r−1's, in
    place (every move is leftward, rows in order); returns the number of entries."""
    e = 0
    for r in range(len(starts)):
        s, c = starts[r], counts[r]
        if s != e:
            for k in range(c):
                cols[e + k] = cols[s + k]
                vals[e + k] = vals[s + k]
        e += c
    return e


@kernel(parallel=True)
def _kept_per_row(blk, cut):
    """Per row of a dense block [b, n]: the number of entries with |w| > cut[i]."""
    b, n = blk.shape
    kept = np.zeros(b, dtype=np.int64)
    for i in prange(b):
        k = 0
        for j in range(n):
            if abs(np.float64(blk[i, j])) > cut[i]:
                k += 1
        kept[i] = k
    return kept


def _compress(blk, threshold):
    """CSR of a dense block [b, n] in new arrays (int32 columns): per row, the entries with
    |w| > threshold · max|row| (threshold 0: the nonzero ones), and the dropped absolute mass per row.

    Plain Python calling three kernels in turn: as a cached kernel calling the parallel ones it crashed
    when loaded from numba's cache (issue 20)."""
    b, n = blk.shape
    cut = _cuts(blk, threshold)
    indptr = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(_kept_per_row(blk, cut), out=indptr[1:])
    cols = np.empty(indptr[-1], dtype=np.int32)
    vals = np.empty(indptr[-1], dtype=blk.dtype)
    _, dropped = _fill_slots(blk, cut, cols, vals, indptr[:-1], indptr[1:], np.full(b, n, dtype=np.int64), n)
    return indptr, cols, vals, dropped


@kernel
def _place(dst_indptr, new_rows, src_indptr, src_cols, src_vals, cols, vals):
    """Copy each source row r's entries into destination row new_rows[r]'s slots."""
    for r in range(len(new_rows)):
        s0, s1 = src_indptr[r], src_indptr[r + 1]
        d0 = dst_indptr[new_rows[r]]
        for k in range(s1 - s0):
            cols[d0 + k] = src_cols[s0 + k]
            vals[d0 + k] = src_vals[s0 + k]
