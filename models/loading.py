"""Loading causal LMs and the per-architecture adapters (docs/design.md §2).

An adapter says where a `transformers` model keeps its decoder layers, MLPs, Q/K projections, norms,
embedding and unembedding. Adapters compose the HF model (hooks inside context managers); they never
subclass or re-implement it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from sparsetrace.config import EMBEDDED_MODEL_NAMES, embedded_model
from sparsetrace.errors import ConfigError, ModelError

from .cache import cache_dir, cached_gguf, fetch_model
from .hooks import hooks

__all__ = [
    "ArchitectureAdapter",
    "LoadedModel",
    "NormKind",
    "SUPPORTED_ARCHITECTURES",
    "DEFAULT_MODEL",
    "adapter_for",
    "load_model",
    "fetch_default_model",
    "fetch_model",
    "cache_dir",
    "collect_mlp_io",
    "splice_mlps",
    "resolve_device",
    "resolve_dtype",
]


# ---- the embedded models ---------------------------------------------------------------------------
DEFAULT_MODEL = embedded_model(None)
"""The embedded default (:data:`sparsetrace.config.EMBEDDED_MODELS`, first entry)."""
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU; a CUDA request without CUDA is a ConfigError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but no CUDA device is available; use 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={str(device)!r}; allowed: cpu, cuda, cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def fetch_default_model(progress: Callable[[str], None] | None = None) -> Path:
    """The embedded default model's cache folder (plain safetensors), fetched on first use
    (:func:`sparsetrace.models.cache.fetch_model`)."""
    return fetch_model(None, progress)


# ---- architecture adapters ----------------------------------------------------------------------
class NormKind:
    RMS = "rms"  # w · x / rms(x)
    RMS_OFFSET = "rms_offset"  # (1 + w) · x / rms(x)   (Gemma)
    LAYER = "layer"  # w · (x − mean x) / std(x) + b   (GPT-2)


def norm_kind(module: nn.Module) -> str | None:
    """The kind of a normalisation module, or None when it is not one."""
    if isinstance(module, nn.LayerNorm):
        return NormKind.LAYER
    name = type(module).__name__
    if name.endswith("RMSNorm"):
        return NormKind.RMS_OFFSET if name.startswith("Gemma") else NormKind.RMS
    return None


def norm_eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps"):
        if hasattr(module, attr):
            return float(getattr(module, attr))
    raise ModelError(f"cannot find the epsilon of norm {type(module).__name__}")


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one architecture family keeps each part. ``qk`` is ``"separate"`` (q_proj, k_proj) or
    ``"fused"`` (GPT-2's c_attn, whose output is [q | k | v])."""

    name: str
    model_types: tuple[str, ...]
    decoder_attr: str
    layers_attr: str
    embed_attr: str
    final_norm_attr: str
    qk: str
    attn_norm: str = "input_layernorm"
    """The norm before attention."""
    mlp_norm: str = "post_attention_layernorm"
    """The norm whose output is the MLP input x̃."""
    post_attn_norm: str | None = None
    """Gemma: the norm on the attention output before the residual add."""
    mlp_post_norm: str | None = None
    """Gemma: the norm applied to the MLP output before the residual add (frozen; outside the target)."""

    def layer_norms(self, model: nn.Module, i: int) -> dict[str, nn.Module | None]:
        """The four per-layer norm positions (None where the architecture has none)."""
        layer = self.layers(model)[i]
        get = lambda name: None if name is None else getattr(layer, name)  # noqa: E731
        return {
            "attn": get(self.attn_norm),
            "mlp": get(self.mlp_norm),
            "post_attn": get(self.post_attn_norm),
            "post_mlp": get(self.mlp_post_norm),
        }

    def attention_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dim)."""
        c = model.config
        nq = getattr(c, "num_attention_heads", None) or c.n_head
        nkv = getattr(c, "num_key_value_heads", None) or nq
        hd = getattr(c, "head_dim", None) or self.unembedding(model).shape[1] // nq
        return nq, nkv, hd

    def value_output_weights(self, model: nn.Module, i: int) -> tuple[Tensor, Tensor]:
        """(W_V [n_kv·hd, d], W_O [d, n_q·hd]) in the nn.Linear convention (out = in @ Wᵀ)."""
        att = self.attention(model, i)
        if self.qk == "fused":  # GPT-2's Conv1D: out = in @ W, W [in, out]; c_attn out = [q | k | v]
            w = att.c_attn.weight
            d = w.shape[0]
            return w[:, 2 * d :].T, att.c_proj.weight.T
        return att.v_proj.weight, att.o_proj.weight

    def decoder(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.decoder_attr)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.decoder(model), self.layers_attr)

    def mlp(self, model: nn.Module, i: int) -> nn.Module:
        return self.layers(model)[i].mlp

    def attention(self, model: nn.Module, i: int) -> nn.Module:
        layer = self.layers(model)[i]
        return layer.self_attn if hasattr(layer, "self_attn") else layer.attn

    def qk_modules(self, model: nn.Module, i: int) -> list[nn.Module]:
        att = self.attention(model, i)
        return [att.c_attn] if self.qk == "fused" else [att.q_proj, att.k_proj]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return getattr(self.decoder(model), self.final_norm_attr)

    def embedding(self, model: nn.Module) -> nn.Module:
        return getattr(self.decoder(model), self.embed_attr)

    def unembedding(self, model: nn.Module) -> Tensor:
        """W_U [vocab, d] (after the final norm, before any softcap)."""
        return model.lm_head.weight

    def norms(self, model: nn.Module) -> list[nn.Module]:
        """Every norm whose denominator is frozen: per-layer norms (incl. QK-norms and post-norms) and
        the final norm."""
        return [m for m in self.decoder(model).modules() if norm_kind(m) is not None]

    def logit_softcap(self, model: nn.Module) -> float | None:
        return getattr(model.config, "final_logit_softcapping", None)


_LLAMA_LIKE = dict(decoder_attr="model", layers_attr="layers", embed_attr="embed_tokens", final_norm_attr="norm", qk="separate")
ADAPTERS = (
    ArchitectureAdapter("llama", ("llama", "mistral"), **_LLAMA_LIKE),
    ArchitectureAdapter("qwen2", ("qwen2",), **_LLAMA_LIKE),
    ArchitectureAdapter("qwen3", ("qwen3",), **_LLAMA_LIKE),
    ArchitectureAdapter("gemma2", ("gemma2",), mlp_norm="pre_feedforward_layernorm",
                        post_attn_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm", **_LLAMA_LIKE),
    ArchitectureAdapter("gemma3", ("gemma3_text",), mlp_norm="pre_feedforward_layernorm",
                        post_attn_norm="post_attention_layernorm", mlp_post_norm="post_feedforward_layernorm", **_LLAMA_LIKE),
    ArchitectureAdapter("gpt2", ("gpt2",), "transformer", "h", "wte", "ln_f", "fused", attn_norm="ln_1", mlp_norm="ln_2"),
)
SUPPORTED_ARCHITECTURES = tuple(a.name for a in ADAPTERS)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter of an HF causal LM, or a ModelError naming the supported architectures."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for a in ADAPTERS:
        if mt in a.model_types:
            return a
    supported = ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise ModelError(f"unsupported architecture {mt!r}; supported: {supported}")


# ---- loaded model ---------------------------------------------------------------------------------
@dataclass(eq=False)
class LoadedModel:
    """An HF causal LM in eval mode with its tokenizer and adapter."""

    model: nn.Module
    tokenizer: object | None
    adapter: ArchitectureAdapter
    model_id: str

    @classmethod
    def from_hf(cls, model: nn.Module, tokenizer: object | None = None, model_id: str | None = None) -> "LoadedModel":
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, tokenizer, adapter_for(model), model_id or getattr(model.config, "_name_or_path", "") or "unnamed")

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    @property
    def d_model(self) -> int:
        return self.adapter.unembedding(self.model).shape[1]

    @property
    def n_ctx(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def prepend_bos(self) -> bool:
        """Prepend a BOS when the tokenizer has one that it does not add itself (docs/design.md §3)."""
        tok = self.tokenizer
        if tok is None or getattr(tok, "bos_token_id", None) is None:
            return False
        return not tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]

    def tokenize(self, prompt: str) -> Tensor:
        """Token ids [T] with the tokenizer's own special tokens, plus a BOS where it has one it did not add."""
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer; pass token ids instead of a string")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if self.prepend_bos:
            ids = [self.tokenizer.bos_token_id] + ids
        return torch.tensor(ids, dtype=torch.long)

    def token_strings(self, ids: Tensor | list[int]) -> list[str]:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return [f"<{i}>" for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LoadedModel":
        self.model.to(device=device, dtype=dtype)
        return self


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a causal LM: ``None`` → the embedded default; an embedded model's name (``gemma-3-270m``);
    a ``.gguf`` file (converted once, cached by content hash); a local HF folder; a hub id."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    path, model_id = _resolve(name_or_path, progress)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt)
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            tok = None
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {model_id!r}: {first}") from None
    lm = LoadedModel.from_hf(model, tok, model_id)
    return lm.to(dev)


def _resolve(name_or_path: str | None, progress: Callable[[str], None] | None) -> tuple[Path | str, str]:
    """(what transformers loads, the model id recorded in graphs) for a ``load_model`` argument."""
    embedded = embedded_model(name_or_path)
    p = Path(name_or_path).expanduser() if name_or_path is not None else None
    if embedded is not None and (p is None or not p.exists()):
        return fetch_model(embedded.name, progress), embedded.name
    assert name_or_path is not None and p is not None
    if p.is_file() and p.suffix == ".gguf":
        return cached_gguf(p, progress), str(name_or_path)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{str(p)!r} is not a model folder (no config.json) or a .gguf file")
        return p, str(name_or_path)
    if name_or_path.count("/") <= 1 and not name_or_path.startswith((".", "/", "~")):
        return name_or_path, str(name_or_path)  # a hub id: transformers resolves (and may fail offline)
    raise ModelError(f"model {name_or_path!r} is neither an existing path nor a hub id; embedded models: "
                     f"{', '.join(EMBEDDED_MODEL_NAMES)}")


# ---- activations for training and evaluation ------------------------------------------------------
def collect_mlp_io(
    lm: LoadedModel, input_ids: Tensor, layers: list[int] | None = None, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """One forward; MLP inputs x̃ and outputs y of the selected layers (ascending), each ``[L_sel, B, T, d]``.

    The forward stops after the last selected layer (the rest of the model is not run). With ``out``
    (two ``[L_sel, B, T, d]`` tensors) the hooks copy into them (converting the dtype) and they are
    returned: nothing per layer is kept alive, so a loop of forwards reuses the same memory.
    """
    layers = list(range(lm.n_layers)) if layers is None else sorted(layers)
    xs: dict[int, Tensor] = {}
    ys: dict[int, Tensor] = {}

    class _Stop(Exception):
        pass

    def make(i: int):
        def hook(module, args, output):
            if out is None:
                xs[i], ys[i] = args[0].detach(), output.detach()
            else:
                j = layers.index(i)
                out[0][j].copy_(args[0])
                out[1][j].copy_(output)
            if i == layers[-1]:
                raise _Stop

        return hook

    specs = [(lm.adapter.mlp(lm.model, i), "forward", make(i)) for i in layers]
    with torch.no_grad(), hooks(specs):
        try:
            lm.adapter.decoder(lm.model)(input_ids=input_ids.to(lm.device), use_cache=False)
        except _Stop:
            pass
    if out is not None:
        return out
    return torch.stack([xs[i] for i in layers]), torch.stack([ys[i] for i in layers])


@contextlib.contextmanager
def splice_mlps(lm: LoadedModel, replacements: dict[int, Callable[[Tensor, Tensor], Tensor]]) -> Iterator[None]:
    """Inside the block, layer i's MLP output is ``replacements[i](x̃, y)`` (e.g. a transcoder's ŷ,
    or zeros for zero-ablation)."""
    for i in replacements:
        if not 0 <= i < lm.n_layers:
            raise ConfigError(f"layer {i} outside 0..{lm.n_layers - 1}")

    def make(fn):
        return lambda module, args, output: fn(args[0], output)

    with hooks([(lm.adapter.mlp(lm.model, i), "forward", make(fn)) for i, fn in replacements.items()]):
        yield
