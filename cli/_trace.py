"""``sparsetrace trace``: a prompt → one folder with the graph, the pruned graph, pictures, viewer,
frontend JSON and provenance card. Option defaults come from AttributionConfig and PruneConfig."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from sparsetrace.config import EXACT_DTYPES, LABEL_SOURCES, STATS_FOLDER, AttributionConfig, FigureConfig, LabelConfig, PruneConfig
from sparsetrace.errors import ConfigError

from ._common import (
    Output,
    atomic_folder,
    check_writable_parent,
    default_of,
    load_lm_and_transcoders,
    model_options,
    model_revision,
    output_options,
    parse_token_ids,
    prune_and_score,
    transcoder_option,
    write_graph_outputs,
)

A = AttributionConfig
P = PruneConfig
F = FigureConfig
FRACTION = click.FloatRange(0, 1, min_open=True)


@click.command()
@click.argument("prompt", required=False)
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (replaced atomically when the trace succeeds).")
@click.option("--token-ids", default=None, metavar="1,2,3", help="Trace these token ids instead of a PROMPT.")
@transcoder_option()
@click.option("--target", "targets", multiple=True, metavar="TOKEN",
              help="A single-token string to use as a logit target (repeatable; default: the top logits).")
@click.option("--target-id", "target_ids", multiple=True, type=int, metavar="ID", help="A target token id (repeatable).")
@click.option("--max-n-logits", type=click.IntRange(1, 1000), default=default_of(A, "max_n_logits"), show_default=True,
              help="At most this many logit targets.")
@click.option("--desired-logit-prob", type=FRACTION, default=default_of(A, "desired_logit_prob"), show_default=True,
              help="Smallest top-probability prefix of logits reaching this cumulative probability.")
@click.option("--batch-size", type=click.IntRange(1), default=default_of(A, "batch_size"), show_default="auto",
              help="Target rows per backward pass (auto: 64 with a row budget, else 16384/tokens within 64..256).")
@click.option("--max-feature-nodes", type=click.IntRange(0), default=default_of(A, "max_feature_nodes"),
              show_default="all", help="Row budget: compute rows for at most this many features (by influence).")
@click.option("--store-threshold", type=click.FloatRange(0, 1, max_open=True), default=default_of(A, "store_threshold"),
              show_default=True, help="Drop edges below this fraction of their row's largest |weight| (0: exact).")
@click.option("--node-threshold", type=FRACTION, default=default_of(P, "node_threshold"), show_default=True,
              help="Pruning: cumulative influence share of kept nodes.")
@click.option("--edge-threshold", type=FRACTION, default=default_of(P, "edge_threshold"), show_default=True,
              help="Pruning: cumulative score share of kept edges.")
@click.option("--feature-stats", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help=f"Feature statistics (`sparsetrace features stats`) for node labels (default: the transcoder set's "
              f"{STATS_FOLDER}/ folder when it has one).")
@click.option("--labels", "label_mode", type=click.Choice(LABEL_SOURCES), default=default_of(LabelConfig, "source"),
              show_default=True,
              help="auto: from feature statistics when there are some, else the token lens; contexts: require "
              "statistics; lens: the token lens only.")
@click.option("--picture/--no-picture", default=True, show_default=True,
              help="Draw the compact figure: graph.png, graph.svg and its spec graph.spec.json (PDF: `sparsetrace render`).")
@click.option("--max-nodes", type=click.IntRange(1), default=default_of(F, "max_nodes"), show_default=True,
              help="Figure node budget: features, supernodes and error nodes (tokens and logits are extra).")
@click.option("--width", type=click.FloatRange(1, 20), default=default_of(F, "width"), show_default=True,
              help="Figure width in inches (7: a two-column page, 3.3: one column).")
@click.option("--full", is_flag=True, help="Also draw every node of the pruned graph: graph.full.svg (needs graphviz).")
@model_options(dtypes=EXACT_DTYPES, dtype_default=default_of(A, "dtype"))
@output_options
def trace(prompt, out_dir, token_ids, transcoders, targets, target_ids, max_n_logits, desired_logit_prob, batch_size,
          max_feature_nodes, store_threshold, node_threshold, edge_threshold, feature_stats, label_mode, picture,
          max_nodes, width, full, model, device, dtype, seed, as_json, quiet):
    """Trace PROMPT into an attribution graph folder.

    Writes graph.safetensors (full graph), graph.pruned.safetensors, the compact figure graph.png and
    graph.svg with its spec graph.spec.json, graph.html (viewer), frontend.json (circuit-tracer /
    Neuronpedia format) and card.md (provenance), and prints the top logits, node counts, scores and
    time.
    """
    t0 = time.perf_counter()
    out = Output(as_json, quiet)
    if (prompt is None) == (token_ids is None):
        raise ConfigError("give exactly one of PROMPT or --token-ids")
    if prompt is not None and not prompt.strip():
        raise ConfigError("PROMPT is empty; give some text to trace")
    ids = parse_token_ids(token_ids) if token_ids is not None else None
    check_writable_parent(out_dir, "--out")
    if picture and full and shutil.which("dot") is None:
        raise ConfigError("graphviz's `dot` binary was not found; --full draws the full picture with it: install it "
                          "(`apt-get install graphviz`), or drop --full (or pass --no-picture)")
    fig_cfg = FigureConfig(max_nodes=max_nodes, width=width)
    stats_dir, auto_stats = _stats_folder(feature_stats, transcoders, model, label_mode)
    cfg = AttributionConfig(
        max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob, batch_size=batch_size,
        max_feature_nodes=max_feature_nodes, dtype=dtype, device=device, store_threshold=store_threshold,
    )
    PruneConfig(node_threshold, edge_threshold)  # validate before the expensive part

    import torch

    from sparsetrace.tracer.attribution import attribute
    from sparsetrace.tracer.pipeline import open_label_sources

    torch.manual_seed(seed)
    clock = _Clock(t0)
    lm, ts, source = load_lm_and_transcoders(transcoders, model, device, "float32", seed, out)
    stats, labels = open_label_sources(stats_dir, label_mode)
    spec = list(targets) + list(target_ids) or None
    out.say(f"tracing with {source['description']}")
    clock.lap("loading")
    with out.progress() as bars:
        graph = attribute(ids if ids is not None else prompt, lm, ts, targets=spec, config=cfg, progress=bars)
    clock.lap("attribution")
    from sparsetrace.graphs.records import TranscoderSource, store_provenance

    store_provenance(graph, TranscoderSource.from_dict(source).with_request(transcoders, seed, model),
                     model_revision(lm, model))
    out.say("pruning and scoring")
    pruned, result = prune_and_score(graph, node_threshold, edge_threshold)
    clock.lap("pruning")
    out.say("labelling the kept features")
    _label(lm, ts, graph, pruned, stats, labels, stats_dir, auto_stats, out)
    clock.lap("labels")
    with atomic_folder(out_dir) as tmp:
        written = write_graph_outputs(tmp, graph, pruned, picture, out, figure=fig_cfg, result=result, full_picture=full)
    clock.lap("outputs")
    from sparsetrace.graphs.records import figure_of

    fig = figure_of(pruned)
    pictures = (fig.seconds or 0.0) if picture and fig is not None else 0.0
    data = _summary(graph, pruned, out_dir, written, clock.seconds(pictures))
    data["figure"] = fig.to_dict() if fig is not None else None
    out.result(data, lambda: _text(data))


def _stats_folder(given: Path | None, transcoders: str | None, model: str | None, mode: str) -> tuple[Path | None, bool]:
    """The feature statistics to label with, and whether they were picked up from the set's folder."""
    from ._common import set_folder, shipped_stats

    if mode == "lens":
        return None, False
    if given is not None:
        return given, False
    found = shipped_stats(transcoders, model)
    if found is not None:
        return found, True
    set_dir = set_folder(transcoders, model)
    cand = set_dir / STATS_FOLDER if set_dir is not None else None
    if mode == "contexts":
        where = f" and {str(cand)!r} does not exist" if cand is not None else " (random transcoders ship none)"
        raise ConfigError(
            f"--labels contexts needs feature statistics: no --feature-stats DIR was given{where}; allowed: "
            "--labels auto or lens, or compute statistics with `sparsetrace features stats --out DIR`"
        )
    return None, False


