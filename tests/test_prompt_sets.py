"""Prompt-set files and the template generator (tracer/prompt_sets.py): parsing, spans, token positions,
roles, and a one-line error for every bad input the issue names; the ``prompts`` command."""

from __future__ import annotations

import json

import pytest

from sparsetrace.config import PromptSetConfig
from sparsetrace.errors import ConfigError
from sparsetrace.tracer.prompt_sets import (
    fill_template,
    generate_prompt_set,
    load_prompt_set,
    parse_prompt_set,
    role_position,
    token_positions,
    write_prompt_set,
)

from _cli_common import files_under, one_line_error, run

IOI = "When {A} and {B} went to the store, {B} gave a drink to"


def words(text: str) -> list[int]:
    """A toy tokenizer: one token per space-separated word, a BOS first (ids are word hashes)."""
    return [0] + [hash(w) % 1000 + 1 for w in text.split()]


def test_fill_template_spans_every_occurrence():
    text, spans = fill_template(IOI, {"A": "Mary", "B": "John"})
    assert text == "When Mary and John went to the store, John gave a drink to"
    assert [text[s:e] for s, e in spans["B"]] == ["John", "John"] and len(spans["A"]) == 1
    assert fill_template("{{x}} {A}", {"A": "y"}) == ("{x} y", {"A": ((4, 5),)})


def test_generator_product_distinct_targets_and_limit():
    items = generate_prompt_set(IOI, {"A": ["Mary", "John", "Tom"], "B": ["Mary", "John", "Tom"]}, [" {A}", " {B}"])
    assert len(items) == 6 and all(it.fields["A"] != it.fields["B"] for it in items)
    assert items[0].targets == (" Mary", " John") and items[0].template == IOI
    assert len({it.id for it in items}) == 6
    drawn = generate_prompt_set(IOI, {"A": ["Mary", "John", "Tom"], "B": ["Mary", "John", "Tom"]}, [" {A}"],
                                PromptSetConfig(limit=3, seed=1))
    again = generate_prompt_set(IOI, {"A": ["Mary", "John", "Tom"], "B": ["Mary", "John", "Tom"]}, [" {A}"],
                                PromptSetConfig(limit=3, seed=1))
    assert [d.prompt for d in drawn] == [a.prompt for a in again] and len(drawn) == 3
    assert {d.prompt for d in drawn} <= {i.prompt for i in items}
    zipped = generate_prompt_set("The capital of {country} is", {"country": ["France", "Italy"], "capital": ["Paris", "Rome"]},
                                 [" {capital}"], PromptSetConfig(combine="zip"), "cap-{country}")
    assert [(z.id, z.prompt, z.targets) for z in zipped] == [
        ("cap-France", "The capital of France is", (" Paris",)), ("cap-Italy", "The capital of Italy is", (" Rome",))]


def test_written_set_reads_back_with_the_same_spans(tmp_path):
    items = generate_prompt_set(IOI, {"A": ["Mary", "John"], "B": ["Mary", "John"]}, [" {A}"])
    back = load_prompt_set(write_prompt_set(tmp_path / "s.jsonl", items))
    assert [b.to_dict() | {"line": 0} for b in back] == [i.to_dict() for i in items]


def test_jsonl_and_csv_forms(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"prompt": "the cat sat", "targets": " on"}\n\n'
        '{"id": "x", "prompt": "Mary met John and Mary", "fields": {"N": "Mary"}}\n')
    a = load_prompt_set(tmp_path / "a.jsonl")
    assert [(i.id, i.line, i.targets) for i in a] == [("p0001", 1, (" on",)), ("x", 3, ())]
    assert a[1].spans == {"N": ((0, 4), (18, 22))}
    (tmp_path / "b.csv").write_text('id,template,targets,A\nq1,"Hi {A},", Bob| Ann,Bob\n')
    b = load_prompt_set(tmp_path / "b.csv")
    assert (b[0].id, b[0].prompt, b[0].targets, b[0].fields, b[0].line) == ("q1", "Hi Bob,", (" Bob", " Ann"), {"A": "Bob"}, 2)


