"""Hooks exist only inside a context manager that removes them in ``finally`` (docs/design.md §2)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

from torch import nn

HookSpec = tuple[nn.Module, str, Callable]
"""(module, kind, fn): kind ``"forward"`` (fn(module, args, output) → output or None) or ``"pre"``
(fn(module, args, kwargs) → (args, kwargs) or None; registered with ``with_kwargs=True``)."""


@contextlib.contextmanager
def hooks(specs: Sequence[HookSpec]) -> Iterator[None]:
    handles = []
    try:
        for module, kind, fn in specs:
            if kind == "forward":
                handles.append(module.register_forward_hook(fn))
            elif kind == "pre":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                raise ValueError(f"hook kind {kind!r}; allowed: forward, pre")
        yield
    finally:
        for h in handles:
            h.remove()
