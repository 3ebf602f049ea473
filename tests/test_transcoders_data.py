"""Corpus building: text extraction, tokenisation into a memmap, deterministic shuffle, held-out split."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsetrace.errors import ConfigError, FormatError
from sparsetrace.transcoders.data import build_corpus, html_to_text, man_to_text, open_corpus, split_documents

sys.path.insert(0, str(Path(__file__).parent))
from _transcoder_fixtures import ByteTokenizer  # noqa: E402


def _user_files(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("alpha beta\n\ngamma delta\n")
    (d / "b.jsonl").write_text(json.dumps({"text": "one two"}) + "\n\n" + json.dumps({"text": "three"}) + "\n")
    (d / "c.html").write_text("<html><head><style>x{}</style></head><body><p>Hi &amp; bye</p></body></html>")
    (d / "skip.bin").write_bytes(b"\x00\x01")
    return d


def test_html_and_man_extraction():
    assert html_to_text("<p>Hello <b>world</b> &lt;3</p><script>var x</script><p>next</p>") == "Hello world <3\n\nnext"
    man = '.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.\\" a comment\n.B ls -l\n'
    assert man_to_text(man) == "NAME\nls - list directory contents\nls -l"
    assert split_documents("a" * 10 + "\n\n" + "b" * 10, 15) == ["a" * 10, "b" * 10]
    assert split_documents("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_build_corpus_from_user_files(tmp_path):
    src = _user_files(tmp_path)
    c = build_corpus(tmp_path / "c", ByteTokenizer(), debian_packages=(), stdlib=False, extra_paths=[src],
                     heldout_fraction=0.25, seed=3)
    texts = ["alpha beta\n\ngamma delta", "one two", "three", "Hi & bye"]
    assert c.manifest["sources"] == {"user:texts": {"tokens": sum(len(t) + 1 for t in texts), "documents": 4}}
    assert c.tokens.dtype == np.uint16 and len(c.tokens) == c.manifest["n_tokens"] == c.doc_offsets[-1]
    docs = [bytes(c.tokens[a:b - 1].tolist()).decode() for a, b in zip(c.doc_offsets[:-1], c.doc_offsets[1:])]
    assert sorted(docs) == sorted(texts)  # every document, EOS-terminated, shuffled
    assert all(c.tokens[b - 1] == 256 for b in c.doc_offsets[1:])
    assert c.heldout_start == c.doc_offsets[3]  # 1 of 4 documents held out
    # Same recipe → the same corpus is reused; the shuffle is deterministic.
    again = build_corpus(tmp_path / "c2", ByteTokenizer(), debian_packages=(), stdlib=False, extra_paths=[src],
                         heldout_fraction=0.25, seed=3)
    assert np.array_equal(np.asarray(again.tokens), np.asarray(c.tokens))
    reopened = open_corpus(tmp_path / "c")
    assert np.array_equal(np.asarray(reopened.tokens), np.asarray(c.tokens))


def test_sequences_windows_and_bos(tmp_path):
    src = _user_files(tmp_path)
    c = build_corpus(tmp_path / "c", ByteTokenizer(), debian_packages=(), stdlib=False, extra_paths=[src],
                     heldout_fraction=0.25)
    n = c.n_sequences("train", 8)
    assert n == c.heldout_start // 8
    seq = c.sequences("train", 1, 2, 8)
    assert seq.shape == (2, 8) and np.array_equal(seq.reshape(-1), np.asarray(c.tokens[8:24], dtype=np.int64))
    with_bos = c.sequences("train", 0, 1, 8, bos_id=300)
    assert with_bos[0, 0] == 300 and np.array_equal(with_bos[0, 1:], np.asarray(c.tokens[:7], dtype=np.int64))
    assert len(c.sequences("train", n, 5, 8)) == 0  # past the end of the split
    held = c.sequences("heldout", 0, 1, 4)
    assert np.array_equal(held[0], np.asarray(c.tokens[c.heldout_start : c.heldout_start + 4], dtype=np.int64))
    with pytest.raises(ConfigError, match="split='test'; allowed: train, heldout"):
        c.sequences("test", 0, 1, 8)


def test_caps_stdlib_and_errors(tmp_path):
    c = build_corpus(tmp_path / "s", ByteTokenizer(), debian_packages=(), stdlib=True, max_tokens_per_source=5000,
                     doc_chars=1000)
    assert c.manifest["sources"]["python-stdlib"]["tokens"] == 5000
    assert b"def " in bytes(np.asarray(c.tokens[:5000]).astype(np.uint8))
    with pytest.raises(ConfigError, match="heldout_fraction=0; allowed: strictly between 0 and 1"):
        build_corpus(tmp_path / "x", ByteTokenizer(), debian_packages=(), heldout_fraction=0)
    with pytest.raises(ConfigError, match="extra_paths: '/nonexistent' does not exist"):
        build_corpus(tmp_path / "x", ByteTokenizer(), debian_packages=(), extra_paths=["/nonexistent"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nottext": 1}\n')
    with pytest.raises(FormatError, match="line 1: expected an object with a string 'text'"):
        build_corpus(tmp_path / "x", ByteTokenizer(), debian_packages=(), stdlib=False, extra_paths=[bad])
    with pytest.raises(FormatError, match="no manifest.json"):
        open_corpus(tmp_path)


def test_debian_text_extraction_from_cached_package(tmp_path):
    """Uses an already downloaded package when present (no network in the default test run)."""
    from sparsetrace.transcoders.data import default_cache_dir

    root = default_cache_dir() / "extract" / "fortunes-min"
    if not (root / ".complete").is_file():
        pytest.skip("fortunes-min not in the cache (build a corpus once to fetch it)")
    c = build_corpus(tmp_path / "f", ByteTokenizer(), debian_packages=["fortunes-min"], stdlib=False)
    assert c.manifest["sources"]["fortunes-min"]["tokens"] > 10_000
