"""Transcoders: per-layer sparse replacements of MLPs, their files, harvesting activations from a
model, training, evaluation and metrics.

The names below are imported on first use (PEP 562), so that torch-free modules of the package
(``data``) and ``sparsetrace --help`` do not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_transcoders": ".io",
    "save_transcoders": ".io",
    "Transcoder": ".model",
    "TranscoderSet": ".model",
    "TranscoderSetConfig": ".model",
    "CrossLayerTranscoder": ".clt",
    "CrossLayerTranscoderConfig": ".clt",
    "load_clt": ".clt_io",
    "save_clt": ".clt_io",
    "import_circuit_tracer_clt": ".clt_io",
    "export_circuit_tracer_clt": ".clt_io",
    "TrainConfig": "sparsetrace.config",
    "build_corpus": ".data",
    "open_corpus": ".data",
    "train_transcoders": ".training",
    "evaluate_transcoders": ".evaluate",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
