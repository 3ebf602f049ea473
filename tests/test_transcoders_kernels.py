"""Sparse TopK kernels == the dense reference path, values and gradients (docs/design.md §7, §9)."""

import pytest
import torch
from torch.testing import assert_close

from sparsetrace.transcoders.kernels import dense_decode, low_matmul, sparse_decode, topk_encode, topk_encode_dense


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


def test_bfloat16_selection_returns_exact_values_of_near_top_latents_and_their_gradients():
    """select_dtype=bfloat16: the latents are picked from a bf16 product, but (1) the values returned are
    the exact fp32 pre-activations of the picked latents, (2) every picked latent is within the bf16
    rounding bound of the true k-th value (and most rows pick exactly the true top-k), (3) gradients
    are those of the exact pre-activations at the picked ids."""
    x, W_enc, b_enc, _, _ = _inputs(L=2, N=400, F=256, d=64, dtype=torch.float32, seed=5)
    k = 8
    x.requires_grad_(True)
    W_enc.requires_grad_(True)
    b_enc.requires_grad_(True)
    vals, idx = topk_encode(x, W_enc, b_enc, k, select_dtype=torch.bfloat16)
    pre = torch.baddbmm(b_enc.unsqueeze(1), x, W_enc.transpose(1, 2))  # the exact fp32 pre-activations
    assert_close(vals, pre.gather(-1, idx), rtol=1e-5, atol=1e-5)
    # bf16 rounds each input to 2^-8 relative: |pre_bf16 - pre| <= ~2^-7 (|x|·|W| + |b|) per entry
    bound = 2.0**-7 * (torch.bmm(x.abs(), W_enc.abs().transpose(1, 2)) + b_enc.abs().unsqueeze(1))
    kth = pre.topk(k, dim=-1).values[..., -1:]
    picked_bound = bound.gather(-1, idx).max(-1, keepdim=True).values + bound.max(-1, keepdim=True).values
    assert (pre.gather(-1, idx) >= kth - picked_bound).all()
    same = (idx.sort(-1).values == pre.topk(k, dim=-1).indices.sort(-1).values).all(-1)
    assert same.float().mean() > 0.8, same.float().mean()
    g = torch.randn(vals.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((vals * g).sum(), (x, W_enc, b_enc))
    ref = torch.autograd.grad((pre.gather(-1, idx) * g).sum(), (x, W_enc, b_enc))
    for a, b in zip(grads, ref):
        assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_low_matmul_rounds_inputs_to_bfloat16_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 24, generator=g, requires_grad=True)
    W = torch.randn(2, 20, 24, generator=g, requires_grad=True)
    up = torch.randn(2, 30, 20, generator=g)
    out = low_matmul(x, W, torch.bfloat16)
    assert out.dtype == torch.float32
    r = lambda t: t.detach().bfloat16().double()  # noqa: E731 - the rounded inputs, products in fp64
    assert_close(out.double(), torch.bmm(r(x), r(W).transpose(1, 2)), rtol=2**-7, atol=1e-2)
    assert not torch.equal(out, torch.bmm(x, W.transpose(1, 2)))  # it really ran in bf16
    gx, gW = torch.autograd.grad((out * up).sum(), (x, W))
    assert_close(gx.double(), torch.bmm(r(up), r(W)), rtol=2**-7, atol=1e-2)
    assert_close(gW.double(), torch.bmm(r(up).transpose(1, 2), r(x)), rtol=2**-7, atol=1e-2)
    assert torch.equal(low_matmul(x, W, torch.float32), torch.bmm(x, W.transpose(1, 2)))


def test_masked_topk_equals_a_full_masked_topk():
    """AuxK's selection reads only the marked columns; it must pick what a top-k over all F columns
    with the unmarked ones at −inf picks (as sets per row, ties aside: continuous random values)."""
    from sparsetrace.transcoders.kernels import _masked_topk

    g = torch.Generator().manual_seed(5)
    pre = torch.randn(3, 50, 64, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 64, generator=g) < 0.25
    mask[1] = False
    mask[1, [3, 40]] = True  # fewer marked than k: padded with −inf
    k = 7
    vals, ids = _masked_topk(pre.clone(), mask, k)
    ref_vals, ref_ids = pre.masked_fill(~mask.unsqueeze(1), float("-inf")).topk(k, dim=-1)
    assert vals.shape == ids.shape == (3, 50, k)
    assert torch.equal(vals.sort(-1).values, ref_vals.sort(-1).values)
    finite = torch.isfinite(vals)
    assert torch.equal(pre.gather(2, ids)[finite], vals[finite])  # each finite value is at its id
    assert mask.gather(1, ids.reshape(3, -1)).view(3, 50, k)[finite].all()  # and that id is marked
    for l in (0, 2):  # layers with ≥ k marked: the same ids
        assert torch.equal(ids[l].sort(-1).values, ref_ids[l].sort(-1).values)
    assert int(finite[1].sum(-1).max()) == 2


def test_bucket_order_is_a_stable_sort():
    from sparsetrace.transcoders._select import bucket_order

    keys = torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(8))
    keys[:7] = 49
    order, crow = bucket_order(keys.numpy(), 60)
    assert torch.equal(torch.from_numpy(order), torch.argsort(keys, stable=True))
    ref = torch.zeros(61, dtype=torch.int64)
    ref[1:] = torch.bincount(keys, minlength=60).cumsum(0)
    assert torch.equal(torch.from_numpy(crow), ref)
