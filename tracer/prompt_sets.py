"""Prompt sets: files of prompts with per-prompt targets and template fields, and a small template
generator (docs/design.md §15). Torch-free: the tokenizer is passed in where positions are needed.

A prompt set file is JSONL or CSV (chosen by the suffix: ``.jsonl``/``.json`` or ``.csv``).

JSONL: one object per line (blank lines are skipped) with the keys
``prompt`` or ``template`` (both: the filled template must equal the prompt), ``id`` (default ``p<line>``), ``targets`` (a string or a
list of single-token strings; default: the model's top logits) and ``fields`` (``{name: value}``).
A ``template`` is filled from its ``fields`` (``{name}`` placeholders, ``{{``/``}}`` for braces), and
the targets may name fields too (``" {A}"``). A ``prompt`` with ``fields`` finds every occurrence of
each value in the prompt.

CSV: a header row with a ``prompt`` or ``template`` column, optional ``id`` and ``targets`` columns
(several targets separated by ``PromptSetConfig.target_separator``); every other column is a field.

Each field occurrence is remembered as a character span, so that a traced prompt's *roles* — the
token position of a field (its last token; ``B#2`` is the second occurrence of ``B``) or an offset
from the end (``end-1`` is the last token) — can be named across a set (see :func:`token_positions`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from sparsetrace._atomic import atomic_write_text
from sparsetrace.config import PromptSetConfig
from sparsetrace.errors import ConfigError, FormatError

__all__ = [
    "PromptItem",
    "fill_template",
    "load_prompt_set",
    "parse_prompt_set",
    "generate_prompt_set",
    "load_template_spec",
    "write_prompt_set",
    "token_positions",
    "role_position",
]

JSONL_KEYS = ("id", "prompt", "template", "targets", "fields")
SPEC_KEYS = ("template", "fields", "targets", "combine", "distinct", "limit", "seed", "id")
_ROLE_END = re.compile(r"^end-(\d+)$")


@dataclass(frozen=True, eq=False)
class PromptItem:
    """One prompt of a set."""

    id: str
    """Unique within the set; also the name of the prompt's output folder."""
    prompt: str
    targets: tuple[str, ...] = ()
    """Single-token strings to trace as logit targets (empty: the model's top logits)."""
    fields: Mapping[str, str] = field(default_factory=dict)
    """Template field values."""
    spans: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    """Character spans [start, end) of each field's occurrences in ``prompt``, in order."""
    line: int = 0
    """Line (JSONL) or row (CSV, header = 1) in the source file; 0 when generated."""
    template: str | None = None
    """The template the prompt was filled from (None: given as a prompt)."""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "targets": list(self.targets), "fields": dict(self.fields),
                "spans": {k: [list(s) for s in v] for k, v in self.spans.items()}, "line": self.line,
                "template": self.template}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PromptItem":
        return cls(str(d["id"]), str(d["prompt"]), tuple(d.get("targets") or ()), dict(d.get("fields") or {}),
                   {k: tuple((int(a), int(b)) for a, b in v) for k, v in (d.get("spans") or {}).items()},
                   int(d.get("line", 0)), d.get("template"))


