"""A tokenised training corpus built offline (docs/design.md §9).

Sources: Debian documentation packages (English prose, reference text and code) and Debian packages of
general-domain text (literature, a Bible, quotations, a gazetteer, nation histories, game narrative; issue 22),
fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache folder (nothing is
installed); the Python standard library's source from the running interpreter; and any user ``.txt`` /
``.jsonl`` files or folders. Text is stripped of HTML / man-page markup, cut into documents of at most
``doc_chars`` characters, tokenised once with the tokenizer passed in, shuffled at document level with a
fixed seed and written as one flat token array (``tokens.bin``, uint16 or uint32, read as a memmap) with
document offsets (``docs.bin``, int64) and ``manifest.json`` (token counts per source, held-out split).
Documents are separated by the tokenizer's EOS (when it has one).

Sequences for training are consecutive ``ctx_len`` windows over the training part of the token array;
the last ``heldout_fraction`` of the shuffled documents is the held-out split for evaluation
(``heldout_fraction=1``: an evaluation-only corpus, e.g. of :data:`GENERAL_HELDOUT`).
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from sparsetrace.config import CorpusConfig
from sparsetrace.errors import ConfigError, FormatError

from . import _textformats as tf
from sparsetrace._atomic import atomic_write

__all__ = [
    "DEBIAN_PACKAGES",
    "GENERAL_PACKAGES",
    "GENERAL_HELDOUT",
    "Corpus",
    "build_corpus",
    "open_corpus",
    "html_to_text",
    "man_to_text",
    "default_cache_dir",
]

# Package → path fragments to keep ("" = everything). English only, no generated API indexes.
DEBIAN_PACKAGES: dict[str, tuple[str, ...]] = {
    "python3.11-doc": ("/usr/share/doc/python3.11/html/",),
    "manpages": ("/usr/share/man/",),
    "manpages-dev": ("/usr/share/man/",),
    "dict-gcide": ("/usr/share/dictd/gcide.dict",),
    "linux-doc-6.1": ("/usr/share/doc/linux-doc-6.1/",),
    "debian-handbook": ("/en-US/",),
    "fortunes-min": ("/usr/share/games/fortunes/",),
    "jargon-text": ("/jargon.txt",),
    "perl-doc": ("/usr/share/perl/", "/usr/share/man/"),
    "wordnet-base": ("/usr/share/wordnet/data.",),
    "rust-doc": ("/usr/share/doc/rust-doc/html/book/", "/usr/share/doc/rust-doc/html/reference/",
                 "/usr/share/doc/rust-doc/html/rust-by-example/"),
}
"""The Debian sources a default corpus draws from (a built corpus's ``manifest.json`` records each one's token count)."""

# Issue 22: researchers trace facts, names, stories and grammar, which documentation rarely has. Each was
# judged on its text (natural English sentences, not word lists or tables); docs/training.md lists the
# packages looked at and rejected. Tables (countries, cities) are turned into sentences.
GENERAL_PACKAGES: dict[str, tuple[str, ...]] = {
    "fortunes": ("/usr/share/games/fortunes/",),  # quotations, jokes, verse (fortunes-min is the small subset)
    "dict-devil": ("/usr/share/dictd/devil.dict",),  # Bierce, The Devil's Dictionary: definitions as prose
    "r-cran-janeaustenr": ("/janeaustenr/data/Rdata.",),  # Jane Austen's six novels (R data)
    "r-cran-tokenizers": ("/tokenizers/data/Rdata.",),  # Moby-Dick (R data)
    "sword-text-web": ("/modules/texts/ztext/",),  # the World English Bible (SWORD zText)
    "dasher-data": ("/usr/share/dasher/training_english_GB.txt",),  # mixed English sentences
    "miscfiles": ("/usr/share/state/", "/usr/share/misc/countries", "/usr/share/misc/cities.dat"),
    "freeciv-data": ("/usr/share/games/freeciv/nation/",),  # a history paragraph, leaders, cities per nation
    "endless-sky-data": ("/usr/share/games/endless-sky/data/",),  # dialogue and story text with names
}
"""General-domain Debian text packages, drawn by default beside :data:`DEBIAN_PACKAGES` (issue 22)."""

GENERAL_HELDOUT = Path(__file__).parent / "heldout" / "general.jsonl"
"""A hand-written general-domain evaluation set (facts, names, stories, grammar, reasoning, code; issue 22),
``{"text", "kind"}`` per line; ``sparsetrace corpus --heldout-only`` turns it into a held-out-only corpus."""

_SKIP_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".gif", ".svg", ".ico", ".woff", ".woff2", ".ttf", ".otf", ".eot", ".js", ".css",
    ".dat", ".pdf", ".zip", ".inv", ".idx", ".index", ".pyc", ".so", ".mo", ".db", ".map", ".json",
}


def default_cache_dir() -> Path:
    """Where downloaded ``.deb`` files and their unpacked trees are kept (``~/.cache/sparsetrace/debian``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsetrace" / "debian"


# ---- text extraction -----------------------------------------------------------------------------
_TAG = re.compile(r"<[^>]+>")
_DROP_BLOCKS = re.compile(r"<(script|style|head|nav)\b.*?</\1\s*>", re.S | re.I)
_BLOCK_END = re.compile(r"</?(p|div|br|li|h[1-6]|tr|pre|dt|dd|section|table|blockquote)\b[^>]*>", re.I)


def html_to_text(src: str) -> str:
    """Visible text of an HTML page: scripts, styles and navigation dropped, blocks on their own lines."""
    s = _DROP_BLOCKS.sub(" ", src)
    s = _BLOCK_END.sub("\n", s)
    s = html.unescape(_TAG.sub("", s))
    return _tidy(s, strip_lines=True)


_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ROFF_SPECIAL = {r"\-": "-", r"\(em": "—", r"\(en": "–", r"\(aq": "'", r"\(dq": '"', r"\(bu": "•", r"\e": "\\",
                 r"\&": "", r"\|": "", r"\^": "", r"\ ": " ", r"\(co": "©", r"\(lq": "“", r"\(rq": "”"}
_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "TP", "IP", "Nm", "Nd", "Sh", "It"}


