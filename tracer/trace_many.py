"""Trace a prompt set: one model load per worker, local processes or a Dask cluster, a manifest, resume
(docs/design.md §15). Torch-free at import: workers import the tracing code.

Work is spread as tasks of one prompt each. A worker loads its :class:`~.pipeline.TraceSession` once
(through ``factory``, a picklable callable) and keeps it for every later prompt. Each task returns the
prompt's record and its folder's files as bytes; only the calling process writes: each prompt's
folder atomically (``OUT/<id>/``, the files ``sparsetrace trace`` writes) as soon as it is finished,
then ``manifest.json``. A prompt that fails (a target that is not one token, a field inside a token)
is recorded as failed with its one-line error and the others go on. Running again skips every prompt
recorded as done whose folder is complete and whose text and targets are unchanged; a manifest made
with other settings is refused (use another folder).

Why Dask rather than Ray: Dask distributed is pure Python (pip, no daemon or object store to set up),
a scheduler address is all a cluster needs, ``LocalCluster`` gives the same code path on one machine
for the tests, and ``as_completed`` returns each prompt as it finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from sparsetrace._atomic import atomic_folder, atomic_write_text
from sparsetrace.config import MANIFEST_FILE, TraceManyConfig
from sparsetrace.errors import ConfigError, FormatError, SparsetraceError

from .prompt_sets import PromptItem

__all__ = ["MANIFEST_VERSION", "run_prompt_set", "load_manifest", "done_items"]

MANIFEST_VERSION = 1
STATUSES = ("done", "failed")

# ---- the worker side ----------------------------------------------------------------------------------
_SESSIONS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _session(factory: Callable[[], Any], key: str) -> Any:
    """This process's session for ``key``, loaded on first use (one model load per worker)."""
    with _LOCK:
        if key not in _SESSIONS:
            _SESSIONS.clear()
            _SESSIONS[key] = factory()
        return _SESSIONS[key]


def _error_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, SparsetraceError) else f"{type(exc).__name__}: {text}"


def run_task(factory: Callable[[], Any], key: str, settings: Any, item: dict) -> dict:
    """One prompt on this worker: ``{"record": …, "files": {name: bytes}}`` or ``{"error": text}``.
    A failed prompt raises nothing: its error is returned so that the others go on."""
    from .pipeline import trace_item

    it = PromptItem.from_dict(item)
    t0 = time.perf_counter()
    try:
        session = _session(factory, key)
        record, files = trace_item(session, it, settings)
    except Exception as exc:  # noqa: BLE001 — recorded in the manifest, the run goes on
        where = f"line {it.line}: " if it.line else ""
        return {"error": where + _error_text(exc), "seconds": round(time.perf_counter() - t0, 3), "worker": _worker_name()}
    record["worker"] = _worker_name()
    return {"record": record, "files": files}


def _worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


def _init_process(threads: int) -> None:
    """Process-pool initializer: share the cores among the workers."""
    import torch

    torch.set_num_threads(threads)


