"""Steering from specs: intervention options with positions, decoding beside an unsteered baseline,
sweeps of a value with a metric, and the run record (docs/design.md §16).

An intervention spec is what a command-line option holds, e.g. ``--add 12:*+gen:345=8``:

=================  ==================  ==============================================
option             form                effect
=================  ==================  ==============================================
``--set``          ``L:POS:F=V``       clamp feature F of layer L at V
``--scale``        ``L:POS:F=X``       clamp it at X × its clean activation
``--ablate``       ``L:POS:F``         clamp it at 0
``--add``          ``L:POS:F=α``       add α · its decoder row to the MLP output
``--scale-error``  ``L:POS=X``         scale the error node of layer L by X
``--scale-token``  ``POS=X``           scale the token embedding by X
=================  ==================  ==============================================

``POS`` is one prompt position ``P`` (negative counts from the end), an inclusive range ``A..B``
(either end may be left out: ``3..`` to the end, ``..-2``; negative ends count from the end), or
``*`` (every prompt position). A ``+gen`` suffix also applies the intervention at every generated
token (``*+gen``: everywhere), and ``gen`` alone applies it at generated tokens only. Generated
positions take feature options only; there a ``--scale`` multiplies the live activation (there is no
clean run). A position outside the prompt or a range that selects nothing is an error.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from sparsetrace._atomic import atomic_write
from sparsetrace.config import MODES, STEERING_METRICS, SteeringConfig
from sparsetrace.errors import ConfigError

from .interventions import TOKEN_LAYER, Intervention, generate, intervene_batch

__all__ = [
    "OPTIONS",
    "Positions",
    "Spec",
    "Metric",
    "Decoding",
    "parse_positions",
    "parse_spec",
    "parse_values",
    "parse_metric",
    "check_specs",
    "build",
    "steer",
    "record",
    "record_name",
    "save_record",
    "save_sweep_plot",
]

RECORD_FORMAT = "sparsetrace.steering/1"
POS_FORM = "P, A..B (inclusive), *, each with an optional +gen, or gen"


@dataclass(frozen=True)
class _Option:
    kind: str  # feature, error, token
    op: str  # set, scale, add
    form: str
    value_name: str | None  # None: the option takes no value (--ablate)


OPTIONS: dict[str, _Option] = {
    "--set": _Option("feature", "set", "L:POS:F=V", "V"),
    "--scale": _Option("feature", "scale", "L:POS:F=X", "X"),
    "--ablate": _Option("feature", "set", "L:POS:F", None),
    "--add": _Option("feature", "add", "L:POS:F=α", "α"),
    "--scale-error": _Option("error", "scale", "L:POS=X", "X"),
    "--scale-token": _Option("token", "scale", "POS=X", "X"),
}
"""The intervention options, their forms and what they do (see the module docstring)."""


# ---- positions --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Positions:
    """A parsed ``POS``: ``first``/``last`` are the inclusive ends (``None``: open end); ``kind`` is
    ``"one"``, ``"range"``, ``"all"`` or ``"none"`` (generated tokens only)."""

    text: str
    kind: str
    first: int | None = None
    last: int | None = None
    generated: bool = False

    def resolve(self, n_prompt: int, where: str) -> list[int]:
        """The absolute prompt positions of a ``n_prompt``-token prompt (ascending)."""
        allowed = f"allowed: {-n_prompt}..{n_prompt - 1} for the {n_prompt}-token prompt ({POS_FORM})"
        if self.kind == "none":
            return []
        if self.kind == "all":
            return list(range(n_prompt))

        def absolute(p: int) -> int:
            q = p + n_prompt if p < 0 else p
            if not 0 <= q < n_prompt:
                raise ConfigError(f"{where}: position {p} is beyond the prompt; {allowed}")
            return q

        if self.kind == "one":
            return [absolute(self.first)]
        a = 0 if self.first is None else absolute(self.first)
        b = n_prompt - 1 if self.last is None else absolute(self.last)
        if a > b:
            raise ConfigError(
                f"{where}: the range {self.text.removesuffix('+gen')} is empty (positions {a}..{b}; A..B includes both "
                f"ends, A must come before B); {allowed}"
            )
        return list(range(a, b + 1))


_INT = r"-?\d+"


def parse_positions(text: str, where: str) -> Positions:
    """``POS`` (see the module docstring) → :class:`Positions`; ``where`` names the option in errors."""
    t = text.strip()
    if t == "gen":
        return Positions(t, "none", generated=True)
    gen = t.endswith("+gen")
    body = t[: -len("+gen")] if gen else t
    if body == "*":
        return Positions(t, "all", generated=gen)
    if re.fullmatch(_INT, body):
        return Positions(t, "one", int(body), int(body), gen)
    m = re.fullmatch(rf"({_INT})?\.\.({_INT})?", body)
    if m:
        first, last = (None if g is None else int(g) for g in m.groups())
        return Positions(t, "range", first, last, gen)
    raise ConfigError(f"{where}: position {text!r}; allowed: {POS_FORM}")


# ---- specs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One parsed intervention option. ``value`` None: the value comes from a sweep."""

    option: str
    text: str
    layer: int
    positions: Positions
    feature: int | None
    value: float | None

    @property
    def kind(self) -> str:
        return OPTIONS[self.option].kind

    @property
    def op(self) -> str:
        return OPTIONS[self.option].op

    def label(self, value: float | None = None) -> str:
        """The spec as an option, with ``value`` filled in when it is swept."""
        v = self.value if value is None else value
        if OPTIONS[self.option].value_name is None or v is None:
            return f"{self.option} {self.text}"
        return f"{self.option} {self.text}={v:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"option": self.option, "spec": self.text, "kind": self.kind, "op": self.op,
                "layer": None if self.kind == "token" else self.layer, "positions": self.positions.text,
                "generated": self.positions.generated, "feature": self.feature, "value": self.value}