def man_to_text(src: str) -> str:
    """Readable text of a roff man page: macros dropped except those whose arguments are text."""
    out = []
    for line in src.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if parts and parts[0] in _ROFF_TEXT_MACROS and len(parts) > 1:
                line = parts[1].replace('"', "")
            else:
                continue
        for k, v in _ROFF_SPECIAL.items():
            line = line.replace(k, v)
        out.append(_ROFF_FONT.sub("", line))
    return _tidy("\n".join(out))


def _tidy(s: str, strip_lines: bool = False) -> str:
    """Collapse runs of blank lines; strip HTML's layout indentation but keep code's (it is syntax)."""
    s = s.replace("\r\n", "\n").replace("\t", "    ")
    lines = [line.strip() if strip_lines else line.rstrip() for line in s.split("\n")]
    if strip_lines:
        lines = [re.sub(r"\s+", " ", line) for line in lines]
    s = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", s).strip("\n")


def _read_text(path: Path) -> str | None:
    """Decoded text of a plain, gzip or dictzip file, or None for binary / unreadable files."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in raw[:4096]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def file_to_text(path: Path) -> str | None:
    """Text of one file by its kind (HTML, man page, anything else plain)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix.lower()
    if suffix in _SKIP_SUFFIXES:
        return None
    src = _read_text(path)
    if src is None:
        return None
    if suffix in (".html", ".htm", ".xhtml"):
        return html_to_text(src)
    if "/man/" in str(path) and re.fullmatch(r"\.\d\w*", suffix or ".x"):
        return man_to_text(src)
    return _tidy(src)


