"""Training cross-layer transcoders (docs/design.md §14): the sparse decoder kernel against its dense
reference (values and gradients), row-sparse Adam against torch's Adam, the trainer's folding of the
normalisation, a bit-for-bit resume, and a short run on a tiny model with its whole-model metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sparsetrace.errors import ConfigError
from sparsetrace.transcoders.clt_kernels import RowGrads, dense_clt_decode, sparse_clt_decode
from sparsetrace.transcoders.clt_train import CLTTrainer, RowAdam, evaluate_clt, memory_plan, train_clt
from sparsetrace.transcoders.train import TrainConfig, fit

sys.path.insert(0, str(Path(__file__).parent))
from _transcoder_fixtures import tiny_corpus, tiny_lm  # noqa: E402


def _topk_inputs(L=4, N=6, k=3, F=40, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(N)]) for _ in range(L)])
    acts = torch.rand(L, N, k, generator=g, dtype=dtype)
    decoders = [torch.randn(F, L - s, d, generator=g, dtype=dtype) for s in range(L)]
    return acts, idx, decoders


def test_sparse_decode_equals_dense_reference_values_and_gradients():
    acts, idx, decoders = _topk_inputs()
    g_out = torch.randn(4, 6, 8, dtype=torch.float64)
    a1 = acts.clone().requires_grad_(True)
    sink = RowGrads(4)
    y1 = sparse_clt_decode(a1, idx, decoders, sink)
    (y1 * g_out).sum().backward()
    a2 = acts.clone().requires_grad_(True)
    d2 = [W.clone().requires_grad_(True) for W in decoders]
    y2 = dense_clt_decode(a2, idx, d2)
    (y2 * g_out).sum().backward()
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=0, atol=1e-12)
    for s, (got, want) in enumerate(zip(sink.dense(decoders), [W.grad for W in d2])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        # only the active features' rows: the sink holds exactly the ids used by source s
        assert torch.equal(sink.rows[s], torch.unique(idx[s]))
        untouched = torch.ones(decoders[s].shape[0], dtype=torch.bool)
        untouched[sink.rows[s]] = False
        assert untouched.any() and want[untouched].abs().max() == 0


def test_decode_writes_each_source_to_its_targets_only():
    acts, idx, decoders = _topk_inputs()
    acts[1:] = 0  # only layer 0's features: every target sees them
    y = sparse_clt_decode(acts, idx, decoders)
    assert all(y[t].abs().max() > 0 for t in range(4))
    acts2, _, _ = _topk_inputs()
    acts2[:3] = 0  # only the last layer's features: nothing below it
    y2 = sparse_clt_decode(acts2, idx, decoders)
    assert y2[:3].abs().max() == 0 and y2[3].abs().max() > 0


def test_row_adam_is_adam_on_the_touched_rows():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 3, generator=g, dtype=torch.float64)
    ref = W.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    mine = RowAdam([W], (0.9, 0.99), 1e-8)
    for t in range(1, 6):
        grad = torch.randn(6, 3, generator=g, dtype=torch.float64)
        ref.grad = grad.clone()
        opt.step()
        mine.step([torch.arange(6)], [grad], 1e-2, t)  # every row touched: torch's Adam
        torch.testing.assert_close(W, ref.detach(), rtol=0, atol=1e-14)
    before, m_before = W.clone(), mine.exp_avg[0].clone()
    mine.step([torch.tensor([1, 4])], [torch.ones(2, 3, dtype=torch.float64)], 1e-2, 6)
    changed = (W != before).any(1)
    assert changed.tolist() == [False, True, False, False, True, False]
    assert torch.equal(mine.exp_avg[0][[0, 2, 3, 5]], m_before[[0, 2, 3, 5]])


class _Synthetic:
    """A resumable activation source: (x, y) [L, n, d] drawn from the position, y a fixed nonlinear map of
    x that mixes earlier layers into later ones (something cross-layer decoders can use)."""

    def __init__(self, L=3, d=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.L, self.d = L, d
        self.A = torch.randn(L, d, d, generator=g) / d**0.5
        self.position = 0

    def seek(self, position: int) -> None:
        self.position = position

    def read(self, n: int):
        g = torch.Generator().manual_seed(1000 + self.position)
        self.position += 1
        x = 2.0 * torch.randn(self.L, n, self.d, generator=g) + 0.5
        h = torch.relu(torch.bmm(x, self.A))
        y = torch.stack([h[: t + 1].sum(0) for t in range(self.L)])  # layer t's output depends on layers ≤ t
        return x, y


def _cfg(**kw):
    base = dict(cross_layer=True, n_features=16, k=4, n_tokens=64 * 24, batch_tokens=64, shuffle_buffer_tokens=256,
                checkpoint_every_tokens=256, warmup_steps=2, matmul_dtype="float32", progress=False, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def test_training_reduces_fvu_and_saved_clt_reproduces_the_trainer():
    cfg = _cfg(n_tokens=64 * 80)
    tr = CLTTrainer(cfg, 3, 8)
    res = fit(tr, _Synthetic())
    first = tr  # noqa: F841
    assert res.steps == 80
    assert float(res.last_stats.fvu.max()) < 0.6
    clt = res.transcoders
    x, y = _Synthetic().read(100)
    with torch.no_grad():
        xn = x / tr.rms_x.view(-1, 1, 1)
        yhat_n, _, _ = tr.forward(xn)
        acts = [clt[s].encode(x[s]) for s in range(3)]
        for t in range(3):
            torch.testing.assert_close(clt.decode_layer(t, acts, x[t]), yhat_n[t] * tr.rms_y[t], rtol=1e-4, atol=1e-4)
    # cross-layer decoders were trained (they start at 0)
    assert clt.decoder(0)[:, 1:].abs().max() > 0


def test_resume_is_bit_for_bit(tmp_path):
    cfg = _cfg()
    ref = CLTTrainer(cfg, 3, 8)
    fit(ref, _Synthetic(), tmp_path / "ref")

    class Crash(Exception):
        pass

    class Crashing(_Synthetic):
        def read(self, n):
            if self.position == 3:  # after the checkpoints at the ends of buffers 1 and 2
                raise Crash
            return super().read(n)

    with pytest.raises(Crash):
        fit(CLTTrainer(cfg, 3, 8), Crashing(), tmp_path / "run")
    resumed = CLTTrainer(cfg, 3, 8)
    fit(resumed, _Synthetic(), tmp_path / "run", resume=True)
    a, b = ref.state_tensors(), resumed.state_tensors()
    assert a.keys() == b.keys() and any(k.startswith("adam.W_dec") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kw, match", [
    ({"activation": "relu"}, "activation='relu' with cross_layer=True; allowed: topk"),
    ({"layers": (0, 1)}, r"layers=\(0, 1\) with cross_layer=True"),
])
def test_config_refusals(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw)


def test_memory_plan_for_smollm2_fits_24_gb():
    plan = memory_plan(30, 576, 2304)
    assert plan["decoders"] == 2304 * 576 * 465 * 4  # 30·31/2 = 465 (source, target) pairs
    assert plan["total"] < 24e9


def test_train_clt_on_a_tiny_model_and_whole_model_metrics(tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus")
    lm = tiny_lm(n_layers=2, d=32)
    cfg = TrainConfig(cross_layer=True, n_features=64, k=8, n_tokens=4096, batch_tokens=128, shuffle_buffer_tokens=1024,
                      checkpoint_every_tokens=1024, ctx_len=64, model_batch=4, warmup_steps=5, progress=False,
                      model_dtype="float32", matmul_dtype="float32")
    clt = train_clt(lm, corpus, cfg, tmp_path / "clt")
    assert clt.cross_layer and clt.n_layers == 2 and clt.config.training["tokens"] == 4096
    log = [line for line in (tmp_path / "clt" / "train_log.jsonl").read_text().splitlines()]
    import json

    first, last = json.loads(log[0]), json.loads(log[-1])
    assert len(last["fvu"]) == 2 and max(last["fvu"]) < max(first["fvu"])
    m = evaluate_clt(lm, clt, corpus, n_sequences=4, ctx_len=64, batch=2)
    assert len(m.fvu) == 2 and all(0 < v < 1.5 for v in m.fvu)
    assert m.n_tokens == 4 * 63 and m.kl_replaced > 0
    # CE with every MLP replaced, recomputed with plain hooks and whole decoders (position 0 kept)
    from sparsetrace.models.hooks import hooks
    from sparsetrace.transcoders.metrics import cross_entropy

    ids = torch.from_numpy(corpus.sequences("heldout", 0, 4, 64, None))
    acts = {}

    def hook(l):
        def fn(module, args, output):
            x = args[0]
            acts[l] = clt[l].encode(x)
            y = clt.b_dec[l] + sum(acts[s] @ clt.decoder(s)[:, l - s] for s in range(l + 1)) + clt[l].skip(x)
            return torch.cat([output[:, :1], y[:, 1:]], 1)

        return fn

    with torch.no_grad(), hooks([(lm.adapter.mlp(lm.model, l), "forward", hook(l)) for l in range(2)]):
        rep = lm.model(input_ids=ids).logits
    assert m.ce_replaced == pytest.approx(float(cross_entropy(rep, ids).mean()), rel=1e-5)
    assert m.ce_replaced != pytest.approx(m.ce_clean, rel=1e-6)
