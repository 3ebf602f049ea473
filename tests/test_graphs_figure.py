"""Compact figures: the automatic choice is the influence ranking's prefix, merges cost no budget, a
group's edges are the sums of its members' edges, subgraph scores match a hand computation, specs are
validated, and the drawing is deterministic, vector with embedded fonts, and legible at both widths."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import numpy as np
import pytest

from _graph_fixtures import _wrap, random_graph
from sparsetrace.errors import ConfigError
from sparsetrace.graphs._paper import _text_width, figure_bytes, fit_lines, layout_figure
from sparsetrace.graphs.figure import (
    FigureConfig,
    FigureGroup,
    FigureSpec,
    auto_spec,
    build_figure,
    mask_of,
    node_ids,
    subgraph_scores,
)
from sparsetrace.graphs.graph import Adjacency, NodeKind, NodeLayout
from sparsetrace.graphs.prune import node_influence, prune, prune_graph
from sparsetrace.graphs.scores import graph_scores, pruned_graph_scores


def small_graph():
    """Features a = F0.1@0, b = F0.2@1, c = F1.3@1; errors E0@0 E0@1 E1@0 E1@1; tokens; one logit (p = 1).

    a ← T@0 (2); b ← T@0 (1), T@1 (1); c ← a (1), b (3), E0@1 (1); logit ← c (2), b (−1), E1@1 (1)."""
    layout = NodeLayout.build(2, 2, [0, 0, 1], [0, 1, 1], [1, 2, 3], n_logits=1)
    a, b, c = 0, 1, 2
    e01, e11 = layout.error_index(0, 1), layout.error_index(1, 1)
    t0, t1, lg = layout.token_index(0), layout.token_index(1), layout.logit_index(0)
    edges = [(a, t0, 2.0), (b, t0, 1.0), (b, t1, 1.0), (c, a, 1.0), (c, b, 3.0), (c, e01, 1.0),
             (lg, c, 2.0), (lg, b, -1.0), (lg, e11, 1.0)]
    t, s, v = map(np.array, zip(*edges))
    assert layout.can_feed(t, s).all()
    return _wrap(layout, Adjacency.from_coo(t, s, v.astype(float), layout.n_nodes), np.array([1.0]))


# ---- scores ---------------------------------------------------------------------------------------
def test_subgraph_scores_by_hand():
    g = small_graph()
    # full graph: I_c = 1/2, I_b = 1/4 + 3/10, I_a = 1/10, errors 1/4 + 1/10, tokens 3/8 + 11/40
    full = graph_scores(g)
    assert full.replacement == pytest.approx(float(Fraction(26, 40)))
    assert full.completeness == pytest.approx(float(Fraction(112, 126)))
    # keep a and c, fold b into E0@1: c ← E0@1 becomes 3 + 1, logit ← E0@1 is −1
    # I_c = 1/2, I_a = 1/10, I_E0@1 = 1/4 + 2/5, I_E1@1 = 1/4, I_T0 = 1/10
    keep = np.zeros(g.n_nodes, bool)
    keep[[0, 2]] = True
    s = subgraph_scores(g, keep)
    assert s.replacement == pytest.approx(float(Fraction(2, 20)))
    # Σ(I + w) = 52/20; error fractions: logit 1/2 (weight 1), c 4/5 (weight 1/2)
    assert s.completeness == pytest.approx(float(Fraction(34, 52)))
    # every feature drawn: the full graph's scores
    all_f = g.layout.kind == NodeKind.FEATURE
    assert subgraph_scores(g, all_f).to_dict() == pytest.approx(full.to_dict())


def test_subgraph_scores_of_the_pruned_set_equal_the_pruned_scores():
    g = random_graph(4, n_layers=4, n_pos=4, n_features=40)
    res = prune(g, 0.7, 0.9)
    feats = res.node_mask & (g.layout.kind == NodeKind.FEATURE)
    assert subgraph_scores(g, feats).to_dict() == pytest.approx(pruned_graph_scores(g, res).to_dict())


def test_subgraph_scores_on_a_pruned_graph_missing_error_nodes():
    """A pruned graph may lack the error node a dropped feature folds into: it is added (no edges)."""
    g = prune_graph(random_graph(6, n_layers=3, n_pos=3, n_features=30), 0.6, 0.9)
    have = g.layout.n_errors
    keep = np.zeros(g.n_nodes, bool)
    keep[g.layout.features.start] = True
    s = subgraph_scores(g, keep)
    assert 0.0 <= s.replacement <= 1.0 and 0.0 <= s.completeness <= 1.0
    assert have < g.layout.n_layers * g.layout.n_pos  # the case this test is about


# ---- edges between drawn nodes --------------------------------------------------------------------
def test_group_edges_are_member_sums():
    g = small_graph()
    spec = FigureSpec(nodes=("T@0", "T@1", "F1.3@1", "E0@1", "L0"), groups=(FigureGroup("ab", ("F0.1@0", "F0.2@1")),))
    fig = build_figure(g, spec, FigureConfig(min_edge_share=0.0, max_edges=100))
    key = [u.key for u in fig.units]
    got = {(key[s], key[t]): (w, f) for s, t, w, f in zip(fig.src, fig.dst, fig.weight, fig.share)}
    # into the group: a ← T0 (2) + b ← T0 (1); its input mass is |a's row| + |b's row| = 4
    assert got[("T@0", "ab")] == pytest.approx((3.0, 3 / 4))
    assert got[("T@1", "ab")] == pytest.approx((1.0, 1 / 4))
    # out of the group: c ← a (1) + b (3); c's input mass 5
    assert got[("ab", "F1.3@1")] == pytest.approx((4.0, 4 / 5))
    assert got[("ab", "L0")] == pytest.approx((-1.0, 1 / 4))
    assert got[("F1.3@1", "L0")] == pytest.approx((2.0, 2 / 4))
    assert got[("E0@1", "F1.3@1")] == pytest.approx((1.0, 1 / 5))
    assert len(got) == 6  # E1@1 is not drawn, and nothing else is connected
    # against the dense matrix, on a random graph with random groups
    r = random_graph(9, n_layers=3, n_pos=3, n_features=24)
    ids = node_ids(r.layout)
    feats = [ids[i] for i in range(r.layout.features.start, r.layout.features.stop)]
    spec = FigureSpec(nodes=tuple(feats[8:14]) + ("L0", "L1"), groups=(FigureGroup("g1", tuple(feats[:4])), FigureGroup("g2", tuple(feats[4:8]))))
    fig = build_figure(r, spec, FigureConfig(min_edge_share=0.0, max_edges=1000))
    A = r.dense_adjacency()
    mass = np.abs(A).sum(1) + r.adjacency.remainder
    members = [list(u.members) for u in fig.units]
    for s, t, w, f in zip(fig.src, fig.dst, fig.weight, fig.share):
        block = A[np.ix_(members[t], members[s])]
        assert w == pytest.approx(block.sum())
        assert f == pytest.approx(abs(block.sum()) / mass[members[t]].sum())
    n_pairs = sum(1 for t in range(len(members)) for s in range(len(members))
                  if s != t and abs(A[np.ix_(members[t], members[s])].sum()) > 0)
    assert len(fig.src) == n_pairs


def test_strongest_edges_only():
    r = random_graph(2, n_layers=4, n_pos=4, n_features=40)
    spec = auto_spec(r, FigureConfig(max_nodes=12))
    every = build_figure(r, spec, FigureConfig(max_edges=10_000, min_edge_share=0.0))
    infl, w = node_influence(r), r.logit_weights()
    imp = np.array([infl[list(u.members)].sum() + w[list(u.members)].sum() for u in every.units])
    score = every.share * imp[every.dst]
    edges = list(zip(every.src.tolist(), every.dst.tolist()))
    best_out = {s: max((e for e in range(len(edges)) if edges[e][0] == s), key=lambda e: score[e]) for s in set(every.src.tolist())}
    best_in = {t: max((e for e in range(len(edges)) if edges[e][1] == t), key=lambda e: score[e]) for t in set(every.dst.tolist())}
    guaranteed = set(best_out.values()) | set(best_in.values())
    extra = 3
    fig = build_figure(r, spec, FigureConfig(max_edges=len(guaranteed) + extra, min_edge_share=0.0))
    drawn = set(zip(fig.src.tolist(), fig.dst.tolist()))
    assert len(drawn) == len(guaranteed) + extra
    # every node keeps its strongest out-edge and in-edge; the rest are the best-scoring others
    assert {edges[e] for e in guaranteed} <= drawn
    others = sorted((e for e in range(len(edges)) if e not in guaranteed), key=lambda e: -score[e])[:extra]
    assert drawn == {edges[e] for e in guaranteed | set(others)}
    # a share floor drops weak edges whatever the budget
    floor = build_figure(r, spec, FigureConfig(max_edges=10_000, min_edge_share=0.2))
    assert (floor.share >= 0.2).all() and len(floor.src) == int((every.share >= 0.2).sum())


# ---- the automatic choice -------------------------------------------------------------------------
def _ranking(g, infl):
    """Items in influence order: single features, and each position's error nodes as one."""
    lay = g.layout
    items = [(float(infl[i]), int(i), (int(i),)) for i in range(lay.features.start, lay.features.stop)]
    errs = np.arange(lay.errors.start, lay.errors.stop)
    for p in np.unique(lay.pos[errs]):
        m = errs[lay.pos[errs] == p]
        items.append((float(infl[m].sum()), int(m[0]), tuple(int(x) for x in m)))
    items.sort(key=lambda t: (-t[0], t[1]))
    return [it for it in items if it[0] > 0]


