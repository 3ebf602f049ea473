"""A numba kernel of the trainer's sparse step (docs/design.md §9), a faster equal of torch ops:
:func:`bucket_order`, a stable counting sort of bucket ids — the order and the CSR row pointer that
``_scatter_rows`` built with ``torch.argsort(stable=True)`` and ``bincount``, in one linear pass instead of
a sort. Checked against those torch ops in tests/test_transcoders_kernels.py.
"""

from __future__ import annotations

import numpy as np

from sparsetrace._numba import kernel

__all__ = ["bucket_order"]


@kernel
def bucket_order(keys, n_buckets):
    """keys int64 [n] in [0, n_buckets) → (order [n], crow [n_buckets + 1]): ``order`` lists the positions
    bucket by bucket, in their original order within a bucket (a stable sort); ``crow[b]`` is where
    bucket b starts in it."""
    n = keys.shape[0]
    crow = np.zeros(n_buckets + 1, np.int64)
    for i in range(n):
        crow[keys[i] + 1] += 1
    for b in range(n_buckets):
        crow[b + 1] += crow[b]
    fill = crow[:n_buckets].copy()
    order = np.empty(n, np.int64)
    for i in range(n):
        b = keys[i]
        order[fill[b]] = i
        fill[b] += 1
    return order, crow
