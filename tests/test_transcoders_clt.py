"""Cross-layer transcoders: the model, our format (eager and lazy decoders) and circuit-tracer's CLT
layout, with the refusals of docs/design.md §14."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsetrace.errors import ConfigError, FormatError
from sparsetrace.transcoders import (
    CrossLayerTranscoder, CrossLayerTranscoderConfig, Transcoder, export_circuit_tracer_clt,
    import_circuit_tracer_clt, load_clt, load_transcoders, save_clt, save_transcoders,
)

L, F, D = 4, 12, 8


def _clt(activation="topk", skip=True, seed=0) -> CrossLayerTranscoder:
    cfg = CrossLayerTranscoderConfig(model_id="m", architecture="llama", n_layers=L, d_in=D, n_features=F,
                                     activation=activation, k=3 if activation == "topk" else None, skip=skip)
    return CrossLayerTranscoder.random(cfg, seed=seed, dtype=torch.float64)


def _dense_reference(clt, x):
    """ŷ_t = Σ_{s ≤ t} σ(x_s W_enc[s]ᵀ + b_enc[s]) W_dec[s][:, t − s] + b_dec[t] + x_t W_skip[t]ᵀ, written out."""
    acts = [clt[s].activate(x[s] @ clt.W_enc[s].T + clt.b_enc[s]) for s in range(L)]
    out = []
    for t in range(L):
        y = clt.b_dec[t].clone()
        for s in range(t + 1):
            y = y + acts[s] @ clt.W_dec[s][:, t - s, :]
        if clt.W_skip is not None:
            y = y + x[t] @ clt.W_skip[t].T
        out.append(y)
    return acts, out


def _same(a: CrossLayerTranscoder, b: CrossLayerTranscoder) -> None:
    for s in range(L):
        for name in ("W_enc", "b_enc", "b_dec", "threshold"):
            assert torch.equal(getattr(a[s], name), getattr(b[s], name).to(getattr(a[s], name).dtype)), name
        assert (a.W_skip is None) == (b.W_skip is None)
        if a.W_skip is not None:
            assert torch.equal(a[s].W_skip, b[s].W_skip.to(a.W_skip.dtype))
        assert torch.equal(a.decoder(s), b.decoder(s).to(a.decoder(s).dtype))


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_decode_layer_equals_the_written_out_sum(activation):
    clt = _clt(activation)
    x = torch.randn(L, 5, D, dtype=torch.float64)
    acts, ref = _dense_reference(clt, x)
    assert all(a.ne(0).any() for a in acts)
    for t in range(L):
        torch.testing.assert_close(clt.decode_layer(t, acts, x[t]), ref[t], rtol=0, atol=1e-12)
    # without x̃: no skip term
    torch.testing.assert_close(clt.decode_layer(L - 1, acts), ref[L - 1] - x[L - 1] @ clt.W_skip[L - 1].T)


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_layer_view_encodes_as_a_per_layer_transcoder(activation):
    clt = _clt(activation)
    tc = Transcoder(D, F, activation, 3 if activation == "topk" else None, dtype=torch.float64)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "threshold"):
            getattr(tc, name).copy_(getattr(clt[2], name))
        tc.W_skip.copy_(clt[2].W_skip)
    x = torch.randn(7, D, dtype=torch.float64)
    assert torch.equal(clt[2].encode(x), tc.encode(x))
    assert torch.equal(clt[2].skip(x), tc.skip(x))
    assert clt.targets(1) == range(1, L)
    assert clt.decoder_rows(1, torch.tensor([3, 0])).shape == (2, L - 1, D)
    assert torch.equal(clt.decoder_rows(1, torch.tensor([3]))[0], clt.W_dec[1][3])


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_save_load_roundtrip(tmp_path, activation, lazy):
    clt = _clt(activation)
    save_clt(clt, tmp_path / "c", dtype="float64")
    back = load_clt(tmp_path / "c", dtype=torch.float64, lazy_decoders=lazy)
    assert back.lazy == lazy
    _same(clt, back)
    x = torch.randn(L, 4, D, dtype=torch.float64)
    acts, ref = _dense_reference(clt, x)
    for t in range(L):
        torch.testing.assert_close(back.decode_layer(t, acts, x[t]), ref[t], rtol=0, atol=1e-12)
    # load_transcoders / save_transcoders recognise a CLT folder
    again = load_transcoders(tmp_path / "c", dtype=torch.float64)
    assert isinstance(again, CrossLayerTranscoder)
    save_transcoders(again, tmp_path / "d", dtype="float64")
    _same(clt, load_clt(tmp_path / "d", dtype=torch.float64))


def test_lazy_decoders_are_not_held_in_memory(tmp_path):
    clt = _clt()
    save_clt(clt, tmp_path / "c", dtype="float32")
    lazy = load_clt(tmp_path / "c", lazy_decoders=True)
    eager = load_clt(tmp_path / "c")
    n_dec = sum(F * (L - s) * D for s in range(L))
    n_lazy = sum(p.numel() for p in lazy.parameters())
    n_eager = sum(p.numel() for p in eager.parameters())
    assert n_eager - n_lazy == n_dec
    f = torch.tensor([5, 1, 5])
    assert torch.equal(lazy.decoder_rows(2, f), eager.W_dec[2][f].detach())
    lazy.load_decoders()
    assert not lazy.lazy and sum(p.numel() for p in lazy.parameters()) == n_eager


def test_bfloat16_lazy_rows(tmp_path):
    clt = _clt()
    save_clt(clt, tmp_path / "c", dtype="bfloat16")
    lazy = load_clt(tmp_path / "c", lazy_decoders=True, dtype=torch.bfloat16)
    eager = load_clt(tmp_path / "c", dtype=torch.bfloat16)
    f = torch.tensor([0, 7])
    assert torch.equal(lazy.decoder_rows(0, f), eager.W_dec[0][f].detach())


def test_load_refusals(tmp_path):
    clt = _clt()
    save_clt(clt, tmp_path / "c", dtype="float32")
    (tmp_path / "c" / "decoder_2.safetensors").rename(tmp_path / "gone")
    with pytest.raises(FormatError, match=r"missing files \['decoder_2.safetensors'\]"):
        load_clt(tmp_path / "c")
    # a truncated decoder file: named, for eager and lazy loading
    raw = (tmp_path / "gone").read_bytes()
    (tmp_path / "c" / "decoder_2.safetensors").write_bytes(raw[: len(raw) - 40])
    for lazy in (False, True):
        with pytest.raises(FormatError, match="decoder_2.safetensors"):
            load_clt(tmp_path / "c", lazy_decoders=lazy)
    # a decoder with one target too many
    (tmp_path / "c" / "decoder_2.safetensors").write_bytes(raw)
    save_file({"W_dec": torch.zeros(F, L - 2 + 1, D)}, str(tmp_path / "c" / "decoder_2.safetensors"))
    with pytest.raises(FormatError, match="below its source"):
        load_clt(tmp_path / "c", lazy_decoders=True)
    with pytest.raises(ConfigError, match="kind="):
        CrossLayerTranscoderConfig(model_id="m", architecture="llama", n_layers=1, d_in=2, n_features=2, kind="x")


# ---- circuit-tracer's layout ----------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_circuit_tracer_roundtrip(tmp_path, activation):
    clt = _clt(activation, skip=False)
    export_circuit_tracer_clt(clt, tmp_path / "ct", dtype=torch.float64)
    # the tensor names and shapes of circuit-tracer's CrossLayerTranscoder.to_safetensors
    enc = load_file(str(tmp_path / "ct" / "W_enc_1.safetensors"))
    want = {"W_enc_1": (F, D), "b_enc_1": (F,), "b_dec_1": (D,)}
    if activation == "jumprelu":
        want["threshold_1"] = (F,)
    assert {k: tuple(v.shape) for k, v in enc.items()} == want
    assert {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "ct" / "W_dec_1.safetensors")).items()} == {
        "W_dec_1": (F, L - 1, D)}
    import yaml

    meta = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert meta["model_kind"] == "cross_layer_transcoder" and meta["model_name"] == "m"
    for lazy in (False, True):
        back = import_circuit_tracer_clt(tmp_path / "ct", n_layers=L, d_model=D, lazy_decoders=lazy, dtype=torch.float64)
        assert back.config.activation == activation and back.lazy == lazy
        _same(clt, back)


def test_circuit_tracer_export_refusals(tmp_path):
    with pytest.raises(ConfigError, match="activation='topk'"):
        export_circuit_tracer_clt(_clt("topk", skip=False), tmp_path / "a")
    with pytest.raises(ConfigError, match="skip=True"):
        export_circuit_tracer_clt(_clt("relu", skip=True), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_circuit_tracer_import_refusals(tmp_path):
    ct = tmp_path / "ct"
    export_circuit_tracer_clt(_clt("relu", skip=False), ct)
    with pytest.raises(FormatError, match=rf"has {L} layers \(W_enc_0..{L - 1}\); the model has n_layers={L + 1}"):
        import_circuit_tracer_clt(ct, n_layers=L + 1)
    with pytest.raises(FormatError, match=f"d_model {D}; the model has d_model={D * 2}"):
        import_circuit_tracer_clt(ct, d_model=2 * D)
    # a decoder whose targets reach below its source layer
    good = (ct / "W_dec_3.safetensors").read_bytes()
    save_file({"W_dec_3": torch.zeros(F, 2, D)}, str(ct / "W_dec_3.safetensors"))
    with pytest.raises(FormatError, match=r"W_dec_3.safetensors.*2 target layers; a decoder of source layer 3 writes to layers 3..3"):
        import_circuit_tracer_clt(ct)
    (ct / "W_dec_3.safetensors").write_bytes(good[:100])  # corrupt
    with pytest.raises(FormatError, match="W_dec_3.safetensors"):
        import_circuit_tracer_clt(ct)
    (ct / "W_dec_3.safetensors").write_bytes(good)
    (ct / "W_enc_2.safetensors").unlink()
    with pytest.raises(FormatError, match=r"missing: \['W_enc_2.safetensors'\]"):
        import_circuit_tracer_clt(ct)
    (ct / "config.yaml").write_text("model_kind: transcoder_set\n")
    with pytest.raises(FormatError, match="model_kind='transcoder_set'; expected 'cross_layer_transcoder'"):
        import_circuit_tracer_clt(ct)
    with pytest.raises(FormatError, match="no config.yaml"):
        import_circuit_tracer_clt(tmp_path)


def test_mismatched_encoder_shapes_refused(tmp_path):
    ct = tmp_path / "ct"
    export_circuit_tracer_clt(_clt("relu", skip=False), ct)
    t = load_file(str(ct / "W_enc_1.safetensors"))
    t["b_enc_1"] = torch.zeros(F + 1)
    save_file(t, str(ct / "W_enc_1.safetensors"))
    with pytest.raises(FormatError, match=rf"W_enc_1.safetensors.*b_enc_1 has shape \({F + 1},\), expected \({F},\)"):
        import_circuit_tracer_clt(ct)


def test_write_direction_sums_the_decoders_over_targets():
    clt = _clt()
    f = torch.tensor([2, 7])
    want = torch.stack([sum(clt.W_dec[1][int(i), j] for j in range(L - 1)) for i in f])
    torch.testing.assert_close(clt.write_direction(1, f), want, rtol=0, atol=1e-12)
