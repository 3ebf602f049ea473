"""Feature inspection: what makes a transcoder feature fire, and what it writes.

For feature f of layer l (encoder row e_f, decoder row d_f):
- top-activating contexts from a corpus sample (the tokens around the maximum, with per-token
  activations so the active ones can be highlighted);
- its activation histogram (log-spaced bins) and density (share of tokens where it fires);
- top output tokens: the logit lens of its decoder row, ``W_U · d_f``;
- top input tokens: ``E · e_f`` (which token embeddings point along its encoder row);
- an automatic short label built from these.

Statistics for ALL layers come from ONE streamed pass over a corpus sample (one model forward per
batch fills every layer's MLP input). The pass is resumable: its cache folder holds
``feature_stats.safetensors`` (arrays) and ``feature_stats.json`` (settings, identity of the model and
transcoders, and the data position), the JSON written last so that a cache with a JSON is complete.
Position 0 (the attention sink, DESIGN.md §3) is skipped, as in attribution and training.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sparsetrace.errors import ConfigError, FormatError
from sparsetrace.transcoders import TranscoderSet
from sparsetrace._atomic import atomic_write

from .models import LoadedModel, collect_mlp_io

__all__ = [
    "FeatureStatsConfig",
    "FeatureStats",
    "FeatureContext",
    "FeatureReport",
    "TokenSample",
    "open_sample",
    "compute_feature_stats",
    "load_feature_stats",
    "inspect_feature",
    "feature_labels",
]

Progress = Callable[[str, int, int], None]
STATS_FILE = "feature_stats.safetensors"
META_FILE = "feature_stats.json"
STATS_FORMAT = "sparsetrace-feature-stats-1"


@dataclass(frozen=True)
class FeatureStatsConfig:
    """How the statistics pass samples the corpus; the only place these defaults live."""

    n_sequences: int = 256
    """Sequences of the sample (the pass stops earlier when the corpus ends)."""
    ctx_len: int = 64
    """Tokens per sequence (BOS included when the model wants one)."""
    batch: int = 8
    """Sequences per model forward."""
    top_k: int = 10
    """Top-activating contexts kept per feature."""
    n_bins: int = 24
    """Histogram bins, log-spaced over [hist_min, hist_max] (values outside land in the end bins)."""
    hist_min: float = 1e-3
    hist_max: float = 1e3
    layers: tuple[int, ...] | None = None
    """Layers to collect; None = all (one forward serves them all)."""
    save_every: int = 8
    """Write the cache every this many batches (and at the end)."""

    def __post_init__(self) -> None:
        for name in ("n_sequences", "batch", "top_k", "n_bins", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}; allowed: a positive integer")
        if self.ctx_len < 2:
            raise ConfigError(f"ctx_len={self.ctx_len}; allowed: ≥ 2")
        if not 0 < self.hist_min < self.hist_max:
            raise ConfigError(f"hist_min={self.hist_min}, hist_max={self.hist_max}; need 0 < hist_min < hist_max")
        if self.layers is not None and (len(self.layers) == 0 or min(self.layers) < 0):
            raise ConfigError(f"layers={self.layers}; allowed: non-negative layer ids, or None for all")

    @property
    def hist_edges(self) -> np.ndarray:
        """float64 [n_bins + 1] bin edges."""
        return np.logspace(np.log10(self.hist_min), np.log10(self.hist_max), self.n_bins + 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


# ---- the corpus sample ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TokenSample:
    """Deterministic token sequences from a built corpus or from text files; sequence i is always the same."""

    description: str
    path: str
    """The corpus path it was opened from (stored with statistics, so contexts can be re-read)."""
    split: str
    ids: Callable[[int, int], np.ndarray]
    """``ids(start, count)`` → int64 [n, ctx_len] (n < count at the end of the data)."""
    n_available: int
    """Sequences the source holds."""


def open_sample(path: str | os.PathLike, lm: LoadedModel, ctx_len: int, split: str = "train") -> TokenSample:
    """A sample from a corpus built by ``sparsetrace corpus`` (a folder with manifest.json), or from a
    text file / a folder of ``.txt``/``.md`` files (tokenised here, documents joined by EOS)."""
    p = Path(path)
    bos = lm.tokenizer.bos_token_id if (lm.tokenizer is not None and lm.prepend_bos) else None
    if p.is_dir() and (p / "manifest.json").is_file():
        from sparsetrace.transcoders.data import open_corpus

        corpus = open_corpus(p)
        n = corpus.n_sequences(split, ctx_len, bos)
        return TokenSample(f"corpus {p} ({split} split)", str(p.resolve()), split, lambda s, c: corpus.sequences(split, s, c, ctx_len, bos), n)
    if not p.exists():
        raise ConfigError(f"corpus {str(p)!r} does not exist; give a built corpus folder, a text file or a folder of .txt files")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md")) if p.is_dir() else [p]
    if not files:
        raise ConfigError(f"corpus folder {str(p)!r} has no manifest.json and no .txt/.md files")
    if lm.tokenizer is None:
        raise ConfigError(f"corpus {str(p)!r} is text but the model has no tokenizer; give a built corpus folder")
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    pieces: list[int] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise FormatError(f"cannot read corpus file {str(f)!r}: {exc}") from None
        if text.strip():
            pieces += lm.tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    flat = np.asarray(pieces, dtype=np.int64)
    width = ctx_len - (bos is not None)
    n = len(flat) // width
    if n == 0:
        raise ConfigError(f"corpus {str(p)!r} has {len(flat)} tokens: fewer than one sequence of ctx_len={ctx_len}")

    def ids(start: int, count: int) -> np.ndarray:
        stop = min(start + count, n)
        body = flat[start * width : max(start, stop) * width].reshape(-1, width)
        if bos is None:
            return body
        return np.concatenate([np.full((len(body), 1), bos, dtype=np.int64), body], axis=1)

    return TokenSample(f"text {p} ({len(files)} file(s), {len(flat):,} tokens)", str(p.resolve()), split, ids, n)


# ---- the statistics pass --------------------------------------------------------------------------
@dataclass(eq=False)
class FeatureStats:
    """Per-feature statistics of the selected layers over ``n_tokens`` sampled tokens (position 0 excluded).

    Arrays are indexed [i, f] with i the position of the layer in ``layers``:
    ``fire_count``, ``act_sum``, ``act_max`` [Ls, F]; ``hist`` [Ls, F, n_bins]; ``top_val``, ``top_seq``,
    ``top_pos``, ``top_tok`` [Ls, F, top_k] (descending activation; value 0 = empty slot)."""

    config: FeatureStatsConfig
    layers: list[int]
    n_tokens: int
    position: int
    """Sequences of the sample consumed so far (the resume point)."""
    fire_count: np.ndarray
    act_sum: np.ndarray
    act_max: np.ndarray
    hist: np.ndarray
    top_val: np.ndarray
    top_seq: np.ndarray
    top_pos: np.ndarray
    top_tok: np.ndarray
    identity: dict = field(default_factory=dict)
    sample: str = ""
    sample_path: str = ""
    sample_split: str = "train"

    def row(self, layer: int) -> int:
        if layer not in self.layers:
            raise ConfigError(f"layer={layer}: the statistics hold layers {self.layers}")
        return self.layers.index(layer)

    def density(self, layer: int, feature: int) -> float:
        return float(self.fire_count[self.row(layer), feature]) / max(self.n_tokens, 1)


def _identity(lm: LoadedModel, ts: TranscoderSet) -> dict:
    """What the statistics belong to: model id and a fingerprint of every layer's weights (a cache made
    with other transcoders must not be resumed or used for labels)."""
    h = hashlib.sha256(json.dumps(ts.config.to_dict(), sort_keys=True, default=str).encode())
    for tc in ts:
        for t in (tc.W_enc, tc.b_enc, tc.W_dec):
            h.update(t.detach()[:4].float().cpu().numpy().tobytes())
    return {"model_id": lm.model_id, "transcoders": h.hexdigest()[:16]}


def _empty(cfg: FeatureStatsConfig, layers: list[int], F: int) -> FeatureStats:
    Ls, K = len(layers), cfg.top_k
    return FeatureStats(
        config=cfg, layers=layers, n_tokens=0, position=0,
        fire_count=np.zeros((Ls, F), np.int64), act_sum=np.zeros((Ls, F), np.float64),
        act_max=np.zeros((Ls, F), np.float32), hist=np.zeros((Ls, F, cfg.n_bins), np.int64),
        top_val=np.zeros((Ls, F, K), np.float32), top_seq=np.full((Ls, F, K), -1, np.int64),
        top_pos=np.full((Ls, F, K), -1, np.int64), top_tok=np.full((Ls, F, K), -1, np.int64),
    )


_ARRAYS = ("fire_count", "act_sum", "act_max", "hist", "top_val", "top_seq", "top_pos", "top_tok")


def _save(stats: FeatureStats, folder: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(getattr(stats, k)) for k in _ARRAYS}
    atomic_write(folder / STATS_FILE, lambda tmp: save_file(arrays, tmp))
    meta = {
        "format": STATS_FORMAT, "config": stats.config.to_dict(), "layers": stats.layers,
        "n_tokens": stats.n_tokens, "position": stats.position, "identity": stats.identity, "sample": stats.sample,
        "sample_path": stats.sample_path, "sample_split": stats.sample_split,
        "hist_edges": stats.config.hist_edges.tolist(),
    }
    text = json.dumps(meta, indent=1) + "\n"
    atomic_write(folder / META_FILE, lambda tmp: Path(tmp).write_text(text))


def load_feature_stats(folder: str | os.PathLike) -> FeatureStats:
    """Read a statistics cache written by :func:`compute_feature_stats`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise FormatError(f"{str(folder)!r} has no {META_FILE}: not a feature statistics cache")
    try:
        meta = json.loads((folder / META_FILE).read_text())
        arrays = load_file(str(folder / STATS_FILE))
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"feature statistics in {str(folder)!r} are unreadable (truncated or corrupt?): {exc}") from None
    if meta.get("format") != STATS_FORMAT or any(k not in arrays for k in _ARRAYS):
        raise FormatError(f"{str(folder)!r}: not a {STATS_FORMAT} cache")
    c = dict(meta["config"])
    c["layers"] = tuple(c["layers"]) if c.get("layers") is not None else None
    return FeatureStats(
        config=FeatureStatsConfig(**c), layers=list(meta["layers"]), n_tokens=int(meta["n_tokens"]),
        position=int(meta["position"]), identity=meta.get("identity", {}), sample=meta.get("sample", ""),
        sample_path=meta.get("sample_path", ""), sample_split=meta.get("sample_split", "train"),
        **{k: arrays[k] for k in _ARRAYS},
    )


