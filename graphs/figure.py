"""Compact circuit figures: which nodes a figure shows, how they merge, what its edges weigh, and scores.

A figure is described by a :class:`FigureSpec` — the node ids to draw on their own ("pins") and named
groups drawn as one node each (supernodes, or the error nodes of one position) — so the automatic
figure of ``trace``/``render`` and a hand-made one of ``sparsetrace figure`` go through the same code,
and every figure can be saved as its spec and redrawn.

**The automatic figure** (:func:`auto_spec`) of a pruned graph:

1. candidates are the nodes the pruning kept; the error nodes of one position form one candidate
   whose influence is the sum of theirs;
2. candidates are taken in order of influence on the targets (the pruning's stored influence, the
   full graph's I of each kept node, docs/design.md §5) and merged on the fly into supernodes when a feature
   is related to one already taken: the same transcoder feature at another position, or a feature at
   the same position with the same label or a decoder cosine ≥ ``merge_cosine``;
3. this stops before the first candidate that would make more than ``max_nodes`` drawn nodes, so the
   drawn members are exactly a prefix of the influence ranking;
4. logits with probability ≥ ``logit_ratio`` × the top one (at most ``max_logits``) and the tokens that
   feed a drawn node directly are added.

**Edges between drawn nodes** (:func:`build_figure`): the signed sum of the direct edges from every
member of the source to every member of the target (edges are linear in their source, so a group's
edge is exactly that sum; edges inside one group are not drawn). Each edge's ``share`` is its |weight|
over the target's total absolute input (all its members' inputs plus their rows' remainders), i.e. the
part of the target's input it carries. The ``max_edges`` strongest by ``share × (I_target + w_target)``
are drawn, after every drawn node's strongest out-edge and in-edge.

**Scores of a figure** (:func:`subgraph_scores`, docs/design.md §12): the graph's replacement and
completeness scores with every feature that is not drawn folded into the error node at its (layer,
position), exactly as the pruned graph's scores fold pruned features (graphs/scores.py). With all
features drawn they equal the full graph's scores; with the pruned node set, the pruned graph's.
Grouping does not change them (a group is its members).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsetrace.config import FigureConfig, ImageConfig, _check_width
from sparsetrace.errors import ConfigError

from .graph import Adjacency, AttributionGraph, NodeKind, NodeLayout
from .records import feature_labels_of, store_influence, stored_influence
from .scores import GraphScores, pruned_graph_scores

__all__ = [
    "FigureConfig",
    "FigureGroup",
    "FigureSpec",
    "Unit",
    "Figure",
    "NodeText",
    "node_texts",
    "auto_spec",
    "build_figure",
    "subgraph_scores",
    "draw_figure",
    "node_ids",
    "mask_of",
    "spec_info",
    "SPEC_KEYS",
]

SPEC_KEYS = ("title", "nodes", "groups", "labels", "width", "max_edges")
"""Keys a figure spec may set; ``graph``, ``scores``, ``drawn`` and ``generated_by`` are informational
(written beside a figure, ignored when it is read back)."""
_INFO_KEYS = ("graph", "scores", "drawn", "generated_by", "format")
SPEC_FORMAT = "sparsetrace-figure-spec-1"






# ---- the spec -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureGroup:
    """Nodes drawn as one: features (a supernode) or error nodes; ``name`` is its label."""

    name: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class FigureSpec:
    """What a figure draws. Node ids are the graph's (``F{layer}.{feature}@{pos}``, ``E{layer}@{pos}``,
    ``T@{pos}``, ``L{k}``)."""

    nodes: tuple[str, ...] = ()
    """Nodes drawn on their own (pins)."""
    groups: tuple[FigureGroup, ...] = ()
    """Named groups, each drawn as one node."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Display labels by node id or group name (default: the graph's labels, the group's name)."""
    title: str | None = None
    width: float | None = None
    """Inches; None: the config's."""
    max_edges: int | None = None
    """At most this many edges; None: the config's ``max_edges``."""

    @classmethod
    def from_dict(cls, d: Any, where: str = "spec") -> "FigureSpec":
        """Validate a parsed JSON/YAML document (one-line ConfigErrors naming the key)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a mapping with keys {', '.join(SPEC_KEYS)}; got {type(d).__name__}")
        unknown = sorted(set(d) - set(SPEC_KEYS) - set(_INFO_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(SPEC_KEYS)}")
        nodes = _id_list(d.get("nodes", []), f"{where}: nodes")
        groups_in = d.get("groups", [])
        if isinstance(groups_in, Mapping):  # {name: [ids]} is accepted too
            groups_in = [{"name": k, "nodes": v} for k, v in groups_in.items()]
        if not isinstance(groups_in, list):
            raise ConfigError(f"{where}: groups must be a list of {{name, nodes}}; got {type(groups_in).__name__}")
        groups = []
        for k, g in enumerate(groups_in):
            if not isinstance(g, Mapping) or not isinstance(g.get("name"), str) or not g["name"].strip():
                raise ConfigError(f"{where}: group #{k} needs a non-empty 'name' and a 'nodes' list")
            members = _id_list(g.get("nodes", []), f"{where}: group {g['name']!r}")
            if not members:
                raise ConfigError(f"{where}: group {g['name']!r} is empty; allowed: a list of one or more node ids")
            groups.append(FigureGroup(g["name"], members))
        labels = d.get("labels", {}) or {}
        if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ConfigError(f"{where}: labels must map node ids or group names to strings")
        title = d.get("title")
        if title is not None and not isinstance(title, str):
            raise ConfigError(f"{where}: title must be a string")
        width = d.get("width")
        if width is not None:
            width = _check_width(width, f"{where}: width")
        max_edges = d.get("max_edges")
        if max_edges is not None and (isinstance(max_edges, bool) or not isinstance(max_edges, int) or max_edges < 0):
            raise ConfigError(f"{where}: max_edges={max_edges!r}; allowed: an integer ≥ 0, or null for all")
        spec = cls(nodes, tuple(groups), dict(labels), title, width, max_edges)
        spec.check_names(where)
        return spec

    def check_names(self, where: str = "spec") -> None:
        """Every node listed once; group names unique and not node ids; something to draw."""
        if not self.nodes and not self.groups:
            raise ConfigError(f"{where}: lists no nodes; allowed: 'nodes' and/or 'groups' with node ids of the graph")
        seen: dict[str, str] = {}
        for where_, ids in [("nodes", self.nodes)] + [(f"group {g.name!r}", g.nodes) for g in self.groups]:
            for i in ids:
                if i in seen:
                    raise ConfigError(f"{where}: node {i!r} is listed twice (in {seen[i]} and {where_}); list each node once")
                seen[i] = where_
        names = [g.name for g in self.groups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{where}: group name {dup[0]!r} is used twice; allowed: unique names")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": SPEC_FORMAT}
        if self.title is not None:
            d["title"] = self.title
        d["nodes"] = list(self.nodes)
        d["groups"] = [{"name": g.name, "nodes": list(g.nodes)} for g in self.groups]
        if self.labels:
            d["labels"] = dict(self.labels)
        if self.width is not None:
            d["width"] = self.width
        if self.max_edges is not None:
            d["max_edges"] = self.max_edges
        return d

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FigureSpec":
        """Read a spec from a ``.json``, ``.yaml`` or ``.yml`` file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--spec {str(path)!r} cannot be read: {exc.strerror or exc}") from None
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # json and yaml raise their own error types
            kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
            raise ConfigError(f"--spec {str(path)!r} is not valid {kind}: {' '.join(str(exc).split())}") from None
        return cls.from_dict(data, where=f"spec {path.name}")


