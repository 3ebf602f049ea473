"""Tiny on-disk models for the CLI tests: a random HF model saved with ``save_pretrained`` plus a
word-level tokenizer over its 64-token vocabulary, so that prompts and text corpora work end to end."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_hf_model

WORDS = [
    "the", "capital", "of", "france", "is", "paris", "a", "cat", "sat", "on", "mat", "john", "mary",
    "gave", "drink", "to", "and", "went", "store", "big", "small", "red", "blue", "green", "one", "two",
    "three", "four", "five", "dog", "ran", "fast", "slow", "city", "river", "sea", "sun", "moon", "day",
    "night", "book", "read", "wrote", "house", "tree", "bird", "sang", "song", "old", "new",
]
SPECIAL = ["<unk>", "<bos>", "<eos>"]
TEXT = (
    "the capital of france is paris . the cat sat on the mat . john and mary went to the store . "
    "john gave a drink to mary . the big red dog ran fast . the small blue bird sang a song . "
    "one two three four five . the old house by the river . the sun and the moon . "
)


def save_tiny_model(folder: Path, arch: str = "llama", n_layers: int = 2) -> Path:
    """Save a tiny random ``arch`` model and a word-level tokenizer (BOS prepended like SmolLM2: no)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.decoders import WordPiece
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    model = tiny_hf_model(arch, seed=0, n_layers=n_layers)
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + ["."])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.decoder = WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return folder


def write_text_corpus(folder: Path, repeat: int = 8) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(TEXT * repeat)
    (folder / "b.txt").write_text(TEXT[::-1].replace(" .", " the") * 2)
    return folder
