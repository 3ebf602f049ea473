"""Corpus building: text extraction, tokenisation into a memmap, deterministic shuffle, held-out split."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sparsetrace.errors import ConfigError, FormatError
from sparsetrace.transcoders import _textformats as tf
from sparsetrace.transcoders.data import (
    GENERAL_HELDOUT,
    GENERAL_PACKAGES,
    build_corpus,
    debian_file_texts,
    html_to_text,
    man_to_text,
    open_corpus,
    split_documents,
)

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
    with pytest.raises(ConfigError, match="heldout_fraction=0; allowed: 0 < heldout_fraction ≤ 1"):
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


# ---- general-domain sources (issue 22) ---------------------------------------------------------------
def test_fortune_entries():
    src = "A bore is a man who talks.\n\t\t-- Anon\n%\n\n%\nRoses are red,\n  violets are blue.\n%\n"
    assert tf.fortune_texts(src) == ["A bore is a man who talks.\n        -- Anon", "Roses are red,\n  violets are blue."]


def test_prose_unwrap_and_gutenberg_header():
    text = "Header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nIt is a truth\nuniversally known.\n\n" \
           "    A verse line\n    and another\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nLicence"
    body = tf.strip_gutenberg(text)
    assert body.startswith("It is a truth") and "Licence" not in body and "Header" not in body
    assert tf.unwrap_prose(body) == "It is a truth universally known.\n\n    A verse line\n    and another"
    assert tf.strip_gutenberg("no markers") == "no markers"


def _ztext(blocks: list[str]) -> tuple[bytes, bytes]:
    """A SWORD zText testament: .bzs (offset, size, uncompressed size per block) and .bzz (zlib blocks)."""
    import struct
    import zlib

    bzs, bzz = b"", b""
    for b in blocks:
        z = zlib.compress(b.encode())
        bzs += struct.pack("<III", len(bzz), len(z), len(b.encode()))
        bzz += z
    return bzs, bzz


def test_osis_ztext_books():
    book = ('<title type="main">Genesis</title><chapter sID="Gen.1"/><w lemma="s:1">In</w> <w>the</w> '
            '<w>beginning</w>, <w>God</w><note placement="foot">A note.</note><w>created</w> the earth<note>n</note>. '
            '<div sID="p1" type="x-p"/>Light was good.<div eID="p1" type="x-p"/><l sID="l1"/>A line<l eID="l1"/>'
            '<l sID="l2"/>and another<l eID="l2"/>')
    bzs, bzz = _ztext([book, "<div/>Second book."])
    books = tf.ztext_books(bzs, bzz)
    assert books == ["Genesis\n\nIn the beginning, God created the earth.\nLight was good.\n\nA line\nand another",
                     "Second book."]
    with pytest.raises(ValueError, match="multiple of 12 bytes; got 5"):
        tf.ztext_books(b"12345", bzz)


class _RWriter:
    """Writes R's XDR serialisation (R Internals §1.8) for the objects the reader supports."""

    def __init__(self, version: int = 2):
        import struct

        self.i = lambda v: struct.pack(">i", v)
        self.out = b"X\n" + self.i(version) + self.i(0x040300) + self.i(0x020300)
        if version == 3:
            self.out += self.i(5) + b"UTF-8"

    def obj(self, v) -> bytes:
        i = self.i
        if v is None:
            return i(254)
        if isinstance(v, str):  # a character vector of one string
            return self.obj([v])
        if isinstance(v, dict):  # a named list: VECSXP with a names attribute (a tagged pairlist)
            body = i(19 | 1 << 9) + i(len(v)) + b"".join(self.obj(x) for x in v.values())
            names = self.obj(list(v))
            return body + i(2 | 1 << 10) + i(1) + self._char("names") + names + i(254)
        if all(isinstance(x, int) for x in v):
            return i(13) + i(len(v)) + b"".join(i(x) for x in v)
        return i(16) + i(len(v)) + b"".join(self._char(x) for x in v)

    def _char(self, s):
        if s is None:
            return self.i(9) + self.i(-1)
        b = s.encode()
        return self.i(9 | 8 << 12) + self.i(len(b)) + b

    def __call__(self, v) -> bytes:
        return self.out + self.obj(v)


@pytest.mark.parametrize("version", [2, 3])
def test_rdata_lazy_load_database(version):
    import gzip
    import struct
    import zlib

    w = _RWriter(version)
    objects = {"emma": ["EMMA", "", "Emma Woodhouse, handsome,", "clever, and rich.", None], "n": [1, 2, 3]}
    rdb, variables = b"", {}
    for name, v in objects.items():
        raw = w(v)
        rec = struct.pack(">i", len(raw)) + zlib.compress(raw)
        variables[name] = [len(rdb), len(rec)]
        rdb += rec
    rdx = gzip.compress(w({"variables": variables, "references": None, "compressed": [1]}))
    texts = tf.rdata_texts(rdx, rdb)
    assert texts == {"emma": "EMMA\n\nEmma Woodhouse, handsome,\nclever, and rich.\n"}  # integer vectors skipped
    assert tf.unwrap_prose(texts["emma"]) == "EMMA\n\nEmma Woodhouse, handsome, clever, and rich."
    with pytest.raises(ValueError, match="not R XDR serialisation"):
        tf.unserialize_r(b"RDX2\n")


