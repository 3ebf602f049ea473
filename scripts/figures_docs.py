#!/usr/bin/env python3
"""Rebuild the pictures of docs/figures.md: for each prompt, its trace (default model, shipped set,
labels from feature statistics), the default figure at 7 in and 3.3 in, the hand-made spec figure
(docs/figures/<slug>.spec.yaml) and a viewer screenshot at 1280×800 in headless chromium.

    python scripts/figures_docs.py --feature-stats runs/feature-stats-v1            # trace + draw
    python scripts/figures_docs.py --feature-stats runs/feature-stats-v1 --no-trace # redraw only

Traces go to out/docs/<slug>/ (not committed); PNGs are written small (palette, 150 dpi).
Needs `make model`. The statistics folder is made first by
`.venv/bin/sparsetrace corpus --out runs/corpus-smollm2` and then
`.venv/bin/sparsetrace features stats --corpus runs/corpus-smollm2 --out runs/feature-stats-v1 --n-sequences 640`
(see `features stats --help`); without --feature-stats the labels come from the token lens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "figures"
OUT = ROOT / "out" / "docs"
PROMPTS = {
    "capital-of-france": "The capital of France is",
    "ioi": "When John and Mary went to the store, John gave a drink to",
    "opposite": "The opposite of hot is",
}
sys.path.insert(0, str(ROOT / "tests"))


def sparsetrace(*args: str) -> str:
    exe = Path(sys.executable).with_name("sparsetrace")
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sparsetrace {' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def small_png(src: Path, dst: Path, width: int | None = None) -> None:
    """A palette PNG (a few times smaller than RGB), optionally scaled to ``width`` pixels."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    if width is not None and img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(dst, optimize=True)


def screenshot(html: Path, dst: Path, click: str | None) -> None:
    from _browser import Browser

    with Browser(1280, 800) as b:
        b.open(html.resolve().as_uri())
        if click:
            b.click(f'.node[data-id="{click}"] .shape')
            b.click("#pin-toggle")
            b.click(f'.node[data-id="{click}"] .shape')
            b.mouse("mouseMoved", 3, 797)  # no hover: the selection's edges stand out
        raw = dst.with_suffix(".raw.png")
        b.screenshot(raw)
    small_png(raw, dst)
    raw.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--feature-stats", type=Path, default=None, help="a `sparsetrace features stats` folder")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--only", default=None, help="one slug")
    args = ap.parse_args()
    if args.feature_stats is not None and not args.feature_stats.is_dir():
        sys.exit(f"--feature-stats {str(args.feature_stats)!r} is not a folder; make it with "
                 "`.venv/bin/sparsetrace features stats --corpus runs/corpus-smollm2 --out runs/feature-stats-v1`")
    DOCS.mkdir(parents=True, exist_ok=True)
    timings = {}
    for slug, prompt in PROMPTS.items():
        if args.only and slug != args.only:
            continue
        folder = OUT / slug
        if not args.no_trace:
            extra = ["--feature-stats", args.feature_stats] if args.feature_stats else []
            t = time.perf_counter()
            out = json.loads(sparsetrace("trace", prompt, "--out", folder, *extra, "--json", "-q"))
            timings[slug] = {"total": time.perf_counter() - t, **out["seconds"], "figure": out["figure"]}
            print(slug, json.dumps(timings[slug]))
        tmp = folder / "docs"
        tmp.mkdir(exist_ok=True)
        # the default figure, two widths
        sparsetrace("render", folder, "--out", tmp / "default.png", "--dpi", "150", "--html", tmp / "graph.html", "-q")
        small_png(tmp / "default.png", DOCS / f"{slug}-default.png")
        sparsetrace("render", folder, "--out", tmp / "narrow.png", "--width", "3.3", "--dpi", "150", "-q")
        small_png(tmp / "narrow.png", DOCS / f"{slug}-default-narrow.png")
        # the hand-made figure
        spec = DOCS / f"{slug}.spec.yaml"
        if spec.is_file():
            report = json.loads(sparsetrace("figure", folder, "--spec", spec, "--out", tmp / "spec.png", "--out", tmp / "spec.pdf",
                                            "--dpi", "150", "--json", "-q"))
            small_png(tmp / "spec.png", DOCS / f"{slug}-spec.png")
            (DOCS / f"{slug}-spec.scores.json").write_text(json.dumps(
                {"scores": report["scores"], "graph_scores": report["graph_scores"], "nodes": report["nodes"],
                 "edges": report["edges"]}, indent=1) + "\n")
        # the viewer, with the default figure's strongest feature clicked
        fig = json.loads((folder / "graph.spec.json").read_text())
        click = next((n for n in fig["nodes"] if n.startswith("F")), None)
        screenshot(tmp / "graph.html", DOCS / f"{slug}-viewer.png", click)
        print("drew", slug)
    if timings:
        (OUT / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
