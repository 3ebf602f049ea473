"""Interventions on features, error nodes and token embeddings (docs/design.md §6).

Setting feature (l, c, f) to v adds (v − a)·d_f to the MLP output at (l, c), where d_f is the
feature's decoder row and a its activation. Error nodes (l, c) and token embeddings (c) are vectors:
they are scaled (x·ε adds (x − 1)·ε; a token scales the layer-0 input h0[c], position embeddings
included, exactly the vector of the graph's token node).

Three modes run the intervened prompt:

``constrained`` over layers [a, b)
    Attention patterns (Q/K, QK-norms included) and every norm denominator are frozen at the clean run.
    In layers a ≤ l < b the MLP output is frozen to its clean write plus the live skip path,
    ``w_l + x̃ W_skipᵀ`` (replacement.py), plus the intervention's additions, so features there do not
    respond to upstream changes: only direct effects act. Layers outside [a, b) behave as in
    ``iterative``. Over all layers this is exactly the linear replacement model of the graph, so
    scaling a source s by x moves every target t by (x − 1)·A[t, s] (the bridge of docs/design.md §6).
``iterative``
    Patterns and denominators frozen; every layer's features are re-encoded from the live MLP input,
    the intervened features clamped, and the MLP output is ŷ(re-encoded, clamped) + the clean error
    ε, so effects propagate through the transcoders (the replacement MLPs). Without interventions it
    reproduces the real model.
``unfrozen``
    The real model (live attention and norms); only the MLP-output additions are made, computed from
    the live activation: (v − a_live)·d_f. Scaling an error node scales the live error
    y − ŷ(x̃_live). Norms are evaluated by our own code at the live point (bit-identical to HF in
    float32; in float64 it avoids HF's internal float32 casts).

Values: "set to v" clamps the feature at v. "scale by x" clamps it at x·a_clean, where a_clean is the
feature's activation in the clean run of the prompt (so stacked interventions do not compound); at
positions generated after the prompt (``generate(..., apply_to_generated=True)``) there is no clean
run and x multiplies the live activation. Position 0 may be intervened on (its clean activations are
the transcoder's, though the graph treats position 0 as a constant).

With a cross-layer transcoder (docs/design.md §14) a feature writes to every layer t ≥ its own:
setting it adds (v − a)·d_f^{s→t} at each t. Constrained layers keep their clean output plus those
additions; an iterative layer t decodes the activations every source s ≤ t ended up with (re-encoded in
iterative layers, clean with clamps in constrained ones); unfrozen mode adds the writes at every target
and measures a live error with every earlier layer's live activations.

Every result is measured against a baseline computed along the same code path with no intervention
(one extra batch element), so "set a feature to its own value" changes nothing to rounding.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from sparsetrace.config import MODES, InterventionConfig
from sparsetrace.errors import ConfigError
from sparsetrace.transcoders import TranscoderSet

from ..models.hooks import hooks
from ..models.loading import LoadedModel, norm_eps, norm_kind
from .replacement import CleanRun, ReplacementModel, eager_attention, frozen_norm, norm_state

__all__ = [
    "Intervention",
    "FeatureRef",
    "InterventionResult",
    "GenerationResult",
    "MODES",
    "TOKEN_LAYER",
    "intervene",
    "intervene_batch",
    "generate",
    "filter_logits",
]

OPS = ("set", "scale", "add")
TOKEN_LAYER = -1
"""``Intervention.layer`` of a token embedding (the graph's convention: tokens sit at layer −1)."""


# ---- records ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Intervention:
    """One intervention on a feature, an error node or a token embedding.

    ``layer``: transcoder layer, or ``TOKEN_LAYER`` (−1) for a token embedding. ``position``: a prompt
    position (negative counts from the end) or a slice of them. ``feature``: the feature id; ``None``
    for an error node (layer ≥ 0) or a token. ``op``: ``"set"`` (clamp the feature at ``value``; only
    features), ``"scale"`` (multiply by ``value``) or ``"add"`` (add ``value`` · the feature's decoder row
    to the MLP output, without clamping: steering, docs/design.md §16; only features). Use the constructors: :meth:`set_feature`,
    :meth:`scale_feature`, :meth:`zero_feature`, :meth:`scale_error`, :meth:`zero_error`,
    :meth:`scale_token`, :meth:`zero_token`.
    """

    layer: int
    position: int | slice
    feature: int | None = None
    value: float = 0.0
    op: str = "set"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "layer", operator.index(self.layer))
        except TypeError:
            raise ConfigError(f"layer={self.layer!r}; allowed: an int ≥ 0, or {TOKEN_LAYER} for a token") from None
        if self.layer < TOKEN_LAYER:
            raise ConfigError(f"layer={self.layer}; allowed: ≥ 0 (a transcoder layer) or {TOKEN_LAYER} (a token)")
        if not isinstance(self.position, slice):
            if isinstance(self.position, bool):
                raise ConfigError(f"position={self.position!r}; allowed: an int or a slice")
            try:
                object.__setattr__(self, "position", operator.index(self.position))
            except TypeError:
                raise ConfigError(f"position={self.position!r}; allowed: an int or a slice") from None
        if self.feature is not None:
            if self.layer == TOKEN_LAYER:
                raise ConfigError(f"feature={self.feature!r} for a token intervention; allowed: None")
            try:
                object.__setattr__(self, "feature", operator.index(self.feature))
            except TypeError:
                raise ConfigError(f"feature={self.feature!r}; allowed: an int ≥ 0 or None (error node)") from None
            if self.feature < 0:
                raise ConfigError(f"feature={self.feature}; allowed: ≥ 0")
        if self.op not in OPS:
            raise ConfigError(f"op={self.op!r}; allowed: {', '.join(OPS)}")
        if self.op in ("set", "add") and self.kind != "feature":
            raise ConfigError(
                f"op={self.op!r} on a {self.kind}; allowed for {self.kind}s: 'scale' (they are vectors, not scalars)"
            )
        value = float(self.value)
        if not math.isfinite(value):
            raise ConfigError(f"value={self.value!r}; allowed: a finite number")
        object.__setattr__(self, "value", value)

    @property
    def kind(self) -> str:
        """``"feature"``, ``"error"`` or ``"token"``."""
        if self.layer == TOKEN_LAYER:
            return "token"
        return "error" if self.feature is None else "feature"

    @classmethod
    def set_feature(cls, layer: int, position: int | slice, feature: int, value: float) -> "Intervention":
        """Clamp feature (layer, position, feature) at ``value``."""
        return cls(layer, position, feature, value, "set")

    @classmethod
    def scale_feature(cls, layer: int, position: int | slice, feature: int, factor: float) -> "Intervention":
        """Clamp the feature at ``factor`` × its clean activation."""
        return cls(layer, position, feature, factor, "scale")

    @classmethod
    def add_feature(cls, layer: int, position: int | slice, feature: int, alpha: float) -> "Intervention":
        """Add ``alpha`` · the feature's decoder row to the MLP output of ``layer`` (steering)."""
        return cls(layer, position, feature, alpha, "add")

    @classmethod
    def zero_feature(cls, layer: int, position: int | slice, feature: int) -> "Intervention":
        """Ablate the feature (clamp at 0)."""
        return cls(layer, position, feature, 0.0, "set")

    @classmethod
    def scale_error(cls, layer: int, position: int | slice, factor: float) -> "Intervention":
        """Scale the error node ε (layer, position) by ``factor``."""
        return cls(layer, position, None, factor, "scale")

    @classmethod
    def zero_error(cls, layer: int, position: int | slice) -> "Intervention":
        return cls(layer, position, None, 0.0, "scale")

    @classmethod
    def scale_token(cls, position: int | slice, factor: float) -> "Intervention":
        """Scale the layer-0 input h0 at ``position`` (the token node's vector) by ``factor``."""
        return cls(TOKEN_LAYER, position, None, factor, "scale")

    @classmethod
    def zero_token(cls, position: int | slice) -> "Intervention":
        return cls(TOKEN_LAYER, position, None, 0.0, "scale")


