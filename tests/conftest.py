"""Shared fixtures: tiny random models of every supported architecture, random transcoder sets."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ARCHS = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for tests that take one (cpu, cuda)")


@pytest.fixture
def device(request):
    dev = request.config.getoption("--device")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return dev


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def tiny_hf_model(arch: str, seed: int = 0, n_layers: int = 3, d: int = 16):
    """A tiny random HF causal LM of one architecture family (CPU, float32, eval)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **common))
    elif arch == "gemma2":
        model = tf.Gemma2ForCausalLM(
            tf.Gemma2Config(head_dim=8, sliding_window=4, final_logit_softcapping=30.0,
                            attn_logit_softcapping=50.0, tie_word_embeddings=False, **common)
        )
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=8, sliding_window=4, tie_word_embeddings=False, **common))
    elif arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=d, n_layer=n_layers, n_head=4, n_positions=64))
    else:
        raise ValueError(arch)
    # HF's init (std 0.02) leaves a residual stream of norm ~0.1 that every norm scales up ~50×, which
    # amplifies float32 rounding; an O(1) residual is closer to a trained model. Random norm weights make
    # frozen norm scales differ from one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 2 and "lm_head" not in name:
                # Gemma multiplies its embedding by √d itself
                emb = 20.0 / (d**0.5 if arch.startswith("gemma") else 1.0)
                p.mul_(emb if ("embed" in name or "wte" in name or "wpe" in name) else 5.0)
    return model.eval()


def tiny_lm(arch: str, seed: int = 0, n_layers: int = 3):
    from sparsetrace.models.loading import LoadedModel

    return LoadedModel.from_hf(tiny_hf_model(arch, seed, n_layers), None, f"tiny-{arch}")


def random_transcoders(lm, activation: str = "topk", n_features: int = 32, k: int = 4, seed: int = 1, skip: bool = True):
    from sparsetrace.transcoders import TranscoderSet, TranscoderSetConfig

    cfg = TranscoderSetConfig(
        model_id=lm.model_id, architecture=lm.adapter.name, n_layers=lm.n_layers, d_in=lm.d_model,
        n_features=n_features, activation=activation, k=k if activation == "topk" else None, skip=skip,
    )
    return TranscoderSet.random(cfg, seed=seed)


@pytest.fixture(scope="session")
def default_lm():
    """The embedded default model (SmolLM2-135M), fetched by the set-up into the cache."""
    from sparsetrace.models.loading import load_model

    return load_model(None, device="cpu")


def random_clt(lm, activation: str = "topk", n_features: int = 32, k: int = 4, seed: int = 1, skip: bool = True):
    """A random cross-layer transcoder for ``lm`` (docs/design.md §14)."""
    from sparsetrace.transcoders import CrossLayerTranscoder, CrossLayerTranscoderConfig

    cfg = CrossLayerTranscoderConfig(
        model_id=lm.model_id, architecture=lm.adapter.name, n_layers=lm.n_layers, d_in=lm.d_model,
        n_features=n_features, activation=activation, k=k if activation == "topk" else None, skip=skip,
    )
    return CrossLayerTranscoder.random(cfg, seed=seed)
