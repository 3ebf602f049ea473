"""Graph export: networkx (and back), node-link JSON, GraphML, circuit-tracer / Neuronpedia JSON, CSV.

Every file is written atomically (a temp file in the target folder, then ``os.replace``), so an error
never leaves a partial file. Feature labels are an optional ``labels: {(layer, feature): text}``.

networkx convention: node keys are the layout's readable ids (``F3.1234@5``, ``E3@5``, ``T@5``, ``L0``),
edges run source → target (the direction information flows), and the graph-level fields that a
round-trip needs are one JSON string in ``G.graph["sparsetrace"]`` (GraphML allows only scalars).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from sparsetrace.errors import FormatError

from .graph import Adjacency, AttributionGraph, NodeKind, NodeLayout, _atomic_write
from .records import prune_summary_of, stored_influence

__all__ = [
    "NodeInfo",
    "node_table",
    "to_networkx",
    "from_networkx",
    "write_node_link_json",
    "read_node_link_json",
    "write_graphml",
    "read_graphml",
    "to_circuit_tracer_json",
    "write_circuit_tracer_json",
    "write_csv",
    "CT_SCHEMA_VERSION",
]

Labels = Mapping[tuple[int, int], str]
CT_SCHEMA_VERSION = 1
_KIND_NAME = {NodeKind.FEATURE: "feature", NodeKind.ERROR: "error", NodeKind.TOKEN: "token", NodeKind.LOGIT: "logit"}
_KIND_OF = {v: k for k, v in _KIND_NAME.items()}
_CT_TYPE = {
    NodeKind.FEATURE: "cross layer transcoder",
    NodeKind.ERROR: "mlp reconstruction error",
    NodeKind.TOKEN: "embedding",
    NodeKind.LOGIT: "logit",
}


@dataclass(frozen=True)
class NodeInfo:
    """One node, as every exporter and renderer shows it."""

    index: int
    """Index in the graph's layout."""
    node_id: str
    """``layout.node_id``: ``F{layer}.{feature}@{pos}``, ``E{layer}@{pos}``, ``T@{pos}``, ``L{k}``."""
    kind: str
    """"feature", "error", "token" or "logit" (supernodes are features with ``feature ≤ -2``)."""
    layer: int
    pos: int
    token: str
    """The prompt token at ``pos`` (for logits: the predicted token's label)."""
    feature: int
    activation: float
    influence: float | None
    label: str
    """A short display text: the feature label or supernode name, the token, the logit label."""


def _influence(graph: AttributionGraph, influence: np.ndarray | None) -> np.ndarray | None:
    if influence is not None:
        influence = np.asarray(influence, dtype=np.float64)
        if influence.shape != (graph.n_nodes,):
            raise FormatError(f"influence must have {graph.n_nodes} entries, got {influence.shape}")
        return influence
    return stored_influence(graph)


def node_table(
    graph: AttributionGraph, labels: Labels | None = None, influence: np.ndarray | None = None
) -> list[NodeInfo]:
    """One :class:`NodeInfo` per node, in layout order. ``influence`` defaults to
    the stored influence when it has one entry per node (as :func:`apply_prune` stores it)."""
    lay = graph.layout
    labels = labels or {}
    infl = _influence(graph, influence)
    names = graph.metadata.get("supernode_names", {})
    out = []
    for i in range(graph.n_nodes):
        kind = NodeKind(int(lay.kind[i]))
        layer, pos, feat = int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])
        if kind is NodeKind.LOGIT:
            k = i - lay.logits.start
            token = graph.logit_label[k]
            label = f"{token} (p={float(graph.logit_probability[k]):.3f})"
        else:
            token = graph.token_strings[pos]
            if kind is NodeKind.FEATURE:
                label = names.get(str(feat)) if feat <= -2 else labels.get((layer, feat))
                label = label or f"F{layer}.{feat}"
            elif kind is NodeKind.ERROR:
                label = f"error {layer}@{pos}"
            else:
                label = token
        out.append(
            NodeInfo(
                index=i,
                node_id=lay.node_id(i),
                kind=_KIND_NAME[kind],
                layer=layer,
                pos=pos,
                token=token,
                feature=feat,
                activation=float(graph.activation[i]),
                influence=None if infl is None else float(infl[i]),
                label=label,
            )
        )
    return out


