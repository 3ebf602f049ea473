"""The engine (tracer/attribution.py) against the plain reference attribution
(tests/reference/attribution_naive.py: dense A one row at a time by autograd) on every architecture,
fp64: every edge (feature, error and token columns), κ, values and activations."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from conftest import ARCHS, random_transcoders, tiny_lm
from reference.attribution_naive import fold, reference_attribution
from sparsetrace.graphs import NodeKind
from sparsetrace.tracer.attribution import POSITION_0, AttributionConfig, attribute

PROMPT = [3, 17, 5, 42, 8, 23]
N_LOGITS = 3  # the reference runs one frozen forward per row: few rows keep it quick
TOL = 1e-10  # relative to the largest |entry|: fp64, the same maps in another order


@lru_cache(maxsize=None)
def _setup(arch):
    """The tiny fp64 model of ``arch``, its transcoders, and the reference attribution of PROMPT."""
    lm = tiny_lm(arch)
    ts = random_transcoders(lm)
    lm.to(dtype=torch.float64)
    ts.to(dtype=torch.float64)
    g = attribute(PROMPT, lm, ts, config=AttributionConfig(dtype="float64", max_n_logits=N_LOGITS))
    return lm, ts, reference_attribution(lm, ts, PROMPT, g.logit_token)


def _nodes(lay):
    return [(int(k), int(l), int(c), int(f)) for k, l, c, f in zip(lay.kind, lay.layer, lay.pos, lay.feature)]


def _assert_close(name, got, want):
    scale = max(np.abs(want).max(), 1e-300)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * scale, err_msg=name)


def _assert_parity(g, ref, activation=True):
    assert _nodes(g.layout) == ref["nodes"]
    A, R = g.dense_adjacency(), ref["A"]
    lay = g.layout
    for name, cols in [("feature", lay.features), ("error", lay.errors), ("token", lay.tokens)]:
        assert np.abs(R[:, cols]).max() > 1e-3, name  # every kind of column carries edges
        _assert_close(f"{name} columns", A[:, cols], R[:, cols])
    _assert_close("whole A", A, R)
    _assert_close("kappa", g.bias, ref["kappa"])
    _assert_close("value", g.value, ref["value"])
    if activation:
        _assert_close("activation", g.activation, ref["activation"])


@pytest.mark.parametrize("backward", ["linear", "autograd"])
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_equals_the_reference(arch, backward):
    lm, ts, ref = _setup(arch)
    cfg = AttributionConfig(dtype="float64", batch_size=5, backward=backward, max_n_logits=N_LOGITS)
    g = attribute(PROMPT, lm, ts, config=cfg)
    rows = np.r_[np.arange(g.layout.n_features), np.arange(g.layout.logits.start, g.layout.n_nodes)]
    # the reference is itself exact: its rows sum to the values with its own κ (computed separately)
    np.testing.assert_allclose(ref["A"][rows].sum(1) + ref["kappa"][rows], ref["value"][rows], rtol=0,
                               atol=1e-9 * np.abs(ref["value"]).max())
    _assert_parity(g, ref)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_row_budget_equals_the_folded_reference(arch):
    """A row budget: the selected features' rows and every column equal the reference's, each
    unselected feature's column summed into its (layer, position) error node."""
    lm, ts, ref = _setup(arch)
    cfg = AttributionConfig(dtype="float64", max_feature_nodes=9, batch_size=4, max_n_logits=N_LOGITS)
    g = attribute(PROMPT, lm, ts, config=cfg)
    feats = [n for n in ref["nodes"] if n[0] == NodeKind.FEATURE]
    chosen = set(_nodes(g.layout))
    selected = np.array([n in chosen for n in feats])
    assert 0 < selected.sum() == 9 < len(feats)
    _assert_parity(g, fold(ref, selected), activation=False)


def test_metadata_tells_what_position_0_is():
    """The metadata's position-0 statement holds: no feature nodes, error nodes that exist with zero
    activation and no edges, and a token node with edges."""
    lm, ts, _ = _setup("llama")
    g = attribute(PROMPT, lm, ts, config=AttributionConfig(dtype="float64"))
    assert g.metadata["position_0"] == POSITION_0
    assert "no feature nodes" in POSITION_0 and "error nodes are nodes" in POSITION_0
    lay, A = g.layout, g.dense_adjacency()
    assert not np.any(lay.pos[lay.features] == 0)
    err0 = np.asarray(lay.error_index(np.arange(lay.n_layers), np.zeros(lay.n_layers, dtype=int)))
    assert np.all(err0 >= 0) and np.all(g.activation[err0] == 0) and not np.any(A[:, err0])
    assert np.any(A[:, lay.token_index(0)])
