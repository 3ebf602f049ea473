"""numba's on-disk cache of our kernels, always in fresh processes (issue 20): every kernel of graphs/
and tracer/ gives the plain-Python (``NUMBA_DISABLE_JIT=1``) results right after a cold compile, loaded
from a cache another process wrote, with another thread count, and after two processes compiled into one
empty cache at once; no kernel calls a parallel one (a cached kernel doing so crashed when loaded from
the cache); an unwritable folder or a full disk costs the cache, with one warning, never the result. The
kernel parity tests also run with ``NUMBA_BOUNDSCHECK=1`` and with ``NUMBA_DISABLE_JIT=1``.

The processes run ``tests/_numba_probe.py`` with ``SPARSETRACE_NUMBA_CACHE`` in a temporary folder; two
at a time where they are independent, so that the file stays near a minute and a half on two cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "_numba_probe.py"
PARALLEL = ("_cuts", "_kept_per_row", "_fill_slots")
WARNING = "numba kernels compile in memory in this process"
TIMEOUT = 300


def _env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(SPARSETRACE_NUMBA_CACHE=str(cache), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


class _Run:
    """One probe process: start now, ``result()`` waits and reads its report and results."""

    def __init__(self, out: Path, cache: Path, *flags: str, **env: str) -> None:
        self.out = out
        self.proc = subprocess.Popen([sys.executable, str(PROBE), str(out), *flags], cwd=ROOT, env=_env(cache, **env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self):
        stdout, stderr = self.proc.communicate(timeout=TIMEOUT)
        assert self.proc.returncode == 0, f"probe exited {self.proc.returncode}:\n{stdout}\n{stderr}"
        report = json.loads((self.out / "report.json").read_text())
        with np.load(self.out / "results.npz") as z:
            results = dict(z)
        return report, results, stderr


def _default_threads() -> int:
    """numba's thread count in a probe (its environment has no NUMBA_* variables unless a test sets one)."""
    return numba.config.NUMBA_DEFAULT_NUM_THREADS


def _assert_same_results(got: dict, ref: dict) -> None:
    assert got.keys() <= ref.keys() and got
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=0, err_msg=k)
        assert got[k].dtype == ref[k].dtype, k


