"""Training a transcoder set on a model: activation streaming and the driver (docs/design.md §9).

:class:`ModelActivationSource` runs the model on corpus sequences and yields the MLP inputs/outputs of
every trained layer, with position 0 (the attention sink, docs/design.md §3) and outlier tokens (norm above
``outlier_factor`` × the median at any layer) removed. :func:`train_transcoders` wires model, corpus and
:class:`~sparsetrace.transcoders.train.Trainer` together, writes the set in our format and can run
layer-parallel over several processes (``torch.distributed``, gloo): every rank runs the same forwards
and trains its share of the layers (round-robin), so the result equals a single-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from sparsetrace._memory import keep_freed_memory
from sparsetrace.errors import ConfigError, FormatError
from sparsetrace.transcoders.data import Corpus
from sparsetrace.transcoders.io import atomic_write, load_transcoders
from sparsetrace.transcoders.model import Transcoder, TranscoderSet, TranscoderSetConfig
from sparsetrace.transcoders.train import FitResult, TrainConfig, Trainer, fit

from ..models.loading import LoadedModel, collect_mlp_io

__all__ = ["ModelActivationSource", "train_transcoders", "checkpoint_transcoders", "outlier_mask", "LOG_FILE"]

LOG_FILE = "train_log.jsonl"


def outlier_mask(x: Tensor, y: Tensor, factor: float) -> Tensor:
    """[N] bool, True = keep: a token whose x̃ or y norm exceeds ``factor`` × that layer's median norm at
    ANY layer is dropped for all layers (x, y: [L, N, d]), so every layer sees the same tokens."""
    return _keep_by_norm(x.norm(dim=-1), y.norm(dim=-1), factor)


def _keep_by_norm(nx: Tensor, ny: Tensor, factor: float) -> Tensor:
    """:func:`outlier_mask` from the norms ``[L, N]`` of x̃ and y."""
    keep = torch.ones(nx.shape[1], dtype=torch.bool, device=nx.device)
    for n in (nx, ny):
        med = n.median(dim=1, keepdim=True).values
        keep &= (n <= factor * med).all(dim=0)
    return keep


class ModelActivationSource:
    """Streams ``(x̃ [L,n,d], y [L,n,d])`` of the selected layers from consecutive corpus sequences.

    ``position`` counts sequences consumed (resumable with :meth:`seek`). ``collect`` are the layers
    the model is read at (the outlier filter looks at all of them); ``keep`` the subset returned.
    """

    def __init__(
        self,
        lm: LoadedModel,
        corpus: Corpus,
        collect: list[int],
        keep: list[int] | None = None,
        *,
        ctx_len: int,
        model_batch: int,
        outlier_factor: float,
        split: str = "train",
        reuse_buffer: bool = False,
    ) -> None:
        self.lm, self.corpus, self.collect = lm, corpus, list(collect)
        keep = self.collect if keep is None else list(keep)
        missing = [l for l in keep if l not in self.collect]
        if missing:
            raise ConfigError(f"keep layers {missing} are not among the collected layers {self.collect}")
        # the staged layers are in ascending order (collect_mlp_io's)
        self.keep_pos = torch.tensor([sorted(self.collect).index(l) for l in keep])
        self.ctx_len, self.model_batch, self.outlier_factor, self.split = ctx_len, model_batch, outlier_factor, split
        self.bos = lm.tokenizer.bos_token_id if lm.prepend_bos else None
        self.position = 0
        self._stage: tuple[Tensor, Tensor] | None = None
        self.reuse_buffer = reuse_buffer
        self._buf: tuple[Tensor, Tensor] | None = None

    def seek(self, position: int) -> None:
        self.position = int(position)

    def read(self, n_tokens: int) -> tuple[Tensor, Tensor]:
        """Up to ``n_tokens`` tokens' ``(x̃, y)``, float32 ``[L_keep, n, d]``, from whole sequences.

        Each forward's hooks copy the MLP inputs/outputs into one reused float32 staging buffer (no
        per-layer tensors kept alive, so the model's own allocations are recycled), and the kept tokens
        are gathered from it straight into the returned buffer: two copies per activation in all.
        With ``reuse_buffer`` the result is a view of one buffer that the next call overwrites (a shuffle
        buffer of 30 layers is ~9 GB: touching fresh pages each time cost more than the copies)."""
        L, d = len(self.keep_pos), self.lm.d_model
        # Filled in place: collecting chunks and concatenating would hold the buffer twice at its peak.
        if self.reuse_buffer and self._buf is not None and self._buf[0].shape[1] >= n_tokens:
            X, Y = self._buf
        else:
            self._buf = None  # the old buffer is freed before the new one is allocated
            X, Y = torch.empty(L, n_tokens, d), torch.empty(L, n_tokens, d)
            if self.reuse_buffer:
                self._buf = (X, Y)
        n = 0
        while n < n_tokens:
            ids = self.corpus.sequences(self.split, self.position, self.model_batch, self.ctx_len, self.bos)
            if len(ids) == 0:
                break
            self.position += len(ids)
            sx, sy, rows = self._harvest(torch.from_numpy(ids))
            # Tokens past n_tokens are dropped, not carried over: buffers then start at sequence
            # boundaries, which is what makes a checkpoint (taken between buffers) resumable bit for bit.
            rows = rows[: n_tokens - n]
            take = len(rows)
            for j, src in enumerate(self.keep_pos.tolist()):
                torch.index_select(sx[src], 0, rows, out=X[j, n : n + take])
                torch.index_select(sy[src], 0, rows, out=Y[j, n : n + take])
            n += take
        return X[:, :n], Y[:, :n]

    def _harvest(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One forward of ``ids [B, T]`` → staged ``x̃, y [L_all, B·T, d]`` (float32, layers ascending,
        views of a reused buffer) and the flat rows to keep: position 0 (the attention sink, docs/design.md §3) and outlier
        tokens left out, in sequence order."""
        B, T = ids.shape
        L, d = len(self.collect), self.lm.d_model
        if self._stage is None or self._stage[0].shape[1] < B * T:
            self._stage = (torch.empty(L, B * T, d), torch.empty(L, B * T, d))
        sx, sy = (s[:, : B * T] for s in self._stage)
        collect_mlp_io(self.lm, ids, self.collect, out=(sx.view(L, B, T, d), sy.view(L, B, T, d)))
        rows = torch.arange(B * T).view(B, T)[:, 1:].reshape(-1)  # position 0 is never trained on
        nx, ny = (torch.linalg.vector_norm(s, dim=-1).view(L, B, T)[:, :, 1:].reshape(L, -1) for s in (sx, sy))
        keep = _keep_by_norm(nx, ny, self.outlier_factor)
        return sx, sy, rows[keep]