def _id_list(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where} must be a list of node id strings, e.g. [\"F3.12@4\", \"L0\"]")
    return tuple(v)


# ---- labels ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeText:
    """What a figure and the viewer say about one feature."""

    short: str
    """A few words: the figure's box text."""
    full: str
    """Words, a context and promoted tokens: the viewer's and the card's label."""
    source: str
    """"statistics", "token lens" or "none"."""
    precision: float | None = None
    recall: float | None = None


def node_texts(graph: AttributionGraph) -> dict[tuple[int, int], NodeText]:
    """``{(layer, feature): NodeText}`` from each feature's info (written by ``trace`` from the feature
    statistics or the token lens), else its plain short label (:class:`~sparsetrace.graphs.records.FeatureLabels`)."""
    labels = feature_labels_of(graph)
    out: dict[tuple[int, int], NodeText] = {}
    for key, text in (labels.labels or {}).items():
        out[key] = NodeText(text, text, "unknown")
    for key, info in (labels.info or {}).items():
        label = info.label if "label" in info.present else ""
        out[key] = NodeText(info.short or label, label, info.source if "source" in info.present else "unknown",
                            info.precision, info.recall)
    return out


def node_ids(layout: NodeLayout) -> list[str]:
    return [layout.node_id(i) for i in range(layout.n_nodes)]


