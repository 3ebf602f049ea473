"""The viewer in a real headless chromium (tests/_browser.py speaks the DevTools protocol over a pipe):
it opens fitted to a 1280×800 window with logits and tokens in view, and real clicks, hovers, pins,
groups, search, zoom and the spec download do what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _browser import CHROMIUM, Browser
from _graph_fixtures import random_graph
from sparsetrace.graphs.figure import FigureConfig, FigureSpec, auto_spec, build_figure
from sparsetrace.graphs.html import PATH_FANOUT, TOP_K, write_html
from sparsetrace.graphs.prune import prune_graph
from test_graphs_html import labelled, payload

pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason="headless chromium not installed")]

W, H = 1280, 800


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A pruned 30-layer graph of realistic width (6 positions, 10 logits) with labels and a default spec."""
    g = labelled(prune_graph(random_graph(21, n_layers=30, n_pos=6, n_features=400, n_logits=10, edge_prob=0.08), 0.9, 0.98))
    spec = auto_spec(g, FigureConfig(max_nodes=8))
    path = write_html(g, tmp_path_factory.mktemp("viewer") / "graph.html", spec=spec)
    return g, spec, path, payload(path.read_text())


@pytest.fixture(scope="module")
def browser():
    with Browser(W, H) as b:
        yield b


def test_opens_fitted_with_logits_and_tokens_in_view(page, browser, tmp_path):
    from PIL import Image

    g, _, path, data = page
    browser.open(path.as_uri())
    canvas = browser.rect("#canvas")
    assert canvas["width"] > 800 and canvas["height"] > 600
    # the slider starts where about MAX_VISIBLE_EDGES edges show
    shares = np.array([e[3] for e in data["edges"]])
    assert browser.js("document.body.dataset.visibleEdges") == str(int((shares >= data["threshold"]).sum()))
    assert browser.js("document.querySelectorAll('.edge:not(.hidden)').length") == int((shares >= data["threshold"]).sum())
    for kind, n in (("logit", g.layout.n_logits), ("token", g.layout.n_pos)):
        rects = browser.js(f"[...document.querySelectorAll('.node.kind-{kind} .shape')].map(e => {{ const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})")
        assert len(rects) == n
        for x, y, w, h in rects:
            assert canvas["x"] <= x and x + w <= canvas["x"] + canvas["width"], (kind, x, w)
            assert canvas["y"] <= y and y + h <= canvas["y"] + canvas["height"], (kind, y, h)
    shot = browser.screenshot(tmp_path / "fitted.png")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (H, W)

    def colour_at(rect, hex_colour) -> int:
        x, y, w, h = (int(round(v)) for v in rect)
        rgb = np.array([int(hex_colour[k:k + 2], 16) for k in (1, 3, 5)])
        return int((np.abs(img[y:y + h, x:x + w] - rgb).sum(axis=2) <= 12).sum())

    # the screenshot shows every logit and token box in its fill colour, where the DOM says it is
    for kind in ("logit", "token"):
        rects = browser.js(f"[...document.querySelectorAll('.node.kind-{kind} .shape')].map(e => {{ const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})")
        for r in rects:
            assert colour_at(r, data["colors"][kind]) > 0.2 * r[2] * r[3] * 0.5, (kind, r)


