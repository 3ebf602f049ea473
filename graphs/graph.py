"""The attribution graph and the one object that owns node ordering (docs/design.md §4).

torch-free: a saved graph can be pruned, scored, exported and rendered with numpy alone.

Node order, always: features (sorted by layer, position, feature id) | error nodes (layer-major) |
token nodes (by position) | logit nodes. ``NodeLayout`` holds per-node arrays and the lookups; no
other module computes a node index by arithmetic.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from sparsetrace._atomic import atomic_write
from sparsetrace.errors import ConfigError, FormatError, GraphError

from .qk import QKStore

__all__ = ["NodeKind", "NodeLayout", "Adjacency", "AttributionGraph", "GRAPH_FORMAT_VERSION"]

GRAPH_FORMAT_VERSION = 2
"""1: the graph; 2: adds the optional QK results (``graphs/qk.py``). Version-1 files load (without them)."""


class NodeKind(IntEnum):
    """Kinds of node; the integer is also the block order of the layout."""

    FEATURE = 0
    ERROR = 1
    TOKEN = 2
    LOGIT = 3


@dataclass(frozen=True, eq=False)
class NodeLayout:
    """Per-node arrays (all of length ``n_nodes``), in the canonical block order.

    ``layer``: feature/error layer; tokens are at layer ``-1`` (the embedding) and logits at
    ``n_layers`` (after the last block). ``pos``: token position (logits: the last position).
    ``feature``: transcoder feature id for features, ``-1`` for every other kind.
    Build one with :meth:`build`; :meth:`subset` keeps any selection of nodes in the same order.
    """

    n_layers: int
    n_pos: int
    kind: np.ndarray  # int8 [N]
    layer: np.ndarray  # int32 [N]
    pos: np.ndarray  # int32 [N]
    feature: np.ndarray  # int64 [N]
    _error_lookup: np.ndarray = field(init=False, repr=False)  # int64 [L, T], -1 where absent
    _token_lookup: np.ndarray = field(init=False, repr=False)  # int64 [T]
    _starts: np.ndarray = field(init=False, repr=False)  # int64 [5] block boundaries

    def __post_init__(self) -> None:
        n = len(self.kind)
        for name in ("layer", "pos", "feature"):
            if len(getattr(self, name)) != n:
                raise GraphError(f"NodeLayout.{name} has {len(getattr(self, name))} entries, kind has {n}")
        kind = np.asarray(self.kind, dtype=np.int8)
        if n and np.any(np.diff(kind) < 0):
            raise GraphError("NodeLayout.kind must be in block order features | errors | tokens | logits")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "layer", np.asarray(self.layer, dtype=np.int32))
        object.__setattr__(self, "pos", np.asarray(self.pos, dtype=np.int32))
        object.__setattr__(self, "feature", np.asarray(self.feature, dtype=np.int64))
        starts = np.searchsorted(kind, np.arange(5), side="left").astype(np.int64)
        object.__setattr__(self, "_starts", starts)
        err = np.full((self.n_layers, self.n_pos), -1, dtype=np.int64)
        e = np.arange(starts[1], starts[2])
        err[self.layer[e], self.pos[e]] = e
        object.__setattr__(self, "_error_lookup", err)
        tok = np.full(self.n_pos, -1, dtype=np.int64)
        t = np.arange(starts[2], starts[3])
        tok[self.pos[t]] = t
        object.__setattr__(self, "_token_lookup", tok)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        n_layers: int,
        n_pos: int,
        feature_layer: np.ndarray,
        feature_pos: np.ndarray,
        feature_id: np.ndarray,
        n_logits: int,
    ) -> "NodeLayout":
        """The full layout of a fresh graph: the given active features (any order; they are sorted),
        all ``n_layers × n_pos`` error nodes, ``n_pos`` token nodes and ``n_logits`` logit nodes."""
        fl = np.asarray(feature_layer, dtype=np.int64)
        fp = np.asarray(feature_pos, dtype=np.int64)
        fi = np.asarray(feature_id, dtype=np.int64)
        if not (len(fl) == len(fp) == len(fi)):
            raise GraphError("feature_layer, feature_pos and feature_id must have the same length")
        if len(fl) and (fl.min() < 0 or fl.max() >= n_layers or fp.min() < 0 or fp.max() >= n_pos):
            raise GraphError("a feature's layer or position is outside the model / prompt")
        order = np.lexsort((fi, fp, fl))
        fl, fp, fi = fl[order], fp[order], fi[order]
        el, ep = np.divmod(np.arange(n_layers * n_pos), n_pos)
        kind = np.concatenate(
            [
                np.full(len(fl), NodeKind.FEATURE),
                np.full(n_layers * n_pos, NodeKind.ERROR),
                np.full(n_pos, NodeKind.TOKEN),
                np.full(n_logits, NodeKind.LOGIT),
            ]
        )
        layer = np.concatenate([fl, el, np.full(n_pos, -1), np.full(n_logits, n_layers)])
        pos = np.concatenate([fp, ep, np.arange(n_pos), np.full(n_logits, n_pos - 1)])
        feat = np.concatenate([fi, np.full(n_layers * n_pos + n_pos + n_logits, -1)])
        return cls(n_layers, n_pos, kind, layer, pos, feat)

    def subset(self, keep: np.ndarray) -> "NodeLayout":
        """The layout of the nodes where the boolean mask ``keep`` [N] is true (order kept)."""
        keep = np.asarray(keep, dtype=bool)
        return NodeLayout(
            self.n_layers, self.n_pos, self.kind[keep], self.layer[keep], self.pos[keep], self.feature[keep]
        )

    # ---- sizes and blocks ---------------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return len(self.kind)

    def block(self, kind: NodeKind) -> slice:
        """The slice of node indices of one kind."""
        return slice(int(self._starts[kind]), int(self._starts[kind + 1]))

    @property
    def features(self) -> slice:
        return self.block(NodeKind.FEATURE)

    @property
    def errors(self) -> slice:
        return self.block(NodeKind.ERROR)

    @property
    def tokens(self) -> slice:
        return self.block(NodeKind.TOKEN)

    @property
    def logits(self) -> slice:
        return self.block(NodeKind.LOGIT)

    @property
    def n_features(self) -> int:
        s = self.features
        return s.stop - s.start

    @property
    def n_errors(self) -> int:
        s = self.errors
        return s.stop - s.start

    @property
    def n_tokens(self) -> int:
        s = self.tokens
        return s.stop - s.start

    @property
    def n_logits(self) -> int:
        s = self.logits
        return s.stop - s.start

    # ---- lookups ------------------------------------------------------------------------------
    def error_index(self, layer: int | np.ndarray, pos: int | np.ndarray) -> np.ndarray | int:
        """Node index of the error node at (layer, pos); -1 where the layout has none."""
        out = self._error_lookup[layer, pos]
        return int(out) if np.ndim(out) == 0 else out

    def token_index(self, pos: int | np.ndarray) -> np.ndarray | int:
        out = self._token_lookup[pos]
        return int(out) if np.ndim(out) == 0 else out

    def logit_index(self, k: int | np.ndarray) -> np.ndarray | int:
        s = self.logits
        k = np.asarray(k)
        if np.any((k < 0) | (k >= s.stop - s.start)):
            raise GraphError(f"logit index {k} outside 0..{s.stop - s.start - 1}")
        out = s.start + k
        return int(out) if np.ndim(out) == 0 else out

    def feature_index(self, layer: int, pos: int, feature: int) -> int:
        """Node index of an active feature; raises GraphError when it is not in the graph."""
        s = self.features
        hit = np.flatnonzero(
            (self.layer[s] == layer) & (self.pos[s] == pos) & (self.feature[s] == feature)
        )
        if len(hit) == 0:
            raise GraphError(f"feature {feature} at layer {layer}, position {pos} is not a node of this graph")
        return int(s.start + hit[0])

    # ---- features by layer and by (layer, position) group; sources; rows --------------------------
    @property
    def n_sources(self) -> int:
        """Nodes that can be sources (features | errors | tokens): the columns of a row."""
        return self.logits.start

    @property
    def feature_layer_starts(self) -> np.ndarray:
        """[n_layers + 1] int64: the feature nodes of layer l are ``starts[l] : starts[l + 1]`` (features
        are sorted by layer); ``starts[n_layers]`` is the number of features."""
        f = self.features
        return f.start + np.searchsorted(self.layer[f], np.arange(self.n_layers + 1)).astype(np.int64)

    def features_from(self, layer: int | np.ndarray) -> np.ndarray | int:
        """First feature node at ``layer`` or above (``n_layers``, a logit's layer: the end of the
        features). A row read at ``layer`` has no sources from there to the end of the features."""
        out = self.feature_layer_starts[layer]
        return int(out) if np.ndim(out) == 0 else out

    def group(self, layer: int | np.ndarray, pos: int | np.ndarray) -> np.ndarray | int:
        """Number of the (layer, position) group: ``layer · n_pos + pos``, in [0, n_layers · n_pos)."""
        out = np.asarray(layer, dtype=np.int64) * self.n_pos + np.asarray(pos, dtype=np.int64)
        return int(out) if np.ndim(out) == 0 else out

    @property
    def feature_group(self) -> np.ndarray:
        """[n_features] int64: each feature's (layer, position) group (ascending: features are sorted)."""
        f = self.features
        return self.group(self.layer[f], self.pos[f])

    @property
    def group_counts(self) -> np.ndarray:
        """[n_layers, n_pos] int64: feature nodes per (layer, position)."""
        return np.bincount(self.feature_group, minlength=self.n_layers * self.n_pos).reshape(self.n_layers, self.n_pos)

    @property
    def rank_in_group(self) -> np.ndarray:
        """[n_features] int64: each feature's rank among the features of its (layer, position)."""
        g = self.feature_group
        first = np.r_[0, np.cumsum(self.group_counts.ravel())[:-1]]
        return np.arange(len(g)) - first[g]

    def cone_sizes(self, error_present: np.ndarray | None = None) -> np.ndarray:
        """[n_features] the sources in each feature row's causal cone: features and errors at lower
        layers and positions ≤ its own, tokens at positions ≤ its own — no row has more entries.
        ``error_present`` [n_layers, n_pos] bool: errors to count (default all)."""
        counts = self.group_counts
        counts = counts + (1 if error_present is None else np.asarray(error_present, dtype=np.int64).reshape(counts.shape))
        below = np.cumsum(counts, axis=0) - counts  # features and errors at layers < l, per position
        cone = np.cumsum(below, axis=1)  # … at positions ≤ c
        f = self.features
        layer, pos = self.layer[f].astype(np.int64), self.pos[f].astype(np.int64)
        return cone[layer, pos] + (pos + 1)

    def row_capacity(self, error_present: np.ndarray | None = None) -> np.ndarray:
        """[n_nodes] most entries each node's row can have: a feature's cone (:meth:`cone_sizes`), every
        source for a logit, 0 for errors and tokens (they have no rows)."""
        out = np.zeros(self.n_nodes, dtype=np.int64)
        out[self.features] = self.cone_sizes(error_present)
        out[self.logits] = self.n_sources
        return out

    def fold(self, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keeping only the ``selected`` [n_features] features: ``(keep [n_nodes] bool, column map
        [n_nodes])``, the map sending each unselected feature to its (layer, position) error node and
        every other node to itself."""
        selected = np.asarray(selected, dtype=bool)
        keep = np.ones(self.n_nodes, dtype=bool)
        keep[self.features] = selected
        col_map = np.arange(self.n_nodes)
        unsel = self.features.start + np.flatnonzero(~selected)
        col_map[unsel] = self.error_index(self.layer[unsel], self.pos[unsel])
        return keep, col_map

    def node_id(self, i: int) -> str:
        """A readable, stable id: ``F{layer}.{feature}@{pos}``, ``E{layer}@{pos}``, ``T@{pos}``, ``L{k}``."""
        k = NodeKind(int(self.kind[i]))
        if k is NodeKind.FEATURE:
            return f"F{self.layer[i]}.{self.feature[i]}@{self.pos[i]}"
        if k is NodeKind.ERROR:
            return f"E{self.layer[i]}@{self.pos[i]}"
        if k is NodeKind.TOKEN:
            return f"T@{self.pos[i]}"
        return f"L{i - self.logits.start}"

    def parse_nodes(self, text: str) -> tuple[int | tuple[int, ...], ...]:
        """``F3.12@5,E2@4,T@1`` (readable ids of :meth:`node_id`, comma-separated; ``+`` joins a group) →
        node indices (a group as a tuple). An id that is not a node raises a ConfigError naming it."""
        index = {self.node_id(i): i for i in range(self.n_nodes)}
        out: list[int | tuple[int, ...]] = []
        for part in text.split(","):
            ids = [p.strip() for p in part.split("+") if p.strip()]
            missing = [i for i in ids if i not in index]
            if missing:
                raise ConfigError(
                    f"node {missing[0]!r} is not in the graph; allowed: ids like F<layer>.<feature>@<pos>, E<layer>@<pos>, "
                    "T@<pos> (see `sparsetrace export GRAPH -f csv`)"
                )
            out.append(index[ids[0]] if len(ids) == 1 else tuple(index[i] for i in ids))
        return tuple(out)

    def can_feed(self, target: np.ndarray, source: np.ndarray) -> np.ndarray:
        """Whether an edge source→target respects the DAG order (earlier layer, position ≤)."""
        return (self.layer[source] < self.layer[target]) & (self.pos[source] <= self.pos[target])

    # ---- serialisation ------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"node_kind": self.kind, "node_layer": self.layer, "node_pos": self.pos, "node_feature": self.feature}

    @classmethod
    def from_arrays(cls, n_layers: int, n_pos: int, arrays: dict[str, np.ndarray]) -> "NodeLayout":
        return cls(
            n_layers, n_pos, arrays["node_kind"], arrays["node_layer"], arrays["node_pos"], arrays["node_feature"]
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NodeLayout):
            return NotImplemented
        return (
            self.n_layers == other.n_layers
            and self.n_pos == other.n_pos
            and all(np.array_equal(a, b) for a, b in zip(self.to_arrays().values(), other.to_arrays().values()))
        )


def index_dtype(n: int) -> type:
    """Column-index dtype of an n-node adjacency: int32 while it can hold every node id."""
    return np.int32 if n < 2**31 else np.int64


@dataclass(frozen=True, eq=False)
class Adjacency:
    """Sparse A[target, source] in CSR form (rows are targets), square ``n × n``.

    ``indices`` within a row are sorted. ``remainder[t]`` is the absolute weight dropped from row t when
    it was stored with a threshold (0 in exact mode); row normalisation counts it, so influence is
    unchanged by the drop.
    """

    indptr: np.ndarray  # int64 [n+1]
    indices: np.ndarray  # [E] int32 (n < 2³¹, what the engine writes: 8 bytes an entry with float32 data) or int64
    data: np.ndarray  # float32/float64 [E]
    n: int
    remainder: np.ndarray  # same float dtype [n]

    def __post_init__(self) -> None:
        if len(self.indptr) != self.n + 1 or self.indptr[0] != 0 or self.indptr[-1] != len(self.indices):
            raise GraphError("Adjacency.indptr is inconsistent with n and indices")
        if len(self.data) != len(self.indices) or len(self.remainder) != self.n:
            raise GraphError("Adjacency data/remainder lengths do not match")

    @classmethod
    def from_dense(cls, a: np.ndarray, threshold: float = 0.0) -> "Adjacency":
        """CSR of a dense matrix; entries with |a| ≤ threshold · max|row| are dropped into the remainder.
        ``threshold=0`` keeps every non-zero entry."""
        a = np.asarray(a)
        n = a.shape[0]
        if a.shape != (n, n):
            raise GraphError(f"adjacency must be square, got {a.shape}")
        absa = np.abs(a)
        rowmax = absa.max(axis=1, keepdims=True) if n else np.zeros((0, 1))
        keep = (absa > threshold * rowmax) & (a != 0)
        rows, cols = np.nonzero(keep)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        remainder = (absa * ~keep).sum(axis=1).astype(a.dtype)
        return cls(indptr, cols.astype(index_dtype(n)), a[rows, cols], n, remainder)

    @classmethod
    def from_coo(
        cls, rows: np.ndarray, cols: np.ndarray, data: np.ndarray, n: int, remainder: np.ndarray | None = None
    ) -> "Adjacency":
        """CSR from (target, source, weight) triples; duplicates are summed."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        data = np.asarray(data)
        key = rows * max(n, 1) + cols
        uniq, inv = np.unique(key, return_inverse=True)
        summed = np.zeros(len(uniq), dtype=data.dtype if data.size else np.float32)
        np.add.at(summed, inv, data)
        r, c = np.divmod(uniq, max(n, 1))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(r, minlength=n), out=indptr[1:])
        rem = np.zeros(n, dtype=summed.dtype) if remainder is None else np.asarray(remainder, dtype=summed.dtype)
        return cls(indptr, c.astype(index_dtype(n)), summed, n, rem)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def nnz(self) -> int:
        return len(self.data)

    def rows(self) -> np.ndarray:
        """Target index of every stored entry."""
        return np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.indptr))

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.n, self.n), dtype=self.data.dtype)
        out[self.rows(), self.indices] = self.data
        return out

    def row(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(sources, weights) of target row t."""
        s, e = self.indptr[t], self.indptr[t + 1]
        return self.indices[s:e], self.data[s:e]

    def subset(self, keep: np.ndarray) -> "Adjacency":
        """The induced sub-matrix on the nodes where ``keep`` is true, renumbered in order; the absolute
        weight of dropped sources is added to each kept row's remainder."""
        keep = np.asarray(keep, dtype=bool)
        new_index = np.cumsum(keep) - 1
        rows = self.rows()
        in_rows = keep[rows]
        kept = in_rows & keep[self.indices]
        lost = np.zeros(self.n, dtype=self.data.dtype)
        np.add.at(lost, rows[in_rows & ~kept], np.abs(self.data[in_rows & ~kept]))
        rem = (self.remainder + lost)[keep]
        return Adjacency.from_coo(
            new_index[rows[kept]], new_index[self.indices[kept]], self.data[kept], int(keep.sum()), rem
        )


_atomic_write = atomic_write  # the shared helper, under the name graphs' modules import


@dataclass(eq=False)
class AttributionGraph:
    """An attribution graph (docs/design.md §4).

    Per-node arrays have length ``layout.n_nodes``:
      ``activation``: feature activation a; error nodes: ‖ε‖; tokens: 0; logits: the demeaned logit.
      ``bias``: κ, the part of the target's value that no node explains (biases, norm offsets,
      position-0 constants); features: of the pre-activation; logits: of the demeaned logit.
      ``value``: the target's value: feature pre-activation, demeaned logit (0 for errors/tokens).
      Row test: ``adjacency.to_dense().sum(1) + bias == value`` for feature and logit rows (exact mode).
    ``logit_probability`` [K]: the logit weights w (target probabilities); ``logit_token`` [K]: token
    ids (-1 for a custom direction); ``logit_label``: strings for display.
    """

    layout: NodeLayout
    adjacency: Adjacency
    activation: np.ndarray
    bias: np.ndarray
    value: np.ndarray
    token_ids: np.ndarray  # int64 [T]
    token_strings: list[str]
    logit_token: np.ndarray  # int64 [K]
    logit_probability: np.ndarray  # float [K]
    logit_label: list[str]
    prompt: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    qk: QKStore | None = None
    """QK results kept with the graph (docs/design.md §13); they name nodes by id, so subgraphs keep them."""

    def __post_init__(self) -> None:
        n = self.layout.n_nodes
        if self.adjacency.n != n:
            raise GraphError(f"adjacency is {self.adjacency.n}×{self.adjacency.n}, layout has {n} nodes")
        for name in ("activation", "bias", "value"):
            if len(getattr(self, name)) != n:
                raise GraphError(f"AttributionGraph.{name} has {len(getattr(self, name))} entries, expected {n}")
        k = self.layout.n_logits
        if not (len(self.logit_token) == len(self.logit_probability) == len(self.logit_label) == k):
            raise GraphError(f"logit_token/logit_probability/logit_label must each have {k} entries")
        if len(self.token_ids) != self.layout.n_pos or len(self.token_strings) != self.layout.n_pos:
            raise GraphError("token_ids and token_strings must have one entry per position")

    @property
    def n_nodes(self) -> int:
        return self.layout.n_nodes

    def logit_weights(self) -> np.ndarray:
        """w over all nodes: the logit probabilities at logit nodes, 0 elsewhere."""
        w = np.zeros(self.n_nodes, dtype=np.float64)
        w[self.layout.logits] = self.logit_probability
        return w

    def dense_adjacency(self) -> np.ndarray:
        return self.adjacency.to_dense()

    # ---- the networkx world and notebooks (implemented in export / render / html) ----------------
    def to_networkx(self, **kwargs: Any):
        """A networkx DiGraph with typed node and edge attributes (see graphs.export.to_networkx)."""
        from .export import to_networkx

        return to_networkx(self, **kwargs)

    @classmethod
    def from_networkx(cls, G) -> "AttributionGraph":
        """The inverse of :meth:`to_networkx`."""
        from .export import from_networkx

        return from_networkx(G)

    def _repr_svg_(self) -> str:
        """Notebook picture: the layered graphviz rendering (pruned first when the graph is large)."""
        from .render import repr_svg

        return repr_svg(self)

    def _repr_html_(self) -> str:
        """Notebook viewer: the interactive HTML viewer in an iframe (pruned first when large)."""
        from .html import repr_html

        return repr_html(self)

    def subgraph(self, keep: np.ndarray) -> "AttributionGraph":
        """The graph restricted to the nodes where ``keep`` is true (logit and token nodes are the
        caller's choice; the dropped sources' weight goes into each row's remainder)."""
        keep = np.asarray(keep, dtype=bool)
        if len(keep) != self.n_nodes:
            raise GraphError(f"keep mask has {len(keep)} entries, graph has {self.n_nodes} nodes")
        lk = keep[self.layout.logits]
        if not lk.all():
            raise GraphError("a subgraph must keep every logit node")
        return AttributionGraph(
            layout=self.layout.subset(keep),
            adjacency=self.adjacency.subset(keep),
            activation=self.activation[keep],
            bias=self.bias[keep],
            value=self.value[keep],
            token_ids=self.token_ids,
            token_strings=list(self.token_strings),
            logit_token=self.logit_token,
            logit_probability=self.logit_probability,
            logit_label=list(self.logit_label),
            prompt=self.prompt,
            metadata=json.loads(json.dumps(self.metadata)),
            qk=self.qk,
        )

    # ---- save / load --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write one ``.safetensors`` file (arrays) with the JSON metadata in its header; atomic."""
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = {
            **self.layout.to_arrays(),
            "adj_indptr": self.adjacency.indptr,
            "adj_indices": self.adjacency.indices,
            "adj_data": self.adjacency.data,
            "adj_remainder": self.adjacency.remainder,
            "activation": self.activation,
            "bias": self.bias,
            "value": self.value,
            "token_ids": np.asarray(self.token_ids, dtype=np.int64),
            "logit_token": np.asarray(self.logit_token, dtype=np.int64),
            "logit_probability": np.asarray(self.logit_probability),
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        header = {
            "format": "sparsetrace-graph",
            "version": GRAPH_FORMAT_VERSION,
            "n_layers": self.layout.n_layers,
            "n_pos": self.layout.n_pos,
            "token_strings": self.token_strings,
            "logit_label": self.logit_label,
            "prompt": self.prompt,
            "metadata": self.metadata,
        }
        if self.qk is not None:
            header["qk"], qk_arrays = self.qk.to_file()
            tensors.update(qk_arrays)
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"sparsetrace": json.dumps(header)}))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttributionGraph":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FormatError(f"graph file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise FormatError(f"{str(path)!r} is not a readable safetensors graph file: {exc}") from None
        if "sparsetrace" not in meta:
            raise FormatError(f"{str(path)!r} is a safetensors file but not a sparsetrace graph")
        header = json.loads(meta["sparsetrace"])
        if header.get("format") != "sparsetrace-graph" or header.get("version", 0) > GRAPH_FORMAT_VERSION:
            raise FormatError(f"{str(path)!r}: unsupported graph format {header.get('format')} v{header.get('version')}")
        layout = NodeLayout.from_arrays(header["n_layers"], header["n_pos"], arrays)
        adj = Adjacency(
            arrays["adj_indptr"], arrays["adj_indices"], arrays["adj_data"], layout.n_nodes, arrays["adj_remainder"]
        )
        return cls(
            layout=layout,
            adjacency=adj,
            activation=arrays["activation"],
            bias=arrays["bias"],
            value=arrays["value"],
            token_ids=arrays["token_ids"],
            token_strings=list(header["token_strings"]),
            logit_token=arrays["logit_token"],
            logit_probability=arrays["logit_probability"],
            logit_label=list(header["logit_label"]),
            prompt=header["prompt"],
            metadata=header["metadata"],
            qk=QKStore.from_file(header["qk"], arrays, repr(str(path))) if "qk" in header else None,
        )
