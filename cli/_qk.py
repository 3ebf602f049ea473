"""``sparsetrace qk``: why an attention head attended where it did — the exact split of its score into
pairs of graph sources (docs/design.md §13); head loadings of a cross-position edge."""

from __future__ import annotations

from pathlib import Path

import click

from sparsetrace.config import QKConfig
from sparsetrace.errors import ConfigError, GraphError

from ._common import Output, default_of, labels_of, load_lm_and_transcoders, output_options, resolve_graph_path

C = QKConfig


@click.command()
@click.argument("graph_path", metavar="GRAPH", type=click.Path(exists=True, path_type=Path))
@click.option("--layer", type=int, default=None, help="Layer of the attention score (with --head, --query-pos, --key-pos: one score).")
@click.option("--head", type=int, default=None, help="Query head.")
@click.option("--query-pos", type=int, default=None, help="Query position (negative: from the end; -1 = the last).")
@click.option("--key-pos", type=int, default=None, help="Key position (≤ the query position; negative: from the end).")
@click.option("--hops", "n_hops", type=click.IntRange(1), default=default_of(C, "n_hops"), show_default=True,
              help="Without all four of --layer/--head/--query-pos/--key-pos: explain this many attention hops, those "
              "carrying the most weight on the graph's logits (among those matching the options given).")
@click.option("--top", type=click.IntRange(1), default=default_of(C, "top"), show_default=True, help="Rows shown per score.")
@click.option("--edge", default=None, metavar="TARGET,SOURCE",
              help="Instead: how the cross-position edge SOURCE→TARGET splits over heads (node ids, e.g. L0,F3.12@5).")
@click.option("--batch-size", type=click.IntRange(1), default=default_of(C, "batch_size"), show_default=True,
              help="Prompt copies per frozen forward (memory ∝ batch × prompt × layers).")
@click.option("--transcoders", "-t", "transcoders", default=None, metavar="DIR",
              help="Transcoder set (default: the one GRAPH records).")
@click.option("--model", "-m", "model", default=None, metavar="ID|PATH", help="Model (default: the one GRAPH records).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available, else CPU).")
@click.option("--save", is_flag=True,
              help="Store the results in GRAPH's file (replacing earlier ones of the same score or edge); for a trace "
              "folder also in its pruned graph and viewer (graph.html shows them on click).")
@output_options
def qk(graph_path, layer, head, query_pos, key_pos, n_hops, top, edge, batch_size, transcoders, model, device, save, as_json,
       quiet):
    """Explain attention scores of GRAPH exactly: which pairs of (query-side source, key-side source) made
    head H of layer L at query position I attend to key position J (docs/design.md §13).

    GRAPH is a graph file or a trace folder (its full graph); the model and transcoders default to the
    ones it was traced with. Without a full site, the hops carrying the most weight on the graph's logits
    are explained.
    """
    try:
        _qk(graph_path, layer, head, query_pos, key_pos, n_hops, top, edge, batch_size, transcoders, model, device, save,
            Output(as_json, quiet))
    except (ConfigError, GraphError) as exc:  # bad input: a usage error (exit 2), one line
        raise click.UsageError(str(exc)) from None


def _qk(graph_path, layer, head, query_pos, key_pos, n_hops, top, edge, batch_size, transcoders, model, device, save, out):
    graph, path = _load_graph(graph_path)
    T = len(graph.token_ids)
    query_pos = _position(query_pos, T, "--query-pos")
    key_pos = _position(key_pos, T, "--key-pos")
    L = graph.layout.n_layers
    if layer is not None and not 0 <= layer < L:
        raise ConfigError(f"--layer {layer}; allowed: 0..{L - 1}")
    if query_pos is not None and key_pos is not None and key_pos > query_pos:
        raise ConfigError(f"--key-pos {key_pos} is after --query-pos {query_pos}; allowed: 0..{query_pos}")
    edge_nodes = _edge(edge, graph) if edge is not None else None
    lm, ts = _parts(graph, model, transcoders, device, out)

    from sparsetrace.tracer.qk import QKSite, open_qk

    cfg = QKConfig(n_hops=n_hops, top=top, batch_size=batch_size)
    with open_qk(graph, lm, ts, cfg) as qa:
        if edge_nodes is not None:
            hl = qa.head_loadings(*edge_nodes)
            data = _loadings_dict(graph, hl, top)
            saved = _save(graph, path, [], [hl], out) if save else []
            out.result({"graph": str(path), "loadings": data, "saved": saved}, lambda: _loadings_text(graph, data))
            return
        given = (layer, head, query_pos, key_pos)
        if all(v is not None for v in given):
            sites, weights = [QKSite(layer, head, query_pos, key_pos)], [None]
        else:
            out.say(f"selecting the {n_hops} attention hop(s) with the most weight on the logits")
            hops = qa.select_hops(n_hops, layer=layer, head=head, query_pos=query_pos, key_pos=key_pos)
            sites, weights = [h.site for h in hops], [h.weight for h in hops]
        out.say(f"decomposing {len(sites)} score(s)")
        decs = qa.decompose(sites)
    for d, w in zip(decs, weights):
        d.hop_weight = w
    labels = _labeller(graph)
    items = [_site_dict(graph, d, top, labels) for d in decs]
    saved = _save(graph, path, decs, [], out) if save else []
    out.result({"graph": str(path), "scores": items, "saved": saved}, lambda: "\n\n".join(_site_text(i) for i in items))


