"""Prompt-set commands (docs/design.md §15): ``prompts`` (a set from a template), ``trace-many`` (trace a
set on local workers or a Dask cluster), ``recur`` (what recurs across a traced set) and
``validate-set`` (a hypothesis file tested on every prompt)."""

from __future__ import annotations

from pathlib import Path

import click

from sparsetrace.config import PromptSetConfig

from ._common import Output, check_writable_parent, default_of, output_options

PS = PromptSetConfig


@click.command()
@click.argument("template", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The prompt set to write (JSONL).")
@click.option("--limit", type=click.IntRange(1), default=default_of(PS, "limit"), show_default="all",
              help="At most this many prompts, drawn at random with --seed (overrides the file's 'limit').")
@click.option("--seed", type=int, default=None, help="Seed of the draw under --limit (default: the file's, else "
              f"{default_of(PS, 'seed')}).")
@output_options
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