def _finite(text: str, what: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {what}={text!r} is not a number; allowed: a finite number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{where}: {what}={text!r}; allowed: a finite number")
    return v


def parse_spec(option: str, text: str, *, swept: bool = False) -> Spec:
    """One option's text → :class:`Spec`. ``swept``: a value may be left out (a sweep fills it in)."""
    if option not in OPTIONS:
        raise ConfigError(f"option {option!r}; allowed: {', '.join(OPTIONS)}")
    o = OPTIONS[option]
    where = f"{option} {text}"
    form = f"allowed form: {o.form} with POS = {POS_FORM}"
    key, value = text, None
    if o.value_name is None:
        if "=" in text:
            raise ConfigError(f"{where}: takes no value; {form}")
        value = 0.0
    elif "=" in text:
        key, val = text.rsplit("=", 1)
        value = _finite(val, o.value_name, where)
    elif not swept:
        raise ConfigError(f"{where}: no value; {form} (a value may be left out only with --sweep)")
    parts = key.split(":")
    n = 1 if o.kind == "token" else (2 if o.kind == "error" else 3)
    if len(parts) != n:
        raise ConfigError(f"{where}: {len(parts)} field(s); {form}")
    pos = parse_positions(parts[0 if o.kind == "token" else 1], where)
    try:
        layer = TOKEN_LAYER if o.kind == "token" else int(parts[0])
        feature = int(parts[2]) if o.kind == "feature" else None
    except ValueError:
        raise ConfigError(f"{where}: layer and feature must be integers; {form}") from None
    if layer < TOKEN_LAYER or (o.kind != "token" and layer < 0) or (feature is not None and feature < 0):
        raise ConfigError(f"{where}: negative layer or feature; {form}")
    if pos.generated and o.kind != "feature":
        raise ConfigError(f"{where}: generated positions (+gen, gen) take feature options only "
                          "(--set, --scale, --ablate, --add)")
    return Spec(option, key, layer, pos, feature, value)


def parse_values(text: str, where: str = "--sweep") -> tuple[float, ...]:
    """``1,2.5,-4`` → finite floats (at least one)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"{where} {text!r}: no value; allowed: comma-separated finite numbers, e.g. 0,2,4,8")
    return tuple(_finite(x, "value", f"{where} {text}") for x in items)


def check_specs(specs: Sequence[Spec], n_layers: int, n_features: int, swept: bool = False) -> None:
    """Layers and features inside the set; with ``swept``, at least one spec waits for the sweep value."""
    for s in specs:
        if s.kind != "token" and s.layer >= n_layers:
            raise ConfigError(f"{s.label()}: layer {s.layer}; allowed: 0..{n_layers - 1}")
        if s.feature is not None and s.feature >= n_features:
            raise ConfigError(
                f"{s.label()}: feature {s.feature} in an intervention; allowed: 0..{n_features - 1} "
                "(the set's width)"
            )
    if swept and not any(s.value is None for s in specs):
        raise ConfigError("--sweep: no option to sweep; give one without its value, e.g. --add 5:*+gen:12 --sweep 0,4,8")


def build(specs: Sequence[Spec], n_prompt: int, value: float | None = None) -> tuple[list[Intervention], list[Intervention]]:
    """The interventions of ``specs`` on a ``n_prompt``-token prompt: (at prompt positions, at every
    generated position). Specs without a value take ``value``."""
    prompt, gen = [], []
    for s in specs:
        v = s.value if s.value is not None else value
        if v is None:
            raise ConfigError(f"{s.option} {s.text}: no value and no sweep value")
        pos = s.positions.resolve(n_prompt, s.label(v))
        if pos:
            prompt.append(Intervention(s.layer, slice(pos[0], pos[-1] + 1), s.feature, v, s.op))
        if s.positions.generated:
            gen.append(Intervention(s.layer, slice(None), s.feature, v, s.op))
    return prompt, gen


# ---- metric and decoding ----------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """What is measured at the last prompt position (see ``STEERING_METRICS``)."""

    kind: str
    tokens: tuple[int, ...]
    labels: tuple[str, ...]

    @property
    def name(self) -> str:
        q = [repr(x) for x in self.labels]
        if self.kind == "logit":
            return f"logit {q[0]} (demeaned)"
        if self.kind == "logit-diff":
            return f"logit {q[0]} − logit {q[1]}"
        return f"p({' + '.join(q)})"

    def of(self, logits, probabilities) -> float:
        """The metric from [V] logits (pre-softcap) and probabilities; ``logit`` is demeaned."""
        if self.kind == "logit":
            return float(logits[self.tokens[0]] - logits.mean())
        if self.kind == "logit-diff":
            return float(logits[self.tokens[0]] - logits[self.tokens[1]])
        return float(sum(probabilities[t] for t in self.tokens))

    def or_token(self, token: int, label: str) -> "Metric":
        """This metric, reading ``token`` when it was given none."""
        return self if self.tokens else Metric(self.kind, (token,), (label,))


def parse_metric(kind: str, tokens: str | None, lm) -> Metric:
    """``--metric`` and ``--metric-tokens`` (comma-separated token strings, each exactly one token, or
    ``#ID``). Without tokens the metric has none yet: :meth:`Metric.or_token` fills in the clean top token."""
    if kind not in STEERING_METRICS:
        raise ConfigError(f"--metric {kind!r}; allowed: {', '.join(STEERING_METRICS)}")
    vocab = int(lm.adapter.unembedding(lm.model).shape[0])
    ids = [_token_id(item, lm, vocab) for item in tokens.split(",")] if tokens is not None else []
    need = {"logit": 1, "logit-diff": 2}.get(kind)
    if ids and need is not None and len(ids) != need:
        raise ConfigError(f"--metric-tokens {tokens!r}: {len(ids)} token(s); allowed: {need} for --metric {kind}")
    if not ids and kind == "logit-diff":
        raise ConfigError("--metric logit-diff needs --metric-tokens A,B (two tokens)")
    return Metric(kind, tuple(ids), tuple(lm.token_strings(ids)))


def _token_id(item: str, lm, vocab: int) -> int:
    if re.fullmatch(r"#\d+", item.strip()):
        t = int(item.strip()[1:])
        if t >= vocab:
            raise ConfigError(f"--metric-tokens {item!r}: token id {t}; allowed: 0..{vocab - 1}")
        return t
    if lm.tokenizer is None:
        raise ConfigError(f"--metric-tokens {item!r}: this model has no tokenizer; allowed: ids as #ID")
    ids = lm.tokenizer.encode(item, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"--metric-tokens {item!r} is {len(ids)} tokens {lm.token_strings(ids)}; allowed: "
                          "strings of exactly one token (mind the leading space) or #ID")
    return int(ids[0])


@dataclass(frozen=True)
class Decoding:
    """How continuations are decoded: greedy when ``temperature`` is 0, else sampled from seeds
    ``seed``, ``seed + 1``, … (``samples`` of them); the baseline uses the same seeds."""

    max_new_tokens: int = SteeringConfig.max_new_tokens
    temperature: float = SteeringConfig.temperature
    top_p: float = SteeringConfig.top_p
    top_k: int = SteeringConfig.top_k
    samples: int = SteeringConfig.samples
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature {self.temperature}; allowed: a finite number ≥ 0 (0: greedy)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"--top-p {self.top_p}; allowed: a number in (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k}; allowed: ≥ 0 (0: all tokens)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens}; allowed: ≥ 1")
        if self.samples < 1:
            raise ConfigError(f"--samples {self.samples}; allowed: ≥ 1")
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError(f"--samples {self.samples} with --temperature 0 (greedy gives one text); "
                              "allowed: --samples 1, or a temperature > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.samples)]

    def to_dict(self) -> dict[str, Any]:
        return {"greedy": self.greedy, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "samples": self.samples, "seeds": self.seeds}


def _continue(prompt, lm, ts, prompt_ivs, gen_ivs, dec: Decoding, seed: int):
    return generate(
        prompt, lm, ts, prompt_ivs, generated=gen_ivs, max_new_tokens=dec.max_new_tokens,
        do_sample=not dec.greedy, temperature=dec.temperature or 1.0, top_k=dec.top_k or None,
        top_p=dec.top_p, seed=seed,
    )


# ---- a run ------------------------------------------------------------------------------------
def steer(
    prompt,
    lm,
    transcoders,
    specs: Sequence[Spec],
    *,
    decoding: Decoding = Decoding(),
    metric_kind: str = SteeringConfig.metric,
    metric_tokens: str | None = None,
    sweep: Sequence[float] | None = None,
    mode: str = SteeringConfig.mode,
) -> dict[str, Any]:
    """Run the specs on ``prompt``: the metric at the last prompt position (clean and steered, in
    ``mode``), continuations with and without the interventions from the same seeds and, with
    ``sweep``, the metric and one continuation (the first seed) per swept value. Returns the run's
    outputs as a JSON-ready dict (:func:`record` adds what identifies the run)."""
    from .interventions import _prompt_ids

    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}; allowed: {', '.join(MODES)}")
    if not specs:
        raise ConfigError("no intervention given; use --add, --set, --scale, --ablate, --scale-error or --scale-token")
    check_specs(specs, lm.n_layers, transcoders.n_features, swept=sweep is not None)
    if sweep is None and any(s.value is None for s in specs):
        raise ConfigError(f"{specs[0].option} {specs[0].text}: no value; a value may be left out only with --sweep")
    metric = parse_metric(metric_kind, metric_tokens, lm)
    ids = _prompt_ids(prompt, lm)
    n = int(ids.numel())
    values = list(sweep) if sweep is not None else [None]
    built = [build(specs, n, v) for v in values]  # every position checked before any model run
    runs = intervene_batch(ids, lm, transcoders, [p for p, _ in built], mode=mode)
    clean_top = int(runs[0].clean_logits.argmax())
    metric = metric.or_token(clean_top, lm.token_strings([clean_top])[0])
    clean_metric = metric.of(runs[0].clean_logits, runs[0].clean_probabilities)
    baseline = [_continue(ids, lm, transcoders, [], [], decoding, s) for s in decoding.seeds]
    out: dict[str, Any] = {
        "prompt_ids": [int(i) for i in ids.tolist()],
        "prompt_tokens": lm.token_strings(ids.tolist()),
        "interventions": [s.to_dict() for s in specs],
        "mode": mode,
        "decoding": decoding.to_dict(),
        "metric": {"kind": metric.kind, "name": metric.name, "tokens": list(metric.tokens),
                   "labels": list(metric.labels), "clean": clean_metric},
    }
    if sweep is None:
        (p_ivs, g_ivs), res = built[0], runs[0]
        steered = [_continue(ids, lm, transcoders, p_ivs, g_ivs, decoding, s) for s in decoding.seeds]
        out["metric"]["steered"] = metric.of(res.logits, res.probabilities)
        out["samples"] = [_pair(s, b, t) for s, b, t in zip(decoding.seeds, baseline, steered)]
        return out
    rows = []
    for v, (p_ivs, g_ivs), res in zip(values, built, runs):
        cont = _continue(ids, lm, transcoders, p_ivs, g_ivs, decoding, decoding.seed)
        top = int(res.probabilities.argmax())
        rows.append({"value": v, "metric": metric.of(res.logits, res.probabilities),
                     "top_token": lm.token_strings([top])[0], "top_probability": float(res.probabilities[top]),
                     "continuation": cont.text, "continuation_ids": list(cont.new_ids)})
    out["samples"] = [_pair(s, b, None) for s, b in zip(decoding.seeds, baseline)]
    out["sweep"] = {"swept": [s.label() for s in specs if s.value is None], "values": values, "rows": rows}
    return out


def _pair(seed: int, base, steered) -> dict[str, Any]:
    d = {"seed": seed, "baseline": base.text, "baseline_ids": list(base.new_ids)}
    if steered is not None:
        d.update(steered=steered.text, steered_ids=list(steered.new_ids))
    return d


def record(outputs: Mapping[str, Any], *, prompt: str | None, model: Mapping[str, Any],
           transcoders: Mapping[str, Any], created: datetime.datetime | None = None) -> dict[str, Any]:
    """The run record: what was steered and how, on which model and set, the seeds and the outputs."""
    created = created or datetime.datetime.now(datetime.timezone.utc)
    return {"format": RECORD_FORMAT, "kind": "steering", "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "prompt": prompt, "model": dict(model), "transcoders": dict(transcoders), **outputs,
            "evidence": "causal (intervention on the real model)"}


def record_name(rec: Mapping[str, Any]) -> str:
    """``steer-<UTC time>-<6 hex of the record's content>`` (no suffix)."""
    digest = hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:6]
    stamp = str(rec.get("created", "")).replace("-", "").replace(":", "")
    return f"steer-{stamp}-{digest}"


