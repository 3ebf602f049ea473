"""Bad input: one line ``Error: …``, a non-zero exit, no traceback and no partial files (issue 7 §5)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sparsetrace.transcoders import save_transcoders

from _cli_common import files_under, one_line_error, run
from _cli_fixtures import save_tiny_model
from conftest import random_transcoders, tiny_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def graph_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "trace"
    r = run("trace", "the cat sat on the mat", "-m", tiny, "-t", "random:16:2", "--out", out, "--no-picture", "-q")
    assert r.exit_code == 0, r.output
    return out


def _trace(tiny, out, *extra, prompt="the cat sat"):
    return run("trace", prompt, "-m", tiny, "--out", out, "--no-picture", "-q", *extra)


def test_empty_prompt(tiny, tmp_path):
    one_line_error(_trace(tiny, tmp_path / "o", "-t", "random:8:2", prompt="   "), 1, "PROMPT is empty")
    assert files_under(tmp_path) == set()


def test_prompt_longer_than_the_context(tiny, tmp_path):
    r = _trace(tiny, tmp_path / "o", "-t", "random:8:2", prompt=" ".join(["the cat"] * 40))
    one_line_error(r, 1, "prompt has 81 tokens", "the model's context is 64")
    assert files_under(tmp_path) == set()


def test_unknown_model_path(tmp_path):
    r = run("trace", "hi there", "-m", tmp_path / "no" / "such-model", "-t", "random:8:2", "--out", tmp_path / "o", "-q")
    one_line_error(r, 1, "neither an existing path nor a hub id")
    (tmp_path / "notamodel").mkdir()
    r = run("trace", "hi there", "-m", tmp_path / "notamodel", "-t", "random:8:2", "--out", tmp_path / "o", "-q")
    one_line_error(r, 1, "is not a model folder (no config.json)")
    assert files_under(tmp_path) == {"notamodel"}


def test_transcoders_of_another_model(tiny, tmp_path):
    save_transcoders(random_transcoders(tiny_lm("gpt2")), tmp_path / "gpt2-set")
    before = files_under(tmp_path)
    r = _trace(tiny, tmp_path / "o", "-t", tmp_path / "gpt2-set")
    one_line_error(r, 1, "transcoder set for 'tiny-gpt2' does not match model", "architecture 'gpt2'")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("spec", ["random:0:1", "random:8", "random:8:9", "random:a:b"])
def test_bad_random_spec(tiny, tmp_path, spec):
    one_line_error(_trace(tiny, tmp_path / "o", "-t", spec), 1, f"--transcoders {spec!r}; allowed:")
    assert files_under(tmp_path) == set()


def test_truncated_transcoder_file(tiny, tmp_path):
    from sparsetrace.models.loading import load_model

    folder = save_transcoders(random_transcoders(load_model(str(tiny), device="cpu")), tmp_path / "set")
    f = folder / "layer_1.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    before = files_under(tmp_path)
    one_line_error(_trace(tiny, tmp_path / "o", "-t", folder), 1, "layer_1.safetensors", "not a readable safetensors file")
    assert files_under(tmp_path) == before


def test_corrupt_graph_file(tmp_path):
    g = tmp_path / "graph.safetensors"
    g.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    one_line_error(run("prune", g, "-q"), 1, "is not a readable safetensors graph file")
    assert files_under(tmp_path) == {"graph.safetensors"}


@pytest.mark.parametrize("flag,value", [("--node-threshold", "0"), ("--node-threshold", "1.5"), ("--edge-threshold", "-0.1")])
def test_threshold_outside_unit_interval(graph_dir, flag, value):
    before = files_under(graph_dir)
    r = run("prune", graph_dir, flag, value, "-q")
    one_line_error(r, 2, f"Invalid value for '{flag}'", "0<x<=1", "sparsetrace prune --help")
    assert files_under(graph_dir) == before


def test_threshold_outside_unit_interval_in_trace(tiny, tmp_path):
    one_line_error(_trace(tiny, tmp_path / "o", "-t", "random:8:2", "--edge-threshold", "2"), 2, "0<x<=1")
    assert files_under(tmp_path) == set()


def test_feature_id_out_of_range(tiny, tmp_path):
    r = run("features", "show", "1", "16", "-m", tiny, "-t", "random:16:2", "-q")
    one_line_error(r, 1, "FEATURE=16; allowed: 0..15")
    r = run("features", "show", "2", "0", "-m", tiny, "-t", "random:16:2", "-q")
    one_line_error(r, 1, "LAYER=2; allowed: 0..1")
    r = run("intervene", "the cat", "-m", tiny, "-t", "random:16:2", "--ablate", "0:1:99", "-q")
    one_line_error(r, 1, "feature 99 in an intervention; allowed: 0..15")


def test_unwritable_output_folder(tiny, graph_dir, tmp_path):
    # running as root ignores permission bits, so "unwritable" is a path under a regular file
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(_trace(tiny, blocker / "out", "-t", "random:8:2"), 1, "cannot be written", "is not a writable folder")
    one_line_error(run("prune", graph_dir, "--out", blocker / "p.safetensors", "-q"), 1, "cannot be written")
    one_line_error(run("render", graph_dir, "--out", blocker / "p.png", "-q"), 1, "cannot be written")
    one_line_error(run("export", graph_dir, "-f", "frontend", "--out", blocker / "x.json", "-q"), 1, "cannot be written")
    assert files_under(tmp_path) == {"file"}


@pytest.fixture
def path_without_dot(tmp_path):
    """A PATH whose folders are symlinks to everything on the real PATH except graphviz's binaries."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            src = Path(folder) / name
            if name in ("dot", "neato") or (bindir / name).exists() or not os.access(src, os.X_OK):
                continue
            (bindir / name).symlink_to(src)
    assert shutil.which("dot", path=str(bindir)) is None
    return str(bindir)


def test_no_dot_binary(tiny, graph_dir, tmp_path, path_without_dot, monkeypatch):
    monkeypatch.setenv("PATH", path_without_dot)
    out = tmp_path / "work"
    out.mkdir()
    # the compact figure is drawn with matplotlib; only the full picture needs graphviz
    one_line_error(_trace(tiny, out / "o", "-t", "random:8:2", "--picture", "--full"), 1, "`dot` binary was not found",
                   "drop --full")
    one_line_error(run("render", graph_dir, "--out", out / "g.png", "--full", "-q"), 1, "`dot` binary was not found")
    assert files_under(out) == set()
    r = run("render", graph_dir, "--out", out / "g.png", "-q")
    assert r.exit_code == 0, r.output
    assert files_under(out) == {"g.png", "g.spec.json"}


def test_no_traceback_for_missing_graph(tmp_path):
    r = run("render", tmp_path / "missing.safetensors", "--out", tmp_path / "x.png", "-q")
    one_line_error(r, 2, "does not exist")


def test_csv_to_stdout_is_refused(graph_dir):
    one_line_error(run("export", graph_dir, "-f", "csv", "--out", "-", "-q"), 1, "csv writes two files")