@dataclass(frozen=True)
class FeatureRef:
    """A feature to measure: transcoder ``layer``, prompt ``position`` (negative: from the end), id."""

    layer: int
    position: int
    feature: int


@dataclass(frozen=True, eq=False)
class InterventionResult:
    """What one intervention set did, at the last prompt position.

    Logit values are pre-softcap; ``target_*`` values are demeaned logits (logit minus the mean logit,
    the graph's logit-node value) of ``target_tokens``. Feature values are pre-activations (the graph's
    feature-node value) and activations σ(pre) read from the live MLP input by the transcoder; an
    intervened feature reports its clamp value as its activation. ``clean_*`` are the baseline of the
    same mode without intervention.
    """

    mode: str
    """constrained, iterative or unfrozen."""
    layers: tuple[int, int] | None
    """The constrained range [a, b) (None for the other modes)."""
    interventions: tuple[Intervention, ...]
    logits: Tensor
    """[V] pre-softcap logits at the last position."""
    probabilities: Tensor
    """[V] the model's output distribution (softcap applied where the model has one)."""
    clean_logits: Tensor
    clean_probabilities: Tensor
    target_tokens: tuple[int, ...]
    target_values: Tensor
    """[K] demeaned logits of ``target_tokens``."""
    clean_target_values: Tensor
    features: tuple[FeatureRef, ...]
    feature_pre_activations: Tensor
    """[n] pre-activations of ``features``."""
    feature_activations: Tensor
    """[n] activations of ``features``."""
    clean_feature_pre_activations: Tensor
    clean_feature_activations: Tensor

    @property
    def target_delta(self) -> Tensor:
        """[K] change of each logit target (demeaned logit)."""
        return self.target_values - self.clean_target_values

    @property
    def feature_pre_delta(self) -> Tensor:
        """[n] change of each measured feature's pre-activation."""
        return self.feature_pre_activations - self.clean_feature_pre_activations

    @property
    def feature_delta(self) -> Tensor:
        """[n] change of each measured feature's activation."""
        return self.feature_activations - self.clean_feature_activations


