"""Readers for the file formats of the general-domain Debian packages (issue 22): plain prose out of
fortune databases, SWORD zText Bibles, R lazy-load data (``Rdata.rdb``), Freeciv nation rulesets, Endless Sky
mission files and the miscfiles gazetteer tables.

Each reader takes the text (or bytes) of one file and returns the texts it holds; none does any I/O of its
own beyond what it is handed, so each is tested on a small sample (tests/test_transcoders_data.py).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import struct
import zlib
from typing import Any

__all__ = [
    "fortune_texts",
    "osis_to_text",
    "ztext_books",
    "unserialize_r",
    "rdata_texts",
    "unwrap_prose",
    "strip_gutenberg",
    "freeciv_nation_text",
    "endless_sky_texts",
    "countries_text",
    "cities_text",
]


# ---- fortune (strfile source: entries separated by lines holding only "%") ---------------------------
def fortune_texts(src: str) -> list[str]:
    """The entries of a fortune file, each tidied (its line breaks kept: many are verse or dialogue)."""
    entries = re.split(r"(?m)^%\s*$", src.replace("\r\n", "\n"))
    out = []
    for e in entries:
        lines = [line.rstrip().replace("\t", "    ") for line in e.strip("\n").split("\n")]
        text = "\n".join(lines).strip()
        if text:
            out.append(text)
    return out


# ---- SWORD zText (a Bible module: zlib blocks indexed by <testament>.bzs; OSIS XML inside) ----------------
_OSIS_DROP = re.compile(r"<note\b[^>]*>.*?</note>|<note\b[^>]*/>", re.S)
_OSIS_BREAK = re.compile(r"<(chapter|title|/title|l|lg|/lg|list|item|div)\b[^>]*>")
_OSIS_TAG = re.compile(r"<[^>]+>")


def osis_to_text(src: str) -> str:
    """Readable text of OSIS XML: footnotes dropped, chapters and paragraphs as blank-line breaks, titles and
    verse lines on their own lines, every other tag (word lemmas, milestones) removed."""
    # A footnote sits between a word and what follows it, often with no space: keep one unless punctuation follows.
    s = _OSIS_DROP.sub("\x00", src)
    s = re.sub(r"\x00+(?=[\s.,;:!?’”)\]]|$)", "", s).replace("\x00", " ")
    s = re.sub(r"<chapter\b[^>]*/>", "\x01", s)
    s = re.sub(r'<div\b[^>]*\beID="[^"]*"[^>]*/>', "\x01", s)  # end of a paragraph
    s = _OSIS_BREAK.sub("\n", s)
    s = _OSIS_TAG.sub("", s)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in s.split("\n")]
    s = re.sub(r"\n{2,}", "\n", "\n".join(line for line in lines if line))
    s = re.sub(r"\s*\x01[\s\x01]*", "\n\n", s)
    return s.strip()


def ztext_books(bzs: bytes, bzz: bytes) -> list[str]:
    """Texts of the blocks of one zText testament (``BlockType=BOOK``: one block per book).

    ``bzs`` holds one little-endian (offset, compressed size, size) uint32 triple per block of ``bzz``.
    """
    if len(bzs) % 12:
        raise ValueError(f"a .bzs index is a multiple of 12 bytes; got {len(bzs)}")
    out = []
    for i in range(0, len(bzs), 12):
        off, size, _ = struct.unpack_from("<III", bzs, i)
        text = osis_to_text(zlib.decompress(bzz[off : off + size]).decode("utf-8", "replace"))
        if text:
            out.append(text)
    return out


# ---- R serialisation (XDR, as in R's lazy-load databases: data/Rdata.rdx + Rdata.rdb) -------------------
_R_NIL = {254, 242, 241, 253, 252, 251, 250}  # NILVALUE, EMPTYENV, BASEENV, GLOBALENV, UNBOUND, MISSINGARG, BASENS
_R_PAIRLIST = {2, 3, 5, 6, 17, 239, 240}      # LISTSXP, CLOSXP, PROMSXP, LANGSXP, DOTSXP, ATTRLIST, ATTRLANG


class _RReader:
    """A reader of R's XDR serialisation for data objects: vectors, lists, pairlists, symbols, references.

    Character vectors come back as lists of str (NA → None); a list with a names attribute as a dict;
    a pairlist as a dict keyed by tag; other attributes are dropped. R Internals §1.8 documents the format.
    """

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in _R_NIL:
            return None
        if kind == 255:  # REFSXP
            return self.refs[((flags >> 8) or self.int()) - 1]
        if kind in (247, 248, 249):  # PERSIST / PACKAGE / NAMESPACE: a name vector
            self.int()
            v = [self.item() for _ in range(self.int())]
            self.refs.append(v)
            return v
        if kind == 1:  # SYMSXP
            v = self.item()
            self.refs.append(v)
            return v
        if kind in _R_PAIRLIST:
            return self._pairlist(has_attr, has_tag)
        if kind == 238:  # ALTREP: class info, state, attributes
            self.item()
            state = self.item()
            self.item()
            return state
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            v = self.data[self.pos : self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return v
        n = self.int()
        if n == -1:  # long vector
            n = (self.int() << 32) + self.int()
        if kind in (10, 13):
            v: Any = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:
            v = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):
            v = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R object of SEXP type {kind} is not supported (only data vectors and lists)")
        if has_attr:
            attrs = self.item()
            if kind == 19 and isinstance(attrs, dict) and isinstance(attrs.get("names"), list):
                return dict(zip(attrs["names"], v))
        return v

    def _pairlist(self, has_attr: int, has_tag: int) -> dict:
        out: dict = {}
        while True:  # walk the CDR chain iteratively (a recursive walk overflows on long pairlists)
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            out[tag if tag is not None else len(out)] = self.item()
            flags = self.int()
            kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind == 254:
                return out
            if kind not in _R_PAIRLIST:
                raise ValueError(f"pairlist ends in SEXP type {kind}")


def unserialize_r(data: bytes) -> Any:
    """One object of R's ``serialize()`` XDR format (``X\\n`` header, versions 2 and 3)."""
    if data[:2] != b"X\n":
        raise ValueError(f"not R XDR serialisation (starts with {data[:2]!r})")
    r = _RReader(data)
    r.pos = 2
    version = r.int()
    r.int(), r.int()  # writer and minimal reader R versions
    if version == 3:
        n = r.int()  # the native encoding's name (length-prefixed), skipped
        r.pos += n
    return r.item()