@pytest.mark.parametrize("budget", [1, 5, 12])
def test_auto_spec_takes_the_top_influence_nodes(budget):
    g = random_graph(11, n_layers=4, n_pos=5, n_features=60)
    infl = node_influence(g)
    spec = auto_spec(g, FigureConfig(max_nodes=budget))
    fig = build_figure(g, spec)
    inner = [u for u in fig.units if u.kind not in ("token", "logit")]
    assert len(inner) == budget  # random features never merge: one drawn node per item
    expected = {i for _, _, m in _ranking(g, infl)[:budget] for i in m}
    assert {i for u in inner for i in u.members} == expected
    # error nodes of one position are one node showing their share of the influence ending at sources
    sources = infl[(g.layout.kind == NodeKind.TOKEN) | (g.layout.kind == NodeKind.ERROR)].sum()
    for u in inner:
        if u.kind == "error":
            assert len({int(g.layout.pos[i]) for i in u.members}) == 1
            assert u.share == pytest.approx(infl[list(u.members)].sum() / sources)
            assert u.label.endswith(f"{100 * u.share:.0f}%")
    # the logits drawn are those within logit_ratio of the top one, and tokens are those that feed a drawn node
    probs = g.logit_probability
    assert {u.key for u in fig.units if u.kind == "logit"} == {f"L{k}" for k in range(len(probs)) if probs[k] >= 0.1 * probs.max()}
    drawn = np.zeros(g.n_nodes, bool)
    for u in fig.units:
        if u.kind != "token":
            drawn[list(u.members)] = True
    adj = g.adjacency
    fed = {g.layout.node_id(int(s)) for t, s in zip(adj.rows(), adj.indices) if drawn[t] and g.layout.kind[s] == NodeKind.TOKEN}
    assert {u.key for u in fig.units if u.kind == "token"} == fed