@dataclass(frozen=True)
class GenerationResult:
    """Tokens generated with interventions held on."""

    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    text: str | None
    """The decoded new tokens (None without a tokenizer)."""


# ---- resolution -------------------------------------------------------------------------------
def _positions(pos: int | slice, n_pos: int, what: str) -> list[int]:
    if isinstance(pos, slice):
        out = list(range(*pos.indices(n_pos)))
        if not out:
            raise ConfigError(f"{what}: position={pos} selects no position of a {n_pos}-token prompt")
        return out
    p = pos + n_pos if pos < 0 else pos
    if not 0 <= p < n_pos:
        raise ConfigError(f"{what}: position={pos}; allowed: {-n_pos}..{n_pos - 1} for a {n_pos}-token prompt")
    return [p]


@dataclass(eq=False)
class _Plan:
    """Interventions of B batch elements resolved to absolute positions and clamp values."""

    B: int
    feats: dict[int, list[tuple[int, int, int, float]]] = field(default_factory=dict)  # l → (b, c, f, v)
    errs: dict[int, list[tuple[int, int, float]]] = field(default_factory=dict)  # l → (b, c, x)
    adds: dict[int, list[tuple[int, int, int, float]]] = field(default_factory=dict)  # l → (b, c, f, α)
    toks: list[tuple[int, int, float]] = field(default_factory=list)  # (b, c, x)
    gen: list[tuple[int, int, str, float]] = field(default_factory=list)  # (layer, f, op, value)
    n_prompt: int = 0


@dataclass(eq=False)
class _Clean:
    """Clean quantities every mode needs: activations a [L, T, F] (position 0 included) and the errors
    ε [L, T, d] that go with them, so that ŷ(a) + ε = y everywhere."""

    run: CleanRun
    act: list[Tensor]
    eps: list[Tensor]
    writes: list[Tensor]


def _clean(rm: ReplacementModel, ids: Tensor) -> _Clean:
    run = rm.run(ids)
    ts = rm.transcoders
    act = [ts[l].activate(run.pre[l]) for l in range(rm.n_layers)]
    eps = [run.y[l] - ts.decode_layer(l, act, run.x[l]) for l in range(rm.n_layers)]
    return _Clean(run, act, eps, rm.clean_writes(run))


def _resolve(
    sets: Sequence[Sequence[Intervention]], clean: _Clean, rm: ReplacementModel, offset: int = 0
) -> _Plan:
    """Batch element ``offset + i`` gets ``sets[i]`` (element 0 is the baseline when offset is 1)."""
    L, T, F = rm.n_layers, clean.run.n_pos, rm.transcoders.n_features
    plan = _Plan(B=len(sets) + offset, n_prompt=T)
    for i, ivs in enumerate(sets):
        b = i + offset
        seen: set[tuple] = set()
        for iv in ivs:
            if not isinstance(iv, Intervention):
                raise ConfigError(f"intervention {iv!r}; allowed: Intervention records")
            if iv.kind != "token" and iv.layer >= L:
                raise ConfigError(f"{iv}: layer={iv.layer}; allowed: 0..{L - 1} (or {TOKEN_LAYER} for a token)")
            if iv.kind == "feature" and iv.feature >= F:
                raise ConfigError(f"{iv}: feature={iv.feature}; allowed: 0..{F - 1}")
            for c in _positions(iv.position, T, str(iv)):
                key = (iv.kind, iv.layer, c, iv.feature, iv.op == "add")
                if key in seen:
                    raise ConfigError(f"{iv} targets {iv.kind} (layer {iv.layer}, position {c}) twice in one set")
                seen.add(key)
                if iv.op == "add":
                    plan.adds.setdefault(iv.layer, []).append((b, c, iv.feature, iv.value))
                elif iv.kind == "feature":
                    a = float(clean.act[iv.layer][c, iv.feature])
                    v = iv.value if iv.op == "set" else iv.value * a
                    plan.feats.setdefault(iv.layer, []).append((b, c, iv.feature, v))
                elif iv.kind == "error":
                    plan.errs.setdefault(iv.layer, []).append((b, c, iv.value))
                else:
                    plan.toks.append((b, c, iv.value))
    return plan


