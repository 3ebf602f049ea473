"""Feature inspection: what makes a transcoder feature fire, and what it writes.

For feature f of layer l (encoder row e_f, decoder row d_f; for a cross-layer transcoder d_f is the sum of
its decoder rows over its target layers, ``write_direction``, docs/design.md §14):
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
Position 0 (the attention sink, docs/design.md §3) is skipped, as in attribution and training.
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

from sparsetrace.config import FeatureStatsConfig, InspectConfig, LabelConfig
from sparsetrace.errors import ConfigError, FormatError
from sparsetrace.transcoders import TranscoderSet
from sparsetrace._atomic import atomic_write

from ..models.loading import LoadedModel, collect_mlp_io

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
    "LabelConfig",
    "FeatureLabel",
    "FeatureLabels",
    "compute_feature_labels",
    "save_feature_labels",
    "load_feature_labels",
    "describe_features",
    "decoder_cosines",
    "word_spans",
]

Progress = Callable[[str, int, int], None]
STATS_FILE = "feature_stats.safetensors"
META_FILE = "feature_stats.json"
STATS_FORMAT = "sparsetrace-feature-stats-1"




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
    for l, tc in enumerate(ts):
        first = torch.arange(min(4, ts.n_features))
        for t in (tc.W_enc, tc.b_enc, ts.write_direction(l, first)):
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
_STORED_INT32 = ("hist", "top_seq", "top_pos", "top_tok")
"""Stored as int32 (half the file, so a set can ship its statistics); held as int64 in memory."""


def _narrow(name: str, a: np.ndarray) -> np.ndarray:
    if name not in _STORED_INT32:
        return np.ascontiguousarray(a)
    if a.size and (a.max() > np.iinfo(np.int32).max or a.min() < np.iinfo(np.int32).min):
        raise FormatError(f"feature statistics: {name} exceeds int32; use a smaller sample")
    return np.ascontiguousarray(a, dtype=np.int32)


def _save(stats: FeatureStats, folder: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: _narrow(k, getattr(stats, k)) for k in _ARRAYS}
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
        **{k: arrays[k].astype(np.int64) if k in _STORED_INT32 else arrays[k] for k in _ARRAYS},
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
    label_score: tuple[float | None, float | None] | None = None
    """(precision, recall) of the label on held-out text, when the statistics have labels."""
    label_contexts: list[str] = field(default_factory=list)
    """The label's stored snippets (``…capital of [France] is…``): what is left of the contexts where the
    statistics' corpus is not on this machine (a shipped set)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _check_feature(ts: TranscoderSet, layer: int, feature: int) -> None:
    if not 0 <= layer < ts.n_layers:
        raise ConfigError(f"layer={layer}; allowed: 0..{ts.n_layers - 1}")
    if not 0 <= feature < ts.n_features:
        raise ConfigError(f"feature={feature}; allowed: 0..{ts.n_features - 1} (the set has {ts.n_features} per layer)")


@torch.no_grad()
def _lens(lm: LoadedModel, ts: TranscoderSet, keys: Sequence[tuple[int, int]], n: int) -> tuple[list, list]:
    """Top-n (token id, score) of W_U·d_f and of E·e_f for each (layer, feature), batched as :func:`_output_lens`."""
    E = lm.adapter.embedding(lm.model).weight  # [V, d]
    return _output_lens(lm, ts, keys, n), _top_products(E, keys, lambda layer, fs: ts[layer].W_enc[fs], n)


@torch.no_grad()
def _output_lens(lm: LoadedModel, ts: TranscoderSet, keys: Sequence[tuple[int, int]], n: int) -> list:
    """Top-n (token id, score) of W_U·d_f for each (layer, feature), d_f the feature's write direction (a
    cross-layer feature: the sum of its decoders over target layers): :func:`_lens`'s output half, batched
    (one [k, d]·[d, V] product per layer and chunk instead of a matrix-vector product per feature; with
    a 262k-token vocabulary each product is the cost of a label, so callers pass only the features they
    show)."""
    W_U = lm.adapter.unembedding(lm.model)  # [V, d]
    return _top_products(W_U, keys, lambda layer, fs: ts.write_direction(layer, torch.as_tensor(fs)), n)


