"""The provenance card of an attribution graph (docs/design.md §8), torch-free.

A card answers "what exactly produced this graph, how good were the parts, and which statements about
it were tested causally?". It is built only from what was recorded — the graph's metadata (written by
``attribute``, pruning, scoring, the CLI and validation runs) — and every field that nobody recorded is
the string ``"not recorded"``, never a guess. The same card is stored as ``metadata["card"]`` (JSON,
inside the graph file) and written as ``card.md`` beside it.

Claims are tagged by evidence: *observational* (read off the graph of the frozen linear replacement
model) or *causal* (measured by an intervention on the real model). Only validation records and
steering runs (``sparsetrace steer --record-to``) make causal claims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from . import records
from .graph import AttributionGraph
from .records import ValidationRecord

__all__ = ["NOT_RECORDED", "CARD_VERSION", "build_card", "card_markdown", "attach_card", "add_validation", "add_steering"]

NOT_RECORDED = "not recorded"
CARD_VERSION = 1


def _get(d: Mapping[str, Any] | None, *keys: str, default: Any = NOT_RECORDED) -> Any:
    """``d[k1][k2]…``, or ``default`` when any level is missing or None."""
    cur: Any = d
    for k in keys:
        if not isinstance(cur, Mapping) or cur.get(k) is None:
            return default
        cur = cur[k]
    return cur


def _mean(values: Any) -> Any:
    """Mean of a per-layer list (a scalar passes through); ``not recorded`` for anything else."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return float(values)
    if isinstance(values, Sequence) and not isinstance(values, str) and values:
        nums = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if nums:
            return sum(nums) / len(nums)
    return NOT_RECORDED


def _transcoder_section(graph: AttributionGraph) -> dict[str, Any]:
    prov = records.provenance_of(graph)
    tc, training = prov.transcoders, prov.training
    source = records.transcoder_source_of(graph)
    is_random = (source is not None and source.random) or bool(training.get("random"))
    return {
        "source": source.description if source is not None and source.description is not None else NOT_RECORDED,
        "random": is_random,
        # a per-layer set's config has no "kind"; a cross-layer transcoder's says "cross-layer" (design.md §14)
        "kind": tc.get("kind", "per-layer") if tc else NOT_RECORDED,
        "model_id": tc.get("model_id", NOT_RECORDED),
        "n_features": tc.get("n_features", NOT_RECORDED),
        "skip": tc.get("skip", NOT_RECORDED),
        "training_data": "none: random, untrained weights" if is_random else training.get("corpus", NOT_RECORDED),
        "training_sources": NOT_RECORDED if is_random else (training.get("corpus_sources") or NOT_RECORDED),
        "training_tokens": 0 if is_random else training.get("tokens", NOT_RECORDED),
        "code_version": training.get("code_version", NOT_RECORDED),
    }


def _sparsity_section(prov: records.AttributionProvenance) -> dict[str, Any]:
    tc = prov.transcoders
    act = tc.get("activation", NOT_RECORDED)
    out = {"activation": act}
    if act == "topk":
        out["k"] = tc.get("k", NOT_RECORDED)
    elif act == "jumprelu":
        out["threshold"] = "learned per feature (JumpReLU θ)"
    elif act == "relu":
        out["threshold"] = "0 (ReLU)"
    return out


def _quality_section(prov: records.AttributionProvenance) -> dict[str, Any]:
    m = prov.metrics
    return {
        "fvu_mean": _mean(m.get("fvu")),
        "l0_mean": _mean(m.get("l0")),
        "dead_fraction_mean": _mean(m.get("dead_fraction")),
        "ce_clean": m.get("ce_clean", NOT_RECORDED),
        "ce_all_mlps_replaced": m.get("ce_replaced", NOT_RECORDED),
        "ce_zero_ablated": m.get("ce_zero", NOT_RECORDED),
        "ce_recovered_percent": m.get("ce_recovered", NOT_RECORDED),
        "kl_all_mlps_replaced": m.get("kl_replaced", NOT_RECORDED),
        "evaluated_on": _get(m, "evaluation"),
    }


def _selection_section(graph: AttributionGraph) -> dict[str, Any]:
    prov = records.provenance_of(graph)
    att, stats = prov.attribution, prov.stats
    pr = records.prune_summary_of(graph)
    budget = att.get("max_feature_nodes", NOT_RECORDED) if "max_feature_nodes" in att else NOT_RECORDED
    return {
        "logit_targets": {
            "max_n_logits": att.get("max_n_logits", NOT_RECORDED),
            "desired_logit_prob": att.get("desired_logit_prob", NOT_RECORDED),
        },
        "row_budget": "none (all active features)" if budget is None else budget,
        "active_features": stats.get("active_features", NOT_RECORDED),
        "feature_nodes": stats.get("feature_nodes", NOT_RECORDED),
        "store_threshold": att.get("store_threshold", NOT_RECORDED),
        "node_threshold": pr.node_threshold if pr is not None else NOT_RECORDED,
        "edge_threshold": pr.edge_threshold if pr is not None else NOT_RECORDED,
        "nodes_before_after_pruning": [pr.n_nodes_before, pr.n_nodes_after] if pr is not None else NOT_RECORDED,
        "edges_before_after_pruning": [pr.n_edges_before, pr.n_edges_after] if pr is not None else NOT_RECORDED,
    }