def _idx(rows: list[tuple], k: int, device) -> Tensor:
    return torch.tensor([r[k] for r in rows], dtype=torch.long, device=device)


def _vals(rows: list[tuple], k: int, like: Tensor) -> Tensor:
    return torch.tensor([r[k] for r in rows], dtype=like.dtype, device=like.device)


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    return torch.tanh(logits / cap) * cap if cap else logits


# ---- forwards ---------------------------------------------------------------------------------
def _norm_modules(rm: ReplacementModel) -> list:
    return [(m, norm_kind(m), norm_eps(m)) for m in rm.adapter.norms(rm.model)]


def _sources_writing_to(ts, l: int) -> list[int]:
    """Source layers whose features write to layer l: l alone for a per-layer set, 0 … l for a CLT."""
    return [s for s in range(l + 1) if l in ts.targets(s)]


def _add_rows(ts, out: Tensor, adds: dict, l: int) -> Tensor:
    """``out`` [B, T, d] plus α · (the decoder row of source s to layer l) at (b, c) for each (b, c, f, α) of
    ``adds[s]``, s over the source layers writing to l (steering's op "add": l alone for a per-layer set,
    0 … l for a cross-layer one; docs/design.md §16)."""
    dev = out.device
    for s in _sources_writing_to(ts, l):
        rows = adds.get(s, [])
        if not rows:
            continue
        b, c, f, a = _idx(rows, 0, dev), _idx(rows, 1, dev), _idx(rows, 2, dev), _vals(rows, 3, out)
        out = out.index_put((b, c), a[:, None] * ts.decoder_rows(s, f)[:, l - s].to(out.dtype), accumulate=True)
    return out


def _feature_additions(ts, clean: _Clean, plan: _Plan, l: int, like: Tensor):
    """The MLP-output additions at layer l of every feature intervention writing there, (v − a_clean)·d
    with d the decoder row of source s to target l: rows (b, c) and vectors [n, d], or None."""
    dev = like.device
    rows, adds = [], []
    for s in _sources_writing_to(ts, l):
        feats = plan.feats.get(s, [])
        if not feats:
            continue
        b, c, f, v = _idx(feats, 0, dev), _idx(feats, 1, dev), _idx(feats, 2, dev), _vals(feats, 3, like)
        rows.append((b, c))
        adds.append((v - clean.act[s][c, f])[:, None] * ts.decoder_rows(s, f)[:, l - s])  # [n, d]
    if not rows:
        return None
    return (torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])), torch.cat(adds)


def _clamped_clean(clean: _Clean, plan: _Plan, s: int, B: int) -> Tensor:
    """Clean activations of layer s [B, T, F] with that layer's clamps applied (what a constrained layer's
    features are; a cross-layer transcoder's later iterative layers read them)."""
    a = clean.act[s].expand(B, *clean.act[s].shape).clone()
    feats = plan.feats.get(s, [])
    if feats:
        dev = a.device
        a = a.index_put((_idx(feats, 0, dev), _idx(feats, 1, dev), _idx(feats, 2, dev)), _vals(feats, 3, a))
    return a


def _frozen_mlp(rm: ReplacementModel, clean: _Clean, plan: _Plan, l: int, constrained: bool, used: list):
    """Layer l's MLP in a frozen forward. ``used[s]`` [B, T, F]: the activations layer s's features ended
    up with in this forward (re-encoded for an iterative layer, clean with clamps for a constrained one),
    filled in layer order; a cross-layer transcoder's iterative layer l decodes ``used[0..l]``."""
    ts = rm.transcoders
    tc = ts[l]
    feats, errs = plan.feats.get(l, []), plan.errs.get(l, [])

    def fn(x: Tensor) -> Tensor:  # x [B, T, d] → MLP output [B, T, d]
        B = x.shape[0]
        dev = x.device
        if constrained:
            out = clean.writes[l] + tc.skip(x)  # [B, T, d]
            add = _feature_additions(ts, clean, plan, l, x)
            if add is not None:
                out = out.index_put(add[0], add[1], accumulate=True)
            if errs:
                b, c, s = _idx(errs, 0, dev), _idx(errs, 1, dev), _vals(errs, 2, x)
                out = out.index_put((b, c), (s - 1)[:, None] * clean.eps[l][c], accumulate=True)
            if ts.cross_layer:
                used[l] = _clamped_clean(clean, plan, l, B)
            return _add_rows(ts, out, plan.adds, l)
        a = tc.encode(x)  # [B, T, F]
        if feats:
            b, c, f = _idx(feats, 0, dev), _idx(feats, 1, dev), _idx(feats, 2, dev)
            a = a.index_put((b, c, f), _vals(feats, 3, x))
        used[l] = a
        eps = clean.eps[l].expand(B, *clean.eps[l].shape).clone()  # [B, T, d]
        if errs:
            b, c, s = _idx(errs, 0, dev), _idx(errs, 1, dev), _vals(errs, 2, x)
            eps[b, c] = eps[b, c] * s[:, None]
        return _add_rows(ts, ts.decode_layer(l, used, x) + eps, plan.adds, l)

    return fn