def _cache_files(report: dict) -> dict[str, tuple[int, int]]:
    """Per kernel of the report: (index files, data files) in its cache folder."""
    out = {}
    for name, k in report["kernels"].items():
        files = [f.name for f in Path(k["cache_path"]).iterdir() if re.match(rf"[^.]+\.{name}-\d+\.", f.name)]
        out[name] = (sum(f.endswith(".nbi") for f in files), sum(f.endswith(".nbc") for f in files))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The plain-Python reference, a cold compile into an empty cache, then at once: a second process
    on that cache (``--foreign-lock``) and one with another thread count on the same cache root."""
    base = tmp_path_factory.mktemp("numba")
    cache = base / "cache"
    ref = _Run(base / "ref", cache, NUMBA_DISABLE_JIT="1")
    cold = _Run(base / "cold", cache)
    out = {"cache": cache, "ref": ref.result()[1], "cold": cold.result()}
    warm = _Run(base / "warm", cache, "--foreign-lock")
    other = (_Run(base / "threads", cache, "--only", ",".join(PARALLEL), "--dtypes", "float32", NUMBA_NUM_THREADS="1")
             if _default_threads() > 1 else None)
    out["warm"] = warm.result()
    out["threads"] = other.result() if other else None
    return out


@pytest.fixture(scope="module", autouse=True)
def parity_runs(request, tmp_path_factory):
    """The kernel parity test files in two background pytest processes, started first (they take the
    longest) and collected by :func:`test_parity_tests_pass_with_boundscheck_and_without_jit`: with
    ``NUMBA_BOUNDSCHECK=1`` in a fresh cache (numba's index key ignores bounds checking; our folder
    name does not), and with ``NUMBA_DISABLE_JIT=1``."""
    if not any(item.name == test_parity_tests_pass_with_boundscheck_and_without_jit.__name__
               for item in request.session.items):
        yield {}  # deselected (-k)
        return
    base = tmp_path_factory.mktemp("parity")
    prune, store = "tests/test_graphs_prune.py", "tests/test_tracer_store.py"
    procs = {}
    # without the JIT only the graph kernels' file: the store kernels run as plain Python in every
    # probe's reference run already (and test_tracer_store.py's attribution tests are slow that way)
    for name, files, extra in [("boundscheck", [prune, store], {"NUMBA_BOUNDSCHECK": "1"}),
                               ("nojit", [prune], {"NUMBA_DISABLE_JIT": "1"})]:
        procs[name] = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                                       cwd=ROOT, env=_env(base / name, **extra), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_cold_compile_gives_the_plain_python_results_and_writes_the_cache(runs):
    report, results, stderr = runs["cold"]
    assert set(report["kernels"]) == {*PARALLEL, "_compact", "_place", "reverse_topological_order",
                                      "row_denominators", "influence_sweep", "edge_scores", "prune_to_fixed_point",
                                      "induced_entries", "bucket_order"}
    _assert_same_results(results, runs["ref"])
    assert set(results) == set(runs["ref"])
    for name, k in report["kernels"].items():
        assert k["hits"] == 0 and k["misses"] == k["signatures"] >= 1, name
        assert k["parallel"] == (name in PARALLEL), name
        assert k["cache_path"].startswith(report["folder"])
    # one index per kernel, one data file per signature, in the keyed folder under our root
    assert _cache_files(report) == {n: (1, k["signatures"]) for n, k in report["kernels"].items()}
    folder = Path(report["folder"])
    assert folder.parent == runs["cache"] and (folder / ".lock").is_file()
    assert folder.name.startswith(f"numba{numba.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}-")
    assert re.search(rf"-[0-9a-f]{{12}}-t{_default_threads()}$", folder.name), folder.name
    assert "Warning" not in stderr and WARNING not in stderr


def test_second_process_loads_every_kernel_from_the_cache_without_the_lock(runs):
    cold, (report, results, stderr) = runs["cold"][0], runs["warm"]
    assert report["folder"] == cold["folder"]
    for name, k in report["kernels"].items():
        assert k["misses"] == 0 and k["hits"] == k["signatures"] >= 1, name
    _assert_same_results(results, runs["ref"])
    assert set(results) == set(runs["ref"])
    # calls with types compiled already went straight to the dispatcher while another descriptor held
    # the folder lock (a call that took the lock would have hung until the alarm)
    assert report["foreign_lock_s"] < 10
    assert stderr == ""


def test_another_thread_count_uses_another_folder(runs):
    if runs["threads"] is None:
        pytest.skip("one CPU: no other thread count to try")
    cold, (report, results, _) = runs["cold"][0], runs["threads"]
    assert report["folder"] != cold["folder"] and report["folder"].endswith("-t1")
    assert Path(report["folder"]).parent == Path(cold["folder"]).parent
    for name, k in report["kernels"].items():
        assert k["hits"] == 0 and k["misses"] == k["signatures"], name  # nothing from the default-thread folder
    assert _cache_files(report) == {n: (1, k["signatures"]) for n, k in report["kernels"].items()}
    _assert_same_results(results, runs["ref"])


def test_two_processes_compiling_into_one_empty_cache_at_once(runs, tmp_path):
    """Each compiles the signatures in another order (float32 first / float64 first): numba's index
    update is not atomic across processes, so without the folder lock both could take data file
    ``….1.nbc`` for different signatures. With it, their compilations never overlap in time, every
    signature has its own data file, and a third process loads them all and computes the same."""
    cache = tmp_path / "cache"
    a = _Run(tmp_path / "a", cache, "--dtypes", "float32,float64")
    b = _Run(tmp_path / "b", cache, "--dtypes", "float64,float32")
    (ra, res_a, _), (rb, res_b, _) = a.result(), b.result()
    _assert_same_results(res_a, runs["ref"])
    _assert_same_results(res_b, runs["ref"])
    assert ra["intervals"] and rb["intervals"]
    for a0, a1 in ra["intervals"]:
        for b0, b1 in rb["intervals"]:
            assert a1 <= b0 or b1 <= a0, f"compilations overlapped: {(a0, a1)} and {(b0, b1)}"
    third, res_c, stderr = _Run(tmp_path / "c", cache).result()
    for name, k in third["kernels"].items():
        assert k["misses"] == 0 and k["hits"] == k["signatures"], name
    assert _cache_files(third) == {n: (1, k["signatures"]) for n, k in third["kernels"].items()}
    _assert_same_results(res_c, runs["ref"])
    assert set(res_c) == set(runs["ref"]) and stderr == ""


def test_no_kernel_calls_a_parallel_kernel(runs, tmp_path):
    """The crash of issue 20: ``_compress``, a cached kernel calling the parallel ``_cuts`` and
    ``_fill_slots``, segfaulted whenever it was loaded from the cache. Every kernel of the repo is a
    ``sparsetrace._numba.kernel`` (no bare njit), none refers to a parallel kernel, and one that does
    refuses to compile."""
    report = runs["cold"][0]
    assert report["discovered"] == sorted(report["kernels"])  # the probe calls every kernel there is
    assert report["parallel_callees"].keys() == report["kernels"].keys()
    assert not any(report["parallel_callees"].values()), report["parallel_callees"]
    decorated = set()
    for path in [*ROOT.glob("graphs/*.py"), *ROOT.glob("tracer/*.py"), *ROOT.glob("transcoders/*.py"),
                 *ROOT.glob("sparsetrace_pkg/*.py"), *ROOT.glob("cli/*.py"), *ROOT.glob("benchmarks/*.py")]:
        src = path.read_text()
        if path.name != "_numba.py":
            assert not re.search(r"\bnjit\b|numba\.jit|@jit\b|\bcache=True", src), f"{path}: not a _numba.kernel"
        decorated |= set(re.findall(r"^@kernel(?:\(parallel=(?:True|False)\))?\ndef (\w+)", src, re.M))
    assert decorated == set(report["kernels"])
    bad = tmp_path / "bad_kernels.py"
    bad.write_text(textwrap.dedent("""
        import numpy as np
        from numba import prange
        from sparsetrace._numba import kernel, parallel_callees

        @kernel(parallel=True)
        def inner(x):
            for i in prange(len(x)):
                x[i] += 1.0

        @kernel
        def outer(x):
            inner(x)

        assert parallel_callees(outer) == ["inner"] and parallel_callees(inner) == []
        try:
            outer(np.zeros(3))
        except TypeError as e:
            assert "must not call a parallel one" in str(e), e
            print("refused")
    """))
    out = subprocess.run([sys.executable, str(bad)], cwd=tmp_path, env=_env(tmp_path / "cache"), capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert out.returncode == 0 and out.stdout.strip() == "refused", out.stderr


def test_an_unusable_cache_costs_the_cache_not_the_result(runs, tmp_path):
    """A folder that cannot be created (it lies under a regular file: numba finds "no locator"), every
    write failing (file size limit 0, as on a full disk: the save's OSError), and data files failing
    with ENOSPC after the index was written (a later process then finds an index entry without its data
    file): each time the right results, exit 0 and one warning line, never a crash."""
    (tmp_path / "file").write_text("")
    only = ["--only", "reverse_topological_order,row_denominators,_place", "--dtypes", "float64"]
    cases = {
        "unwritable": _Run(tmp_path / "o1", tmp_path / "file" / "cache", *only),
        "fsize0": _Run(tmp_path / "o2", tmp_path / "full", *only, "--fsize0"),
        "enospc": _Run(tmp_path / "o3", tmp_path / "enospc", *only, "--enospc-data"),
    }
    messages = {"unwritable": "cannot use the numba cache folder", "fsize0": "cannot write the numba cache",
                "enospc": "No space left on device"}
    for name, run in cases.items():
        report, results, stderr = run.result()
        _assert_same_results(results, runs["ref"])
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and WARNING in lines[0] and messages[name] in lines[0], (name, stderr)
        assert {k["misses"] for k in report["kernels"].values()} == {1}, name
        if name == "unwritable":
            assert {k["cache_path"] for k in report["kernels"].values()} == {None}
    later, results, stderr = _Run(tmp_path / "o4", tmp_path / "enospc", *only).result()
    assert stderr == "" and {k["misses"] for k in later["kernels"].values()} == {1}
    _assert_same_results(results, runs["ref"])
    assert _cache_files(later) == {n: (1, 1) for n in later["kernels"]}  # the entries now complete


def test_parity_tests_pass_with_boundscheck_and_without_jit(parity_runs):
    for name, p in parity_runs.items():
        out, _ = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, f"{name}:\n{out[-3000:]}"
        last = out.strip().splitlines()[-1]
        assert re.search(r"\b\d+ passed\b", last) and not re.search(r"failed|error", last), out[-3000:]
