"""TrainConfig validation, trainer initialisation, normalisation folding, state round trip, metrics."""

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from sparsetrace.errors import ConfigError
from sparsetrace.transcoders import metrics
from sparsetrace.transcoders.train import TrainConfig, Trainer


def _data(L=2, N=2048, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L, d, d, generator=g)
    x = 3.0 * torch.randn(L, N, d, generator=g) + 1.0
    y = 5.0 * torch.relu(torch.bmm(x, A)) - 2.0
    return x, y


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"activation": "gelu"}, "activation='gelu'; allowed: relu, jumprelu, topk"),
        ({"skip_init": "svd"}, "skip_init='svd'; allowed: zero, lstsq"),
        ({"k": 0}, "k=0; allowed: a positive integer"),
        ({"n_features": 8, "k": 9}, r"k=9; allowed: 1..n_features \(8\)"),
        ({"batch_tokens": 8192, "shuffle_buffer_tokens": 4096}, "shuffle_buffer_tokens=4096; allowed: ≥ batch_tokens"),
        ({"lr": -1.0}, "lr=-1.0; allowed: a positive float or None"),
        ({"decay_fraction": 1.5}, "decay_fraction=1.5; allowed: 0..1"),
        ({"layers": (1, 1)}, r"layers=\(1, 1\); allowed: distinct"),
    ],
)
def test_config_errors_name_argument_and_allowed(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_config_fields_are_simple_types_and_round_trip():
    cfg = TrainConfig(layers=(0, 3), lr=1e-3)
    for f in dataclasses.fields(cfg):
        assert f.type in ("int", "float", "bool", "str", "int | None", "float | None", "str | None",
                          "tuple[int, ...] | None"), f
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown training config keys"):
        TrainConfig.from_dict({"nope": 1})
    assert cfg.features_for(576) == 2304  # 4× d_model: a shipped 30-layer fp16 set stays under 200 MB
    assert TrainConfig().lr_for(2**14) == pytest.approx(2e-4)
    assert TrainConfig().lr_for(2**12) == pytest.approx(4e-4)


def test_lr_schedule_warmup_and_decay():
    cfg = TrainConfig(n_tokens=100 * 4096, batch_tokens=4096, warmup_steps=10, decay_fraction=0.2)
    assert cfg.lr_scale(0) == pytest.approx(0.1)
    assert cfg.lr_scale(9) == 1.0 and cfg.lr_scale(50) == 1.0
    assert cfg.lr_scale(90) == pytest.approx(0.5)
    assert cfg.lr_scale(99) == pytest.approx(0.05)


def test_init_is_mean_predictor_and_lstsq_skip():
    x, y = _data()
    for skip_init in ("zero", "lstsq"):
        cfg = TrainConfig(n_features=32, k=4, skip_init=skip_init, progress=False)
        tr = Trainer(cfg, 2, 16)
        tr.initialize(x, y)
        tcs = tr.to_transcoders()
        for l, tc in enumerate(tcs):
            assert torch.count_nonzero(tc.W_dec) == 0
            pre = tc.pre_activation(x[l].mean(0))
            assert_close(pre, torch.zeros_like(pre), atol=1e-4, rtol=0)  # b_enc = −W_enc·mean(x̃)
            with torch.no_grad():
                yhat = tc(x[l])
            assert_close(yhat.mean(0), y[l].mean(0), atol=1e-3, rtol=1e-4)  # ŷ's mean is ȳ
            f = float(metrics.fvu(y[l], yhat))
            if skip_init == "zero":
                assert f == pytest.approx(1.0, abs=1e-5)  # the mean predictor
            else:
                ref = torch.linalg.lstsq(
                    torch.cat([x[l], torch.ones(len(x[l]), 1)], 1).double(), y[l].double()
                ).solution
                best = float(metrics.fvu(y[l], (torch.cat([x[l], torch.ones(len(x[l]), 1)], 1).double() @ ref)))
                assert f == pytest.approx(best, abs=2e-3)  # ridge ≈ the exact least-squares fit


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_saved_transcoder_reproduces_trainer_output(activation):
    """Normalisation folded into the weights: the raw-unit transcoder = rms_y × the trainer's forward."""
    x, y = _data(N=512)
    cfg = TrainConfig(n_features=32, k=4, activation=activation, batch_tokens=256, n_tokens=2560,
                      shuffle_buffer_tokens=512, warmup_steps=1, progress=False, matmul_dtype="float32")
    tr = Trainer(cfg, 2, 16)
    tr.initialize(x, y)
    for _ in range(5):
        tr.step(x[:, :256], y[:, :256])
    xn, _ = tr._normalise(x, y)
    with torch.no_grad():
        yhat_n = tr.forward(xn)[0]
    for l, tc in enumerate(tr.to_transcoders()):
        assert_close(tc(x[l]), yhat_n[l] * tr.rms_y[l], rtol=1e-4, atol=1e-4)


def test_training_reduces_fvu_and_state_round_trip():
    x, y = _data(N=4096)
    cfg = TrainConfig(n_features=64, k=8, skip=False, skip_init="zero", batch_tokens=512, n_tokens=512 * 60,
                      shuffle_buffer_tokens=4096, warmup_steps=5, lr=5e-3, progress=False)
    tr = Trainer(cfg, 2, 16)
    tr.initialize(x, y)
    first = tr.step(x[:, :512], y[:, :512]).fvu
    for i in range(40):
        s = (i % 8) * 512
        tr.step(x[:, s : s + 512], y[:, s : s + 512])
    last = tr.step(x[:, :512], y[:, :512]).fvu
    assert (first > 0.9).all() and (last < 0.35 * first).all(), (first, last)
    # State round trip: a fresh trainer loaded from the state tensors takes the identical next step.
    state = tr.state_tensors()
    tr2 = Trainer(cfg, 2, 16)
    tr2.load_state_tensors(state)
    a, b = tr.step(x[:, 512:1024], y[:, 512:1024]), tr2.step(x[:, 512:1024], y[:, 512:1024])
    assert torch.equal(a.fvu, b.fvu)
    for k in tr.params:
        assert torch.equal(tr.params[k], tr2.params[k])


def test_dead_latents_are_detected_and_auxk_revives_them():
    x, y = _data(N=2048)
    cfg = TrainConfig(n_features=64, k=2, batch_tokens=256, n_tokens=256 * 40, shuffle_buffer_tokens=2048,
                      dead_tokens=512, warmup_steps=1, lr=3e-3, progress=False)
    tr = Trainer(cfg, 2, 16)
    tr.initialize(x, y)
    with torch.no_grad():
        # Half the latents get a small constant positive pre-activation: they never win the top-k
        # (dead) but are positive, so AuxK (ReLU'd like the main top-k) can train them.
        tr.params["W_enc"][:, :32] = 0.0
        tr.params["b_enc"][:, :32] = 0.01
    stats = [tr.step(x[:, (i % 8) * 256 : (i % 8 + 1) * 256], y[:, (i % 8) * 256 : (i % 8 + 1) * 256]) for i in range(3)]
    assert (stats[-1].dead_fraction >= 0.5).all()
    grad_seen = tr.params["W_dec"].grad[:, :32].abs().sum()
    assert grad_seen > 0  # AuxK trains the dead latents' decoder rows


def _revived(auxk_coef: float, steps: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    """Train with half the latents rigged dead; → (per layer, the fraction of the rigged latents that
    ever won the top-k; the final dead fraction)."""
    x, y = _data(N=2048)
    cfg = TrainConfig(n_features=64, k=2, batch_tokens=256, n_tokens=256 * steps, shuffle_buffer_tokens=2048,
                      dead_tokens=512, warmup_steps=1, lr=3e-3, progress=False, auxk_coef=auxk_coef)
    tr = Trainer(cfg, 2, 16)
    tr.initialize(x, y)
    with torch.no_grad():
        tr.params["W_enc"][:, :32] = 0.0
        tr.params["b_enc"][:, :32] = 0.01
    ever = torch.zeros(2, 64, dtype=torch.bool)
    for i in range(steps):
        stats = tr.step(x[:, (i % 8) * 256 : (i % 8 + 1) * 256], y[:, (i % 8) * 256 : (i % 8 + 1) * 256])
        ever |= tr.since_fired < 256  # fired within this step's 256 tokens
    return ever[:, :32].double().mean(1), stats.dead_fraction


def test_auxk_revives_dead_latents_and_nothing_else_does():
    """AuxK trains the dead latents' encoders until some win the top-k again; with AuxK off, the same
    run (same data, same seed) never fires one of them."""
    revived, dead = _revived(1 / 32)
    assert (revived > 0).all(), revived
    assert (dead < 0.5).all(), dead
    revived0, dead0 = _revived(0.0)
    assert (revived0 == 0).all() and (dead0 == 0.5).all(), (revived0, dead0)


def test_metric_definitions():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(100, 8, generator=g, dtype=torch.float64)
    assert float(metrics.fvu(y, y)) == 0.0
    assert float(metrics.fvu(y, y.mean(0).expand_as(y))) == pytest.approx(1.0, abs=1e-12)
    assert float(metrics.fvu(y, torch.zeros_like(y))) == pytest.approx(
        float(y.double().pow(2).sum() / (y.double() - y.double().mean(0)).pow(2).sum()), rel=1e-12
    )
    acc = metrics.FVUAccumulator()
    yhat = y + 0.1 * torch.randn(100, 8, generator=g, dtype=torch.float64)
    for s in range(0, 100, 30):
        acc.update(y[s : s + 30], yhat[s : s + 30])
    assert acc.value() == pytest.approx(float(metrics.fvu(y, yhat)), rel=1e-9)
    a = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert metrics.l0(a) == 1.5
    assert metrics.dead_fraction(torch.tensor([0, 3, 0, 1])) == 0.5
    assert metrics.ce_recovered(2.0, 2.0, 5.0) == 100.0
    assert metrics.ce_recovered(2.0, 5.0, 5.0) == 0.0
    assert metrics.ce_recovered(2.0, 3.0, 6.0) == 75.0
    logits = torch.randn(3, 5, 11, generator=g)
    assert_close(metrics.kl_divergence(logits, logits), torch.zeros(3, 5, dtype=torch.float64))
    ids = torch.randint(0, 11, (3, 5), generator=g)
    ce = metrics.cross_entropy(logits, ids)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11).double(), ids[:, 1:].reshape(-1), reduction="none")
    assert_close(ce.reshape(-1), ref)