def split_documents(text: str, doc_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``doc_chars`` characters at paragraph (else line) breaks."""
    if len(text) <= doc_chars:
        return [text] if text.strip() else []
    docs, cur, size = [], [], 0
    for para in re.split(r"(\n\n)", text):
        while len(para) > doc_chars:  # a single huge paragraph: cut hard
            docs.append(para[:doc_chars])
            para = para[doc_chars:]
        if size + len(para) > doc_chars and cur:
            docs.append("".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para)
    if cur:
        docs.append("".join(cur))
    return [d.strip() for d in docs if d.strip()]


# ---- sources ---------------------------------------------------------------------------------------
def fetch_debian_package(package: str, cache_dir: Path) -> Path:
    """``apt-get download`` a package (once) and unpack it with ``dpkg-deb -x``; returns the unpacked root."""
    debs, root = cache_dir / "debs", cache_dir / "extract" / package
    if (root / ".complete").is_file():
        return root
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        r = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if r.returncode != 0 or not found:
            raise FormatError(
                f"apt-get download {package} failed (run `apt-get update` once first?): {r.stderr.strip()[-300:]}"
            )
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], check=True, capture_output=True)
    (root / ".complete").write_text("ok\n")
    return root


def _debian_files(package: str, cache_dir: Path) -> list[Path]:
    root = fetch_debian_package(package, cache_dir)
    keep = {**DEBIAN_PACKAGES, **GENERAL_PACKAGES}.get(package, ("",))
    files = []
    for p in sorted(root.rglob("*")):
        rel = "/" + str(p.relative_to(root))
        if p.is_file() and not p.is_symlink() and any(k in rel for k in keep):
            files.append(p)
    return files


def debian_file_texts(path: Path) -> list[str]:
    """Texts of one file of an unpacked Debian package, read by its format: fortune databases, SWORD zText
    (read from its ``.bzs`` index), R lazy-load data (from ``Rdata.rdx``), Freeciv nations, Endless Sky data,
    the miscfiles gazetteer tables; anything else as :func:`file_to_text` reads it."""
    s, name = path.as_posix(), path.name
    if "/games/fortunes/" in s:
        src = None if path.suffix or name in _FORTUNE_SKIP else _read_text(path)
        return ["\n\n".join(tf.fortune_texts(src))] if src else []
    if "/ztext/" in s:
        if path.suffix != ".bzs":
            return []  # .bzz is read through its .bzs index; .bzv (the verse index) is not needed
        return tf.ztext_books(path.read_bytes(), path.with_suffix(".bzz").read_bytes())
    if name.startswith("Rdata."):
        if name != "Rdata.rdx":
            return []
        texts = tf.rdata_texts(path.read_bytes(), path.with_suffix(".rdb").read_bytes())
        return [tf.unwrap_prose(tf.strip_gutenberg(texts[k])) for k in sorted(texts)]
    if "/freeciv/nation/" in s and path.suffix == ".ruleset":
        text = tf.freeciv_nation_text(_read_text(path) or "")
        return [text] if text else []
    if "/endless-sky/data/" in s:
        return ["\n\n".join(tf.endless_sky_texts(_read_text(path) or ""))] if path.suffix == ".txt" else []
    if s.endswith("/misc/countries.gz"):
        return [tf.countries_text(_read_text(path) or "")]
    if s.endswith("/misc/cities.dat.gz"):
        return [tf.cities_text(_read_text(path) or "")]
    text = file_to_text(path)
    return [text] if text else []


_FORTUNE_SKIP = {"ascii-art"}  # pictures drawn in characters, not text


def _stdlib_files(include_tests: bool = False) -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(lib.rglob("*.py")):
        rel = p.relative_to(lib).parts
        if "site-packages" in rel or (not include_tests and ("test" in rel or "tests" in rel or "idlelib" in rel)):
            continue
        out.append(p)
    return out


def _user_texts(path: Path) -> Iterator[str]:
    """Texts of a user .txt / .jsonl file (``{"text": ...}`` per line) or every such file under a folder."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        raise FormatError(f"{str(f)!r} line {n}: not JSON") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise FormatError(f"{str(f)!r} line {n}: expected an object with a string 'text'")
                    yield rec["text"]
        elif f.is_file() and f.suffix in (".txt", ".md", ".rst", ".py", ".html", ".htm"):
            t = file_to_text(f)
            if t:
                yield t


# ---- the corpus -----------------------------------------------------------------------------------
@dataclass
class Corpus:
    """A built corpus: ``tokens`` (memmap), ``doc_offsets`` [n_docs+1] and the manifest."""

    path: Path
    tokens: np.ndarray
    doc_offsets: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def heldout_start(self) -> int:
        """Token index where the held-out split begins."""
        return int(self.manifest["heldout_start_token"])

    def split_range(self, split: str) -> tuple[int, int]:
        if split == "train":
            return 0, self.heldout_start
        if split == "heldout":
            return self.heldout_start, len(self.tokens)
        raise ConfigError(f"split={split!r}; allowed: train, heldout")

    def n_sequences(self, split: str, ctx_len: int, bos_id: int | None = None) -> int:
        lo, hi = self.split_range(split)
        return (hi - lo) // (ctx_len - (bos_id is not None))

    def sequences(self, split: str, start: int, count: int, ctx_len: int, bos_id: int | None = None) -> np.ndarray:
        """Sequences ``start .. start+count`` (clipped at the split's end) as int64 [n, ctx_len].

        Sequence i is the window of ``ctx_len`` tokens (``ctx_len − 1`` after a BOS) starting at token
        i·width of the split; windows cross document boundaries, which are marked by EOS tokens.
        """
        if ctx_len < 2:
            raise ConfigError(f"ctx_len={ctx_len}; allowed: ≥ 2")
        width = ctx_len - (bos_id is not None)
        lo, _ = self.split_range(split)
        stop = min(start + count, self.n_sequences(split, ctx_len, bos_id))
        n = max(0, stop - start)
        body = np.asarray(self.tokens[lo + start * width : lo + (start + n) * width], dtype=np.int64).reshape(n, width)
        if bos_id is None:
            return body
        return np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), body], axis=1)