# ---- networkx ---------------------------------------------------------------------------------------
def _header(graph: AttributionGraph) -> str:
    return json.dumps(
        {
            "n_layers": graph.layout.n_layers,
            "n_pos": graph.layout.n_pos,
            "token_ids": [int(x) for x in graph.token_ids],
            "token_strings": list(graph.token_strings),
            "logit_token": [int(x) for x in graph.logit_token],
            "logit_probability": [float(x) for x in graph.logit_probability],
            "logit_label": list(graph.logit_label),
            "prompt": graph.prompt,
            "metadata": graph.metadata,
        }
    )


def to_networkx(
    graph: AttributionGraph, labels: Labels | None = None, influence: np.ndarray | None = None
) -> nx.DiGraph:
    """A DiGraph with typed node attributes (index, kind, layer, position, token, feature, activation,
    bias, value, remainder, label, influence when known) and edge attributes (weight, abs_weight, sign)."""
    G = nx.DiGraph()
    G.graph["sparsetrace"] = _header(graph)
    rem = graph.adjacency.remainder
    for info in node_table(graph, labels, influence):
        i = info.index
        attrs = dict(
            index=i,
            kind=info.kind,
            layer=info.layer,
            position=info.pos,
            token=info.token,
            feature=info.feature,
            activation=info.activation,
            bias=float(graph.bias[i]),
            value=float(graph.value[i]),
            remainder=float(rem[i]),
            label=info.label,
        )
        if info.influence is not None:
            attrs["influence"] = info.influence
        G.add_node(info.node_id, **attrs)
    ids = [graph.layout.node_id(i) for i in range(graph.n_nodes)]
    adj = graph.adjacency
    for t, s, w in zip(adj.rows().tolist(), adj.indices.tolist(), adj.data.tolist()):
        G.add_edge(ids[s], ids[t], weight=w, abs_weight=abs(w), sign=1 if w >= 0 else -1)
    return G


def from_networkx(G: nx.DiGraph) -> AttributionGraph:
    """The AttributionGraph that :func:`to_networkx` made ``G`` from (values round-trip exactly)."""
    if "sparsetrace" not in G.graph:
        raise FormatError("this networkx graph was not made by sparsetrace's to_networkx (no 'sparsetrace' graph attribute)")
    head = json.loads(G.graph["sparsetrace"])
    nodes = sorted(G.nodes(data=True), key=lambda kv: int(kv[1]["index"]))
    if [int(d["index"]) for _, d in nodes] != list(range(len(nodes))):
        raise FormatError("node 'index' attributes must be 0..N-1 exactly once each")
    try:
        kind = np.array([_KIND_OF[d["kind"]] for _, d in nodes], dtype=np.int8)
    except KeyError as exc:
        raise FormatError(f"unknown node kind {exc.args[0]!r}; allowed: {sorted(_KIND_OF)}") from None
    col = lambda key, dtype: np.array([d[key] for _, d in nodes], dtype=dtype)  # noqa: E731
    layout = NodeLayout(
        head["n_layers"], head["n_pos"], kind, col("layer", np.int32), col("position", np.int32), col("feature", np.int64)
    )
    index = {key: int(d["index"]) for key, d in nodes}
    edges = list(G.edges(data="weight"))
    n = len(nodes)
    adj = Adjacency.from_coo(
        np.array([index[t] for _, t, _ in edges], dtype=np.int64),
        np.array([index[s] for s, _, _ in edges], dtype=np.int64),
        np.array([float(w) for _, _, w in edges], dtype=np.float64),
        n,
        col("remainder", np.float64),
    )
    return AttributionGraph(
        layout=layout,
        adjacency=adj,
        activation=col("activation", np.float64),
        bias=col("bias", np.float64),
        value=col("value", np.float64),
        token_ids=np.array(head["token_ids"], dtype=np.int64),
        token_strings=head["token_strings"],
        logit_token=np.array(head["logit_token"], dtype=np.int64),
        logit_probability=np.array(head["logit_probability"], dtype=np.float64),
        logit_label=head["logit_label"],
        prompt=head["prompt"],
        metadata=head["metadata"],
    )