def test_jumprelu_straight_through_gradients():
    from sparsetrace.transcoders.train import _JumpReLU, _Step

    pre = torch.tensor([[0.30, 0.5004, 0.4997, 0.9]], dtype=torch.float64, requires_grad=True)
    theta = torch.full((4,), 0.5, dtype=torch.float64, requires_grad=True)
    eps = 1e-3
    out = _JumpReLU.apply(pre, theta, eps)
    assert out.tolist() == [[0.0, 0.5004, 0.0, 0.9]]
    out.sum().backward()
    # ∂a/∂pre = H(pre − θ); ∂a/∂θ = −θ/ε · 1[|pre − θ| < ε/2]
    assert pre.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    assert theta.grad.tolist() == [0.0, -500.0, -500.0, 0.0]
    theta.grad = None
    _Step.apply(pre, theta, eps).sum().backward()
    assert theta.grad.tolist() == [0.0, -1000.0, -1000.0, 0.0]


def test_jumprelu_threshold_is_trained_and_saved():
    x, y = _data(N=512)
    cfg = TrainConfig(n_features=32, activation="jumprelu", batch_tokens=256, n_tokens=2560, shuffle_buffer_tokens=512,
                      warmup_steps=1, jumprelu_bandwidth=0.5, progress=False)
    tr = Trainer(cfg, 2, 16)
    tr.initialize(x, y)
    before = tr.params["log_threshold"].detach().clone()
    for _ in range(3):
        tr.step(x[:, :256], y[:, :256])
    assert not torch.equal(before, tr.params["log_threshold"])
    for l, tc in enumerate(tr.to_transcoders()):
        assert_close(tc.threshold, tr.params["log_threshold"][l].exp().detach())


