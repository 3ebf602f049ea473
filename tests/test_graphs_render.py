"""graphviz rendering: layered layout numbers, formats by suffix, colours/widths, missing dot."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from _graph_fixtures import golden_graph, random_graph
from sparsetrace.errors import ConfigError, RenderError
from sparsetrace.graphs import render as render_mod
from sparsetrace.graphs.prune import prune_graph
from sparsetrace.graphs.render import EDGE_COLORS, layered_layout, render, repr_svg, to_svg

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` not installed")


def test_layered_layout_golden():
    g = golden_graph()
    lay = layered_layout(g, node_gap=100.0, row_gap=50.0)
    # fullest cells: (layer 0, pos 0) holds feature 0 + error = 2 nodes; (0, 1) features 1, 2 + error = 3
    np.testing.assert_allclose(lay.column_x, [100.0, 350.0])
    assert lay.row_y == {-1: 0.0, 0: 50.0, 1: 100.0, 2: 150.0}
    assert lay.y[g.layout.token_index(0)] == 0.0 and lay.y[g.layout.logit_index(0)] == 150.0
    # the cell (0, 1) spreads features 1, 2 and its error node around the column centre
    assert (lay.x[1], lay.x[2], lay.x[g.layout.error_index(0, 1)]) == (250.0, 350.0, 450.0)
    assert lay.x[g.layout.token_index(1)] == 350.0
    assert lay.width == 500.0


def test_layout_only_uses_present_layers():
    g = prune_graph(golden_graph())
    g2 = random_graph(0, n_layers=8, n_features=4)
    assert len(layered_layout(g2).row_y) <= 10
    assert sorted(layered_layout(g).row_y) == [-1, 0, 1, 2]


@needs_dot
def test_svg_edges_coloured_by_sign_and_sized():
    g = random_graph(7, n_features=15)
    svg = to_svg(g, legend=False)
    d = g.adjacency.data
    pos = len(re.findall(f'<path fill="none" stroke="{EDGE_COLORS["positive"]}"', svg))
    neg = len(re.findall(f'<path fill="none" stroke="{EDGE_COLORS["negative"]}"', svg))
    assert (pos, neg) == (int((d >= 0).sum()), int((d < 0).sum()))
    widths = [float(x) for x in re.findall(r'stroke-width="([0-9.]+)"', svg)]
    assert max(widths) == pytest.approx(4.0, abs=0.01)
    assert svg.count('class="node"') == g.n_nodes + g.layout.n_pos + len(layered_layout(g).row_y)


@needs_dot
@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_formats_by_suffix(tmp_path, suffix, magic):
    g = prune_graph(golden_graph())
    p = render(g, tmp_path / f"g{suffix}", labels={(0, 1): "my label"}, supernodes=[("grp", (0, 1))], title="t")
    assert p.read_bytes().startswith(magic)
    if suffix == ".svg":
        text = p.read_text()
        assert "my label" in text and "grp" in text and "positive edge" in text


def test_bad_suffix():
    with pytest.raises(ConfigError, match=r"path must end in one of \.png, \.svg, \.pdf, got 'g\.jpg'"):
        render(golden_graph(), "g.jpg")


def test_missing_dot(monkeypatch, tmp_path):
    monkeypatch.setattr(render_mod.shutil, "which", lambda name: None)
    with pytest.raises(RenderError, match=r"graphviz's `dot` binary was not found; install it with `apt-get install graphviz`"):
        render(golden_graph(), tmp_path / "g.png")
    assert list(tmp_path.iterdir()) == []


@needs_dot
def test_repr_svg_prunes_big_graphs():
    g = random_graph(1, n_features=60)
    small = repr_svg(g, max_nodes=10)
    full = repr_svg(g, max_nodes=10_000)
    assert small.count('class="node"') < full.count('class="node"')
