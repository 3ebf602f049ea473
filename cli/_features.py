"""``sparsetrace features``: feature statistics over a corpus sample (one resumable pass for every layer)
and the inspection of one feature. Defaults come from FeatureStatsConfig."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from sparsetrace.errors import ConfigError
from sparsetrace.config import EXACT_DTYPES, FeatureStatsConfig, InspectConfig, LabelConfig

from ._common import (
    Output,
    check_writable_parent,
    default_of,
    load_lm_and_transcoders,
    model_options,
    output_options,
    parse_layers,
    shipped_stats,
    transcoder_option,
)

C = FeatureStatsConfig
CORPUS_HELP = "A corpus built by `sparsetrace corpus`, a text file, or a folder of .txt/.md files."


@click.group()
def features() -> None:
    """Inspect transcoder features: statistics over a corpus sample, one feature's contexts and tokens."""


def _stats_options(fn):
    for name, kind, help_ in reversed([
        ("n_sequences", click.IntRange(1), "Sequences in the sample."),
        ("ctx_len", click.IntRange(2), "Tokens per sequence."),
        ("batch", click.IntRange(1), "Sequences per model forward."),
        ("top_k", click.IntRange(1), "Top-activating contexts kept per feature."),
    ]):
        fn = click.option(f"--{name.replace('_', '-')}", name, type=kind, default=default_of(C, name), show_default=True, help=help_)(fn)
    return fn


