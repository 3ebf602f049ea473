"""``kernel``: the one way this project jit-compiles a numba kernel, with an on-disk cache that is safe to
share (issue 20).

``numba.njit(cache=True)`` alone failed here in three ways:

* A cached kernel calling a *parallel* kernel crashed (SIGSEGV) whenever it was loaded from the cache
  (``_compress`` → ``_cuts``/``_fill_slots`` in tracer/_store.py, every time from a warm cache). Rule:
  **no kernel calls a parallel kernel**; :func:`parallel_callees` finds violations and a kernel that
  breaks the rule refuses to compile.
* numba's cache index is read, extended and rewritten without a lock (``IndexDataCacheFile.save``): two
  processes saving different signatures of one function at once can both take data file ``….1.nbc``,
  leaving an index entry that points at the other signature's machine code. Here every compile (which
  includes numba's cache load and save) holds an exclusive ``fcntl.flock`` on ``<folder>/.lock``;
  calls whose types were compiled already never reach it (the dispatcher's C fast path).
* The cache lived in ``__pycache__`` beside the source, shared by every thread count and CPU. Here it
  lives in :func:`cache_folder`, keyed by numba and Python version, the CPU (name + hashed feature
  string), ``NUMBA_NUM_THREADS`` and bounds checking (numba's own index key has neither).

A folder that cannot be written (e.g. under a regular file) or a failed save (a full disk) leaves the
kernel compiling in memory, with one logged warning per process; loading a damaged cache entry
recompiles. Nothing touches the disk before a kernel's first compile (no import-time side effects).

With ``NUMBA_DISABLE_JIT=1`` :func:`kernel` returns the plain Python function, as ``njit`` does.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import types as pytypes
from pathlib import Path
from typing import Callable

import llvmlite.binding as ll
import numba
from numba.core import caching, codegen, config
from numba.core.compiler_lock import global_compiler_lock
from numba.core.dispatcher import Dispatcher
from numba.core.registry import CPUDispatcher

__all__ = ["kernel", "cache_folder", "parallel_callees"]

_log = logging.getLogger(__name__)
_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        _log.warning("sparsetrace: %s; numba kernels compile in memory in this process", message)


def cache_root() -> Path:
    """``$SPARSETRACE_NUMBA_CACHE``, else ``$XDG_CACHE_HOME/sparsetrace/numba``, else
    ``~/.cache/sparsetrace/numba``."""
    env = os.environ.get("SPARSETRACE_NUMBA_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "sparsetrace" / "numba"


def cache_folder() -> Path:
    """This process's cache folder: one per numba version, Python version, CPU (name and a hash of the
    feature string numba compiles for), thread count and bounds-checking setting."""
    cpu = config.CPU_NAME or ll.get_host_cpu_name()
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    fhash = hashlib.sha256(features.encode()).hexdigest()[:12]
    name = (f"numba{numba.__version__}-py{sys.version_info[0]}.{sys.version_info[1]}-{cpu}-{fhash}"
            f"-t{config.NUMBA_NUM_THREADS}{'-boundscheck' if config.BOUNDSCHECK else ''}")
    return cache_root() / name


class _Locator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """numba's cache locator for our kernels only (numba's ``CACHE_DIR`` would move every library's
    cache, and falls back to ``__pycache__`` when the folder is not writable): the folder of
    :func:`cache_folder`, one subfolder per source folder as numba's own locators do."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(cache_folder() / self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self):
        return self._cache_path


class _CacheImpl(caching.CompileResultCacheImpl):
    _locator_classes = [_Locator]


class _Cache(caching.FunctionCache):
    """numba's function cache in our folder; a failed save disables it, a failed load is a miss."""

    _impl_class = _CacheImpl

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:  # a damaged index or data file: compile instead, and overwrite it
            _log.warning("sparsetrace: numba cache entry of %s unreadable (%s: %s); recompiling",
                         self._name, type(e).__name__, e)
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except OSError as e:  # full disk, quota, file size limit, folder removed or made read-only
            self.disable()
            _warn_once(f"cannot write the numba cache in {self.cache_path} ({e})")


class _FolderLock:
    """An exclusive ``flock`` on ``<cache folder>/.lock``, re-entrant within the process. Only taken
    under numba's (re-entrant) global compiler lock, which serialises this process's threads."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.depth = 0

    def acquire(self, folder: Path) -> None:
        if self.depth == 0:
            fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
        self.depth += 1

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the only descriptor drops the flock


_lock = _FolderLock()


class _KernelDispatcher(CPUDispatcher):
    """numba's CPU dispatcher whose compilations (cache load, compile, cache save) run under the
    cache folder's lock. The cache is set up at the first compile, not at decoration."""

    _cache_ready = False
    _cache_folder: Path | None = None

    def _setup_cache(self) -> None:
        bad = parallel_callees(self.py_func)
        if bad:  # refused at every call, not only the first
            raise TypeError(f"kernel {self.py_func.__qualname__} calls the parallel kernel(s) {', '.join(bad)}: "
                            "a cached kernel must not call a parallel one (it crashes when loaded from the "
                            "cache, issue 20); call them one after the other from Python")
        self._cache_ready = True
        try:
            self._cache = _Cache(self.py_func)
        except (RuntimeError, OSError) as e:
            # numba: "cannot cache function …: no locator available" when the folder cannot be made
            # or written (the locator's ensure_cache_path failed)
            _warn_once(f"cannot use the numba cache folder {cache_folder()} ({e})")
            return
        self._cache_folder = cache_folder()

    def compile(self, sig):
        with global_compiler_lock:
            if not self._cache_ready:
                self._setup_cache()
            if self._cache_folder is None:
                return super().compile(sig)
            try:
                _lock.acquire(self._cache_folder)
            except OSError as e:  # without the lock the cache is unsafe: compile in memory
                self._cache.disable()
                self._cache_folder = None
                _warn_once(f"cannot lock the numba cache folder ({e})")
                return super().compile(sig)
            try:
                return super().compile(sig)
            finally:
                _lock.release()


def kernel(fn: Callable | None = None, *, parallel: bool = False):
    """``@kernel`` / ``@kernel(parallel=True)``: ``numba.njit`` with the cache described in the module
    docstring. Returns a numba dispatcher (``.py_func``, ``.stats``, ``.targetoptions``), or ``fn``
    itself under ``NUMBA_DISABLE_JIT=1``."""

    def wrap(f: Callable):
        if config.DISABLE_JIT:
            return f
        # the options numba.njit passes (nopython; boundscheck None: NUMBA_BOUNDSCHECK decides)
        return _KernelDispatcher(py_func=f, locals={},
                                 targetoptions={"nopython": True, "boundscheck": None, "parallel": parallel})

    return wrap if fn is None else wrap(fn)


def parallel_callees(fn: Callable) -> list[str]:
    """The global names (and ``module.name`` attributes) in ``fn``'s code, nested code objects
    included, that are parallel numba dispatchers: in a kernel, any is a violation of "no cached kernel
    calls a parallel one"."""
    fn = getattr(fn, "py_func", fn)
    names: set[str] = set()
    stack = [fn.__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, pytypes.CodeType))
    found = []
    for name in sorted(names):
        obj = fn.__globals__.get(name)
        # ``module.kernel(...)``: the attribute's name is in co_names too
        attrs = ([(f"{name}.{a}", getattr(obj, a, None)) for a in sorted(names)]
                 if isinstance(obj, pytypes.ModuleType) else [])
        for label, o in [(name, obj), *attrs]:
            if isinstance(o, Dispatcher) and o.targetoptions.get("parallel"):
                found.append(label)
    return found
