"""The local replacement model of one prompt (docs/design.md §3).

``ReplacementModel.run(ids)`` runs the real model once and records, per layer l and position c: the MLP
input x̃, output y, transcoder pre-activations and activations, the reconstruction ŷ and the error
ε = y − ŷ, plus the frozen pieces: Q/K projection outputs (so attention patterns are fixed, QK-norms
included) and every norm's denominator.

``ReplacementModel.frozen(run, ...)`` is the frozen forward: with patterns and denominators fixed, the
map from (residual-stream input h0, MLP writes w_l) to every later MLP input and to the final normed
residual is exactly affine. The MLP of layer l is cut: its output is ``w_l + x̃ W_skipᵀ`` where w_l
holds ``W_dec a + b_dec + ε`` (clean values reproduce the real model) — gradients pass only through
the skip. Gemma's post-FFN norm stays outside the target (y is the MLP's own output) with its
denominator frozen like every other norm.

The transcoders are a per-layer :class:`TranscoderSet` or a :class:`CrossLayerTranscoder` (docs/design.md
§14), read through the same set-level interface: for a CLT, ŷ_l sums the writes of every source layer
≤ l (``decode_layer``), so ε_l is layer l's MLP output minus every CLT write landing there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from sparsetrace.errors import ConfigError
from sparsetrace.transcoders import TranscoderSet

from ..models.hooks import HookSpec, hooks
from ..models.loading import LoadedModel, NormKind, norm_eps, norm_kind

__all__ = ["ReplacementModel", "CleanRun", "FrozenOutput", "check_compatible", "eager_attention", "frozen_norm", "norm_state"]


def check_compatible(lm: LoadedModel, ts: TranscoderSet) -> None:
    """Refuse a transcoder set made for another model, saying what differs."""
    diffs = []
    if ts.n_layers != lm.n_layers:
        diffs.append(f"n_layers {ts.n_layers} vs the model's {lm.n_layers}")
    if ts.d_in != lm.d_model:
        diffs.append(f"d_in {ts.d_in} vs the model's d_model {lm.d_model}")
    if ts.config.architecture != lm.adapter.name:
        diffs.append(f"architecture {ts.config.architecture!r} vs the model's {lm.adapter.name!r}")
    if ts.config.hook_in != "mlp.input" or ts.config.hook_out != "mlp.output":
        diffs.append(f"hook points {ts.config.hook_in}/{ts.config.hook_out}; supported: mlp.input/mlp.output")
    if diffs:
        raise ConfigError(
            f"transcoder set for {ts.config.model_id!r} does not match model {lm.model_id!r}: " + "; ".join(diffs)
        )


@dataclass(eq=False)
class CleanRun:
    """What one real forward of a prompt records (batch of one; every tensor is detached).

    Shapes: ``x``, ``y``, ``y_hat``, ``error``: [L, T, d]; ``pre``, ``act``: [L, T, F] (act is zero at
    position 0: position 0 is a constant, not nodes); ``h0``: [T, d] (the input of layer 0, embedding
    scale and position embeddings included); ``final``: [T, d] the final normed residual;
    ``logits``: [T, V] pre-softcap logits; ``model_logits``: the model's own output logits.
    """

    input_ids: Tensor
    x: Tensor
    y: Tensor
    pre: Tensor
    act: Tensor
    y_hat: Tensor
    error: Tensor
    h0: Tensor
    final: Tensor
    logits: Tensor
    model_logits: Tensor
    norm_state: dict[int, tuple[Tensor, Tensor | None]]  # id(module) → (rsqrt factor, mean or None)
    qk_state: dict[int, Tensor]  # id(module) → clean output
    patterns: Tensor  # [L, n_heads, T, T] attention probabilities (eager attention)

    @property
    def n_pos(self) -> int:
        return self.input_ids.shape[0]


@dataclass(eq=False)
class FrozenOutput:
    """Outputs of a frozen forward over a batch of B copies: ``x`` [L, B, T, d] live MLP inputs,
    ``final`` [B, T, d] the final normed residual."""

    x: list[Tensor]
    final: Tensor


class ReplacementModel:
    """A loaded model and a transcoder set read together (composition, not subclassing)."""

    def __init__(self, lm: LoadedModel, transcoders: TranscoderSet) -> None:
        check_compatible(lm, transcoders)
        self.lm = lm
        self.transcoders = transcoders
        self.adapter = lm.adapter
        self.model = lm.model
        self._norms = [(m, norm_kind(m), norm_eps(m)) for m in self.adapter.norms(self.model)]

    @property
    def n_layers(self) -> int:
        return self.lm.n_layers

    def unembedding(self) -> Tensor:
        return self.adapter.unembedding(self.model)

    def _decode(self, ids: Tensor) -> None:
        self.adapter.decoder(self.model)(input_ids=ids, use_cache=False)

    # ---- the clean run ------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids: Tensor) -> CleanRun:
        """Run the real model on token ids [T] and record everything the frozen model needs."""
        ids = input_ids.to(self.lm.device).reshape(1, -1)
        L = self.n_layers
        xs, ys, qk, norms, box = [None] * L, [None] * L, {}, {}, {}

        def mlp_hook(i):
            def hook(module, args, output):
                xs[i], ys[i] = args[0][0].detach(), output[0].detach()

            return hook

        def qk_hook(module, args, output):
            qk[id(module)] = output.detach()

        def norm_hook(kind, eps):
            # Returns our own evaluation of the norm at the clean point: bit-identical to HF's in the
            # model's dtype, and in float64 it avoids HF's internal float32 casts, so that the clean run
            # and the frozen model agree to fp64 precision.
            def hook(module, args, output):
                state = norms[id(module)] = norm_state(args[0], kind, eps)
                return frozen_norm(module, args[0], kind, state)

            return hook

        def h0_hook(module, args, kwargs):
            box["h0"] = (args[0] if args else kwargs["hidden_states"])[0].detach()

        def final_hook(module, args, output):
            box["final"] = output[0].detach()

        specs = [(self.adapter.layers(self.model)[0], "pre", h0_hook), (self.adapter.final_norm(self.model), "forward", final_hook)]
        specs += [(self.adapter.mlp(self.model, i), "forward", mlp_hook(i)) for i in range(L)]
        specs += [(m, "forward", qk_hook) for i in range(L) for m in self.adapter.qk_modules(self.model, i)]
        # norm hooks first, so the final-norm reader sees the norm's (re-evaluated) output
        specs = [(m, "forward", norm_hook(k, e)) for m, k, e in self._norms] + specs
        with hooks(specs), eager_attention(self.model):
            out = self.model(input_ids=ids, use_cache=False, output_attentions=True)
        x, y = torch.stack(xs), torch.stack(ys)  # [L, T, d]
        ts = self.transcoders
        pre = torch.stack([ts[i].pre_activation(x[i]) for i in range(L)])  # [L, T, F]
        act = torch.stack([ts[i].activate(pre[i]) for i in range(L)])
        act[:, 0] = 0  # position 0 (BOS / first token) is an attention sink: a constant, not nodes
        # ŷ_l sums every write landing at layer l (a cross-layer transcoder: from all sources ≤ l)
        y_hat = torch.stack([ts.decode_layer(i, act, x[i]) for i in range(L)])
        error = y - y_hat
        error[:, 0] = 0  # the whole position-0 MLP output is a constant (kept in the writes, see writes())
        final = box["final"]
        return CleanRun(
            input_ids=ids[0],
            x=x,
            y=y,
            pre=pre,
            act=act,
            y_hat=y_hat,
            error=error,
            h0=box["h0"],
            final=final,
            logits=final @ self.unembedding().T,
            model_logits=out.logits[0].detach(),
            norm_state=norms,
            qk_state=qk,
            patterns=torch.cat([a.detach() for a in out.attentions]),
        )

    def clean_writes(self, run: CleanRun) -> list[Tensor]:
        """The MLP writes w_l [T, d] = W_dec a + b_dec + ε that make the frozen model reproduce the real
        one; at position 0 it is y − skip(x̃), the whole constant."""
        out = []
        for i in range(self.n_layers):
            w = run.y[i] - self.transcoders[i].skip(run.x[i])
            out.append(w)
        return out

    # ---- the frozen forward -------------------------------------------------------------------
    def frozen(
        self,
        run: CleanRun,
        h0: Tensor,
        writes: list[Tensor] | None = None,
        mlp: list[Callable[[Tensor], Tensor]] | None = None,
        *,
        live_qk: int | None = None,
        extra: Sequence[HookSpec] = (),
    ) -> FrozenOutput:
        """Frozen forward from residual input ``h0`` [B, T, d] and MLP writes ``writes[l]`` [B, T, d].

        Differentiable w.r.t. ``h0`` and ``writes`` (and exactly affine in them). Patterns are those of
        ``run``; norm denominators are those of ``run``. ``mlp[l]`` (instead of ``writes``) gives layer
        l's MLP output as a function of its input x̃ [B, T, d] — e.g. re-encoding through the transcoder
        for iterative patching. ``live_qk``: the layer whose Q/K projections are computed from the live
        residual (its norm and QK-norm denominators stay frozen), for QK attribution (docs/design.md §13);
        ``extra``: more hooks, registered last.
        """
        if (writes is None) == (mlp is None):
            raise ConfigError("give exactly one of writes= and mlp=")
        if mlp is None:
            ts = self.transcoders
            mlp = [lambda x, w=w, tc=tc: w + tc.skip(x) for w, tc in zip(writes, ts)]
        B, T = h0.shape[0], h0.shape[1]
        if T != run.n_pos:
            raise ConfigError(f"frozen forward over {T} positions, the clean run has {run.n_pos}")
        L = self.n_layers
        xs: list[Tensor | None] = [None] * L
        box: dict[str, Tensor] = {}

        def h0_hook(module, args, kwargs):
            if args:
                return (h0,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h0}

        def mlp_hook(i):
            def hook(module, args, output):
                xs[i] = args[0]
                return mlp[i](args[0])

            return hook

        fused = self.adapter.qk == "fused"

        def qk_hook(module, args, output):
            clean = run.qk_state[id(module)].expand(B, *output.shape[1:])
            if fused:  # GPT-2's c_attn output is [q | k | v]: freeze q and k, keep v live
                d = output.shape[-1] // 3
                return torch.cat([clean[..., : 2 * d], output[..., 2 * d :]], dim=-1)
            return clean

        def norm_hook(kind):
            def hook(module, args, output):
                return frozen_norm(module, args[0], kind, run.norm_state[id(module)])

            return hook

        def final_hook(module, args, output):
            box["final"] = output

        specs = [(self.adapter.layers(self.model)[0], "pre", h0_hook)]
        specs += [(self.adapter.mlp(self.model, i), "forward", mlp_hook(i)) for i in range(L)]
        specs += [(m, "forward", qk_hook) for i in range(L) if i != live_qk for m in self.adapter.qk_modules(self.model, i)]
        specs += [(m, "forward", norm_hook(k)) for m, k, _ in self._norms]
        # registered after the final norm's own freeze hook, so it sees the frozen output
        specs += [(self.adapter.final_norm(self.model), "forward", final_hook)]
        specs += list(extra)
        ids = run.input_ids.reshape(1, -1).expand(B, T)
        with hooks(specs), eager_attention(self.model):
            self._decode(ids)
        return FrozenOutput(x=xs, final=box["final"])


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run with HF's eager attention: it returns the probabilities (the frozen patterns), and the clean
    run, the frozen model and the hand-written backward then all use the very same pattern values."""
    old = model.config._attn_implementation
    if old == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def norm_state(x: Tensor, kind: str, eps: float) -> tuple[Tensor, Tensor | None]:
    """The frozen part of a norm on input x [..., d]: rsqrt factor [..., 1] (and the mean for LayerNorm)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if kind == NormKind.LAYER:
        var = xf.var(-1, keepdim=True, unbiased=False)
        return torch.rsqrt(var + eps).detach(), None
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach(), None


def frozen_norm(module: nn.Module, x: Tensor, kind: str, state: tuple[Tensor, Tensor | None]) -> Tensor:
    """The norm with its denominator replaced by the clean one: linear in x (LayerNorm keeps its live,
    linear mean-centring)."""
    r = state[0]
    r = r.expand(x.shape[0], *r.shape[1:]) if r.shape[0] != x.shape[0] else r
    if kind == NormKind.LAYER:
        xc = x - x.mean(-1, keepdim=True)
        return (xc * r) * module.weight + module.bias if module.bias is not None else (xc * r) * module.weight
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if kind == NormKind.RMS_OFFSET:
        return ((xf * r) * (1.0 + module.weight.to(xf.dtype))).type_as(x)
    return module.weight * (xf * r).to(x.dtype)