FREECIV = r"""[nation_roman]
name=_("Roman")
plural=_("?plural:Romans")
legend=_("Rome was, in legend, founded by Romulus in 753 BCE. At its\
 height, Rome controlled much of Europe.")

leaders = {
 "name",               "sex"
 "Romulus",            "Male"
 "Livia Drusilla ",    "Female"
}
cities =
; Cities in Italia
 "Roma",   ; the capital
 "Capua",
 "Veii"

init_techs=""
"""


def test_freeciv_nation_article():
    assert tf.freeciv_nation_text(FREECIV) == (
        "The Romans\n\nRome was, in legend, founded by Romulus in 753 BCE. At its height, Rome controlled much of "
        "Europe.\n\nFamous leaders of the Romans include Romulus and Livia Drusilla.\n\n"
        "Cities of the Romans include Roma, Capua and Veii."
    )
    assert tf.freeciv_nation_text('name=_("X")\n') is None  # no legend: nothing to say


def test_endless_sky_strings_and_gazetteer_sentences():
    src = ('mission "A"\n\tdescription `Deliver <cargo> to <planet>.`\n\tconversation\n'
           '\t\t`The captain, a tall woman named Ijs, looks at you and smiles as the hatch opens.`\n'
           '\t\t`"Basrem" Atomic Steering`\n')
    assert tf.endless_sky_texts(src) == [
        "The captain, a tall woman named Ijs, looks at you and smiles as the hatch opens."]
    countries = "# header\n004:AF:AFG:Afghanistan:Kabul\n344:HK:HKG:Hong Kong:\n"
    assert tf.countries_text(countries) == \
        "The capital of Afghanistan is Kabul. The ISO country codes of Afghanistan are AF and AFG."
    cities = ("ID : 1\nType : City\nPopulation : 210700\nName : Aberdeen\n Country : UK\n Region : Scotland\n"
              " Longitude : -2.083\n Latitude : 57.150\n//\nID : 2\nType : City\nPopulation : \nName : Lima\n"
              " Country : Peru\n Region : \n Longitude : x\n//\n")
    assert tf.cities_text(cities) == ("Aberdeen is a city in Scotland, UK. It has a population of about 210,700. "
                                      "It lies at 57.15° N, 2.08° W. Lima is a city in Peru.")


def _fake_package(cache: Path, name: str, files: dict[str, bytes | str]) -> None:
    """An unpacked package in the cache, as ``fetch_debian_package`` leaves it (no apt in tests)."""
    root = cache / "extract" / name
    for rel, data in files.items():
        p = root / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    (root / ".complete").write_text("ok\n")


def test_build_corpus_with_general_packages(tmp_path):
    import gzip

    cache = tmp_path / "cache"
    _fake_package(cache, "fortunes", {
        "/usr/share/games/fortunes/people": "Wit is good.\n%\nSo is tea.\n%\n",
        "/usr/share/games/fortunes/people.dat": b"\x00\x00\x02binary",
        "/usr/share/games/fortunes/ascii-art": "  /\\_/\\\n%\n",
        "/usr/share/doc/fortunes/changelog": "not kept",
    })
    _fake_package(cache, "miscfiles", {
        "/usr/share/misc/countries.gz": gzip.compress(b"008:AL:ALB:Albania:Tirana\n"),
        "/usr/share/state/us-declaration.gz": gzip.compress(b"When in the Course of human events"),
        "/usr/share/dict/web2": "aardvark\n",
    })
    assert debian_file_texts(cache / "extract/fortunes/usr/share/games/fortunes/people") == ["Wit is good.\n\nSo is tea."]
    c = build_corpus(tmp_path / "c", ByteTokenizer(), debian_packages=(), general_packages=["fortunes", "miscfiles"],
                     stdlib=False, heldout_fraction=0.5, cache_dir=cache)
    assert c.manifest["recipe"]["general_packages"] == ["fortunes", "miscfiles"]
    texts = ["Wit is good.\n\nSo is tea.", "The capital of Albania is Tirana. The ISO country codes of Albania are AL and ALB.",
             "When in the Course of human events"]
    assert c.manifest["sources"] == {
        "fortunes": {"tokens": len(texts[0]) + 1, "documents": 1},
        "miscfiles": {"tokens": len(texts[1]) + len(texts[2]) + 2, "documents": 2},
    }
    docs = sorted(bytes(c.tokens[a:b - 1].tolist()).decode() for a, b in zip(c.doc_offsets[:-1], c.doc_offsets[1:]))
    assert docs == sorted(texts)
    # Debian packages chosen by name → no general-domain packages unless named; the recipe says which.
    c = build_corpus(tmp_path / "d", ByteTokenizer(), debian_packages=["miscfiles"], stdlib=False,
                     heldout_fraction=0.5, cache_dir=cache)
    assert c.manifest["recipe"]["general_packages"] == [] and list(c.manifest["sources"]) == ["miscfiles"]