def test_bfloat16_products_train_as_well_as_float32():
    """matmul_dtype="bfloat16" (the encoder's selecting product and the skip path): the same data and
    seed reach the same FVU as float32 within a few per cent, and the weights really differ."""
    x, y = _data(N=4096)
    fvu = {}
    weights = {}
    for dt in ("float32", "bfloat16"):
        cfg = TrainConfig(n_features=64, k=4, batch_tokens=256, n_tokens=256 * 40, shuffle_buffer_tokens=4096,
                          warmup_steps=2, lr=3e-3, progress=False, matmul_dtype=dt)
        tr = Trainer(cfg, 2, 16)
        assert tr.config.matmul_dtype == dt
        tr.initialize(x, y)
        for s in range(40):
            b = slice((s % 16) * 256, (s % 16 + 1) * 256)
            stats = tr.step(x[:, b], y[:, b])
        fvu[dt] = stats.fvu
        weights[dt] = tr.params["W_enc"].detach().clone()
    assert not torch.equal(weights["float32"], weights["bfloat16"])
    assert_close(fvu["bfloat16"], fvu["float32"], rtol=0.05, atol=0.01)


def test_auto_dtypes_resolve_to_this_machine():
    from sparsetrace.transcoders.train import fast_dtype

    cfg = TrainConfig()
    assert (cfg.model_dtype, cfg.matmul_dtype) == ("auto", "auto")
    r = cfg.resolved("cpu")
    assert r.model_dtype == r.matmul_dtype == fast_dtype("cpu") in ("float32", "bfloat16")
    assert TrainConfig(matmul_dtype="float32").resolved("cpu").matmul_dtype == "float32"  # explicit wins
    assert Trainer(TrainConfig(n_features=8, k=2), 1, 4).config.matmul_dtype == fast_dtype("cpu")
    with pytest.raises(Exception, match="matmul_dtype='float16'; allowed: auto, float32, bfloat16"):
        TrainConfig(matmul_dtype="float16")


