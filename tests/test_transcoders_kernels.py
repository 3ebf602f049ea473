"""Sparse TopK kernels == the dense reference path, values and gradients (DESIGN.md §7.8)."""

import pytest
import torch
from torch.testing import assert_close

from sparsetrace.transcoders.kernels import dense_decode, sparse_decode, topk_encode, topk_encode_dense


def _inputs(L=3, N=50, F=40, d=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, N, d, generator=g, dtype=dtype)
    W_enc = torch.randn(L, F, d, generator=g, dtype=dtype)
    b_enc = torch.randn(L, F, generator=g, dtype=dtype)
    W_dec = torch.randn(L, F, d, generator=g, dtype=dtype)
    target = torch.randn(L, N, d, generator=g, dtype=dtype)
    return x, W_enc, b_enc, W_dec, target


def _run(encode, decode, inputs, k, aux_mask=None, k_aux=0):
    x, W_enc, b_enc, W_dec, target = (t.clone().requires_grad_(i < 4) for i, t in enumerate(inputs))
    outs = encode(x, W_enc, b_enc, k, aux_mask, k_aux)
    acts = torch.relu(outs[0])
    yhat = decode(acts, outs[1], W_dec)
    loss = (yhat - target).pow(2).sum()
    if aux_mask is not None:
        a_acts = torch.where(torch.isfinite(outs[2]), torch.relu(outs[2]), torch.zeros_like(outs[2]))
        loss = loss + 0.3 * (decode(a_acts, outs[3], W_dec) - target).pow(2).sum()
    loss.backward()
    # topk(sorted=False) may order ties differently: compare the dense codes, not the raw lists.
    code = torch.zeros(*acts.shape[:2], W_enc.shape[1], dtype=acts.dtype).scatter(-1, outs[1], acts.detach())
    return loss.detach(), yhat.detach(), code, [t.grad for t in (x, W_enc, b_enc, W_dec)]


@pytest.mark.parametrize("k", [1, 5, 40])
def test_sparse_equals_dense_values_and_grads(k):
    inputs = _inputs()
    ref = _run(topk_encode_dense, dense_decode, inputs, k)
    got = _run(topk_encode, sparse_decode, inputs, k)
    for a, b in zip(got[:3], ref[:3]):
        assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(got[3], ref[3]):
        assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert got[3][1].abs().sum() > 0 and got[3][3].abs().sum() > 0  # gradients are not trivially zero


def test_sparse_equals_dense_with_auxk():
    inputs = _inputs(seed=1)
    L, F = 3, 40
    mask = torch.rand(L, F, generator=torch.Generator().manual_seed(2)) < 0.3
    mask[2] = False  # a layer without dead latents: its aux entries are all -inf and contribute 0
    mask[2, :2] = True  # …except two: fewer eligible latents than k_aux
    ref = _run(topk_encode_dense, dense_decode, inputs, 4, mask, 6)
    got = _run(topk_encode, sparse_decode, inputs, 4, mask, 6)
    assert_close(got[0], ref[0], rtol=1e-10, atol=1e-10)
    for a, b in zip(got[3], ref[3]):
        assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_float32_parity():
    inputs = _inputs(L=2, N=300, F=256, d=32, dtype=torch.float32, seed=3)
    ref = _run(topk_encode_dense, dense_decode, inputs, 8)
    got = _run(topk_encode, sparse_decode, inputs, 8)
    assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)
    for a, b in zip(got[3], ref[3]):
        assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_sparse_path_is_deterministic():
    inputs = _inputs(L=2, N=200, F=128, d=16, dtype=torch.float32)
    a = _run(topk_encode, sparse_decode, inputs, 8)
    b = _run(topk_encode, sparse_decode, inputs, 8)
    for ga, gb in zip(a[3], b[3]):
        assert torch.equal(ga, gb)
