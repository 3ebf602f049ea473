#!/usr/bin/env python3
"""Generate docs/cli.md from the commands' --help (the single source of the CLI's documentation).

    python scripts/gen_cli_docs.py           # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check   # exit 1 when docs/cli.md is stale (tests/test_cli_docs.py)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = 100  # fixed, so the text does not depend on the terminal that runs the script

HEADER = """# Command line reference

Generated from `sparsetrace --help` by `scripts/gen_cli_docs.py`; do not edit by hand
(`tests/test_cli_docs.py` fails when this file is stale).

Every command accepts `--json` (one JSON object on stdout) and `--quiet` (errors only); progress bars
and messages go to stderr. Bad input gives one line `Error: …` and a non-zero exit (2 for usage
errors, 1 otherwise), and leaves no partial files.

Shell completion (bash; zsh: `zsh_source`, fish: `fish_source`):

```bash
eval "$(_SPARSETRACE_COMPLETE=bash_source sparsetrace)"
```
"""


def _context(cmd: click.Command, name: str, parent: click.Context | None) -> click.Context:
    # make_context applies the command's context_settings (e.g. -h/--help) as a real run does
    return cmd.make_context(name, [], parent=parent, resilient_parsing=True, terminal_width=WIDTH, max_content_width=WIDTH)


def _walk(cmd: click.Command, ctx: click.Context, path: list[str]):
    yield path, cmd, ctx
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            sub_ctx = _context(sub, name, ctx)
            yield from _walk(sub, sub_ctx, path + [name])


def render() -> str:
    from sparsetrace.cli import main

    root = _context(main, "sparsetrace", None)
    parts = [HEADER]
    for path, cmd, ctx in _walk(main, root, []):
        title = " ".join(["sparsetrace", *path])
        parts.append(f"## `{title}`\n\n```text\n{cmd.get_help(ctx).rstrip()}\n```\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is stale; run: python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
