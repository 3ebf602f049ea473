"""circuit-tracer and sparsify layouts: import/export round trips that compare values and outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from sparsetrace.errors import FormatError
from sparsetrace.transcoders.formats import export_circuit_tracer, import_circuit_tracer, import_sparsify
from sparsetrace.transcoders.model import TranscoderSet, TranscoderSetConfig


def _set(activation="topk", skip=True):
    cfg = TranscoderSetConfig(model_id="m", architecture="llama", n_layers=3, d_in=8, n_features=20,
                              activation=activation, k=4 if activation == "topk" else None, skip=skip)
    return TranscoderSet.random(cfg, seed=1)


@pytest.mark.parametrize("activation,skip", [("topk", True), ("jumprelu", False), ("relu", True)])
def test_circuit_tracer_round_trip(tmp_path, activation, skip):
    ts = _set(activation, skip)
    export_circuit_tracer(ts, tmp_path)
    raw = load_file(tmp_path / "layer_1.safetensors")
    assert raw["W_enc"].shape == (20, 8) and raw["W_dec"].shape == (20, 8)  # circuit-tracer's [F, d]
    if activation == "jumprelu":
        assert "activation_function.threshold" in raw
    if activation == "topk":
        assert int(raw["k"]) == 4
    back = import_circuit_tracer(tmp_path)
    assert back.config.activation == activation and back.config.skip == skip and back.config.model_id == "m"
    x = torch.randn(5, 8)
    for a, b in zip(ts, back):
        for name, p in a.named_parameters():
            assert torch.equal(p, dict(b.named_parameters())[name]), name
        assert torch.equal(a.threshold, b.threshold)
        assert_close(b(x), a(x), rtol=0, atol=0)


def test_circuit_tracer_transposed_encoder_is_recognised(tmp_path):
    ts = _set()
    export_circuit_tracer(ts, tmp_path)
    t = load_file(tmp_path / "layer_0.safetensors")
    t["W_enc"] = t["W_enc"].T.contiguous()  # an older [d, F] file
    save_file(t, tmp_path / "layer_0.safetensors")
    back = import_circuit_tracer(tmp_path)
    assert torch.equal(back[0].W_enc, ts[0].W_enc)
    t["W_enc"] = torch.zeros(7, 9)
    save_file(t, tmp_path / "layer_0.safetensors")
    with pytest.raises(FormatError, match=r"W_enc has shape \(7, 9\); expected \(20, 8\) or \(8, 20\)"):
        import_circuit_tracer(tmp_path)


def _write_sparsify(folder, ts, transcode=True):
    for i, tc in enumerate(ts):
        sub = folder / f"layers.{i}.mlp"
        sub.mkdir(parents=True)
        t = {"encoder.weight": tc.W_enc.detach(), "encoder.bias": tc.b_enc.detach(),
             "W_dec": tc.W_dec.detach(), "b_dec": tc.b_dec.detach()}
        if tc.W_skip is not None:
            t["W_skip"] = tc.W_skip.detach()
        save_file({k: v.contiguous() for k, v in t.items()}, sub / "sae.safetensors")
        (sub / "cfg.json").write_text(json.dumps({"d_in": 8, "k": tc.k, "num_latents": 20, "expansion_factor": 32,
                                                  "transcode": transcode, "skip_connection": tc.W_skip is not None,
                                                  "activation": "topk"}))


def test_sparsify_import_matches_its_forward(tmp_path):
    ts = _set()
    _write_sparsify(tmp_path, ts)
    back = import_sparsify(tmp_path, model_id="m")
    assert back.config.training["hookpoints"] == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    x = torch.randn(6, 8)
    for a, b in zip(ts, back):
        # sparsify's forward: top-k of relu(x Wᵀ + b), decode + b_dec + x W_skipᵀ
        pre = torch.relu(x @ a.W_enc.T + a.b_enc)
        v, i = pre.topk(4, dim=-1)
        ref = torch.zeros_like(pre).scatter(-1, i, v) @ a.W_dec + a.b_dec + x @ a.W_skip.T
        assert_close(b(x), ref.detach())


def test_sparsify_sae_folds_b_dec_subtraction(tmp_path):
    ts = _set()
    _write_sparsify(tmp_path, ts, transcode=False)
    back = import_sparsify(tmp_path)
    x = torch.randn(6, 8)
    a = ts[0]
    pre = (x - a.b_dec) @ a.W_enc.T + a.b_enc  # sparsify's SAE encoder input is x − b_dec
    assert_close(back[0].pre_activation(x), pre.detach(), rtol=1e-5, atol=1e-5)


def test_sparsify_errors(tmp_path):
    with pytest.raises(FormatError, match="not a sparsify set"):
        import_sparsify(tmp_path)
    ts = _set()
    _write_sparsify(tmp_path, ts)
    (tmp_path / "layers.1.mlp" / "cfg.json").rename(tmp_path / "layers.1.mlp" / "x.json")
    with pytest.raises(FormatError, match=r"cover layers \[0, 2\]"):
        import_sparsify(tmp_path)


def test_sparsify_single_coder_import(tmp_path):
    """One hookpoint folder (e.g. a coder of layer 15 trained alone) loads as one Transcoder."""
    from sparsetrace.transcoders.formats import import_sparsify_coder

    ts = _set()
    _write_sparsify(tmp_path, ts)
    tc = import_sparsify_coder(tmp_path / "layers.2.mlp")
    x = torch.randn(5, 8)
    assert_close(tc(x), ts[2](x).detach())
    with pytest.raises(FormatError, match="no cfg.json"):
        import_sparsify_coder(tmp_path)