# ---- manifest ------------------------------------------------------------------------------------------
def _fingerprint(item: PromptItem) -> str:
    blob = json.dumps([item.prompt, list(item.targets)], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_manifest(folder: str | Path) -> dict[str, Any] | None:
    """``OUT/manifest.json``, or None when there is none."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{str(path)!r} is not valid JSON ({exc.msg}); move it away to start over") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("prompts"), list):
        raise FormatError(f"{str(path)!r} is not a trace-many manifest (version {MANIFEST_VERSION})")
    return data


def done_items(folder: str | Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest entries of finished prompts whose folders hold every file."""
    root = Path(folder)
    out = []
    for e in manifest["prompts"]:
        if e.get("status") == "done" and all((root / e["id"] / f).is_file() for f in e.get("files", ["?"])):
            out.append(e)
    return out


def _entry(item: PromptItem) -> dict[str, Any]:
    return {"id": item.id, "line": item.line, "prompt": item.prompt, "targets": list(item.targets),
            "fields": dict(item.fields), "template": item.template, "fingerprint": _fingerprint(item),
            "status": "pending"}


class _Manifest:
    """The manifest of one run: entries in prompt-file order, written atomically after every prompt."""

    def __init__(self, folder: Path, items: Sequence[PromptItem], settings: dict, source: str) -> None:
        self.path = folder / MANIFEST_FILE
        self.folder = folder
        old = load_manifest(folder)
        if old is not None and old.get("settings") != settings:
            diff = sorted(k for k in set(settings) | set(old.get("settings") or {})
                          if settings.get(k) != (old.get("settings") or {}).get(k))
            raise ConfigError(f"--out {str(folder)!r} holds a run with other settings ({', '.join(diff)}); "
                              "use another --out folder, or the same settings to resume")
        kept = {e["id"]: e for e in done_items(folder, old)} if old is not None else {}
        self.entries = []
        for it in items:
            e = kept.get(it.id)
            self.entries.append(e if e is not None and e.get("fingerprint") == _fingerprint(it) else _entry(it))
        self.by_id = {e["id"]: e for e in self.entries}
        self.data = {"version": MANIFEST_VERSION, "prompts_file": source, "settings": settings,
                     "started": (old or {}).get("started") or _now()}

    def todo(self) -> list[str]:
        return [e["id"] for e in self.entries if e["status"] != "done"]

    def record(self, pid: str, result: dict) -> dict:
        e = self.by_id[pid]
        if "error" in result:
            e.update(status="failed", error=result["error"], seconds=result["seconds"], worker=result["worker"])
            for k in ("files", "scores", "top_logits", "graph", "pruned", "tokens", "positions"):
                e.pop(k, None)
        else:
            e.update(status="done", error=None, folder=pid, **result["record"])
        self.save()
        return e

    def summary(self) -> dict[str, int]:
        counts = {s: 0 for s in ("done", "failed", "pending")}
        for e in self.entries:
            counts[e["status"]] += 1
        return counts

    def save(self) -> None:
        self.data.update(updated=_now(), summary=self.summary(), prompts=self.entries)
        atomic_write_text(self.path, json.dumps(self.data, indent=1, ensure_ascii=False) + "\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---- executors --------------------------------------------------------------------------------------------
def _in_process(factory, key, settings, items: list[dict]) -> Iterator[tuple[str, dict]]:
    if items:
        _session(factory, key)  # here a session that cannot load is the command's error, not each prompt's
    for it in items:
        yield it["id"], run_task(factory, key, settings, it)


def _processes(factory, key, settings, items: list[dict], workers: int) -> Iterator[tuple[str, dict]]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools start is unsafe
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_process,
                             initargs=(threads,)) as pool:
        futures: dict[Future, str] = {pool.submit(run_task, factory, key, settings, it): it["id"] for it in items}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield futures[f], f.result()
        finally:
            for f in pending:
                f.cancel()


def connect(address: str, timeout: float):
    """A Dask client on the scheduler at ``address``; a one-line error when it cannot be reached."""
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError("--scheduler needs Dask distributed: pip install 'dask[distributed]'") from None
    try:
        return Client(address, timeout=f"{timeout}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ConfigError(f"--scheduler {address!r}: cannot reach a Dask scheduler there within {timeout:g} s "
                          f"({' '.join(str(exc).split())[:200]}); start one with `dask scheduler` and "
                          "`dask worker ADDRESS`") from None


def _dask(factory, key, settings, items: list[dict], address: str, timeout: float) -> Iterator[tuple[str, dict]]:
    from distributed import as_completed

    client = connect(address, timeout)
    try:
        futures = {client.submit(run_task, factory, key, settings, it, pure=False, key=f"trace-{it['id']}-{key[:8]}-{i}"): it["id"]
                   for i, it in enumerate(items)}
        with client.as_current():
            for f in as_completed(futures):
                yield futures[f], f.result()
    finally:
        client.close()


# ---- the run ------------------------------------------------------------------------------------------------
def run_prompt_set(
    items: Sequence[PromptItem],
    out_dir: str | Path,
    factory: Callable[[], Any],
    settings: Any,
    session_spec: dict,
    config: TraceManyConfig | None = None,
    scheduler: str | None = None,
    source: str = "",
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Trace ``items`` into ``out_dir`` (module docstring) and return the manifest.

    ``factory()`` loads a worker's session; ``session_spec`` (JSON) describes it and, with ``settings``
    (a :class:`~.pipeline.TraceSettings`), identifies the run: a folder holding a manifest made with
    other settings is refused. ``scheduler``: a Dask scheduler address (else ``config.workers`` local
    processes; 1 runs here)."""
    cfg = config or TraceManyConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a folder")
    run_settings = json.loads(json.dumps({**session_spec, **asdict(settings)}, default=str))
    key = hashlib.sha256(json.dumps(run_settings, sort_keys=True).encode()).hexdigest()
    if scheduler is not None:
        connect(scheduler, cfg.connect_timeout).close()  # fail before any folder is made
    out.mkdir(parents=True, exist_ok=True)
    man = _Manifest(out, items, run_settings, source)
    todo = set(man.todo())
    skipped = len(items) - len(todo)
    if skipped:
        say(f"resuming: {skipped} of {len(items)} prompts already done")
    man.save()
    jobs = [it.to_dict() for it in items if it.id in todo]
    if scheduler is not None:
        stream = _dask(factory, key, settings, jobs, scheduler, cfg.connect_timeout)
    elif cfg.workers > 1 and len(jobs) > 1:
        stream = _processes(factory, key, settings, jobs, min(cfg.workers, len(jobs)))
    else:
        stream = _in_process(factory, key, settings, jobs)
    for n, (pid, result) in enumerate(stream, 1):
        if "files" in result:
            with atomic_folder(out / pid) as tmp:
                for name, blob in result["files"].items():
                    (tmp / name).write_bytes(blob)
        e = man.record(pid, result)
        tail = (f"done in {e['seconds']:.1f} s" if e["status"] == "done" else f"FAILED: {e['error']}")
        say(f"[{n}/{len(jobs)}] {pid}: {tail}")
    return man.data
