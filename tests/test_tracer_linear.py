"""The hand-written transposed frozen model (tracer/_linear.py) against autograd through the HF model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsetrace.tracer._linear import LinearBackward
from sparsetrace.tracer._autograd import AutogradBackward
from sparsetrace.tracer.attribution import AttributionConfig, attribute
from sparsetrace.tracer.replacement import ReplacementModel

from conftest import ARCHS, random_transcoders, tiny_lm

PROMPT = [3, 17, 5, 42, 8, 23, 11]


def _fp64_run(arch: str):
    """A tiny random model of ``arch`` with random transcoders, in fp64, and its clean run of PROMPT."""
    lm = tiny_lm(arch)
    ts = random_transcoders(lm)
    lm.to(dtype=torch.float64)
    ts.to(dtype=torch.float64)
    rm = ReplacementModel(lm, ts)
    return lm, rm, rm.run(torch.tensor(PROMPT))


def _random_reads(lm, seed: int, first_pos: int, n: int = 12):
    """n fp64 reads at random layers incl. the final residual (layer L) and positions ≥ first_pos, in
    one batch, in no particular order."""
    gen = torch.Generator().manual_seed(seed)
    L, T, d = lm.n_layers, len(PROMPT), lm.d_model
    return [(int(l), int(c), torch.randn(d, dtype=torch.float64, generator=gen))
            for l, c in zip(torch.randint(0, L + 1, (n,), generator=gen), torch.randint(first_pos, T, (n,), generator=gen))]


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_backward_equals_autograd_gradients(arch):
    lm, rm, run = _fp64_run(arch)
    reads = _random_reads(lm, seed=0, first_pos=0)
    ga, ea = AutogradBackward(rm, run, len(reads)).backward(reads)
    gb, eb = LinearBackward(rm, run).backward(reads)
    scale = ea.abs().max().item()
    assert scale > 1e-3
    for l, (a, b) in enumerate(zip(ga, gb)):
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(b, a, atol=1e-12 * scale, rtol=0, msg=f"layer {l}")
    torch.testing.assert_close(eb, ea, atol=1e-12 * scale, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_skipping_position_0_keeps_every_other_gradient_and_the_first_token_edge(arch):
    """The engine's mode: position 0 out of every pass. Gradients at positions ≥ 1 are autograd's, and
    the first token's edge (through the key-0 terms and the position-0 recurrence) is autograd's
    g_emb[:, 0] · h0[0]."""
    lm, rm, run = _fp64_run(arch)
    reads = _random_reads(lm, seed=2, first_pos=1)
    d = lm.d_model
    ga, ea = AutogradBackward(rm, run, len(reads)).backward(reads)
    eng = LinearBackward(rm, run, skip_position0=True)
    gb, eb = eng.backward(reads)
    scale = ea.abs().max().item()
    torch.testing.assert_close(gb[:, :, 1:], ga[:, :, 1:], atol=1e-12 * scale, rtol=0)
    torch.testing.assert_close(eb[:, 1:], ea[:, 1:], atol=1e-12 * scale, rtol=0)
    tok0 = ea[:, 0] @ run.h0[0]
    assert tok0.abs().max() > 1e-3  # the first token (an attention sink) has real edges
    torch.testing.assert_close(eng.last_token0, tok0, atol=1e-12 * tok0.abs().max().item(), rtol=0)
    with pytest.raises(ValueError, match="position 0"):
        eng.backward([(1, 0, torch.randn(d, dtype=torch.float64))])


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_and_autograd_graphs_agree(arch):
    lm = tiny_lm(arch)
    ts = random_transcoders(lm)
    a = attribute(PROMPT, lm, ts, config=AttributionConfig(dtype="float64", backward="autograd", batch_size=8))
    b = attribute(PROMPT, lm, ts, config=AttributionConfig(dtype="float64", backward="linear", batch_size=8))
    assert a.layout == b.layout
    A = a.dense_adjacency()
    np.testing.assert_allclose(b.dense_adjacency(), A, atol=1e-12 * np.abs(A).max(), rtol=0)
    np.testing.assert_allclose(b.bias, a.bias, atol=1e-12, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_cuda_graph_equals_cpu_graph(arch):
    """The CUDA path gives the CPU graph (skipped without a GPU)."""
    lm = tiny_lm(arch)
    ts = random_transcoders(lm)
    cpu = attribute(PROMPT, lm, ts, config=AttributionConfig(dtype="float64", device="cpu"))
    gpu = attribute(PROMPT, lm, ts, config=AttributionConfig(dtype="float64", device="cuda"))
    assert gpu.layout == cpu.layout
    A = cpu.dense_adjacency()
    np.testing.assert_allclose(gpu.dense_adjacency(), A, atol=1e-10 * np.abs(A).max(), rtol=0)
    assert next(lm.model.parameters()).device.type == "cpu"  # the model is handed back where it was


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_linear_backward_flop_count_matches_the_profiler(arch):
    """The engine's FLOP count (benchmarks' floor, issue 8 item 4) equals what torch's profiler counts
    for the matmuls it actually ran."""
    from torch.profiler import profile

    lm = tiny_lm(arch)
    ts = random_transcoders(lm)
    rm = ReplacementModel(lm, ts)
    run = rm.run(torch.tensor(PROMPT))
    d = lm.d_model
    reads = [(lm.n_layers, len(PROMPT) - 1, torch.randn(d)), (2, 3, torch.randn(d)), (2, 1, torch.randn(d)),
             (1, 5, torch.randn(d))]
    for batch, skip0 in [(reads[1:], False), (reads, False), (reads, True)]:  # layers descending, as backward_into takes them
        eng = LinearBackward(rm, run, skip_position0=skip0)
        with profile(with_flops=True) as prof:
            eng.backward_into(batch, lambda l, g: None)
        counted = sum(e.flops for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"))
        assert eng.flops == counted > 0
    with pytest.raises(ValueError, match="sorted by layer"):
        LinearBackward(rm, run).backward_into(reads[::-1], lambda l, g: None)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_blocked_causal_pattern_product_equals_dense(arch, monkeypatch):
    """Long prompts skip the zero upper blocks of Pᵀ; with tiny blocks the blocked path runs here and
    must give autograd's gradients, and the FLOP count must still match the profiler's."""
    import sparsetrace.tracer._linear as lin
    from torch.profiler import profile

    monkeypatch.setattr(lin, "CAUSAL_BLOCK", 2)
    lm, rm, run = _fp64_run(arch)
    gen = torch.Generator().manual_seed(1)
    d = lm.d_model
    reads = [(lm.n_layers, len(PROMPT) - 1, torch.randn(d, dtype=torch.float64, generator=gen)),
             (1, 4, torch.randn(d, dtype=torch.float64, generator=gen))]
    ga, ea = AutogradBackward(rm, run, len(reads)).backward(reads)
    eng = LinearBackward(rm, run)
    with profile(with_flops=True) as prof:
        gb, eb = eng.backward(reads)
    scale = ea.abs().max().item()
    torch.testing.assert_close(gb, ga, atol=1e-12 * scale, rtol=0)
    torch.testing.assert_close(eb, ea, atol=1e-12 * scale, rtol=0)
    counted = sum(e.flops for e in prof.key_averages() if e.key in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"))
    assert eng.flops == counted


def test_bucket_plan_partitions_positions_and_never_pads_more_than_one_bucket():
    from sparsetrace.tracer._contraction import plan_buckets as _plan_buckets

    rng = np.random.default_rng(0)
    for counts in (rng.integers(0, 200, 300), np.full(16, 7), np.array([0]), rng.integers(0, 5, 3)):
        plan = _plan_buckets(counts)
        assert 1 <= len(plan) <= 3
        np.testing.assert_array_equal(np.sort(np.concatenate(plan)), np.arange(len(counts)))
        assert all(np.all(np.diff(p) > 0) for p in plan)
        padded = sum(len(p) * (counts[p].max() + 1) for p in plan)
        assert padded <= len(counts) * (counts.max() + 1)
    skewed = np.r_[np.full(50, 10), np.full(5, 100)]  # a few large groups: splitting must pay
    assert sum(len(p) * (skewed[p].max() + 1) for p in _plan_buckets(skewed)) < 0.3 * 55 * 101


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_contraction_rows_equal_gradient_dot_writes_with_the_buffer_reused(arch):
    """The bucketed contraction, one buffer serving every batch: each batch's rows equal the gradients
    (LinearBackward.backward, every layer and position) dotted with every source's write, on every
    column the store reads — also when a batch reaches fewer positions than an earlier one (the buffer
    is then zeroed whole) and when rows sit at other layers than the last batch's (stale columns)."""
    from sparsetrace.tracer._contraction import Contraction, candidates

    lm, rm, run = _fp64_run(arch)
    cand = candidates(run, rm.transcoders, 1)
    assert any(len(b) > 1 for b in cand.buckets)  # the multi-bucket path is exercised
    lay, L, T = cand.layout, lm.n_layers, len(PROMPT)
    n_feat, n_src = lay.n_features, lay.n_sources
    eng = LinearBackward(rm, run, skip_position0=True)
    gen = torch.Generator().manual_seed(5)
    con = Contraction(run, cand, 6, eng.p0, skips_above=True)
    w = cand.writes(np.arange(n_feat))  # every feature's write a_s·W_dec[f]
    for c_max, n in [(T - 1, 6), (3, 4), (T - 1, 6), (T - 1, 5)]:
        layers = torch.randint(1, L + 1, (n,), generator=gen).sort(descending=True).values
        reads = [(int(l), int(torch.randint(1, c_max + 1, (1,), generator=gen)) if i else c_max,
                  torch.randn(lm.d_model, dtype=torch.float64, generator=gen)) for i, l in enumerate(layers)]
        con.start(n, c_max + 1)
        g_emb, tok0 = eng.backward_into(reads, con.layer)
        rows = con.embedding(g_emb, tok0).clone()
        grads, emb = LinearBackward(rm, run).backward(reads)
        ref = torch.zeros(n, n_src, dtype=torch.float64)
        for j in range(n_feat):
            l, p = int(cand.layer[j]), int(cand.pos[j])
            if l < grads.shape[0]:
                ref[:, j] = grads[l, :, p] @ w[j]
        for l in range(grads.shape[0]):
            ref[:, lay.error_index(np.full(T, l), np.arange(T))] = torch.einsum("btd,td->bt", grads[l], run.error[l])
        ref[:, lay.token_index(np.arange(T))] = torch.einsum("btd,td->bt", emb, run.h0)
        read = torch.ones(n, n_src, dtype=torch.bool)
        for i, (l, _, _) in enumerate(reads):
            ref[i, lay.features_from(min(l, L)) : n_feat] = 0  # a feature row sees only lower layers
            read[i, lay.features_from(min(l, L)) : n_feat] = False  # … and the store skips the rest
        scale = ref.abs().max().item()
        assert scale > 1e-3
        torch.testing.assert_close(rows[read], ref[read], atol=1e-12 * scale, rtol=0)
