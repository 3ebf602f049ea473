"""Drawing a :class:`~sparsetrace.graphs.figure.Figure` for print: layout in inches, then matplotlib.

Layout: tokens along the bottom (one column per position), error nodes in one row just above them (they
are sources, so every edge from them points up), logits along the top, every other node at the height
of its layer. Only layers holding a node get a row; adjacent rows are merged (while the
figure has more than ``max_rows``) when no drawn edge runs between them, so every edge still points up.
In a row, nodes sit as close as they can to their token's column without overlapping (1-D overlap
removal: clusters of touching boxes are centred on the mean of their desired positions). Text is
measured with the font's own metrics, wrapped to two lines and cut with "…" to fit its box.

Output: SVG with glyphs as paths and PDF with the TrueType font embedded (DejaVu Sans, shipped with
matplotlib, so the result is the same on every machine); no dates in either file, so the bytes are
deterministic. PNG at ``dpi``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from sparsetrace.errors import ConfigError

from .figure import Figure
from .graph import _atomic_write

__all__ = ["FigureLayout", "layout_figure", "figure_bytes", "draw_figure", "FORMATS"]

FORMATS = (".png", ".svg", ".pdf")
FONT = "DejaVu Sans"
COLORS = {
    "feature": "#d6e6f5",
    "supernode": "#e3d5f2",
    "error": "#e4e4e4",
    "token": "#f3efd9",
    "logit": "#fbd5a5",
}
EDGE_COLORS = {"positive": "#1f77b4", "negative": "#e6660a"}  # blue excites, orange inhibits (colour-blind safe)


@dataclass(frozen=True)
class Style:
    """Sizes in inches and points for one figure width."""

    font: float  # pt
    box_w: float
    line_h: float
    pad: float
    gap: float
    row_gap: float
    max_rows: int

    @classmethod
    def for_width(cls, width: float) -> "Style":
        if width >= 5.0:
            return cls(font=7.0, box_w=1.02, line_h=7.0 * 1.22 / 72, pad=0.045, gap=0.07, row_gap=0.17, max_rows=14)
        return cls(font=6.0, box_w=0.74, line_h=6.0 * 1.22 / 72, pad=0.035, gap=0.05, row_gap=0.14, max_rows=11)


_ADVANCE: dict[str, float] = {}


def _text_width(text: str, size: float) -> float:
    """Width in inches of ``text`` set in DejaVu Sans at ``size`` pt: the sum of the glyphs' advance
    widths from the font file (kerning ignored: a few hundredths of an inch at most)."""
    if not _ADVANCE:
        _ADVANCE[""] = 0.0
    total = 0.0
    for c in text:
        a = _ADVANCE.get(c)
        if a is None:
            a = _ADVANCE[c] = _advance(c)
        total += a
    return total * size / 72.0


def _advance(c: str) -> float:
    """Advance width of one character in ems; a character the font has no glyph for (CJK, control
    characters: large vocabularies' labels have them) counts as one em, a full-width glyph's width."""
    try:
        with _no_glyph_warnings():
            return _font().load_char(ord(c)).linearHoriAdvance / 65536 / 100
    except RuntimeError:
        return 1.0


@contextmanager
def _no_glyph_warnings() -> Iterator[None]:
    """Silences matplotlib's one-warning-per-character "Glyph … missing from font" (such characters are
    drawn as the font's empty box; a 262k-token vocabulary's labels have many)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        yield


@lru_cache(maxsize=1)
def _font():
    from matplotlib.font_manager import FontProperties, findfont, get_font

    font = get_font(findfont(FontProperties(family=FONT)))
    font.set_size(100, 72)  # advances in points at 100 pt
    return font


def fit_lines(text: str, width: float, size: float, max_lines: int = 2) -> list[str]:
    """``text`` wrapped at spaces into at most ``max_lines`` lines no wider than ``width`` inches; the
    last line is cut with "…" when the text does not fit (words longer than a line are cut too)."""
    text = " ".join(text.replace("\n", " ").split())
    words = text.split(" ") if text else [""]
    lines: list[str] = []
    cur = ""
    k = 0
    while k < len(words):
        trial = f"{cur} {words[k]}".strip()
        if _text_width(trial, size) <= width:
            cur = trial
            k += 1
            continue
        if not cur:  # one word wider than the line: cut it
            cur = _cut(words[k], width, size)
            k += 1
        lines.append(cur)
        cur = ""
        if len(lines) == max_lines:
            break
    if cur and len(lines) < max_lines:
        lines.append(cur)
    if k < len(words) and lines:  # text left over: mark the cut on the last line
        lines[-1] = _cut(lines[-1] + " " + " ".join(words[k:]), width, size)
    return lines or [""]