def test_click_opens_the_panel(page, browser):
    g, _, path, data = page
    browser.open(path.as_uri())
    # the feature with the most inputs, so that the panel's list is cut at TOP_K
    nodes, edges = data["nodes"], data["edges"]
    n_in = np.bincount([e[1] for e in edges], minlength=len(nodes))
    n_in[[i for i, n in enumerate(nodes) if n["kind"] != "feature"]] = -1
    i = int(np.argmax(n_in))
    node = nodes[i]
    browser.js("window.sparsetraceViewer.view.s = 3; document.getElementById('fit').click()")
    browser.click(f'.node[data-id="{node["id"]}"] .shape')
    assert browser.js("document.body.dataset.selected") == node["id"]
    assert browser.js("document.getElementById('sel-label').textContent") == node["full"]
    text = browser.js("document.getElementById('details').textContent")
    assert "precision 50%, recall 25%" in text and "Top contexts" in text and node["contexts"][0] in text
    assert browser.js("document.getElementById('promoted').textContent") == "Paris, London"
    rows = browser.js("[...document.querySelectorAll('#in-edges tr.edge-row')].map(r => r.dataset.node)")
    strongest = sorted((e for e in edges if e[1] == i), key=lambda e: -e[3])[:TOP_K]
    assert rows == [nodes[e[0]]["id"] for e in strongest]
    assert browser.js("document.querySelectorAll('.edge.sel-in').length") == len(strongest)
    # clicking an edge row moves the selection to that node
    browser.click("#in-edges tr.edge-row")
    assert browser.js("document.body.dataset.selected") == rows[0]
    # a click on the background clears it
    browser.mouse("mouseMoved", 60, 200)
    browser.mouse("mousePressed", 60, 200, button="left", clickCount=1)
    browser.mouse("mouseReleased", 60, 200, button="left", clickCount=1)
    assert browser.js("document.body.dataset.selected") == ""


def test_hover_highlights_the_strongest_paths(page, browser):
    _, _, path, data = page
    browser.open(path.as_uri())
    nodes, edges = data["nodes"], data["edges"]
    i = next(k for k, n in enumerate(nodes) if n["kind"] == "feature")
    inn = {k: sorted((e for e in edges if e[1] == k), key=lambda e: -e[3]) for k in range(len(nodes))}
    out = {k: sorted((e for e in edges if e[0] == k), key=lambda e: -e[3]) for k in range(len(nodes))}
    seen_nodes, seen_edges = {i}, set()
    for lists, end in ((inn, 0), (out, 1)):  # follow each node's PATH_FANOUT strongest edges, both ways
        stack, seen = [i], {i}
        while stack:
            u = stack.pop()
            for e in lists[u][:PATH_FANOUT]:
                seen_edges.add((e[0], e[1]))
                v = e[end]
                seen_nodes.add(v)
                if v not in seen:
                    seen.add(v)
                    stack.append(v)
    browser.hover(f'.node[data-id="{nodes[i]["id"]}"] .shape')
    assert browser.js("document.body.dataset.hoverPath") == f"{len(seen_nodes)},{len(seen_edges)}"
    assert browser.js("document.querySelectorAll('.edge.hl').length") == len(seen_edges)
    assert browser.js("document.getElementById('graph').classList.contains('hovering')")
    browser.mouse("mouseMoved", 5, 795)
    assert not browser.js("document.getElementById('graph').classList.contains('hovering')")


def test_pin_group_and_download_a_spec_that_draws(page, browser, tmp_path):
    g, _, path, data = page
    browser.open(path.as_uri())
    browser.allow_downloads(tmp_path)
    feats = [n for n in data["nodes"] if n["kind"] == "feature"][:3]
    logit = next(n for n in data["nodes"] if n["kind"] == "logit")
    browser.js("window.sparsetraceViewer.view.s = 1; document.getElementById('fit').click()")
    for n in feats[:2]:  # shift-click pins
        browser.click(f'.node[data-id="{n["id"]}"] .shape', modifiers=8)
    browser.click(f'.node[data-id="{feats[2]["id"]}"] .shape')  # the panel's pin button
    browser.click("#pin-toggle")
    browser.click(f'.node[data-id="{logit["id"]}"] .shape', modifiers=8)
    assert browser.js("document.body.dataset.pins") == "4"
    assert browser.js("document.querySelectorAll('.node.pinned').length") == 4
    for n in feats[:2]:
        browser.click(f'#pins li[data-node="{n["id"]}"] input.tick')
    browser.type("#group-name", "my group")
    browser.click("#group")
    assert browser.js("document.body.dataset.groups") == "1"
    browser.click("#download")
    done = browser.wait_download()
    spec_file = tmp_path / "figure.spec.json"
    assert done["state"] == "completed" and spec_file.is_file()
    doc = json.loads(spec_file.read_text())
    assert doc["groups"] == [{"name": "my group", "nodes": sorted([n["id"] for n in feats[:2]], key=[x["id"] for x in data["nodes"]].index)}]
    assert set(doc["nodes"]) == {feats[2]["id"], logit["id"]}
    assert json.loads(browser.js("document.getElementById('spec').textContent")) == doc
    # the downloaded spec is a valid figure of this graph: the group's edge is its members' sum
    fig = build_figure(g, FigureSpec.from_dict(doc), FigureConfig(min_edge_share=0.0, max_edges=1000))
    assert [u.key for u in fig.units] == [feats[2]["id"], logit["id"], "my group"]
    # unpinning a grouped node takes it out of its group
    browser.click(f'#groups li button.ungroup')
    assert browser.js("document.body.dataset.groups") == "0" and browser.js("document.body.dataset.pins") == "4"
    browser.click("#clear-pins")
    assert browser.js("document.body.dataset.pins") == "0"