def save_record(path: str | Path, rec: Mapping[str, Any]) -> Path:
    """Atomic JSON write of a run record."""
    text = json.dumps(rec, indent=1, ensure_ascii=False, allow_nan=False)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def save_sweep_plot(path: str | Path, rec: Mapping[str, Any], dpi: int = SteeringConfig.plot_dpi) -> Path:
    """A PNG of a sweep: the metric against the swept value (the clean value dashed), and the
    continuation of each value beneath it. Atomic write."""
    fig = _sweep_figure(rec)
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _clip(text: str | None, n: int) -> str:
    t = " ".join((text or "").split())
    return t if len(t) <= n else t[: n - 1] + "…"


def _sweep_figure(rec: Mapping[str, Any]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sw, metric = rec["sweep"], rec["metric"]
    rows = sw["rows"]
    xs, ys = [r["value"] for r in rows], [r["metric"] for r in rows]
    base = rec["samples"][0] if rec.get("samples") else {}
    lines = [f"{'baseline':>9}  {_clip(_text_of(base, 'baseline'), 100)}"]
    lines += [f"{r['value']:>9g}  {_clip(_text_of(r, 'continuation'), 100)}" for r in rows]
    text_h, plot_h, margin = 0.17 * len(lines) + 0.25, 2.8, 0.55  # inches
    height = text_h + margin + plot_h + 0.4
    fig = Figure(figsize=(9, height))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.09, (text_h + margin) / height, 0.88, plot_h / height))
    ax.plot(xs, ys, marker="o", color="tab:blue", lw=1.5, label="steered")
    ax.axhline(metric["clean"], color="0.4", ls="--", lw=1, label=f"unsteered ({metric['clean']:.3g})")
    ax.set_xlabel("swept value of " + ", ".join(sw["swept"]), fontsize=9)
    ax.set_ylabel(metric["name"], fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    prompt = rec.get("prompt") or "".join(rec.get("prompt_tokens", []))
    ax.set_title(f"steering sweep on {_clip(prompt, 60)!r} (metric: {rec.get('mode')} mode, last prompt position)",
                 fontsize=10)
    ax.tick_params(labelsize=8)
    fig.text(0.02, 0.1 / height, "continuation (first seed)\n" + "\n".join(lines), family="monospace",
             fontsize=7.5, va="bottom")
    return fig


def _text_of(d: Mapping[str, Any], key: str) -> str:
    text = d.get(key)
    return text if text is not None else " ".join(str(i) for i in d.get(f"{key}_ids", []))
