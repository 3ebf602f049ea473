"""QK results as data, and their part of the graph file (docs/design.md §13). Torch-free.

``QKDecomposition`` (the exact split of one attention score into pairs of graph sources and constant
terms) and ``HeadLoadings`` (how a cross-position edge splits over heads) are computed by
``sparsetrace.tracer.qk``; a ``QKStore`` keeps them with a graph (``AttributionGraph.qk``). In the store
nodes are named by node id (``NodeLayout.node_id``), so a pruned graph or the viewer's cut carries the
same results; ``QKStore.for_layout`` turns them back into node indices of a graph.

In the graph file (format version 2, ``graphs/graph.py``) the store is the header entry ``"qk"`` (node
ids, sites, scalars) and the arrays ``qk.{n}.{q_nodes,Q,q_const,q_clean,k_nodes,K,k_const,k_clean}`` of
score n and ``qk.loading.{n}`` of loading n. A file without them (any version-1 file) has no store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparsetrace.errors import FormatError, GraphError

__all__ = ["QKSite", "CONST", "QKDecomposition", "HeadLoadings", "QKStore", "QK_STORE_VERSION"]

QK_STORE_VERSION = 1
"""Version of the ``"qk"`` header entry (inside graph format version 2)."""


@dataclass(frozen=True)
class QKSite:
    """One attention score: query position ``query_pos`` attending to ``key_pos`` in head ``head`` of
    ``layer``."""

    layer: int
    head: int
    query_pos: int
    key_pos: int

    def label(self) -> str:
        return f"L{self.layer}.H{self.head} {self.query_pos}←{self.key_pos}"


CONST = -1
"""Node index that stands for the constant part (q₀ or k₀) in pair rows."""


@dataclass(eq=False)
class QKDecomposition:
    """The exact split of one pre-softcap score (docs/design.md §13). Query side: ``q_nodes`` [n_q] graph
    nodes (sources at layers < l and positions ≤ i), ``Q`` [n_q, hd] their parts of q_i, ``q_const``
    [hd] = q₀, ``q_clean`` [hd] the model's query; the same for the key side at j. Arrays are float64.
    ``hop_weight``: the hop's weight on the logits when it was selected by weight (else None)."""

    site: QKSite
    scaling: float
    softcap: float | None
    q_nodes: np.ndarray
    Q: np.ndarray
    q_const: np.ndarray
    q_clean: np.ndarray
    k_nodes: np.ndarray
    K: np.ndarray
    k_const: np.ndarray
    k_clean: np.ndarray
    model_score: float
    """The model's own softmax input at (i, j): capped where the model caps, before the mask."""
    pattern: float
    """The clean attention probability p_ij."""
    hop_weight: float | None = None

    @property
    def score(self) -> float:
        """The pre-softcap score scaling·q_i·k_j of the model's query and key."""
        return self.scaling * float(self.q_clean @ self.k_clean)

    def cap(self, s: np.ndarray | float) -> np.ndarray | float:
        """The model's softcap applied to pre-softcap scores (identity without one)."""
        return s if self.softcap is None else self.softcap * np.tanh(np.asarray(s) / self.softcap)

    def pairs(self) -> np.ndarray:
        """[n_q, n_k] scaling·q_a·k_b."""
        return self.scaling * (self.Q @ self.K.T)

    def query_const(self) -> np.ndarray:
        """[n_q] scaling·q_a·k₀."""
        return self.scaling * (self.Q @ self.k_const)

    def const_key(self) -> np.ndarray:
        """[n_k] scaling·q₀·k_b."""
        return self.scaling * (self.K @ self.q_const)

    def const_const(self) -> float:
        return self.scaling * float(self.q_const @ self.k_const)

    def total(self) -> float:
        """Σ of every part: equals :attr:`score` (up to rounding)."""
        return float(self.pairs().sum() + self.query_const().sum() + self.const_key().sum() + self.const_const())

    def closure(self) -> dict[str, float]:
        """How exactly the parts add up: |Σ parts − score|, and the largest |q₀ + Σ q_a − q_i| (and k)."""
        return {
            "score": abs(self.total() - self.score),
            "query": float(np.abs(self.q_const + self.Q.sum(0) - self.q_clean).max()),
            "key": float(np.abs(self.k_const + self.K.sum(0) - self.k_clean).max()),
        }

    def rows(self, top: int | None = None) -> list[tuple[int, int, float]]:
        """Every nonzero part as (query node or CONST, key node or CONST, value), largest |value| first."""
        P = self.pairs()
        qi, ki = np.nonzero(P)
        vals = [P[qi, ki], self.query_const(), self.const_key(), np.array([self.const_const()])]
        qs = [self.q_nodes[qi], self.q_nodes, np.full(len(self.k_nodes), CONST), np.array([CONST])]
        ks = [self.k_nodes[ki], np.full(len(self.q_nodes), CONST), self.k_nodes, np.array([CONST])]
        v, q, k = (np.concatenate(x) for x in (vals, qs, ks))
        keep = np.flatnonzero(v != 0)
        order = keep[np.argsort(-np.abs(v[keep]), kind="stable")][:top]
        return [(int(q[o]), int(k[o]), float(v[o])) for o in order]

    def _vec(self, nodes: np.ndarray, M: np.ndarray, node: int) -> np.ndarray:
        hit = np.flatnonzero(nodes == node)
        return M[hit[0]] if len(hit) else np.zeros(M.shape[1])

    def query_part(self, node: int) -> np.ndarray:
        """Source ``node``'s part of q_i (zero when it cannot reach the query)."""
        return self._vec(self.q_nodes, self.Q, node)

    def key_part(self, node: int) -> np.ndarray:
        return self._vec(self.k_nodes, self.K, node)

    def score_with(self, node: int, x: float) -> float:
        """The exact pre-softcap score when source ``node``'s write is multiplied by x (everything else
        as in the clean run): q → q + (x − 1)·q_a, k → k + (x − 1)·k_a."""
        q = self.q_clean + (x - 1.0) * self.query_part(node)
        k = self.k_clean + (x - 1.0) * self.key_part(node)
        return self.scaling * float(q @ k)

    def score_slope(self, node: int) -> float:
        """d s / d x at x = 1 for source ``node`` scaled by x: scaling·(q_a·k_j + q_i·k_a)."""
        return self.scaling * float(self.query_part(node) @ self.k_clean + self.q_clean @ self.key_part(node))



