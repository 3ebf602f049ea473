"""Cross-layer transcoders (docs/design.md §14; Ameisen et al. 2025).

A cross-layer transcoder (CLT) has, per source layer s, an encoder reading that layer's MLP input x̃_s
and, per target layer t ≥ s, a decoder writing to layer t's MLP output:

    pre_s = x̃_s W_enc[s]ᵀ + b_enc[s]                           [.., F]
    a_s   = σ(pre_s)       (ReLU | JumpReLU(θ_s) | TopK(k) then ReLU)
    ŷ_t   = Σ_{s ≤ t} a_s W_dec[s][:, t − s] + b_dec[t] (+ x̃_t W_skip[t]ᵀ)   [.., d]

W_enc [L, F, d], b_enc [L, F], θ [L, F], b_dec [L, d], W_skip [L, d, d] (nn.Linear convention, as the
per-layer transcoders), and per source s a decoder W_dec[s] [F, L − s, d] (row f: feature f's writes
to layers s … L − 1). A feature's write is the sum of its decoders over the target layers.

Decoders may be *lazy*: read row by row from their safetensors files on demand
(``transcoders/clt_io.py``), so a large CLT does not sit in memory twice (or at all).

The class offers the set-level interface the tracer uses for either kind of set: ``clt[l]`` is a view of
layer l's encoder, skip and decoder bias; ``targets(s)``, ``decoder_rows(s, f)``, ``decode_layer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from sparsetrace.config import ACTIVATIONS
from sparsetrace.errors import ConfigError

from .model import EncoderPath, TranscoderSetConfig

__all__ = ["CrossLayerTranscoder", "CrossLayerTranscoderConfig", "LayerView", "DecoderSource", "CROSS_LAYER"]

CROSS_LAYER = "cross-layer"
"""``config.kind`` of a cross-layer transcoder (the card shows it)."""


@dataclass(frozen=True)
class CrossLayerTranscoderConfig(TranscoderSetConfig):
    """What a CLT is and where it came from (``config.json``); the fields of a per-layer set's config plus
    ``kind``. ``n_features`` is per source layer."""

    kind: str = CROSS_LAYER

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != CROSS_LAYER:
            raise ConfigError(f"kind={self.kind!r}; a cross-layer transcoder config has kind={CROSS_LAYER!r}")


class DecoderSource(Protocol):
    """Where lazy decoders come from (``clt_io.LazyDecoders``)."""

    def rows(self, source: int, features: Tensor) -> Tensor:
        """Rows [n, L − source, d] of ``features`` [n] (CPU, stored dtype)."""

    def full(self, source: int) -> Tensor:
        """The whole decoder [F, L − source, d] of one source layer."""


class LayerView(EncoderPath):
    """Layer l of a CLT as the tracer reads a per-layer transcoder: its encoder (``W_enc``, ``b_enc``,
    ``threshold``, ``pre_activation``, ``activate``, ``encode``), its skip (``W_skip``, ``skip``) and the
    decoder bias of target layer l (``b_dec``). Views share the CLT's storage. There is no ``W_dec`` or
    ``decode``: a CLT feature writes to several layers (:meth:`CrossLayerTranscoder.decoder_rows`)."""

    def __init__(self, clt: "CrossLayerTranscoder", layer: int) -> None:
        self._clt, self.layer = clt, layer

    W_enc = property(lambda self: self._clt.W_enc[self.layer])
    b_enc = property(lambda self: self._clt.b_enc[self.layer])
    threshold = property(lambda self: self._clt.threshold[self.layer])
    b_dec = property(lambda self: self._clt.b_dec[self.layer])
    W_skip = property(lambda self: None if self._clt.W_skip is None else self._clt.W_skip[self.layer])
    d_in = property(lambda self: self._clt.d_in)
    d_out = property(lambda self: self._clt.d_in)
    n_features = property(lambda self: self._clt.n_features)
    activation = property(lambda self: self._clt.config.activation)
    k = property(lambda self: self._clt.config.k)
    has_skip = property(lambda self: self._clt.W_skip is not None)


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder over all L layers of a model (see the module docstring).

    ``decoders``: a :class:`DecoderSource` for lazy decoders (read on demand, kept on disk), or None for
    decoders held as parameters ``W_dec[s]`` [F, L − s, d].
    """

    cross_layer = True

    def __init__(self, config: CrossLayerTranscoderConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, decoders: DecoderSource | None = None) -> None:
        super().__init__()
        if not isinstance(config, CrossLayerTranscoderConfig):
            raise ConfigError(f"config is a {type(config).__name__}; a CLT needs a CrossLayerTranscoderConfig")
        if config.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={config.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if config.activation == "topk" and (config.k is None or not 0 < config.k <= config.n_features):
            raise ConfigError(f"k={config.k} for a TopK CLT; allowed: 1..n_features ({config.n_features})")
        self.config = config
        L, F, d = config.n_layers, config.n_features, config.d_in
        kw = dict(dtype=dtype, device=device)
        self.W_enc = nn.Parameter(torch.zeros(L, F, d, **kw))
        self.b_enc = nn.Parameter(torch.zeros(L, F, **kw))
        self.b_dec = nn.Parameter(torch.zeros(L, d, **kw))
        self.W_skip = nn.Parameter(torch.zeros(L, d, d, **kw)) if config.skip else None
        self.register_buffer("threshold", torch.zeros(L, F, **kw))
        self._lazy = decoders
        self.W_dec = None if decoders is not None else nn.ParameterList(
            [nn.Parameter(torch.zeros(F, L - s, d, **kw)) for s in range(L)])

    # ---- shape ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def lazy(self) -> bool:
        """Decoders are read from disk on demand (not held in memory)."""
        return self._lazy is not None

    def __len__(self) -> int:
        return self.n_layers

    def __getitem__(self, layer: int) -> LayerView:
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"layer {layer} outside 0..{self.n_layers - 1}")
        return LayerView(self, layer % self.n_layers)

    def __iter__(self) -> Iterator[LayerView]:
        return (LayerView(self, l) for l in range(self.n_layers))

    def extra_repr(self) -> str:
        c = self.config
        k = f", k={c.k}" if c.activation == "topk" else ""
        return (f"n_layers={c.n_layers}, d_in={c.d_in}, n_features={c.n_features}, activation={c.activation}{k}, "
                f"skip={c.skip}, lazy_decoders={self.lazy}")

    # ---- decoders --------------------------------------------------------------------------------
    def targets(self, layer: int) -> range:
        """The layers a feature of source ``layer`` writes to: ``layer`` … L − 1."""
        return range(layer, self.n_layers)

    def decoder_rows(self, layer: int, features: Tensor) -> Tensor:
        """Decoder rows [n, L − layer, d] of ``features`` [n] of source ``layer`` (column j: target
        layer + j), on this CLT's device and dtype."""
        if self._lazy is None:
            return self.W_dec[layer][features.to(self.W_dec[layer].device)]
        rows = self._lazy.rows(layer, features.detach().cpu())
        return rows.to(self.b_enc.device, self.b_enc.dtype)

    def write_direction(self, layer: int, features: Tensor) -> Tensor:
        """Each feature's total write [n, d] = Σ_t W_dec[layer][f, t − layer] over its target layers (what
        the logit lens and the decoder cosines of ``tracer/features.py`` read for a CLT feature)."""
        return self.decoder_rows(layer, features).sum(1)

    def decoder(self, layer: int) -> Tensor:
        """The whole decoder [F, L − layer, d] of source ``layer`` (read from disk when lazy)."""
        if self._lazy is None:
            return self.W_dec[layer]
        return self._lazy.full(layer).to(self.b_enc.device, self.b_enc.dtype)

    def decode_layer(self, layer: int, acts: Sequence[Tensor], x: Tensor | None = None) -> Tensor:
        """ŷ of target ``layer`` [..., d] = Σ_{s ≤ layer} acts[s] W_dec[s][:, layer − s] + b_dec[layer]
        (+ the skip of ``x`` when given). ``acts[s]`` [..., F] for every s ≤ layer; only the features
        active somewhere in ``acts[s]`` are read (one decoder read per source layer)."""
        out = self.b_dec[layer].expand(*acts[layer].shape[:-1], self.d_in).clone()
        for s in range(layer + 1):
            a = acts[s]
            f = torch.nonzero(a.reshape(-1, a.shape[-1]).ne(0).any(0)).flatten()
            if len(f):
                out = out + a[..., f] @ self.decoder_rows(s, f)[:, layer - s]
        if x is not None and self.W_skip is not None:
            out = out + x @ self.W_skip[layer].T
        return out

    def load_decoders(self) -> "CrossLayerTranscoder":
        """Read lazy decoders into parameters (in place; for training or a CLT that fits in memory)."""
        if self._lazy is None:
            return self
        dev, dt = self.b_enc.device, self.b_enc.dtype
        self.W_dec = nn.ParameterList([nn.Parameter(self._lazy.full(s).to(dev, dt)) for s in range(self.n_layers)])
        self._lazy = None
        return self

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def random(cls, config: CrossLayerTranscoderConfig, seed: int = 0, scale: float = 1.0,
               dtype: torch.dtype = torch.float32, device=None) -> "CrossLayerTranscoder":
        """A random CLT (for exactness tests and benchmarks: exactness does not need training)."""
        clt = cls(config, dtype=dtype, device=device)
        g = torch.Generator().manual_seed(seed)
        L, F, d = config.n_layers, config.n_features, config.d_in

        def rnd(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        with torch.no_grad():
            clt.W_enc.copy_(rnd(L, F, d) * scale / d**0.5)
            clt.b_enc.copy_(rnd(L, F) * 0.1 * scale)
            clt.b_dec.copy_(rnd(L, d) * 0.1)
            for s in range(L):
                clt.W_dec[s].copy_(rnd(F, L - s, d) / F**0.5)
            if clt.W_skip is not None:
                clt.W_skip.copy_(rnd(L, d, d) / d)
            if config.activation == "jumprelu":
                clt.threshold.copy_(torch.rand(L, F, generator=g, dtype=torch.float64) * 0.1)
        return clt