def _id_index(graph: AttributionGraph) -> dict[str, int]:
    return {nid: i for i, nid in enumerate(node_ids(graph.layout))}


def mask_of(graph: AttributionGraph, sub: AttributionGraph) -> np.ndarray:
    """bool [graph.n_nodes]: the nodes of ``graph`` that ``sub`` (e.g. its pruned graph) also has."""
    index = _id_index(graph)
    mask = np.zeros(graph.n_nodes, bool)
    for nid in node_ids(sub.layout):
        j = index.get(nid)
        if j is not None:
            mask[j] = True
    return mask


# ---- the automatic spec ---------------------------------------------------------------------------
class _Union:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def add(self, i: int) -> None:
        self.parent.setdefault(i, i)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _similar_pairs(graph: AttributionGraph, threshold: float) -> set[tuple[tuple[int, int], tuple[int, int]]]:
    """(layer, feature) pairs whose decoder cosine ≥ threshold (the graph's recorded decoder cosines)."""
    dc = feature_labels_of(graph).decoder_cosine
    out = set()
    for ka, kb, c in (dc.pairs if dc is not None else []):
        if c >= threshold:
            out.add((ka, kb))
            out.add((kb, ka))
    return out


def auto_spec(
    graph: AttributionGraph,
    config: FigureConfig | None = None,
    influence: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    title: str | None = None,
) -> FigureSpec:
    """The automatic compact figure of ``graph`` (module docstring).

    ``influence`` [N]: each node's influence on the targets (default the stored influence when
    it has one entry per node, else computed); ``candidates`` [N] bool: nodes that may be drawn (default:
    every node — pass the pruning's node mask when ``graph`` is the full graph)."""
    cfg = config or FigureConfig()
    lay = graph.layout
    n = graph.n_nodes
    infl = _influence(graph, influence)
    cand = np.ones(n, bool) if candidates is None else np.asarray(candidates, dtype=bool)
    ids = node_ids(lay)
    texts = node_texts(graph)
    similar = _similar_pairs(graph, cfg.merge_cosine)

    # candidates: one per feature, one per position for its error nodes
    items: list[tuple[float, int, str, list[int]]] = []  # (influence, first index, kind, members)
    feats = np.flatnonzero(cand & (lay.kind == NodeKind.FEATURE) & (lay.feature >= 0))
    for i in feats:
        items.append((float(infl[i]), int(i), "feature", [int(i)]))
    errs = np.flatnonzero(cand & (lay.kind == NodeKind.ERROR))
    for p in np.unique(lay.pos[errs]):
        m = errs[lay.pos[errs] == p]
        items.append((float(infl[m].sum()), int(m[0]), "error", [int(x) for x in m]))
    items.sort(key=lambda t: (-t[0], t[1]))

    uf = _Union()
    taken: list[int] = []  # feature node indices taken
    error_units: list[list[int]] = []
    n_units = 0
    for score, _, kind, members in items:
        if score <= 0:
            break
        if kind == "error":
            if n_units + 1 > cfg.max_nodes:
                break
            error_units.append(members)
            n_units += 1
            continue
        i = members[0]
        key_i = (int(lay.layer[i]), int(lay.feature[i]))
        text_i = texts.get(key_i)
        related = set()
        for j in taken:
            key_j = (int(lay.layer[j]), int(lay.feature[j]))
            same_pos = lay.pos[j] == lay.pos[i]
            if key_j == key_i:
                related.add(uf.find(j))
            elif same_pos and (key_i, key_j) in similar:
                related.add(uf.find(j))
            elif same_pos and text_i is not None and text_i.source == "statistics":
                text_j = texts.get(key_j)
                if text_j is not None and text_j.source == "statistics" and text_j.short == text_i.short:
                    related.add(uf.find(j))
        if n_units + 1 - len(related) > cfg.max_nodes:
            break
        uf.add(i)
        for r in related:
            uf.union(r, i)
        taken.append(i)
        n_units += 1 - len(related)

    # the spec: singletons are pins, merged features and multi-error positions are groups
    comps: dict[int, list[int]] = {}
    for i in taken:
        comps.setdefault(uf.find(i), []).append(i)
    pins: list[str] = []
    groups: list[FigureGroup] = []
    names: set[str] = set()

    def unique(name: str) -> str:
        base, k = name, 2
        while name in names or name in ids:
            name, k = f"{base} ({k})", k + 1
        names.add(name)
        return name

    for root in sorted(comps, key=lambda r: min(comps[r])):
        m = sorted(comps[root])
        if len(m) == 1:
            pins.append(ids[m[0]])
            continue
        best = max(m, key=lambda j: (infl[j], -j))
        t = texts.get((int(lay.layer[best]), int(lay.feature[best])))
        groups.append(FigureGroup(unique(t.short if t and t.short else f"{ids[best]} +{len(m) - 1}"), tuple(ids[j] for j in m)))
    for m in error_units:
        if len(m) == 1:
            pins.append(ids[m[0]])
        else:
            p = int(lay.pos[m[0]])
            groups.append(FigureGroup(unique(f"errors @{p}"), tuple(ids[j] for j in sorted(m))))

    # logits and the tokens that feed what is drawn
    probs = np.asarray(graph.logit_probability, dtype=np.float64)
    order = np.argsort(-probs, kind="stable")
    top = probs[order[0]] if len(order) else 0.0
    logits = [int(k) for k in order[: cfg.max_logits] if probs[k] >= cfg.logit_ratio * top]
    drawn = np.zeros(n, bool)
    for t in taken:
        drawn[t] = True
    for m in error_units:
        drawn[m] = True
    drawn[[lay.logit_index(k) for k in logits]] = True
    adj = graph.adjacency
    rows = adj.rows()
    tok = lay.kind[adj.indices] == NodeKind.TOKEN
    fed = np.unique(adj.indices[tok & drawn[rows] & (adj.data != 0)])
    tokens = [ids[int(i)] for i in sorted(fed)]
    return FigureSpec(
        nodes=tuple(tokens + pins + [ids[lay.logit_index(k)] for k in sorted(logits)]),
        groups=tuple(groups),
        title=title,
    )