def _write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    _atomic_write(path, write)
    return path


def write_node_link_json(
    graph: AttributionGraph, path: str | os.PathLike, labels: Labels | None = None
) -> Path:
    """networkx node-link JSON (``nodes`` / ``links``) of :func:`to_networkx`; atomic."""
    data = nx.node_link_data(to_networkx(graph, labels), edges="links")
    return _write_text(path, json.dumps(data))


def read_node_link_json(path: str | os.PathLike) -> AttributionGraph:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        G = nx.node_link_graph(data, directed=True, edges="links")
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(f"{str(path)!r} is not a node-link JSON graph: {exc}") from None
    return from_networkx(G)


def write_graphml(graph: AttributionGraph, path: str | os.PathLike, labels: Labels | None = None) -> Path:
    """GraphML of :func:`to_networkx` (networkx's writer); atomic."""
    G = to_networkx(graph, labels)
    _atomic_write(Path(path), lambda tmp: nx.write_graphml(G, tmp))
    return Path(path)


def read_graphml(path: str | os.PathLike) -> AttributionGraph:
    try:
        G = nx.read_graphml(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(f"{str(path)!r} is not a readable GraphML graph: {exc}") from None
    except Exception as exc:  # xml.etree.ElementTree.ParseError and friends
        raise FormatError(f"{str(path)!r} is not a readable GraphML graph: {exc}") from None
    return from_networkx(G)


# ---- circuit-tracer / Neuronpedia frontend JSON (docs/design.md §8) ----------------------------------------
def _ct_ids(graph: AttributionGraph) -> tuple[list[str], list[str]]:
    """(node_id, jsNodeId) per node in the frontend's id scheme."""
    lay = graph.layout
    L = lay.n_layers
    node_ids, js_ids = [], []
    for i in range(graph.n_nodes):
        kind = NodeKind(int(lay.kind[i]))
        layer, pos, feat = int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])
        if kind is NodeKind.FEATURE:
            node_ids.append(f"{layer}_{feat}_{pos}")
            js_ids.append(f"{layer}_{feat}-0")  # the frontend groups one feature across positions
        elif kind is NodeKind.ERROR:
            node_ids.append(f"{layer}_-1_{pos}")  # -1 never collides with a feature id
            js_ids.append(f"{layer}_-1-{pos}")
        elif kind is NodeKind.TOKEN:
            tid = int(graph.token_ids[pos])
            node_ids.append(f"E_{tid}_{pos}")
            js_ids.append(f"E_{tid}-{pos}")
        else:
            k = i - lay.logits.start
            tid = int(graph.logit_token[k])
            # a custom direction has no token id: "c{k}" keeps the id stable and unique
            tok = str(tid) if tid >= 0 else f"c{k}"
            node_ids.append(f"{L + 1}_{tok}_{pos}")
            js_ids.append(f"L_{tok}-{pos}")
    return node_ids, js_ids


def _cumulative_share(infl: np.ndarray) -> np.ndarray:
    """Each node's cumulative share of total influence when nodes are sorted by influence, descending
    (what the frontend's node-threshold slider compares against, as circuit-tracer exports it)."""
    order = np.argsort(-infl, kind="stable")
    total = infl.sum()
    share = np.cumsum(infl[order]) / total if total > 0 else np.zeros(len(infl))
    out = np.empty(len(infl))
    out[order] = share
    return out


