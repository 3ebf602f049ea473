"""Naive reference implementations kept for parity tests (STYLE.md §7)."""