def _pair(scores: records.GraphScores | None) -> dict[str, Any]:
    """Replacement and completeness, each ``not recorded`` when missing."""
    if scores is None:
        return {"replacement": NOT_RECORDED, "completeness": NOT_RECORDED}
    return {"replacement": _or_not(scores.replacement), "completeness": _or_not(scores.completeness)}


def _or_not(v: Any) -> Any:
    return NOT_RECORDED if v is None else v


def _scores_section(graph: AttributionGraph) -> dict[str, Any]:
    s = records.scores_of(graph)
    fig = records.figure_of(graph)
    return {
        "full_graph": _pair(s.full if s is not None else None),
        "pruned_graph": _pair(s.pruned if s is not None else None),
        "figure": {"nodes": _or_not(fig.nodes) if fig is not None else NOT_RECORDED,
                   **_pair(fig.scores if fig is not None else None)},
    }


N_LABELS = 15
"""Feature labels listed in a card (the most influential features of the graph)."""


def _labels_section(graph: AttributionGraph) -> dict[str, Any]:
    """Where the feature labels came from, and the most influential features' labels with their held-out
    scores (issue 19: a label is a hypothesis, so it carries its measured precision and recall)."""
    labels = records.feature_labels_of(graph)
    src = labels.source
    info = labels.info or {}
    lay = graph.layout
    infl = records.stored_influence(graph)
    rows = []
    feats = [i for i in range(lay.features.start, lay.features.stop) if lay.feature[i] >= 0]
    if infl is not None:
        feats.sort(key=lambda i: (-float(infl[i]), i))
    for i in feats:
        d = info.get((int(lay.layer[i]), int(lay.feature[i])))
        if d is None:
            continue
        rows.append({"node": lay.node_id(i), "label": _known(d, "label"), "source": _known(d, "source"),
                     "precision": d.precision, "recall": d.recall})
        if len(rows) == N_LABELS:
            break
    source = src.source if src is not None and "source" in src.present else (
        labels.source_name if labels.source_name is not None else NOT_RECORDED)
    return {
        "source": source,
        "statistics": (src.statistics if src is not None else None) or NOT_RECORDED,
        "sample_tokens": (src.sample_tokens if src is not None else None) or NOT_RECORDED,
        "scored_on": (src.heldout if src is not None else None) or NOT_RECORDED,
        "score": "precision = P(fires | the token's word is a label word), recall = P(label word | fires), on held-out tokens",
        "features": rows if rows else NOT_RECORDED,
    }


def _known(info: records.FeatureInfo, name: str) -> Any:
    """A field of a feature's info; ``not recorded`` when its stored dict lacks the key."""
    return getattr(info, name) if name in info.present else NOT_RECORDED


def _error_share(graph: AttributionGraph) -> Any:
    """Share of the logits' influence that ends at error nodes: 1 − replacement score (docs/design.md §5)."""
    s = records.scores_of(graph)
    r = s.full.replacement if s is not None and s.full is not None else None
    return NOT_RECORDED if r is None else 1.0 - float(r)


def _limitations(graph: AttributionGraph, transcoders: Mapping[str, Any]) -> list[str]:
    share = _error_share(graph)
    share_text = NOT_RECORDED if share == NOT_RECORDED else f"{100 * share:.1f}%"
    out = [
        "Attention patterns are frozen at their values on this prompt: the graph has no QK attribution "
        "(it cannot say why attention attended where it did).",
        "Every norm's denominator is frozen; edges are exact for the local replacement model of this one "
        "prompt, not for other prompts.",
        f"Error nodes (what the transcoders fail to reconstruct) carry {share_text} of the logits' influence "
        "(1 − replacement score); what flows through them is unexplained.",
        "Position 0 is treated as a constant (attention sink): it has no feature nodes, its error nodes carry no "
        "vector and no edges, and its MLP output is part of κ; its token node has edges as usual.",
    ]
    if transcoders.get("random"):
        out.insert(0, "RANDOM, UNTRAINED transcoders: features mean nothing; this graph only exercises the pipeline.")
    return out