def to_circuit_tracer_json(
    graph: AttributionGraph,
    slug: str,
    scan: str = "",
    labels: Labels | None = None,
    influence: np.ndarray | None = None,
    node_threshold: float | None = None,
    pinned_ids: Sequence[str] = (),
    supernodes: Sequence[tuple[str, Sequence[int]]] = (),
) -> dict:
    """The frontend's graph JSON: ``metadata``, ``qParams``, ``nodes``, ``links`` (docs/design.md §8).

    ``influence`` (default: the stored influence, else computed) is exported as each node's
    cumulative share; ``node_threshold`` defaults to the threshold of the graph's pruning summary;
    ``supernodes`` are (name, node indices) pairs for the frontend's grouping; ``feature`` of a feature
    node is its transcoder feature id."""
    from .prune import node_influence

    infl = _influence(graph, influence)
    if infl is None:
        infl = node_influence(graph)
    share = _cumulative_share(infl)
    lay = graph.layout
    labels = labels or {}
    names = graph.metadata.get("supernode_names", {})
    node_ids, js_ids = _ct_ids(graph)
    n_pos = lay.n_pos
    top = int(np.argmax(graph.logit_probability)) if lay.n_logits else -1
    nodes = []
    for i in range(graph.n_nodes):
        kind = NodeKind(int(lay.kind[i]))
        layer, pos, feat = int(lay.layer[i]), int(lay.pos[i]), int(lay.feature[i])
        node = {
            "node_id": node_ids[i],
            "feature": feat,
            "layer": str(layer),
            "ctx_idx": pos,
            "feature_type": _CT_TYPE[kind],
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": n_pos - 1 - pos,
            "jsNodeId": js_ids[i],
            "clerp": "",
            "influence": float(share[i]),
            "activation": float(graph.activation[i]) if kind is NodeKind.FEATURE else None,
        }
        if kind is NodeKind.FEATURE:
            node["clerp"] = (names.get(str(feat)) if feat <= -2 else labels.get((layer, feat))) or ""
        elif kind is NodeKind.TOKEN:
            node["layer"] = "E"
            node["feature"] = pos
        elif kind is NodeKind.LOGIT:
            k = i - lay.logits.start
            p = float(graph.logit_probability[k])
            node["layer"] = str(lay.n_layers + 1)
            node["feature"] = int(graph.logit_token[k])
            node["token_prob"] = p
            node["is_target_logit"] = k == top
            node["clerp"] = f'Output "{graph.logit_label[k]}" (p={p:.3f})'
        nodes.append(node)
    adj = graph.adjacency
    links = [
        {"source": node_ids[s], "target": node_ids[t], "weight": float(w)}
        for t, s, w in zip(adj.rows().tolist(), adj.indices.tolist(), adj.data.tolist())
    ]
    if node_threshold is None:
        summary = prune_summary_of(graph)
        node_threshold = summary.node_threshold if summary is not None else None
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "prompt": graph.prompt,
            "prompt_tokens": list(graph.token_strings),
            "node_threshold": node_threshold,
            "schema_version": CT_SCHEMA_VERSION,
        },
        "qParams": {
            "pinnedIds": list(pinned_ids),
            "supernodes": [[name, *(node_ids[int(i)] for i in members)] for name, members in supernodes],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }


def write_circuit_tracer_json(graph: AttributionGraph, path: str | os.PathLike, slug: str, **kwargs) -> Path:
    """:func:`to_circuit_tracer_json` written atomically to ``path``."""
    return _write_text(path, json.dumps(to_circuit_tracer_json(graph, slug, **kwargs)))


# ---- CSV ---------------------------------------------------------------------------------------------
NODE_CSV_COLUMNS = ["index", "node_id", "kind", "layer", "position", "token", "feature", "activation", "influence", "label"]
EDGE_CSV_COLUMNS = ["source", "target", "weight"]


def _csv_text(header: list[str], rows) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_csv(
    graph: AttributionGraph,
    nodes_path: str | os.PathLike,
    edges_path: str | os.PathLike,
    labels: Labels | None = None,
) -> tuple[Path, Path]:
    """Two CSV files: nodes (``NODE_CSV_COLUMNS``; influence empty when unknown) and edges
    (source node_id, target node_id, weight). Both are rendered before either is written."""
    table = node_table(graph, labels)
    node_text = _csv_text(
        NODE_CSV_COLUMNS,
        (
            [n.index, n.node_id, n.kind, n.layer, n.pos, n.token, n.feature, repr(n.activation),
             "" if n.influence is None else repr(n.influence), n.label]
            for n in table
        ),
    )
    adj = graph.adjacency
    edge_text = _csv_text(
        EDGE_CSV_COLUMNS,
        ([table[s].node_id, table[t].node_id, repr(w)] for t, s, w in zip(adj.rows().tolist(), adj.indices.tolist(), adj.data.tolist())),
    )
    return _write_text(nodes_path, node_text), _write_text(edges_path, edge_text)