def _label(lm, ts, graph, pruned, stats, labels, stats_dir, auto_stats: bool, out) -> None:
    """Labels of the pruned graph's features in both graphs (tracer.pipeline.label_graphs)."""
    from sparsetrace.tracer.pipeline import label_graphs

    label_graphs(lm, ts, graph, pruned, stats, labels, stats_dir, auto_stats, out.say)


class _Clock:
    """The trace's time line: seconds per phase and the total from the command's start. Loading runs
    from the start (imports included) to the engine's start (model, transcoders, statistics);
    attribution is the engine; ``seconds`` splits the outputs into pictures (the compact figure) and
    writing (graphs, viewer, frontend JSON, card)."""

    def __init__(self, t0: float) -> None:
        self.t0 = self.last = t0
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self.last
        self.last = now

    def seconds(self, pictures: float = 0.0) -> dict[str, float]:
        laps = dict(self.laps)
        outputs = laps.pop("outputs", 0.0)
        laps["pictures"] = min(pictures, outputs)
        laps["writing"] = outputs - laps["pictures"]
        laps["total"] = self.last - self.t0
        return {k: round(v, 3) for k, v in laps.items()}


def _summary(graph, pruned, out_dir: Path, written: list[str], seconds: dict[str, float]) -> dict:
    """The command's result: the traced prompt's record (tracer.pipeline.graph_record), pruning and time."""
    from sparsetrace.graphs import records
    from sparsetrace.tracer.pipeline import graph_record

    rec = graph_record(graph, pruned)
    summary = records.prune_summary_of(graph)
    return {
        "out": str(out_dir),
        "files": written,
        "prompt": graph.prompt,
        "tokens": rec["tokens"],
        "top_logits": rec["top_logits"],
        "graph": {**rec["graph"], "active_features": records.attribution_stat(graph, "active_features")},
        "pruned": rec["pruned"],
        "pruning": summary.to_dict() if summary is not None else None,
        "scores": rec["scores"],
        "transcoders": records.transcoder_source_of(graph).description,
        "seconds": seconds,
    }


