"""The self-contained HTML viewer, without a browser: the page, its data, its layout and its size.
(In a real headless chromium: tests/test_graphs_viewer.py.)"""

from __future__ import annotations

import json
import re

import numpy as np

from _graph_fixtures import golden_graph, random_graph
from sparsetrace.graphs.figure import FigureConfig, auto_spec
from sparsetrace.graphs.graph import Adjacency, NodeKind, NodeLayout
from sparsetrace.graphs.html import LINE_GAP, MAX_VISIBLE_EDGES, NODE_GAP, TOP_K, repr_html, to_html, viewer_layout
from sparsetrace.graphs.prune import prune_graph


def payload(page: str) -> dict:
    m = re.search(r'<script id="graph-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def labelled(g):
    """Give every feature the metadata a trace with feature statistics writes."""
    lay = g.layout
    info = {}
    for i in range(lay.features.start, lay.features.stop):
        key = f"{lay.layer[i]}.{lay.feature[i]}"
        info[key] = {"short": f"word{lay.feature[i]}", "label": f"word{lay.feature[i]} — …the [word{lay.feature[i]}] is… → Paris",
                     "source": "statistics", "words": [f"word{lay.feature[i]}"], "precision": 0.5, "recall": 0.25,
                     "contexts": [f"…the [word{lay.feature[i]}] is…", "…a [word] of…"], "promoted": ["Paris", "London"],
                     "density": 0.01}
    g.metadata["feature_info"] = info
    g.metadata["feature_labels"] = {k: v["short"] for k, v in info.items()}
    return g


def test_page_is_self_contained_and_escaped():
    g = golden_graph()
    g.token_strings[0] = "</script><b>"
    page = to_html(g, title="t<1>")
    assert "<title>t&lt;1&gt;</title>" in page
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|\bhref=|https?://(?!www\.w3\.org/2000/svg)", page)
    data = payload(page)  # the hostile token did not end the data block early
    assert data["nodes"][g.layout.token_index(0)]["token"] == "</script><b>"
    assert len(data["nodes"]) == 12 and len(data["edges"]) == 10
    assert data["nodes"][1]["id"] == "F0.1@1" and data["nodes"][11]["kind"] == "logit"


def test_repr_html_is_an_iframe():
    out = repr_html(golden_graph())
    assert out.startswith('<iframe srcdoc="&lt;!DOCTYPE html&gt;') and "<script" not in out


def test_edges_are_each_nodes_strongest_with_their_share():
    g = random_graph(5, n_layers=4, n_pos=4, n_features=70, edge_prob=0.7, store_threshold=0.05)
    data = payload(to_html(g))
    A = g.dense_adjacency()
    mass = np.abs(A).sum(1) + g.adjacency.remainder
    expected = set()
    for t in range(g.n_nodes):  # each target's TOP_K strongest inputs ...
        src = np.flatnonzero(A[t])
        expected |= {(int(s), t) for s in src[np.argsort(-np.abs(A[t, src]), kind="stable")][:TOP_K]}
    for s in range(g.n_nodes):  # ... and each source's TOP_K strongest outputs
        dst = np.flatnonzero(A[:, s])
        expected |= {(s, int(t)) for t in dst[np.argsort(-np.abs(A[dst, s]), kind="stable")][:TOP_K]}
    got = {(e[0], e[1]): e for e in data["edges"]}
    assert set(got) == expected and len(expected) < g.adjacency.nnz
    for (s, t), e in got.items():
        assert e[2] == float(f"{A[t, s]:.4g}")
        assert abs(e[3] - abs(A[t, s]) / mass[t]) < 1e-4


def test_layout_columns_rows_and_cells():
    g = labelled(random_graph(8, n_layers=5, n_pos=4, n_features=60))
    g.token_strings[1] = "a-very-long-token-string"
    x, y, cx, row_y, width, height = viewer_layout(g)
    lay = g.layout
    assert (y[lay.tokens] == 0).all() and (y[lay.logits] > y[lay.features].max()).all()
    assert sorted(row_y) == sorted({int(v) for v in lay.layer})
    # a column is at least as wide as its token's text
    assert cx[2] - cx[1] >= (7.5 * len(g.token_strings[1]) + 24) / 2
    assert width >= sum(7.5 * len(t) + 24 for t in g.token_strings)
    for layer in row_y:
        for p in range(lay.n_pos):
            m = np.flatnonzero((lay.layer == layer) & (lay.pos == p) & (lay.kind != NodeKind.LOGIT))
            for yy in np.unique(y[m]):  # each line of a cell: NODE_GAP apart, centred on its column
                line = np.sort(x[m][y[m] == yy])
                assert np.allclose(np.diff(line), NODE_GAP) and abs(line.mean() - cx[p]) < 1e-9
            assert (y[m] >= row_y[layer]).all()
    # no two nodes overlap, and a higher layer is never drawn lower
    inner = np.flatnonzero(lay.kind != NodeKind.LOGIT)
    dx = np.abs(x[inner, None] - x[None, inner])
    dy = np.abs(y[inner, None] - y[None, inner])
    np.fill_diagonal(dx, np.inf)
    assert ((dx >= NODE_GAP - 1e-9) | (dy >= LINE_GAP - 1e-9)).all()
    order = np.argsort(lay.layer[inner], kind="stable")
    assert (np.diff(lay.layer[inner][order]) >= 0).all()
    layers = sorted({int(v) for v in lay.layer[inner]})
    low_of = {l: y[inner][lay.layer[inner] == l].min() for l in layers}
    high_of = {l: y[inner][lay.layer[inner] == l].max() for l in layers}
    assert all(high_of[a] < low_of[b] for a, b in zip(layers, layers[1:]))


def test_payload_carries_labels_scores_and_the_default_spec():
    g = labelled(prune_graph(random_graph(3, n_layers=4, n_pos=4, n_features=40)))
    spec = auto_spec(g, FigureConfig(max_nodes=6))
    data = payload(to_html(g, spec=spec))
    feat = next(n for n in data["nodes"] if n["kind"] == "feature")
    assert feat["label"].startswith("word") and feat["full"].endswith("→ Paris")
    assert (feat["precision"], feat["recall"]) == (0.5, 0.25)
    assert feat["contexts"][0].startswith("…the [word") and feat["promoted"] == ["Paris", "London"]
    assert data["defaultSpec"]["nodes"] == list(spec.nodes)
    assert data["defaultSpec"]["groups"] == [{"name": x.name, "nodes": list(x.nodes)} for x in spec.groups]
    assert feat["influence"] is not None  # stored by pruning


def test_default_size_graph_stays_under_5_mb():
    """A graph the size of `make trace`'s pruned one (1,200 nodes, 200k edges, 30 layers), every feature
    with contexts: the page stays small because it carries each node's strongest edges only."""
    rng = np.random.default_rng(0)
    L, T, F = 30, 6, 1060
    layout = NodeLayout.build(L, T, rng.integers(0, L, F), rng.integers(1, T, F), rng.choice(2304, F, replace=False) + 0, 10)
    n = layout.n_nodes
    t = rng.integers(0, n, 400_000)
    s = rng.integers(0, n, 400_000)
    ok = layout.can_feed(t, s) & np.isin(layout.kind[t], [NodeKind.FEATURE, NodeKind.LOGIT])
    t, s = t[ok][:200_000], s[ok][:200_000]
    adj = Adjacency.from_coo(t, s, rng.normal(size=len(t)).astype(np.float32), n)
    from _graph_fixtures import _wrap

    g = labelled(_wrap(layout, adj, np.full(10, 0.09)))
    page = to_html(g)
    assert len(page.encode()) <= 5 * 2**20
    data = payload(page)
    assert len(data["nodes"]) == n
    # the slider starts where at most MAX_VISIBLE_EDGES edges show (and the next step down shows more)
    shares = np.array([e[3] for e in data["edges"]])
    assert data["threshold"] > 0 and (shares >= data["threshold"]).sum() <= MAX_VISIBLE_EDGES
    assert (shares >= data["threshold"] - 0.01).sum() > MAX_VISIBLE_EDGES


def test_large_graphs_keep_their_most_influential_nodes_and_influence():
    from sparsetrace.graphs import html as html_mod

    g = prune_graph(random_graph(13, n_layers=4, n_pos=4, n_features=80), 0.99, 0.99)
    infl = np.asarray(g.metadata["node_influence"])
    lay = g.layout
    inner = np.flatnonzero(np.isin(lay.kind, [NodeKind.FEATURE, NodeKind.ERROR]))
    cut = html_mod._cut(g, 10)
    kept = {cut.layout.node_id(i) for i in range(cut.n_nodes)}
    top = {lay.node_id(int(i)) for i in inner[np.argsort(-infl[inner], kind="stable")[:10]]}
    assert kept == top | {lay.node_id(i) for i in range(g.n_nodes) if lay.kind[i] in (NodeKind.TOKEN, NodeKind.LOGIT)}
    by_id = {lay.node_id(i): infl[i] for i in range(g.n_nodes)}
    assert cut.metadata["node_influence"] == [by_id[cut.layout.node_id(i)] for i in range(cut.n_nodes)]