def _claims(graph: AttributionGraph, validation: Sequence[ValidationRecord],
            steering: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, str]]:
    claims = [
        {
            "claim": "Edge weights and node influences describe how the frozen local replacement model computes "
            "the target logits on this prompt.",
            "evidence": "observational (graph)",
        }
    ]
    if records.prune_summary_of(graph) is not None:
        claims.append(
            {
                "claim": "The pruned graph keeps the nodes and edges carrying the stated shares of influence.",
                "evidence": "observational (graph)",
            }
        )
    for v in validation:
        claims.append({"claim": v.claim(), "evidence": "causal (intervention on the real model)"})
    for st in steering:
        claims.append({"claim": f"steering {st.get('description', NOT_RECORDED)} — {st.get('outcome', NOT_RECORDED)}",
                       "evidence": "causal (steering the real model, docs/design.md §16)"})
    return claims


def build_card(graph: AttributionGraph) -> dict[str, Any]:
    """The provenance card of ``graph``, from its metadata alone (see the module docstring).

    Reads ``model``, ``hook_points``, ``transcoders``, ``transcoder_training``, ``transcoder_metrics``,
    ``transcoder_source``, ``attribution``, ``stats``, ``pruning``, ``scores`` and ``validation``."""
    prov = records.provenance_of(graph)
    model = prov.model
    transcoders = _transcoder_section(graph)
    validation = records.validation_of(graph)
    steering = records.steering_of(graph)
    hooks = prov.hook_points
    n_layers = model.get("n_layers", graph.layout.n_layers)
    return {
        "card_version": CARD_VERSION,
        "prompt": graph.prompt or NOT_RECORDED,
        "model": {
            "id": model.get("id", NOT_RECORDED),
            "revision": model.get("revision", NOT_RECORDED),
            "architecture": model.get("architecture", NOT_RECORDED),
            "n_layers": n_layers,
            "d_model": model.get("d_model", NOT_RECORDED),
        },
        "hook_points": {
            "layers": f"all {n_layers} MLP layers" if isinstance(n_layers, int) else NOT_RECORDED,
            "input": hooks.get("in", NOT_RECORDED),
            "output": hooks.get("out", NOT_RECORDED),
        },
        "transcoders": transcoders,
        "sparsity": _sparsity_section(prov),
        "reconstruction": _quality_section(prov),
        "feature_selection": _selection_section(graph),
        "scores": _scores_section(graph),
        "error_node_share": _error_share(graph),
        "labels": _labels_section(graph),
        "validation": [v.to_dict() for v in validation] if validation else NOT_RECORDED,
        **({"steering": steering} if steering else {}),
        "limitations": _limitations(graph, transcoders),
        "claims": _claims(graph, validation, steering),
    }


def attach_card(graph: AttributionGraph) -> dict[str, Any]:
    """Build the card and store it in the graph (``metadata["card"]``); returns it."""
    card = build_card(graph)
    records.store_card(graph, card)
    return card


def add_validation(graph: AttributionGraph, record: ValidationRecord | Mapping[str, Any]) -> dict[str, Any]:
    """Append one validation record (an intervention run: ``kind``, ``description``, ``outcome`` and/or
    ``passed``; a mapping is read with :meth:`ValidationRecord.from_dict`) and refresh the card."""
    rec = record if isinstance(record, ValidationRecord) else ValidationRecord.from_dict(record)
    records.append_validation(graph, rec)
    return attach_card(graph)


def _clip(text: Any, n: int = 100) -> str:
    t = " ".join(str(text).split())
    return t if len(t) <= n else t[: n - 1] + "…"


def steering_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the card keeps of a steering run record (``sparsetrace steer``, docs/design.md §16): the
    interventions and prompt, the metric clean → steered (or over the sweep), the first seed's
    continuation beside the baseline, the seeds and the record's file name."""
    ivs = "; ".join(f"{i['option']} {i['spec']}" + ("" if i.get("value") is None or i["option"] == "--ablate"
                                                     else f"={i['value']:g}") for i in record.get("interventions", []))
    m = record.get("metric") or {}
    sign = "" if m.get("kind") == "prob" else "+"
    sweep = record.get("sweep")
    if sweep:
        pts = ", ".join(f"{r['value']:g}: {r['metric']:{sign}.3g}" for r in sweep["rows"])
        outcome = f"{m.get('name')}: unsteered {m.get('clean', float('nan')):{sign}.3g}; swept {pts}"
        last = sweep["rows"][-1]
        text = f"at {last['value']:g}: {_clip(last.get('continuation'))!r}"
    else:
        outcome = f"{m.get('name')}: {m.get('clean', float('nan')):{sign}.3g} → {m.get('steered', float('nan')):{sign}.3g}"
        text = repr(_clip((record.get("samples") or [{}])[0].get("steered")))
    base = (record.get("samples") or [{}])[0].get("baseline")
    return {
        "description": f"{ivs} on {_clip(record.get('prompt') or record.get('prompt_ids'), 60)!r}",
        "outcome": outcome,
        "continuation": f"{text} (baseline {_clip(base)!r})",
        "seeds": (record.get("decoding") or {}).get("seeds", NOT_RECORDED),
        "record": record.get("file", NOT_RECORDED),
        "created": record.get("created", NOT_RECORDED),
    }