def _cut(text: str, width: float, size: float) -> str:
    if _text_width(text, size) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if _text_width(text[:mid].rstrip() + "…", size) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


@dataclass(frozen=True, eq=False)
class FigureLayout:
    """Box centres and sizes (inches, y up) of every unit, and the axes."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    h: np.ndarray
    lines: list[list[str]]
    """Text lines of each unit's box."""
    column_x: np.ndarray
    """float [T] centre of each token position's column."""
    rows: list[tuple[float, str]]
    """(y, name) of each layer row, bottom to top."""
    width: float
    height: float
    style: Style
    token_y: float
    rotate_tokens: bool


def _remove_overlap(desired: np.ndarray, widths: np.ndarray, gap: float, lo: float, hi: float) -> np.ndarray:
    """Left-to-right positions (centres) of boxes of ``widths`` as close to ``desired`` as possible
    without overlapping, within [lo, hi] (boxes must be sorted by ``desired``)."""
    blocks: list[list[int]] = []
    starts: list[float] = []

    def best_start(items: list[int]) -> float:
        offs = np.concatenate([[0.0], np.cumsum(widths[items] + gap)[:-1]])
        total = float(offs[-1] + widths[items[-1]])
        s = float(np.mean(desired[items] - widths[items] / 2 - offs))
        return min(max(s, lo), max(hi - total, lo))

    for i in range(len(desired)):
        blocks.append([i])
        starts.append(best_start([i]))
        while len(blocks) > 1:
            prev = blocks[-2]
            end = starts[-2] + float(np.sum(widths[prev] + gap)) - gap
            if end + gap <= starts[-1] + 1e-12:
                break
            merged = prev + blocks[-1]
            blocks[-2:] = [merged]
            starts[-2:] = [best_start(merged)]
    out = np.zeros(len(desired))
    for items, s in zip(blocks, starts):
        offs = np.concatenate([[0.0], np.cumsum(widths[items] + gap)[:-1]])
        out[items] = s + offs + widths[items] / 2
    return out


def _row_bins(fig: Figure, inner: list[int], max_rows: int) -> tuple[dict[int, int], list[list[int]]]:
    """Row of every inner unit: one per distinct (rounded) layer, then adjacent rows merged while there
    are more than ``max_rows`` and a merge puts no drawn edge inside a row (fewest nodes first)."""
    layer_of = {u: int(round(fig.units[u].layer)) for u in inner}
    levels = sorted(set(layer_of.values()))
    groups = [[lv] for lv in levels]
    edges = [(int(s), int(t)) for s, t in zip(fig.src, fig.dst) if int(s) in layer_of and int(t) in layer_of]

    def members(g: list[int]) -> set[int]:
        return {u for u in inner if layer_of[u] in g}

    while len(groups) > max_rows:
        best = None
        for k in range(len(groups) - 1):
            m = members(groups[k]) | members(groups[k + 1])
            if any(s in m and t in m for s, t in edges):
                continue
            size = len(m)
            if best is None or size < best[0]:
                best = (size, k)
        if best is None:
            break
        k = best[1]
        groups[k : k + 2] = [groups[k] + groups[k + 1]]
    row_of_level = {lv: r for r, g in enumerate(groups) for lv in g}
    return {u: row_of_level[layer_of[u]] for u in inner}, groups


