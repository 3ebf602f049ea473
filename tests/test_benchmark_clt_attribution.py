"""benchmarks/clt_attribution.py end to end on the embedded default model, at a tiny size: both cases run
in their own processes and the JSON holds one result per (kind, length) with equal active features."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_clt_attribution_benchmark_runs_both_kinds(default_lm, tmp_path):
    out = tmp_path / "clt.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "clt_attribution.py"), "--tokens", "3",
                          "--n-features", "32", "--k", "2", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads(out.read_text())
    assert [(r["kind"], r["tokens"]) for r in d["results"]] == [("per-layer", 3), ("cross-layer", 3)]
    assert all("error" not in r for r in d["results"]), d["results"]
    per, clt = d["results"]
    assert per["active_features"] == clt["active_features"] > 0
    assert clt["contraction_gflop"] > per["contraction_gflop"]  # a CLT feature writes to every later layer
    assert len(d["load_average_before"]) == 3 and "| 3 |" in res.stdout