# ---- the figure's graph -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Unit:
    """One drawn node: a single node of the graph or a group."""

    key: str
    """Node id (pins) or group name."""
    kind: str
    """feature, supernode, error, token or logit."""
    members: tuple[int, ...]
    """Node indices in the graph."""
    label: str
    layer: float
    """Height: the members' layer (groups: the influence-weighted mean; error groups: the lowest)."""
    pos: float
    """x in token positions (groups: the mean of their members' distinct positions)."""
    influence: float
    """Σ of the members' influence on the targets."""
    share: float | None = None
    """Error units: their share of the influence that ends at tokens or errors (sums to 1 − replacement)."""
    layers: tuple[int, int] = (0, 0)
    """Lowest and highest member layer."""


@dataclass(frozen=True, eq=False)
class Figure:
    """Everything a drawing needs: units, the edges between them, and the axes."""

    units: list[Unit]
    src: np.ndarray
    """int [E] source unit of each drawn edge."""
    dst: np.ndarray
    """int [E] target unit."""
    weight: np.ndarray
    """float [E] signed sum of the member edges."""
    share: np.ndarray
    """float [E] |weight| / the target's total absolute input."""
    token_strings: list[str]
    n_layers: int
    title: str | None
    scores: GraphScores | None
    n_graph_nodes: int
    label_source: str
    spec: FigureSpec


def _kind_name(k: int) -> str:
    return {NodeKind.FEATURE: "feature", NodeKind.ERROR: "error", NodeKind.TOKEN: "token", NodeKind.LOGIT: "logit"}[NodeKind(k)]