def layout_figure(fig: Figure, width: float) -> FigureLayout:
    """Place every unit (module docstring)."""
    st = Style.for_width(width)
    units = fig.units
    U = len(units)
    T = len(fig.token_strings)
    left_margin = 0.36 if width >= 5 else 0.3
    right_margin = 0.06
    avail = width - left_margin - right_margin
    inner = [u for u in range(U) if units[u].kind not in ("token", "logit", "error")]
    errors = [u for u in range(U) if units[u].kind == "error"]
    tokens = [u for u in range(U) if units[u].kind == "token"]
    logits = [u for u in range(U) if units[u].kind == "logit"]

    # box sizes and text
    w = np.zeros(U)
    h = np.zeros(U)
    lines: list[list[str]] = []
    one_line = st.line_h + 2 * st.pad
    for u, unit in enumerate(units):
        if unit.kind in ("token", "logit", "error"):
            text = _token_text(unit.label) if unit.kind == "token" else unit.label
            lines.append([_cut(text, st.box_w * 1.3 - 2 * st.pad, st.font)])
            w[u] = max(_text_width(lines[-1][0], st.font) + 2 * st.pad + 0.04, 0.3)
            h[u] = one_line
        else:
            lines.append(fit_lines(unit.label, st.box_w - 2 * st.pad, st.font))
            w[u] = st.box_w
            h[u] = st.line_h * 2 + 2 * st.pad
    box_h = st.line_h * 2 + 2 * st.pad

    # columns: as wide as the most nodes one row puts at a position (at least a token's box)
    row_of, groups = _row_bins(fig, inner, st.max_rows) if inner else ({}, [])
    demand = np.zeros(T)
    for row in [errors] + [[u for u in inner if row_of[u] == r] for r in range(len(groups))]:
        wide = np.zeros(T)
        for u in row:
            wide[min(int(round(units[u].pos)), T - 1)] += w[u] + st.gap
        demand = np.maximum(demand, wide)
    tok_w = np.array([_text_width(_token_text(t), st.font) + 0.08 for t in fig.token_strings])
    need = np.maximum(np.maximum(demand, tok_w), 0.25)
    if need.sum() <= avail:
        col_w = need * (avail / need.sum())
    elif tok_w.sum() <= avail:  # every token keeps its width; the rest is shared by demand
        col_w = tok_w + (need - tok_w) * ((avail - tok_w.sum()) / (need - tok_w).sum())
    else:
        col_w = need * (avail / need.sum())
    column_x = left_margin + np.concatenate([[0.0], np.cumsum(col_w)[:-1]]) + col_w / 2
    rotate = bool(tok_w.sum() > avail + 1e-9)

    def desired_x(u: int) -> float:
        p = units[u].pos
        lo = int(np.floor(p))
        hi = min(lo + 1, T - 1)
        return float(column_x[lo] + (p - lo) * (column_x[hi] - column_x[lo]))

    x = np.zeros(U)
    y = np.zeros(U)
    # vertical: tokens, then rows of inner units (split when over-full), then logits, then the title
    caption_h = 0.0
    bottom = 0.06
    token_label_h = (0.42 if rotate else 0.0)
    token_y = bottom + token_label_h + one_line / 2
    rows_out: list[tuple[float, str]] = []
    cur = token_y + one_line / 2 + st.row_gap

    def place(members: list[int], height: float, gap_after: float) -> float:
        """Put ``members`` in one row of boxes at ``cur`` (split into interleaved rows when they do not
        fit the width); returns the y of the middle of the rows."""
        nonlocal cur
        members = sorted(members, key=lambda u: (desired_x(u), units[u].layer, units[u].key))
        n = 1
        while n < len(members) and any(np.sum(w[members[k::n]]) + st.gap * (len(members[k::n]) - 1) > avail for k in range(n)):
            n += 1
        first = cur + height / 2
        for k in range(n):
            chunk = sorted(members[k::n], key=lambda u: (desired_x(u), units[u].key))
            d = np.array([desired_x(u) for u in chunk])
            x[chunk] = _remove_overlap(d, w[chunk], st.gap, left_margin, width - right_margin)
            y[chunk] = cur + height / 2
            cur += height + (gap_after if k == n - 1 else st.row_gap / 2)
        return (first + cur - gap_after - height / 2) / 2

    # error nodes: one row just above the tokens (they are sources: every edge from them goes up)
    if errors:
        rows_out.append((place(errors, one_line, st.row_gap), "err"))
    for r, g in enumerate(groups):
        members = [u for u in inner if row_of[u] == r]
        name = f"L{g[0]}" if len(g) == 1 else f"L{g[0]}–{g[-1]}"
        rows_out.append((place(members, box_h, st.row_gap), name))
    if tokens:
        tokens.sort(key=lambda u: (units[u].pos, units[u].key))
        d = np.array([desired_x(u) for u in tokens])
        x[tokens] = d if rotate else _remove_overlap(d, w[tokens], st.gap / 2, left_margin, width - right_margin)
        y[tokens] = token_y
    if logits:
        order = sorted(logits, key=lambda u: units[u].members[0])  # logit order: most probable first
        d = np.full(len(order), float(column_x[-1]))
        x[order] = _remove_overlap(d, w[order], st.gap, left_margin, width - right_margin)
        y[order] = cur + one_line / 2
        cur += one_line
    top = cur + 0.05
    if fig.title:
        top += st.line_h * 1.3 + 0.04
    height = top + caption_h
    return FigureLayout(x=x, y=y, w=w, h=h, lines=lines, column_x=column_x, rows=rows_out, width=width,
                        height=float(height), style=st, token_y=token_y, rotate_tokens=rotate)