def _top_products(M: Tensor, keys: Sequence[tuple[int, int]], rows_of: Callable, n: int, chunk: int = 256) -> list:
    """Top-n (row of M, score) of M·v for each key's vector v = ``rows_of(layer, [features])`` row, scores
    in float32, one product per layer and chunk of features (large M: :func:`_top_rows`)."""
    Mf = M.float()
    Mb = Mf.bfloat16() if _use_bf16_screen(Mf) else None
    out: dict[tuple[int, int], list] = {}
    by_layer: dict[int, list[int]] = {}
    for layer, f in keys:
        by_layer.setdefault(layer, []).append(f)
    for layer, fs in by_layer.items():
        for k in range(0, len(fs), chunk):
            part = fs[k : k + chunk]
            V = rows_of(layer, part).float().to(M.device)  # [c, d]
            vals, ids = _top_rows(Mf, Mb, V, min(n, M.shape[0]))
            for f, v, i in zip(part, vals.tolist(), ids.tolist()):
                out[(layer, f)] = list(zip(i, v))
    return [out[(int(l), int(f))] for l, f in keys]


_BF16_SCREEN_ROWS = 32768
"""Vocabularies at least this large are screened in bfloat16 before the exact float32 scores (docs/design.md §11)."""


def _use_bf16_screen(M: Tensor) -> bool:
    return M.shape[0] >= _BF16_SCREEN_ROWS and M.device.type == "cpu"


