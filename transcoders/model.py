"""Per-layer transcoders and the set of them (docs/design.md §9, Dunefsky et al. 2024, Paulo et al. 2025).

A transcoder maps an MLP's input x̃ [.., d_in] to an estimate of its output:
    pre = x̃ W_encᵀ + b_enc                       [.., F]
    a   = σ(pre)      (ReLU | JumpReLU(θ) | TopK(k) then ReLU)
    ŷ   = a W_dec + b_dec (+ x̃ W_skipᵀ)           [.., d_out]
W_enc [F, d_in], W_dec [F, d_out], W_skip [d_out, d_in] (the nn.Linear convention, as in sparsify).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from sparsetrace.config import ACTIVATIONS
from sparsetrace.errors import ConfigError

__all__ = ["ACTIVATIONS", "Transcoder", "TranscoderSet", "TranscoderSetConfig", "activate"]



def activate(pre: Tensor, activation: str, threshold: Tensor, k: int | None) -> Tensor:
    """σ(pre) [..., F]: ReLU, JumpReLU(θ) = pre·[pre > θ], or TopK(k) then ReLU (shared by the per-layer
    and the cross-layer transcoders)."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "jumprelu":
        return pre * (pre > threshold)
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))


class EncoderPath:
    """The encoder and skip of one layer's transcoder, shared by :class:`Transcoder` and a cross-layer
    transcoder's layer view: needs ``W_enc``, ``b_enc``, ``threshold``, ``activation``, ``k``, ``W_skip``
    and ``d_out``."""

    def pre_activation(self, x: Tensor) -> Tensor:
        """[..., d_in] → [..., F]."""
        return x @ self.W_enc.T + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """σ(pre) [..., F] for the configured activation."""
        return activate(pre, self.activation, self.threshold, self.k)

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_activation(x))

    def skip(self, x: Tensor) -> Tensor:
        """The linear skip path x̃ W_skipᵀ (zeros without a skip)."""
        if self.W_skip is None:
            return x.new_zeros(*x.shape[:-1], self.d_out)
        return x @ self.W_skip.T