def test_auto_spec_respects_candidates_and_is_deterministic():
    g = random_graph(12, n_layers=4, n_pos=4, n_features=50)
    res = prune(g, 0.6, 0.9)
    spec = auto_spec(g, FigureConfig(max_nodes=8), candidates=res.node_mask, influence=res.node_influence)
    assert spec == auto_spec(g, FigureConfig(max_nodes=8), candidates=res.node_mask, influence=res.node_influence)
    idx = {nid: i for i, nid in enumerate(node_ids(g.layout))}
    for nid in list(spec.nodes) + [x for grp in spec.groups for x in grp.nodes]:
        i = idx[nid]
        assert res.node_mask[i] or g.layout.kind[i] in (NodeKind.TOKEN, NodeKind.LOGIT)
    pruned = prune_graph(g, 0.6, 0.9)
    assert mask_of(g, pruned).sum() == pruned.n_nodes


def _merge_graph():
    """Five features, all feeding the logit: F1.7 at positions 1 and 2 (same feature), F1.8@2 and F1.9@2
    (labelled alike from statistics), F1.5@2 (decoder cosine 0.9 with F1.8), F0.4@1 (unrelated)."""
    layout = NodeLayout.build(2, 3, [1, 1, 1, 1, 1, 0], [1, 2, 2, 2, 2, 1], [7, 7, 8, 9, 5, 4], n_logits=1)
    lg = layout.logit_index(0)
    idx = {layout.node_id(i): i for i in range(layout.n_nodes)}
    weights = {"F1.7@1": 5.0, "F1.7@2": 4.0, "F1.8@2": 3.0, "F1.9@2": 2.5, "F1.5@2": 2.0, "F0.4@1": 1.0}
    t = [lg] * len(weights) + [idx["F1.8@2"]]
    s = [idx[k] for k in weights] + [layout.token_index(2)]
    v = list(weights.values()) + [1.0]
    g = _wrap(layout, Adjacency.from_coo(np.array(t), np.array(s), np.array(v), layout.n_nodes), np.array([1.0]))
    stat = {"source": "statistics", "precision": 0.5, "recall": 0.4}
    g.metadata["feature_info"] = {
        "1.8": {"short": "France", "label": "France — …of [France]…", **stat},
        "1.9": {"short": "France", "label": "France — …in [France]…", **stat},
        "1.7": {"short": "capital", "label": "capital", **stat},
        "1.5": {"short": "Paris", "label": "Paris", **stat},
        "0.4": {"short": "the", "label": "the", **stat},
    }
    g.metadata["decoder_cosine"] = {"floor": 0.5, "pairs": [["1.8", "1.5", 0.9], ["1.7", "0.4", 0.6]]}
    return g