def _resolve(graph: AttributionGraph, spec: FigureSpec, where: str) -> list[tuple[str, str, list[int]]]:
    """(key, kind, member indices) per unit; ConfigError for ids the graph lacks and bad groups."""
    index = _id_index(graph)
    lay = graph.layout

    def look(i: str, owner: str) -> int:
        if i not in index:
            example = next((x for x in index if x.startswith("F")), next(iter(index), "L0"))
            raise ConfigError(
                f"{where}: {owner} names node {i!r}, which the graph does not have; allowed: node ids of GRAPH "
                f"(F{{layer}}.{{feature}}@{{pos}}, E{{layer}}@{{pos}}, T@{{pos}}, L{{k}}), e.g. {example!r}"
            )
        return index[i]

    out = []
    for i in spec.nodes:
        j = look(i, "nodes")
        out.append((i, _kind_name(int(lay.kind[j])), [j]))
    for g in spec.groups:
        m = [look(i, f"group {g.name!r}") for i in g.nodes]
        kinds = {int(lay.kind[j]) for j in m}
        if kinds == {NodeKind.FEATURE}:
            kind = "supernode"
        elif kinds == {NodeKind.ERROR}:
            kind = "error"
        else:
            names = ", ".join(sorted(_kind_name(k) for k in kinds))
            raise ConfigError(f"{where}: group {g.name!r} mixes {names} nodes; allowed: features only, or error nodes only")
        out.append((g.name, kind, m))
    return out


def _influence(graph: AttributionGraph, influence: np.ndarray | None) -> np.ndarray:
    """``influence`` as float64 [N]; by default the pruning's stored influence when it covers every node,
    else computed on ``graph``."""
    if influence is None:
        from .prune import node_influence

        influence = stored_influence(graph)
        influence = influence if influence is not None else node_influence(graph)
    return np.asarray(influence, dtype=np.float64)


def build_figure(
    graph: AttributionGraph,
    spec: FigureSpec,
    config: FigureConfig | None = None,
    influence: np.ndarray | None = None,
    scores: bool = True,
    where: str = "spec",
) -> Figure:
    """The units, edges and scores of ``spec`` drawn from ``graph`` (module docstring)."""
    cfg = config or FigureConfig()
    spec.check_names(where)
    resolved = _resolve(graph, spec, where)
    lay = graph.layout
    n = graph.n_nodes
    infl = _influence(graph, influence)
    w_logit = graph.logit_weights()
    texts = node_texts(graph)
    kind = lay.kind
    source_total = float(infl[(kind == NodeKind.TOKEN) | (kind == NodeKind.ERROR)].sum())

    units: list[Unit] = []
    for key, k, m in resolved:
        idx = np.asarray(m, dtype=np.int64)
        layers = lay.layer[idx]
        i_sum = float(infl[idx].sum())
        if k == "error" and len(m) > 1:
            layer = float(layers.min())
        elif len(m) > 1:
            wts = np.maximum(infl[idx], 0)
            layer = float((layers * wts).sum() / wts.sum()) if wts.sum() > 0 else float(layers.mean())
        else:
            layer = float(layers[0])
        pos = float(np.unique(lay.pos[idx]).mean())
        share = i_sum / source_total if k == "error" and source_total > 0 else None
        label = spec.labels.get(key) or _default_label(graph, k, key, m, texts, share)
        units.append(Unit(key, k, tuple(int(x) for x in m), label, layer, pos, i_sum, share,
                          (int(layers.min()), int(layers.max()))))

    src, dst, weight, share = _unit_edges(graph, units)
    # importance of a target: its members' influence plus their logit weight
    imp = np.array([float(infl[list(u.members)].sum() + w_logit[list(u.members)].sum()) for u in units])
    max_edges = spec.max_edges if spec.max_edges is not None else cfg.max_edges
    keep = _pick_edges(src, dst, share, imp, max_edges, cfg.min_edge_share)
    sc = None
    if scores:
        feat_mask = np.zeros(n, bool)
        for u in units:
            if u.kind in ("feature", "supernode"):
                feat_mask[list(u.members)] = True
        sc = subgraph_scores(graph, feat_mask)
    sources = {t.source for t in texts.values()}
    label_source = "feature statistics" if "statistics" in sources else ("token lens (no feature statistics)" if "token lens" in sources else "none recorded")
    return Figure(
        units=units, src=src[keep], dst=dst[keep], weight=weight[keep], share=share[keep],
        token_strings=list(graph.token_strings), n_layers=lay.n_layers, title=spec.title, scores=sc,
        n_graph_nodes=n, label_source=label_source, spec=spec,
    )