def _top_rows(Mf: Tensor, Mb: Tensor | None, V: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The exact float32 top-n of ``V @ Mf.T`` ([c, n] values and row ids, descending).

    With ``Mb`` (``Mf`` in bfloat16) the full product is screened in bfloat16 — ~4× faster on CPUs with
    bf16 matmul units — keeping m = max(4n, 64) candidates per row, whose float32 scores are then computed
    exactly. The screen is certified: rounding to bfloat16 moves a score v·m by at most
    b = 2.05 · 2⁻⁸ · ‖v‖ · max‖m‖ (accumulation in float32), so a row whose n-th exact candidate score is
    ≥ the m-th screened score + b has no better row outside the candidates. Rows that fail (near-flat
    score distributions) get the plain float32 product."""
    if Mb is None or 4 * n >= Mf.shape[0]:
        return (V @ Mf.T).topk(n, dim=1)
    m = max(4 * n, 64)
    screened = V.bfloat16() @ Mb.T  # [c, V]
    s_vals, cand = screened.topk(m, dim=1)  # [c, m]
    exact = torch.einsum("cd,cmd->cm", V, Mf[cand])  # [c, m]
    vals, pos = exact.topk(n, dim=1)
    ids = cand.gather(1, pos)
    bound = 2.05 * 2.0**-8 * V.norm(dim=1) * Mf.norm(dim=1).max()  # [c]
    bad = vals[:, -1] < s_vals[:, -1].float() + bound
    if bad.any():
        vals[bad], ids[bad] = (V[bad] @ Mf.T).topk(n, dim=1)
    return vals, ids


def _show(tok: str) -> str:
    return repr(tok)[1:-1] if tok.strip() else repr(tok)


def feature_labels(
    lm: LoadedModel,
    transcoders: TranscoderSet,
    keys: Sequence[tuple[int, int]],
    stats: FeatureStats | None = None,
    labels: "FeatureLabels | None" = None,
) -> dict[tuple[int, int], str]:
    """Short labels ``{(layer, feature): text}`` (pictures, the frontend JSON's ``clerp``): the words of
    :func:`describe_features`."""
    return {k: d["short"] for k, d in describe_features(lm, transcoders, keys, stats, labels).items()}


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
    n_tokens: int = InspectConfig.n_tokens,
    window: int = InspectConfig.window,
    labels: "FeatureLabels | None" = None,
) -> FeatureReport:
    """Inspect one feature (module docstring). Contexts need both ``stats`` and the ``sample`` they were
    computed on; histogram and density need ``stats``; the token lenses need neither."""
    _check_feature(transcoders, layer, feature)
    outs, ins = _lens(lm, transcoders, [(layer, feature)], n_tokens)
    out_tokens = [(s, v) for s, (_, v) in zip(lm.token_strings([t for t, _ in outs[0]]), outs[0])]
    in_tokens = [(s, v) for s, (_, v) in zip(lm.token_strings([t for t, _ in ins[0]]), ins[0])]
    label = feature_labels(lm, transcoders, [(layer, feature)], stats if stats is not None and layer in stats.layers else None,
                           labels)
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
    lab = labels.labels.get((layer, feature)) if labels is not None else None
    if lab is not None:
        extra["label_score"] = (lab.precision, lab.recall)
        extra["label_contexts"] = list(lab.contexts)
    return FeatureReport(
        layer=layer, feature=feature, label=label[(layer, feature)],
        top_output_tokens=out_tokens, top_input_tokens=in_tokens, **extra,
    )


# ---- readable labels (issue 19) ---------------------------------------------------------------------
# A label is a hypothesis about where a feature fires: the whole words at its top-activating contexts
# (never a sub-word fragment), one context, and the tokens its decoder row promotes. Each label is
# scored on held-out text it was not made from: precision = P(fires | the token's word is a label word),
# recall = P(the token's word is a label word | fires), over every held-out token but position 0.
LABELS_FILE = "feature_labels.json.gz"
LABELS_FORMAT = "sparsetrace-feature-labels-1"




@dataclass(frozen=True)
class FeatureLabel:
    """One feature's label and its held-out score."""

    words: tuple[str, ...]
    """Whole words where it fires most (display casing), strongest first."""
    contexts: tuple[str, ...]
    """Snippets ``…capital of [France] is…``, the word in brackets, strongest first."""
    precision: float | None
    """P(fires | word is a label word) on held-out tokens; None when no held-out token has the word."""
    recall: float | None
    """P(word is a label word | fires) on held-out tokens; None when it never fired there."""
    n_word: int
    """Held-out tokens whose word is a label word."""
    n_fires: int
    """Held-out tokens where the feature fires."""

    @property
    def short(self) -> str:
        return " / ".join(self.words)


@dataclass(eq=False)
class FeatureLabels:
    """Labels of every feature that fired in the statistics sample, with how they were scored."""

    labels: dict[tuple[int, int], FeatureLabel]
    identity: dict
    """The statistics' identity (model and transcoder fingerprint)."""
    heldout: str
    """What the scores were measured on."""
    heldout_tokens: int
    config: LabelConfig
    vocabulary: frozenset[str] = frozenset()
    """Lower-case whole words seen at least twice in the sample: promoted tokens must be one of them."""


def _starts_word(tok: str, prev: str | None) -> bool:
    """Whether token ``tok`` begins a new word after ``prev`` (byte-level BPE: a leading space or
    punctuation starts one; letters and digits glued to letters and digits continue one)."""
    if prev is None or not tok:
        return prev is None
    if tok[0].isspace() or not tok[0].isalnum():
        return True
    return not prev or not prev[-1].isalnum()


def word_spans(tokens: Sequence[str], spaced: bool = False) -> list[tuple[int, int]]:
    """For each token, the [start, stop) token span of the whole word containing it. ``spaced``: the
    tokenizer puts spaces between tokens when it decodes them (word-level vocabularies), so every token
    is a word of its own."""
    if spaced:
        return [(k, k + 1) for k in range(len(tokens))]
    starts = [k for k, t in enumerate(tokens) if _starts_word(t, tokens[k - 1] if k else None)]
    out: list[tuple[int, int]] = []
    bounds = starts + [len(tokens)]
    j = 0
    for k in range(len(tokens)):
        while j + 1 < len(bounds) - 1 and bounds[j + 1] <= k:
            j += 1
        out.append((bounds[j], bounds[j + 1]))
    return out


def _word_text(tokens: Sequence[str], span: tuple[int, int]) -> str:
    w = "".join(tokens[span[0] : span[1]]).strip()
    if w:
        return w
    raw = "".join(tokens[span[0] : span[1]])
    return "⏎" if "\n" in raw else ("⇥" if "\t" in raw else "␣")


def _snippet(tokens: Sequence[str], span: tuple[int, int], window: int, sep: str = "") -> str:
    """``…left [word] right…`` with newlines shown as ⏎ and the left side cut to ~40 characters (``sep``
    joins tokens: " " for tokenizers that put spaces between them)."""
    a, b = span
    clean = lambda s: " ".join(s.replace("\n", " ⏎ ").replace("\t", " ").split(" ")).replace("  ", " ")  # noqa: E731
    word = sep.join(tokens[a:b])
    lead = word[: len(word) - len(word.lstrip())]
    left = clean(sep.join(tokens[max(0, a - window) : a]) + sep + lead)
    right = clean(sep + sep.join(tokens[b : b + 2]))
    if len(left) > 40:
        left = left[-40:]
    text = f"{left}[{_word_text(tokens, span)}]{right}"
    return "…" + " ".join(text.split()) + "…"


class _TokenText:
    """id → decoded string, decoding each id once; ``spaced`` says whether the tokenizer inserts spaces
    between tokens (then a token is a whole word; byte-level BPE marks word starts in the token itself)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm, self.cache, self.words = lm, {}, {}
        self.spaced = False
        tok = lm.tokenizer
        if tok is not None:
            a, b = (tok(w, add_special_tokens=False)["input_ids"] for w in ("cat", "dog"))
            if len(a) == 1 and len(b) == 1:
                joined, single = tok.decode(a + b), tok.decode(a) + tok.decode(b)
                self.spaced = joined != single and joined.replace(" ", "") == single.replace(" ", "")

    def __call__(self, ids: Sequence[int]) -> list[str]:
        missing = sorted({int(i) for i in ids} - self.cache.keys())
        if missing:
            self.cache.update(zip(missing, self.lm.token_strings(missing)))
        return [self.cache[int(i)] for i in ids]

    def is_word(self, tok: str) -> bool:
        """Whether a token is a whole word, not a piece of one: letters only, and (byte-level BPE) a
        space before them and the same letters without the space a single token too — which holds for
        words common enough to start a line ("Paris", "cold") and not for pieces (" mathemat", " policym")."""
        body = tok.strip()
        if len(body) < 2 or not body.isalpha():
            return False
        if self.spaced:
            return True
        if not tok.startswith(" ") or self.lm.tokenizer is None:
            return False
        hit = self.words.get(body)
        if hit is None:
            hit = self.words[body] = len(self.lm.tokenizer(body, add_special_tokens=False)["input_ids"]) == 1
        return hit


def _choose_words(found: list[tuple[str, float]], cfg: LabelConfig) -> tuple[str, ...]:
    """The strongest words by summed activation (case-insensitive), each in its commonest spelling."""
    weight: dict[str, float] = {}
    spelling: dict[str, Counter] = {}
    for w, v in found:
        k = w.lower()
        weight[k] = weight.get(k, 0.0) + v
        spelling.setdefault(k, Counter())[w] += 1
    ranked = sorted(weight, key=lambda k: (-weight[k], k))
    if not ranked:
        return ()
    keep = [k for k in ranked[: cfg.max_words] if weight[k] >= cfg.word_ratio * weight[ranked[0]]]
    return tuple(spelling[k].most_common(1)[0][0] for k in keep)


def _heldout_sample(stats: FeatureStats, lm: LoadedModel) -> tuple[TokenSample | None, int]:
    """The held-out text of the statistics' corpus and the first sequence to use: a built corpus's
    held-out split from its start, else the sample's sequences after those the statistics consumed."""
    path = Path(stats.sample_path) if stats.sample_path else None
    if path is None or not path.exists():
        return None, 0
    if path.is_dir() and (path / "manifest.json").is_file():
        return open_sample(path, lm, stats.config.ctx_len, "heldout"), 0
    return open_sample(path, lm, stats.config.ctx_len, stats.sample_split), stats.position


@torch.no_grad()
def compute_feature_labels(
    lm: LoadedModel,
    transcoders: TranscoderSet,
    stats: FeatureStats,
    sample: TokenSample,
    config: LabelConfig | None = None,
    progress: Progress | None = None,
) -> FeatureLabels:
    """Labels for every feature that fired in ``stats`` (made from its top contexts in ``sample``, the
    sample the statistics were computed on), scored on held-out text (module comment above)."""
    cfg = config or LabelConfig()
    ident = _identity(lm, transcoders)
    if stats.identity.get("transcoders") != ident["transcoders"]:
        raise ConfigError("the feature statistics were computed for another transcoder set; recompute them")
    text = _TokenText(lm)
    say = progress or (lambda stage, done, total: None)
    # 1. words and contexts from the top slots (token ids re-read from the sample: no forward needed)
    n_seq = stats.position
    seqs: dict[int, list[str]] = {}
    spans: dict[int, list[tuple[int, int]]] = {}
    for start in range(0, n_seq, 256):
        ids = sample.ids(start, min(256, n_seq - start))
        for k, row in enumerate(ids):
            toks = text(row.tolist())
            seqs[start + k] = toks
            spans[start + k] = word_spans(toks, text.spaced)
    counts: Counter = Counter()
    for k, toks in seqs.items():
        counts.update(_word_text(toks, sp).lower() for sp in set(spans[k]))
    vocabulary = frozenset(w for w, c in counts.items() if c >= 2 and w.isalpha())
    made: dict[tuple[int, int], tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for r, layer in enumerate(stats.layers):
        for f in np.flatnonzero(stats.fire_count[r] > 0):
            found, slots = [], []
            for v, s, p in zip(stats.top_val[r, f], stats.top_seq[r, f], stats.top_pos[r, f]):
                if v <= 0 or int(s) not in seqs:
                    continue
                toks, span = seqs[int(s)], spans[int(s)][int(p)]
                found.append((_word_text(toks, span), float(v)))
                slots.append((toks, span))
            words = _choose_words(found, cfg)
            if words:
                # contexts of the label's words first (strongest first), then the others
                lw = {w.lower() for w in words}
                order = sorted(range(len(slots)), key=lambda k: (found[k][0].lower() not in lw, k))
                ctxs = tuple(_snippet(*slots[k], cfg.window, " " if text.spaced else "") for k in order[: cfg.n_contexts])
                made[(layer, int(f))] = (words, ctxs)
        say("labels", r + 1, len(stats.layers))
    # 2. held-out scores
    held, first = _heldout_sample(stats, lm)
    label_words = sorted({w.lower() for words, _ in made.values() for w in words})
    word_id = {w: i for i, w in enumerate(label_words)}
    M = max(len(label_words), 1)
    keys_by_layer = {}
    for layer in stats.layers:
        ks = [f * M + word_id[w.lower()] for (l, f), (words, _) in made.items() if l == layer for w in words]
        keys_by_layer[layer] = np.unique(np.asarray(ks, dtype=np.int64))
    F = transcoders.n_features
    fires = {layer: np.zeros(F, np.int64) for layer in stats.layers}
    hits = {layer: np.zeros(F, np.int64) for layer in stats.layers}
    word_count = np.zeros(M, np.int64)
    n_tokens = 0
    total = 0 if held is None else max(0, min(cfg.n_heldout, held.n_available - first))
    done = 0
    while done < total:
        ids = held.ids(first + done, min(cfg.batch, total - done))
        if len(ids) == 0:
            break
        wid = np.full(ids.shape, -1, np.int64)
        for b, row in enumerate(ids):
            toks = text(row.tolist())
            for k, span in enumerate(word_spans(toks, text.spaced)):
                wid[b, k] = word_id.get(_word_text(toks, span).lower(), -1)
        body = wid[:, 1:].reshape(-1)  # position 0 is never a context
        word_count += np.bincount(body[body >= 0], minlength=M)[:M]
        n_tokens += body.size
        x, _ = collect_mlp_io(lm, torch.as_tensor(ids, dtype=torch.long).to(lm.device), stats.layers)
        for i, layer in enumerate(stats.layers):
            tc = transcoders[layer]
            act = tc.encode(x[i].to(tc.W_enc.dtype))[:, 1:].reshape(-1, F)  # [B·(T−1), F]
            r_idx, f_idx = (t.cpu().numpy() for t in torch.nonzero(act > 0, as_tuple=True))
            fires[layer] += np.bincount(f_idx, minlength=F)
            w = body[r_idx]
            sel = w >= 0
            key = f_idx[sel] * M + w[sel]
            hit = np.isin(key, keys_by_layer[layer])
            hits[layer] += np.bincount(f_idx[sel][hit], minlength=F)
        done += len(ids)
        say("label scores", done, total)
    labels = {}
    for (layer, f), (words, ctxs) in made.items():
        n_word = int(sum(word_count[word_id[w.lower()]] for w in {w.lower(): w for w in words}.values()))
        tp, nf = int(hits[layer][f]), int(fires[layer][f])
        labels[(layer, f)] = FeatureLabel(
            words=words, contexts=ctxs,
            precision=tp / n_word if n_word and n_tokens else None,
            recall=tp / nf if nf else None,
            n_word=n_word, n_fires=nf,
        )
    desc = "no held-out text (the corpus is not available)" if held is None else (
        f"{done} held-out sequences ({n_tokens:,} tokens) of {held.description}" + (f", from sequence {first}" if first else ""))
    return FeatureLabels(labels, stats.identity, desc, n_tokens, cfg, vocabulary)


def save_feature_labels(labels: FeatureLabels, folder: str | os.PathLike) -> Path:
    """Write ``feature_labels.json.gz`` into a statistics folder (deterministic bytes; atomic)."""
    import gzip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": LABELS_FORMAT, "identity": labels.identity, "heldout": labels.heldout,
        "heldout_tokens": labels.heldout_tokens, "config": asdict(labels.config),
        "vocabulary": sorted(labels.vocabulary),
        "labels": {f"{l}.{f}": [list(x.words), list(x.contexts), x.precision, x.recall, x.n_word, x.n_fires]
                   for (l, f), x in sorted(labels.labels.items())},
    }
    data = gzip.compress(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode(), mtime=0)
    return atomic_write(folder / LABELS_FILE, lambda tmp: Path(tmp).write_bytes(data))


def load_feature_labels(folder: str | os.PathLike) -> FeatureLabels | None:
    """The labels of a statistics folder, or None when it has none (made before labels existed)."""
    import gzip

    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError) as exc:
        raise FormatError(f"{str(path)!r} is unreadable (truncated or corrupt?): {exc}") from None
    if doc.get("format") != LABELS_FORMAT:
        raise FormatError(f"{str(path)!r}: not a {LABELS_FORMAT} file")
    out = {}
    for key, (words, ctxs, p, r, nw, nf) in doc["labels"].items():
        layer, f = key.split(".")
        out[(int(layer), int(f))] = FeatureLabel(tuple(words), tuple(ctxs), p, r, int(nw), int(nf))
    return FeatureLabels(out, doc.get("identity", {}), doc.get("heldout", ""), int(doc.get("heldout_tokens", 0)),
                         LabelConfig(**doc.get("config", {})), frozenset(doc.get("vocabulary", [])))


def describe_features(
    lm: LoadedModel,
    transcoders: TranscoderSet,
    keys: Sequence[tuple[int, int]],
    stats: FeatureStats | None = None,
    labels: FeatureLabels | None = None,
    n_promoted: int = 3,
) -> dict[tuple[int, int], dict]:
    """What pictures, the viewer and the card say about each feature ``(layer, feature)``:

    ``short`` (a few words), ``label`` (words — a context → promoted tokens), ``source`` ("statistics"
    or "token lens"), ``words``, ``contexts``, ``precision``, ``recall``, ``promoted`` (tokens of the
    decoder row's logit lens that are whole words: seen as words in the statistics' sample, or without
    statistics single tokens with and without their leading space), ``density``. With ``labels`` (from ``features stats``) the
    words are the whole words at the top contexts; with statistics but no labels, the whole-word tokens
    among its top-activating tokens (unscored); without statistics the token lens alone, which says so."""
    keys = sorted(set((int(l), int(f)) for l, f in keys))
    ident = _identity(lm, transcoders)["transcoders"]
    for name, x in (("statistics", stats), ("labels", labels)):
        if x is not None and x.identity.get("transcoders") != ident:
            raise ConfigError(f"the feature {name} were computed for another transcoder set; recompute them")
    outs = _output_lens(lm, transcoders, keys, 50)
    text = _TokenText(lm)
    vocab = labels.vocabulary if labels is not None else frozenset()
    out = {}
    for (layer, f), lens in zip(keys, outs):
        promoted = []
        for s in text([t for t, _ in lens]):
            # whole words only: seen as words in the statistics' text when there is one, else by the token test
            ok = s.strip().lower() in vocab if vocab else text.is_word(s)
            if ok and s.strip().isalpha() and s.strip() not in promoted:
                promoted.append(s.strip())
        promoted = promoted[:n_promoted]
        lab = labels.labels.get((layer, f)) if labels is not None else None
        density = None
        words: tuple[str, ...] = ()
        contexts: tuple[str, ...] = ()
        precision = recall = None
        if stats is not None and layer in stats.layers:
            density = stats.density(layer, f)
        if lab is not None:
            words, contexts, precision, recall = lab.words, lab.contexts, lab.precision, lab.recall
        elif stats is not None and layer in stats.layers:
            r = stats.row(layer)
            toks = text([int(t) for t, v in zip(stats.top_tok[r, f], stats.top_val[r, f]) if v > 0])
            words = _choose_words([(t.strip(), 1.0) for t in toks if text.is_word(t)], LabelConfig())
        if words:
            short = " / ".join(words)
            label = short + (f" — {contexts[0]}" if contexts else "") + (f" → {', '.join(promoted)}" if promoted else "")
            source = "statistics"
        else:
            short = ("→ " + " / ".join(promoted[:2])) if promoted else f"F{layer}.{f}"
            label = (f"promotes {', '.join(promoted)}" if promoted else "no whole-word label") + " (token lens: no feature statistics)"
            source = "token lens"
        out[(layer, f)] = {
            "short": short, "label": label, "source": source, "words": list(words), "contexts": list(contexts),
            "precision": precision, "recall": recall, "promoted": promoted, "density": density,
        }
    return out


@torch.no_grad()
def decoder_cosines(transcoders: TranscoderSet, keys: Sequence[tuple[int, int]], floor: float = 0.5) -> list[tuple[str, str, float]]:
    """``("layer.feature", "layer.feature", cosine)`` for every pair of ``keys`` whose decoder rows have
    a cosine ≥ ``floor`` (the figure merges features of one position above its own threshold)."""
    keys = sorted(set((int(l), int(f)) for l, f in keys))
    if len(keys) < 2:
        return []
    rows = torch.cat([transcoders.write_direction(l, torch.tensor([f])).float() for l, f in keys])  # [K, d]
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (unit @ unit.T).cpu().numpy()
    ii, jj = np.nonzero(np.triu(cos >= floor, k=1))
    return [(f"{keys[i][0]}.{keys[i][1]}", f"{keys[j][0]}.{keys[j][1]}", round(float(cos[i, j]), 4)) for i, j in zip(ii, jj)]
