"""The ``sparsetrace`` command group. Commands live in small modules and are imported on first use."""

from __future__ import annotations

import click

from sparsetrace import __version__

from ._common import LazyGroup

COMMANDS = {
    "trace": "sparsetrace.cli._trace:trace",
    "prune": "sparsetrace.cli._graph:prune",
    "render": "sparsetrace.cli._graph:render",
    "figure": "sparsetrace.cli._graph:figure",
    "export": "sparsetrace.cli._graph:export",
    "card": "sparsetrace.cli._graph:card",
    "intervene": "sparsetrace.cli._interventions:intervene",
    "steer": "sparsetrace.cli._steer:steer",
    "validate": "sparsetrace.cli._interventions:validate",
    "verify": "sparsetrace.cli._interventions:verify",
    "train": "sparsetrace.cli._model:train",
    "evaluate": "sparsetrace.cli._model:evaluate",
    "fetch-model": "sparsetrace.cli._model:fetch_model",
    "corpus": "sparsetrace.cli._model:corpus",
    "features": "sparsetrace.cli._features:features",
    "prompts": "sparsetrace.cli._sets:prompts",
    "trace-many": "sparsetrace.cli._sets:trace_many",
    "recur": "sparsetrace.cli._sets:recur",
    "validate-set": "sparsetrace.cli._sets:validate_set",
    "qk": "sparsetrace.cli._qk:qk",
}


@click.group(
    cls=LazyGroup,
    lazy_subcommands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="sparsetrace")
def main() -> None:
    """Circuit tracing with transcoders: attribution graphs for language models, on a CPU.

    Start with `sparsetrace trace "The capital of France is" --out out/france`.

    \b
    Shell completion, e.g. in ~/.bashrc:
      eval "$(_SPARSETRACE_COMPLETE=bash_source sparsetrace)"
    (zsh: zsh_source, fish: fish_source)
    """
