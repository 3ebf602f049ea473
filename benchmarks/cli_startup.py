"""Benchmark: how long ``sparsetrace --help`` and ``sparsetrace COMMAND --help`` take, and whether they
import torch, for this checkout and (``--ref``) an older commit, side by side in one run.

Each measurement is a fresh ``python -c`` process that runs the command group on the arguments (as the
``sparsetrace`` script does), timed from the outside; the median of ``--repeat`` runs is reported. An
older commit is checked out into a temporary git worktree and imported through a folder of symlinks
that maps ``sparsetrace.*`` onto its sources (pyproject's package-dir), so both use this venv.

    python benchmarks/cli_startup.py                  # this checkout
    python benchmarks/cli_startup.py --ref 89b204b    # … beside the commit before the config module

Prints a table and writes ``benchmarks/results/cli_startup.json`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sparsetrace._atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = {"tracer": "tracer", "transcoders": "transcoders", "graphs": "graphs", "cli": "cli"}
ARGS = (["--help"], ["trace", "--help"], ["prune", "--help"], ["train", "--help"])
PROBE = (
    "import sys, time; t = time.perf_counter()\n"
    "from sparsetrace.cli._main import main\n"
    "try:\n    main({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
    "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', time.perf_counter() - t)\n"
)


def shim(tree: Path, into: Path) -> Path:
    """A folder whose ``sparsetrace`` package is ``tree``'s sources (symlinks), for PYTHONPATH."""
    pkg = into / "sparsetrace"
    pkg.mkdir(parents=True)
    for f in (tree / "sparsetrace_pkg").iterdir():
        (pkg / f.name).symlink_to(f)
    for name, folder in PACKAGES.items():
        (pkg / name).symlink_to(tree / folder)
    return into


def measure(pythonpath: Path | None, args: list[str], repeat: int) -> dict:
    env = None if pythonpath is None else {**os.environ, "PYTHONPATH": str(pythonpath)}
    walls, torch = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                           env=env, cwd=tempfile.gettempdir())
        walls.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr}")
        torch = r.stdout.split()[-2] == "TORCH"
    return {"args": args, "median_s": statistics.median(walls), "min_s": min(walls), "imports_torch": torch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default=None, help="an older commit to measure beside this checkout")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli_startup.json")
    a = ap.parse_args()
    if a.repeat < 1:
        ap.error(f"--repeat {a.repeat}; allowed: ≥ 1")
    trees: dict[str, Path | None] = {"this checkout": None}
    with tempfile.TemporaryDirectory() as tmp:
        if a.ref is not None:
            wt = Path(tmp) / "ref"
            r = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), a.ref],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"--ref {a.ref!r}: {r.stderr.strip()}")
            trees[a.ref] = shim(wt, Path(tmp) / "shim")
        try:
            rows = {name: [measure(path, list(args), a.repeat) for args in ARGS] for name, path in trees.items()}
        finally:
            if a.ref is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(Path(tmp) / "ref")])
    print(f"{'command':<24}" + "".join(f"{name:>28}" for name in rows))
    for i, args in enumerate(ARGS):
        cells = [f"{r[i]['median_s']:8.2f} s ({'torch' if r[i]['imports_torch'] else 'no torch'})" for r in rows.values()]
        print(f"{'sparsetrace ' + ' '.join(args):<24}" + "".join(f"{c:>28}" for c in cells))
    result = {"benchmark": "cli_startup", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
              "repeat": a.repeat, "trees": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