@torch.no_grad()
def _accumulate(stats: FeatureStats, lm: LoadedModel, ts: TranscoderSet, ids: Tensor, start: int) -> None:
    """Fold one batch of sequences ``ids`` [B, T] (sample indices start..start+B) into ``stats``."""
    cfg = stats.config
    x, _ = collect_mlp_io(lm, ids, stats.layers)  # [Ls, B, T, d]
    B, T = ids.shape
    edges = torch.as_tensor(np.log10(cfg.hist_edges[1:-1]), dtype=torch.float32)
    K = cfg.top_k
    for i, layer in enumerate(stats.layers):
        tc = ts[layer]
        act = tc.encode(x[i].to(tc.W_enc.dtype)).float()  # [B, T, F]
        act[:, 0] = 0  # position 0 is the attention sink: not a feature context
        F = act.shape[-1]
        flat = act[:, 1:].reshape(-1, F)  # [B·(T−1), F]
        fired = flat > 0
        stats.fire_count[i] += fired.sum(0).cpu().numpy()
        stats.act_sum[i] += flat.sum(0).double().cpu().numpy()
        stats.act_max[i] = np.maximum(stats.act_max[i], flat.max(0).values.cpu().numpy())
        tok_idx, feat_idx = torch.nonzero(fired, as_tuple=True)
        if len(feat_idx):
            bins = torch.bucketize(torch.log10(flat[tok_idx, feat_idx]), edges)
            counts = torch.bincount(feat_idx * cfg.n_bins + bins, minlength=F * cfg.n_bins)
            stats.hist[i] += counts.reshape(F, cfg.n_bins).cpu().numpy()
        # top-K over this batch, merged with the kept top-K (earlier data wins ties: stable order)
        k = min(K, flat.shape[0])
        val, idx = flat.topk(k, dim=0)  # [k, F]
        b, t = idx // (T - 1), idx % (T - 1) + 1
        new_val = val.T.cpu().numpy()
        new_seq = (b.T + start).cpu().numpy()
        new_pos = t.T.cpu().numpy()
        new_tok = ids[b, t].T.cpu().numpy()
        all_val = np.concatenate([stats.top_val[i], new_val], axis=1)
        order = np.argsort(-all_val, axis=1, kind="stable")[:, :K]
        take = lambda a, n: np.take_along_axis(np.concatenate([a, n], axis=1), order, axis=1)  # noqa: E731
        stats.top_seq[i] = take(stats.top_seq[i], new_seq)
        stats.top_pos[i] = take(stats.top_pos[i], new_pos)
        stats.top_tok[i] = take(stats.top_tok[i], new_tok)
        stats.top_val[i] = np.take_along_axis(all_val, order, axis=1)
    stats.n_tokens += B * (T - 1)