def _default_label(graph: AttributionGraph, kind: str, key: str, members: list[int], texts, share) -> str:
    lay = graph.layout
    i = members[0]
    if kind == "feature":
        t = texts.get((int(lay.layer[i]), int(lay.feature[i])))
        return t.short if t and t.short else key
    if kind == "supernode":
        return key
    if kind == "error":
        pct = f" {100 * share:.0f}%" if share is not None else ""
        return (f"error L{lay.layer[i]}" if len(members) == 1 else "errors") + pct
    if kind == "token":
        return graph.token_strings[int(lay.pos[i])]
    k = i - lay.logits.start
    tok = graph.logit_label[k].replace("\n", "⏎").strip() or repr(graph.logit_label[k])
    return f"{tok} {float(graph.logit_probability[k]):.2f}"


def _unit_edges(graph: AttributionGraph, units: Sequence[Unit]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, signed weight, share) of every non-zero edge between two distinct units."""
    n = graph.n_nodes
    unit_of = np.full(n, -1, dtype=np.int64)
    for u, unit in enumerate(units):
        unit_of[list(unit.members)] = u
    adj = graph.adjacency
    member_rows = np.flatnonzero(unit_of >= 0)
    # only the rows of drawn nodes are read: cheap on a full graph of millions of edges
    starts, stops = adj.indptr[member_rows], adj.indptr[member_rows + 1]
    counts = stops - starts
    entry = np.repeat(starts - np.cumsum(np.concatenate([[0], counts[:-1]])), counts) + np.arange(counts.sum())
    rows = np.repeat(member_rows, counts)
    cols = adj.indices[entry].astype(np.int64)
    data = adj.data[entry].astype(np.float64)
    t, s = unit_of[rows], unit_of[cols]
    # a target's input mass: all its members' absolute inputs and remainders
    mass = np.zeros(len(units))
    np.add.at(mass, t, np.abs(data))
    np.add.at(mass, unit_of[member_rows], adj.remainder[member_rows].astype(np.float64))
    sel = (s >= 0) & (s != t)
    U = max(len(units), 1)
    key = t[sel] * U + s[sel]
    uniq, inv = np.unique(key, return_inverse=True)
    w = np.zeros(len(uniq))
    np.add.at(w, inv, data[sel])
    dst, src = np.divmod(uniq, U)
    nz = w != 0
    dst, src, w = dst[nz], src[nz], w[nz]
    share = np.abs(w) / np.where(mass[dst] > 0, mass[dst], 1.0)
    return src, dst, w, share


def _pick_edges(src, dst, share, importance, max_edges: int, min_share: float) -> np.ndarray:
    """Indices of the edges to draw: above ``min_share``; each unit's strongest out- and in-edge first,
    then the rest by ``share × importance(target)``, ``max_edges`` in all."""
    ok = np.flatnonzero(share >= min_share)
    score = share[ok] * importance[dst[ok]]
    order = ok[np.lexsort((ok, -score))]
    chosen: list[int] = []
    seen = set()
    for end in (src, dst):  # strongest out-edge of every source, then in-edge of every target
        best: dict[int, int] = {}
        for e in order:
            best.setdefault(int(end[e]), int(e))
        for u in sorted(best):
            e = best[u]
            if e not in seen and len(chosen) < max_edges:
                chosen.append(e)
                seen.add(e)
    for e in order:
        if len(chosen) >= max_edges:
            break
        if int(e) not in seen:
            chosen.append(int(e))
            seen.add(int(e))
    return np.asarray(sorted(chosen), dtype=np.int64)


# ---- scores -----------------------------------------------------------------------------------------
def _with_all_errors(graph: AttributionGraph) -> AttributionGraph:
    """The graph with an error node (no edges, activation 0) at every (layer, position) that lacks one —
    the fold targets a pruned graph may have dropped."""
    lay = graph.layout
    have = np.zeros((lay.n_layers, lay.n_pos), bool)
    e = lay.errors
    have[lay.layer[e], lay.pos[e]] = True
    missing_l, missing_p = np.nonzero(~have)
    if len(missing_l) == 0:
        return graph
    n_old = graph.n_nodes
    kind = np.concatenate([lay.kind, np.full(len(missing_l), NodeKind.ERROR, np.int8)])
    layer = np.concatenate([lay.layer, missing_l])
    pos = np.concatenate([lay.pos, missing_p])
    feat = np.concatenate([lay.feature, np.full(len(missing_l), -1)])
    # canonical order: features | errors (layer-major) | tokens | logits
    block = np.where(kind == NodeKind.ERROR, 1, np.where(kind == NodeKind.FEATURE, 0, np.where(kind == NodeKind.TOKEN, 2, 3)))
    within = np.where(kind == NodeKind.ERROR, layer.astype(np.int64) * lay.n_pos + pos, np.arange(len(kind)))
    order = np.lexsort((within, block))
    new_of = np.empty(len(order), np.int64)
    new_of[order] = np.arange(len(order))
    layout = NodeLayout(lay.n_layers, lay.n_pos, kind[order], layer[order], pos[order], feat[order])
    adj = graph.adjacency
    n_new = len(order)
    rem = np.zeros(n_new, dtype=adj.remainder.dtype)
    rem[new_of[:n_old]] = adj.remainder
    new_adj = Adjacency.from_coo(new_of[adj.rows()], new_of[adj.indices.astype(np.int64)], adj.data, n_new, rem)

    def spread(x: np.ndarray) -> np.ndarray:
        out = np.zeros(n_new, dtype=np.asarray(x).dtype)
        out[new_of[:n_old]] = x
        return out

    import dataclasses

    out = dataclasses.replace(graph, layout=layout, adjacency=new_adj, activation=spread(graph.activation),
                              bias=spread(graph.bias), value=spread(graph.value), metadata=dict(graph.metadata))
    store_influence(out, None)  # per-node lists no longer line up
    return out


def subgraph_scores(graph: AttributionGraph, features: np.ndarray) -> GraphScores:
    """Replacement and completeness of the subgraph whose features are ``features`` [N] bool: every
    other feature folded into the error node at its (layer, position) (module docstring)."""
    features = np.asarray(features, dtype=bool)
    if features.shape != (graph.n_nodes,):
        raise ConfigError(f"features mask has shape {features.shape}; the graph has {graph.n_nodes} nodes")
    lay = graph.layout
    folded = (lay.kind == NodeKind.FEATURE) & ~features
    if folded.any():
        err = np.asarray(lay.error_index(lay.layer[folded], lay.pos[folded]))
        if np.any(err < 0):
            g2 = _with_all_errors(graph)
            keep_ids = set(np.asarray(node_ids(lay))[features & (lay.kind == NodeKind.FEATURE)])
            mask2 = np.array([nid in keep_ids for nid in node_ids(g2.layout)])
            return pruned_graph_scores(g2, mask2)
    return pruned_graph_scores(graph, features | (lay.kind != NodeKind.FEATURE))


def draw_figure(fig: Figure, paths: Sequence[str | os.PathLike], width: float | None = None, dpi: int = ImageConfig.dpi) -> list[Path]:
    """Draw ``fig`` to every path (PNG, SVG or PDF by suffix; graphs/_paper.py): ``width`` inches
    (default: the spec's, else 7)."""
    from ._paper import draw_figure as draw

    w = width if width is not None else (fig.spec.width or FigureConfig().width)
    return draw(fig, paths, _check_width(w, "width"), dpi)


def spec_info(fig: Figure, graph_path: str | None) -> dict[str, Any]:
    """The spec as saved beside a figure: the spec itself plus what was drawn and its scores."""
    d = fig.spec.to_dict()
    d["graph"] = graph_path
    d["drawn"] = {"nodes": len(fig.units), "edges": int(len(fig.src)), "of_graph_nodes": fig.n_graph_nodes}
    if fig.scores is not None:
        d["scores"] = {k: (None if not math.isfinite(v) else v) for k, v in fig.scores.to_dict().items()}
    d["generated_by"] = "sparsetrace figure"
    return d