def rdata_texts(rdx: bytes, rdb: bytes) -> dict[str, str]:
    """The character-vector objects of an R lazy-load database as texts, by object name.

    ``rdx`` is the (zlib-compressed) index: ``variables`` maps names to (offset, length) in ``rdb``; each
    record there is a 4-byte big-endian length and a zlib stream (compression type 1, R's default).
    """
    index = unserialize_r(_r_decompress(rdx, whole=True))
    out = {}
    for name, (off, length) in index["variables"].items():
        obj = unserialize_r(_r_decompress(rdb[off : off + length]))
        if isinstance(obj, list) and obj and all(isinstance(x, str) or x is None for x in obj):
            out[name] = "\n".join(x or "" for x in obj).replace("\r\n", "\n")
    return out


def _r_decompress(rec: bytes, whole: bool = False) -> bytes:
    """A compressed R object: a gzip file (``whole``, the .rdx index) or a lazy-load record (4-byte length,
    then a zlib stream, or a type byte Z / 2 / X / 0 and a zlib / bzip2 / xz / raw stream)."""
    if whole and rec[:2] == b"\x1f\x8b":
        return gzip.decompress(rec)
    kind = rec[4:5]
    if kind == b"Z":
        return zlib.decompress(rec[5:])
    if kind == b"2":
        return bz2.decompress(rec[5:])
    if kind == b"X":
        return lzma.decompress(rec[5:])
    if kind == b"0":
        return rec[5:]
    return zlib.decompress(rec[4:])


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.M)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.M)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg e-text: its licence header and footer dropped (when marked)."""
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip()


def unwrap_prose(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph; paragraphs with indented lines (verse, tables) are kept."""
    paras = re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip())
    out = []
    for p in paras:
        lines = [line for line in p.split("\n") if line.strip()]
        if not lines:
            continue
        if any(line[:1].isspace() for line in lines):
            out.append("\n".join(line.rstrip() for line in lines))
        else:
            out.append(re.sub(r"\s+", " ", " ".join(lines)).strip())
    return "\n\n".join(out)


