"""The attribution row store (tracer/_store.py) against dense references: the row budget's influence
sweep == the power series on the partial graph, and assembly (with folding of unselected features
into error nodes) == the dense matrix built and folded by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsetrace.tracer._store import RowStore

from reference.influence_naive import influence_power_series, normalise


def _random_partial_graph(seed: int, n_layers: int = 4, per_layer: int = 6, n_logits: int = 3):
    """Layered nodes (features by layer, then sources without rows, then logits) with random rows for
    a random subset of features and for every logit; rows read only lower layers."""
    rng = np.random.default_rng(seed)
    n_feat, n_other = n_layers * per_layer, 5
    n = n_feat + n_other + n_logits
    layer = np.r_[np.repeat(np.arange(n_layers), per_layer), np.full(n_other + n_logits, n_layers)]
    src_layer = np.r_[layer[:n_feat], np.full(n_other, -1), np.full(n_logits, n_layers + 1)]
    n_src = n_feat + n_other
    with_rows = np.r_[np.flatnonzero(rng.random(n_feat) < 0.6), np.arange(n_src, n)]
    A = np.zeros((n, n))
    for t in with_rows:
        lt = layer[t] if t < n_feat else n_layers
        ok = np.flatnonzero(src_layer[:n_src] < lt)
        cols = ok[rng.random(len(ok)) < 0.7]
        A[t, cols] = rng.normal(size=len(cols)) * rng.choice([1e-3, 1, 10], size=len(cols))
    return A, layer, with_rows, n_feat, n_src


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_influence_sweep_equals_power_series(seed, threshold):
    A, layer, with_rows, n_feat, n_src = _random_partial_graph(seed)
    n = A.shape[0]
    store = RowStore(n, threshold, np.float64, layer)
    rng = np.random.default_rng(100 + seed)
    for chunk in np.array_split(rng.permutation(with_rows), 3):  # batches in any order
        store.add(chunk, torch.as_tensor(A[chunk, :n_src]))
    w = np.zeros(n)
    w[n_src:] = rng.random(n - n_src)
    # reference: the thresholded matrix, its remainder, normalised, power series
    kept = A.copy()
    if threshold:
        mx = np.abs(A).max(1, keepdims=True)
        kept[np.abs(A) <= threshold * mx] = 0
    rem = np.abs(A).sum(1) - np.abs(kept).sum(1)
    np.testing.assert_allclose(store.remainder, rem, atol=1e-12)
    expected = influence_power_series(normalise(kept, rem), w)
    np.testing.assert_allclose(store.influence(w), expected, rtol=1e-12, atol=1e-15)
    assert expected[:n_feat].sum() > 0  # not vacuous


@pytest.mark.parametrize("seed", range(4))
def test_assemble_folds_unselected_into_their_error_node(seed):
    A, layer, with_rows, n_feat, n_src = _random_partial_graph(seed)
    n = A.shape[0]

    def filled() -> RowStore:
        store = RowStore(n, 0.0, np.float64, layer)
        for chunk in np.array_split(with_rows[::-1], 2):
            store.add(chunk, torch.as_tensor(A[chunk, :n_src]))
        return store

    store = filled()
    keep = np.ones(n, dtype=bool)
    keep[:n_feat] = np.isin(np.arange(n_feat), with_rows)
    col_map = np.arange(n)
    unsel = np.flatnonzero(~keep[:n_feat])
    col_map[unsel] = n_feat + unsel % 5  # "error nodes": the 5 row-less sources
    adj = store.assemble(keep, col_map)
    # reference: fold the columns by hand, then take the kept rows and columns
    F = np.zeros_like(A)
    for j in range(n):
        F[:, col_map[j]] += A[:, j]
    expected = F[np.ix_(keep, keep)]
    got = np.zeros_like(expected)
    r = np.repeat(np.arange(adj.n), np.diff(adj.indptr))
    got[r, adj.indices] = adj.data
    np.testing.assert_allclose(got, expected, atol=1e-12, rtol=0)
    assert np.all(np.diff(adj.indices)[np.diff(r) == 0] > 0)  # columns sorted, no duplicates in a row
    assert not store.blocks  # assembling consumes the store
    # identity map: the stored rows exactly
    adj = filled().assemble(np.ones(n, dtype=bool), np.arange(n))
    got = np.zeros((n, n))
    got[np.repeat(np.arange(n), np.diff(adj.indptr)), adj.indices] = adj.data
    np.testing.assert_array_equal(got, A * np.isin(np.arange(n), with_rows)[:, None])


@pytest.mark.parametrize("threshold", [0.0, 1e-3, 0.3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compress_equals_numpy_reference(threshold, dtype):
    from sparsetrace.tracer._store import _compress

    rng = np.random.default_rng(7)
    blk = (rng.normal(size=(9, 200)) * rng.choice([0.0, 1e-4, 1.0, 30.0], size=(9, 200))).astype(dtype)
    blk[3] = 0  # an empty row
    indptr, cols, vals, dropped = _compress(blk, threshold)
    a = np.abs(blk.astype(np.float64))
    keep = a > threshold * a.max(1, keepdims=True)
    r, c = np.nonzero(keep)
    np.testing.assert_array_equal(indptr, np.r_[0, np.cumsum(keep.sum(1))])
    np.testing.assert_array_equal(cols, c)
    np.testing.assert_array_equal(vals, blk[r, c])
    assert vals.dtype == dtype
    np.testing.assert_allclose(dropped, np.where(keep, 0, a).sum(1), rtol=1e-12)
    assert 0 < keep.sum() < blk.size and (threshold == 0 or dropped.sum() > 0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("threshold", [0.0, 0.05])
def test_store_with_slots_equals_the_block_store(seed, threshold):
    """Rows in any order written straight into their slots of one preallocated buffer (some slots
    larger than their rows, so assembly must close gaps): the same influence and the same assembled
    graph as the per-batch blocks, handed over without a copy, also when rows are folded or dropped;
    misuse is refused."""
    A, layer, with_rows, n_feat, n_src = _random_partial_graph(seed)
    n = A.shape[0]
    rng = np.random.default_rng(seed)
    nnz_row = (A[:, :n_src] != 0).sum(1)
    slots = np.zeros(n, dtype=np.int64)
    slots[with_rows] = nnz_row[with_rows] + rng.integers(0, 3, size=len(with_rows))
    blocks = RowStore(n, threshold, np.float32, layer)
    direct = RowStore(n, threshold, np.float32, layer, slots=slots)
    first = np.searchsorted(layer[:n_feat], layer)  # a row's own layer and above: known zeros
    for chunk in np.array_split(rng.permutation(with_rows), 4):  # not in node order
        blocks.add(chunk, torch.as_tensor(A[chunk, :n_src], dtype=torch.float32))
        direct.add(chunk, torch.as_tensor(A[chunk, :n_src], dtype=torch.float32), first[chunk], n_feat)
    w = np.zeros(n)
    w[n_src:] = 1.0
    np.testing.assert_allclose(direct.influence(w), blocks.influence(w), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(direct.remainder, blocks.remainder)
    for keep, col_map in [(np.ones(n, dtype=bool), np.arange(n)), _fold(layer, n_feat, n, rng)]:
        b_st, d_st = (_refill(st, A, with_rows, n_src, slots if st is direct else None, threshold) for st in (blocks, direct))
        a = b_st.assemble(keep, col_map)
        b = d_st.assemble(keep, col_map)
        for f in ("indptr", "indices", "data", "remainder"):
            np.testing.assert_array_equal(getattr(b, f), getattr(a, f), err_msg=f)
        if keep.all():
            assert b.indices.dtype == np.int32 and b.indices.base is not None  # a view of the store's buffer
    twice = RowStore(n, 0.0, np.float32, layer, slots=slots)
    twice.add(with_rows[-1:], torch.as_tensor(A[with_rows[-1:], :n_src], dtype=torch.float32))
    with pytest.raises(ValueError, match="each node's row once"):
        twice.add(with_rows[-1:], torch.as_tensor(A[with_rows[-1:], :n_src], dtype=torch.float32))
    small = RowStore(n, 0.0, np.float32, layer, slots=np.minimum(slots, 1))
    with pytest.raises(ValueError, match="capacity exceeded"):
        small.add(with_rows, torch.as_tensor(A[with_rows, :n_src], dtype=torch.float32))


def _refill(st, A, with_rows, n_src, slots, threshold):
    new = RowStore(st.n, threshold, np.float32, st.layer_of, slots=slots)
    for chunk in np.array_split(with_rows[::-1], 3):
        new.add(chunk, torch.as_tensor(A[chunk, :n_src], dtype=torch.float32))
    return new


def _fold(layer, n_feat, n, rng):
    """Keep about half the features; the others' columns fold into a kept node of their layer."""
    keep = np.ones(n, dtype=bool)
    drop = rng.choice(n_feat, size=n_feat // 2, replace=False)
    keep[drop] = False
    col_map = np.arange(n)
    col_map[drop] = n_feat  # the first non-feature node (an error node), always kept
    return keep, col_map


def test_row_bounds_hold_every_row_of_an_exact_graph():
    """The engine sizes the in-order store by each row's causal cone: no row of a real exact graph
    may exceed it, and the bound is tight (most cone entries are non-zero)."""
    from conftest import random_transcoders, tiny_lm
    from sparsetrace.tracer._contraction import candidates
    from sparsetrace.tracer.attribution import AttributionConfig, attribute
    from sparsetrace.tracer.replacement import ReplacementModel

    lm = tiny_lm("llama")
    ts = random_transcoders(lm)
    prompt = [3, 17, 5, 42, 8, 23, 11]
    g = attribute(prompt, lm, ts, config=AttributionConfig(dtype="float64"))
    cand = candidates(ReplacementModel(lm, ts).run(torch.tensor(prompt)), ts, len(g.logit_token))
    bound = cand.layout.cone_sizes()
    nnz = np.diff(g.adjacency.indptr)[: g.layout.n_features]
    assert np.all(nnz <= bound) and nnz.sum() > 0.5 * bound.sum()
    # leaving out the zero error vectors (position 0's) makes the bound exact here: no gaps to close
    run = ReplacementModel(lm, ts).run(torch.tensor(prompt))
    tight = cand.layout.cone_sizes(run.error.norm(dim=-1).numpy() > 0)
    assert np.all(nnz <= tight) and tight.sum() < bound.sum() and np.mean(nnz == tight) > 0.99


def test_an_exact_graph_larger_than_memory_is_refused_up_front(monkeypatch):
    """No row budget and no threshold: the rows fill their causal cones, so a capacity beyond RAM is an
    AttributionError naming the ways out before any row is computed; with a threshold the rows are
    stored as they come instead (the same graph as with room to spare)."""
    import sparsetrace.tracer.attribution as attr
    from conftest import random_transcoders, tiny_lm
    from sparsetrace.errors import AttributionError

    lm = tiny_lm("llama")
    ts = random_transcoders(lm)
    prompt = [3, 17, 5, 42, 8, 23, 11]
    roomy = attr.attribute(prompt, lm, ts, config=attr.AttributionConfig(dtype="float64", store_threshold=0.01))
    monkeypatch.setattr(attr, "_physical_memory", lambda: 1000)
    with pytest.raises(AttributionError, match=r"more than this machine's 0.0 GB of memory; set max_feature_nodes"):
        attr.attribute(prompt, lm, ts, config=attr.AttributionConfig(dtype="float64"))
    tight = attr.attribute(prompt, lm, ts, config=attr.AttributionConfig(dtype="float64", store_threshold=0.01))
    np.testing.assert_array_equal(tight.dense_adjacency(), roomy.dense_adjacency())
    np.testing.assert_array_equal(tight.adjacency.remainder, roomy.adjacency.remainder)