class Transcoder(EncoderPath, nn.Module):
    """One layer's transcoder. Parameters are created zeroed; fill them or load them."""

    def __init__(
        self,
        d_in: int,
        n_features: int,
        activation: str = "topk",
        k: int | None = 32,
        d_out: int | None = None,
        skip: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation={activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if activation == "topk" and (k is None or not 0 < k <= n_features):
            raise ConfigError(f"k={k} for a TopK transcoder; allowed: 1..n_features ({n_features})")
        if d_in <= 0 or n_features <= 0:
            raise ConfigError(f"d_in={d_in}, n_features={n_features}; both must be positive")
        d_out = d_in if d_out is None else d_out
        self.d_in, self.d_out, self.n_features = d_in, d_out, n_features
        self.activation = activation
        self.k = k if activation == "topk" else None
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.zeros(n_features, d_in, **kw))
        self.b_enc = nn.Parameter(torch.zeros(n_features, **kw))
        self.W_dec = nn.Parameter(torch.zeros(n_features, d_out, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **kw)) if skip else None
        # JumpReLU's per-feature threshold θ; unused (zeros) for the other activations.
        self.register_buffer("threshold", torch.zeros(n_features, **kw))

    @property
    def has_skip(self) -> bool:
        return self.W_skip is not None

    def decode(self, a: Tensor, x: Tensor | None = None) -> Tensor:
        """a W_dec + b_dec, plus the skip of x when given and the transcoder has one."""
        out = a @ self.W_dec + self.b_dec
        if x is not None and self.W_skip is not None:
            out = out + self.skip(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k else ""
        return f"d_in={self.d_in}, n_features={self.n_features}, activation={self.activation}{k}, skip={self.has_skip}"


@dataclass(frozen=True)
class TranscoderSetConfig:
    """What a transcoder set is and where it came from; stored as ``config.json`` beside the weights."""

    model_id: str
    """The model the set was trained on (hub id, or the embedded default's name)."""
    architecture: str
    """The adapter name (``llama``, ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3``, ``gpt2``)."""
    n_layers: int
    d_in: int
    n_features: int
    activation: str = "topk"
    k: int | None = 32
    skip: bool = True
    hook_in: str = "mlp.input"
    """Where x̃ is read: the input of ``layers[i].mlp`` (already normed)."""
    hook_out: str = "mlp.output"
    """Where y is written: the output of ``layers[i].mlp`` (for Gemma, before the post-FFN norm)."""
    dtype: str = "float32"
    training: dict[str, Any] = field(default_factory=dict)
    """Provenance: corpus, token count, optimiser settings, code version."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Quality: FVU, L0, dead fraction per layer, CE/KL with MLPs replaced."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if self.n_layers <= 0 or self.d_in <= 0 or self.n_features <= 0:
            raise ConfigError("n_layers, d_in and n_features must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TranscoderSetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown transcoder config keys: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TranscoderSetConfig":
        return replace(self, **changes)


class TranscoderSet(nn.Module):
    """One transcoder per MLP layer, with the hook points and provenance of the set."""

    def __init__(self, config: TranscoderSetConfig, transcoders: list[Transcoder]) -> None:
        super().__init__()
        if len(transcoders) != config.n_layers:
            raise ConfigError(f"config says n_layers={config.n_layers}, got {len(transcoders)} transcoders")
        for i, tc in enumerate(transcoders):
            if tc.d_in != config.d_in or tc.n_features != config.n_features:
                raise ConfigError(
                    f"layer {i}: transcoder d_in={tc.d_in}, n_features={tc.n_features}; "
                    f"config says d_in={config.d_in}, n_features={config.n_features}"
                )
        self.config = config
        self.transcoders = nn.ModuleList(transcoders)

    @classmethod
    def empty(cls, config: TranscoderSetConfig, dtype=torch.float32, device=None) -> "TranscoderSet":
        """Zero-initialised transcoders shaped by ``config``."""
        tcs = [
            Transcoder(config.d_in, config.n_features, config.activation, config.k, skip=config.skip, dtype=dtype, device=device)
            for _ in range(config.n_layers)
        ]
        return cls(config, tcs)

    @classmethod
    def random(
        cls, config: TranscoderSetConfig, seed: int = 0, scale: float = 1.0, dtype=torch.float32, device=None
    ) -> "TranscoderSet":
        """A random set (for exactness tests and benchmarks: exactness does not need training)."""
        ts = cls.empty(config, dtype=dtype, device=device)
        g = torch.Generator().manual_seed(seed)
        d, f = config.d_in, config.n_features
        with torch.no_grad():
            for tc in ts:
                tc.W_enc.copy_(torch.randn(f, d, generator=g, dtype=torch.float64) * scale / d**0.5)
                tc.b_enc.copy_(torch.randn(f, generator=g, dtype=torch.float64) * 0.1 * scale)
                tc.W_dec.copy_(torch.randn(f, d, generator=g, dtype=torch.float64) / f**0.5)
                tc.b_dec.copy_(torch.randn(d, generator=g, dtype=torch.float64) * 0.1)
                if tc.W_skip is not None:
                    tc.W_skip.copy_(torch.randn(d, d, generator=g, dtype=torch.float64) / d)
                if config.activation == "jumprelu":
                    tc.threshold.copy_(torch.rand(f, generator=g, dtype=torch.float64) * 0.1)
        return ts

    def __len__(self) -> int:
        return len(self.transcoders)

    def __getitem__(self, i: int) -> Transcoder:
        return self.transcoders[i]

    def __iter__(self) -> Iterator[Transcoder]:
        return iter(self.transcoders)

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def d_in(self) -> int:
        return self.config.d_in

    # ---- the set-level interface shared with CrossLayerTranscoder (docs/design.md §14) ----------
    cross_layer = False
    """A per-layer set: feature (l, f) writes to layer l only."""

    def targets(self, layer: int) -> range:
        """The layers a feature of source ``layer`` writes to: that layer alone."""
        return range(layer, layer + 1)

    def decoder_rows(self, layer: int, features: Tensor) -> Tensor:
        """Decoder rows [n, 1, d] of ``features`` [n] of source ``layer`` (one target: ``targets(layer)``)."""
        return self.transcoders[layer].W_dec[features][:, None, :]

    def write_direction(self, layer: int, features: Tensor) -> Tensor:
        """Each feature's write to the residual stream [n, d]: its decoder row (the logit lens and the
        decoder cosines read it)."""
        return self.transcoders[layer].W_dec[features]

    def decode_layer(self, layer: int, acts: Sequence[Tensor], x: Tensor | None = None) -> Tensor:
        """ŷ of ``layer`` from the activations ``acts[l]`` [..., F] of every layer (only ``acts[layer]`` is
        read), plus the skip of x̃ ``x`` when given."""
        return self.transcoders[layer].decode(acts[layer], x)