# ---- Freeciv nation rulesets (data/nation/*.ruleset) --------------------------------------------------------
def _ruleset_string(src: str, key: str) -> str | None:
    m = re.search(rf'(?m)^{key}\s*=\s*_\(\s*"((?:[^"\\]|\\[\s\S])*)"\s*\)', src)
    if not m:
        return None
    s = m.group(1).replace("\\\n", "").replace('\\"', '"').replace("\\n", "\n")
    return re.sub(r"^\?[\w-]+:", "", s).strip()  # "?plural:Romans" → "Romans"


def _ruleset_list(src: str, key: str) -> list[str]:
    m = re.search(rf"(?ms)^{key}\s*=\s*(.*?)(?:^\s*$|^\w+\s*=)", src)
    if not m:
        return []
    body = re.sub(r";[^\n]*", "", m.group(1))
    return re.findall(r'"([^"]+)"', body)


def freeciv_nation_text(src: str) -> str | None:
    """A short article on one Freeciv nation: its legend, famous leaders and some city names."""
    name, plural, legend = (_ruleset_string(src, k) for k in ("name", "plural", "legend"))
    if not (name and legend):
        return None
    people = plural or name
    parts = [f"The {people}", re.sub(r"\s+", " ", legend)]
    m = re.search(r"(?ms)^leaders\s*=\s*\{(.*?)\}", src)
    if m:
        rows = re.findall(r'^\s*"([^"]+)"\s*,\s*"(Male|Female)"', m.group(1), re.M)
        leaders = [r[0].strip() for r in rows]
        if leaders:
            parts.append(f"Famous leaders of the {people} include {_and_list(leaders[:12])}.")
    cities = [c.strip() for c in _ruleset_list(src, "cities") if not c.startswith("?")]
    if cities:
        parts.append(f"Cities of the {people} include {_and_list(cities[:15])}.")
    return "\n\n".join(parts)


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---- Endless Sky data files (narrative in backquoted strings) --------------------------------------------
_ES_STRING = re.compile(r"`([^`]+)`")


def endless_sky_texts(src: str, min_chars: int = 60) -> list[str]:
    """The prose strings of one Endless Sky data file (mission dialogue, conversations, planet and ship
    descriptions): backquoted strings of at least ``min_chars`` characters that read as sentences."""
    out = []
    for s in _ES_STRING.findall(src):
        s = re.sub(r"\s+", " ", s).strip()
        if len(s) >= min_chars and re.search(r"[a-z]{3,}[ ,.;!?]", s) and s.count(" ") >= 8:
            out.append(s)
    return out


# ---- miscfiles gazetteer tables (countries, cities.dat) → sentences -----------------------------------
def countries_text(src: str) -> str:
    """``UN code:ISO2:ISO3:name:capital`` lines as sentences ("The capital of Albania is Tirana.")."""
    out = []
    for line in src.splitlines():
        if line.startswith("#") or line.count(":") < 4:
            continue
        _, iso2, iso3, name, capital = (f.strip() for f in line.split(":", 4))
        if name and capital:
            out.append(f"The capital of {name} is {capital}. The ISO country codes of {name} are {iso2} and {iso3}.")
    return "\n".join(out)


def cities_text(src: str, per_paragraph: int = 10) -> str:
    """The records of miscfiles' cities.dat (``Key : value`` lines, records ended by ``//``) as sentences."""
    sentences = []
    for rec in src.split("//"):
        f = {}
        for line in rec.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                f[k.strip()] = v.strip()
        name, country = f.get("Name"), f.get("Country")
        if not name or not country or f.get("Type", "City") != "City":
            continue
        where = f"{f['Region']}, {country}" if f.get("Region") else country
        s = f"{name} is a city in {where}."
        if f.get("Population", "").isdigit() and int(f["Population"]) > 0:
            s += f" It has a population of about {int(f['Population']):,}."
        try:
            lat, lon = float(f["Latitude"]), float(f["Longitude"])
            ns, ew = "N" if lat >= 0 else "S", "E" if lon >= 0 else "W"
            s += f" It lies at {abs(lat):.2f}° {ns}, {abs(lon):.2f}° {ew}."
        except (KeyError, ValueError):
            pass
        sentences.append(s)
    paras = [" ".join(sentences[i : i + per_paragraph]) for i in range(0, len(sentences), per_paragraph)]
    return "\n\n".join(paras)