@pytest.mark.parametrize("text, fragments", [
    ('{"prompt": "a"}\n{"prompt": "b",}\n', ["line 2", "not valid JSON"]),
    ('{"template": "x {A} y", "fields": {"B": "z"}}\n', ["line 1", "{A}", "not filled"]),
    ('{"prompt": "a", "target": "b"}\n', ["line 1", "'target'", "allowed"]),
    ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', ["line 2", "repeats line 1"]),
    ('{"prompt": "x", "targets": ["", "b"]}\n', ["line 1", "targets"]),
    ('{"id": "../up", "prompt": "x"}\n', ["line 1", "'../up'"]),
    ('{"prompt": "x y", "fields": {"A": "z"}}\n', ["line 1", "A='z'", "does not occur"]),
    ('{"template": "x {A}", "prompt": "x b", "fields": {"A": "a"}}\n', ["line 1", "differs"]),
    ('[1, 2]\n', ["line 1", "JSON object"]),
    ("\n", ["no prompts"]),
])
def test_bad_jsonl_names_the_line(text, fragments):
    with pytest.raises(ConfigError) as exc:
        parse_prompt_set(text, "jsonl", "s.jsonl")
    msg = str(exc.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


@pytest.mark.parametrize("text, fragments", [
    ("id,text\na,b\n", ["line 1", "no 'prompt' or 'template'"]),
    ("prompt,A\nhello A,A\nbye,B,C\n", ["line 3", "3 columns"]),
    ("template,A\nhi {B},x\n", ["line 2", "{B}", "not filled"]),
])
def test_bad_csv_names_the_line(text, fragments):
    with pytest.raises(ConfigError) as exc:
        parse_prompt_set(text, "csv", "s.csv")
    assert all(f in str(exc.value) for f in fragments), str(exc.value)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"template": "x {C}", "fields": {"A": ["a"]}}, "{C}"),
    ({"template": "x {A}", "fields": {"A": ["a"]}, "targets": [" {Z}"]}, "{Z}"),
    ({"template": "x {A}", "fields": {"A": []}}, "non-empty list"),
    ({"template": "x {A} {B}", "fields": {"A": ["a", "b"], "B": ["c"]}, "config": PromptSetConfig(combine="zip")}, "one length"),
    ({"template": "x {A} {B}", "fields": {"A": ["a"], "B": ["a"]}}, "no prompts"),
    ({"template": "x {A:>3}", "fields": {"A": ["a"]}}, "no format specs"),
])
def test_generator_bad_input(kwargs, fragment):
    with pytest.raises(ConfigError) as exc:
        generate_prompt_set(**kwargs)
    assert fragment in str(exc.value)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="combine='both'"):
        PromptSetConfig(combine="both")
    with pytest.raises(ConfigError, match="limit=0"):
        PromptSetConfig(limit=0)


def test_token_positions_and_roles():
    items = generate_prompt_set(IOI, {"A": ["Mary"], "B": ["John"]})
    pos = token_positions(items[0], words)
    # tokens: BOS When Mary and John went to the store, John gave a drink to
    assert pos == {"A": 2, "B": 4, "B#2": 9}
    assert role_position("B#2", pos, 14, "h") == 9 and role_position("end-1", pos, 14, "h") == 13
    with pytest.raises(ConfigError, match="role 'C'; allowed: A, B, B#2, end-K"):
        role_position("C", pos, 14, "h")
    with pytest.raises(ConfigError, match="end-1 .. end-14"):
        role_position("end-15", pos, 14, "h")


def test_field_ending_inside_a_token_is_an_error():
    item = generate_prompt_set("x {A}y z", {"A": ["ab"]})[0]
    with pytest.raises(ConfigError, match="field A='ab' ends inside a token"):
        token_positions(item, words)


def test_prompts_command(tmp_path):
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"template": IOI, "fields": {"A": ["Mary", "John", "Tom"], "B": ["Mary", "John", "Tom"]},
                                "targets": [" {A}", " {B}"], "id": "ioi-{A}-{B}"}))
    r = run("prompts", spec, "--out", tmp_path / "s.jsonl", "--limit", "4", "--json", "-q")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    items = load_prompt_set(tmp_path / "s.jsonl")
    assert data["prompts"] == len(items) == 4 and items[0].id.startswith("ioi-")
    spec.write_text(json.dumps({"template": "x {A}", "fields": {"B": ["b"]}}))
    one_line_error(run("prompts", spec, "--out", tmp_path / "bad.jsonl"), 2, "{A}", "not filled")
    spec.write_text('{"template": "x {A}", "fields": {"A": ["a"]}, "colour": 1}')
    one_line_error(run("prompts", spec, "--out", tmp_path / "bad.jsonl"), 2, "'colour'")
    assert "bad.jsonl" not in files_under(tmp_path)