def _save(graph, path: Path, decs, loadings, out) -> list[str]:
    """Store the results with GRAPH (file rewritten atomically); in a trace folder (GRAPH is its
    graph.safetensors) also in graph.pruned.safetensors and its viewer graph.html. Returns the files written."""
    from sparsetrace.graphs.qk import QKStore

    new = QKStore.from_results(graph.layout, decs, loadings)
    graph.qk = new if graph.qk is None else graph.qk.merged(new)
    graph.save(path)
    written = [str(path)]
    pruned_path = path.with_name("graph.pruned.safetensors")
    if path.name == "graph.safetensors" and pruned_path.is_file():
        written += _save_folder(path.parent, graph.qk)
    out.say(f"stored the QK results in {', '.join(written)}")
    return written


def _save_folder(folder: Path, store) -> list[str]:
    """The trace folder's pruned graph and viewer with ``store``."""
    import json

    from sparsetrace.graphs import AttributionGraph
    from sparsetrace.graphs.html import write_html

    pruned = AttributionGraph.load(folder / "graph.pruned.safetensors")
    pruned.qk = store
    pruned.save(folder / "graph.pruned.safetensors")
    spec_path = folder / "graph.spec.json"
    spec = json.loads(spec_path.read_text(encoding="utf-8")) if spec_path.is_file() else None
    write_html(pruned, folder / "graph.html", labels=labels_of(pruned), spec=spec)
    return [str(folder / "graph.pruned.safetensors"), str(folder / "graph.html")]


# ---- inputs ------------------------------------------------------------------------------------
def _load_graph(graph_path: Path):
    from sparsetrace.graphs import AttributionGraph

    path = resolve_graph_path(str(graph_path))
    if not path.is_file():
        raise ConfigError(f"GRAPH {str(graph_path)!r} is a folder without graph.safetensors; pass a graph file or a trace folder")
    graph = AttributionGraph.load(path)
    if len(graph.token_ids) < 2:
        raise GraphError(f"{path} records no prompt (token ids); re-trace it with `sparsetrace trace`")
    return graph, path


def _position(p: int | None, T: int, flag: str) -> int | None:
    if p is None:
        return None
    if not -T <= p < T:
        raise ConfigError(f"{flag} {p}; allowed: 0..{T - 1} or -{T}..-1 from the end (the prompt has {T} tokens)")
    return p + T if p < 0 else p


def _edge(text: str, graph) -> tuple[int, int]:
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) != 2 or "+" in text:
        raise ConfigError(f"--edge {text!r}; allowed form: TARGET,SOURCE node ids, e.g. L0,F3.12@5")
    t, s = graph.layout.parse_nodes(text)
    return int(t), int(s)


def _parts(graph, model: str | None, transcoders: str | None, device: str | None, out: Output):
    """The model and transcoder set GRAPH was traced with (its metadata), unless given."""
    from sparsetrace.models.loading import DEFAULT_MODEL

    from sparsetrace.graphs.records import TranscoderSource, model_id_of, transcoder_source_of

    src = transcoder_source_of(graph) or TranscoderSource(None)
    recorded = model_id_of(graph)
    seed = src.seed if src.seed is not None else 0
    if model is None:
        model = src.model_arg
    model_known = model is not None or recorded == DEFAULT_MODEL.name  # None loads the default
    if transcoders is None:
        transcoders = src.set_spec
    missing = [what for what, known in ((f"where its model ({recorded or 'unknown'}) is", model_known),
                                        ("its transcoder set", transcoders is not None)) if not known]
    if missing:
        flags = [f for f, known in (("--model ID|PATH", model_known), ("--transcoders DIR", transcoders is not None)) if not known]
        raise GraphError(f"the graph does not record {' or '.join(missing)}; pass {' and '.join(flags)} "
                         "(the ones it was traced with)")
    lm, ts, _ = load_lm_and_transcoders(transcoders, model, device, "float32", seed, out)
    return lm, ts