def compute_feature_stats(
    lm: LoadedModel,
    transcoders: TranscoderSet,
    sample: TokenSample,
    config: FeatureStatsConfig | None = None,
    cache: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> FeatureStats:
    """One streamed pass over ``config.n_sequences`` sequences of ``sample`` for every selected layer.

    With ``cache`` (a folder), a previous pass with the same settings, model and transcoders is resumed
    from its data position, and the cache is rewritten every ``save_every`` batches and at the end."""
    cfg = config or FeatureStatsConfig()
    layers = list(cfg.layers) if cfg.layers is not None else list(range(transcoders.n_layers))
    bad = [l for l in layers if l >= transcoders.n_layers]
    if bad:
        raise ConfigError(f"layers={bad}; allowed: 0..{transcoders.n_layers - 1}")
    ident = _identity(lm, transcoders)
    folder = Path(cache) if cache is not None else None
    stats = None
    if folder is not None and (folder / META_FILE).is_file():
        old = load_feature_stats(folder)
        # a longer pass over the same sample continues the old one; anything else starts afresh
        same = replace(old.config, n_sequences=cfg.n_sequences) == cfg and old.position <= cfg.n_sequences
        if old.identity == ident and same and old.sample_path == sample.path and old.sample_split == sample.split:
            stats = old
            stats.config = cfg
    if stats is None:
        stats = _empty(cfg, layers, transcoders.n_features)
        stats.identity, stats.sample = ident, sample.description
        stats.sample_path, stats.sample_split = sample.path, sample.split
    say = progress or (lambda stage, done, total: None)
    total = min(cfg.n_sequences, sample.n_available)
    n_batches = 0
    say("feature stats", stats.position, total)
    while stats.position < total:
        count = min(cfg.batch, total - stats.position)
        ids = torch.as_tensor(sample.ids(stats.position, count), dtype=torch.long)
        if len(ids) == 0:
            break
        _accumulate(stats, lm, transcoders, ids.to(lm.device), stats.position)
        stats.position += len(ids)
        n_batches += 1
        say("feature stats", stats.position, total)
        if folder is not None and n_batches % cfg.save_every == 0:
            _save(stats, folder)
    if folder is not None:
        _save(stats, folder)
    return stats


# ---- one feature --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureContext:
    """One top-activating context: tokens around the maximum and every token's activation."""

    sequence: int
    """Index of the sequence in the sample."""
    position: int
    """Position of the maximum in that sequence."""
    activation: float
    tokens: list[str]
    activations: list[float]
    """One per token of ``tokens``."""
    focus: int
    """Index of the maximum within ``tokens``."""


@dataclass(frozen=True)
class FeatureReport:
    """Everything :func:`inspect_feature` found about one feature."""

    layer: int
    feature: int
    label: str
    top_output_tokens: list[tuple[str, float]]
    """(token, W_U·d_f) for the largest entries of the decoder row's logit lens."""
    top_input_tokens: list[tuple[str, float]]
    """(token, E·e_f) for the embeddings most aligned with the encoder row."""
    density: float | None = None
    """Share of sampled tokens where it fires; None without statistics."""
    n_tokens: int = 0
    mean_activation: float | None = None
    """Mean over the tokens where it fires."""
    max_activation: float | None = None
    histogram_edges: list[float] = field(default_factory=list)
    histogram_counts: list[int] = field(default_factory=list)
    contexts: list[FeatureContext] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_feature(ts: TranscoderSet, layer: int, feature: int) -> None:
    if not 0 <= layer < ts.n_layers:
        raise ConfigError(f"layer={layer}; allowed: 0..{ts.n_layers - 1}")
    if not 0 <= feature < ts.n_features:
        raise ConfigError(f"feature={feature}; allowed: 0..{ts.n_features - 1} (the set has {ts.n_features} per layer)")


@torch.no_grad()
def _lens(lm: LoadedModel, ts: TranscoderSet, keys: Sequence[tuple[int, int]], n: int) -> tuple[list, list]:
    """Top-n (token id, score) of W_U·d_f and of E·e_f for each (layer, feature)."""
    W_U = lm.adapter.unembedding(lm.model).float()  # [V, d]
    E = lm.adapter.embedding(lm.model).weight.float()  # [V, d]
    outs, ins = [], []
    for layer, f in keys:
        tc = ts[layer]
        o = W_U @ tc.W_dec[f].float().to(W_U.device)  # [V]
        i = E @ tc.W_enc[f].float().to(E.device)
        ov, oi = o.topk(min(n, len(o)))
        iv, ii = i.topk(min(n, len(i)))
        outs.append(list(zip(oi.tolist(), ov.tolist())))
        ins.append(list(zip(ii.tolist(), iv.tolist())))
    return outs, ins


def _show(tok: str) -> str:
    return repr(tok)[1:-1] if tok.strip() else repr(tok)


def _make_label(out_tokens: Sequence[str], active_tokens: Sequence[str]) -> str:
    """Short label: the commonest tokens where it fires most → its top logit-lens tokens."""
    outs = "/".join(_show(t).strip() or _show(t) for t in out_tokens[:2])
    if active_tokens:
        common = [t for t, _ in Counter(active_tokens).most_common(2)]
        ins = "/".join(_show(t).strip() or _show(t) for t in common)
        text = f"{ins} → {outs}"
    else:
        text = f"→ {outs}"
    return text if len(text) <= 40 else text[:39] + "…"


def feature_labels(
    lm: LoadedModel, transcoders: TranscoderSet, keys: Sequence[tuple[int, int]], stats: FeatureStats | None = None
) -> dict[tuple[int, int], str]:
    """Automatic labels ``{(layer, feature): text}`` (for graph nodes, pictures, the viewer and the
    frontend JSON's ``clerp``). Uses the statistics' top contexts when given and made with these
    transcoders, the logit lens alone otherwise."""
    keys = sorted(set((int(l), int(f)) for l, f in keys))
    if stats is not None and stats.identity.get("transcoders") != _identity(lm, transcoders)["transcoders"]:
        raise ConfigError("the feature statistics were computed for another transcoder set; recompute them")
    outs, _ = _lens(lm, transcoders, keys, 2)
    labels = {}
    for (layer, f), out in zip(keys, outs):
        active: list[str] = []
        if stats is not None and layer in stats.layers:
            r = stats.row(layer)
            toks = [int(t) for t, v in zip(stats.top_tok[r, f], stats.top_val[r, f]) if v > 0]
            active = lm.token_strings(toks) if toks else []
        labels[(layer, f)] = _make_label(lm.token_strings([t for t, _ in out]), active)
    return labels


@torch.no_grad()
def _contexts(
    lm: LoadedModel, ts: TranscoderSet, stats: FeatureStats, sample: TokenSample, layer: int, feature: int, window: int
) -> list[FeatureContext]:
    r = stats.row(layer)
    slots = [(int(s), int(p), float(v)) for s, p, v in zip(stats.top_seq[r, feature], stats.top_pos[r, feature], stats.top_val[r, feature]) if v > 0]
    if not slots:
        return []
    seqs = sorted({s for s, _, _ in slots})
    rows = [sample.ids(s, 1) for s in seqs]
    if any(len(x) == 0 for x in rows):
        raise ConfigError("the corpus sample is shorter than when the statistics were computed; use the same corpus")
    ids = torch.as_tensor(np.concatenate(rows), dtype=torch.long).to(lm.device)
    x, _ = collect_mlp_io(lm, ids, [layer])
    act = ts[layer].encode(x[0].to(ts[layer].W_enc.dtype))[..., feature].float().cpu()  # [n_seq, T]
    act[:, 0] = 0
    out = []
    for s, p, v in slots:
        row = seqs.index(s)
        lo, hi = max(0, p - window), min(ids.shape[1], p + window + 1)
        out.append(
            FeatureContext(
                sequence=s, position=p, activation=v,
                tokens=lm.token_strings(ids[row, lo:hi].cpu()), activations=[float(a) for a in act[row, lo:hi]],
                focus=p - lo,
            )
        )
    return out


def inspect_feature(
    lm: LoadedModel,
    transcoders: TranscoderSet,
    layer: int,
    feature: int,
    stats: FeatureStats | None = None,
    sample: TokenSample | None = None,
    *,
    n_tokens: int = 10,
    window: int = 8,
) -> FeatureReport:
    """Inspect one feature (module docstring). Contexts need both ``stats`` and the ``sample`` they were
    computed on; histogram and density need ``stats``; the token lenses need neither."""
    _check_feature(transcoders, layer, feature)
    outs, ins = _lens(lm, transcoders, [(layer, feature)], n_tokens)
    out_tokens = [(s, v) for s, (_, v) in zip(lm.token_strings([t for t, _ in outs[0]]), outs[0])]
    in_tokens = [(s, v) for s, (_, v) in zip(lm.token_strings([t for t, _ in ins[0]]), ins[0])]
    label = feature_labels(lm, transcoders, [(layer, feature)], stats if stats is not None and layer in stats.layers else None)
    extra: dict = {}
    if stats is not None and layer in stats.layers:
        r = stats.row(layer)
        fires = int(stats.fire_count[r, feature])
        extra = dict(
            density=fires / max(stats.n_tokens, 1),
            n_tokens=stats.n_tokens,
            mean_activation=float(stats.act_sum[r, feature] / fires) if fires else 0.0,
            max_activation=float(stats.act_max[r, feature]),
            histogram_edges=stats.config.hist_edges.tolist(),
            histogram_counts=[int(c) for c in stats.hist[r, feature]],
        )
        if sample is not None:
            extra["contexts"] = _contexts(lm, transcoders, stats, sample, layer, feature, window)
    return FeatureReport(
        layer=layer, feature=feature, label=label[(layer, feature)],
        top_output_tokens=out_tokens, top_input_tokens=in_tokens, **extra,
    )
