"""``steer``: steer features (add, clamp, scale, ablate) at prompt and generated positions, generate
beside the unsteered baseline from the same seeds, sweep a value, and record the run
(docs/design.md §16; the spec syntax is the library's, ``sparsetrace.tracer.steering``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import click

from sparsetrace.config import EXACT_DTYPES, MODES, STEERING_METRICS, SteeringConfig
from sparsetrace.errors import ConfigError

from ._common import (
    Output,
    check_writable_parent,
    default_of,
    load_lm_and_transcoders,
    model_options,
    model_revision,
    output_options,
    parse_token_ids,
    staged,
    transcoder_option,
    write_text_atomic,
)

POS_HELP = "POS: P, A..B (inclusive), * (all prompt positions); +gen also on generated tokens, gen only there."


@contextlib.contextmanager
def _usage() -> Iterator[None]:
    """Bad arguments found by the library (ConfigError) are usage errors: one line, exit 2."""
    try:
        yield
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _specs(options: dict[str, tuple[str, ...]], swept: bool) -> list:
    from sparsetrace.tracer.steering import parse_spec

    return [parse_spec(opt, text, swept=swept) for opt, texts in options.items() for text in texts]


def _graph_folder(record_to: Path | None) -> Path | None:
    if record_to is None:
        return None
    if not record_to.is_dir() or not (record_to / "graph.safetensors").is_file():
        raise ConfigError(f"--record-to {str(record_to)!r} is not a graph folder; allowed: a folder with "
                          "graph.safetensors (written by `sparsetrace trace --out`)")
    return record_to


def _record_in_graph(folder: Path, rec: dict, files: dict[str, object]) -> list[str]:
    """Add the run to the graph's (and its pruned sibling's) steering records, refresh card.md and put
    ``files`` (name → writer(tmp path)) beside them: staged, then renamed into place."""
    from sparsetrace.graphs import AttributionGraph
    from sparsetrace.graphs.card import add_steering, card_markdown

    names = [n for n in ("graph.safetensors", "graph.pruned.safetensors") if (folder / n).is_file()]
    with staged(folder) as tmp:
        card = None
        for n in names:
            g = AttributionGraph.load(folder / n)
            card = add_steering(g, rec)
            g.save(tmp / n)
        write_text_atomic(tmp / "card.md", card_markdown(card))
        for name, write in files.items():
            write(tmp / name)
    return names + ["card.md", *files]


@click.command()
@click.argument("prompt", required=False)
@click.option("--token-ids", default=None, metavar="1,2,3", help="Token ids instead of a PROMPT.")
@transcoder_option()
@click.option("--add", "adds", multiple=True, metavar="L:POS:F=α",
              help="Add α · the decoder row of feature F (layer L) to the MLP output at POS. " + POS_HELP)
@click.option("--set", "sets", multiple=True, metavar="L:POS:F=V", help="Clamp the feature at V.")
@click.option("--scale", "scales", multiple=True, metavar="L:POS:F=X",
              help="Clamp the feature at X × its clean activation (generated tokens: × the live one).")
@click.option("--ablate", "ablates", multiple=True, metavar="L:POS:F", help="Clamp the feature at 0.")
@click.option("--scale-error", "scale_errors", multiple=True, metavar="L:POS=X", help="Scale the error node (prompt only).")
@click.option("--scale-token", "scale_tokens", multiple=True, metavar="POS=X", help="Scale the token embedding (prompt only).")
@click.option("--sweep", default=None, metavar="V1,V2,…",
              help="Run once per value, filling in every option given without a value (e.g. --add 5:*+gen:12); "
              "writes a table and a plot.")
@click.option("--metric", type=click.Choice(STEERING_METRICS), default=default_of(SteeringConfig, "metric"),
              show_default=True, help="Measured at the last prompt position: demeaned logit of a token, logit "
              "difference of two, or summed probability.")
@click.option("--metric-tokens", default=None, metavar="TOK[,TOK]",
              help="Tokens of the metric: strings of one token each (' Paris, London') or #ID (default: the clean top token).")
@click.option("--mode", type=click.Choice(MODES), default=default_of(SteeringConfig, "mode"), show_default=True,
              help="Mode of the metric (generation always runs the real model).")
@click.option("--max-new-tokens", "-n", type=int, default=default_of(SteeringConfig, "max_new_tokens"),
              show_default=True, help="Tokens per continuation.")
@click.option("--temperature", type=float, default=default_of(SteeringConfig, "temperature"), show_default=True,
              help="Sampling temperature; 0 decodes greedily.")
@click.option("--top-p", type=float, default=default_of(SteeringConfig, "top_p"), show_default=True,
              help="Nucleus sampling mass, in (0, 1].")
@click.option("--top-k", type=int, default=default_of(SteeringConfig, "top_k"), show_default=True,
              help="Sample among the k most probable tokens (0: all).")
@click.option("--samples", type=int, default=default_of(SteeringConfig, "samples"), show_default=True,
              help="Continuations, from seeds --seed, --seed+1, …; the baseline uses the same seeds.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=default_of(SteeringConfig, "out_dir"),
              show_default=True, help="Folder for the run record (steer-<time>-<hash>.json) and a sweep's plot.")
@click.option("--record-to", type=click.Path(path_type=Path), default=None, metavar="GRAPHDIR",
              help="Also record the run in this graph folder's provenance card (causal evidence).")
@model_options(dtypes=EXACT_DTYPES)
@output_options
def steer(prompt, token_ids, transcoders, adds, sets, scales, ablates, scale_errors, scale_tokens, sweep, metric,
          metric_tokens, mode, max_new_tokens, temperature, top_p, top_k, samples, out_dir, record_to, model, device,
          dtype, seed, as_json, quiet):
    """Steer features and read what the model writes, beside the unsteered baseline.

    \b
    Examples:
      sparsetrace steer "My favourite thing to do on weekends is" --add 20:*+gen:1748=40
      sparsetrace steer "My favourite thing to do on weekends is" --add 20:*+gen:1748 --sweep 0,20,40,60 --metric-tokens " coffee"
      sparsetrace steer "The capital of France is" --add 21:-1:1874=-80 --temperature 0.8 --samples 3 --record-to france

    Every run writes a record (what was steered, model, set, seeds, outputs) to --out.
    """
    import torch

    from sparsetrace.tracer.steering import Decoding, parse_values, record, record_name, save_record, save_sweep_plot
    from sparsetrace.tracer.steering import steer as run

    out = Output(as_json, quiet)
    with _usage():
        if (prompt is None) == (token_ids is None):
            raise ConfigError("give exactly one of PROMPT or --token-ids")
        if prompt is not None and not prompt.strip():
            raise ConfigError("PROMPT is empty; give some text")
        values = parse_values(sweep) if sweep is not None else None
        options = {"--add": adds, "--set": sets, "--scale": scales, "--ablate": ablates,
                   "--scale-error": scale_errors, "--scale-token": scale_tokens}
        specs = _specs(options, swept=values is not None)
        if not specs:
            raise ConfigError("no intervention given; use --add, --set, --scale, --ablate, --scale-error or --scale-token")
        dec = Decoding(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       samples=samples, seed=seed)
        graph_dir = _graph_folder(record_to)
        check_writable_parent(out_dir / "x", "--out")
    inputs = parse_token_ids(token_ids) if token_ids is not None else prompt
    torch.manual_seed(seed)
    lm, ts, source = load_lm_and_transcoders(transcoders, model, device, dtype, seed, out)
    out.say("steering" + (f" over {len(values)} values" if values else ""))
    with _usage():
        outputs = run(inputs, lm, ts, specs, decoding=dec, metric_kind=metric, metric_tokens=metric_tokens,
                      sweep=values, mode=mode)
    model_info = {"id": lm.model_id, "arg": model, "revision": model_revision(lm, model), "dtype": dtype}
    set_info = {**source, "n_layers": ts.n_layers, "n_features": ts.n_features,
                "cross_layer": bool(getattr(ts, "cross_layer", False))}
    rec = record(outputs, prompt=prompt, model=model_info, transcoders=set_info)
    name = record_name(rec)
    rec["file"] = f"{name}.json"
    files = {f"{name}.json": lambda p: save_record(p, rec)}
    if values is not None:
        files[f"{name}.png"] = lambda p: save_sweep_plot(p, rec)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [str(write(out_dir / fname)) for fname, write in files.items()]
    if graph_dir is not None:
        written += [str(graph_dir / n) for n in _record_in_graph(graph_dir, rec, files)]
    out.result({**rec, "files": written}, lambda: _text(rec, written))


def _text(rec: dict, written: list[str]) -> str:
    steered = ", ".join(f"{i['option']} {i['spec']}" + ("" if i["value"] is None or i["option"] == "--ablate"
                                                          else f"={i['value']:g}") for i in rec["interventions"])
    dec = rec["decoding"]
    how = "greedy" if dec["greedy"] else (f"sampled (temperature {dec['temperature']:g}, top-p {dec['top_p']:g}"
                                          + (f", top-k {dec['top_k']}" if dec["top_k"] else "") + ")")
    m = rec["metric"]
    sign = "" if m["kind"] == "prob" else "+"  # probabilities are never negative
    lines = [f"steering {steered}", f"prompt {rec['prompt'] if rec['prompt'] is not None else rec['prompt_ids']!r} "
             f"({len(rec['prompt_ids'])} tokens); {dec['max_new_tokens']} new tokens, {how}"]
    if "sweep" in rec:
        lines.append(f"{m['name']} at the last prompt position ({rec['mode']}); unsteered {m['clean']:{sign}.3f}")
        lines.append(f"{'value':>9}  {'metric':>9}  {'top token':>12}  continuation (seed {dec['seeds'][0]})")
        for r in rec["sweep"]["rows"]:
            lines.append(f"{r['value']:>9g}  {r['metric']:>{sign}9.3f}  {r['top_token']!r:>12}  {r['continuation']!r}")
        lines.append(f"{'baseline':>9}  {m['clean']:>{sign}9.3f}  {'':>12}  {rec['samples'][0]['baseline']!r}")
    else:
        lines.append(f"{m['name']} at the last prompt position ({rec['mode']}): {m['clean']:{sign}.3f} → {m['steered']:{sign}.3f}")
        for s in rec["samples"]:
            lines.append(f"seed {s['seed']}")
            lines.append(f"  baseline: {s['baseline']!r}")
            lines.append(f"  steered:  {s['steered']!r}")
    lines.append("wrote " + ", ".join(written))
    return "\n".join(lines)