def add_steering(graph: AttributionGraph, record: Mapping[str, Any]) -> dict[str, Any]:
    """Append the card's entry for one steering run record (:func:`steering_entry`) to
    ``metadata["steering"]`` and refresh the card."""
    records.append_steering(graph, steering_entry(record))
    return attach_card(graph)


# ---- markdown -----------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) or NOT_RECORDED
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if v else NOT_RECORDED
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(rows: Mapping[str, Any]) -> list[str]:
    out = ["| field | value |", "|---|---|"]
    out += [f"| {k.replace('_', ' ')} | {_fmt(v)} |" for k, v in rows.items()]
    return out


def _score(x: Any) -> str:
    return "n/a" if not isinstance(x, (int, float)) or isinstance(x, bool) else f"{x:.2f}"


def _labels_markdown(lab: Mapping[str, Any]) -> list[str]:
    if not lab:
        return []
    lines = ["## Feature labels", "", f"Source: {_fmt(lab.get('source', NOT_RECORDED))}."]
    if lab.get("scored_on", NOT_RECORDED) != NOT_RECORDED:
        lines.append(f"Scored on {_fmt(lab['scored_on'])}: {_fmt(lab.get('score', ''))}.")
    lines.append("")
    rows = lab.get("features")
    if isinstance(rows, list) and rows:
        lines += ["| node | label | precision | recall |", "|---|---|---|---|"]
        lines += [f"| {r['node']} | {_fmt(r['label'])} | {_score(r.get('precision'))} | {_score(r.get('recall'))} |" for r in rows]
    else:
        lines.append(f"- {NOT_RECORDED}")
    return lines + [""]


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as a markdown document (what ``card.md`` holds and the CLI prints)."""
    lines = ["# Provenance card", ""]
    if _get(card, "transcoders", "random", default=False):
        lines += ["> **Random, untrained transcoders.** This graph tests the pipeline; it says nothing about the model.", ""]
    lines += [f"Prompt: `{_fmt(card.get('prompt', NOT_RECORDED))}`", ""]
    sections = [
        ("Model", "model"),
        ("Hook points", "hook_points"),
        ("Transcoders", "transcoders"),
        ("Sparsity", "sparsity"),
        ("Reconstruction quality (held-out)", "reconstruction"),
        ("Feature selection", "feature_selection"),
    ]
    for title, key in sections:
        lines += [f"## {title}", "", *_table(card.get(key) or {}), ""]
    sc = card.get("scores") or {}
    lines += ["## Graph scores", "", "| graph | replacement | completeness |", "|---|---|---|"]
    for name, key in (("full", "full_graph"), ("pruned", "pruned_graph"), ("figure", "figure")):
        s = sc.get(key) or {}
        if key == "figure" and s.get("nodes", NOT_RECORDED) == NOT_RECORDED:
            continue
        if key == "figure":
            name = f"figure ({_fmt(s['nodes'])} nodes)"
        lines.append(f"| {name} | {_fmt(s.get('replacement', NOT_RECORDED))} | {_fmt(s.get('completeness', NOT_RECORDED))} |")
    lines += ["", f"Error-node share of influence: {_fmt(card.get('error_node_share', NOT_RECORDED))}", ""]
    lines += _labels_markdown(card.get("labels") or {})
    lines += ["## Validation performed", ""]
    val = card.get("validation", NOT_RECORDED)
    if isinstance(val, list) and val:
        for v in val:
            lines.append(f"- {_fmt(v)}")
    else:
        lines.append(f"- {NOT_RECORDED}: no intervention has been run on this graph (see `sparsetrace validate`)")
    steering = card.get("steering")
    if isinstance(steering, list) and steering:
        lines += ["", "## Steering runs (causal evidence)", ""]
        lines += [f"- {_fmt(st)}" for st in steering]
    lines += ["", "## Limitations", ""]
    lines += [f"- {x}" for x in card.get("limitations") or []]
    lines += ["", "## Claims and their evidence", "", "| claim | evidence |", "|---|---|"]
    lines += [f"| {_fmt(c.get('claim'))} | {_fmt(c.get('evidence'))} |" for c in card.get("claims") or []]
    return "\n".join(lines) + "\n"
