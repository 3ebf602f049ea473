"""The viewer's QK panel in a real headless chromium (docs/design.md §13): the stored scores are listed,
clicking one shows its exact split with the parts' nodes outlined, and a node's panel links the heads
carrying its stored cross-position edge to their scores."""

from __future__ import annotations

import numpy as np
import pytest

from _browser import CHROMIUM, Browser
from _graph_fixtures import random_graph
from _qk_fixtures import cross_edge, fake_decomposition, fake_loadings
from sparsetrace.config import QKConfig
from sparsetrace.graphs.html import write_html
from sparsetrace.graphs.prune import prune_graph
from sparsetrace.graphs.qk import QKSite, QKStore
from test_graphs_html import labelled, payload

pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="headless chromium not installed")]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A pruned graph with two stored scores and the head loadings of one cross-position edge; the
    second score is the one of the edge's strongest head at the edge's target position."""
    g = labelled(prune_graph(random_graph(21, n_layers=12, n_pos=6, n_features=200, n_logits=4, edge_prob=0.1), 0.9, 0.98))
    t, s = cross_edge(g)
    hl = fake_loadings(g, t, s)
    m, h = np.unravel_index(np.argmax(np.abs(hl.loading)), hl.loading.shape)
    lay = g.layout
    sites = [QKSite(11, 3, 5, 2), QKSite(int(m), int(h), int(lay.pos[t]), int(lay.pos[s]))]
    decs = [fake_decomposition(g, site, seed=k) for k, site in enumerate(sites)]
    g.qk = QKStore.from_results(lay, decs, [hl])
    path = write_html(g, tmp_path_factory.mktemp("viewer-qk") / "graph.html")
    return g, decs, (t, s), path, payload(path.read_text())


def test_click_a_stored_score_shows_its_split(page, tmp_path):
    g, decs, _, path, data = page
    top = QKConfig().top
    with Browser(1280, 800) as b:
        b.open(path.as_uri())
        assert b.js("document.getElementById('qk').hidden") is False
        assert b.js("document.querySelectorAll('#qk-list tr').length") == 2
        assert b.js("document.getElementById('qk-detail').hidden") is True
        b.click('#qk-list tr[data-qk="0"]')
        assert b.js("document.body.dataset.qk") == "0"
        assert b.js("document.getElementById('qk-title').textContent") == "L11.H3 5←2"
        want = decs[0].rows(top)
        assert b.js("document.querySelectorAll('#qk-rows tr.edge-row').length") == len(want) == top
        first = b.js("document.querySelector('#qk-rows tr.edge-row td').textContent")
        assert float(first.replace("−", "-").replace("+", "")) == pytest.approx(want[0][2], rel=5e-3)
        text = b.js("document.getElementById('qk-detail').textContent")
        assert "pairs" in text and "const×const" in text and "attention 40%" in text
        # the query-side nodes of the shown parts that the page holds are outlined
        ids = {n["id"] for n in data["nodes"]}
        q_ids = {g.layout.node_id(q) for q, _, _ in want if q >= 0} & ids
        assert q_ids and set(b.js("[...document.querySelectorAll('.node.qk-q')].map(e => e.dataset.id)")) == q_ids
        b.screenshot(tmp_path / "qk-panel.png")


def test_node_panel_links_edge_heads_to_their_scores(page):
    g, decs, (t, s), path, _ = page
    lay = g.layout
    with Browser(1280, 800) as b:
        b.open(path.as_uri() + f"#click={lay.node_id(t)}")
        assert b.js("document.body.dataset.selected") == lay.node_id(t)
        text = b.js("document.getElementById('node-qk').textContent")
        assert text.startswith("from ") and lay.node_id(s) in text and f"L{decs[1].site.layer}.H{decs[1].site.head}" in text
        site = decs[1].site
        b.click(f'#node-qk button[data-qk="1"]')
        assert b.js("document.body.dataset.qk") == "1"
        assert b.js("document.getElementById('qk-title').textContent") == f"L{site.layer}.H{site.head} {site.query_pos}←{site.key_pos}"


def test_click_an_edge_with_stored_loadings_shows_its_heads(page, tmp_path):
    g, decs, (t, s), path, _ = page
    lay = g.layout
    src, tgt = lay.node_id(s), lay.node_id(t)
    with Browser(1280, 800) as b:
        b.open(path.as_uri())
        assert b.js("document.querySelectorAll('.edge-hit').length") == 1
        b.js(f"document.querySelector('.edge-hit[data-source=\"{src}\"][data-target=\"{tgt}\"]')"
             ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
        assert b.js("document.body.dataset.selected") == tgt
        assert b.js("document.body.dataset.qkEdge") == f"{src}>{tgt}"
        box = b.js("document.querySelector('.qk-load.sel').textContent")
        assert box.startswith("from ") and src in box and f"L{decs[1].site.layer}.H{decs[1].site.head}" in box
        b.screenshot(tmp_path / "qk-edge.png")