def _dist() -> tuple[int, int, Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def train_transcoders(
    lm: LoadedModel,
    corpus: Corpus,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
) -> TranscoderSet:
    """Train one transcoder per layer (``config.layers``, default all) and save the set to ``out_dir``.

    Checkpoints go to ``out_dir/checkpoint`` every ``config.checkpoint_every_tokens``; ``resume=True``
    continues from the last one exactly. Logs go to ``out_dir/train_log.jsonl``. When
    ``torch.distributed`` is initialised, the layers are split round-robin across ranks; call it on
    every rank with the same arguments. Returns the saved set (as loaded back from ``out_dir``).
    """
    keep_freed_memory()  # large per-step tensors reuse freed heap blocks instead of faulting pages in
    config = config.resolved(lm.device)  # "auto" dtypes → this machine's; the run records the result
    rank, world, dist = _dist()
    layers = list(config.layers) if config.layers is not None else list(range(lm.n_layers))
    bad = [l for l in layers if not 0 <= l < lm.n_layers]
    if bad:
        raise ConfigError(f"layers={config.layers}; allowed: ids in 0..{lm.n_layers - 1}")
    if len(layers) < world:
        raise ConfigError(f"{len(layers)} layers cannot be split over world_size={world} ranks")
    bos = lm.tokenizer.bos_token_id if lm.prepend_bos else None
    available = corpus.n_sequences("train", config.ctx_len, bos) * (config.ctx_len - 1)  # position 0 is never trained on
    if available < config.n_tokens:
        raise ConfigError(
            f"n_tokens={config.n_tokens:,}: the corpus's train split has {available:,} trainable tokens at "
            f"ctx_len={config.ctx_len} (before outliers are dropped); allowed: at most that, or a larger corpus"
        )
    positions = list(range(rank, len(layers), world))
    mine = [layers[i] for i in positions]
    out = Path(out_dir)
    has_checkpoint = (out / "checkpoint" / "latest.json").exists()
    if not resume and has_checkpoint:
        raise ConfigError(f"{str(out)!r} already has a checkpoint; pass resume=True to continue it or use a new folder")
    d = lm.d_model
    trainer = Trainer(config, len(mine), d, layer_ids=mine)
    if config.init_from is not None and not (resume and has_checkpoint):
        trainer.warm_start(_warm_start_transcoders(config.init_from, mine, lm))
    out.mkdir(parents=True, exist_ok=True)  # after every check: a refused run leaves no folder behind
    source = ModelActivationSource(
        lm, corpus, collect=layers, keep=mine,
        ctx_len=config.ctx_len, model_batch=config.model_batch, outlier_factor=config.outlier_factor,
        reuse_buffer=True,
    )
    reduce = None
    if dist is not None:
        def reduce(t: Tensor) -> Tensor:
            t = t.clone()
            dist.all_reduce(t)
            return t

    log_file = out / LOG_FILE
    if resume and rank == 0:
        _truncate_log(log_file, out / "checkpoint" / "latest.json")
    elif rank == 0 and log_file.exists():
        log_file.unlink()  # a fresh run (no checkpoint to resume) starts a fresh log

    def log(rec: dict[str, Any]) -> None:
        with open(log_file, "a") as f:
            f.write(json.dumps(rec) + "\n")

    old_dtype = lm.dtype
    lm.to(dtype=getattr(torch, config.model_dtype))  # the harvesting forward; read() hands float32 on
    try:
        result = fit(trainer, source, out, resume, rank=rank, world_size=world, log=log, reduce=reduce,
                     layer_ids=positions, n_layers_total=len(layers))
    finally:
        lm.to(dtype=old_dtype)
    for pos, tc in zip(positions, result.transcoders):
        _save_layer(tc, out / f"layer_{pos}.safetensors")
    if dist is not None:
        dist.barrier()
    if rank == 0:
        _write_set_config(out, lm, corpus, config, layers, result, trainer.n_features)
    if dist is not None:
        dist.barrier()
    return load_transcoders(out)


def _warm_start_transcoders(folder: str, layers: list[int], lm: LoadedModel) -> list[Transcoder]:
    """The transcoders of ``layers`` from the set in ``folder`` (``TrainConfig.init_from``), in float32."""
    try:
        tset = load_transcoders(folder)
    except (OSError, FormatError, ConfigError, ValueError) as e:
        raise ConfigError(f"init_from={folder!r}: not a readable transcoder set ({e})") from e
    if not isinstance(tset, TranscoderSet):
        raise ConfigError(f"init_from={folder!r} is a cross-layer transcoder; allowed: a per-layer set")
    if tset.config.n_layers != lm.n_layers or tset.config.d_in != lm.d_model:
        raise ConfigError(
            f"init_from={folder!r}: a set of {tset.config.n_layers} layers with d_in={tset.config.d_in}; "
            f"allowed: a set for this model ({lm.n_layers} layers, d_model={lm.d_model})"
        )
    return [tset.transcoders[l] for l in layers]


def checkpoint_transcoders(out_dir: str | os.PathLike, model_id: str = "unknown", architecture: str = "llama") -> TranscoderSet:
    """The transcoders of the latest checkpoint under ``out_dir`` (e.g. to evaluate a run in progress).

    Single-process checkpoints only (a layer-parallel run's layers are spread over rank files)."""
    from sparsetrace.transcoders.io import read_safetensors

    folder = Path(out_dir) / "checkpoint"
    if not (folder / "latest.json").is_file():
        raise ConfigError(f"{str(out_dir)!r} has no checkpoint (no checkpoint/latest.json)")
    sub = folder / json.loads((folder / "latest.json").read_text())["checkpoint"]
    meta = json.loads((sub / "rank0.json").read_text())
    if meta["world_size"] != 1:
        raise ConfigError(f"checkpoint {str(sub)!r} is from {meta['world_size']} ranks; only 1 is supported here")
    cfg = TrainConfig.from_dict(meta["config"])
    t = read_safetensors(sub / "rank0.safetensors")
    t.pop("rng_state")
    L, F, d = t["param.W_enc"].shape
    trainer = Trainer(cfg, L, d, t["param.W_dec"].shape[2])
    trainer.load_state_tensors(t)
    set_cfg = TranscoderSetConfig(
        model_id=model_id, architecture=architecture, n_layers=L, d_in=d, n_features=F, activation=cfg.activation,
        k=cfg.k if cfg.activation == "topk" else None, skip=cfg.skip,
        training={"layers": list(cfg.layers) if cfg.layers else list(range(L)), "tokens": meta["tokens"],
                  "steps": meta["step"], "config": cfg.to_dict(), "checkpoint": str(sub)},
    )
    return TranscoderSet(set_cfg, trainer.to_transcoders())


def _truncate_log(log_file: Path, latest: Path) -> None:
    """Drop log records past the checkpoint being resumed: they will be logged again, identically."""
    if not log_file.is_file() or not latest.is_file():
        return
    step = json.loads(latest.read_text())["step"]
    keep = [line for line in log_file.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    text = "".join(line + "\n" for line in keep)
    atomic_write(log_file, lambda tmp: Path(tmp).write_text(text))


def _save_layer(tc: Transcoder, path: Path) -> None:
    """One layer file with the keys of our format (docs/design.md §8)."""
    t = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
    if tc.W_skip is not None:
        t["W_skip"] = tc.W_skip
    if tc.activation == "jumprelu":
        t["threshold"] = tc.threshold
    t = {k: v.detach().contiguous().cpu() for k, v in t.items()}
    atomic_write(path, lambda tmp: save_file(t, tmp))


def _git_version() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_set_config(out: Path, lm: LoadedModel, corpus: Corpus, config: TrainConfig, layers: list[int],
                      result: FitResult, n_features: int) -> None:
    existing = {}
    if (out / "config.json").is_file():
        existing = json.loads((out / "config.json").read_text()).get("metrics", {})
    cfg = TranscoderSetConfig(
        model_id=lm.model_id,
        architecture=lm.adapter.name,
        n_layers=len(layers),
        d_in=lm.d_model,
        n_features=n_features,
        activation=config.activation,
        k=config.k if config.activation == "topk" else None,
        skip=config.skip,
        training={
            "layers": layers,
            "corpus": str(corpus.path),
            "corpus_recipe": corpus.manifest.get("recipe"),
            "corpus_sources": corpus.manifest.get("sources"),
            "tokens": result.tokens,
            "steps": result.steps,
            "config": config.to_dict(),
            "lr": config.lr_for(n_features),
            "code_version": _git_version(),
        },
        metrics=existing,
    )
    text = json.dumps(cfg.to_dict(), indent=1) + "\n"

    def w(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(out / "config.json", w)