# ---- output ------------------------------------------------------------------------------------
def _labeller(graph):
    """node → a readable label: its id, token and (where the graph has one) feature label."""
    from sparsetrace.graphs import NodeKind

    lay = graph.layout
    feat = labels_of(graph)
    toks = graph.token_strings

    def label(i: int) -> str:
        if i < 0:
            return "constant (biases, position 0)"
        kind = NodeKind(int(lay.kind[i]))
        text = f"{lay.node_id(i)} {toks[int(lay.pos[i])]!r}"
        if kind is NodeKind.FEATURE:
            name = feat.get((int(lay.layer[i]), int(lay.feature[i])))
            if name:
                text += f" {name}"
        return text

    return label


def _site_dict(graph, d, top: int, label) -> dict:
    s = d.site
    toks = graph.token_strings
    closure = d.closure()
    rows = [{"query": q, "key": k, "value": v, "query_label": label(q), "key_label": label(k)} for q, k, v in d.rows(top)]
    return {
        "layer": s.layer, "head": s.head, "query_pos": s.query_pos, "key_pos": s.key_pos,
        "query_token": toks[s.query_pos], "key_token": toks[s.key_pos],
        "score": d.score, "capped_score": float(d.cap(d.score)), "softcap": d.softcap, "model_score": d.model_score,
        "pattern": d.pattern, "hop_weight": d.hop_weight,
        "terms": {"pairs": float(d.pairs().sum()), "query_x_constant": float(d.query_const().sum()),
                  "constant_x_key": float(d.const_key().sum()), "constant_x_constant": d.const_const()},
        "closure": closure, "n_query_sources": len(d.q_nodes), "n_key_sources": len(d.k_nodes), "rows": rows,
    }


def _site_text(i: dict) -> str:
    cap = f" (capped {i['capped_score']:.4g}, softcap {i['softcap']:g})" if i["softcap"] is not None else ""
    hop = f", hop weight {i['hop_weight']:.4g}" if i["hop_weight"] is not None else ""
    t = i["terms"]
    lines = [
        f"L{i['layer']}.H{i['head']}  query {i['query_pos']} {i['query_token']!r} ← key {i['key_pos']} {i['key_token']!r}: "
        f"score {i['score']:.4g}{cap}, pattern {i['pattern']:.3f}{hop}",
        f"  = pairs {t['pairs']:.4g} + query×const {t['query_x_constant']:.4g} + const×key {t['constant_x_key']:.4g} "
        f"+ const×const {t['constant_x_constant']:.4g}   (closure {i['closure']['score']:.1e}; "
        f"{i['n_query_sources']} query-side, {i['n_key_sources']} key-side sources)",
        f"  {'value':>9}  {'query side':<44} key side",
    ]
    for r in i["rows"]:
        lines.append(f"  {r['value']:>9.4f}  {r['query_label'][:44]:<44} {r['key_label']}")
    return "\n".join(lines)


def _loadings_dict(graph, hl, top: int) -> dict:
    import numpy as np

    lay = graph.layout
    flat = np.argsort(-np.abs(hl.loading).ravel(), kind="stable")[:top]
    heads = [{"layer": int(m), "head": int(h), "loading": float(hl.loading[m, h])}
             for m, h in (np.unravel_index(f, hl.loading.shape) for f in flat) if hl.loading[m, h] != 0]
    return {"target": lay.node_id(hl.target), "source": lay.node_id(hl.source), "edge": hl.edge, "stored_edge": hl.stored,
            "sum": float(hl.loading.sum()), "heads": heads, "loading": hl.loading}


def _loadings_text(graph, data: dict) -> str:
    stored = f" (stored {data['stored_edge']:.6g})" if data["stored_edge"] is not None else " (not stored: pruned or thresholded)"
    lines = [f"edge {data['source']} → {data['target']}: {data['edge']:.6g}{stored}; Σ head loadings {data['sum']:.6g}",
             f"  {'layer':>5} {'head':>4} {'loading':>10} {'share':>7}"]
    for h in data["heads"]:
        share = h["loading"] / data["edge"] if data["edge"] else float("nan")
        lines.append(f"  {h['layer']:>5} {h['head']:>4} {h['loading']:>10.4g} {share:>7.1%}")
    return "\n".join(lines)