def open_corpus(path: str | os.PathLike) -> Corpus:
    """Open a corpus written by :func:`build_corpus` (the token array is memory-mapped, not read)."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise FormatError(f"{str(path)!r} has no manifest.json: not a sparsetrace corpus")
    manifest = json.loads(mpath.read_text())
    dtype = np.dtype(manifest["dtype"])
    tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r")
    if len(tokens) != manifest["n_tokens"]:
        raise FormatError(f"{str(path / 'tokens.bin')!r} has {len(tokens)} tokens; manifest says {manifest['n_tokens']}")
    offsets = np.fromfile(path / "docs.bin", dtype=np.int64)
    return Corpus(path, tokens, offsets, manifest)


def build_corpus(
    out_dir: str | os.PathLike,
    tokenizer: Any,
    *,
    debian_packages: Iterable[str] | None = None,
    general_packages: Iterable[str] | None = None,
    stdlib: bool = True,
    stdlib_tests: bool = False,
    extra_paths: Iterable[str | os.PathLike] = (),
    max_tokens_per_source: int | None = None,
    max_tokens: int | None = None,
    doc_chars: int = CorpusConfig.doc_chars,
    heldout_fraction: float = CorpusConfig.heldout_fraction,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> Corpus:
    """Build (or reuse, when ``out_dir`` already has an identical manifest) a tokenised corpus.

    ``debian_packages`` defaults to :data:`DEBIAN_PACKAGES` (pass ``()`` for none); ``general_packages``
    (names from :data:`GENERAL_PACKAGES`) defaults to all of them when ``debian_packages`` is left at its
    default and to none when Debian packages are chosen by name (``()`` for none). A source stops at
    ``max_tokens_per_source`` tokens (files visited in a seeded random order so a cap is a sample, not a
    prefix) and the whole corpus at ``max_tokens``. ``heldout_fraction=1`` holds out every document (an
    evaluation-only corpus: its train split is empty). ``tokenizer`` is a HF tokenizer (``__call__`` →
    ``input_ids``, ``eos_token_id``, ``name_or_path``).
    """
    out_dir = Path(out_dir)
    packages = list(DEBIAN_PACKAGES) if debian_packages is None else list(debian_packages)
    if general_packages is None:
        general = list(GENERAL_PACKAGES) if debian_packages is None else []
    else:
        general = list(general_packages)
    for name in general:
        if name not in GENERAL_PACKAGES:
            raise ConfigError(f"general_packages: {name!r} is not one; allowed: {', '.join(GENERAL_PACKAGES)}")
    if not 0 < heldout_fraction <= 1:
        raise ConfigError(f"heldout_fraction={heldout_fraction}; allowed: 0 < heldout_fraction ≤ 1")
    for name, v in (("max_tokens_per_source", max_tokens_per_source), ("max_tokens", max_tokens), ("doc_chars", doc_chars)):
        if v is not None and v <= 0:
            raise ConfigError(f"{name}={v}; allowed: a positive integer or None")
    extra = [Path(p) for p in extra_paths]
    for p in extra:
        if not p.exists():
            raise ConfigError(f"extra_paths: {str(p)!r} does not exist")
    recipe = {
        "tokenizer": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        "vocab_size": len(tokenizer),
        "debian_packages": packages,
        "general_packages": general,
        "stdlib": stdlib,
        "stdlib_tests": stdlib_tests,
        "extra_paths": [str(p.resolve()) for p in extra],
        "max_tokens_per_source": max_tokens_per_source,
        "max_tokens": max_tokens,
        "doc_chars": doc_chars,
        "heldout_fraction": heldout_fraction,
        "seed": seed,
    }
    if (out_dir / "manifest.json").is_file():
        existing = json.loads((out_dir / "manifest.json").read_text())
        if existing.get("recipe") == recipe:
            return open_corpus(out_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    rng = np.random.default_rng(seed)
    say = progress or (lambda msg: None)
    eos = getattr(tokenizer, "eos_token_id", None)

    sources: list[tuple[str, Callable[[], Iterator[str]]]] = []
    for pkg in packages + [g for g in general if g not in packages]:
        sources.append((pkg, lambda pkg=pkg: _package_texts(_debian_files(pkg, cache), rng)))
    if stdlib:
        sources.append(("python-stdlib", lambda: _file_texts(_stdlib_files(stdlib_tests), rng)))
    for p in extra:
        sources.append((f"user:{p.name}", lambda p=p: _user_texts(p)))

    docs: list[np.ndarray] = []
    counts: dict[str, dict[str, int]] = {}
    total = 0
    for name, texts in sources:
        cap = max_tokens_per_source
        if max_tokens is not None:
            cap = min(cap or max_tokens, max_tokens - total)
        if cap is not None and cap <= 0:
            break
        n_tok, n_doc = _tokenise_source(texts(), tokenizer, eos, doc_chars, cap, docs)
        counts[name] = {"tokens": n_tok, "documents": n_doc}
        total += n_tok
        say(f"{name}: {n_tok:,} tokens in {n_doc:,} documents")
    if not docs:
        raise ConfigError("the corpus is empty: no source produced any text")
    return _write_corpus(out_dir, docs, rng, counts, recipe, tokenizer, heldout_fraction)


def _package_texts(files: list[Path], rng: np.random.Generator) -> Iterator[str]:
    for i in rng.permutation(len(files)):
        yield from (t for t in debian_file_texts(files[i]) if t)


def _file_texts(files: list[Path], rng: np.random.Generator) -> Iterator[str]:
    for i in rng.permutation(len(files)):
        t = file_to_text(files[i])
        if t:
            yield t


def _tokenise_source(texts, tokenizer, eos, doc_chars, cap, docs) -> tuple[int, int]:
    """Tokenise documents of one source into ``docs`` (each ending with EOS) until ``cap`` tokens."""
    n_tok = n_doc = 0
    batch: list[str] = []

    def flush() -> bool:
        nonlocal n_tok, n_doc
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        batch.clear()
        for seq in ids:
            arr = np.asarray(seq + ([eos] if eos is not None else []), dtype=np.int64)
            if cap is not None and n_tok + len(arr) > cap:
                arr = arr[: cap - n_tok]
            if len(arr):
                docs.append(arr)
                n_tok += len(arr)
                n_doc += 1
            if cap is not None and n_tok >= cap:
                return False
        return True

    for text in texts:
        for piece in split_documents(text, doc_chars):
            batch.append(piece)
            if len(batch) == 64 and not flush():
                return n_tok, n_doc
    if batch:
        flush()
    return n_tok, n_doc


def _write_corpus(out_dir, docs, rng, counts, recipe, tokenizer, heldout_fraction) -> Corpus:
    out_dir.mkdir(parents=True, exist_ok=True)
    order = rng.permutation(len(docs))
    lengths = np.array([len(docs[i]) for i in order], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_held = len(docs) if heldout_fraction >= 1 else max(1, int(round(len(docs) * heldout_fraction)))
    if n_held >= len(docs) and heldout_fraction < 1:
        raise ConfigError(f"only {len(docs)} documents: too few for a held-out split of {heldout_fraction}")
    heldout_start = int(offsets[len(docs) - n_held])
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    flat = np.concatenate([docs[i] for i in order]).astype(dtype)
    # Manifest last: a folder with a manifest is complete.
    if (out_dir / "manifest.json").exists():
        (out_dir / "manifest.json").unlink()
    atomic_write(out_dir / "tokens.bin", lambda tmp: flat.tofile(tmp))
    atomic_write(out_dir / "docs.bin", lambda tmp: offsets.tofile(tmp))
    manifest = {
        "format": "sparsetrace-corpus-1",
        "recipe": recipe,
        "dtype": np.dtype(dtype).name,
        "n_tokens": int(len(flat)),
        "n_documents": int(len(docs)),
        "heldout_start_token": heldout_start,
        "heldout_documents": n_held,
        "eos_token_id": getattr(tokenizer, "eos_token_id", None),
        "sources": counts,
        "python": sys.version.split()[0],
    }

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")

    atomic_write(out_dir / "manifest.json", w)
    return open_corpus(out_dir)
