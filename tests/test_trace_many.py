"""``sparsetrace trace-many`` on a tiny saved model: each prompt's folder is what ``trace`` writes,
the manifest, a bad prompt failing alone, resume, refused settings, local processes and a Dask
LocalCluster of two workers, an unreachable scheduler."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sparsetrace.graphs import AttributionGraph

from _cli_common import files_under, one_line_error, run
from _cli_fixtures import save_tiny_model

FILES = {"graph.safetensors", "graph.pruned.safetensors", "graph.png", "graph.svg", "graph.spec.json", "graph.html",
         "frontend.json", "card.md"}
PROMPTS = (
    '{"id": "a", "template": "the capital of {C} is", "fields": {"C": "france"}, "targets": ["paris"]}\n'
    '{"id": "b", "prompt": "john gave a drink to", "targets": ["mary", "john"]}\n'
    '{"id": "c", "prompt": "the cat sat on the", "targets": ["mat mat"]}\n'
    '{"id": "d", "template": "{X} and {Y} went to the store", "fields": {"X": "john", "Y": "mary"}}\n'
)
MODEL = ("-t", "random:32:4", "--no-picture", "-q")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("set") / "p.jsonl"
    p.write_text(PROMPTS)
    return p


@pytest.fixture(scope="module")
def traced(tiny, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("many") / "out"
    r = run("trace-many", prompts, "--out", out, "-m", tiny, "-t", "random:32:4", "--json", "-q")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def _same_graph(a: AttributionGraph, b: AttributionGraph, exact: bool = True) -> None:
    """The same graph; ``exact=False`` (another process, other float32 summation order) allows rounding."""
    assert a.prompt == b.prompt and list(a.token_ids) == list(b.token_ids)
    np.testing.assert_array_equal(a.adjacency.indptr, b.adjacency.indptr)
    np.testing.assert_array_equal(a.adjacency.indices, b.adjacency.indices)
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    np.testing.assert_allclose(a.adjacency.data, b.adjacency.data, **tol)
    np.testing.assert_allclose(a.activation, b.activation, **tol)
    assert list(a.logit_label) == list(b.logit_label)
    for key in ("pruning", "feature_labels", "transcoder_source", "labels"):
        assert a.metadata.get(key) == b.metadata.get(key), key
    sa, sb = a.metadata["scores"], b.metadata["scores"]
    for part in ("full", "pruned"):
        assert sa[part] == pytest.approx(sb[part], rel=tol["rtol"], abs=tol["atol"]), part


def test_manifest_and_a_bad_prompt_failing_alone(traced):
    out, data = traced
    assert data["summary"] == {"done": 3, "failed": 1, "pending": 0}
    assert "line 3" in data["failed"]["c"] and "'mat mat' is 2 tokens" in data["failed"]["c"]
    man = json.loads((out / "manifest.json").read_text())
    by = {e["id"]: e for e in man["prompts"]}
    assert [e["id"] for e in man["prompts"]] == ["a", "b", "c", "d"]
    assert by["c"]["status"] == "failed" and not (out / "c").exists()
    for pid in "abd":
        e = by[pid]
        assert e["status"] == "done" and e["seconds"] > 0 and set(e["files"]) == FILES
        assert files_under(out / pid) == FILES
        assert 0 <= e["scores"]["pruned"]["replacement"] <= 1
    assert by["a"]["positions"] == {"C": 4} and by["d"]["positions"] == {"X": 1, "Y": 3}
    assert [t["token"] for t in by["b"]["top_logits"]] == ["mary", "john"]
    assert not [p for p in files_under(out) if p.startswith(".") or "/." in p]


def test_each_folder_is_what_trace_writes(traced, tiny, tmp_path):
    out, _ = traced
    r = run("trace", "john gave a drink to", "--target", "mary", "--target", "john", "-m", tiny,
            "-t", "random:32:4", "--out", tmp_path / "one", "-q")
    assert r.exit_code == 0, r.output
    assert files_under(tmp_path / "one") == files_under(out / "b")
    for name in ("graph.safetensors", "graph.pruned.safetensors"):
        _same_graph(AttributionGraph.load(tmp_path / "one" / name), AttributionGraph.load(out / "b" / name))
    assert (tmp_path / "one" / "graph.spec.json").read_text() == (out / "b" / "graph.spec.json").read_text()


def test_resume_skips_done_and_retries_failed(traced, tiny, prompts, tmp_path):
    out, _ = traced
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "d")  # an unfinished folder is redone
    stamp = (copy / "a" / "graph.safetensors").stat().st_mtime_ns
    r = run("trace-many", prompts, "--out", copy, "-m", tiny, "-t", "random:32:4")
    assert r.exit_code == 0, r.output
    assert "resuming: 2 of 4 prompts already done" in r.output
    assert "[1/2] c: FAILED" in r.output and "[2/2] d: done" in r.output
    assert (copy / "a" / "graph.safetensors").stat().st_mtime_ns == stamp
    assert files_under(copy / "d") == FILES
    r = run("trace-many", prompts, "--out", copy, "-m", tiny, "-t", "random:32:8", "-q")
    one_line_error(r, 2, "holds a run with other settings", "transcoders")


def test_bad_prompt_file_is_one_line_and_writes_nothing(tiny, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a"}\n{"prompt": b}\n')
    one_line_error(run("trace-many", p, "--out", tmp_path / "o", "-m", tiny, *MODEL), 2, "bad.jsonl line 2", "JSON")
    p.write_text('{"template": "the {X} is"}\n')
    one_line_error(run("trace-many", p, "--out", tmp_path / "o", "-m", tiny, *MODEL), 2, "line 1", "{X}", "not filled")
    assert not (tmp_path / "o").exists()


def test_unreachable_scheduler(tiny, prompts, tmp_path):
    pytest.importorskip("distributed")
    r = run("trace-many", prompts, "--out", tmp_path / "o", "--scheduler", "tcp://127.0.0.1:9", "-m", tiny, *MODEL)
    one_line_error(r, 2, "--scheduler 'tcp://127.0.0.1:9'", "cannot reach a Dask scheduler")
    assert not (tmp_path / "o").exists()


def _graphs_equal(a, b) -> None:
    for pid in "abd":
        _same_graph(AttributionGraph.load(a / pid / "graph.safetensors"), AttributionGraph.load(b / pid / "graph.safetensors"),
                    exact=False)


def test_two_local_processes(traced, tiny, prompts, tmp_path):
    out, _ = traced
    r = run("trace-many", prompts, "--out", tmp_path / "o", "--workers", "2", "-m", tiny, "-t", "random:32:4",
            "--json", "-q")
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert man["summary"] == {"done": 3, "failed": 1, "pending": 0}
    _graphs_equal(out, tmp_path / "o")


def test_dask_local_cluster_of_two_workers(traced, tiny, prompts, tmp_path):
    pytest.importorskip("distributed")
    from distributed import LocalCluster

    out, _ = traced
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        r = run("trace-many", prompts, "--out", tmp_path / "o", "--scheduler", cluster.scheduler_address, "-m", tiny,
                "-t", "random:32:4", "--json", "-q")
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert man["summary"] == {"done": 3, "failed": 1, "pending": 0}
    workers = {e["worker"] for e in man["prompts"]}
    assert len(workers) == 2, workers  # both workers traced (the failed prompt names its worker too)
    _graphs_equal(out, tmp_path / "o")


def test_an_interrupted_run_keeps_its_finished_graphs(tmp_path, monkeypatch):
    """A run stopped during its third prompt (Ctrl-C) leaves the two finished folders and a manifest that
    records them as done and the rest pending, no half-written folder; the next run traces only the rest."""
    import sparsetrace.tracer.pipeline as pipeline
    from sparsetrace.tracer.pipeline import TraceSettings
    from sparsetrace.tracer.prompt_sets import parse_prompt_set
    from sparsetrace.tracer.trace_many import run_prompt_set

    items = parse_prompt_set("".join(f'{{"id": "p{i}", "prompt": "prompt {i}"}}\n' for i in range(4)), "jsonl")
    calls: list[str] = []
    stop = {"at": "p2"}

    def fake_trace(session, item, settings):
        calls.append(item.id)
        if item.id == stop["at"]:
            raise KeyboardInterrupt
        return {"positions": {}, "files": ["g.txt"], "seconds": 0.01}, {"g.txt": item.prompt.encode()}

    monkeypatch.setattr(pipeline, "trace_item", fake_trace)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_prompt_set(items, out, lambda: "session", TraceSettings(), {"model": "fake"})
    man = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in man["prompts"]] == ["done", "done", "pending", "pending"]
    assert files_under(out) == {"manifest.json", "p0", "p0/g.txt", "p1", "p1/g.txt"}
    calls.clear()
    stop["at"] = None
    done = run_prompt_set(items, out, lambda: "session", TraceSettings(), {"model": "fake"})
    assert calls == ["p2", "p3"] and done["summary"] == {"done": 4, "failed": 0, "pending": 0}
    assert (out / "p3" / "g.txt").read_text() == "prompt 3"
