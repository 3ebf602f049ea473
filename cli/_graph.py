"""Commands on saved graphs: ``prune``, ``render``, ``export``, ``card``. torch-free (numpy, networkx,
graphviz), so they work where only the graph files are.

GRAPH is a graph file or a trace folder: ``prune`` reads the folder's full graph
(graph.safetensors), ``render`` and ``export`` its pruned graph (graph.pruned.safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from sparsetrace.errors import ConfigError
from sparsetrace.config import FIGURE_LABELS, FigureConfig, ImageConfig, PruneConfig
from sparsetrace.graphs.folder import default_title as _default_title, make_figure, write_figure

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
    from sparsetrace.graphs import records
    from sparsetrace.graphs.card import card_markdown

    out = Output(as_json, quiet)
    g, src = _load(graph, prefer_pruned=False)
    out_path = out_path or src.with_name("graph.pruned.safetensors")
    check_writable_parent(out_path, "--out")
    pruned, _ = prune_and_score(g, node_threshold, edge_threshold)
    with staged(out_path.parent) as tmp:
        pruned.save(tmp / out_path.name)
        write_text_atomic(tmp / "card.md", card_markdown(records.card_of(pruned)))
    data = {"out": str(out_path), "nodes": [g.n_nodes, pruned.n_nodes], "edges": [g.adjacency.nnz, pruned.adjacency.nnz],
            "scores": records.scores_of(pruned).to_dict(), "pruning": records.prune_summary_of(pruned).to_dict()}
    s = data["scores"]
    out.result(data, lambda: (
        f"pruned {g.n_nodes} → {pruned.n_nodes} nodes, {g.adjacency.nnz} → {pruned.adjacency.nnz} edges\n"
        f"scores: full replacement {s['full']['replacement']:.3f}, completeness {s['full']['completeness']:.3f}; "
        f"pruned {s['pruned']['replacement']:.3f}, {s['pruned']['completeness']:.3f}\n"
        f"wrote {out_path} and {out_path.parent / 'card.md'}"
    ))


# ---- figures ---------------------------------------------------------------------------------------
def _figure_options(fn):
    """--max-nodes, --width, --labels, --title, --dpi (defaults from FigureConfig and ImageConfig)."""
    opts = [
        click.option("--max-nodes", type=click.IntRange(1), default=default_of(FigureConfig, "max_nodes"), show_default=True,
                     help="Node budget of the automatic figure: features, supernodes and error nodes (tokens and logits are extra)."),
        click.option("--width", type=click.FloatRange(1, 20), default=None,
                     show_default=f"{default_of(FigureConfig, 'width'):g}, or the spec's",
                     help="Figure width in inches (7: a two-column page, 3.3: one column)."),
        click.option("--labels", "label_mode", type=click.Choice(FIGURE_LABELS),
                     default=default_of(FigureConfig, "labels"), show_default=True,
                     help="auto: the graph's labels; contexts: require labels from feature statistics; ids: node ids only."),
        click.option("--title", default=None, help="Figure title (default: the spec's, else the prompt)."),
        click.option("--dpi", type=click.IntRange(1), default=default_of(ImageConfig, "dpi"), show_default=True,
                     help="PNG resolution."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _check_labels(g, mode: str) -> None:
    """--labels contexts needs labels made from feature statistics; --labels ids drops every label."""
    from sparsetrace.graphs.figure import node_texts

    if mode == "contexts" and not any(t.source == "statistics" for t in node_texts(g).values()):
        raise ConfigError(
            "--labels contexts: this graph has no labels from feature statistics (its labels come from the token lens "
            "or are missing); allowed: --labels auto or ids, or retrace with --feature-stats DIR "
            "(computed by `sparsetrace features stats`)"
        )
    if mode == "ids":
        from sparsetrace.graphs.records import drop_feature_texts

        drop_feature_texts(g)


def _figure_sources(graph: Path, node_threshold: float, edge_threshold: float, out):
    """(base, candidates, pruned, name): the graph whose edges a figure draws — a trace folder's full
    graph, else the file — the nodes the automatic figure may choose from, and the pruned graph (the
    viewer's)."""
    from sparsetrace.graphs import AttributionGraph
    from sparsetrace.graphs.figure import mask_of
    from sparsetrace.graphs.records import is_pruned

    if graph.is_dir():
        pruned, _ = _load(graph, prefer_pruned=True)
        full_path = graph / "graph.safetensors"
        if full_path.is_file():
            base = AttributionGraph.load(full_path)
            return base, mask_of(base, pruned), pruned, str(full_path)
        return pruned, None, pruned, str(graph / "graph.pruned.safetensors")
    g, _ = _load(graph, prefer_pruned=True)
    if is_pruned(g):
        return g, None, g, str(graph)
    out.say(f"pruning first (node {node_threshold}, edge {edge_threshold})")
    pruned, result = prune_and_score(g, node_threshold, edge_threshold)
    return g, result.node_mask, pruned, str(graph)


def _spec_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.stem + ".spec.json")