def test_load_default_figure(page, browser):
    _, spec, path, _ = page
    browser.open(path.as_uri())
    browser.click("#load-default")
    n = len(spec.nodes) + sum(len(x.nodes) for x in spec.groups)
    assert browser.js("document.body.dataset.pins") == str(n)
    assert json.loads(browser.js("document.getElementById('spec').textContent"))["groups"] == \
        [{"name": x.name, "nodes": list(x.nodes)} for x in spec.groups]


def test_search_finds_by_label(page, browser):
    _, _, path, data = page
    browser.open(path.as_uri())
    target = next(n for n in data["nodes"] if n["kind"] == "feature")
    query = target["label"]
    expected = [n for n in data["nodes"] if query.lower() in (n.get("full") or "").lower() or query.lower() in n["label"].lower()]
    browser.type("#search", query, enter=True)
    assert browser.js("document.body.dataset.matches") == str(len(expected))
    assert browser.js("document.querySelectorAll('.node.match').length") == len(expected)
    best = max(expected, key=lambda n: n["influence"] or 0)
    assert browser.js("document.body.dataset.selected") == best["id"]


def test_zoom_and_pan(page, browser):
    _, _, path, _ = page
    browser.open(path.as_uri())
    s0 = float(browser.js("document.body.dataset.scale"))
    c = browser.rect("#canvas")
    cx, cy = c["x"] + c["width"] / 2, c["y"] + c["height"] / 2
    before = browser.js("(() => { const v = window.sparsetraceViewer.view; return [v.s, v.tx, v.ty]; })()")
    browser.mouse("mouseWheel", cx, cy, deltaX=0, deltaY=-500)
    browser.wait_for(f"+document.body.dataset.scale > {s0 * 1.5}")
    s, tx, ty = browser.js("(() => { const v = window.sparsetraceViewer.view; return [v.s, v.tx, v.ty]; })()")
    # zoom keeps the point under the cursor in place
    px = (cx - c["x"] - before[1]) / before[0]
    assert abs((cx - c["x"] - tx) / s - px) < 1e-6 * max(1, abs(px)) + 1e-3
    # drag from a point of the background (no node under it)
    x0, y0 = next((x, y) for y in range(int(c["y"]) + 20, int(c["y"] + c["height"]), 20) for x in range(int(c["x"]) + 20, int(c["x"] + c["width"]), 20)
                  if browser.js(f"(() => {{ const e = document.elementFromPoint({x}, {y}); return e && e.id === 'graph'; }})()"))
    browser.mouse("mousePressed", x0, y0, button="left", clickCount=1, buttons=1)
    browser.mouse("mouseMoved", x0 + 50, y0 + 20, button="left", buttons=1)
    browser.mouse("mouseMoved", x0 + 100, y0 + 40, button="left", buttons=1)
    browser.mouse("mouseReleased", x0 + 100, y0 + 40, button="left", clickCount=1)
    tx2, ty2 = browser.js("(() => { const v = window.sparsetraceViewer.view; return [v.tx, v.ty]; })()")
    assert (tx2 - tx, ty2 - ty) == pytest.approx((100, 40), abs=1e-6)
    browser.click("#fit")
    assert float(browser.js("document.body.dataset.scale")) == pytest.approx(s0, rel=1e-3)