def _text(d: dict) -> str:
    g, p, s = d["graph"], d["pruned"], d["scores"] or {}
    logits = ", ".join(f"{x['token']!r} {x['probability']:.3f}" for x in d["top_logits"])
    full, prn = s.get("full", {}), s.get("pruned", {})
    lines = [
        f"prompt: {d['prompt']!r} ({len(d['tokens'])} tokens)",
        f"transcoders: {d['transcoders']}",
        f"top logits: {logits}",
        f"graph: {g['nodes']} nodes ({g['features']} features of {g['active_features']} active, {g['errors']} errors, "
        f"{g['tokens']} tokens, {g['logits']} logits), {g['edges']} edges",
        f"pruned (node {d['pruning']['node_threshold']}, edge {d['pruning']['edge_threshold']}): "
        f"{p['nodes']} nodes ({p['features']} features, {p['errors']} errors), {p['edges']} edges",
        f"scores: replacement {full.get('replacement', float('nan')):.3f}, completeness {full.get('completeness', float('nan')):.3f} "
        f"(pruned: {prn.get('replacement', float('nan')):.3f}, {prn.get('completeness', float('nan')):.3f})",
        "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in d["seconds"].items()),
        f"wrote {d['out']}/: {', '.join(d['files'])}",
    ]
    return "\n".join(lines)
