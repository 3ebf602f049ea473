"""Tracing: attribute a prompt into a graph, intervene, validate, inspect features.

The names below are imported on first use (PEP 562): importing one torch-free submodule does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "AttributionConfig": "sparsetrace.config",
    "attribute": ".attribution",
    "intervene": ".interventions",
    "inspect_feature": ".features",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