def _frozen_forward(
    rm: ReplacementModel, clean: _Clean, plan: _Plan, lo: int, hi: int
) -> tuple[list[Tensor], Tensor]:
    """Patterns and denominators frozen; layers in [lo, hi) constrained, the rest iterative.
    Returns MLP inputs per layer [B, T, d] and the final normed residual [B, T, d]."""
    run, B = clean.run, plan.B
    T, d = run.h0.shape
    L = rm.n_layers
    h0 = run.h0.expand(B, T, d).clone()
    for b, c, s in plan.toks:
        h0[b, c] = h0[b, c] * s
    used: list[Tensor | None] = [None] * L
    fns = [_frozen_mlp(rm, clean, plan, l, lo <= l < hi, used) for l in range(L)]
    with torch.no_grad():
        out = rm.frozen(run, h0, mlp=fns)
    return out.x, out.final


def _unfrozen_specs(rm: ReplacementModel, plan: _Plan, box: dict, xs: list) -> list:
    """Hooks of the real model with the plan's MLP-output additions. ``box["offset"]``: the absolute
    position of the first position of the chunk being run (KV-cached generation runs one token)."""
    L = rm.n_layers
    ts = rm.transcoders

    def live_norm(kind, eps):
        def hook(module, args, output):
            return frozen_norm(module, args[0], kind, norm_state(args[0], kind, eps))

        return hook

    def rows_in_chunk(rows: list[tuple], lo: int, t: int) -> list[tuple]:
        return [(r[0], r[1] - lo) + tuple(r[2:]) for r in rows if lo <= r[1] < lo + t]

    def h0_hook(module, args, kwargs):
        box["pending"], box["live"] = {}, {}  # a new forward
        hs = args[0] if args else kwargs["hidden_states"]
        toks = rows_in_chunk(plan.toks, box["offset"], hs.shape[1])
        if not toks:
            return None
        hs = hs.clone()
        dev = hs.device
        b, c, s = _idx(toks, 0, dev), _idx(toks, 1, dev), _vals(toks, 2, hs)
        hs[b, c] = hs[b, c] * s[:, None]
        if args:
            return (hs,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hs}

    # Feature interventions write (v − a_live)·d at every target layer of their source: the additions for
    # later layers wait in box["pending"] (reset at the start of each forward). Error interventions on a
    # cross-layer transcoder need ŷ(x̃_live), which reads every earlier layer's live activations:
    # box["live"][s] holds them for the chunk when some error is intervened on.
    def mlp_hook(l):
        tc = ts[l]

        def hook(module, args, output):
            x = args[0]  # [B, t, d]
            xs[l] = x
            lo, (B, t) = box["offset"], x.shape[:2]
            feats = rows_in_chunk(plan.feats.get(l, []), lo, t)
            live = [] if not plan.gen else [(r, l_, f, op, v) for r in range(B) for l_, f, op, v in plan.gen if l_ == l]
            adds = rows_in_chunk(plan.adds.get(l, []), lo, t)
            for c in range(max(plan.n_prompt - lo, 0), t):  # generated positions of the chunk
                for b, _, f, op, v in live:
                    if op == "add":
                        adds.append((b, c, f, v))
                    else:
                        feats.append((b, c, f, v if op == "set" else None, v))
            errs = rows_in_chunk(plan.errs.get(l, []), lo, t)
            if ts.cross_layer and any(rows_in_chunk(e, lo, t) for e in plan.errs.values()):
                box["live"][l] = tc.encode(x)
            dev, out = x.device, output
            if feats:
                b, c, f = _idx(feats, 0, dev), _idx(feats, 1, dev), _idx(feats, 2, dev)
                a = tc.encode(x[b, c]).gather(-1, f[:, None])[:, 0]  # [n] live activations
                v = torch.stack([a[i] * r[4] if r[3] is None else a.new_tensor(r[3]) for i, r in enumerate(feats)])
                rows = ts.decoder_rows(l, f)  # [n, targets, d]
                for j, t_l in enumerate(ts.targets(l)):
                    box["pending"].setdefault(t_l, []).append((b, c, (v - a)[:, None] * rows[:, j]))
            if adds:  # steering: α·d at every target layer of the source, without clamping
                b, c, f, al = _idx(adds, 0, dev), _idx(adds, 1, dev), _idx(adds, 2, dev), _vals(adds, 3, x)
                rows = ts.decoder_rows(l, f)  # [n, targets, d]
                for j, t_l in enumerate(ts.targets(l)):
                    box["pending"].setdefault(t_l, []).append((b, c, al[:, None] * rows[:, j].to(x.dtype)))
            for b, c, add in box["pending"].pop(l, []):
                out = out.index_put((b, c), add, accumulate=True)
            if errs:
                b, c, s = _idx(errs, 0, dev), _idx(errs, 1, dev), _vals(errs, 2, x)
                if ts.cross_layer:  # live error y − ŷ(x̃_live), ŷ reading every earlier layer's live activations
                    y_hat = ts.decode_layer(l, [box["live"][s_][b, c] for s_ in range(l + 1)], x[b, c])
                else:
                    y_hat = tc(x[b, c])
                err = output[b, c] - y_hat  # live error y − ŷ(x̃)
                out = out.index_put((b, c), (s - 1)[:, None] * err, accumulate=True)
            return None if out is output else out

        return hook

    model, ad = rm.model, rm.adapter
    specs = [(m, "forward", live_norm(k, e)) for m, k, e in _norm_modules(rm)]
    specs += [(ad.layers(model)[0], "pre", h0_hook)]
    specs += [(ad.mlp(model, l), "forward", mlp_hook(l)) for l in range(L)]

    def final_hook(module, args, output):
        box["final"] = output

    specs += [(ad.final_norm(model), "forward", final_hook)]  # after the live-norm hook
    return specs