def _token_text(t: str) -> str:
    """A prompt token as printed: newlines and tabs visible, surrounding spaces shown as ␣ only when
    the token is nothing but whitespace."""
    t = t.replace("\n", "⏎").replace("\t", "⇥")
    return t.strip() or t.replace(" ", "␣") or "∅"


def caption(fig: Figure) -> str:
    parts = [f"{len(fig.units)} of {fig.n_graph_nodes:,} nodes"]
    if fig.scores is not None:
        parts.append(f"replacement {fig.scores.replacement:.2f}, completeness {fig.scores.completeness:.2f}")
    parts.append(f"labels: {fig.label_source}")
    return " · ".join(parts)


def figure_bytes(fig: Figure, formats: Sequence[str], width: float, dpi: int = 200,
                 show_caption: bool = True) -> dict[str, bytes]:
    """``{format: file bytes}`` of ``fig`` drawn once (formats: png, svg, pdf)."""
    bad = [f for f in formats if "." + f not in FORMATS]
    if bad:
        raise ConfigError(f"figure format {bad[0]!r}; allowed: {', '.join(x[1:] for x in FORMATS)}")
    if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi <= 0:
        raise ConfigError(f"dpi={dpi!r}; allowed: a positive integer")
    import io

    import matplotlib

    rc = {"svg.fonttype": "path", "pdf.fonttype": 42, "svg.hashsalt": "sparsetrace", "font.family": FONT,
          "path.simplify": False}
    meta = {"svg": {"Date": None, "Creator": "sparsetrace"},
            "pdf": {"CreationDate": None, "ModDate": None, "Creator": "sparsetrace", "Producer": "sparsetrace"},
            "png": {"Software": "sparsetrace"}}
    out = {}
    with matplotlib.rc_context(rc), _no_glyph_warnings():
        mfig = _draw(fig, layout_figure(fig, width), show_caption)
        for fmt in formats:
            buf = io.BytesIO()
            mfig.savefig(buf, format=fmt, dpi=dpi, metadata=meta[fmt])
            out[fmt] = buf.getvalue()
    return out


