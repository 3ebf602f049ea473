"""The self-contained HTML viewer: static checks, and real headless chromium for rendering and clicks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

from _graph_fixtures import golden_graph, random_graph
from sparsetrace.graphs.html import TOP_K, repr_html, to_html, write_html
from sparsetrace.graphs.prune import prune_graph

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def browser(test):
    """Marked ``browser`` (pyproject's marker) and skipped without a chromium binary."""
    return pytest.mark.browser(pytest.mark.skipif(CHROMIUM is None, reason="headless chromium not installed")(test))


def _chromium(url: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             *args, url],
            capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _payload(page: str) -> dict:
    m = re.search(r'<script id="graph-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_page_is_self_contained_and_escaped():
    g = golden_graph()
    g.token_strings[0] = "</script><b>"
    page = to_html(g, title="t<1>")
    assert "<title>t&lt;1&gt;</title>" in page
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|\bhref=|https?://(?!www\.w3\.org/2000/svg)", page)
    data = _payload(page)  # the hostile token did not end the data block early
    assert data["columns"][0]["token"] == "</script><b>"
    assert len(data["nodes"]) == 12 and len(data["edges"]) == 10
    assert data["nodes"][1]["id"] == "F0.1@1" and data["nodes"][11]["kind"] == "logit"


def test_repr_html_is_an_iframe():
    out = repr_html(golden_graph())
    assert out.startswith('<iframe srcdoc="&lt;!DOCTYPE html&gt;') and "<script" not in out


def _expected_highlights(g, node_id):
    i = [g.layout.node_id(k) for k in range(g.n_nodes)].index(node_id)
    adj = g.adjacency
    rows = adj.rows()
    n_in = min(TOP_K, int((rows == i).sum()))
    n_out = min(TOP_K, int((adj.indices == i).sum()))
    return n_in, n_out


@browser
def test_browser_click_and_threshold(tmp_path):
    g = prune_graph(random_graph(5, n_layers=4, n_pos=5, n_features=80, edge_prob=0.4), 0.9, 0.95)
    p = write_html(g, tmp_path / "v.html")
    # pick the node with the most inputs and outputs so TOP_K truncation is exercised
    adj = g.adjacency
    degree = np.bincount(adj.rows(), minlength=g.n_nodes) + np.bincount(adj.indices, minlength=g.n_nodes)
    degree[g.layout.logits] = 0
    target = g.layout.node_id(int(np.argmax(degree)))
    frac = 0.3
    dom = _chromium(p.as_uri() + "#click=" + quote(target) + f"&threshold={frac}", "--dump-dom")
    assert 'data-ready="1"' in dom and f'data-selected="{target}"' in dom
    w = np.abs(adj.data)
    visible = w >= frac * w.max()
    assert f'data-visible-edges="{int(visible.sum())}"' in dom
    assert dom.count('class="edge hidden"') == int((~visible).sum())
    # highlights only among visible edges
    rows = adj.rows()
    i = [g.layout.node_id(k) for k in range(g.n_nodes)].index(target)
    n_in = min(TOP_K, int(((rows == i) & visible).sum()))
    n_out = min(TOP_K, int(((adj.indices == i) & visible).sum()))
    assert len(re.findall(r'class="edge hl-in"', dom)) == n_in
    assert len(re.findall(r'class="edge hl-out"', dom)) == n_out
    assert n_in + n_out > 0
    assert len(re.findall(r'class="node kind-\w+ selected"', dom)) == 1
    # the highlighted inputs are the strongest visible ones
    strongest = np.argsort(-np.where((rows == i) & visible, w, -1))[:n_in]
    src_ids = {g.layout.node_id(int(adj.indices[e])) for e in strongest}
    hl_sources = set(re.findall(r'class="edge hl-in" data-source="([^"]+)"', dom))
    assert hl_sources == src_ids


@browser
def test_browser_screenshot_draws_nodes(tmp_path):
    from PIL import Image

    g = prune_graph(golden_graph())
    p = write_html(g, tmp_path / "v.html")
    shot = tmp_path / "shot.png"
    _chromium(p.as_uri(), f"--screenshot={shot}", "--window-size=900,600")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)

    def count(hex_colour):
        rgb = np.array([int(hex_colour[k:k + 2], 16) for k in (1, 3, 5)])
        return int((np.abs(img - rgb).sum(axis=2) <= 6).sum())

    # two features, two errors, two tokens, one logit: each fill colour covers a good area
    assert count("#d6e6f5") > 2 * 800  # feature boxes 76×26 px, minus text
    assert count("#fbd5a5") > 800
    assert count("#e0e0e0") > 2 * 400
    # positive edges (blue at 75% opacity over white: blue − red ≈ 110) are drawn; fills have < 35
    assert int(((img[..., 2] - img[..., 0]) > 60).sum()) > 500
