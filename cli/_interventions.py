"""Causal commands: ``intervene`` (steer or ablate features, errors, tokens; optionally generate),
``validate`` (test a hypothesis read off a graph) and ``verify`` (check a saved graph against the model)."""

from __future__ import annotations

from pathlib import Path

import click

from sparsetrace.config import EXACT_DTYPES, MODES, InterventionConfig, ValidationConfig, VerifyConfig
from sparsetrace.errors import ConfigError

from ._common import (
    Output,
    default_of,
    load_lm_and_transcoders,
    model_options,
    output_options,
    parse_token_ids,
    transcoder_option,
)


def _ints(text: str, n: int, flag: str, form: str) -> list[int]:
    parts = text.split(":")
    try:
        vals = [int(p) for p in parts]
        if len(vals) != n:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{flag} {text!r}; allowed form: {form} with integers") from None
    return vals


def build_interventions(options: dict[str, tuple[str, ...]], n_prompt: int, ts) -> tuple[list, list, list]:
    """(interventions at prompt positions, at generated positions, the parsed specs) from the option
    strings (``--add`` → its texts, …; syntax: ``sparsetrace.tracer.steering``), checked against the
    set and a ``n_prompt``-token prompt."""
    from sparsetrace.tracer.steering import build, parse_spec

    specs = [parse_spec(opt, text) for opt, texts in options.items() for text in texts]
    if not specs:
        raise ConfigError("no intervention given; use --set, --scale, --ablate, --add, --scale-error or --scale-token")
    _check_features(specs, ts)
    prompt_ivs, gen_ivs = build(specs, n_prompt)
    return prompt_ivs, gen_ivs, specs


def _check_features(specs, ts) -> None:
    from sparsetrace.tracer.steering import check_specs

    check_specs(specs, ts.n_layers, ts.n_features)


def _range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    a, b = _ints(text, 2, "--layers", "A:B")
    return a, b


@click.command()
@click.argument("prompt", required=False)
@click.option("--token-ids", default=None, metavar="1,2,3", help="Token ids instead of a PROMPT.")
@transcoder_option()
@click.option("--set", "sets", multiple=True, metavar="L:POS:F=V",
              help="Clamp feature F of layer L at V. POS: P, A..B (inclusive), * (all prompt positions); "
              "+gen also on generated tokens, gen only there (see `sparsetrace steer`).")
@click.option("--scale", "scales", multiple=True, metavar="L:POS:F=X", help="Clamp the feature at X × its clean activation.")
@click.option("--ablate", "ablates", multiple=True, metavar="L:POS:F", help="Clamp the feature at 0.")
@click.option("--add", "adds", multiple=True, metavar="L:POS:F=α",
              help="Add α · the feature's decoder row to the MLP output (steering).")
@click.option("--scale-error", "scale_errors", multiple=True, metavar="L:POS=X", help="Scale the error node of layer L by X.")
@click.option("--scale-token", "scale_tokens", multiple=True, metavar="POS=X", help="Scale the token embedding by X.")
@click.option("--mode", type=click.Choice(MODES), default=default_of(InterventionConfig, "mode"), show_default=True,
              help="constrained: frozen attention/norms, MLPs in --layers frozen (direct effects); iterative: frozen "
              "attention, effects through the transcoders; unfrozen: the real model.")
@click.option("--layers", "layer_range", default=None, metavar="A:B", help="constrained mode: the layer range [A, B) (default all).")
@click.option("--target-id", "target_ids", multiple=True, type=int, help="Report this token's logit (repeatable; default: the clean top 5).")
@click.option("--generate", "n_generate", type=click.IntRange(0), default=default_of(InterventionConfig, "n_generate"),
              show_default=True,
              help="Also generate this many tokens greedily with the interventions held on (real model; "
              "+gen positions also act on the generated tokens). For sampling and sweeps: `sparsetrace steer`.")
