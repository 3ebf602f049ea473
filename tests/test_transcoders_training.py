"""Training on a tiny random Llama: FVU goes down, SIGKILL + resume is bit-for-bit, 2 processes ==
1 process, and the evaluation's metrics (CE recovered of the identity replacement is 100 %)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from sparsetrace.transcoders.evaluate import evaluate_transcoders
from sparsetrace.models.loading import splice_mlps
from sparsetrace.transcoders.training import ModelActivationSource, outlier_mask, train_transcoders
from sparsetrace.transcoders.io import load_transcoders
from sparsetrace.transcoders.metrics import ce_recovered, cross_entropy
from sparsetrace.transcoders.train import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from _transcoder_fixtures import tiny_corpus, tiny_lm  # noqa: E402

JOB = Path(__file__).parent / "_transcoder_job.py"
N_TOKENS = 5120  # 40 steps of 128 tokens; checkpoints every 512


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


def _job(out, corpus, *extra, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-W", "ignore", str(JOB), str(out), str(corpus.path), str(N_TOKENS), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _weights(folder):
    return {f"{i}.{k}": v for i in range(2) for k, v in load_file(folder / f"layer_{i}.safetensors").items()}


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    p = _job(out, corpus)
    assert p.wait(timeout=120) == 0, p.stdout.read().decode()
    return out


def test_sigkill_then_resume_is_bit_for_bit(corpus, reference_run, tmp_path):
    out = tmp_path / "killed"
    p = _job(out, corpus, "--slow", "0.4")
    latest = out / "checkpoint" / "latest.json"
    deadline = time.time() + 90
    while not latest.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert latest.exists() and p.poll() is None, "no checkpoint before the job ended"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "config.json").exists()  # it really died mid-run
    ckpt_tokens = json.loads(latest.read_text())["tokens"]
    assert 0 < ckpt_tokens < N_TOKENS
    r = _job(out, corpus, "--resume")
    assert r.wait(timeout=120) == 0, r.stdout.read().decode()
    ref, got = _weights(reference_run), _weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(line) for line in (reference_run / "train_log.jsonl").read_text().splitlines()]
    # The records after the checkpoint were dropped at resume and logged again: same as uninterrupted.
    assert [(r["step"], r["fvu"], r["loss"]) for r in log] == [(r["step"], r["fvu"], r["loss"]) for r in ref_log]
    assert log[-1]["tokens"] == N_TOKENS and len(log[-1]["fvu"]) == 2


def test_two_processes_layer_parallel_equal_one(corpus, reference_run, tmp_path):
    out = tmp_path / "dist"
    init = tmp_path / "init"
    ps = [_job(out, corpus, "--rank", str(r), "--world", "2", "--init", str(init)) for r in range(2)]
    for p in ps:
        assert p.wait(timeout=120) == 0, p.stdout.read().decode()
    ref, got = _weights(reference_run), _weights(out)
    # Same data, same per-layer seeds and layer-independent losses: equal up to float rounding (a batched
    # BLAS call over 1 layer may round differently from one over 2; measured ≤ 1.2e-7 absolute here).
    for k in ref:
        assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(line) for line in (reference_run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == len(ref_log)
    for a, b in zip(log, ref_log):  # rank 0's log has both layers' stats (all-reduced)
        assert_close(torch.tensor(a["fvu"]), torch.tensor(b["fvu"]), rtol=1e-4, atol=1e-5)


def test_short_training_reduces_fvu_and_evaluation(corpus, tmp_path):
    lm = tiny_lm()
    cfg = TrainConfig(n_features=128, k=8, skip=False, skip_init="zero", n_tokens=128 * 60, batch_tokens=128,
                      shuffle_buffer_tokens=1024, ctx_len=32, model_batch=8, warmup_steps=5, lr=4e-3,
                      checkpoint_every_tokens=0, log_every_steps=1, progress=False)
    ts = train_transcoders(lm, corpus, cfg, tmp_path / "set")
    log = [json.loads(line) for line in (tmp_path / "set" / "train_log.jsonl").read_text().splitlines()]
    assert all(f > 0.9 for f in log[0]["fvu"])  # W_dec = 0 at init: the mean predictor
    res = evaluate_transcoders(lm, ts, corpus, n_sequences=8, ctx_len=32, batch=4, out_dir=tmp_path / "set")
    assert all(f < 0.4 for f in res.fvu), res.fvu
    assert all(l0 == pytest.approx(8.0, abs=0.01) for l0 in res.l0)
    assert res.ce_zero > res.ce_clean and res.n_tokens == 8 * 31
    assert res.ce_recovered == pytest.approx(ce_recovered(res.ce_clean, res.ce_replaced, res.ce_zero))
    assert len(res.delta_ce) == 2 and len(res.kl) == 2 and min(res.kl) >= 0
    saved = json.loads((tmp_path / "set" / "config.json").read_text())
    assert saved["metrics"]["fvu"] == res.fvu and saved["training"]["tokens"] == 128 * 60
    assert (tmp_path / "set" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert load_transcoders(tmp_path / "set").config.metrics["ce_recovered"] == res.ce_recovered


def test_bfloat16_model_forward_trains_as_well_and_hands_the_model_back_in_float32(corpus, tmp_path):
    """model_dtype="bfloat16": the harvesting forward runs in bf16 (its x̃, y are the fp32 ones up to
    bf16 rounding), the transcoders train in fp32 to the same held-out FVU, and the model comes back fp32."""
    lm = tiny_lm()
    ids = torch.from_numpy(corpus.sequences("train", 0, 2, 16))
    from sparsetrace.models.loading import collect_mlp_io

    x32, y32 = collect_mlp_io(lm, ids, [0, 1])
    lm.to(dtype=torch.bfloat16)
    x16, y16 = collect_mlp_io(lm, ids, [0, 1])
    lm.to(dtype=torch.float32)
    assert x16.dtype == torch.bfloat16 and not torch.equal(x16.float(), x32)
    assert_close(y16.float(), y32, rtol=0, atol=0.05 * y32.abs().max().item())
    fvu = {}
    for dt in ("float32", "bfloat16"):
        cfg = TrainConfig(n_features=128, k=8, skip=False, skip_init="zero", n_tokens=128 * 40, batch_tokens=128,
                          shuffle_buffer_tokens=1024, ctx_len=32, model_batch=8, warmup_steps=5, lr=4e-3,
                          checkpoint_every_tokens=0, progress=False, model_dtype=dt)
        ts = train_transcoders(lm, corpus, cfg, tmp_path / dt)
        assert lm.dtype == torch.float32 and ts[0].W_enc.dtype == torch.float32
        assert json.loads((tmp_path / dt / "config.json").read_text())["training"]["config"]["model_dtype"] == dt
        fvu[dt] = evaluate_transcoders(lm, ts, corpus, n_sequences=8, ctx_len=32, batch=4).fvu
    assert fvu["bfloat16"] != fvu["float32"]  # it really read other activations
    assert max(abs(a - b) for a, b in zip(fvu["bfloat16"], fvu["float32"])) < 0.05, fvu
    with pytest.raises(Exception, match="model_dtype='float16'; allowed: auto, float32, bfloat16"):
        TrainConfig(model_dtype="float16")


def test_identity_replacement_recovers_all_ce(corpus):
    lm = tiny_lm()
    ids = torch.from_numpy(corpus.sequences("heldout", 0, 4, 32))
    with torch.no_grad():
        clean = cross_entropy(lm.model(input_ids=ids).logits, ids).mean()
        with splice_mlps(lm, {0: lambda x, y: y, 1: lambda x, y: y}):
            same = cross_entropy(lm.model(input_ids=ids).logits, ids).mean()
        with splice_mlps(lm, {0: lambda x, y: torch.zeros_like(y), 1: lambda x, y: torch.zeros_like(y)}):
            zero = cross_entropy(lm.model(input_ids=ids).logits, ids).mean()
    assert zero != clean
    assert ce_recovered(float(clean), float(same), float(zero)) == 100.0


def test_activation_source_drops_position_zero_and_outliers(corpus):
    lm = tiny_lm()
    src = ModelActivationSource(lm, corpus, [0, 1], [1], ctx_len=16, model_batch=2, outlier_factor=10.0)
    x, y = src.read(40)
    assert x.shape == (1, 40, 32) and src.position == 4  # 2 batches of 2 × 15 tokens, cut to 40
    from sparsetrace.models.loading import collect_mlp_io

    xa, ya = collect_mlp_io(lm, torch.from_numpy(corpus.sequences("train", 0, 2, 16)), [0, 1])
    assert torch.equal(x[0, :15], xa[1, 0, 1:])  # position 0 skipped
    xx = torch.ones(2, 5, 3)
    xx[1, 3] = 100.0
    assert outlier_mask(xx, torch.ones(2, 5, 3), 10.0).tolist() == [True, True, True, False, True]


def test_resume_refuses_changed_config_and_fresh_run_refuses_existing_checkpoint(corpus, reference_run, tmp_path):
    from sparsetrace.errors import ConfigError

    lm = tiny_lm()
    sys.path.insert(0, str(JOB.parent))
    from _transcoder_job import job_config

    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    with pytest.raises(ConfigError, match="already has a checkpoint; pass resume=True"):
        train_transcoders(lm, corpus, job_config(N_TOKENS), out)
    changed = TrainConfig(**{**job_config(N_TOKENS).to_dict(), "k": 5, "layers": None})
    with pytest.raises(ConfigError, match="resume with a different training config"):
        train_transcoders(lm, corpus, changed, out, resume=True)


def test_checkpoint_transcoders_for_a_run_in_progress(reference_run):
    from sparsetrace.transcoders.training import checkpoint_transcoders

    ts = checkpoint_transcoders(reference_run, model_id="tiny-llama")
    latest = json.loads((reference_run / "checkpoint" / "latest.json").read_text())
    assert ts.config.training["tokens"] == latest["tokens"] < N_TOKENS
    assert (ts.n_layers, ts.d_in, ts.n_features, ts.config.k) == (2, 32, 64, 4)
    final = load_transcoders(reference_run)
    assert not torch.equal(ts[0].W_dec, final[0].W_dec)  # an earlier state than the end of the run
    x = torch.randn(3, 32)
    assert ts[0](x).shape == (3, 32) and torch.isfinite(ts[0](x)).all()


def test_bad_inputs_fail_with_one_line_and_leave_the_last_checkpoint_untouched(corpus, reference_run, tmp_path):
    """Too few tokens for the budget is refused up front; a corrupt checkpoint is named, not crashed on,
    and the files of the last good checkpoint stay as they were."""
    import shutil

    from sparsetrace.errors import ConfigError, FormatError

    sys.path.insert(0, str(JOB.parent))
    from _transcoder_job import job_config

    lm = tiny_lm()
    cfg = job_config(N_TOKENS)
    too_many = TrainConfig(**{**cfg.to_dict(), "layers": None, "n_tokens": 10**9})
    with pytest.raises(ConfigError, match=r"n_tokens=1,000,000,000: the corpus's train split has [\d,]+ trainable tokens"):
        train_transcoders(lm, corpus, too_many, tmp_path / "big")
    assert not (tmp_path / "big" / "checkpoint").exists()
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    latest = json.loads((out / "checkpoint" / "latest.json").read_text())["checkpoint"]
    ckpt = out / "checkpoint" / latest / "rank0.safetensors"
    before = ckpt.read_bytes()
    ckpt.write_bytes(before[: len(before) // 2])  # truncated, as a crash mid-copy would leave it
    with pytest.raises(FormatError, match="is not a readable safetensors file"):
        train_transcoders(lm, corpus, cfg, out, resume=True)
    assert ckpt.read_bytes() == before[: len(before) // 2]  # nothing rewritten or deleted
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["checkpoint"] == latest


def test_activation_source_keeps_the_named_layers_whatever_the_collect_order(corpus):
    lm = tiny_lm()
    a = ModelActivationSource(lm, corpus, [0, 1], [1], ctx_len=16, model_batch=2, outlier_factor=10.0).read(40)
    b = ModelActivationSource(lm, corpus, [1, 0], [1], ctx_len=16, model_batch=2, outlier_factor=10.0).read(40)
    c = ModelActivationSource(lm, corpus, [1, 0], [0], ctx_len=16, model_batch=2, outlier_factor=10.0).read(40)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])  # layer 0's activations, not layer 1's


def test_warm_start_reproduces_the_set_it_starts_from_and_continues_from_its_loss(corpus, tmp_path):
    from sparsetrace.errors import ConfigError
    from sparsetrace.transcoders.train import Trainer

    lm = tiny_lm()
    base = dict(n_features=128, k=8, n_tokens=128 * 30, batch_tokens=128, shuffle_buffer_tokens=1024, ctx_len=32,
                model_batch=8, warmup_steps=5, lr=4e-3, checkpoint_every_tokens=0, log_every_steps=1, progress=False)
    first = train_transcoders(lm, corpus, TrainConfig(**base), tmp_path / "a")
    log_a = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    # Trainer level: after initialise on new data (new scales), to_transcoders() gives the same functions back.
    tr = Trainer(TrainConfig(**base), 2, lm.d_model)
    tr.warm_start(list(first.transcoders))
    x = torch.randn(2, 512, lm.d_model) * torch.tensor([3.0, 0.5]).view(2, 1, 1)
    tr.initialize(x, torch.randn(2, 512, lm.d_model) * 7)
    for got, want in zip(tr.to_transcoders(), first.transcoders):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
            assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)
    # A warm-started run starts near where the first one ended, far below a fresh run's first step.
    train_transcoders(lm, corpus, TrainConfig(**{**base, "init_from": str(tmp_path / "a"), "lr": 1e-5}), tmp_path / "b")
    log_b = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    for a0, a_end, b0 in zip(log_a[0]["fvu"], log_a[-1]["fvu"], log_b[0]["fvu"]):
        assert b0 < min(a_end + 0.02, a0), (log_a[0]["fvu"], log_a[-1]["fvu"], log_b[0]["fvu"])
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["training"]["config"]["init_from"] == str(tmp_path / "a")
    # Another shape, or no set at all: a one-line error naming init_from.
    with pytest.raises(ConfigError, match=r"init_from: layer 0 has .*n_features"):
        train_transcoders(lm, corpus, TrainConfig(**{**base, "n_features": 64, "init_from": str(tmp_path / "a")}),
                          tmp_path / "c")
    with pytest.raises(ConfigError, match="init_from=.*not a readable transcoder set"):
        train_transcoders(lm, corpus, TrainConfig(**{**base, "init_from": str(tmp_path / "nothing")}), tmp_path / "d")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()  # refused before anything is written


def test_resume_with_a_new_token_budget_equals_a_run_started_with_it(corpus, tmp_path, monkeypatch):
    from sparsetrace.errors import ConfigError
    from sparsetrace.transcoders.train import Trainer

    lm = tiny_lm()
    base = dict(n_features=64, k=4, batch_tokens=128, shuffle_buffer_tokens=512, ctx_len=32, model_batch=8,
                warmup_steps=5, lr=4e-3, checkpoint_every_tokens=512, log_every_steps=1, progress=False, decay_fraction=0.25)
    # The direct run: 48 steps, decay over the last 12.
    train_transcoders(lm, corpus, TrainConfig(**base, n_tokens=128 * 48), tmp_path / "direct")
    # A run planned for 64 steps crashes at step 26; its last checkpoint is at step 24 (before either decay) ...
    step = Trainer.step

    def crash(self, x, y):
        if self.step_count == 26:
            raise KeyboardInterrupt
        return step(self, x, y)

    monkeypatch.setattr(Trainer, "step", crash)
    with pytest.raises(KeyboardInterrupt):
        train_transcoders(lm, corpus, TrainConfig(**base, n_tokens=128 * 64), tmp_path / "long")
    monkeypatch.setattr(Trainer, "step", step)
    assert json.loads((tmp_path / "long" / "checkpoint" / "latest.json").read_text())["step"] == 24
    # ... and is resumed with a 48-step budget: the same weights as the direct run, bit for bit.
    train_transcoders(lm, corpus, TrainConfig(**base, n_tokens=128 * 48), tmp_path / "long", resume=True)
    direct, resumed = _weights(tmp_path / "direct"), _weights(tmp_path / "long")
    assert direct.keys() == resumed.keys()
    for k, v in direct.items():
        assert torch.equal(resumed[k], v), k
    # A budget whose decay would have started before the checkpoint (step 44 now) is refused, naming n_tokens.
    with pytest.raises(ConfigError, match=r"resume with a different training config: \{'n_tokens'.*only n_tokens may change"):
        train_transcoders(lm, corpus, TrainConfig(**base, n_tokens=128 * 28), tmp_path / "long", resume=True)
