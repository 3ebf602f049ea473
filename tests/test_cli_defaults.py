"""One home per default: every ``sparsetrace`` option takes its default from a config dataclass in
``sparsetrace.config`` (docs/design.md §1), and ``--help`` never imports torch.

Three checks: the source of cli/ has no literal default (a number or a string written at an option, or a
literal list of choices); walking every command, an option named like a config field has that field's
default; and every command's ``--help`` runs without importing torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import click
import pytest

import sparsetrace.config as config
from sparsetrace.cli._main import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
CLI_FILES = sorted((ROOT / "cli").glob("*.py"))
STDOUT_MARK = "-"
_UNSET = getattr(click.core, "UNSET", None)
"""The one literal a default may be: ``-`` for standard output (a convention, not a setting)."""


def _config_defaults() -> dict[str, list]:
    """Field name → the defaults of every config dataclass field of that name."""
    out: dict[str, list] = {}
    for obj in vars(config).values():
        if isinstance(obj, type) and is_dataclass(obj) and obj.__module__ == config.__name__:
            for f in fields(obj):
                if f.default is not MISSING:
                    out.setdefault(f.name, []).append(f.default)
    return out


def _option_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            yield name, node


def _literal_defaults(path: Path) -> list[str]:
    bad = []
    for name, call in _option_calls(ast.parse(path.read_text(), str(path))):
        for kw in call.keywords:
            if kw.arg is None or "default" not in kw.arg or kw.arg == "show_default":
                continue
            v = kw.value
            if isinstance(v, ast.Constant) and isinstance(v.value, (int, float, str)) and not isinstance(v.value, bool):
                if v.value != STDOUT_MARK:
                    bad.append(f"{path.name}:{v.lineno}: {kw.arg}={v.value!r}")
        if name == "Choice" and call.args and isinstance(call.args[0], (ast.List, ast.Tuple)):
            if all(isinstance(e, ast.Constant) for e in call.args[0].elts):
                bad.append(f"{path.name}:{call.lineno}: click.Choice of a literal list")
    return bad


def test_cli_source_has_no_literal_defaults():
    bad = [b for p in CLI_FILES for b in _literal_defaults(p)]
    assert not bad, "literal defaults in cli/ (take them from sparsetrace.config):\n" + "\n".join(bad)


def test_literal_default_check_catches_one(tmp_path):
    """The source check itself fails on a literal number, string and choice list."""
    p = tmp_path / "x.py"
    p.write_text('import click\n@click.option("--n", default=64)\n@click.option("--m", type=click.Choice(["a", "b"]),'
                 ' default="a")\n@click.option("--o", default="-")\n@click.option("--q", default=None)\ndef f(): pass\n')
    assert _literal_defaults(p) == ["x.py:2: default=64", "x.py:3: default='a'", "x.py:3: click.Choice of a literal list"]


def _walk(group: click.Group, ctx: click.Context, prefix: str = ""):
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield f"{prefix}{name}", cmd
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, click.Context(cmd, parent=ctx), f"{prefix}{name} ")


def test_every_option_default_is_its_config_default():
    known = _config_defaults()
    ctx = click.Context(main)
    walked, checked = [], 0
    for path, cmd in _walk(main, ctx):
        walked.append(path)
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.default in (None, _UNSET) or p.name not in known:
                continue
            want = known[p.name]
            got = tuple(p.default) if isinstance(p.default, list) else p.default
            assert any(got == (tuple(w) if isinstance(w, list) else w) for w in want), (
                f"sparsetrace {path} --{p.name.replace('_', '-')}: default {p.default!r}, config {want!r}")
            checked += 1
    assert set(COMMANDS) <= set(walked) and checked >= 20, (walked, checked)


def test_help_never_imports_torch():
    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from sparsetrace.cli._main import COMMANDS, main\n"
        "seen = {}\n"
        "for args in [['--help']] + [[c, '--help'] for c in sorted(COMMANDS)]:\n"
        "    r = CliRunner().invoke(main, args)\n"
        "    seen[' '.join(args)] = [r.exit_code, 'torch' in sys.modules]\n"
        "print(json.dumps(seen))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(code == 0 for code, _ in seen.values()), seen
    assert not any(t for _, t in seen.values()), {k: v for k, v in seen.items() if v[1]}


@pytest.mark.parametrize("name", ["AttributionConfig", "TrainConfig", "PruneConfig", "FigureConfig", "LabelConfig"])
def test_config_module_is_torch_free(name):
    code = f"import sys; import sparsetrace.config as c; c.{name}(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", (r.stdout, r.stderr)
