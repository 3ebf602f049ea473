"""Importing and exporting transcoder sets in other projects' layouts (docs/design.md §8).

circuit-tracer (safety-research/circuit-tracer, ``SingleLayerTranscoder.to_safetensors`` / ``load_transcoder``):
    a folder with ``config.yaml`` (``model_name``, ``model_kind: transcoder_set``, ``feature_input_hook``,
    ``feature_output_hook``, ``transcoders``: one file per layer, optional ``activation`` / ``k``) and per
    layer a safetensors file with ``W_enc [F, d]``, ``W_dec [F, d]``, ``b_enc [F]``, ``b_dec [d]``, optional
    ``W_skip [d, d]`` (applied as x·W_skipᵀ), optional ``activation_function.threshold [F]`` (JumpReLU) and
    optional scalar ``k`` (TopK). These are our shapes; files from older tools with ``W_enc [d, F]`` are
    recognised by shape (b_enc gives F) and transposed.
sparsify (EleutherAI/sparsify ``SparseCoder.save_to_disk``): a folder per hookpoint with ``cfg.json``
    (``d_in``, ``k``, ``num_latents``, ``transcode``, ``skip_connection``, …) and ``sae.safetensors`` with
    ``encoder.weight [F, d]``, ``encoder.bias [F]``, ``W_dec [F, d]``, ``b_dec [d]``, optional
    ``W_skip [d, d]``. Its TopK is ReLU then top-k (the same code as our top-k then ReLU). When
    ``transcode`` is false (an SAE) sparsify encodes x − b_dec, which is folded into b_enc here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparsetrace.errors import ConfigError, FormatError

from .io import atomic_write, read_safetensors
from .model import Transcoder, TranscoderSet, TranscoderSetConfig

__all__ = ["import_circuit_tracer", "export_circuit_tracer", "import_sparsify", "import_sparsify_coder"]

# Where our hooks sit, in circuit-tracer's (TransformerLens) names: the MLP's normed input and its output.
CT_INPUT_HOOK = "mlp.hook_in"
CT_OUTPUT_HOOK = "hook_mlp_out"


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with transformers' dependencies
        raise FormatError("reading/writing circuit-tracer's config.yaml needs PyYAML (pip install pyyaml)") from None
    return yaml


def _oriented(W: torch.Tensor, F: int, d: int, name: str, where: str) -> torch.Tensor:
    """W as [F, d]: transposed when stored [d, F] (ambiguous only when F == d, then taken as stored)."""
    if tuple(W.shape) == (F, d):
        return W
    if tuple(W.shape) == (d, F):
        return W.T.contiguous()
    raise FormatError(f"{where}: {name} has shape {tuple(W.shape)}; expected ({F}, {d}) or ({d}, {F})")


def _build(tensors: dict[str, torch.Tensor], activation: str, k: int | None, where: str) -> Transcoder:
    for key in ("b_enc", "b_dec", "W_enc", "W_dec"):
        if key not in tensors:
            raise FormatError(f"{where}: missing tensor {key!r} (has {sorted(tensors)})")
    F, d = tensors["b_enc"].shape[0], tensors["b_dec"].shape[0]
    W_enc = _oriented(tensors["W_enc"], F, d, "W_enc", where)
    W_dec = _oriented(tensors["W_dec"], F, d, "W_dec", where)
    skip = tensors.get("W_skip")
    tc = Transcoder(d, F, activation, k, skip=skip is not None)
    with torch.no_grad():
        tc.W_enc.copy_(W_enc)
        tc.b_enc.copy_(tensors["b_enc"])
        tc.W_dec.copy_(W_dec)
        tc.b_dec.copy_(tensors["b_dec"])
        if skip is not None:
            if tuple(skip.shape) != (d, d):
                raise FormatError(f"{where}: W_skip has shape {tuple(skip.shape)}; expected ({d}, {d})")
            tc.W_skip.copy_(skip)
        if activation == "jumprelu":
            tc.threshold.copy_(tensors["threshold"])
    return tc


def import_circuit_tracer(
    folder: str | os.PathLike, *, model_id: str | None = None, architecture: str = "llama"
) -> TranscoderSet:
    """Load a circuit-tracer per-layer transcoder set (``config.yaml`` + one safetensors per layer)."""
    folder = Path(folder)
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        raise FormatError(f"{str(folder)!r} has no config.yaml: not a circuit-tracer transcoder set")
    cfg = _yaml().safe_load(cfg_path.read_text()) or {}
    kind = cfg.get("model_kind", "transcoder_set")
    if kind != "transcoder_set":
        raise FormatError(f"{str(cfg_path)!r}: model_kind={kind!r}; only per-layer 'transcoder_set' can be imported")
    files = cfg.get("transcoders")
    if files is None:
        files = sorted((p.name for p in folder.glob("layer_*.safetensors")), key=lambda n: int(re.findall(r"\d+", n)[0]))
    if not files:
        raise FormatError(f"{str(folder)!r}: config.yaml lists no transcoders and there are no layer_*.safetensors")
    tcs = []
    for i, name in enumerate(files):
        path = Path(name) if Path(name).is_absolute() else folder / Path(name).name
        t = read_safetensors(path)
        if "activation_function.threshold" in t:
            t["threshold"] = t.pop("activation_function.threshold")
            act, k = "jumprelu", None
        elif "k" in t or cfg.get("activation") == "topk":
            act, k = "topk", int(t.pop("k")) if "k" in t else cfg.get("k")
            if k is None:
                raise FormatError(f"{str(path)!r}: a TopK transcoder without k (in the file or config.yaml)")
        else:
            act, k = cfg.get("activation", "relu"), None
        tcs.append(_build(t, act, k, f"{path.name}"))
    first = tcs[0]
    set_cfg = TranscoderSetConfig(
        model_id=model_id or str(cfg.get("model_name", "unknown")),
        architecture=architecture,
        n_layers=len(tcs),
        d_in=first.d_in,
        n_features=first.n_features,
        activation=first.activation,
        k=first.k,
        skip=first.has_skip,
        training={"imported_from": "circuit-tracer", "source": str(folder),
                  "feature_input_hook": cfg.get("feature_input_hook"), "feature_output_hook": cfg.get("feature_output_hook")},
    )
    return TranscoderSet(set_cfg, tcs)


def export_circuit_tracer(ts: TranscoderSet, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``ts`` in circuit-tracer's layout (loadable by its ``load_transcoder_set``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, tc in enumerate(ts):
        t: dict[str, torch.Tensor] = {"W_enc": tc.W_enc, "W_dec": tc.W_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec}
        if tc.W_skip is not None:
            t["W_skip"] = tc.W_skip
        if tc.activation == "jumprelu":
            t["activation_function.threshold"] = tc.threshold
        t = {k: v.detach().to("cpu", dtype).contiguous() for k, v in t.items()}
        if tc.activation == "topk":
            t["k"] = torch.tensor(tc.k)
        name = f"layer_{i}.safetensors"
        atomic_write(folder / name, lambda tmp, t=t: save_file(t, tmp))
        names.append(name)
    cfg: dict[str, Any] = {
        "model_name": ts.config.model_id,
        "model_kind": "transcoder_set",
        "feature_input_hook": CT_INPUT_HOOK,
        "feature_output_hook": CT_OUTPUT_HOOK,
        "activation": ts.config.activation,
        "transcoders": names,
    }
    if ts.config.activation == "topk":
        cfg["k"] = ts.config.k
    text = _yaml().safe_dump(cfg, sort_keys=False)
    atomic_write(folder / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    return folder


def _layer_of(hookpoint: str) -> int:
    nums = re.findall(r"\d+", hookpoint)
    if not nums:
        raise FormatError(f"sparsify hookpoint {hookpoint!r} names no layer number")
    return int(nums[0])


def import_sparsify_coder(folder: str | os.PathLike) -> Transcoder:
    """Load one sparsify coder (a ``<hookpoint>`` folder with ``cfg.json`` and ``sae.safetensors``)."""
    p = Path(folder)
    if not (p / "cfg.json").is_file():
        raise FormatError(f"{str(p)!r} has no cfg.json: not a sparsify coder folder")
    cfg = json.loads((p / "cfg.json").read_text())
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise FormatError(f"{str(p / 'cfg.json')!r}: activation={act!r}; only 'topk' sparsify coders can be imported")
    t = read_safetensors(p / "sae.safetensors")
    if "encoder.weight" not in t:
        raise FormatError(f"{str(p / 'sae.safetensors')!r}: missing 'encoder.weight' (has {sorted(t)})")
    W_enc, b_enc = t.pop("encoder.weight"), t.pop("encoder.bias")
    if not cfg.get("transcode", False):
        # An SAE encodes x − b_dec: W(x − b_dec) + b = Wx + (b − W b_dec).
        b_enc = b_enc - W_enc @ t["b_dec"]
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if "W_skip" in t:
        tensors["W_skip"] = t["W_skip"]
    k = cfg.get("k")
    if not isinstance(k, int) or k <= 0:
        raise FormatError(f"{str(p / 'cfg.json')!r}: k={k!r}; expected a positive integer")
    return _build(tensors, "topk", k, p.name)


def import_sparsify(
    folder: str | os.PathLike, *, model_id: str = "unknown", architecture: str = "llama"
) -> TranscoderSet:
    """Load a sparsify set: ``folder/<hookpoint>/{cfg.json, sae.safetensors}``, layers ordered by the
    number in the hookpoint name (they must be 0..n−1; the set's ``training['hookpoints']`` keeps the names)."""
    folder = Path(folder)
    subs = [p for p in folder.iterdir() if (p / "cfg.json").is_file()] if folder.is_dir() else []
    if not subs:
        raise FormatError(f"{str(folder)!r} has no <hookpoint>/cfg.json: not a sparsify set")
    subs.sort(key=lambda p: _layer_of(p.name))
    layers = [_layer_of(p.name) for p in subs]
    if layers != list(range(len(subs))):
        raise FormatError(f"sparsify hookpoints cover layers {layers}; a set needs layers 0..{len(subs) - 1}")
    tcs = [import_sparsify_coder(p) for p in subs]
    first = tcs[0]
    if any(tc.n_features != first.n_features or tc.d_in != first.d_in for tc in tcs):
        raise ConfigError("sparsify coders of different sizes cannot form one set")
    set_cfg = TranscoderSetConfig(
        model_id=model_id, architecture=architecture, n_layers=len(tcs), d_in=first.d_in,
        n_features=first.n_features, activation="topk", k=first.k, skip=first.has_skip,
        training={"imported_from": "sparsify", "source": str(folder), "hookpoints": [p.name for p in subs]},
    )
    if any(tc.has_skip != first.has_skip for tc in tcs):
        raise ConfigError("sparsify coders with and without W_skip cannot form one set")
    return TranscoderSet(set_cfg, tcs)