def _check_figure_paths(paths: list[Path]) -> None:
    from sparsetrace.graphs._paper import FORMATS as PICTURES

    for p in paths:
        if p.suffix.lower() not in PICTURES:
            raise ConfigError(f"--out {str(p)!r}; allowed suffixes: {', '.join(PICTURES)}")
        check_writable_parent(p, "--out")


def _scores_text(sc) -> str:
    return "n/a" if sc is None else f"replacement {sc.replacement:.3f}, completeness {sc.completeness:.3f}"


@click.command()
@GRAPH_ARG
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Picture file: .png, .svg or .pdf (its spec is written beside it as NAME.spec.json).")
@_figure_options
@click.option("--full", is_flag=True, help="Draw every node of the pruned graph with graphviz instead of the compact figure.")
@click.option("--node-threshold", type=FRACTION, default=default_of(PruneConfig, "node_threshold"), show_default=True,
              help="Used when GRAPH is not pruned yet.")
@click.option("--edge-threshold", type=FRACTION, default=default_of(PruneConfig, "edge_threshold"), show_default=True,
              help="Used when GRAPH is not pruned yet.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the self-contained HTML viewer here.")
@output_options
def render(graph, out_path, max_nodes, width, label_mode, title, dpi, full, node_threshold, edge_threshold, html_path,
           as_json, quiet):
    """Draw GRAPH as a compact circuit figure (PNG, SVG or PDF): the most influential nodes within a
    budget, errors collapsed per position, related features merged into supernodes, strongest edges;
    --full draws the whole pruned graph instead. A trace folder's figure is drawn from its pruned
    graph's nodes with the full graph's edges."""
    from sparsetrace.graphs.figure import auto_spec
    from sparsetrace.graphs.html import write_html
    from sparsetrace.graphs.render import render as draw_full

    out = Output(as_json, quiet)
    _check_figure_paths([out_path])
    if html_path is not None:
        check_writable_parent(html_path, "--html")
    if full:
        check_dot(True)
    width = width if width is not None else default_of(FigureConfig, "width")
    cfg = FigureConfig(max_nodes=max_nodes, width=width)
    base, cand, pruned, name = _figure_sources(graph, node_threshold, edge_threshold, out)
    _check_labels(base, label_mode)
    if pruned is not base:
        _check_labels(pruned, label_mode)
    title = title if title is not None else _default_title(base)
    written: list[str] = []
    spec = None
    try:
        if full:
            draw_full(pruned, out_path, labels=labels_of(pruned), title=title, dpi=dpi)
            written.append(str(out_path))
            fig = None
        else:
            spec = auto_spec(base, cfg, candidates=cand, title=title)
            fig = make_figure(base, spec, width)
            written += write_figure(fig, [out_path], _spec_path(out_path), name, width, dpi)
        if html_path is not None:
            write_html(pruned, html_path, labels=labels_of(pruned), title=title, spec=spec)
            written.append(str(html_path))
    except BaseException:
        for f in written:
            Path(f).unlink(missing_ok=True)  # all or nothing
        raise
    data = {"out": str(out_path), "files": written, "html": str(html_path) if html_path else None}
    if fig is not None:
        data.update(nodes=len(fig.units), edges=int(len(fig.src)), scores=fig.scores.to_dict() if fig.scores else None)
        text = f"wrote {', '.join(written)} ({len(fig.units)} nodes, {len(fig.src)} edges; subgraph {_scores_text(fig.scores)})"
    else:
        text = f"wrote {', '.join(written)}"
    out.result(data, text)


