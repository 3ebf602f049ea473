"""Shared builders for the transcoder tests: a tiny random Llama, a byte tokenizer, a tiny corpus."""

from __future__ import annotations

from pathlib import Path

import torch


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, EOS = 256 (enough for corpus tests; no hub access)."""

    name_or_path = "bytes"
    eos_token_id = 256
    bos_token_id = None

    def __len__(self) -> int:
        return 257

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": list(texts.encode())}
        return {"input_ids": [list(t.encode()) for t in texts]}


def tiny_lm(n_layers: int = 2, d: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsetrace.models.loading import LoadedModel

    cfg = LlamaConfig(
        vocab_size=257, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    return LoadedModel.from_hf(model, None, model_id="tiny-llama")


def tiny_corpus(folder: Path, n_tokens: int = 40_000):
    """Python stdlib source, byte-tokenised, capped."""
    from sparsetrace.transcoders.data import build_corpus

    return build_corpus(folder, ByteTokenizer(), debian_packages=(), stdlib=True, max_tokens=n_tokens,
                        heldout_fraction=0.05, doc_chars=2000)