# ---- templates ------------------------------------------------------------------------------------
def _placeholders(template: str, where: str) -> list[tuple[str, str]]:
    """(literal text, field name or "") pieces of ``template``; one-line errors for bad braces."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{where}: template {template!r}: {exc}; write literal braces as {{{{ and }}}}") from None
    out = []
    for text, name, spec, conv in parts:
        if name is not None and (spec or conv or not name.isidentifier()):
            raise ConfigError(f"{where}: template field {{{name}}} in {template!r}; allowed: {{NAME}} with NAME an "
                              "identifier (no format specs)")
        out.append((text, name or ""))
    return out


def fill_template(template: str, values: Mapping[str, str], where: str = "template") -> tuple[str, dict[str, tuple[tuple[int, int], ...]]]:
    """The filled text and the character spans of every field occurrence. A field of the template
    without a value is an error naming it (``where`` says which line or file)."""
    text: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    n = 0
    for lit, name in _placeholders(template, where):
        text.append(lit)
        n += len(lit)
        if not name:
            continue
        if name not in values:
            allowed = ", ".join(sorted(values)) or "none given"
            raise ConfigError(f"{where}: template field {{{name}}} is not filled; fields given: {allowed}")
        v = str(values[name])
        spans.setdefault(name, []).append((n, n + len(v)))
        text.append(v)
        n += len(v)
    return "".join(text), {k: tuple(v) for k, v in spans.items()}


def _find_spans(prompt: str, values: Mapping[str, str], where: str) -> dict[str, tuple[tuple[int, int], ...]]:
    out = {}
    for name, v in values.items():
        v = str(v)
        hits = [(m.start(), m.start() + len(v)) for m in re.finditer(re.escape(v), prompt)] if v else []
        if not hits:
            raise ConfigError(f"{where}: field {name}={v!r} does not occur in the prompt {prompt!r}")
        out[name] = tuple(hits)
    return out


# ---- reading ---------------------------------------------------------------------------------------
def _targets(raw: Any, values: Mapping[str, str], where: str, sep: str) -> tuple[str, ...]:
    if raw is None or raw == "":
        return ()
    if isinstance(raw, str):
        raw = raw.split(sep) if sep and sep in raw else [raw]
    if not isinstance(raw, list) or not all(isinstance(t, str) and t != "" for t in raw):
        raise ConfigError(f"{where}: targets={raw!r}; allowed: a non-empty string or a list of them")
    return tuple(fill_template(t, values, f"{where}: target")[0] for t in raw)


def _item(d: Mapping[str, Any], line: int, where: str, sep: str) -> PromptItem:
    has_p, has_t = d.get("prompt") not in (None, ""), d.get("template") not in (None, "")
    if not (has_p or has_t):
        raise ConfigError(f"{where}: give 'prompt' or 'template' (or both)")
    values = d.get("fields") or {}
    if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise ConfigError(f"{where}: fields={values!r}; allowed: an object of strings")
    template = str(d["template"]) if has_t else None
    if template is not None:
        text, spans = fill_template(template, values, where)
        if has_p and text != d["prompt"]:
            raise ConfigError(f"{where}: the filled template {text!r} differs from the prompt {d['prompt']!r}")
    else:
        text = str(d["prompt"])
        spans = _find_spans(text, values, where)
    if not text.strip():
        raise ConfigError(f"{where}: the prompt is empty")
    pid = str(d.get("id") or f"p{line:04d}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", pid):
        raise ConfigError(f"{where}: id {pid!r}; allowed: letters, digits, '.', '_' and '-' (it names a folder)")
    return PromptItem(pid, text, _targets(d.get("targets"), values, where, sep), dict(values), spans, line, template)


def _parse_jsonl(text: str, name: str, sep: str) -> list[PromptItem]:
    items = []
    for i, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{name} line {i}"
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a {type(d).__name__}; allowed: a JSON object with keys {', '.join(JSONL_KEYS)}")
        bad = sorted(set(d) - set(JSONL_KEYS))
        if bad:
            raise ConfigError(f"{where}: unknown key {bad[0]!r}; allowed: {', '.join(JSONL_KEYS)}")
        items.append(_item(d, i, where, sep))
    return items


def _parse_csv(text: str, name: str, sep: str) -> list[PromptItem]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    head = [h.strip() for h in rows[0]]
    if "prompt" not in head and "template" not in head:
        raise ConfigError(f"{name} line 1: the header {head!r} has no 'prompt' or 'template' column")
    if len(set(head)) != len(head):
        raise ConfigError(f"{name} line 1: repeated column in the header {head!r}")
    items = []
    for i, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        where = f"{name} line {i}"
        if len(row) != len(head):
            raise ConfigError(f"{where}: {len(row)} columns; the header has {len(head)}")
        d = dict(zip(head, row))
        values = {k: v for k, v in d.items() if k not in JSONL_KEYS}
        items.append(_item({**{k: d[k] for k in d if k in JSONL_KEYS}, "fields": values}, i, where, sep))
    return items


def parse_prompt_set(text: str, fmt: str, name: str = "prompts", config: PromptSetConfig | None = None) -> list[PromptItem]:
    """Parse a prompt set in ``fmt`` (``jsonl`` or ``csv``); ``name`` appears in error messages."""
    sep = (config or PromptSetConfig()).target_separator
    if fmt == "jsonl":
        items = _parse_jsonl(text, name, sep)
    elif fmt == "csv":
        items = _parse_csv(text, name, sep)
    else:
        raise ConfigError(f"prompt set format {fmt!r}; allowed: jsonl, csv")
    if not items:
        raise ConfigError(f"{name}: no prompts")
    seen: dict[str, int] = {}
    for it in items:
        if it.id in seen:
            raise ConfigError(f"{name} line {it.line}: id {it.id!r} repeats line {seen[it.id]}; ids must be unique")
        seen[it.id] = it.line
    return items


def load_prompt_set(path: str | Path, config: PromptSetConfig | None = None) -> list[PromptItem]:
    """Read a ``.jsonl``/``.json`` or ``.csv`` prompt set (module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    fmt = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv"}.get(suffix)
    if fmt is None:
        raise ConfigError(f"PROMPTS {str(path)!r}: suffix {suffix or '(none)'!r}; allowed: .jsonl, .json, .csv")
    if not path.is_file():
        raise ConfigError(f"PROMPTS {str(path)!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"PROMPTS {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_prompt_set(text, fmt, path.name, config)


def write_prompt_set(path: str | Path, items: Iterable[PromptItem]) -> Path:
    """Write ``items`` as JSONL (template, fields and targets kept; atomic)."""
    lines = []
    for it in items:
        d: dict[str, Any] = {"id": it.id, "prompt": it.prompt}
        if it.template is not None:
            d["template"] = it.template
        if it.targets:
            d["targets"] = list(it.targets)
        if it.fields:
            d["fields"] = dict(it.fields)
        lines.append(json.dumps(d, ensure_ascii=False))
    return atomic_write_text(path, "\n".join(lines) + "\n")


# ---- the generator --------------------------------------------------------------------------------
def _combinations(fields_: Mapping[str, Sequence[str]], combine: str, distinct: bool) -> list[dict[str, str]]:
    names = list(fields_)
    if combine == "zip":
        lengths = {k: len(v) for k, v in fields_.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"combine='zip' needs field lists of one length; got {lengths}")
        rows = [dict(zip(names, vals)) for vals in zip(*fields_.values())]
    else:
        rows = [dict(zip(names, vals)) for vals in itertools.product(*fields_.values())]
        if distinct:
            rows = [r for r in rows if len(set(r.values())) == len(r)]
    return rows


def _format_id(id_format: str, i: int, values: Mapping[str, str]) -> str:
    try:
        return id_format.format(i=i, **{k: v.strip() for k, v in values.items()})
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"id format {id_format!r}: {exc!r}; allowed: a format of {{i}} and the field names") from None


def generate_prompt_set(
    template: str,
    fields: Mapping[str, Sequence[str]],
    targets: Sequence[str] = (),
    config: PromptSetConfig | None = None,
    id_format: str = "p{i:04d}",
) -> list[PromptItem]:
    """Fill ``template`` from the field lists (``config.combine``: every combination or side by side),
    with ``targets`` templates (e.g. ``" {A}"``: the expected answer) filled from the same values.
    ``config.limit`` draws that many at random (``config.seed``), kept in generation order."""
    cfg = config or PromptSetConfig()
    if not isinstance(fields, Mapping) or not fields:
        raise ConfigError("fields: give at least one field with a list of values")
    for k, v in fields.items():
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"field {k!r}: {v!r}; allowed: a non-empty list of strings")
    used = {name for _, name in _placeholders(template, "template") if name}
    for t in targets:
        used |= {name for _, name in _placeholders(t, "target") if name}
    missing = sorted(used - set(fields))
    if missing:
        raise ConfigError(f"template field {{{missing[0]}}} is not filled; fields given: {', '.join(sorted(fields))}")
    rows = _combinations(fields, cfg.combine, cfg.distinct)
    if not rows:
        raise ConfigError("the field lists give no prompts (with distinct, product needs values that differ)")
    if cfg.limit is not None and cfg.limit < len(rows):
        keep = sorted(random.Random(cfg.seed).sample(range(len(rows)), cfg.limit))
        rows = [rows[i] for i in keep]
    items = []
    for i, values in enumerate(rows):
        text, spans = fill_template(template, values)
        tg = tuple(fill_template(t, values, "target")[0] for t in targets)
        items.append(PromptItem(_format_id(id_format, i, values), text, tg, values, spans, 0, template))
    return items


def load_template_spec(path: str | Path) -> tuple[str, dict[str, list[str]], list[str], PromptSetConfig, str]:
    """A template file (JSON): ``template``, ``fields`` ({name: [values]}), optional ``targets``
    (templates), ``combine``, ``distinct``, ``limit``, ``seed``, ``id`` (a format with ``{i}`` and field
    names). Returns (template, fields, targets, config, id format)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"TEMPLATE {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TEMPLATE {str(path)!r}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"TEMPLATE {str(path)!r}: allowed: a JSON object with keys {', '.join(SPEC_KEYS)}")
    bad = sorted(set(d) - set(SPEC_KEYS))
    if bad:
        raise ConfigError(f"TEMPLATE {str(path)!r}: unknown key {bad[0]!r}; allowed: {', '.join(SPEC_KEYS)}")
    if not isinstance(d.get("template"), str) or not d["template"].strip():
        raise ConfigError(f"TEMPLATE {str(path)!r}: 'template' must be a non-empty string")
    targets = d.get("targets", [])
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"TEMPLATE {str(path)!r}: targets={targets!r}; allowed: a string or a list of strings")
    base = PromptSetConfig()
    cfg = PromptSetConfig(combine=d.get("combine", base.combine), distinct=bool(d.get("distinct", base.distinct)),
                          limit=d.get("limit", base.limit), seed=int(d.get("seed", base.seed)))
    id_format = str(d.get("id", "p{i:04d}"))
    return d["template"], d.get("fields") or {}, targets, cfg, id_format


# ---- positions --------------------------------------------------------------------------------------
def token_positions(item: PromptItem, tokenize: Callable[[str], Sequence[int]]) -> dict[str, int]:
    """The token position of every field occurrence: ``NAME`` (the first), ``NAME#2``, … Each is the
    last token of the occurrence: the length of the tokenized prefix ending at the occurrence, minus 1.
    An occurrence whose end falls inside a token (the prefix does not tokenize as the full prompt's
    first tokens) is an error naming the field."""
    full = list(tokenize(item.prompt))
    out: dict[str, int] = {}
    for name, spans in item.spans.items():
        for k, (_, end) in enumerate(spans, 1):
            pre = list(tokenize(item.prompt[:end]))
            if full[: len(pre)] != pre:
                raise ConfigError(f"prompt {item.id!r}: field {name}={item.fields.get(name)!r} ends inside a token; "
                                  "its position is undefined (put a space or punctuation after it)")
            out[name if k == 1 else f"{name}#{k}"] = len(pre) - 1
    return out


def role_position(role: str, positions: Mapping[str, int], n_tokens: int, where: str) -> int:
    """The token position of a role: a field occurrence (``NAME``, ``NAME#2``) or ``end-K`` (K ≥ 1;
    ``end-1`` is the last token)."""
    m = _ROLE_END.match(role)
    if m:
        k = int(m.group(1))
        if not 1 <= k <= n_tokens:
            raise ConfigError(f"{where}: role {role!r}; allowed: end-1 .. end-{n_tokens} for this prompt")
        return n_tokens - k
    if role not in positions:
        allowed = ", ".join(sorted(positions) + ["end-K"])
        raise ConfigError(f"{where}: role {role!r}; allowed: {allowed}")
    return positions[role]