def test_auto_spec_merges_into_supernodes():
    g = _merge_graph()
    spec = auto_spec(g, FigureConfig(max_nodes=10))
    groups = {grp.name: set(grp.nodes) for grp in spec.groups}
    assert groups == {"capital": {"F1.7@1", "F1.7@2"}, "France": {"F1.8@2", "F1.9@2", "F1.5@2"}}
    assert "F0.4@1" in spec.nodes  # cosine 0.6 < 0.8, and another position
    # the merges cost no budget: two drawn nodes take every feature but the last one
    two = auto_spec(g, FigureConfig(max_nodes=2))
    assert {grp.name for grp in two.groups} == {"capital", "France"} and "F0.4@1" not in two.nodes
    # a higher threshold stops the cosine merge; a budget of one stops before the second supernode
    strict = auto_spec(g, FigureConfig(max_nodes=10, merge_cosine=0.95))
    assert {grp.name: set(grp.nodes) for grp in strict.groups}["France"] == {"F1.8@2", "F1.9@2"}
    one = auto_spec(g, FigureConfig(max_nodes=1))
    assert [set(grp.nodes) for grp in one.groups] == [{"F1.7@1", "F1.7@2"}]
    fig = build_figure(g, spec)
    france = next(u for u in fig.units if u.key == "France")
    assert france.kind == "supernode" and france.label == "France"
    lg = next(u for u in range(len(fig.units)) if fig.units[u].kind == "logit")
    k = next(e for e in range(len(fig.src)) if fig.units[fig.src[e]].key == "France" and fig.dst[e] == lg)
    assert fig.weight[k] == pytest.approx(3.0 + 2.5 + 2.0)


