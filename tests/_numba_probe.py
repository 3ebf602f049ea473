"""Run by tests/test_numba_cache.py in fresh processes: call every numba kernel of graphs/, tracer/ and transcoders/
with small inputs, save the results and a report of what numba's cache did.

    python tests/_numba_probe.py OUT_DIR [--only NAME,…] [--dtypes float32,float64]
                                 [--fsize0] [--enospc-data] [--foreign-lock]

``OUT_DIR/results.npz``: every kernel output (``NUMBA_DISABLE_JIT=1`` gives the plain-Python ones).
``OUT_DIR/report.json``: ``jit``, ``folder`` (this process's cache folder), per kernel ``hits`` /
``misses`` / ``cache_path`` / ``parallel`` / ``signatures``, ``discovered`` (every kernel the two
modules define), ``parallel_callees`` (the rule of issue 20), ``intervals`` ([start, end] of every
cache load + compile + save, all of them inside the folder lock).

``--fsize0``: file size limit 0 (every cache write fails, like a full disk) during the calls.
``--enospc-data``: numba's data-file writes fail with ENOSPC after the index was written.
``--foreign-lock``: after the calls, hold the folder lock on another descriptor and call every kernel
again with the same types: they must not wait for the lock (an alarm fails the process otherwise).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import importlib.util
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
from numba.core import caching, config

from sparsetrace import _numba
from sparsetrace.graphs import _kernels as gk
from sparsetrace.transcoders import _select as sel  # torch-free: the package imports its names lazily


def _store_kernels():
    """``sparsetrace.tracer._store_kernels`` without running tracer/__init__.py, which imports torch and
    transformers (seconds in every probe). The same file, so the same cache entries as a normal import."""
    name = "sparsetrace.tracer._store_kernels"
    folder = importlib.util.find_spec("sparsetrace.tracer").submodule_search_locations[0]  # not executed
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "_store_kernels.py"))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


st = _store_kernels()

GRAPH_KERNELS = ("reverse_topological_order", "row_denominators", "influence_sweep", "edge_scores",
                 "prune_to_fixed_point", "induced_entries")
STORE_KERNELS = ("_cuts", "_kept_per_row", "_fill_slots", "_compact", "_place")
SELECT_KERNELS = ("bucket_order",)
KERNELS = {**{k: getattr(gk, k) for k in GRAPH_KERNELS}, **{k: getattr(st, k) for k in STORE_KERNELS},
           **{k: getattr(sel, k) for k in SELECT_KERNELS}}
MODULES = (gk, st, sel)


def _graph(rng, n: int = 12):
    """A random DAG in CSR (targets read lower node ids only), int32 columns."""
    rows, cols = [], []
    for t in range(1, n):
        src = np.flatnonzero(rng.random(t) < 0.5)
        rows += [t] * len(src)
        cols += list(src)
    indptr = np.r_[0, np.cumsum(np.bincount(np.array(rows, dtype=np.int64), minlength=n))].astype(np.int64)
    return indptr, np.array(cols, dtype=np.int32), n


def call_graph_kernels(dtype, only, out: dict) -> None:
    rng = np.random.default_rng(1)
    indptr, indices, n = _graph(rng)
    data = rng.normal(size=len(indices)).astype(dtype)
    rem = np.abs(rng.normal(size=n)) * 0.1
    mask = rng.random(n) < 0.8
    mask[-1] = True
    w = np.zeros(n)
    w[-2:] = [0.3, 0.7]
    tag = np.dtype(dtype).name
    order, emitted = gk.reverse_topological_order(indptr, indices, n)
    if "reverse_topological_order" in only:
        out["topo_order"], out["topo_emitted"] = order, np.int64(emitted)
    rows = np.arange(n, dtype=np.int64), indptr[:-1], indptr[1:]  # a CSR's rows (prune.csr_rows)
    denom = gk.row_denominators(*rows, indices, data, rem, mask)
    if "row_denominators" in only:
        out[f"denom_{tag}"] = denom
    if "influence_sweep" in only:
        infl = np.zeros(n)
        gk.influence_sweep(infl, w, order, *rows, indices, data, denom, mask)
        out[f"infl_{tag}"] = infl
        # the row store's use: rows of some targets, anywhere in a buffer, visited by layer descending
        targets = np.array([7, 6, 5], dtype=np.int64)
        starts, ends = np.array([0, 4, 6], dtype=np.int64), np.array([4, 6, 9], dtype=np.int64)
        cols = np.array([0, 1, 5, 6, 2, 3, 0, 1, 4], dtype=np.int32)
        vals = rng.normal(size=9).astype(dtype)
        every = np.ones(8, dtype=np.bool_)
        d = gk.row_denominators(targets, starts, ends, cols, vals, np.full(8, 0.05), every)
        pushed, w8 = np.zeros(8), np.r_[np.zeros(6), 0.4, 0.6]
        gk.influence_sweep(pushed, w8, np.arange(3, dtype=np.int64), targets, starts, ends, cols, vals, d, every)
        out[f"push_{tag}"] = pushed
        if "edge_scores" in only:
            out[f"scores_{tag}"] = gk.edge_scores(indptr, indices, data, denom, infl, w, mask)
    if "prune_to_fixed_point" in only:
        nodes, edges = mask.copy(), rng.random(len(indices)) < 0.6
        protected = np.zeros(n, dtype=np.bool_)
        protected[-2:] = True
        needs = np.ones(n, dtype=np.bool_)
        needs[:2] = False
        out["sweeps"] = np.int64(gk.prune_to_fixed_point(indptr, indices, nodes, edges, protected, needs))
        out["pruned_nodes"], out["pruned_edges"] = nodes, edges
    if "induced_entries" in only:
        out["sub_indptr"], out["entry"] = gk.induced_entries(indptr, indices, mask)


def call_store_kernels(dtype, only, out: dict) -> None:
    rng = np.random.default_rng(2)
    tag = np.dtype(dtype).name
    # issue 20's reproducer: from a warm cache this crashed every time while _compress was a cached
    # kernel calling the parallel _cuts/_fill_slots
    blk = rng.random((10, 1000), dtype=np.float32).astype(dtype)
    blk[rng.random(blk.shape) < 0.3] = 0
    blk[:, :5] *= 1e-6
    if {"_cuts", "_kept_per_row", "_fill_slots"} <= only:
        for thr in (0.0, 1e-4, 0.3):
            indptr, cols, vals, dropped = st._compress(blk, thr)
            a = np.abs(blk.astype(np.float64))
            keep = a > thr * a.max(1, keepdims=True)
            r, c = np.nonzero(keep)
            assert np.array_equal(indptr, np.r_[0, np.cumsum(keep.sum(1))]) and np.array_equal(cols, c)
            assert np.array_equal(vals, blk[r, c]) and vals.dtype == dtype and cols.dtype == np.int32
            assert np.allclose(dropped, np.where(keep, 0, a).sum(1), rtol=1e-12, atol=0)
            out[f"compress_{tag}_{thr}"] = np.r_[indptr, cols, vals.astype(np.float64), dropped]
    if "_fill_slots" in only:  # slots larger than the rows, a skipped column range
        cut = st._cuts(blk, 0.1)
        starts = np.arange(10, dtype=np.int64) * 800
        cols, vals = np.full(8000, -1, dtype=np.int32), np.zeros(8000, dtype=dtype)
        counts, dropped = st._fill_slots(blk, cut, cols, vals, starts, starts + 800,
                                         np.full(10, 600, dtype=np.int64), 900)
        out[f"slots_{tag}"] = np.r_[counts, cols, vals.astype(np.float64), dropped]
        if "_compact" in only:
            end = st._compact(cols, vals, starts, counts)
            out[f"compact_{tag}"] = np.r_[end, cols[:end], vals[:end].astype(np.float64)]
    if "_place" in only:
        src_indptr = np.array([0, 2, 5], dtype=np.int64)
        src_cols = np.array([1, 3, 0, 2, 4], dtype=np.int32)
        src_vals = rng.normal(size=5).astype(dtype)
        dst_indptr = np.array([0, 0, 3, 5], dtype=np.int64)
        cols, vals = np.full(5, -1, dtype=np.int32), np.zeros(5, dtype=dtype)
        st._place(dst_indptr, np.array([2, 1], dtype=np.int64), src_indptr, src_cols, src_vals, cols, vals)
        out[f"place_{tag}"] = np.r_[cols, vals.astype(np.float64)]


def call_select_kernels(only, out: dict) -> None:
    """The trainer's kernel in transcoders/_select.py (its inputs have one dtype)."""
    rng = np.random.default_rng(3)
    if "bucket_order" in only:
        out["bucket_order"], out["bucket_crow"] = sel.bucket_order(rng.integers(0, 7, size=50).astype(np.int64), 7)


