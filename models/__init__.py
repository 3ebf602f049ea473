"""Models: loading a causal LM (HF name, folder or GGUF; the embedded models and the model cache), its architecture
adapter, and the forward hooks every other package uses to read or replace MLPs.

The names below are imported on first use (PEP 562), so that ``sparsetrace --help`` does not pay for
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_model": ".loading",
    "LoadedModel": ".loading",
    "fetch_default_model": ".loading",
    "fetch_model": ".cache",
    "cached_gguf": ".cache",
    "cache_dir": ".cache",
    "collect_mlp_io": ".loading",
    "splice_mlps": ".loading",
    "hooks": ".hooks",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