def draw_figure(fig: Figure, paths: Sequence[str | os.PathLike], width: float, dpi: int = 200,
                show_caption: bool = True) -> list[Path]:
    """Draw ``fig`` once and save it to every path (format by suffix: .png, .svg, .pdf); each file is
    written atomically, and none is written unless every format rendered."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if p.suffix.lower() not in FORMATS:
            raise ConfigError(f"figure path must end in one of {', '.join(FORMATS)}, got {str(p)!r}")
    blobs = figure_bytes(fig, sorted({p.suffix.lower()[1:] for p in paths}), width, dpi, show_caption)
    for p in paths:
        data = blobs[p.suffix.lower()[1:]]
        _atomic_write(p, lambda tmp, data=data: Path(tmp).write_bytes(data))
    return paths


def _draw(fig: Figure, lay: FigureLayout, show_caption: bool):
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.patches import FancyBboxPatch, PathPatch
    from matplotlib.path import Path as MPath

    st = lay.style
    cap = caption(fig) if show_caption else ""
    cap_lines = fit_lines(cap, lay.width - 0.1, st.font - 1, max_lines=2) if cap else []
    legend_h = (st.line_h * (len(cap_lines) + 1) + 0.06)
    H = lay.height + legend_h
    mfig = MplFigure(figsize=(lay.width, H))
    ax = mfig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, lay.width)
    ax.set_ylim(-legend_h, lay.height)
    ax.set_axis_off()
    units = fig.units

    # edges: weakest first so the strongest are on top; vertical tangents at both ends
    smax = float(fig.share.max()) if len(fig.share) else 1.0
    for e in np.argsort(fig.share, kind="stable"):
        s, t = int(fig.src[e]), int(fig.dst[e])
        x0, y0 = lay.x[s], lay.y[s] + lay.h[s] / 2
        x1, y1 = lay.x[t], lay.y[t] - lay.h[t] / 2
        if y1 <= y0:  # not upwards (a group's height is an average): leave from the side
            y0 = lay.y[s]
        dy = max(abs(y1 - y0) * 0.45, 0.08)
        path = MPath([(x0, y0), (x0, y0 + dy), (x1, y1 - dy), (x1, y1)],
                     [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4])
        color = EDGE_COLORS["positive" if fig.weight[e] >= 0 else "negative"]
        lw = 0.35 + 2.6 * float(fig.share[e]) / smax
        ax.add_patch(PathPatch(path, facecolor="none", edgecolor=color, linewidth=lw, alpha=0.75, zorder=1,
                               capstyle="butt"))

    for u, unit in enumerate(units):
        x0, y0 = lay.x[u] - lay.w[u] / 2, lay.y[u] - lay.h[u] / 2
        style = dict(linewidth=0.6, edgecolor="#4d4d4d", linestyle="-")
        if unit.kind == "supernode":
            style.update(linewidth=1.3, edgecolor="#6a3d9a")
        elif unit.kind == "error":
            style.update(linestyle=(0, (2, 1.5)), edgecolor="#7f7f7f")
        elif unit.kind == "logit":
            style.update(linewidth=0.9)
        ax.add_patch(FancyBboxPatch((x0, y0), lay.w[u], lay.h[u], boxstyle="round,pad=0,rounding_size=0.035",
                                    facecolor=COLORS[unit.kind], zorder=2, **style))
        text_color = "#555555" if unit.kind == "error" else "#111111"
        ax.text(lay.x[u], lay.y[u], "\n".join(lay.lines[u]), ha="center", va="center", fontsize=st.font,
                color=text_color, zorder=3, linespacing=1.05)
        if unit.kind == "supernode" and len(unit.members) > 1:
            ax.text(x0 + lay.w[u] - 0.015, y0 + lay.h[u] - 0.012, f"×{len(unit.members)}", ha="right", va="top",
                    fontsize=st.font - 2, color="#6a3d9a", zorder=3)

    # axes: row names on the left, prompt tokens along the bottom
    for yy, name in lay.rows:
        ax.text(0.04, yy, name, ha="left", va="center", fontsize=st.font - 1, color="#808080")
    drawn_tokens = {int(round(u.pos)) for u in units if u.kind == "token"}
    for p, t in enumerate(fig.token_strings):
        if p in drawn_tokens and not lay.rotate_tokens:
            continue
        if lay.rotate_tokens:
            ax.text(lay.column_x[p], lay.token_y - 0.12, _cut(_token_text(t), 0.55, st.font - 1), ha="right", va="top",
                    rotation=55, rotation_mode="anchor", fontsize=st.font - 1, color="#333333")
        else:
            ax.text(lay.column_x[p], lay.token_y, _token_text(t), ha="center", va="center", fontsize=st.font,
                    color="#8c8c8c")
    if fig.title:
        title = _cut(fig.title, lay.width - 0.2, st.font + 1)
        ax.text(lay.width / 2, lay.height - 0.04, title, ha="center", va="top", fontsize=st.font + 1, weight="bold")

    # legend and caption under the tokens
    yy = -0.03
    lx = 0.08
    for name, color, lw in (("excites", EDGE_COLORS["positive"], 1.6), ("inhibits", EDGE_COLORS["negative"], 1.6)):
        ax.plot([lx, lx + 0.22], [yy - st.line_h / 2] * 2, color=color, linewidth=lw)
        ax.text(lx + 0.26, yy - st.line_h / 2, name, ha="left", va="center", fontsize=st.font - 1, color="#333333")
        lx += 0.26 + _text_width(name, st.font - 1) + 0.15
    ax.text(lx, yy - st.line_h / 2, "width ∝ share of the target's input · dashed grey: errors (unexplained)",
            ha="left", va="center", fontsize=st.font - 1, color="#333333") if lay.width >= 5 else None
    for k, line in enumerate(cap_lines):
        ax.text(0.08, yy - st.line_h * (k + 1.5), line, ha="left", va="center", fontsize=st.font - 1, color="#666666")
    return mfig