def call_all(dtypes, only) -> dict:
    out: dict = {}
    for dtype in dtypes:
        call_graph_kernels(dtype, only, out)
        call_store_kernels(dtype, only, out)
    call_select_kernels(only, out)
    return out


def _log_intervals() -> list:
    """Wrap our cache's load/save (both run inside the folder lock) to record each compilation's span."""
    intervals, started = [], []
    load, save = _numba._Cache.load_overload, _numba._Cache.save_overload

    def timed_load(self, sig, ctx):
        t0 = time.time()
        res = load(self, sig, ctx)
        if res is not None:
            intervals.append((t0, time.time()))
        else:
            started.append(t0)
        return res

    def timed_save(self, sig, data):
        save(self, sig, data)
        intervals.append((started.pop(), time.time()))

    _numba._Cache.load_overload, _numba._Cache.save_overload = timed_load, timed_save
    return intervals


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", default=",".join(KERNELS))
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--fsize0", action="store_true")
    ap.add_argument("--enospc-data", action="store_true")
    ap.add_argument("--foreign-lock", action="store_true")
    args = ap.parse_args()
    only = set(args.only.split(","))
    dtypes = [np.dtype(d).type for d in args.dtypes.split(",")]
    jit = not config.DISABLE_JIT
    intervals = _log_intervals() if jit else []
    if args.enospc_data:
        def no_space(self, name, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        caching.IndexDataCacheFile._save_data = no_space
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if args.fsize0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, limit[1]))
    out = call_all(dtypes, only)
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    report = {"jit": jit, "folder": str(_numba.cache_folder()), "intervals": intervals, "kernels": {},
              "parallel_callees": {}}
    if jit:  # every kernel the two modules define, whether or not KERNELS lists it
        report["discovered"] = sorted(name for module in MODULES for name, obj in vars(module).items()
                                      if isinstance(obj, _numba._KernelDispatcher))
    for name in report.get("discovered", KERNELS):
        report["parallel_callees"][name] = _numba.parallel_callees(KERNELS[name])
    for name, k in KERNELS.items():
        if jit and name in only:
            s = k.stats
            report["kernels"][name] = {"hits": sum(s.cache_hits.values()), "misses": sum(s.cache_misses.values()),
                                       "cache_path": s.cache_path, "parallel": bool(k.targetoptions.get("parallel")),
                                       "signatures": len(k.signatures)}
    if args.foreign_lock:
        fd = os.open(_numba.cache_folder() / ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        signal.alarm(60)  # a call that waited for the lock would hang here
        t0 = time.time()
        again = call_all(dtypes, only)
        report["foreign_lock_s"] = time.time() - t0
        signal.alarm(0)
        os.close(fd)
        assert all(np.array_equal(again[k], out[k]) for k in out)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / "results.npz", **out)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