@click.command()
@GRAPH_ARG
@click.option("--spec", "spec_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Figure spec (JSON or YAML): nodes, groups, labels, title, width, max_edges (see docs/figures.md). "
              "Default: the automatic figure.")
@click.option("--out", "-o", "out_paths", required=True, multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Figure file(s): .png, .svg or .pdf (repeatable); the spec is saved beside the first as NAME.spec.json.")
@_figure_options
@output_options
def figure(graph, spec_path, out_paths, max_nodes, width, label_mode, title, dpi, as_json, quiet):
    """Draw exactly the nodes and groups a figure spec lists, with group-to-group edges the sum of the
    direct edges between their members, and report the subgraph's replacement and completeness scores
    (features not drawn are folded into error nodes, as pruning's scores do; docs/design.md §12)."""
    from sparsetrace.graphs.figure import FigureSpec, auto_spec

    out = Output(as_json, quiet)
    paths = list(out_paths)
    _check_figure_paths(paths)
    spec = FigureSpec.load(spec_path) if spec_path is not None else None
    base, cand, _, name = _figure_sources(graph, default_of(PruneConfig, "node_threshold"),
                                          default_of(PruneConfig, "edge_threshold"), out)
    _check_labels(base, label_mode)
    width = width if width is not None else (spec.width if spec is not None and spec.width else default_of(FigureConfig, "width"))
    if spec is None:
        spec = auto_spec(base, FigureConfig(max_nodes=max_nodes, width=width), candidates=cand)
    import dataclasses

    spec = dataclasses.replace(spec, title=title if title is not None else (spec.title if spec.title is not None else _default_title(base)))
    where = f"spec {spec_path.name}" if spec_path is not None else "spec"
    fig = make_figure(base, spec, width, where=where)
    files = write_figure(fig, paths, _spec_path(paths[0]), name, width, dpi)
    from sparsetrace.graphs.records import scores_of

    stored = scores_of(base)
    data = {"files": files, "nodes": len(fig.units), "edges": int(len(fig.src)),
            "scores": fig.scores.to_dict() if fig.scores else None, "graph_scores": stored.to_dict() if stored else {}}
    lines = [f"drew {len(fig.units)} nodes and {len(fig.src)} edges of {fig.n_graph_nodes:,} nodes",
             f"subgraph scores: {_scores_text(fig.scores)}"]
    for k, s in (("full", stored.full if stored else None), ("pruned", stored.pruned if stored else None)):
        if s is not None:
            lines.append(f"  ({k} graph: replacement {s.replacement:.3f}, completeness {s.completeness:.3f})")
    lines.append(f"wrote {', '.join(files)}")
    out.result(data, "\n".join(lines))


def _export_text(g, fmt: str) -> str:
    import networkx as nx

    from sparsetrace.graphs.export import to_circuit_tracer_json, to_networkx

    labels = labels_of(g)
    if fmt == "networkx-json":
        return json.dumps(nx.node_link_data(to_networkx(g, labels), edges="links"))
    if fmt == "graphml":
        return "\n".join(nx.generate_graphml(to_networkx(g, labels))) + "\n"
    d = to_circuit_tracer_json(g, slug_of(g.prompt), labels=labels)
    from sparsetrace.graphs.records import card_of

    if card_of(g) is not None:
        d["metadata"]["provenance"] = card_of(g)
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
