"""Naive reference implementations kept for parity tests (docs/design.md §7)."""