def test_general_package_errors_and_defaults():
    assert {"fortunes", "r-cran-janeaustenr", "sword-text-web"} <= set(GENERAL_PACKAGES)
    with pytest.raises(ConfigError, match=r"general_packages: 'fortunes-off' is not one; allowed: fortunes, dict-devil"):
        build_corpus("/nonexistent", ByteTokenizer(), general_packages=["fortunes-off"])
    with pytest.raises(ConfigError, match="heldout_fraction=1.5; allowed: 0 < heldout_fraction ≤ 1"):
        build_corpus("/nonexistent", ByteTokenizer(), debian_packages=(), heldout_fraction=1.5)


def test_heldout_set_and_heldout_only_corpus(tmp_path):
    recs = [json.loads(line) for line in GENERAL_HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    kinds = {r["kind"] for r in recs}
    assert kinds == {"facts", "names", "story", "grammar", "reasoning", "code"}
    assert len(recs) >= 80 and all(sum(r["kind"] == k for r in recs) >= 12 for k in kinds)
    assert min(len(r["text"]) for r in recs) >= 500  # each ≥ 150 SmolLM2 tokens (measured: ≥ 173)
    assert len({r["text"] for r in recs}) == len(recs)
    c = build_corpus(tmp_path / "h", ByteTokenizer(), debian_packages=(), stdlib=False, extra_paths=[GENERAL_HELDOUT],
                     heldout_fraction=1)
    assert c.heldout_start == 0 and c.manifest["heldout_documents"] == c.manifest["n_documents"] == len(recs)
    assert c.n_sequences("train", 128) == 0 and c.n_sequences("heldout", 128) == len(c.tokens) // 128
    assert c.sequences("heldout", 0, 2, 128).shape == (2, 128)


def test_cli_corpus_heldout_only_and_option_errors(tmp_path):
    from _cli_common import one_line_error, run
    from _cli_fixtures import save_tiny_model

    r = run("corpus", "--out", tmp_path / "x", "--heldout-only", "--no-stdlib", "--package", "manpages")
    assert r.exit_code == 2 and "--heldout-only takes its text from --text only; drop --package, " \
        "--stdlib/--no-stdlib" in r.output
    r = run("corpus", "--out", tmp_path / "x", "--general-package", "fortunes-off")
    assert r.exit_code == 2 and "'fortunes-off' is not one of 'fortunes', 'dict-devil'" in r.output
    r = run("corpus", "--out", tmp_path / "x", "--no-general", "--general-package", "fortunes")
    assert r.exit_code == 2 and "--general-package needs --debian and --general" in r.output
    r = run("corpus", "--out", tmp_path / "x", "--heldout-fraction", "0")
    assert r.exit_code == 2 and "--heldout-fraction" in r.output
    model = save_tiny_model(tmp_path / "model")
    r = run("corpus", "--out", tmp_path / "h", "--heldout-only", "-m", model, "--json", "-q")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["heldout_documents"] == data["n_documents"] >= 80 and data["heldout_tokens"] == data["n_tokens"]
    assert open_corpus(tmp_path / "h").manifest["recipe"]["extra_paths"] == [str(GENERAL_HELDOUT.resolve())]
    one_line_error(run("train", "--corpus", tmp_path / "h", "--out", tmp_path / "s", "-m", model, "--n-tokens", "64",
                       "-q"), 1, "train split has 0 trainable tokens")


def test_general_text_from_cached_packages():
    """The real package files when they are in the cache (no network in the default test run)."""
    from sparsetrace.transcoders.data import _debian_files, default_cache_dir

    cache = default_cache_dir()
    if not all((cache / "extract" / p / ".complete").is_file() for p in ("r-cran-janeaustenr", "sword-text-web")):
        pytest.skip("r-cran-janeaustenr / sword-text-web not in the cache (build a corpus once to fetch them)")
    austen = [t for f in _debian_files("r-cran-janeaustenr", cache) for t in debian_file_texts(f)]
    assert len(austen) == 6 and any("Emma Woodhouse, handsome, clever, and rich, with a comfortable home" in t for t in austen)
    bible = [t for f in _debian_files("sword-text-web", cache) for t in debian_file_texts(f)]
    assert len(bible) > 60 and any("In the beginning, God created the heavens and the earth." in t for t in bible)
