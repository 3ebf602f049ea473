"""The attribution engine's row store: computed rows kept sparse per batch, assembled into CSR at the end.

Rows arrive in batches (one per backward pass) and are kept as per-batch CSR blocks (int32 columns), so
memory is the stored entries, never a dense N×N matrix. With ``threshold > 0`` a row keeps the entries
with |w| > threshold · max|row| and the dropped absolute mass goes to the row's remainder: row
normalisation, hence Â, is unchanged for every kept entry (issue 8, item 5).

``influence`` (the row budget's ranking) is one reverse-topological sweep over the stored rows (numba,
O(stored entries)); the depth-iterated reference it replaced is kept in tests/reference/.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from torch import Tensor

from sparsetrace.graphs import Adjacency
from sparsetrace.graphs.graph import index_dtype

__all__ = ["RowStore"]


@njit(cache=True)
def _push_rows(infl, w, targets, indptr, cols, vals, remainder, rows):
    """For each local row r in ``rows`` (target t = targets[r]): push (I_t + w_t)·|A[t, s]| / Σ|A[t, ·]|
    to every stored source s. The caller visits targets before their sources (layer descending)."""
    for r in rows:
        t = targets[r]
        denom = remainder[t]
        for e in range(indptr[r], indptr[r + 1]):
            denom += abs(np.float64(vals[e]))
        if denom == 0.0:
            continue
        push = (infl[t] + w[t]) / denom
        if push == 0.0:
            continue
        for e in range(indptr[r], indptr[r + 1]):
            infl[cols[e]] += push * abs(np.float64(vals[e]))


@njit(cache=True)
def _cuts(blk, threshold):
    """Per row of a dense block [b, n]: entries with |w| ≤ cut are dropped (threshold · max|row|; 0: only zeros)."""
    b, n = blk.shape
    cut = np.zeros(b)
    if threshold > 0:
        for i in range(b):
            m = 0.0
            for j in range(n):
                a = abs(np.float64(blk[i, j]))
                if a > m:
                    m = a
            cut[i] = threshold * m
    return cut


@njit(cache=True)
def _fill(blk, cut, cols, vals, start):
    """Write the kept entries of each row (columns ascending) into cols/vals from ``start`` on. Returns
    the block's local indptr [b+1] and the dropped absolute mass per row (float64)."""
    b, n = blk.shape
    indptr = np.zeros(b + 1, dtype=np.int64)
    dropped = np.zeros(b)
    e = start
    for i in range(b):
        for j in range(n):
            v = blk[i, j]
            a = abs(np.float64(v))
            if a > cut[i]:
                if e >= cols.shape[0]:
                    raise ValueError("row store capacity exceeded")
                cols[e] = j
                vals[e] = v
                e += 1
            else:
                dropped[i] += a
        indptr[i + 1] = e - start
    return indptr, dropped


@njit(cache=True)
def _compress(blk, threshold):
    """CSR of a dense block [b, n] in new arrays (int32 columns): per row, the entries with
    |w| > threshold · max|row| (threshold 0: the nonzero ones), and the dropped absolute mass per row."""
    cut = _cuts(blk, threshold)
    b, n = blk.shape
    nnz = 0
    for i in range(b):
        for j in range(n):
            if abs(np.float64(blk[i, j])) > cut[i]:
                nnz += 1
    cols = np.empty(nnz, dtype=np.int32)
    vals = np.empty(nnz, dtype=blk.dtype)
    indptr, dropped = _fill(blk, cut, cols, vals, 0)
    return indptr, cols, vals, dropped


@njit(cache=True)
def _place(dst_indptr, new_rows, src_indptr, src_cols, src_vals, cols, vals):
    """Copy each source row r's entries into destination row new_rows[r]'s slots."""
    for r in range(len(new_rows)):
        s0, s1 = src_indptr[r], src_indptr[r + 1]
        d0 = dst_indptr[new_rows[r]]
        for k in range(s1 - s0):
            cols[d0 + k] = src_cols[s0 + k]
            vals[d0 + k] = src_vals[s0 + k]


