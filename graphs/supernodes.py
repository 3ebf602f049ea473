"""Supernodes: groups of features shown and analysed as one node (Ameisen et al. 2025, "supernodes").

A grouped graph is an ordinary :class:`AttributionGraph`. Each supernode becomes one FEATURE node with
``feature = -(k + 2)`` for the k-th group (negative ids never collide with real features, and -1 stays the
marker of non-feature nodes), placed at its members' lowest layer and lowest position;
``metadata["supernode_names"]`` maps ``str(feature id)`` to the group's name and
``metadata["supernode_members"]`` to the members' readable ids. Edges are aggregated by summing the signed
weights of every member edge (edges are linear in their source vector, so a group's edge is exactly the
sum); edges between members of one group are dropped and their absolute weight goes into the group's
row remainder, so Â of the other inputs is unchanged. A supernode's activation, bias and value are the sums
of its members'. Grouping members of different layers can create a cycle (a member feeds an outside node
that feeds another member); influence on such a graph raises GraphError — it is meant for display and export.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sparsetrace.errors import ConfigError, GraphError

from .graph import Adjacency, AttributionGraph, NodeKind, NodeLayout
from .records import store_influence, stored_influence

__all__ = ["Supernode", "group_nodes", "auto_supernodes", "is_supernode"]


@dataclass(frozen=True)
class Supernode:
    """A named group of feature nodes (indices into the graph it was made for)."""

    name: str
    """Display name."""
    nodes: tuple[int, ...]
    """Node indices of the members (feature nodes only, at least one)."""


def is_supernode(layout: NodeLayout) -> np.ndarray:
    """bool [N]: which nodes of a grouped graph are supernodes."""
    return (layout.kind == NodeKind.FEATURE) & (layout.feature <= -2)


def _check_groups(graph: AttributionGraph, groups: Sequence[Supernode]) -> None:
    seen: dict[int, str] = {}
    for g in groups:
        if not g.nodes:
            raise GraphError(f"supernode {g.name!r} has no members")
        for i in g.nodes:
            if not (0 <= int(i) < graph.n_nodes):
                raise GraphError(f"supernode {g.name!r}: node {i} outside 0..{graph.n_nodes - 1}")
            if graph.layout.kind[i] != NodeKind.FEATURE:
                raise GraphError(
                    f"supernode {g.name!r}: node {graph.layout.node_id(int(i))} is not a feature; only features can be grouped"
                )
            if int(i) in seen:
                raise GraphError(f"node {graph.layout.node_id(int(i))} is in both {seen[int(i)]!r} and {g.name!r}")
            seen[int(i)] = g.name


def group_nodes(graph: AttributionGraph, groups: Sequence[Supernode]) -> AttributionGraph:
    """The graph with each group merged into one supernode (module docstring)."""
    _check_groups(graph, groups)
    lay = graph.layout
    n = graph.n_nodes
    group_of = np.full(n, -1, dtype=np.int64)
    for k, g in enumerate(groups):
        group_of[list(g.nodes)] = k
    feats = np.arange(lay.features.start, lay.features.stop)
    loose = feats[group_of[feats] < 0]
    rest = np.arange(lay.features.stop, n)
    k_groups = len(groups)
    # new order: loose features | supernodes | errors | tokens | logits
    new_index = np.empty(n, dtype=np.int64)
    new_index[loose] = np.arange(len(loose))
    members = [np.asarray(g.nodes, dtype=np.int64) for g in groups]
    for k, m in enumerate(members):
        new_index[m] = len(loose) + k
    new_index[rest] = len(loose) + k_groups + np.arange(len(rest))
    n_new = len(loose) + k_groups + len(rest)

    def per_node(x: np.ndarray) -> np.ndarray:
        out = np.zeros(n_new, dtype=np.result_type(x.dtype, np.float64) if x.dtype.kind == "f" else x.dtype)
        np.add.at(out, new_index, x)  # sums over each group's members
        return out

    kind = np.concatenate([lay.kind[loose], np.full(k_groups, NodeKind.FEATURE), lay.kind[rest]])
    layer = np.concatenate([lay.layer[loose], [lay.layer[m].min() for m in members], lay.layer[rest]])
    pos = np.concatenate([lay.pos[loose], [lay.pos[m].min() for m in members], lay.pos[rest]])
    feat = np.concatenate([lay.feature[loose], -(np.arange(k_groups) + 2), lay.feature[rest]])
    layout = NodeLayout(lay.n_layers, lay.n_pos, kind, layer.astype(np.int32), pos.astype(np.int32), feat)

    adj = graph.adjacency
    r = new_index[adj.rows()]
    c = new_index[adj.indices]
    internal = r == c
    rem = per_node(adj.remainder.astype(np.float64))
    np.add.at(rem, r[internal], np.abs(adj.data[internal]).astype(np.float64))
    grouped = Adjacency.from_coo(r[~internal], c[~internal], adj.data[~internal], n_new, rem.astype(adj.dtype))

    meta = json.loads(json.dumps(graph.metadata))  # deep copy: the input graph is not mutated
    names = dict(meta.get("supernode_names", {}))
    member_ids = dict(meta.get("supernode_members", {}))
    for k, g in enumerate(groups):
        names[str(-(k + 2))] = g.name
        member_ids[str(-(k + 2))] = [lay.node_id(int(i)) for i in g.nodes]
    meta["supernode_names"] = names
    meta["supernode_members"] = member_ids
    out = AttributionGraph(
        layout=layout,
        adjacency=grouped,
        activation=per_node(np.asarray(graph.activation)),
        bias=per_node(np.asarray(graph.bias)),
        value=per_node(np.asarray(graph.value)),
        token_ids=graph.token_ids,
        token_strings=list(graph.token_strings),
        logit_token=graph.logit_token,
        logit_probability=graph.logit_probability,
        logit_label=list(graph.logit_label),
        prompt=graph.prompt,
        metadata=meta,
    )
    infl = stored_influence(graph)  # per-node lists are regrouped with the nodes
    store_influence(out, per_node(infl) if infl is not None else None)
    return out


def auto_supernodes(
    graph: AttributionGraph,
    layers: tuple[int, int] | None = None,
    threshold: float = 0.9,
    min_size: int = 2,
) -> list[Supernode]:
    """Groups of features that play the same role, found from the graph alone.

    Method: for each token position separately, take the features whose layer is in the inclusive range
    ``layers`` (default: all layers) and their *out-edge vectors* — the signed weights they send to every
    target node (a column of A). Two features are similar when the cosine of their out-edge vectors is
    ≥ ``threshold``; groups are the connected components of that similarity relation (single linkage), and
    components with at least ``min_size`` members become supernodes named ``"p{pos} L{lo}-{hi} #{k}"``.
    Features without out-edges are never grouped. Deterministic: groups are ordered by position and then
    by their first member.
    """
    if not (-1.0 <= threshold <= 1.0):
        raise ConfigError(f"threshold must be a cosine similarity in [-1, 1], got {threshold!r}")
    if min_size < 1:
        raise ConfigError(f"min_size must be ≥ 1, got {min_size!r}")
    lay = graph.layout
    lo, hi = (0, lay.n_layers - 1) if layers is None else layers
    if lo > hi:
        raise ConfigError(f"layers must be an inclusive (low, high) range with low ≤ high, got {layers!r}")
    adj = graph.adjacency
    rows = adj.rows()
    feats = np.arange(lay.features.start, lay.features.stop)
    in_range = feats[(lay.layer[feats] >= lo) & (lay.layer[feats] <= hi)]
    out: list[Supernode] = []
    for p in np.unique(lay.pos[in_range]):
        cand = in_range[lay.pos[in_range] == p]
        if len(cand) < max(min_size, 2):
            continue
        local = np.full(graph.n_nodes, -1, dtype=np.int64)
        local[cand] = np.arange(len(cand))
        sel = local[adj.indices] >= 0
        vec = np.zeros((len(cand), graph.n_nodes))  # [members, targets]
        np.add.at(vec, (local[adj.indices[sel]], rows[sel]), adj.data[sel])
        norm = np.linalg.norm(vec, axis=1)
        live = norm > 0
        unit = np.zeros_like(vec)
        unit[live] = vec[live] / norm[live, None]
        sim = unit @ unit.T
        parent = np.arange(len(cand))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        ii, jj = np.nonzero(np.triu(sim >= threshold - 1e-12, k=1) & live[:, None] & live[None, :])
        for i, j in zip(ii, jj):
            a, b = find(int(i)), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
        roots = np.array([find(i) for i in range(len(cand))])
        for root in np.unique(roots[live]):
            m = cand[(roots == root) & live]
            if len(m) >= min_size:
                out.append(Supernode(name=f"p{int(p)} L{lo}-{hi} #{len(out)}", nodes=tuple(int(x) for x in m)))
    return out
