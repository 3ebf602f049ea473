"""Prompt-set commands (docs/design.md §15): ``prompts`` (a set from a template), ``trace-many`` (trace a
set on local workers or a Dask cluster), ``recur`` (what recurs across a traced set) and
``validate-set`` (a hypothesis file tested on every prompt)."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable

import click

from sparsetrace.config import (
    ALIGNS,
    EXACT_DTYPES,
    LABEL_SOURCES,
    AttributionConfig,
    FigureConfig,
    LabelConfig,
    MODES,
    PromptSetConfig,
    PruneConfig,
    RecurConfig,
    TraceManyConfig,
    ValidateSetConfig,
)
from sparsetrace.errors import ConfigError

from ._common import (
    Output,
    atomic_folder,
    check_writable_parent,
    default_of,
    model_options,
    output_options,
    shipped_set,
    transcoder_option,
)

PS = PromptSetConfig
TM = TraceManyConfig
RC = RecurConfig
VS = ValidateSetConfig
A = AttributionConfig
FRACTION = click.FloatRange(0, 1, min_open=True)


def usage_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Bad input (a ConfigError: a malformed prompt line, an unfilled field, a bad hypothesis, an
    unreachable scheduler) as a one-line usage error: exit 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except ConfigError as exc:
            raise click.UsageError(" ".join(str(exc).split())) from None

    return wrapper


@click.command()
@click.argument("template", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The prompt set to write (JSONL).")
@click.option("--limit", type=click.IntRange(1), default=default_of(PS, "limit"), show_default="all",
              help="At most this many prompts, drawn at random with --seed (overrides the file's 'limit').")
@click.option("--seed", type=int, default=None, help="Seed of the draw under --limit (default: the file's, else "
              f"{default_of(PS, 'seed')}).")
@output_options
@usage_errors
def prompts(template, out_path, limit, seed, as_json, quiet):
    """Fill TEMPLATE (a JSON template file) into a prompt set.

    \b
    TEMPLATE keys: template ("When {A} and {B} went to the store, {B} gave a drink to"),
    fields ({"A": [...], "B": [...]}), targets ([" {A}"]: the expected answers), combine
    (product | zip), distinct (product: fields take different values), limit, seed, id ("ioi-{i}").
    """
    import dataclasses

    from sparsetrace.tracer.prompt_sets import generate_prompt_set, load_template_spec, write_prompt_set

    out = Output(as_json, quiet)
    check_writable_parent(out_path, "--out")
    text, fields, targets, cfg, id_format = load_template_spec(template)
    if limit is not None:
        cfg = dataclasses.replace(cfg, limit=limit)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=seed)
    items = generate_prompt_set(text, fields, targets, cfg, id_format)
    write_prompt_set(out_path, items)
    data = {"out": str(out_path), "prompts": len(items), "fields": list(fields), "first": items[0].to_dict()}
    out.result(data, lambda: f"wrote {len(items)} prompts to {out_path} (first: {items[0].prompt!r} → "
               f"{', '.join(repr(t) for t in items[0].targets) or 'top logits'})")


# ---- trace-many ------------------------------------------------------------------------------------
def open_session(model: str | None, transcoders: str | None, device: str | None, seed: int,
                 feature_stats: str | None, label_mode: str):
    """A worker's TraceSession: what ``sparsetrace trace`` loads, loaded once (module level, so that
    worker processes and Dask can import it)."""
    import torch

    from sparsetrace.tracer.pipeline import TraceSession, open_label_sources

    from ._common import load_lm_and_transcoders, model_revision
    from ._trace import _stats_folder

    torch.manual_seed(seed)
    quiet = Output(False, True)
    stats_dir, auto = _stats_folder(Path(feature_stats) if feature_stats else None, transcoders, model, label_mode)
    lm, ts, source = load_lm_and_transcoders(transcoders, model, device, "float32", seed, quiet)
    stats, labels = open_label_sources(stats_dir, label_mode)
    record = {**source, "spec": transcoders, "seed": seed, "model_arg": model}
    return TraceSession(lm, ts, record, model_revision(lm, model), stats, labels, stats_dir, auto)


@click.command("trace-many")
@click.argument("prompts_file", metavar="PROMPTS", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: one trace folder per prompt (named by its id) and manifest.json.")
@click.option("--workers", type=click.IntRange(1), default=default_of(TM, "workers"), show_default=True,
              help="Local worker processes, each loading the model once (1: in this process).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="A Dask scheduler (tcp://host:8786): run on its workers instead of local processes.")
@transcoder_option()
@click.option("--max-n-logits", type=click.IntRange(1, 1000), default=default_of(A, "max_n_logits"), show_default=True,
              help="At most this many logit targets (prompts without targets).")
@click.option("--desired-logit-prob", type=FRACTION, default=default_of(A, "desired_logit_prob"), show_default=True,
              help="Smallest top-probability prefix of logits reaching this cumulative probability.")
@click.option("--batch-size", type=click.IntRange(1), default=default_of(A, "batch_size"), show_default="auto",
              help="Target rows per backward pass.")
@click.option("--max-feature-nodes", type=click.IntRange(0), default=default_of(A, "max_feature_nodes"),
              show_default="all", help="Row budget: compute rows for at most this many features (by influence).")
@click.option("--node-threshold", type=FRACTION, default=default_of(PruneConfig, "node_threshold"), show_default=True,
              help="Pruning: cumulative influence share of kept nodes.")
@click.option("--edge-threshold", type=FRACTION, default=default_of(PruneConfig, "edge_threshold"), show_default=True,
              help="Pruning: cumulative score share of kept edges.")
@click.option("--feature-stats", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Feature statistics for node labels (default: the transcoder set's own, when it has some).")
@click.option("--labels", "label_mode", type=click.Choice(LABEL_SOURCES), default=default_of(LabelConfig, "source"),
              show_default=True, help="auto, contexts or lens (as `trace`).")
@click.option("--picture/--no-picture", default=True, show_default=True, help="Draw each prompt's compact figure.")
@click.option("--max-nodes", type=click.IntRange(1), default=default_of(FigureConfig, "max_nodes"), show_default=True,
              help="Figure node budget.")
@model_options(dtypes=EXACT_DTYPES, dtype_default=default_of(A, "dtype"))
@output_options
@usage_errors
def trace_many(prompts_file, out_dir, workers, scheduler, transcoders, max_n_logits, desired_logit_prob, batch_size,
               max_feature_nodes, node_threshold, edge_threshold, feature_stats, label_mode, picture, max_nodes,
               model, device, dtype, seed, as_json, quiet):
    """Trace every prompt of PROMPTS (JSONL or CSV) into OUT/<id>/.

    Each prompt's folder holds what `sparsetrace trace` writes. OUT/manifest.json records each
    prompt's status, time and scores; a prompt that fails is recorded and the others go on; running
    again skips the prompts already done. With --scheduler the prompts go to a Dask cluster (the
    workers need sparsetrace and the model; the files come back to this machine).
    """
    from sparsetrace.tracer.pipeline import TraceSettings
    from sparsetrace.tracer.prompt_sets import load_prompt_set
    from sparsetrace.tracer.trace_many import run_prompt_set

    out = Output(as_json, quiet)
    items = load_prompt_set(prompts_file)
    check_writable_parent(out_dir, "--out")
    if transcoders is None:
        shipped_set(model)
    settings = TraceSettings(
        attribution=AttributionConfig(max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob,
                                      batch_size=batch_size, max_feature_nodes=max_feature_nodes, dtype=dtype,
                                      device=device),
        prune=PruneConfig(node_threshold, edge_threshold), figure=FigureConfig(max_nodes=max_nodes),
        picture=picture, seed=seed)
    spec = {"model": model, "transcoders": transcoders, "device": device, "seed": seed,
            "feature_stats": str(feature_stats) if feature_stats else None, "label_mode": label_mode}
    factory = functools.partial(open_session, **spec)
    out.say(f"{len(items)} prompts from {prompts_file}; "
            + (f"Dask scheduler {scheduler}" if scheduler else f"{workers} local worker(s)"))
    t0 = time.perf_counter()
    manifest = run_prompt_set(items, out_dir, factory, settings, spec, TraceManyConfig(workers=workers), scheduler,
                              str(prompts_file), out.say)
    data = {"out": str(out_dir), "summary": manifest["summary"], "seconds": round(time.perf_counter() - t0, 3),
            "failed": {e["id"]: e["error"] for e in manifest["prompts"] if e["status"] == "failed"}}
    out.result(data, lambda: _trace_many_text(data))


def _trace_many_text(d: dict) -> str:
    s = d["summary"]
    lines = [f"{s['done']} done, {s['failed']} failed, {s['pending']} pending in {d['seconds']:.1f} s; "
             f"manifest: {d['out']}/manifest.json"]
    lines += [f"  failed {k}: {v}" for k, v in d["failed"].items()]
    return "\n".join(lines)


# ---- recur -------------------------------------------------------------------------------------------
@click.command()
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: DIR/recur): recur.md, recur.json, recur.png, circuit.png, supernodes.json.")
@click.option("--align", type=click.Choice(ALIGNS), default=default_of(RC, "align"), show_default=True,
              help="field: positions by template field (others by offset from the end); end: offset from the end.")
@click.option("--min-fraction", type=FRACTION, default=default_of(RC, "min_fraction"), show_default=True,
              help="A feature recurs when kept at its aligned position in at least this fraction of prompts.")
@click.option("--n-bootstrap", type=click.IntRange(1), default=default_of(RC, "n_bootstrap"), show_default=True,
              help="Bootstrap resamples for the confidence intervals.")
@click.option("--confidence", type=FRACTION, default=default_of(RC, "confidence"), show_default=True,
              help="Coverage of the intervals.")
@click.option("--top", type=click.IntRange(1), default=default_of(RC, "top"), show_default=True,
              help="Recurring features in the report and plot.")
@click.option("--cosine", type=click.FloatRange(-1, 1), default=default_of(RC, "cosine"), show_default=True,
              help="Supernodes: join recurring features at one role whose aligned out-edge vectors have this cosine.")
@click.option("--seed", type=int, default=default_of(RC, "seed"), show_default=True, help="Bootstrap seed.")
@click.option("--max-nodes", type=click.IntRange(1), default=default_of(FigureConfig, "max_nodes"), show_default=True,
              help="Combined figure: at most this many supernodes and features.")
@click.option("--width", type=click.FloatRange(2.5, 20), default=default_of(FigureConfig, "width"), show_default=True,
              help="Combined figure width in inches.")
@output_options
@usage_errors
def recur(folder, out_dir, align, min_fraction, n_bootstrap, confidence, top, cosine, seed, max_nodes, width, as_json,
          quiet):
    """What recurs across a traced set DIR (from `trace-many`): features at aligned positions, their mean
    influence with bootstrap confidence intervals, supernodes across prompts, and the recurring circuit
    as one compact figure (circuit.png)."""
    import json

    from sparsetrace.graphs.figure import draw_figure
    from sparsetrace.graphs.recur import (
        combined_figure,
        hypothesis_skeleton,
        load_traced_set,
        plot,
        recur as find,
        report_markdown,
    )

    out = Output(as_json, quiet)
    cfg = RecurConfig(align=align, min_fraction=min_fraction, n_bootstrap=n_bootstrap, confidence=confidence, top=top,
                      cosine=cosine, seed=seed)
    out_dir = out_dir if out_dir is not None else folder / "recur"
    check_writable_parent(out_dir, "--out")
    manifest, traced = load_traced_set(folder)
    out.say(f"{len(traced)} traced prompts in {folder}")
    report = find(traced, cfg)
    circuit = combined_figure(report, traced, FigureConfig(max_nodes=max_nodes, width=width))
    with atomic_folder(out_dir) as tmp:
        fig = plot(report)
        fig.savefig(tmp / "recur.png", dpi=150)
        draw_figure(circuit, [tmp / "circuit.png"])
        (tmp / "recur.json").write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n")
        (tmp / "supernodes.json").write_text(json.dumps(hypothesis_skeleton(report), indent=1) + "\n")
        (tmp / "recur.md").write_text(report_markdown(report, str(folder), "recur.png", "circuit.png"))
    data = {"out": str(out_dir), "prompts": len(traced), "recurring": len(report.features),
            "supernodes": [s["name"] for s in report.supernodes],
            "top": [{k: r[k] for k in ("role", "layer", "feature", "label", "fraction", "influence", "ci")}
                    for r in report.features[:5]]}
    out.result(data, lambda: "\n".join(
        [f"{len(report.features)} recurring features over {len(traced)} prompts, {len(report.supernodes)} supernodes; "
         f"wrote {out_dir}/: recur.md, recur.json, recur.png, circuit.png, supernodes.json"]
        + [f"  {r['role']} L{r['layer']} F{r['feature']} present {r['fraction']:.2f} influence {r['influence']:.4f} "
           f"[{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] {r['label']}" for r in report.features[:5]]))


# ---- validate-set --------------------------------------------------------------------------------------
@click.command("validate-set")
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.argument("hypotheses", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: DIR/validate): validate_set.json, validate_set.png, card.md.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(MODES), default=default_of(VS, "modes"),
              show_default=True, help="Intervention modes (repeatable).")
@click.option("--n-random", type=click.IntRange(0), default=default_of(VS, "n_random"), show_default=True,
              help="Random feature sets per prompt and hypothesis (equal size and activation mass).")
@click.option("--n-bootstrap", type=click.IntRange(1), default=default_of(VS, "n_bootstrap"), show_default=True,
              help="Bootstrap resamples for the confidence intervals.")
@click.option("--confidence", type=FRACTION, default=default_of(VS, "confidence"), show_default=True,
              help="Coverage of the intervals.")
@click.option("--batch-size", type=click.IntRange(1), default=default_of(VS, "batch_size"), show_default=True,
              help="Intervention sets per forward.")
@click.option("--seed", type=int, default=default_of(VS, "seed"), show_default=True, help="Seed of the random sets and the bootstrap.")
@output_options
@usage_errors
def validate_set(folder, hypotheses, out_dir, modes, n_random, n_bootstrap, confidence, batch_size, seed, as_json, quiet):
    """Test the hypotheses of HYPOTHESES (JSON) on every prompt traced in DIR (from `trace-many`).

    \b
    HYPOTHESES: {"metric": {"a": " {A}", "b": " {B}"},
                 "supernodes": {"NAME": {"role": "end-1", "features": [[LAYER, FEATURE], ...]}},
                 "hypotheses": [{"name": ..., "supernodes": ["NAME"], "action": "ablate",
                                 "expect": "decrease"}]}
    Roles: a template field (B, B#2) or end-K. `recur` writes one (supernodes.json). The model and
    transcoders are the ones DIR was traced with (its manifest).
    """
    import json

    from sparsetrace import __version__
    from sparsetrace.graphs.recur import load_traced_set
    from sparsetrace.tracer.validate_set import card_markdown, load_hypotheses, plot, validate_set as run_set

    from ._common import load_lm_and_transcoders, model_revision

    out = Output(as_json, quiet)
    cfg = ValidateSetConfig(modes=tuple(modes), n_random=n_random, n_bootstrap=n_bootstrap, confidence=confidence,
                            seed=seed, batch_size=batch_size)
    hf = load_hypotheses(hypotheses)
    out_dir = out_dir if out_dir is not None else folder / "validate"
    check_writable_parent(out_dir, "--out")
    manifest, traced = load_traced_set(folder, minimum=1)
    st = manifest.get("settings") or {}
    lm, ts, source = load_lm_and_transcoders(st.get("transcoders"), st.get("model"), st.get("device"), "float32",
                                             int(st.get("seed", 0)), out)
    out.say(f"{len(traced)} prompts × {len(hf.hypotheses)} hypotheses × {len(cfg.modes)} modes")
    report = run_set(traced, hf, lm, ts, cfg, out.say)
    counts = manifest.get("summary") or {}
    provenance = {
        "traced set": f"{folder} ({len(traced)} prompts done of {len(manifest.get('prompts', []))}; "
                      f"failed: {counts.get('failed', 0)})",
        "prompts file": manifest.get("prompts_file"),
        "model": f"{st.get('model') or 'embedded default'}" + (f" ({model_revision(lm, st.get('model'))})"
                                                            if model_revision(lm, st.get("model")) else ""),
        "transcoders": source["description"],
        "hypotheses": f"{hypotheses} (sha256 {hf.sha256[:16]}…)",
        "sparsetrace": __version__,
    }
    report["provenance"] = provenance
    with atomic_folder(out_dir) as tmp:
        plot(report).savefig(tmp / "validate_set.png", dpi=130)
        (tmp / "validate_set.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        (tmp / "card.md").write_text(card_markdown(report, provenance))
    data = {"out": str(out_dir), "prompts": len(traced),
            "results": [{"name": r["name"], **{m: {k: d[k] for k in ("mean", "ci", "expected_sign_fraction", "correlation",
                                                                    "random_mean", "random_ci")}
                                                for m, d in r["modes"].items()}} for r in report["results"]],
            "faithfulness": {m: {"mean": d["mean"], "ci": d["ci"]} for m, d in report["faithfulness"].items()}}
    out.result(data, lambda: _validate_text(report, out_dir))


def _validate_text(report: dict, out_dir: Path) -> str:
    lines = []
    for r in report["results"]:
        for m, d in r["modes"].items():
            lines.append(f"{r['name']} [{m}]: effect {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], "
                         f"expected sign {d['expected_sign_fraction']:.2f}, random {d['random_mean']:+.3f}")
    lines += [f"faithfulness [{m}]: {d['mean']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]" for m, d in report["faithfulness"].items()]
    lines.append(f"wrote {out_dir}/: validate_set.json, validate_set.png, card.md")
    return "\n".join(lines)