def _unfrozen_forward(rm: ReplacementModel, clean: _Clean, plan: _Plan) -> tuple[list[Tensor], Tensor]:
    run = clean.run
    xs: list[Tensor | None] = [None] * rm.n_layers
    box: dict = {"offset": 0}
    ids = run.input_ids.reshape(1, -1).expand(plan.B, -1)
    with torch.no_grad(), hooks(_unfrozen_specs(rm, plan, box, xs)), eager_attention(rm.model):
        rm.adapter.decoder(rm.model)(input_ids=ids, use_cache=False)
    return xs, box["final"]


# ---- public entry points ----------------------------------------------------------------------
def _prompt_ids(prompt, lm: LoadedModel) -> Tensor:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigError("prompt is empty; give some text")
        ids = lm.tokenize(prompt)
    else:
        ids = torch.as_tensor(prompt if isinstance(prompt, Tensor) else list(prompt), dtype=torch.long).flatten()
    if ids.numel() < 1:
        raise ConfigError("prompt has no tokens")
    return ids


def _check_mode(mode: str, layers, L: int) -> tuple[int, int] | None:
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    if mode != "constrained":
        if layers is not None:
            raise ConfigError(f"layers={layers!r} with mode={mode!r}; a layer range only applies to 'constrained'")
        return None
    if layers is None:
        return (0, L)
    if isinstance(layers, range):
        if layers.step != 1:
            raise ConfigError(f"layers={layers!r}; allowed: a contiguous range [a, b)")
        lo, hi = layers.start, layers.stop
    else:
        try:
            lo, hi = (operator.index(v) for v in layers)
        except (TypeError, ValueError):
            raise ConfigError(f"layers={layers!r}; allowed: (a, b) or range(a, b) with 0 ≤ a ≤ b ≤ {L}") from None
    if not 0 <= lo <= hi <= L:
        raise ConfigError(f"layers=({lo}, {hi}); allowed: 0 ≤ a ≤ b ≤ {L}")
    return (lo, hi)


def intervene(
    prompt: str | Sequence[int] | Tensor,
    lm: LoadedModel,
    transcoders: TranscoderSet,
    interventions: Sequence[Intervention],
    *,
    mode: str = InterventionConfig.mode,
    layers: tuple[int, int] | range | None = None,
    target_tokens: Sequence[int] | None = None,
    features: Sequence[FeatureRef] = (),
) -> InterventionResult:
    """Run one set of interventions on a prompt (see the module docstring for the modes).

    ``layers``: the constrained range [a, b) (default: all layers). ``target_tokens``: token ids whose
    demeaned logits are reported (default: the clean top 5). ``features``: features to measure.
    """
    return intervene_batch(
        prompt, lm, transcoders, [interventions], mode=mode, layers=layers, target_tokens=target_tokens,
        features=features,
    )[0]