@dataclass(eq=False)
class HeadLoadings:
    """How a cross-position edge A[target, source] splits over attention heads: ``loading`` [L, n_heads]
    is the part of the edge carried by the paths whose last change of position — the hop into the
    target's position — goes through that head (every such path has exactly one), so
    Σ loading = ``edge`` exactly. ``stored`` is the graph's own A[target, source] (None when not stored)."""

    target: int
    source: int
    loading: np.ndarray
    edge: float
    stored: float | None



_SIDES = ("q_nodes", "Q", "q_const", "q_clean", "k_nodes", "K", "k_const", "k_clean")


@dataclass(eq=False)
class QKStore:
    """QK results kept with a graph: ``scores`` and ``loadings`` whose node fields (``q_nodes``,
    ``k_nodes``, ``target``, ``source``) index ``node_ids`` rather than a layout."""

    node_ids: list[str] = field(default_factory=list)
    scores: list[QKDecomposition] = field(default_factory=list)
    loadings: list[HeadLoadings] = field(default_factory=list)

    @classmethod
    def from_results(cls, layout, scores: list[QKDecomposition], loadings: list[HeadLoadings] = ()) -> "QKStore":
        """A store of results computed on a graph with ``layout`` (node fields are its node indices)."""
        table: dict[int, int] = {}

        def ref(nodes: np.ndarray) -> np.ndarray:
            return np.array([table.setdefault(int(i), len(table)) for i in nodes], dtype=np.int64)

        decs = [_renodes(d, ref(d.q_nodes), ref(d.k_nodes)) for d in scores]
        loads = [HeadLoadings(int(ref([h.target])[0]), int(ref([h.source])[0]), h.loading, h.edge, h.stored) for h in loadings]
        return cls([layout.node_id(i) for i in table], decs, loads)

    def for_layout(self, layout) -> tuple[list[QKDecomposition], list[HeadLoadings]]:
        """The stored results with node fields as indices of ``layout``; a GraphError when the layout
        lacks a node they name."""
        where = {layout.node_id(i): i for i in range(layout.n_nodes)}
        missing = [n for n in self.node_ids if n not in where]
        if missing:
            raise GraphError(f"the graph lacks {len(missing)} node(s) the stored QK results name, e.g. {missing[0]}")
        idx = np.array([where[n] for n in self.node_ids], dtype=np.int64)
        decs = [_renodes(d, idx[d.q_nodes], idx[d.k_nodes]) for d in self.scores]
        loads = [HeadLoadings(int(idx[h.target]), int(idx[h.source]), h.loading, h.edge, h.stored) for h in self.loadings]
        return decs, loads

    def merged(self, new: "QKStore") -> "QKStore":
        """This store with ``new``'s results added; a score of the same site or a loading of the same
        edge is replaced by ``new``'s."""
        table = {n: k for k, n in enumerate(self.node_ids)}
        ids = list(self.node_ids)

        def ref(nodes) -> np.ndarray:
            out = []
            for i in nodes:
                name = new.node_ids[int(i)]
                if name not in table:
                    table[name] = len(ids)
                    ids.append(name)
                out.append(table[name])
            return np.array(out, dtype=np.int64)

        decs = [_renodes(d, ref(d.q_nodes), ref(d.k_nodes)) for d in new.scores]
        loads = [HeadLoadings(int(ref([h.target])[0]), int(ref([h.source])[0]), h.loading, h.edge, h.stored) for h in new.loadings]
        sites = {d.site for d in decs}
        edges = {(h.target, h.source) for h in loads}
        keep_d = [d for d in self.scores if d.site not in sites]
        keep_l = [h for h in self.loadings if (h.target, h.source) not in edges]
        return QKStore(ids, keep_d + decs, keep_l + loads)

    # ---- the graph file's part -------------------------------------------------------------------
    def to_file(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(header entry, arrays) for the graph file."""
        arrays: dict[str, np.ndarray] = {}
        scores = []
        for n, d in enumerate(self.scores):
            s = d.site
            scores.append({"site": [s.layer, s.head, s.query_pos, s.key_pos], "scaling": d.scaling, "softcap": d.softcap,
                           "model_score": d.model_score, "pattern": d.pattern, "hop_weight": d.hop_weight})
            for name in _SIDES:
                arrays[f"qk.{n}.{name}"] = np.ascontiguousarray(getattr(d, name))
        loads = []
        for n, h in enumerate(self.loadings):
            loads.append({"target": h.target, "source": h.source, "edge": h.edge, "stored": h.stored})
            arrays[f"qk.loading.{n}"] = np.ascontiguousarray(h.loading)
        header = {"version": QK_STORE_VERSION, "node_ids": self.node_ids, "scores": scores, "loadings": loads}
        return header, arrays

    @classmethod
    def from_file(cls, header: dict, arrays: dict[str, np.ndarray], where: str) -> "QKStore":
        """The store from a graph file's ``"qk"`` entry and arrays; ``where`` names the file in errors."""
        if header.get("version", 0) > QK_STORE_VERSION:
            raise FormatError(f"{where}: QK results of version {header.get('version')}; this sparsetrace reads ≤ {QK_STORE_VERSION}")
        try:
            decs = []
            for n, s in enumerate(header["scores"]):
                parts = {name: arrays[f"qk.{n}.{name}"] for name in _SIDES}
                decs.append(QKDecomposition(site=QKSite(*(int(x) for x in s["site"])), scaling=s["scaling"], softcap=s["softcap"],
                                            model_score=s["model_score"], pattern=s["pattern"], hop_weight=s["hop_weight"], **parts))
            loads = [HeadLoadings(int(h["target"]), int(h["source"]), arrays[f"qk.loading.{n}"], h["edge"], h["stored"])
                     for n, h in enumerate(header["loadings"])]
        except (KeyError, TypeError) as exc:
            raise FormatError(f"{where}: incomplete QK results (missing {exc})") from None
        return cls(list(header["node_ids"]), decs, loads)

    # ---- the viewer's part -----------------------------------------------------------------------
    def viewer_data(self, top: int) -> dict:
        """JSON for the HTML viewer: per score its site, score, pattern, the four term sums and the
        ``top`` largest parts as [query node id or None, key node id or None, value] (None: the
        constant); per loading its edge and every nonzero head as [layer, head, loading]."""
        ids = self.node_ids
        name = lambda i: None if i == CONST else ids[i]  # noqa: E731
        scores = []
        for d in self.scores:
            s = d.site
            scores.append({
                "layer": s.layer, "head": s.head, "query_pos": s.query_pos, "key_pos": s.key_pos,
                "score": _num(d.score), "capped": _num(float(d.cap(d.score))), "softcap": d.softcap, "pattern": _num(d.pattern),
                "hop_weight": None if d.hop_weight is None else _num(d.hop_weight),
                "terms": [_num(float(d.pairs().sum())), _num(float(d.query_const().sum())), _num(float(d.const_key().sum())),
                          _num(d.const_const())],
                "rows": [[name(q), name(k), _num(v)] for q, k, v in d.rows(top)],
            })
        loads = []
        for h in self.loadings:
            m, hh = np.nonzero(h.loading)
            order = np.argsort(-np.abs(h.loading[m, hh]), kind="stable")
            loads.append({"target": ids[h.target], "source": ids[h.source], "edge": _num(h.edge),
                          "heads": [[int(m[o]), int(hh[o]), _num(float(h.loading[m[o], hh[o]]))] for o in order]})
        return {"scores": scores, "loadings": loads}


def _num(x: float) -> float:
    """``x`` rounded to 6 significant digits for the page."""
    return float(f"{float(x):.6g}")


def _renodes(d: QKDecomposition, q_nodes: np.ndarray, k_nodes: np.ndarray) -> QKDecomposition:
    return QKDecomposition(site=d.site, scaling=d.scaling, softcap=d.softcap, q_nodes=q_nodes, Q=d.Q, q_const=d.q_const,
                           q_clean=d.q_clean, k_nodes=k_nodes, K=d.K, k_const=d.k_const, k_clean=d.k_clean,
                           model_score=d.model_score, pattern=d.pattern, hop_weight=d.hop_weight)
