"""The one home of the records a graph carries in ``graph.metadata`` (docs/design.md §8), torch-free.

Each record is a dataclass with ``to_dict``/``from_dict``; ``from_dict(d).to_dict() == d`` for every dict
this package writes, and the records whose dicts are open-ended (transcoder source, scores, validation
records, feature info, label source, figure) keep keys they do not know in ``extra``, so such files of
other versions round-trip too. The JSON in graph files is unchanged: feature labels are still stored keyed by
``"layer.feature"`` strings, but only this module writes or parses those keys — everything else sees
``(layer, feature)`` tuples. Readers get records (or None when nothing was recorded) from the
``*_of`` functions; writers store them with the ``store_*`` functions.

Metadata keys: ``transcoder_source`` (:class:`TranscoderSource`), ``model.revision``, ``pruning`` and
``node_influence`` (:class:`PruneSummary`, :func:`stored_influence`), ``pruned``, ``scores``
(:class:`ScoresRecord`), ``validation`` (:class:`ValidationRecord`), ``feature_info``,
``feature_labels``, ``feature_labels_source``, ``labels``, ``decoder_cosine`` (:class:`FeatureLabels`),
``figure`` (:class:`FigureRecord`), ``supernode_names``/``supernode_members`` (:class:`Supernodes`),
``picture``/``viewer_cut`` (:class:`Cut`), ``steering`` (the card's steering entries), ``card`` (the
provenance card, built by ``graphs/card.py``), and read-only the sections ``attribute`` writes
(:class:`AttributionProvenance`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Protocol

import numpy as np

__all__ = [
    "FeatureKey", "feature_key", "parse_feature_key",
    "GraphScores", "ScoresRecord", "PruneSummary", "TranscoderRequest", "TranscoderSource", "ValidationRecord",
    "FigureRecord", "FeatureInfo", "LabelSource", "DecoderCosines", "FeatureLabels",
    "transcoder_source_of", "store_provenance", "AttributionProvenance", "provenance_of", "model_revision_of", "model_id_of", "attribution_setting", "attribution_stat",
    "prune_summary_of", "store_pruning", "stored_influence", "store_influence", "is_pruned", "mark_pruned",
    "scores_of", "store_scores_record", "validation_of", "append_validation",
    "feature_labels_of", "store_feature_labels", "drop_feature_texts", "labels_by_feature",
    "Supernodes", "supernodes_of", "store_supernodes", "Cut", "CUTS", "cut_of", "store_cut", "steering_of",
    "append_steering", "figure_of", "store_figure", "card_of", "store_card",
]

FeatureKey = tuple[int, int]
"""(layer, feature)."""


class _HasMetadata(Protocol):
    metadata: dict[str, Any]
    n_nodes: int


def feature_key(key: FeatureKey) -> str:
    """``(3, 12)`` → ``"3.12"``, the stored form of a feature key."""
    return f"{int(key[0])}.{int(key[1])}"


def parse_feature_key(text: str) -> FeatureKey:
    """``"3.12"`` → ``(3, 12)``."""
    layer, feat = text.split(".")
    return int(layer), int(feat)


def _split(d: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """The entries of ``d`` whose keys are not in ``known``."""
    return {k: v for k, v in d.items() if k not in known}


# ---- scores ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GraphScores:
    """The two scores of docs/design.md §5, both in [0, 1]."""

    replacement: float
    """I(tokens) / (I(tokens) + I(errors)); 1 when no influence ends at an error node."""
    completeness: float
    """Influence-weighted share of node inputs that do not come from error nodes."""

    def to_dict(self) -> dict[str, float]:
        return {"replacement": self.replacement, "completeness": self.completeness}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GraphScores":
        return cls(d["replacement"], d["completeness"])


@dataclass(frozen=True)
class ScoresRecord:
    """``metadata["scores"]``: the full graph's scores and, after pruning, the pruned graph's (None: not
    recorded; other keys are kept in ``extra``)."""

    full: GraphScores | None
    pruned: GraphScores | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.full is not None:
            d["full"] = self.full.to_dict()
        if self.pruned is not None:
            d["pruned"] = self.pruned.to_dict()
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScoresRecord":
        return cls(*(GraphScores.from_dict(d[k]) if k in d else None for k in ("full", "pruned")),
                   extra=_split(d, ("full", "pruned")))


def scores_of(graph: _HasMetadata) -> ScoresRecord | None:
    """The stored scores, or None when the graph was never scored."""
    d = graph.metadata.get("scores")
    return ScoresRecord.from_dict(d) if d else None


def store_scores_record(graph: _HasMetadata, record: ScoresRecord) -> dict[str, Any]:
    """Store ``record``; returns the stored dict."""
    d = graph.metadata["scores"] = record.to_dict()
    return d


# ---- pruning --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneSummary:
    """``metadata["pruning"]``: the thresholds a graph was pruned with and its sizes before and after."""

    node_threshold: float
    edge_threshold: float
    n_nodes_before: int
    n_edges_before: int
    n_nodes_after: int
    n_edges_after: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PruneSummary":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def prune_summary_of(graph: _HasMetadata) -> PruneSummary | None:
    d = graph.metadata.get("pruning")
    return PruneSummary.from_dict(d) if d else None


def store_pruning(graph: _HasMetadata, summary: PruneSummary) -> None:
    graph.metadata["pruning"] = summary.to_dict()


def stored_influence(graph: _HasMetadata) -> np.ndarray | None:
    """``metadata["node_influence"]`` as float64 [N] when it has one entry per node (as pruning stores
    it: each kept node's influence in the full graph), else None."""
    stored = graph.metadata.get("node_influence")
    if stored is None or len(stored) != graph.n_nodes:
        return None
    return np.asarray(stored, dtype=np.float64)


def store_influence(graph: _HasMetadata, influence: np.ndarray | None) -> None:
    """Store one influence per node (None: drop the stored influence)."""
    graph.metadata.pop("node_influence", None)
    if influence is not None:
        graph.metadata["node_influence"] = [float(x) for x in influence]


def is_pruned(graph: _HasMetadata) -> bool:
    """Whether ``graph`` is a pruned graph: marked so, or with one stored influence per node."""
    return bool(graph.metadata.get("pruned")) or len(graph.metadata.get("node_influence") or []) == graph.n_nodes


def mark_pruned(graph: _HasMetadata) -> None:
    graph.metadata["pruned"] = True


# ---- provenance -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TranscoderRequest:
    """What the command was asked for: ``--transcoders`` (None: the shipped set), ``--seed`` and ``--model``."""

    spec: str | None
    seed: int | None
    model_arg: str | None


_SOURCE_KEYS = ("description", "random", "path", "spec", "seed", "model_arg")


@dataclass(frozen=True)
class TranscoderSource:
    """``metadata["transcoder_source"]``: where the transcoders came from (``path`` of a folder; omitted
    for random ones) and, when a command traced the graph, what it was asked for (``request``)."""

    description: str | None
    """None: not recorded (the key is then not written)."""
    random: bool = False
    path: str | None = None
    request: TranscoderRequest | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {} if self.description is None else {"description": self.description}
        d["random"] = self.random
        if self.path is not None:
            d["path"] = self.path
        if self.request is not None:
            d.update(spec=self.request.spec, seed=self.request.seed, model_arg=self.request.model_arg)
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TranscoderSource":
        asked = any(k in d for k in ("spec", "seed", "model_arg"))
        request = TranscoderRequest(d.get("spec"), d.get("seed"), d.get("model_arg")) if asked else None
        return cls(d.get("description"), bool(d.get("random", False)), d.get("path"), request,
                   _split(d, _SOURCE_KEYS))

    def with_request(self, spec: str | None, seed: int | None, model_arg: str | None) -> "TranscoderSource":
        return dataclasses.replace(self, request=TranscoderRequest(spec, seed, model_arg))

    @property
    def set_spec(self) -> str | None:
        """What ``--transcoders`` loads this set again: the spec a command was given, else the folder."""
        return (self.request.spec if self.request is not None else None) or self.path

    @property
    def model_arg(self) -> str | None:
        """The ``--model`` a command was given (None: the default model, or not recorded)."""
        return self.request.model_arg if self.request is not None else None

    @property
    def seed(self) -> int | None:
        """The ``--seed`` a command was given (random sets are made from it)."""
        return self.request.seed if self.request is not None else None


def transcoder_source_of(graph: _HasMetadata) -> TranscoderSource | None:
    d = graph.metadata.get("transcoder_source")
    return TranscoderSource.from_dict(d) if d else None


def store_provenance(graph: _HasMetadata, source: TranscoderSource, revision: str | None = None) -> None:
    """Record where the transcoders came from and, when known, the model's revision."""
    if revision:
        graph.metadata["model"]["revision"] = revision
    graph.metadata["transcoder_source"] = source.to_dict()


@dataclass(frozen=True)
class AttributionProvenance:
    """What ``attribute`` recorded about how the graph was made (``tracer/attribution.py``): the sections
    ``model``, ``transcoders`` (the set's config without training and metrics), ``transcoder_training``,
    ``transcoder_metrics``, ``attribution`` (the :class:`AttributionConfig`), ``stats`` (the
    :class:`AttributionStats`) and ``hook_points``. Each section is the dict of the format that owns it
    (``{}`` when not recorded); this record only hands them out read-only."""

    model: Mapping[str, Any]
    transcoders: Mapping[str, Any]
    training: Mapping[str, Any]
    metrics: Mapping[str, Any]
    attribution: Mapping[str, Any]
    stats: Mapping[str, Any]
    hook_points: Mapping[str, Any]

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "AttributionProvenance":
        keys = ("model", "transcoders", "transcoder_training", "transcoder_metrics", "attribution", "stats", "hook_points")
        return cls(*(MappingProxyType(dict(meta.get(k) or {})) for k in keys))


def provenance_of(graph: _HasMetadata) -> AttributionProvenance:
    return AttributionProvenance.from_metadata(graph.metadata)


def model_revision_of(graph: _HasMetadata) -> str | None:
    return (graph.metadata.get("model") or {}).get("revision")


def model_id_of(graph: _HasMetadata) -> str | None:
    """The id of the model the graph was attributed on (``metadata["model"]["id"]``)."""
    return (graph.metadata.get("model") or {}).get("id")


def attribution_setting(graph: _HasMetadata, name: str, default: Any = None) -> Any:
    """One field of the :class:`AttributionConfig` the graph was attributed with (``metadata["attribution"]``)."""
    return (graph.metadata.get("attribution") or {}).get(name, default)


def attribution_stat(graph: _HasMetadata, name: str, default: Any = None) -> Any:
    """One field of the :class:`AttributionStats` of the graph's attribution (``metadata["stats"]``)."""
    return (graph.metadata.get("stats") or {}).get(name, default)


# ---- validation -----------------------------------------------------------------------------------
_VALIDATION_KEYS = ("kind", "description", "outcome", "passed")


@dataclass(frozen=True)
class ValidationRecord:
    """One entry of ``metadata["validation"]``: an intervention run on the real model and its outcome
    (a causal claim on the card). Fields left None were not recorded and are not written."""

    kind: str | None = None
    description: str | None = None
    outcome: str | None = None
    passed: bool | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _VALIDATION_KEYS if getattr(self, k) is not None}
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ValidationRecord":
        return cls(*(d.get(k) for k in _VALIDATION_KEYS), extra=_split(d, _VALIDATION_KEYS))

    def claim(self) -> str:
        """The card's claim line: what was tested — the outcome (or whether it passed)."""
        desc = str(self.description or self.extra.get("hypothesis") or self.kind or "intervention")
        outcome = self.outcome
        if outcome is None and self.passed is not None:
            outcome = "confirmed" if self.passed else "not confirmed"
        return f"{desc} — {outcome or 'not recorded'}"


