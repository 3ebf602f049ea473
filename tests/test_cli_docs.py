"""docs/cli.md is generated from --help and must be up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gen_cli_docs.py"


def test_cli_docs_are_current():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.DOC.is_file(), "docs/cli.md is missing; run: python scripts/gen_cli_docs.py"
    assert mod.DOC.read_text(encoding="utf-8") == mod.render(), "docs/cli.md is stale; run: python scripts/gen_cli_docs.py"