@features.command("stats")
@click.option("--corpus", "corpus_path", required=True, type=click.Path(exists=True, path_type=Path), help=CORPUS_HELP)
@click.option("--out", "-o", "cache", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Cache folder (feature_stats.safetensors + feature_stats.json); an interrupted pass resumes.")
@transcoder_option()
@_stats_options
@click.option("--layers", default=None, metavar="0,1,…", help="Only these layers (default: all, in one pass).")
@click.option("--heldout-sequences", "n_heldout", type=click.IntRange(0), default=default_of(LabelConfig, "n_heldout"),
              show_default=True, help="Held-out sequences the labels are scored on (0: unscored labels).")
@model_options(dtypes=EXACT_DTYPES)
@output_options
def stats(corpus_path, cache, transcoders, n_sequences, ctx_len, batch, top_k, layers, n_heldout, model, device, dtype, seed,
          as_json, quiet):
    """Compute (or resume) feature statistics: density, histograms, top contexts, for every layer; then
    label every feature that fired (whole words at its top contexts) and score the labels on held-out
    text (feature_labels.json.gz). `trace` reads them from --feature-stats DIR, or from the transcoder
    set's own feature_stats/ folder."""
    from sparsetrace.tracer.features import compute_feature_labels, compute_feature_stats, open_sample, save_feature_labels

    out = Output(as_json, quiet)
    check_writable_parent(cache, "--out")
    cfg = FeatureStatsConfig(n_sequences=n_sequences, ctx_len=ctx_len, batch=batch, top_k=top_k, layers=parse_layers(layers))
    lm, ts, source = load_lm_and_transcoders(transcoders, model, device, dtype, seed, out)
    sample = open_sample(corpus_path, lm, ctx_len)
    with out.progress() as bars:
        st = compute_feature_stats(lm, ts, sample, cfg, cache=cache, progress=bars)
        labels = compute_feature_labels(lm, ts, st, sample, LabelConfig(n_heldout=n_heldout), progress=bars)
    save_feature_labels(labels, cache)
    dens = st.fire_count / max(st.n_tokens, 1)
    scored = [x for x in labels.labels.values() if x.precision is not None and x.recall is not None]
    data = {"out": str(cache), "layers": st.layers, "n_tokens": st.n_tokens, "sequences": st.position,
            "sample": st.sample, "dead_fraction": [float((d == 0).mean()) for d in dens],
            "mean_density": [float(d.mean()) for d in dens], "labels": len(labels.labels),
            "labels_heldout": labels.heldout,
            "label_precision_median": float(np.median([x.precision for x in scored])) if scored else None,
            "label_recall_median": float(np.median([x.recall for x in scored])) if scored else None}
    out.result(data, lambda: (
        f"{st.position} sequences, {st.n_tokens:,} tokens from {st.sample}\n"
        f"never fired on the sample, per layer: {', '.join(f'{x:.2f}' for x in data['dead_fraction'])}\n"
        f"{len(labels.labels):,} labels, scored on {labels.heldout}"
        + (f"; median precision {data['label_precision_median']:.2f}, recall {data['label_recall_median']:.2f}" if scored else "")
        + f"\nwrote {cache}"
    ))


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _bar(count: int, top: int, width: int = 30) -> str:
    return "█" * (round(width * count / top) if top else 0)


def _context_text(ctx, color: bool) -> str:
    parts = []
    for i, (tok, a) in enumerate(zip(ctx.tokens, ctx.activations)):
        t = tok.replace("\n", "⏎")
        if i == ctx.focus:
            t = click.style(f"[[{t}]]", bold=True, fg="red") if color else f"[[{t}]]"
        elif a > 0:
            t = click.style(f"[{t}]", fg="yellow") if color else f"[{t}]"
        parts.append(t)
    return "".join(parts)


def _report_text(r, color: bool) -> str:
    lines = [f"feature L{r.layer}.{r.feature}: {r.label}"]
    if r.label_score is not None:
        p, rc = r.label_score
        lines.append(f"label score on held-out text: precision {_pct(p)}, recall {_pct(rc)}")
    if r.density is not None:
        lines.append(
            f"density {r.density:.4f} over {r.n_tokens:,} tokens; mean activation when active "
            f"{r.mean_activation:.3f}, max {r.max_activation:.3f}"
        )
    lines.append("top output tokens (W_U·d_f): " + ", ".join(f"{t!r} {v:+.3f}" for t, v in r.top_output_tokens))
    lines.append("top input tokens (E·e_f):    " + ", ".join(f"{t!r} {v:+.3f}" for t, v in r.top_input_tokens))
    if r.histogram_counts and sum(r.histogram_counts):
        lines.append("activation histogram (log-spaced bins):")
        top = max(r.histogram_counts)
        edges = r.histogram_edges
        for i, c in enumerate(r.histogram_counts):
            if c:
                lines.append(f"  {edges[i]:>9.3g} – {edges[i + 1]:<9.3g} {c:>7} {_bar(c, top)}")
    if r.contexts:
        lines.append("top-activating contexts ([[max]], [active]):")
        for ctx in r.contexts:
            lines.append(f"  {ctx.activation:7.3f}  {_context_text(ctx, color)}")
    elif r.label_contexts:
        lines.append("contexts stored with the label (the statistics' corpus is not here; pass --corpus PATH for all):")
        lines.extend(f"  {c}" for c in r.label_contexts)
    elif r.density is None:
        lines.append("(no corpus statistics: pass --stats DIR or --corpus PATH for contexts, density and histogram)")
    return "\n".join(lines)


@features.command("show")
@click.argument("layer", type=click.IntRange(0))
@click.argument("feature", type=click.IntRange(0))
@transcoder_option()
@click.option("--stats", "stats_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Statistics cache from `features stats` (its corpus is reopened for the contexts).")
@click.option("--corpus", "corpus_path", type=click.Path(exists=True, path_type=Path), default=None,
              help=CORPUS_HELP + " Without --stats, a pass over this layer only is run.")
@_stats_options
@click.option("--n-tokens", type=click.IntRange(1), default=default_of(InspectConfig, "n_tokens"), show_default=True,
              help="Tokens listed per lens.")
@click.option("--window", type=click.IntRange(0), default=default_of(InspectConfig, "window"), show_default=True,
              help="Context tokens on each side.")
@model_options(dtypes=EXACT_DTYPES)
@output_options
def show(layer, feature, transcoders, stats_dir, corpus_path, n_sequences, ctx_len, batch, top_k, n_tokens, window,
         model, device, dtype, seed, as_json, quiet):
    """Inspect feature FEATURE of layer LAYER: contexts, histogram, density, token lenses, label."""
    from sparsetrace.tracer.features import (
        compute_feature_stats,
        inspect_feature,
        load_feature_labels,
        load_feature_stats,
        open_sample,
    )

    out = Output(as_json, quiet)
    lm, ts, _ = load_lm_and_transcoders(transcoders, model, device, dtype, seed, out)
    # check the ids before any corpus pass: a typo should not cost a pass
    if layer >= ts.n_layers:
        raise ConfigError(f"LAYER={layer}; allowed: 0..{ts.n_layers - 1}")
    if feature >= ts.n_features:
        raise ConfigError(f"FEATURE={feature}; allowed: 0..{ts.n_features - 1} (the set has {ts.n_features} per layer)")
    st = sample = labels = None
    if stats_dir is None and corpus_path is None:
        stats_dir = shipped_stats(transcoders, model)  # the set's own feature_stats/, when it ships one
    if stats_dir is not None:
        st = load_feature_stats(stats_dir)
        labels = load_feature_labels(stats_dir)
        path = corpus_path or (Path(st.sample_path) if st.sample_path else None)
        if path is not None and path.exists():
            sample = open_sample(path, lm, st.config.ctx_len, st.sample_split)
    elif corpus_path is not None:
        cfg = FeatureStatsConfig(n_sequences=n_sequences, ctx_len=ctx_len, batch=batch, top_k=top_k, layers=(layer,))
        sample = open_sample(corpus_path, lm, ctx_len)
        with out.progress() as bars:
            st = compute_feature_stats(lm, ts, sample, cfg, progress=bars)
    report = inspect_feature(lm, ts, layer, feature, st, sample, n_tokens=n_tokens, window=window, labels=labels)
    out.result(report.to_dict(), lambda: _report_text(report, color=True))