# ---- specs ------------------------------------------------------------------------------------------
def test_spec_round_trip_json_and_yaml(tmp_path):
    spec = FigureSpec(nodes=("L0", "T@1"), groups=(FigureGroup("g", ("F0.1@0", "F0.2@1")),), labels={"g": "both"},
                      title="t", width=3.3, max_edges=7)
    (tmp_path / "s.json").write_text(json.dumps(spec.to_dict()))
    assert FigureSpec.load(tmp_path / "s.json") == spec
    (tmp_path / "s.yaml").write_text("title: t\nnodes: [L0, T@1]\ngroups:\n  - name: g\n    nodes: [F0.1@0, F0.2@1]\n"
                                     "labels: {g: both}\nwidth: 3.3\nmax_edges: 7\n")
    assert FigureSpec.load(tmp_path / "s.yaml") == spec
    # groups may also be a mapping, and saved specs carry informational keys that are ignored
    d = {"nodes": ["L0"], "groups": {"g": ["F0.1@0"]}, "scores": {"replacement": 0.1}, "graph": "x", "drawn": {}}
    assert FigureSpec.from_dict(d).groups == (FigureGroup("g", ("F0.1@0",)),)


@pytest.mark.parametrize("doc,msg", [
    ([], "spec: expected a mapping with keys title, nodes, groups"),
    ({"nodes": ["L0"], "colour": "red"}, "spec: unknown key 'colour'; allowed: title, nodes, groups"),
    ({"nodes": "L0"}, "spec: nodes must be a list of node id strings"),
    ({"groups": [{"name": "g", "nodes": []}]}, "spec: group 'g' is empty; allowed: a list of one or more node ids"),
    ({"groups": [{"nodes": ["L0"]}]}, "spec: group #0 needs a non-empty 'name'"),
    ({"nodes": ["L0"], "groups": [{"name": "g", "nodes": ["L0"]}]}, "node 'L0' is listed twice"),
    ({"groups": [{"name": "g", "nodes": ["F0.1@0"]}, {"name": "g", "nodes": ["F0.2@1"]}]}, "group name 'g' is used twice"),
    ({}, "spec: lists no nodes"),
    ({"nodes": ["L0"], "width": 0.5}, r"spec: width=0.5; allowed: a width in inches between 1 and 20"),
    ({"nodes": ["L0"], "max_edges": -1}, r"spec: max_edges=-1; allowed: an integer ≥ 0"),
])
def test_bad_specs(doc, msg):
    with pytest.raises(ConfigError, match=re.escape(msg) if "\\" not in msg else msg):
        FigureSpec.from_dict(doc)


def test_spec_nodes_must_exist_and_groups_be_of_one_kind():
    g = small_graph()
    with pytest.raises(ConfigError, match=r"spec: nodes names node 'F9\.9@0', which the graph does not have; allowed: node ids"):
        build_figure(g, FigureSpec(nodes=("F9.9@0",)))
    with pytest.raises(ConfigError, match=r"group 'x' names node 'E5@0'"):
        build_figure(g, FigureSpec(groups=(FigureGroup("x", ("E5@0",)),)))
    with pytest.raises(ConfigError, match=r"group 'mix' mixes error, feature nodes; allowed: features only, or error nodes only"):
        build_figure(g, FigureSpec(groups=(FigureGroup("mix", ("F0.1@0", "E0@1")),)))
    with pytest.raises(ConfigError, match=r"group 'tok' mixes token nodes"):
        build_figure(g, FigureSpec(groups=(FigureGroup("tok", ("T@0",)),)))