@torch.no_grad()
def intervene_batch(
    prompt: str | Sequence[int] | Tensor,
    lm: LoadedModel,
    transcoders: TranscoderSet,
    sets: Sequence[Sequence[Intervention]],
    *,
    mode: str = InterventionConfig.mode,
    layers: tuple[int, int] | range | None = None,
    target_tokens: Sequence[int] | None = None,
    features: Sequence[FeatureRef] = (),
    batch_size: int = 16,
) -> list[InterventionResult]:
    """Several intervention sets on one prompt, ``batch_size`` sets per forward (plus the baseline);
    the same results as one call per set."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; allowed: ≥ 1")
    if isinstance(sets, Intervention) or any(isinstance(s, Intervention) for s in sets):
        raise ConfigError("sets must be a list of intervention lists; for one set use intervene()")
    rm = ReplacementModel(lm, transcoders)
    span = _check_mode(mode, layers, rm.n_layers)
    ids = _prompt_ids(prompt, lm)
    clean = _clean(rm, ids)
    T = clean.run.n_pos
    W_U = rm.unembedding()
    cap = rm.adapter.logit_softcap(rm.model)
    if target_tokens is None:
        target_tokens = clean.run.logits[-1].topk(min(5, W_U.shape[0])).indices.tolist()
    toks = [operator.index(t) for t in target_tokens]
    for t in toks:
        if not 0 <= t < W_U.shape[0]:
            raise ConfigError(f"target token {t}; allowed: 0..{W_U.shape[0] - 1}")
    refs = [_check_ref(r, rm, T) for r in features]
    results: list[InterventionResult] = []
    for start in range(0, max(len(sets), 1), batch_size):
        chunk = sets[start : start + batch_size]
        plan = _resolve(chunk, clean, rm, offset=1)
        if mode == "unfrozen":
            xs, final = _unfrozen_forward(rm, clean, plan)
        else:
            xs, final = _frozen_forward(rm, clean, plan, *(span or (0, 0)))
        logits = final[:, -1] @ W_U.T  # [B, V]
        probs = _softcap(logits, cap).softmax(-1)
        tv = logits[:, toks] - logits.mean(-1, keepdim=True)  # [B, K] demeaned
        pre, act = _measure(rm, xs, refs, plan)
        for i, ivs in enumerate(chunk):
            b = i + 1
            results.append(
                InterventionResult(
                    mode=mode, layers=span, interventions=tuple(ivs),
                    logits=logits[b], probabilities=probs[b], clean_logits=logits[0], clean_probabilities=probs[0],
                    target_tokens=tuple(toks), target_values=tv[b], clean_target_values=tv[0],
                    features=tuple(refs), feature_pre_activations=pre[b], feature_activations=act[b],
                    clean_feature_pre_activations=pre[0], clean_feature_activations=act[0],
                )
            )
    return results


def _check_ref(r, rm: ReplacementModel, T: int) -> FeatureRef:
    if not isinstance(r, FeatureRef):
        r = FeatureRef(*r)
    if not 0 <= r.layer < rm.n_layers or not 0 <= r.feature < rm.transcoders.n_features:
        raise ConfigError(f"{r}: layer/feature outside 0..{rm.n_layers - 1} / 0..{rm.transcoders.n_features - 1}")
    (c,) = _positions(r.position, T, str(r))
    return FeatureRef(r.layer, c, r.feature)


def _measure(rm: ReplacementModel, xs: list[Tensor], refs: list[FeatureRef], plan: _Plan) -> tuple[Tensor, Tensor]:
    """Pre-activations and activations [B, n] of ``refs`` from the live MLP inputs (one encoder pass per
    distinct (layer, position)); clamped features report their clamp value."""
    B = plan.B
    if not refs:
        z = xs[0].new_zeros(B, 0)
        return z, z
    pre = xs[0].new_zeros(B, len(refs))
    act = xs[0].new_zeros(B, len(refs))
    groups: dict[tuple[int, int], list[int]] = {}
    for j, r in enumerate(refs):
        groups.setdefault((r.layer, r.position), []).append(j)
    for (l, c), js in groups.items():
        tc = rm.transcoders[l]
        p = tc.pre_activation(xs[l][:, c])  # [B, F]
        a = tc.activate(p)
        f = torch.tensor([refs[j].feature for j in js], device=p.device)
        pre[:, js] = p[:, f]
        act[:, js] = a[:, f]
        for b, cc, ff, v in plan.feats.get(l, []):
            if cc == c:
                for j in js:
                    if refs[j].feature == ff:
                        act[b, j] = v
    return pre, act


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float = 1.0) -> Tensor:
    """``logits`` [V] with every token outside the sampling set at −inf. top-k keeps tokens whose logit
    is ≥ the k-th largest (ties kept); top-p then keeps the smallest set of most probable tokens whose
    probability sums to ≥ ``top_p`` (the token that crosses it included; at least one token)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        probs, order = logits.float().softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs  # probability mass of the more probable tokens
        drop = before >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = -math.inf
    return logits


