"""The attribution engine's row store: computed rows kept sparse per batch, assembled into CSR at the end.

Rows arrive in batches (one per backward pass) and are kept as per-batch CSR blocks (int32 columns), so
memory is the stored entries, never a dense N×N matrix. With ``threshold > 0`` a row keeps the entries
with |w| > threshold · max|row| and the dropped absolute mass goes to the row's remainder: row
normalisation, hence Â, is unchanged for every kept entry (issue 8, item 5).

``influence`` (the row budget's ranking) is one sweep over the stored rows, targets by layer
descending, with the graphs' own kernels (``graphs/_kernels.py``: ``row_denominators``,
``influence_sweep``, the ones pruning uses), O(stored entries).

The store's other numba kernels are in ``_store_kernels.py`` (array-only, torch-free).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sparsetrace.graphs import Adjacency
from sparsetrace.graphs._kernels import influence_sweep, row_denominators
from sparsetrace.graphs.graph import index_dtype

from ._store_kernels import _compact, _compress, _cuts, _fill_slots, _place

__all__ = ["RowStore"]


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
    starts: np.ndarray  # [b] int64: row r's entries are cols/vals[starts[r] : ends[r]]
    ends: np.ndarray  # [b] int64
    cols: np.ndarray  # [nnz] int32 (with slots: the store's whole buffer)
    vals: np.ndarray  # [nnz]
    order: np.ndarray  # [b] local rows, target layer descending (the sweep order within this block)
    layer: np.ndarray  # [b] target layer (L for logits), matching ``order``


class RowStore:
    """Rows of an attribution in progress. ``layer_of[node]`` is a node's layer for the sweep order
    (logits: n_layers; sources without rows: anything).

    ``slots`` [n_nodes] (an upper bound of each node's stored entries, e.g. the sources in its row's
    causal cone; 0 for nodes without a row): every row then has its own slot in one preallocated buffer,
    rows may come in any order (each node's row once), and :meth:`assemble` closes the gaps in place
    and hands the buffer over as the graph's CSR, without a copy, when every row is kept and no column
    is folded. Only the entries written are ever touched, so an overestimated bound costs address space,
    not memory."""

    def __init__(self, n_nodes: int, threshold: float, dtype: np.dtype, layer_of: np.ndarray,
                 slots: np.ndarray | None = None) -> None:
        self.n, self.threshold, self.dtype = n_nodes, threshold, dtype
        self.layer_of = np.asarray(layer_of, dtype=np.int64)
        self.blocks: list[_Block] = []
        self.remainder = np.zeros(n_nodes)
        self.slots = None if slots is None else np.asarray(slots, dtype=np.int64)
        if self.slots is not None:
            if self.slots.shape != (n_nodes,) or np.any(self.slots < 0):
                raise ValueError(f"slots must be [{n_nodes}] non-negative counts")
            self._start = np.r_[0, np.cumsum(self.slots)]
            # exact rows fill their causal cones almost to the entry, so the buffer is faulted in up
            # front, in bulk, where it will all be written
            prefault = threshold == 0
            self._cols = _buffer(int(self._start[-1]), index_dtype(n_nodes), prefault)
            self._vals = _buffer(int(self._start[-1]), dtype, prefault)
            self._count = np.full(n_nodes, -1, dtype=np.int64)  # entries stored per row; −1: no row yet

    def add(self, targets: np.ndarray, block: Tensor, zero_from: np.ndarray | None = None, zero_to: int = 0) -> None:
        """Store rows ``block`` [b, n_src] (columns are node ids 0..n_src−1) of nodes ``targets``.
        ``zero_from`` [b] / ``zero_to`` (with slots): columns zero_from[i] ≤ j < zero_to of row i are
        known to be zero (sources a row's layer cannot see) and are not scanned."""
        blk = np.ascontiguousarray(block.detach().to("cpu", torch.float64 if self.dtype == np.float64 else torch.float32).numpy())
        targets = np.asarray(targets, dtype=np.int64)
        if self.slots is None:
            indptr, cols, vals, dropped = _compress(blk, self.threshold)
            starts, ends = indptr[:-1], indptr[1:]
        else:
            if np.any(self._count[targets] >= 0) or len(np.unique(targets)) < len(targets):
                raise ValueError(f"a store with slots takes each node's row once; got {targets[:4]}… again")
            starts, limits = self._start[targets], self._start[targets + 1]
            lo = np.full(len(targets), blk.shape[1], dtype=np.int64) if zero_from is None else np.asarray(zero_from, dtype=np.int64)
            counts, dropped = _fill_slots(blk, _cuts(blk, self.threshold), self._cols, self._vals, starts, limits,
                                          lo, int(zero_to))
            self._count[targets] = counts
            ends, cols, vals = starts + counts, self._cols, self._vals
        self.remainder[targets] += dropped
        lay = self.layer_of[targets]
        order = np.argsort(-lay, kind="stable")
        self.blocks.append(_Block(targets, starts, ends, cols, vals, order, lay[order]))

    def influence(self, w: np.ndarray) -> np.ndarray:
        """Influence on the logits of every node through the rows stored so far: exact on that partial
        DAG. One sweep, targets by layer descending (a source's rows are all at lower layers)."""
        infl = np.zeros(self.n)
        w = np.asarray(w, dtype=np.float64)
        every = np.ones(self.n, dtype=np.bool_)
        denom = [row_denominators(b.targets, b.starts, b.ends, b.cols, b.vals, self.remainder, every)
                 for b in self.blocks]
        top = max((int(b.layer[0]) for b in self.blocks if len(b.layer)), default=-1)
        for l in range(top, -1, -1):
            for b, d in zip(self.blocks, denom):
                lo, hi = np.searchsorted(-b.layer, [-l, -l + 1])  # rows of this block at layer l
                if hi > lo:
                    influence_sweep(infl, w, b.order[lo:hi], b.targets, b.starts, b.ends, b.cols, b.vals, d, every)
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
        if self.slots is not None:  # close the slots' gaps in place: the buffer becomes one CSR over all nodes
            counts = np.maximum(self._count, 0)
            end = _compact(self._cols, self._vals, self._start[:-1], counts)
            indptr = np.r_[0, np.cumsum(counts)]
            cols, vals = self._cols[:end], self._vals[:end]
            self.blocks, self._cols, self._vals = [], None, None
            if identity and keep.all():  # the rows are the graph's CSR already
                return Adjacency(indptr, cols, vals, self.n, self.remainder.astype(self.dtype))
            order = np.argsort(-self.layer_of, kind="stable")
            self.blocks = [_Block(np.arange(self.n), indptr[:-1], indptr[1:], cols, vals, order, self.layer_of[order])]
        counts = np.zeros(n_new, dtype=np.int64)
        parts = []  # per block: new row of each kept row, its local CSR (indptr, columns, values)
        while self.blocks:
            b = self.blocks.pop(0)
            rows_kept = keep[b.targets]
            if not rows_kept.any():
                continue
            b_indptr = np.append(b.starts, b.ends[-1])  # blocks here are contiguous CSR from 0
            if identity and rows_kept.all():  # the exact graph: the block's CSR is used as it is
                new_rows, sub = new_index[b.targets], (b_indptr, b.cols, b.vals.astype(self.dtype, copy=False))
            else:
                r = np.repeat(np.arange(len(b.targets), dtype=np.int32), np.diff(b_indptr))
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