def validation_of(graph: _HasMetadata) -> list[ValidationRecord]:
    return [ValidationRecord.from_dict(d) for d in graph.metadata.get("validation") or []]


def append_validation(graph: _HasMetadata, record: ValidationRecord) -> None:
    graph.metadata.setdefault("validation", []).append(record.to_dict())


# ---- feature labels -------------------------------------------------------------------------------
_INFO_KEYS = ("short", "label", "source", "words", "contexts", "precision", "recall", "promoted", "density")


@dataclass(frozen=True)
class FeatureInfo:
    """What pictures, the viewer and the card say about one feature (``tracer.features.describe_features``)."""

    short: str | None = None
    label: str | None = None
    source: str | None = None
    """"statistics" or "token lens"."""
    words: list[str] | None = None
    contexts: list[str] | None = None
    precision: float | None = None
    recall: float | None = None
    promoted: list[str] | None = None
    density: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    present: frozenset[str] = frozenset(_INFO_KEYS)
    """The keys the stored dict has (a None value is written when its key is present)."""

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _INFO_KEYS if k in self.present}
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureInfo":
        return cls(*(d.get(k) for k in _INFO_KEYS), extra=_split(d, _INFO_KEYS),
                   present=frozenset(k for k in _INFO_KEYS if k in d))