class _Buffers:
    """An in-memory ActivationSource: consecutive slices of fixed (x, y)."""

    def __init__(self, x, y):
        self.x, self.y, self.position = x, y, 0

    def read(self, n):
        s = slice(self.position, self.position + n)
        self.position += n
        return self.x[:, s], self.y[:, s]

    def seek(self, position):
        self.position = position


def _fit_config(**kw):
    base = dict(n_features=32, k=4, n_tokens=8 * 256, batch_tokens=256, shuffle_buffer_tokens=512,
                checkpoint_every_tokens=512, warmup_steps=2, progress=False, matmul_dtype="float32")
    return TrainConfig(**{**base, **kw})


def test_background_checkpoint_holds_the_state_at_save_time(tmp_path):
    """The checkpoint is written by a thread while training goes on: what it holds is the state when
    ``save`` was called, and resuming from it reproduces the uninterrupted run bit for bit."""
    from sparsetrace.transcoders.train import Checkpointer, fit

    x, y = _data(N=4096)
    cfg = _fit_config()
    full = fit(Trainer(cfg, 2, 16, 16), _Buffers(x, y), tmp_path / "a")
    # the last checkpoint (taken at 1536 tokens, with steps still to go) resumes to the same weights
    ck = Checkpointer(tmp_path / "a" / "checkpoint")
    assert ck.exists()
    t = Trainer(cfg, 2, 16, 16)
    resumed = fit(t, _Buffers(x, y), tmp_path / "a", resume=True)
    assert resumed.tokens == full.tokens
    for a, b in zip(full.transcoders, resumed.transcoders):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k

    # a snapshot is not changed by steps taken after save() returned
    tr = Trainer(cfg, 2, 16, 16)
    tr.initialize(x[:, :512], y[:, :512])
    tr.step(x[:, :256], y[:, :256])
    before = {k: v.clone() for k, v in tr.state_tensors().items()}
    ck2 = Checkpointer(tmp_path / "b")
    sub = ck2.save(tr, torch.Generator().manual_seed(0), {"tokens": 256, "position": 256, "step": 1})
    for _ in range(3):
        tr.step(x[:, 256:512], y[:, 256:512])
    ck2.wait()
    from sparsetrace.transcoders.io import read_safetensors

    saved = read_safetensors(sub / "rank0.safetensors")
    for k, v in before.items():
        assert torch.equal(saved[k], v), k


def test_background_checkpoint_error_is_raised_by_fit(tmp_path, monkeypatch):
    from sparsetrace.transcoders import train as train_mod

    def broken(tensors, path):
        raise OSError("disk full")

    monkeypatch.setattr(train_mod, "save_file", broken)
    x, y = _data(N=4096)
    with pytest.raises(OSError, match="disk full"):
        train_mod.fit(Trainer(_fit_config(), 2, 16, 16), _Buffers(x, y), tmp_path / "c")
    assert not (tmp_path / "c" / "checkpoint" / "latest.json").exists()
    assert not list((tmp_path / "c" / "checkpoint").rglob("*.safetensors"))
