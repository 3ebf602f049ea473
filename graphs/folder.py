"""A trace folder from an attributed graph (docs/design.md §15): pruning and scores, the compact figure,
and every file ``sparsetrace trace`` and ``trace-many`` write for one prompt. Torch-free: the graph is
already made; these are the steps after attribution that both commands share.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from sparsetrace._atomic import atomic_write, atomic_write_text, staged
from sparsetrace.config import FigureConfig

from . import records
from .records import labels_by_feature as labels_of

__all__ = ["labels_of", "slug_of", "prune_and_score", "default_title", "make_figure", "write_figure", "trace_figure",
           "write_graph_outputs", "record_validation"]


def slug_of(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in text.strip())
    return "-".join(p for p in keep.split("-") if p)[:60] or "graph"


def prune_and_score(graph, node_threshold: float | None, edge_threshold: float | None):
    """Prune ``graph``, store full and pruned scores in both, refresh both cards; returns the pruned
    graph and the :class:`~sparsetrace.graphs.prune.PruneResult`."""
    from sparsetrace.graphs.card import attach_card
    from sparsetrace.graphs.prune import apply_prune, prune
    from sparsetrace.graphs.scores import store_scores

    result = prune(graph, node_threshold, edge_threshold)
    store_scores(graph, result)
    pruned = apply_prune(graph, result)
    records.store_scores_record(pruned, records.scores_of(graph))
    records.mark_pruned(pruned)
    records.store_pruning(graph, records.prune_summary_of(pruned))
    attach_card(graph)
    attach_card(pruned)
    return pruned, result


def write_graph_outputs(folder: Path, full, pruned, picture: bool, say: Callable[[str], None], figure=None,
                        result=None, full_picture: bool = False) -> list[str]:
    """Every file of a graph folder: full and pruned graph, the compact figure and its spec, the full
    picture (``full_picture``), viewer, frontend JSON, card; returns the file names. The figure is chosen
    first (:func:`trace_figure`) so that its nodes and scores are recorded in both graphs and their
    cards. ``say`` receives progress messages."""
    from sparsetrace.graphs.card import attach_card, card_markdown
    from sparsetrace.graphs.export import to_circuit_tracer_json
    from sparsetrace.graphs.html import write_html

    labels = labels_of(pruned)
    title = default_title(pruned)
    fig = None
    figure_files: list[str] = []
    if picture:
        say("drawing the figure")
        t0 = time.perf_counter()
        fig = trace_figure(full if full is not None else pruned, pruned, result, figure, title)
        names = [folder / f"graph{s}" for s in (".png", ".svg")]  # PDF: `render`/`figure` (font subsetting costs ~2 s)
        figure_files = [Path(p).name for p in write_figure(fig, names, folder / "graph.spec.json", "graph.safetensors",
                                                           figure.width, 200)]
        seconds = round(time.perf_counter() - t0, 3)
        for g in (full, pruned):
            if g is not None:
                records.store_figure(g, dataclasses.replace(records.figure_of(g), seconds=seconds))
    for g in (full, pruned):
        if g is not None:
            attach_card(g)
    written = []
    if full is not None:
        full.save(folder / "graph.safetensors")
        written.append("graph.safetensors")
    pruned.save(folder / "graph.pruned.safetensors")
    written.append("graph.pruned.safetensors")
    written += figure_files
    if full_picture:
        from sparsetrace.graphs.render import render

        say("rendering graph.full.svg")
        render(pruned, folder / "graph.full.svg", labels=labels, title=title)
        written.append("graph.full.svg")
    write_html(pruned, folder / "graph.html", labels=labels, spec=fig.spec if fig is not None else None)
    written.append("graph.html")
    ct = to_circuit_tracer_json(pruned, slug_of(pruned.prompt), labels=labels)
    ct["metadata"]["provenance"] = records.card_of(pruned)
    atomic_write_text(folder / "frontend.json", json.dumps(ct))
    written.append("frontend.json")
    atomic_write_text(folder / "card.md", card_markdown(records.card_of(pruned)))
    written.append("card.md")
    return written


def record_validation(path: Path, validation: list, extra_files: dict[str, Callable[[Path], object]]) -> list[str]:
    """Append the :class:`~sparsetrace.graphs.records.ValidationRecord` s ``validation`` to the graph at
    ``path`` and to its pruned sibling (``graph.pruned.safetensors`` beside a ``graph.safetensors``),
    refresh their cards and card.md, and write ``extra_files`` (name → writer(tmp_path)); everything is
    staged, then renamed into place. Returns the names written."""
    from sparsetrace.graphs import AttributionGraph
    from sparsetrace.graphs.card import add_validation, card_markdown

    folder = path.parent
    siblings = [path]
    pruned = folder / "graph.pruned.safetensors"
    if path.name == "graph.safetensors" and pruned.is_file():
        siblings.append(pruned)
    with staged(folder) as tmp:
        card = None
        for p in siblings:
            g = AttributionGraph.load(p)
            for rec in validation:
                card = add_validation(g, rec)
            g.save(tmp / p.name)
        atomic_write_text(tmp / "card.md", card_markdown(card))
        for name, write in extra_files.items():
            write(tmp / name)
    return [p.name for p in siblings] + ["card.md"] + list(extra_files)


def make_figure(base, spec, width: float, influence=None, where: str = "spec"):
    """The :class:`Figure` of ``spec`` on ``base`` (scores included)."""
    from sparsetrace.graphs.figure import build_figure

    return build_figure(base, spec, FigureConfig(width=width), influence=influence, where=where)


def write_figure(fig, paths: list[Path], spec_path: Path | None, graph_name: str | None, width: float, dpi: int) -> list[str]:
    """Draw ``fig`` to every path and save its spec; everything is rendered before anything is written,
    and a failure leaves none of the files."""
    from sparsetrace.graphs._paper import figure_bytes
    from sparsetrace.graphs.figure import spec_info

    blobs = figure_bytes(fig, sorted({p.suffix.lower()[1:] for p in paths}), width, dpi)
    files: list[tuple[Path, bytes]] = [(p, blobs[p.suffix.lower()[1:]]) for p in paths]
    if spec_path is not None:
        info = spec_info(fig, graph_name)
        info["width"] = width
        files.append((spec_path, (json.dumps(info, indent=1, ensure_ascii=False) + "\n").encode()))
    done: list[Path] = []
    try:
        for p, data in files:
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(p, lambda tmp, data=data: Path(tmp).write_bytes(data))
            done.append(p)
    except BaseException:
        for p in done:
            p.unlink(missing_ok=True)
        raise
    return [str(p) for p, _ in files]


def trace_figure(base, pruned, result, cfg, title: str):
    """The automatic figure of a fresh trace (base: the full graph, candidates: the pruning's node mask),
    recorded in both graphs as their :class:`~sparsetrace.graphs.records.FigureRecord` (nodes drawn and the
    subgraph's scores)."""
    from sparsetrace.graphs.figure import auto_spec

    cand = result.node_mask if result is not None and base is not pruned else None
    influence = result.node_influence if result is not None and base is not pruned else None
    spec = auto_spec(base, cfg, influence=influence, candidates=cand, title=title)
    fig = make_figure(base, spec, cfg.width, influence=influence)
    record = records.FigureRecord(len(fig.units), int(len(fig.src)), cfg.max_nodes, fig.scores, "graph.spec.json")
    for g in {id(base): base, id(pruned): pruned}.values():
        records.store_figure(g, record)
    return fig


def default_title(g) -> str:
    """A figure title: the prompt (80 characters), marked when the transcoders were random."""
    title = (g.prompt or "attribution graph")[:80]
    source = records.transcoder_source_of(g)
    if source is not None and source.random:
        title += "  [RANDOM untrained transcoders]"
    return title