_SOURCE_FIELDS = ("source", "statistics", "sample", "sample_tokens", "heldout", "heldout_tokens")


@dataclass(frozen=True)
class LabelSource:
    """``metadata["labels"]``: where the labels came from (statistics folder, sample, held-out scoring)."""

    source: str
    statistics: str | None = None
    sample: Any = None
    sample_tokens: int | None = None
    heldout: Any = None
    heldout_tokens: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    present: frozenset[str] = frozenset(_SOURCE_FIELDS)
    """The keys the stored dict has (a None value is written when its key is present)."""

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _SOURCE_FIELDS if k in self.present}, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LabelSource":
        return cls(*(d.get(k) for k in _SOURCE_FIELDS), extra=_split(d, _SOURCE_FIELDS),
                   present=frozenset(k for k in _SOURCE_FIELDS if k in d))


@dataclass(frozen=True)
class DecoderCosines:
    """``metadata["decoder_cosine"]``: feature pairs whose decoder rows have cosine ≥ ``floor``."""

    floor: float
    pairs: list[tuple[FeatureKey, FeatureKey, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"floor": self.floor, "pairs": [[feature_key(a), feature_key(b), c] for a, b, c in self.pairs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DecoderCosines":
        return cls(d.get("floor"), [(parse_feature_key(a), parse_feature_key(b), c) for a, b, c in d.get("pairs", [])])


@dataclass(frozen=True)
class FeatureLabels:
    """The labels a graph carries, keyed by (layer, feature): ``info`` (``metadata["feature_info"]``),
    the short ``labels`` (``metadata["feature_labels"]``), their ``source`` (``metadata["labels"]``; its
    ``source`` string is also ``metadata["feature_labels_source"]``) and the ``decoder_cosine`` pairs.
    A field that is None has no key in the metadata."""

    info: dict[FeatureKey, FeatureInfo] | None = None
    labels: dict[FeatureKey, str] | None = None
    source: LabelSource | None = None
    source_name: str | None = None
    """``metadata["feature_labels_source"]``."""
    decoder_cosine: DecoderCosines | None = None

    @classmethod
    def from_info(cls, info: Mapping[FeatureKey, Mapping[str, Any]], source: LabelSource,
                  cosines: DecoderCosines) -> "FeatureLabels":
        """The labels ``describe_features`` made: each feature's info and its ``short`` label."""
        return cls({k: FeatureInfo.from_dict(d) for k, d in info.items()}, {k: d["short"] for k, d in info.items()},
                   source, source.source, cosines)

    def to_metadata(self) -> dict[str, Any]:
        """The metadata entries (only those that are not None)."""
        d: dict[str, Any] = {}
        if self.info is not None:
            d["feature_info"] = {feature_key(k): v.to_dict() for k, v in self.info.items()}
        if self.labels is not None:
            d["feature_labels"] = {feature_key(k): v for k, v in self.labels.items()}
        if self.source_name is not None:
            d["feature_labels_source"] = self.source_name
        if self.source is not None:
            d["labels"] = self.source.to_dict()
        if self.decoder_cosine is not None:
            d["decoder_cosine"] = self.decoder_cosine.to_dict()
        return d

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "FeatureLabels":
        info, labels = meta.get("feature_info"), meta.get("feature_labels")
        return cls(
            {parse_feature_key(k): FeatureInfo.from_dict(v) for k, v in info.items()} if info is not None else None,
            {parse_feature_key(k): v for k, v in labels.items()} if labels is not None else None,
            LabelSource.from_dict(meta["labels"]) if meta.get("labels") is not None else None,
            meta.get("feature_labels_source"),
            DecoderCosines.from_dict(meta["decoder_cosine"]) if meta.get("decoder_cosine") is not None else None,
        )


_LABEL_KEYS = ("feature_info", "feature_labels", "feature_labels_source", "labels", "decoder_cosine")


def feature_labels_of(graph: _HasMetadata) -> FeatureLabels:
    """The graph's labels (every field None when nothing was recorded)."""
    return FeatureLabels.from_metadata(graph.metadata)


def store_feature_labels(graph: _HasMetadata, labels: FeatureLabels) -> None:
    """Replace the graph's label entries by ``labels`` (a None field removes its key; kept keys keep their place)."""
    new = labels.to_metadata()
    for k in _LABEL_KEYS:
        if k not in new:
            graph.metadata.pop(k, None)
    graph.metadata.update(new)


def drop_feature_texts(graph: _HasMetadata) -> None:
    """Remove every feature's label text (info and short labels), keeping where they came from."""
    store_feature_labels(graph, dataclasses.replace(feature_labels_of(graph), info=None, labels=None))


def labels_by_feature(graph: _HasMetadata) -> dict[FeatureKey, str]:
    """The short label of each labelled feature (``{}`` when none were recorded)."""
    return dict(feature_labels_of(graph).labels or {})


# ---- supernodes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Supernodes:
    """``metadata["supernode_names"]`` and ``["supernode_members"]`` of a grouped graph
    (``graphs/supernodes.py``): each supernode's feature id (``-(k + 2)``) → its name, and → the readable
    ids of its members. None: the key is absent."""

    names: dict[int, str] | None = None
    members: dict[int, list[str]] | None = None

    def to_metadata(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.names is not None:
            d["supernode_names"] = {str(k): v for k, v in self.names.items()}
        if self.members is not None:
            d["supernode_members"] = {str(k): list(v) for k, v in self.members.items()}
        return d

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "Supernodes":
        names, members = meta.get("supernode_names"), meta.get("supernode_members")
        return cls({int(k): v for k, v in names.items()} if names is not None else None,
                   {int(k): list(v) for k, v in members.items()} if members is not None else None)


def supernodes_of(graph: _HasMetadata) -> Supernodes:
    return Supernodes.from_metadata(graph.metadata)


def store_supernodes(graph: _HasMetadata, supernodes: Supernodes) -> None:
    graph.metadata.update(supernodes.to_metadata())


# ---- cuts and steering -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Cut:
    """``metadata["picture"]`` (``graphs/render.py``) or ``["viewer_cut"]`` (``graphs/html.py``): a graph
    cut down for display — its node (and edge) budget and the sizes of the graph it was cut from."""

    max_nodes: int
    of_nodes: int
    max_edges: int | None = None
    of_edges: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"max_nodes": self.max_nodes}
        if self.max_edges is not None:
            d["max_edges"] = self.max_edges
        d["of_nodes"] = self.of_nodes
        if self.of_edges is not None:
            d["of_edges"] = self.of_edges
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Cut":
        return cls(d["max_nodes"], d["of_nodes"], d.get("max_edges"), d.get("of_edges"))


CUTS = ("picture", "viewer_cut")


def cut_of(graph: _HasMetadata, which: str) -> Cut | None:
    """The ``which`` (one of :data:`CUTS`) cut record, or None."""
    d = graph.metadata.get(which)
    return Cut.from_dict(d) if d else None


def store_cut(graph: _HasMetadata, which: str, cut: Cut) -> None:
    if which not in CUTS:
        raise ValueError(f"which={which!r}; allowed: {', '.join(CUTS)}")
    graph.metadata[which] = cut.to_dict()


def steering_of(graph: _HasMetadata) -> list[dict[str, Any]]:
    """``metadata["steering"]``: the card's entries of steering runs (``graphs.card.steering_entry`` makes them)."""
    return list(graph.metadata.get("steering") or [])


def append_steering(graph: _HasMetadata, entry: Mapping[str, Any]) -> None:
    graph.metadata.setdefault("steering", []).append(dict(entry))


# ---- figure and card ------------------------------------------------------------------------------
_FIGURE_KEYS = ("nodes", "edges", "max_nodes", "scores", "spec", "seconds")


@dataclass(frozen=True)
class FigureRecord:
    """``metadata["figure"]``: the automatic figure of a trace — units drawn, edges, the node budget, the
    drawn subgraph's scores, the spec file and (once drawn) the seconds the pictures took."""

    nodes: int
    edges: int
    max_nodes: int
    scores: GraphScores | None
    spec: str
    seconds: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"nodes": self.nodes, "edges": self.edges, "max_nodes": self.max_nodes,
             "scores": self.scores.to_dict() if self.scores is not None else None, "spec": self.spec}
        if self.seconds is not None:
            d["seconds"] = self.seconds
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FigureRecord":
        sc = d.get("scores")
        return cls(d.get("nodes"), d.get("edges"), d.get("max_nodes"), GraphScores.from_dict(sc) if sc else None,
                   d.get("spec"), d.get("seconds"), _split(d, _FIGURE_KEYS))


def figure_of(graph: _HasMetadata) -> FigureRecord | None:
    d = graph.metadata.get("figure")
    return FigureRecord.from_dict(d) if d else None


def store_figure(graph: _HasMetadata, record: FigureRecord) -> None:
    graph.metadata["figure"] = record.to_dict()


def card_of(graph: _HasMetadata) -> dict[str, Any] | None:
    """The stored provenance card (``graphs/card.py`` builds it), or None."""
    return graph.metadata.get("card")


def store_card(graph: _HasMetadata, card: dict[str, Any]) -> None:
    graph.metadata["card"] = card
