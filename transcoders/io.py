"""Transcoder set files (docs/design.md §8): a folder with ``config.json`` and ``layer_{i}.safetensors``.

safetensors only, never pickle. Writes are atomic per file (temp file + rename) and the config is written
last, so a folder with a config.json is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sparsetrace._atomic import atomic_write
from sparsetrace.errors import ConfigError, FormatError

from .model import Transcoder, TranscoderSet, TranscoderSetConfig

__all__ = ["save_transcoders", "load_transcoders", "atomic_write", "DTYPES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REQUIRED = ("W_enc", "b_enc", "W_dec", "b_dec")


def _write_json(path: Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")

    atomic_write(path, w)


def save_transcoders(ts: TranscoderSet, folder: str | os.PathLike, dtype: str | None = None) -> Path:
    """Save a set in our format; ``dtype`` (``float16``, ``bfloat16``, ``float32``) casts the weights. A
    cross-layer transcoder is saved by ``clt_io.save_clt``."""
    if getattr(ts, "cross_layer", False):  # a cross-layer transcoder has its own format (clt_io.py)
        from .clt_io import save_clt

        return save_clt(ts, folder, dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = dtype or ts.config.dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    for i, tc in enumerate(ts):
        tensors = {name: p.detach().to("cpu", DTYPES[dtype]).contiguous() for name, p in _tensors(tc).items()}
        atomic_write(folder / f"layer_{i}.safetensors", lambda tmp, t=tensors: save_file(t, tmp))
    _write_json(folder / "config.json", ts.config.replace(dtype=dtype).to_dict())
    return folder


def _tensors(tc: Transcoder) -> dict[str, torch.Tensor]:
    out = {"W_enc": tc.W_enc, "b_enc": tc.b_enc, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
    if tc.W_skip is not None:
        out["W_skip"] = tc.W_skip
    if tc.activation == "jumprelu":
        out["threshold"] = tc.threshold
    return out


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with a FormatError (not a crash) for a bad file."""
    if not path.is_file():
        raise FormatError(f"missing weights file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}") from None


def load_transcoders(
    folder: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> "TranscoderSet | CrossLayerTranscoder":
    """Load a set saved by :func:`save_transcoders`, checking every tensor's shape against the config.
    A folder holding a cross-layer transcoder (``"kind": "cross-layer"``) loads as one (``clt_io.load_clt``)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise FormatError(f"transcoder folder {str(folder)!r} does not exist")
    if not cfg_path.is_file():
        raise FormatError(f"{str(folder)!r} has no config.json: not a sparsetrace transcoder set")
    from .clt_io import is_clt_folder, load_clt

    if is_clt_folder(folder):  # a cross-layer transcoder (docs/design.md §14): same interface for the tracer
        return load_clt(folder, device=device, dtype=dtype)
    try:
        cfg = TranscoderSetConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise FormatError(f"{str(cfg_path)!r} is not a valid transcoder config: {exc}") from None
    ts = TranscoderSet.empty(cfg, dtype=dtype, device=device)
    for i, tc in enumerate(ts):
        load_layer_tensors(tc, read_safetensors(folder / f"layer_{i}.safetensors"), f"layer {i}")
    return ts


def load_layer_tensors(tc: Transcoder, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy named tensors into a transcoder, refusing missing keys and wrong shapes."""
    missing = [k for k in _REQUIRED if k not in tensors]
    if tc.W_skip is not None and "W_skip" not in tensors:
        missing.append("W_skip")
    if tc.activation == "jumprelu" and "threshold" not in tensors:
        missing.append("threshold")
    if missing:
        raise FormatError(f"{where}: missing tensors {missing}")
    with torch.no_grad():
        for name, p in _tensors(tc).items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise FormatError(f"{where}: {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
