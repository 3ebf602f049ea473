"""Cross-layer transcoder files (docs/design.md §14): our format and circuit-tracer's CLT folders.

Our format, a folder with
    ``config.json``               the :class:`CrossLayerTranscoderConfig` (``"kind": "cross-layer"``);
    ``encoder_{s}.safetensors``   per layer s: ``W_enc [F, d]``, ``b_enc [F]``, ``b_dec [d]`` (the bias of
                                  target layer s), optional ``W_skip [d, d]`` (x̃ W_skipᵀ) and
                                  ``threshold [F]`` (JumpReLU);
    ``decoder_{s}.safetensors``   per source layer s: ``W_dec [F, L − s, d]`` (column j: target s + j).
Files are written atomically, config last, so a folder with a ``config.json`` is complete.

circuit-tracer's layout (safety-research/circuit-tracer, ``CrossLayerTranscoder.to_safetensors`` /
``load_clt``), read from its published code:
    ``config.yaml``               ``model_name``, ``model_kind: cross_layer_transcoder``,
                                  ``feature_input_hook``, ``feature_output_hook``;
    ``W_enc_{i}.safetensors``     ``W_enc_{i} [F, d]``, ``b_enc_{i} [F]``, ``b_dec_{i} [d]``, optional
                                  ``threshold_{i} [F]`` (JumpReLU; else ReLU);
    ``W_dec_{i}.safetensors``     ``W_dec_{i} [F, L − i, d]``.
That layout stores no skip and has no TopK; a CLT with either is refused on export. Hook names are
recorded in ``training`` on import, not interpreted (as for per-layer imports, ``formats.py``).

Decoders can stay on disk: :class:`LazyDecoders` memory-maps each decoder tensor from its file (the
safetensors header gives its offset) and copies only the rows asked for.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from sparsetrace.config import CrossLayerConfig
from sparsetrace.errors import ConfigError, FormatError

from .clt import CROSS_LAYER, CrossLayerTranscoder, CrossLayerTranscoderConfig
from .io import DTYPES, _write_json, atomic_write, read_safetensors

__all__ = ["save_clt", "load_clt", "is_clt_folder", "LazyDecoders", "import_circuit_tracer_clt",
           "export_circuit_tracer_clt"]

_ST_DTYPES = {"F32": (np.float32, torch.float32), "F64": (np.float64, torch.float64),
              "F16": (np.float16, torch.float16), "BF16": (np.uint16, torch.bfloat16)}


# ---- lazy decoders ------------------------------------------------------------------------------
class _MappedTensor:
    """One tensor of a safetensors file, memory-mapped (nothing read until rows are asked for)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        if not path.is_file():
            raise FormatError(f"missing decoder file {str(path)!r}")
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if not 0 < n <= size - 8:
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise FormatError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
        if key not in header:
            raise FormatError(f"{str(path)!r}: missing tensor {key!r} (has {sorted(k for k in header if k != '__metadata__')})")
        meta = header[key]
        if meta.get("dtype") not in _ST_DTYPES:
            raise FormatError(f"{str(path)!r}: {key} has dtype {meta.get('dtype')!r}; allowed: {', '.join(_ST_DTYPES)}")
        np_dt, self.torch_dtype = _ST_DTYPES[meta["dtype"]]
        self.shape = tuple(int(v) for v in meta["shape"])
        begin, end = (int(v) for v in meta["data_offsets"])
        start = 8 + n + begin
        if end - begin != int(np.prod(self.shape)) * np.dtype(np_dt).itemsize or 8 + n + end > size:
            raise FormatError(f"{str(path)!r}: {key} is truncated or corrupt (data {begin}..{end}, file {size} bytes)")
        self._map = np.memmap(path, dtype=np_dt, mode="r", offset=start, shape=self.shape)

    def _torch(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        return t.view(torch.bfloat16) if self.torch_dtype == torch.bfloat16 else t

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self._torch(self._map[idx.numpy()])

    def full(self) -> torch.Tensor:
        return self._torch(np.array(self._map))


class LazyDecoders:
    """Decoders read on demand from ``files[s] = (path, key)``, checked at open (shape [F, L − s, d])."""

    def __init__(self, files: list[tuple[Path, str]], n_features: int, d: int) -> None:
        L = len(files)
        self._maps = [_MappedTensor(Path(p), key) for p, key in files]
        for s, m in enumerate(self._maps):
            _check_decoder_shape(m.shape, s, L, n_features, d, f"{str(m.path)!r}: {m.key}")

    def rows(self, source: int, features: torch.Tensor) -> torch.Tensor:
        return self._maps[source].rows(features)

    def full(self, source: int) -> torch.Tensor:
        return self._maps[source].full()


def _check_decoder_shape(shape: tuple, s: int, L: int, F: int, d: int, where: str) -> None:
    """A decoder of source s must be [F, L − s, d]: one column per target layer s … L − 1."""
    if len(shape) != 3 or shape[0] != F or shape[2] != d:
        raise FormatError(f"{where} has shape {tuple(shape)}; expected ({F}, {L - s}, {d}) = (features, target layers {s}..{L - 1}, d_model)")
    if shape[1] > L - s:
        raise FormatError(
            f"{where} has {shape[1]} target layers; a decoder of source layer {s} writes to layers {s}..{L - 1} "
            f"({L - s}): {shape[1] - (L - s)} of its targets would sit below its source")
    if shape[1] < L - s:
        raise FormatError(f"{where} has {shape[1]} target layers; expected {L - s} (layers {s}..{L - 1}): targets missing")


# ---- our format ---------------------------------------------------------------------------------
def is_clt_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder/config.json`` declares a cross-layer transcoder."""
    p = Path(folder) / "config.json"
    try:
        return p.is_file() and json.loads(p.read_text()).get("kind") == CROSS_LAYER
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def save_clt(clt: CrossLayerTranscoder, folder: str | os.PathLike, dtype: str | None = None) -> Path:
    """Save a CLT in our format (one source layer's decoder in memory at a time when it is lazy)."""
    folder = Path(folder)
    dtype = dtype or clt.config.dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    folder.mkdir(parents=True, exist_ok=True)
    cast = lambda t: t.detach().to("cpu", DTYPES[dtype]).contiguous()  # noqa: E731
    for s, view in enumerate(clt):
        enc = {"W_enc": view.W_enc, "b_enc": view.b_enc, "b_dec": view.b_dec}
        if view.W_skip is not None:
            enc["W_skip"] = view.W_skip
        if clt.config.activation == "jumprelu":
            enc["threshold"] = view.threshold
        enc = {k: cast(v) for k, v in enc.items()}
        atomic_write(folder / f"encoder_{s}.safetensors", lambda tmp, t=enc: save_file(t, tmp))
        dec = {"W_dec": cast(clt.decoder(s))}
        atomic_write(folder / f"decoder_{s}.safetensors", lambda tmp, t=dec: save_file(t, tmp))
    _write_json(folder / "config.json", clt.config.replace(dtype=dtype).to_dict())
    return folder


def load_clt(folder: str | os.PathLike, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32,
             lazy_decoders: bool = CrossLayerConfig.lazy_decoders) -> CrossLayerTranscoder:
    """Load a CLT saved by :func:`save_clt`, checking every tensor's shape against the config.

    ``lazy_decoders``: leave the decoders on disk (memory-mapped, rows read on demand); else read them,
    one file at a time, into parameters."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise FormatError(f"transcoder folder {str(folder)!r} does not exist")
    if not cfg_path.is_file():
        raise FormatError(f"{str(folder)!r} has no config.json: not a sparsetrace cross-layer transcoder")
    try:
        cfg = CrossLayerTranscoderConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise FormatError(f"{str(cfg_path)!r} is not a valid cross-layer transcoder config: {exc}") from None
    L, F, d = cfg.n_layers, cfg.n_features, cfg.d_in
    missing = [n for s in range(L) for n in (f"encoder_{s}.safetensors", f"decoder_{s}.safetensors")
               if not (folder / n).is_file()]
    if missing:
        raise FormatError(f"{str(folder)!r}: config.json says n_layers={L}; missing files {missing}")
    dec_files = [(folder / f"decoder_{s}.safetensors", "W_dec") for s in range(L)]
    lazy = LazyDecoders(dec_files, F, d) if lazy_decoders else None
    clt = CrossLayerTranscoder(cfg, dtype=dtype, device=device, decoders=lazy)
    expect = {"W_enc": (F, d), "b_enc": (F,), "b_dec": (d,)}
    if cfg.skip:
        expect["W_skip"] = (d, d)
    if cfg.activation == "jumprelu":
        expect["threshold"] = (F,)
    with torch.no_grad():
        for s in range(L):
            name = folder / f"encoder_{s}.safetensors"
            t = _checked(read_safetensors(name), expect, str(name))
            clt.W_enc[s].copy_(t["W_enc"])
            clt.b_enc[s].copy_(t["b_enc"])
            clt.b_dec[s].copy_(t["b_dec"])
            if cfg.skip:
                clt.W_skip[s].copy_(t["W_skip"])
            if cfg.activation == "jumprelu":
                clt.threshold[s].copy_(t["threshold"])
            if lazy is None:
                path, key = dec_files[s]
                W = read_safetensors(path).get(key)
                if W is None:
                    raise FormatError(f"{str(path)!r}: missing tensor {key!r}")
                _check_decoder_shape(tuple(W.shape), s, L, F, d, f"{str(path)!r}: {key}")
                clt.W_dec[s].copy_(W)
                del W
    return clt


def _checked(tensors: dict[str, torch.Tensor], expect: dict[str, tuple], where: str) -> dict[str, torch.Tensor]:
    missing = [k for k in expect if k not in tensors]
    if missing:
        raise FormatError(f"{where}: missing tensors {missing} (has {sorted(tensors)})")
    for k, shape in expect.items():
        if tuple(tensors[k].shape) != shape:
            raise FormatError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {shape}")
    return tensors


# ---- circuit-tracer's layout ----------------------------------------------------------------------
def _yaml():
    from .formats import _yaml as y

    return y()


def _layer_files(folder: Path, prefix: str) -> dict[int, Path]:
    out = {}
    for p in folder.glob(f"{prefix}_*.safetensors"):
        m = re.fullmatch(rf"{prefix}_(\d+)\.safetensors", p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def import_circuit_tracer_clt(
    folder: str | os.PathLike, *, model_id: str | None = None, architecture: str = "llama",
    n_layers: int | None = None, d_model: int | None = None, lazy_decoders: bool = CrossLayerConfig.lazy_decoders,
    dtype: torch.dtype = torch.float32,
) -> CrossLayerTranscoder:
    """Load a circuit-tracer CLT folder (see the module docstring), refusing with one line that names
    what differs: no config.yaml or another ``model_kind``, missing layers, a layer count or d_model other
    than the model's (``n_layers``, ``d_model`` when given), a decoder with targets below its source,
    inconsistent shapes, a corrupt file. Nothing is returned half-loaded."""
    folder = Path(folder)
    cfg_path = folder / "config.yaml"
    if not cfg_path.is_file():
        raise FormatError(f"{str(folder)!r} has no config.yaml: not a circuit-tracer transcoder folder")
    try:
        cfg = _yaml().safe_load(cfg_path.read_text()) or {}
    except Exception as exc:  # yaml.YAMLError and decoding errors: refuse with the file's name
        raise FormatError(f"{str(cfg_path)!r} is not valid YAML: {exc}") from None
    kind = cfg.get("model_kind")
    if kind != "cross_layer_transcoder":
        raise FormatError(f"{str(cfg_path)!r}: model_kind={kind!r}; expected 'cross_layer_transcoder' "
                          f"(a per-layer 'transcoder_set' is imported by import_circuit_tracer)")
    enc, dec = _layer_files(folder, "W_enc"), _layer_files(folder, "W_dec")
    if not enc:
        raise FormatError(f"{str(folder)!r}: no W_enc_*.safetensors files")
    L = max(enc) + 1
    if n_layers is not None and L != n_layers:
        raise FormatError(f"{str(folder)!r} has {L} layers (W_enc_0..{L - 1}); the model has n_layers={n_layers}")
    missing = [f"{p}_{i}.safetensors" for i in range(L) for p, have in (("W_enc", enc), ("W_dec", dec)) if i not in have]
    if missing:
        raise FormatError(f"{str(folder)!r}: layers 0..{L - 1} need files that are missing: {missing}")
    extra = sorted(i for i in dec if i >= L)
    if extra:
        raise FormatError(f"{str(folder)!r}: W_dec files for layers {extra} but encoders only for 0..{L - 1}")
    first = read_safetensors(enc[0])
    if "W_enc_0" not in first or first["W_enc_0"].ndim != 2:
        raise FormatError(f"{str(enc[0])!r}: missing tensor 'W_enc_0' [F, d] (has {sorted(first)})")
    F, d = (int(v) for v in first["W_enc_0"].shape)
    if d_model is not None and d != d_model:
        raise FormatError(f"{str(enc[0])!r}: W_enc_0 has d_model {d}; the model has d_model={d_model}")
    jump = "threshold_0" in first
    enc_tensors = []
    for i in range(L):
        expect = {f"W_enc_{i}": (F, d), f"b_enc_{i}": (F,), f"b_dec_{i}": (d,)}
        if jump:
            expect[f"threshold_{i}"] = (F,)
        enc_tensors.append(_checked(first if i == 0 else read_safetensors(enc[i]), expect, str(enc[i])))
    files = [(dec[i], f"W_dec_{i}") for i in range(L)]
    lazy = LazyDecoders(files, F, d)  # checks every decoder's shape (targets below the source, …)
    config = CrossLayerTranscoderConfig(
        model_id=model_id or str(cfg.get("model_name", "unknown")), architecture=architecture, n_layers=L,
        d_in=d, n_features=F, activation="jumprelu" if jump else "relu", k=None, skip=False,
        training={"imported_from": "circuit-tracer", "source": str(folder),
                  "feature_input_hook": cfg.get("feature_input_hook"), "feature_output_hook": cfg.get("feature_output_hook")},
    )
    clt = CrossLayerTranscoder(config, dtype=dtype, decoders=lazy)
    with torch.no_grad():
        for i, t in enumerate(enc_tensors):
            clt.W_enc[i].copy_(t[f"W_enc_{i}"])
            clt.b_enc[i].copy_(t[f"b_enc_{i}"])
            clt.b_dec[i].copy_(t[f"b_dec_{i}"])
            if jump:
                clt.threshold[i].copy_(t[f"threshold_{i}"])
    return clt if lazy_decoders else clt.load_decoders()


def export_circuit_tracer_clt(clt: CrossLayerTranscoder, folder: str | os.PathLike,
                              dtype: torch.dtype = torch.float32) -> Path:
    """Write ``clt`` in circuit-tracer's CLT layout (loadable by its ``load_clt``). Refuses a TopK CLT
    and one with a skip: that layout has neither."""
    c = clt.config
    if c.activation == "topk":
        raise ConfigError("activation='topk': circuit-tracer's CLT layout has ReLU and JumpReLU only; allowed: relu, jumprelu")
    if c.skip:
        raise ConfigError("skip=True: circuit-tracer's CLT layout stores no W_skip; export a CLT without a skip")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cast = lambda t: t.detach().to("cpu", dtype).contiguous()  # noqa: E731
    for i, view in enumerate(clt):
        enc = {f"W_enc_{i}": cast(view.W_enc), f"b_enc_{i}": cast(view.b_enc), f"b_dec_{i}": cast(view.b_dec)}
        if c.activation == "jumprelu":
            enc[f"threshold_{i}"] = cast(view.threshold)
        atomic_write(folder / f"W_enc_{i}.safetensors", lambda tmp, t=enc: save_file(t, tmp))
        dec = {f"W_dec_{i}": cast(clt.decoder(i))}
        atomic_write(folder / f"W_dec_{i}.safetensors", lambda tmp, t=dec: save_file(t, tmp))
    from .formats import CT_INPUT_HOOK, CT_OUTPUT_HOOK

    meta: dict[str, Any] = {"model_name": c.model_id, "model_kind": "cross_layer_transcoder",
                            "feature_input_hook": CT_INPUT_HOOK, "feature_output_hook": CT_OUTPUT_HOOK}
    text = _yaml().safe_dump(meta, sort_keys=False)
    atomic_write(folder / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    return folder