@model_options(dtypes=EXACT_DTYPES)
@output_options
def intervene(prompt, token_ids, transcoders, sets, scales, ablates, adds, scale_errors, scale_tokens, mode,
              layer_range, target_ids, n_generate, model, device, dtype, seed, as_json, quiet):
    """Intervene on features, error nodes or token embeddings and report how the output moves (causal)."""
    import torch

    from sparsetrace.tracer.interventions import generate, intervene as run

    out = Output(as_json, quiet)
    if (prompt is None) == (token_ids is None):
        raise ConfigError("give exactly one of PROMPT or --token-ids")
    if prompt is not None and not prompt.strip():
        raise ConfigError("PROMPT is empty; give some text")
    inputs = parse_token_ids(token_ids) if token_ids is not None else prompt
    torch.manual_seed(seed)
    lm, ts, source = load_lm_and_transcoders(transcoders, model, device, dtype, seed, out)
    n_prompt = len(inputs) if token_ids is not None else int(lm.tokenize(inputs).numel())
    options = {"--set": sets, "--scale": scales, "--ablate": ablates, "--add": adds,
               "--scale-error": scale_errors, "--scale-token": scale_tokens}
    ivs, gen_ivs, specs = build_interventions(options, n_prompt, ts)
    res = run(inputs, lm, ts, ivs, mode=mode, layers=_range(layer_range), target_tokens=list(target_ids) or None)
    toks = list(res.target_tokens)
    names = lm.token_strings(toks)
    data = {
        "mode": res.mode,
        "layers": res.layers,
        "transcoders": source["description"],
        "interventions": [{"kind": sp.kind, "layer": sp.layer, "feature": sp.feature, "op": sp.op, "value": sp.value,
                           "position": sp.positions.first if sp.positions.kind == "one" else sp.positions.text,
                           "generated": sp.positions.generated} for sp in specs],
        "targets": [
            {"token": n, "id": t, "clean": float(c), "intervened": float(v), "delta": float(v - c),
             "clean_probability": float(res.clean_probabilities[t]), "probability": float(res.probabilities[t])}
            for n, t, c, v in zip(names, toks, res.clean_target_values, res.target_values)
        ],
        "top_after": [{"token": lm.token_strings([int(i)])[0], "probability": float(p)}
                      for p, i in zip(*res.probabilities.topk(5))],
        "evidence": "causal (intervention)",
    }
    if n_generate:
        clean_gen = generate(inputs, lm, ts, [], max_new_tokens=n_generate)
        steered = generate(inputs, lm, ts, ivs, generated=gen_ivs, max_new_tokens=n_generate)
        data["generation"] = {"clean": clean_gen.text, "intervened": steered.text,
                              "clean_ids": list(clean_gen.new_ids), "intervened_ids": list(steered.new_ids)}
    out.result(data, lambda: _text(data))


def _text(d: dict) -> str:
    lines = [f"mode {d['mode']}" + (f" over layers [{d['layers'][0]}, {d['layers'][1]})" if d["layers"] else "")]
    lines.append("target (demeaned logit): clean → intervened (Δ), probability clean → intervened")
    for t in d["targets"]:
        lines.append(f"  {t['token']!r:>14}: {t['clean']:+.3f} → {t['intervened']:+.3f} ({t['delta']:+.3f}), "
                     f"p {t['clean_probability']:.3f} → {t['probability']:.3f}")
    lines.append("top after: " + ", ".join(f"{x['token']!r} {x['probability']:.3f}" for x in d["top_after"]))
    if "generation" in d:
        lines.append(f"generated, clean:      {d['generation']['clean']!r}")
        lines.append(f"generated, intervened: {d['generation']['intervened']!r}")
    return "\n".join(lines)


# ---- validate / verify ------------------------------------------------------------------------------
def _graph_and_parts(graph_path: Path, model, transcoders, device, dtype, seed, out):
    """The graph, the model and the transcoders it was traced with (from its metadata unless given)."""
    from sparsetrace.graphs import AttributionGraph
    from sparsetrace.graphs.records import TranscoderSource, transcoder_source_of

    path = graph_path / "graph.safetensors" if graph_path.is_dir() else graph_path
    graph = AttributionGraph.load(path)
    src = transcoder_source_of(graph) or TranscoderSource(None)
    if model is None:
        model = src.model_arg
    if transcoders is None:
        transcoders = src.set_spec
        if transcoders is None:
            raise ConfigError("the graph does not record its transcoder set; pass --transcoders")
        if src.random and src.seed is not None:
            seed = src.seed
    lm, ts, _ = load_lm_and_transcoders(transcoders, model, device, dtype, seed, out)
    return graph, path, lm, ts


