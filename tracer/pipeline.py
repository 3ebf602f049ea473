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

__all__ = ["open_transcoders", "open_label_sources", "label_graphs", "TraceSession", "TraceSettings", "trace_item", "graph_record"]


RANDOM_SPECS = ("random:", "random-clt:")
"""Prefixes of a transcoder spec that builds an untrained set: ``random:F:K`` (per-layer) and
``random-clt:F:K`` (cross-layer), TopK with a skip, seeded."""


def open_transcoders(spec: str | Path, lm, seed: int = 0, shipped: bool = False) -> tuple[Any, dict[str, Any]]:
    """The transcoder set of ``spec`` — a folder (per-layer or cross-layer), or ``random:F:K`` /
    ``random-clt:F:K`` — checked against ``lm``, and a description of where it came from (``shipped``: the
    folder is the model's shipped set)."""
    from sparsetrace.transcoders import TranscoderSet, TranscoderSetConfig, load_transcoders

    from .replacement import check_compatible

    spec = str(spec)
    if spec.startswith(RANDOM_SPECS):
        ts = _random_set(spec, lm, seed)
        what = "cross-layer transcoder" if spec.startswith("random-clt:") else "set"
        source = {"description": f"RANDOM untrained TopK {what} {spec} (seed {seed})", "random": True}
    else:
        ts = load_transcoders(spec)
        path = str(Path(spec).resolve())
        source = {"description": f"shipped default set ({spec})" if shipped else path, "random": False, "path": path}
    check_compatible(lm, ts)
    return ts, source


def open_label_sources(stats_dir: Path | None, label_mode: str) -> tuple[Any, Any]:
    """The feature statistics and labels in ``stats_dir`` (None, None without one); ``label_mode``
    "contexts" needs the labels file."""
    if stats_dir is None:
        return None, None
    from .features import load_feature_labels, load_feature_stats

    stats, labels = load_feature_stats(stats_dir), load_feature_labels(stats_dir)
    if label_mode == "contexts" and labels is None:
        raise ConfigError(f"--labels contexts: the feature statistics in {str(stats_dir)!r} have no labels "
                          "(feature_labels.json.gz); rerun `sparsetrace features stats` on them, or use --labels auto")
    return stats, labels


def _random_set(spec: str, lm, seed: int):
    from sparsetrace.transcoders import (CrossLayerTranscoder, CrossLayerTranscoderConfig, TranscoderSet,
                                         TranscoderSetConfig)

    parts = spec.split(":")
    try:
        n_features, k = int(parts[1]), int(parts[2])
        if len(parts) != 3 or n_features <= 0 or not 0 < k <= n_features:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(
            f"--transcoders {spec!r}; allowed: a folder, or random:F:K / random-clt:F:K (a cross-layer "
            f"transcoder) with integers F ≥ 1 and 1 ≤ K ≤ F"
        ) from None
    kw = dict(
        model_id=lm.model_id, architecture=lm.adapter.name, n_layers=lm.n_layers, d_in=lm.d_model,
        n_features=n_features, activation="topk", k=k, skip=True,
        training={"random": True, "seed": seed, "note": "random weights: untrained, for trying the pipeline"},
    )
    if parts[0] == "random-clt":
        return CrossLayerTranscoder.random(CrossLayerTranscoderConfig(**kw), seed=seed)
    return TranscoderSet.random(TranscoderSetConfig(**kw), seed=seed)


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