def _cache_kwarg(model, past) -> dict:
    """transformers ≥ 5.2x names the KV cache argument ``cache`` (``past_key_values`` is deprecated)."""
    if past is None:
        return {}
    import inspect

    return {"cache": past} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": past}


@torch.no_grad()
def generate(
    prompt: str | Sequence[int] | Tensor,
    lm: LoadedModel,
    transcoders: TranscoderSet,
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    use_cache: bool = True,
    apply_to_generated: bool = False,
    stop_at_eos: bool = True,
    generated: Sequence[Intervention] = (),
) -> GenerationResult:
    """Generate with interventions held on (the real model, ``unfrozen`` mode) for every new token.

    Interventions apply at their prompt positions on every step (with or without the KV cache: the
    same tokens). ``apply_to_generated``: feature interventions also act at every generated position
    (a "scale" there multiplies the live activation, an "add" adds α · d_f). ``generated``: feature
    interventions that act at every generated position only (their ``position`` is not used).
    Greedy, or sampled with ``temperature``, ``top_k`` and ``top_p`` (:func:`filter_logits`) from a
    generator seeded with ``seed``.
    """
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; allowed: ≥ 0")
    if do_sample and not temperature > 0:
        raise ConfigError(f"temperature={temperature}; allowed: > 0")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k={top_k}; allowed: ≥ 1 or None")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(f"top_p={top_p!r}; allowed: a number in (0, 1]")
    rm = ReplacementModel(lm, transcoders)
    ids = _prompt_ids(prompt, lm).to(lm.device)
    clean = _clean(rm, ids)
    plan = _resolve([list(interventions)], clean, rm, offset=0)
    on_gen = [iv for iv in interventions if iv.kind == "feature"] if apply_to_generated else []
    for iv in generated:
        if not isinstance(iv, Intervention) or iv.kind != "feature":
            raise ConfigError(f"generated={iv!r}; allowed: feature interventions (errors and tokens only on the prompt)")
        if iv.layer >= rm.n_layers or iv.feature >= rm.transcoders.n_features:
            raise ConfigError(f"{iv}: layer/feature outside 0..{rm.n_layers - 1} / 0..{rm.transcoders.n_features - 1}")
        on_gen.append(iv)
    plan.gen = [(iv.layer, iv.feature, iv.op, iv.value) for iv in on_gen]
    gen = torch.Generator(device=lm.device)
    gen.manual_seed(0 if seed is None else int(seed))
    eos = getattr(lm.tokenizer, "eos_token_id", None) if stop_at_eos and lm.tokenizer is not None else None
    xs: list = [None] * rm.n_layers
    box: dict = {"offset": 0}
    seq = ids.reshape(1, -1)
    new: list[int] = []
    past = None
    with torch.no_grad(), hooks(_unfrozen_specs(rm, plan, box, xs)), eager_attention(rm.model):
        for step in range(max_new_tokens):
            if use_cache:
                inp = seq if past is None else seq[:, -1:]
                box["offset"] = seq.shape[1] - inp.shape[1]
                out = rm.model(input_ids=inp, **_cache_kwarg(rm.model, past), use_cache=True)
                past = out.get("cache", None) if out.get("cache", None) is not None else out.get("past_key_values")
            else:
                box["offset"] = 0
                out = rm.model(input_ids=seq, use_cache=False)
            logits = out.logits[0, -1]
            if do_sample:
                logits = filter_logits(logits / temperature, top_k, top_p)
                nxt = int(torch.multinomial(logits.float().softmax(-1), 1, generator=gen))
            else:
                nxt = int(logits.argmax())
            new.append(nxt)
            seq = torch.cat([seq, seq.new_tensor([[nxt]])], dim=1)
            if eos is not None and nxt == eos:
                break
    text = lm.tokenizer.decode(new) if lm.tokenizer is not None else None
    return GenerationResult(tuple(int(i) for i in ids.tolist()), tuple(new), text)
