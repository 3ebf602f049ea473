"""Shared pieces of the CLI tests: a runner and a file listing to prove that nothing partial remains."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from sparsetrace.cli import main


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False, prog_name="sparsetrace")


def files_under(root: Path) -> set[str]:
    """Every path under ``root`` (hidden temp files included)."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}


def one_line_error(result, code: int, *fragments: str) -> str:
    """The run failed with ``code``, printed exactly one line ``Error: …`` containing every fragment, and
    no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    text = result.output.strip()
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("Error: "), text
    for f in fragments:
        assert f in text, (f, text)
    return text