def _buffer(n: int, dtype, prefault: bool) -> np.ndarray:
    """An uninitialised [n] array; ``prefault``: its pages mapped at once (Linux MAP_POPULATE). First
    touch of fresh memory page by page was the largest single cost of a 32-token exact graph here
    (4.3 GB: 12.6 s of 96 s, vs ~1 s faulted in bulk)."""
    nbytes = n * np.dtype(dtype).itemsize
    flags = getattr(mmap, "MAP_POPULATE", None)
    if not prefault or flags is None or nbytes == 0:
        return np.empty(n, dtype=dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    return np.frombuffer(m, dtype=dtype, count=n)  # the array keeps the mapping alive


@dataclass(eq=False)
class _Block:
    targets: np.ndarray  # [b] int64 node ids
    indptr: np.ndarray  # [b+1] int64
    cols: np.ndarray  # [nnz] int32
    vals: np.ndarray  # [nnz]
    order: np.ndarray  # [b] local rows, target layer descending (the sweep order within this block)
    layer: np.ndarray  # [b] target layer (L for logits), matching ``order``


class RowStore:
    """Rows of an attribution in progress. ``layer_of[node]`` is a node's layer for the sweep order
    (logits: n_layers; sources without rows: anything).

    ``capacity`` (an upper bound of the entries to be stored, e.g. Σ over rows of the sources in each
    row's causal cone): rows must then come in ascending node order, and they are written straight into
    one preallocated CSR (the graph's own layout) that :meth:`assemble` hands over without
    a copy when every row is kept and no column is folded. Only the entries written are ever touched, so
    an overestimated capacity costs address space, not memory."""

    def __init__(self, n_nodes: int, threshold: float, dtype: np.dtype, layer_of: np.ndarray,
                 capacity: int | None = None) -> None:
        self.n, self.threshold, self.dtype = n_nodes, threshold, dtype
        self.layer_of = np.asarray(layer_of, dtype=np.int64)
        self.blocks: list[_Block] = []
        self.remainder = np.zeros(n_nodes)
        self.capacity = capacity
        if capacity is not None:
            # exact rows fill their causal cones almost to the entry (capacity/written 1.002 measured at
            # 32 tokens), so the buffer is faulted in up front, in bulk, where it will all be written
            prefault = threshold == 0
            self._cols = _buffer(int(capacity), index_dtype(n_nodes), prefault)
            self._vals = _buffer(int(capacity), dtype, prefault)
            self._end, self._last = 0, -1

    def add(self, targets: np.ndarray, block: Tensor) -> None:
        """Store rows ``block`` [b, n_src] (columns are node ids 0..n_src−1) of nodes ``targets``."""
        blk = np.ascontiguousarray(block.detach().to("cpu", torch.float64 if self.dtype == np.float64 else torch.float32).numpy())
        targets = np.asarray(targets, dtype=np.int64)
        if self.capacity is None:
            indptr, cols, vals, dropped = _compress(blk, self.threshold)
        else:
            if targets[0] <= self._last or np.any(np.diff(targets) <= 0):
                raise ValueError(f"a store with a capacity takes rows in ascending node order; got {targets[:4]}… after {self._last}")
            indptr, dropped = _fill(blk, _cuts(blk, self.threshold), self._cols, self._vals, self._end)
            cols, vals = self._cols[self._end : self._end + indptr[-1]], self._vals[self._end : self._end + indptr[-1]]
            self._end += int(indptr[-1])
            self._last = int(targets[-1])
        self.remainder[targets] += dropped
        lay = self.layer_of[targets]
        order = np.argsort(-lay, kind="stable")
        self.blocks.append(_Block(targets, indptr, cols, vals, order, lay[order]))

    def influence(self, w: np.ndarray) -> np.ndarray:
        """Influence on the logits of every node through the rows stored so far: exact on that partial
        DAG. One sweep, targets by layer descending (a source's rows are all at lower layers)."""
        infl = np.zeros(self.n)
        w = np.asarray(w, dtype=np.float64)
        top = max((int(b.layer[0]) for b in self.blocks if len(b.layer)), default=-1)
        for l in range(top, -1, -1):
            for b in self.blocks:
                lo, hi = np.searchsorted(-b.layer, [-l, -l + 1])  # rows of this block at layer l
                if hi > lo:
                    _push_rows(infl, w, b.targets, b.indptr, b.cols, b.vals, self.remainder, b.order[lo:hi])
        return infl

    def assemble(self, keep: np.ndarray, col_map: np.ndarray) -> Adjacency:
        """CSR over the kept nodes (renumbered in order); source column j becomes ``col_map[j]``
        (duplicates summed: unselected features fold into their error node).

        Consumes the store (each block is freed once merged), so the peak is the merged rows (8 bytes an
        entry) plus the CSR being filled (8 bytes an entry), not the rows held twice."""
        keep = np.asarray(keep, dtype=bool)
        new_index = np.cumsum(keep) - 1
        n_new = int(keep.sum())
        cmap = new_index[col_map].astype(np.int64)
        identity = bool(np.array_equal(col_map, np.arange(self.n)))
        col_dt = index_dtype(n_new)
        if self.capacity is not None and identity and keep.all():  # the rows are the CSR already
            counts = np.zeros(self.n, dtype=np.int64)
            for b in self.blocks:
                counts[b.targets] = np.diff(b.indptr)
            self.blocks = []
            return Adjacency(np.r_[0, np.cumsum(counts)], self._cols[: self._end], self._vals[: self._end], self.n,
                             self.remainder.astype(self.dtype))
        counts = np.zeros(n_new, dtype=np.int64)
        parts = []  # per block: new row of each kept row, its local CSR (indptr, columns, values)
        while self.blocks:
            b = self.blocks.pop(0)
            rows_kept = keep[b.targets]
            if not rows_kept.any():
                continue
            if identity and rows_kept.all():  # the exact graph: the block's CSR is used as it is
                new_rows, sub = new_index[b.targets], (b.indptr, b.cols, b.vals.astype(self.dtype, copy=False))
            else:
                r = np.repeat(np.arange(len(b.targets), dtype=np.int32), np.diff(b.indptr))
                m = rows_kept[r]
                r, cc, vv = r[m], cmap[b.cols[m]], b.vals[m]
                del m, b.cols, b.vals
                if not identity:  # merge duplicate (row, column) pairs
                    key = r.astype(np.int64) * np.int64(n_new) + cc
                    key, inv = np.unique(key, return_inverse=True)
                    vv = np.bincount(inv, weights=vv, minlength=len(key))
                    r, cc = (key // n_new).astype(np.int32), key % n_new
                    nz = vv != 0
                    r, cc, vv = r[nz], cc[nz], vv[nz]
                local = np.flatnonzero(rows_kept)
                per_row = np.bincount(r, minlength=len(b.targets))[local]
                new_rows = new_index[b.targets[local]]
                sub = (np.r_[0, np.cumsum(per_row)], cc.astype(col_dt), vv.astype(self.dtype))
            counts[new_rows] = np.diff(sub[0])
            parts.append((new_rows, sub))
        indptr = np.zeros(n_new + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        # np.empty, not np.zeros: every slot is written below, and on Linux numpy's huge-page advice on
        # a calloc'ed array made first touch ~20x slower here (4.8 GB: 11.3 s vs 0.5 s)
        cols = np.empty(int(indptr[-1]), dtype=col_dt)
        vals = np.empty(int(indptr[-1]), dtype=self.dtype)
        while parts:  # each part's rows go to their slots
            new_rows, (p_indptr, p_cols, p_vals) = parts.pop(0)
            _place(indptr, new_rows.astype(np.int64), p_indptr, p_cols, p_vals, cols, vals)
        return Adjacency(indptr, cols, vals, n_new, self.remainder[keep].astype(self.dtype))
