"""Commands on saved graphs: ``prune``, ``render``, ``export``, ``card``. torch-free (numpy, networkx,
graphviz), so they work where only the graph files are.

GRAPH is a graph file or a trace folder: ``prune`` reads the folder's full graph
(graph.safetensors), ``render`` and ``export`` its pruned graph (graph.pruned.safetensors).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import click

from sparsetrace.errors import ConfigError
from sparsetrace.graphs.prune import PruneConfig

from ._common import (
    Output,
    check_dot,
    check_writable_parent,
    default_of,
    labels_of,
    output_options,
    prune_and_score,
    staged,
    slug_of,
    write_text_atomic,
)

FRACTION = click.FloatRange(0, 1, min_open=True)
GRAPH_ARG = click.argument("graph", type=click.Path(exists=True, path_type=Path))
FORMATS = ("networkx-json", "graphml", "frontend", "csv")


def _load(path: Path, prefer_pruned: bool):
    from sparsetrace.graphs import AttributionGraph

    if path.is_dir():
        name = "graph.pruned.safetensors" if prefer_pruned else "graph.safetensors"
        if not (path / name).is_file():
            raise ConfigError(f"GRAPH {str(path)!r} is a folder without {name}; give a graph file or a trace folder")
        path = path / name
    return AttributionGraph.load(path), path


def _is_pruned(graph) -> bool:
    return bool(graph.metadata.get("pruned")) or len(graph.metadata.get("node_influence") or []) == graph.n_nodes


@click.command()
@GRAPH_ARG
@click.option("--out", "-o", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Pruned graph file (default: graph.pruned.safetensors beside GRAPH); card.md is written beside it.")
@click.option("--node-threshold", type=FRACTION, default=default_of(PruneConfig, "node_threshold"), show_default=True,
              help="Cumulative influence share of kept nodes.")
@click.option("--edge-threshold", type=FRACTION, default=default_of(PruneConfig, "edge_threshold"), show_default=True,
              help="Cumulative score share of kept edges.")
@output_options
def prune(graph, out_path, node_threshold, edge_threshold, as_json, quiet):
    """Prune GRAPH by influence on the logits; store the scores and refresh the provenance card."""
    from sparsetrace.graphs.card import card_markdown

    out = Output(as_json, quiet)
    g, src = _load(graph, prefer_pruned=False)
    out_path = out_path or src.with_name("graph.pruned.safetensors")
    check_writable_parent(out_path, "--out")
    pruned, _ = prune_and_score(g, node_threshold, edge_threshold)
    with staged(out_path.parent) as tmp:
        pruned.save(tmp / out_path.name)
        write_text_atomic(tmp / "card.md", card_markdown(pruned.metadata["card"]))
    data = {"out": str(out_path), "nodes": [g.n_nodes, pruned.n_nodes], "edges": [g.adjacency.nnz, pruned.adjacency.nnz],
            "scores": pruned.metadata["scores"], "pruning": pruned.metadata["pruning"]}
    s = data["scores"]
    out.result(data, lambda: (
        f"pruned {g.n_nodes} → {pruned.n_nodes} nodes, {g.adjacency.nnz} → {pruned.adjacency.nnz} edges\n"
        f"scores: full replacement {s['full']['replacement']:.3f}, completeness {s['full']['completeness']:.3f}; "
        f"pruned {s['pruned']['replacement']:.3f}, {s['pruned']['completeness']:.3f}\n"
        f"wrote {out_path} and {out_path.parent / 'card.md'}"
    ))


@click.command()
@GRAPH_ARG
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Picture file: .png, .svg or .pdf.")
@click.option("--node-threshold", type=FRACTION, default=default_of(PruneConfig, "node_threshold"), show_default=True,
              help="Used when GRAPH is not pruned yet.")
@click.option("--edge-threshold", type=FRACTION, default=default_of(PruneConfig, "edge_threshold"), show_default=True,
              help="Used when GRAPH is not pruned yet.")
@click.option("--title", default=None, help="Picture title (default: the prompt).")
@click.option("--dpi", type=click.IntRange(1), default=150, show_default=True, help="PNG resolution.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the self-contained HTML viewer here.")
@output_options
def render(graph, out_path, node_threshold, edge_threshold, title, dpi, html_path, as_json, quiet):
    """Draw GRAPH (pruned first when it is not) as a PNG, SVG or PDF picture with graphviz."""
    from sparsetrace.graphs.html import write_html
    from sparsetrace.graphs.render import FORMATS as PICTURES
    from sparsetrace.graphs.render import render as draw

    out = Output(as_json, quiet)
    if out_path.suffix.lower() not in PICTURES:
        raise ConfigError(f"--out {str(out_path)!r}; allowed suffixes: {', '.join(PICTURES)}")
    check_writable_parent(out_path, "--out")
    check_dot(True)
    g, _ = _load(graph, prefer_pruned=True)
    if not _is_pruned(g):
        out.say(f"pruning first (node {node_threshold}, edge {edge_threshold})")
        g, _ = prune_and_score(g, node_threshold, edge_threshold)
    if title is None:
        title = (g.prompt or "attribution graph")[:80]
        if (g.metadata.get("transcoder_source") or {}).get("random"):
            title += "  [RANDOM untrained transcoders]"
    labels = labels_of(g)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    draw(g, out_path, labels=labels, title=title, dpi=dpi)
    if html_path is not None:
        check_writable_parent(html_path, "--html")
        try:
            write_html(g, html_path, labels=labels, title=title)
        except BaseException:
            out_path.unlink(missing_ok=True)  # all or nothing
            raise
    data = {"out": str(out_path), "html": str(html_path) if html_path else None, "nodes": g.n_nodes, "edges": g.adjacency.nnz}
    out.result(data, f"wrote {out_path}" + (f" and {html_path}" if html_path else "") + f" ({g.n_nodes} nodes, {g.adjacency.nnz} edges)")


def _export_text(g, fmt: str) -> str:
    import networkx as nx

    from sparsetrace.graphs.export import to_circuit_tracer_json, to_networkx

    labels = labels_of(g)
    if fmt == "networkx-json":
        return json.dumps(nx.node_link_data(to_networkx(g, labels), edges="links"))
    if fmt == "graphml":
        return "\n".join(nx.generate_graphml(to_networkx(g, labels))) + "\n"
    d = to_circuit_tracer_json(g, slug_of(g.prompt), labels=labels)
    if "card" in g.metadata:
        d["metadata"]["provenance"] = g.metadata["card"]
    return json.dumps(d)


@click.command()
@GRAPH_ARG
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), required=True,
              help="networkx-json (node-link), graphml, frontend (circuit-tracer/Neuronpedia JSON), csv (two files).")
@click.option("--out", "-o", "out_path", required=True, metavar="PATH|-",
              help="Output file, or - for stdout (not for csv: it writes PATH's stem + .nodes.csv and .edges.csv).")
@output_options
def export(graph, fmt, out_path, as_json, quiet):
    """Export GRAPH (a trace folder: its pruned graph) for networkx, Gephi, the circuit-tracer frontend or a spreadsheet."""
    out = Output(as_json, quiet)
    g, _ = _load(graph, prefer_pruned=True)
    if out_path == "-":
        if fmt == "csv":
            raise ConfigError("--format csv writes two files (nodes and edges); give --out PATH instead of -")
        click.echo(_export_text(g, fmt), nl=False)
        return
    path = Path(out_path)
    check_writable_parent(path, "--out")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        from sparsetrace.graphs.export import write_csv

        stem = path.with_suffix("") if path.suffix == ".csv" else path
        files = [Path(f"{stem}.nodes.csv"), Path(f"{stem}.edges.csv")]
        write_csv(g, files[0], files[1], labels=labels_of(g))
    else:
        write_text_atomic(path, _export_text(g, fmt))
        files = [path]
    data = {"format": fmt, "files": [str(f) for f in files], "nodes": g.n_nodes, "edges": g.adjacency.nnz}
    out.result(data, f"wrote {', '.join(str(f) for f in files)} ({g.n_nodes} nodes, {g.adjacency.nnz} edges)")


@click.command()
@GRAPH_ARG
@click.option("--out", "-o", "out_path", default="-", show_default=True, metavar="PATH|-", help="Markdown file or - for stdout.")
@output_options
def card(graph, out_path, as_json, quiet):
    """Print (or write) the provenance card of GRAPH, rebuilt from its metadata."""
    from sparsetrace.graphs.card import build_card, card_markdown

    out = Output(as_json, quiet)
    g, _ = _load(graph, prefer_pruned=True)
    c = build_card(g)
    if out_path == "-":
        out.result(c, card_markdown(c))
        return
    path = Path(out_path)
    check_writable_parent(path, "--out")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, card_markdown(c))
    out.result({"out": str(path), "card": c}, f"wrote {path}")