@pytest.mark.parametrize("kwargs,msg", [
    ({"max_nodes": 0}, "max_nodes=0; allowed: an integer ≥ 1"),
    ({"max_edges": 0}, "max_edges=0; allowed: an integer ≥ 1"),
    ({"merge_cosine": 1.5}, r"merge_cosine=1.5; allowed: a number in \[0, 1\]"),
    ({"width": 30}, "width=30; allowed: a width in inches between 1 and 20"),
])
def test_config_validation(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        FigureConfig(**kwargs)


# ---- drawing ------------------------------------------------------------------------------------------
def test_fit_lines_never_overflow():
    text = "a rather long label with several words and one extraordinarilylongwordthatcannotfit"
    for width in (0.4, 0.7, 1.0):
        lines = fit_lines(text, width, 7.0)
        assert 1 <= len(lines) <= 2
        assert all(_text_width(x, 7.0) <= width + 1e-9 for x in lines)
        assert lines[-1].endswith("…")
    assert fit_lines("short", 1.0, 7.0) == ["short"]
    # the width is the font's: capitals are wider than lower case
    assert _text_width("MMMM", 7) > _text_width("iiii", 7) > 0


def test_text_width_of_glyphs_the_font_lacks():
    # Gemma's vocabulary puts CJK and control characters in labels; DejaVu Sans has no glyph for them
    assert _text_width("中文", 7.0) == 2 * 7.0 / 72.0  # one em each
    assert _text_width("\x01", 7.0) == 7.0 / 72.0
    lines = fit_lines("中文中文中文中文 label", 0.5, 7.0)
    assert all(_text_width(x, 7.0) <= 0.5 + 1e-9 for x in lines)


def _overlap(a, b) -> bool:
    return abs(a[0] - b[0]) < (a[2] + b[2]) / 2 - 1e-9 and abs(a[1] - b[1]) < (a[3] + b[3]) / 2 - 1e-9


@pytest.mark.parametrize("width", [7.0, 3.3])
def test_layout_is_legible(width):
    g = random_graph(11, n_layers=6, n_pos=6, n_features=80)
    fig = build_figure(g, auto_spec(g, FigureConfig(max_nodes=25)))
    lay = layout_figure(fig, width)
    boxes = list(zip(lay.x, lay.y, lay.w, lay.h))
    assert not any(_overlap(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i))
    assert (lay.x - lay.w / 2 >= -1e-9).all() and (lay.x + lay.w / 2 <= width + 1e-9).all()
    kinds = [u.kind for u in fig.units]
    tok = [k for k, x in enumerate(kinds) if x == "token"]
    lgt = [k for k, x in enumerate(kinds) if x == "logit"]
    err = [k for k, x in enumerate(kinds) if x == "error"]
    inner = [k for k, x in enumerate(kinds) if x not in ("token", "logit", "error")]
    assert err and inner
    # tokens at the bottom, then the error nodes' row, the layers, and the logits on top
    assert lay.y[tok].max() < lay.y[err].min() and lay.y[err].max() < lay.y[inner].min()
    assert lay.y[inner].max() < lay.y[lgt].min()
    # layer is height: a node of a higher layer is never drawn lower
    for i in inner:
        for j in inner:
            if fig.units[i].layer < fig.units[j].layer:
                assert lay.y[i] <= lay.y[j] + 1e-9
    # every drawn edge between inner nodes of distinct layers points up
    for s, t in zip(fig.src, fig.dst):
        if fig.units[s].layer < fig.units[t].layer:
            assert lay.y[s] < lay.y[t]
    # text: at least 6 pt, and every line fits its box
    assert lay.style.font >= 6.0
    for k in inner + err:
        assert all(_text_width(x, lay.style.font) <= lay.w[k] - 2 * lay.style.pad + 1e-9 for x in lay.lines[k])


def test_drawing_is_deterministic_vector_and_embeds_fonts():
    g = random_graph(3, n_layers=4, n_pos=4, n_features=40)
    fig = build_figure(g, auto_spec(g, FigureConfig(max_nodes=10), title="t → x"))
    a = figure_bytes(fig, ["svg", "pdf", "png"], 7.0, dpi=100)
    b = figure_bytes(fig, ["svg", "pdf", "png"], 7.0, dpi=100)
    assert a == b
    svg = a["svg"].decode()
    assert "<text" not in svg and re.search(r'<path id="DejaVuSans-[0-9a-f]+"', svg)  # glyphs as paths
    assert a["pdf"].startswith(b"%PDF") and b"/FontFile2" in a["pdf"] and b"CreationDate" not in a["pdf"]
    from io import BytesIO

    from PIL import Image

    assert Image.open(BytesIO(a["png"])).size[0] == 700  # 7 in at 100 dpi
    narrow = figure_bytes(fig, ["png"], 3.3, dpi=200)["png"]
    assert Image.open(BytesIO(narrow)).size[0] == 660
    with pytest.raises(ConfigError, match="figure format 'jpg'; allowed: png, svg, pdf"):
        figure_bytes(fig, ["jpg"], 7.0)
