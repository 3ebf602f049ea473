"""One prompt from text to a trace folder's files (docs/design.md §15): attribute, record where the
model and transcoders came from, prune and score, label the kept features, write every file.

``sparsetrace trace`` runs these steps one by one (it times each); ``trace-many``'s workers run
:func:`trace_item` once per prompt with a :class:`TraceSession` loaded once per worker.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sparsetrace.config import AttributionConfig, FigureConfig, PruneConfig
from sparsetrace.errors import ConfigError
from sparsetrace.graphs import AttributionGraph, NodeKind
from sparsetrace.graphs.folder import prune_and_score, write_graph_outputs
from sparsetrace.graphs.records import (DecoderCosines, FeatureLabels, LabelSource, TranscoderSource, scores_of,
                                        store_feature_labels, store_provenance)

from .prompt_sets import PromptItem, token_positions

__all__ = ["label_graphs", "TraceSession", "TraceSettings", "trace_item", "graph_record"]


def label_graphs(lm, ts, graph: AttributionGraph, pruned: AttributionGraph, stats, labels, stats_dir,
                 auto_stats: bool, say: Callable[[str], None]) -> None:
    """Labels of the pruned graph's features (tracer.features.describe_features), stored in both graphs as
    their :class:`~sparsetrace.graphs.records.FeatureLabels`: each feature's info (label, words, contexts,
    score, promoted tokens), its short label, where they came from, and the decoder cosines the figure
    merges by. Statistics
    picked up automatically (``auto_stats``) that do not fit the set fall back to the token lens."""
    from .features import decoder_cosines, describe_features

    lay = pruned.layout
    feat = lay.kind == NodeKind.FEATURE
    keys = [(int(l), int(f)) for l, f in zip(lay.layer[feat], lay.feature[feat]) if f >= 0]
    try:
        info = describe_features(lm, ts, keys, stats, labels)
    except ConfigError as exc:
        if not auto_stats:
            raise
        say(f"warning: not using {stats_dir} ({exc}); labels come from the token lens")
        stats = labels = None
        info = describe_features(lm, ts, keys)
    source = LabelSource(
        "token lens (no feature statistics)" if stats is None else (
            "feature statistics" + ("" if labels is not None else " (top tokens only: no feature_labels.json.gz)")),
        str(stats_dir) if stats is not None else None,
        stats.sample if stats is not None else None,
        stats.n_tokens if stats is not None else None,
        labels.heldout if labels is not None else None,
        labels.heldout_tokens if labels is not None else None,
    )
    cos = DecoderCosines.from_dict({"floor": 0.5, "pairs": decoder_cosines(ts, keys, 0.5)})
    record = FeatureLabels.from_info(info, source, cos)
    for g in (graph, pruned):
        store_feature_labels(g, record)


@dataclass(eq=False)
class TraceSession:
    """What a worker loads once: model, transcoders, feature statistics and provenance."""

    lm: Any
    ts: Any
    transcoder_source: dict[str, Any]
    """Stored as the graph's :class:`~sparsetrace.graphs.records.TranscoderSource` (as ``trace`` stores it)."""
    revision: str | None = None
    """Stored as the model's revision when known."""
    stats: Any = None
    labels: Any = None
    stats_dir: Path | None = None
    auto_stats: bool = False


@dataclass(frozen=True)
class TraceSettings:
    """How each prompt is traced and written (the ``trace`` command's settings)."""

    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    figure: FigureConfig = field(default_factory=FigureConfig)
    picture: bool = True
    seed: int = 0


def _counts(g: AttributionGraph) -> dict[str, int]:
    lay = g.layout
    return {"nodes": g.n_nodes, "features": lay.n_features, "errors": lay.n_errors, "tokens": lay.n_tokens,
            "logits": lay.n_logits, "edges": int(g.adjacency.nnz)}


def _scores(graph: AttributionGraph) -> dict[str, Any] | None:
    s = scores_of(graph)
    return s.to_dict() if s is not None else None


def graph_record(graph: AttributionGraph, pruned: AttributionGraph) -> dict[str, Any]:
    """A traced prompt's summary for a manifest: tokens, top logits, node counts, scores."""
    return {
        "tokens": list(graph.token_strings),
        "top_logits": [{"token": t, "probability": float(p)} for t, p in zip(graph.logit_label, graph.logit_probability)],
        "graph": _counts(graph),
        "pruned": _counts(pruned),
        "scores": _scores(graph),
    }


def trace_item(session: TraceSession, item: PromptItem, settings: TraceSettings,
               say: Callable[[str], None] = lambda _: None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Trace one prompt as ``sparsetrace trace`` does; returns its record (positions of its template
    fields, tokens, logits, counts, scores, seconds) and the folder's files (name → bytes)."""
    from .attribution import attribute

    t0 = time.perf_counter()
    lm = session.lm
    positions = token_positions(item, lambda s: lm.tokenize(s).tolist())
    torch.manual_seed(settings.seed)
    graph = attribute(item.prompt, lm, session.ts, targets=list(item.targets) or None, config=settings.attribution)
    store_provenance(graph, TranscoderSource.from_dict(session.transcoder_source), session.revision)
    pruned, result = prune_and_score(graph, settings.prune.node_threshold, settings.prune.edge_threshold)
    label_graphs(lm, session.ts, graph, pruned, session.stats, session.labels, session.stats_dir,
                 session.auto_stats, say)
    with tempfile.TemporaryDirectory(prefix="sparsetrace-item-") as tmp:
        names = write_graph_outputs(Path(tmp), graph, pruned, settings.picture, say, figure=settings.figure,
                                    result=result)
        files = {n: (Path(tmp) / n).read_bytes() for n in names}
    record = {"positions": positions, **graph_record(graph, pruned), "files": names,
              "seconds": round(time.perf_counter() - t0, 3)}
    return record, files