@click.command()
@click.argument("graph_path", metavar="GRAPH", type=click.Path(exists=True, path_type=Path))
@transcoder_option()
@click.option("--ablate", "ablates", multiple=True, metavar="NODES", help="Hypothesis: ablating these nodes (F3.12@5,E2@4; + groups) moves the target.")
@click.option("--scale", "scales", multiple=True, metavar="NODES=X", help="Hypothesis: scaling these nodes by X.")
@click.option("--steer", "steers", multiple=True, metavar="NODES=V", help="Hypothesis: setting these features to activation V.")
@click.option("--target", type=click.IntRange(0), default=default_of(ValidationConfig, "target"), show_default=True, help="Primary target: logit index (0 = top logit).")
@click.option("--auto", type=click.IntRange(1), default=default_of(ValidationConfig, "auto"), show_default=True,
              help="Without hypotheses: ablate each of this many most influential features.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(MODES), help="Modes to measure in (default: all).")
@click.option("--noise-floor", type=click.FloatRange(0), default=None, help="Effects below this count as none (default: ValidationConfig).")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write validation.png beside the graph.")
@click.option("--record/--no-record", default=True, show_default=True,
              help="Record the outcome in the graph files and card.md (causal claims).")
@model_options(dtypes=EXACT_DTYPES)
@output_options
def validate(graph_path, transcoders, ablates, scales, steers, target, auto, modes, noise_floor, plot, record, model,
             device, dtype, seed, as_json, quiet):
    """Test hypotheses read off GRAPH by intervening on the real model: predicted vs measured effects.

    GRAPH is a graph file or a trace folder (its full graph); the model and transcoders default to the
    ones the graph was traced with. Results go to validation.json (and .png) and into the card.
    """
    import dataclasses

    from sparsetrace.graphs.folder import record_validation
    from sparsetrace.tracer.validate import ValidationConfig, build_hypotheses, validate as run

    out = Output(as_json, quiet)
    graph, path, lm, ts = _graph_and_parts(graph_path, model, transcoders, device, dtype, seed, out)
    cfg = ValidationConfig()
    changes = {}
    if modes:
        changes["modes"] = tuple(modes)
    if noise_floor is not None:
        changes["noise_floor"] = noise_floor
    cfg = dataclasses.replace(cfg, **changes)
    hyps = build_hypotheses(graph, ablates, scales, steers, target, auto)
    out.say(f"validating {len(hyps)} hypothes{'is' if len(hyps) == 1 else 'es'} in {', '.join(cfg.modes)}")
    report = run(graph, lm, ts, hyps, cfg)
    records = report.records()
    written = []
    if record:
        extra = {"validation.json": lambda p: p.write_text(report.to_json(), encoding="utf-8")}
        if plot:
            extra["validation.png"] = lambda p: report.save_plot(p)
        written = record_validation(path, records, extra)
    data = {"graph": str(path), "results": [r.to_dict() for r in records], "files": written, "report": report.to_dict()}
    out.result(data, lambda: report.summary() + (f"\nrecorded in {path.parent}/: {', '.join(written)}" if written else ""))


@click.command()
@click.argument("graph_path", metavar="GRAPH", type=click.Path(exists=True, path_type=Path))
@transcoder_option()
@click.option("--n-samples", type=click.IntRange(1), default=default_of(VerifyConfig, "n_samples"), show_default=True, help="Edges to re-check.")
@click.option("--atol", type=click.FloatRange(0), default=None, help="Absolute tolerance (default by the graph's dtype).")
@click.option("--rtol", type=click.FloatRange(0), default=None, help="Relative tolerance (default by the graph's dtype).")
@click.option("--record/--no-record", default=True, show_default=True, help="Record the outcome in the graph files and card.md.")
@model_options(dtypes=EXACT_DTYPES)
@output_options
def verify(graph_path, transcoders, n_samples, atol, rtol, record, model, device, dtype, seed, as_json, quiet):
    """Re-check a sample of GRAPH's edges on the real model: doubling a source under all-layer
    constrained patching must move the target by exactly the edge weight. Exit 1 on a mismatch."""
    from sparsetrace.graphs.folder import record_validation
    from sparsetrace.tracer.validate import verify_graph

    out = Output(as_json, quiet)
    graph, path, lm, ts = _graph_and_parts(graph_path, model, transcoders, device, dtype, seed, out)
    rep = verify_graph(graph, lm, ts, n_samples=n_samples, seed=seed, atol=atol, rtol=rtol)
    written = []
    if record:
        written = record_validation(path, [rep.record()], {})
    data = {**rep.to_dict(), "files": written}
    out.result(data, rep.summary)
    if not rep.passed:
        raise click.exceptions.Exit(1)
