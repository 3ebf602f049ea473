"""Plain reference attribution (docs/design.md §4): the dense adjacency A one target row at a time, by
torch autograd through the frozen replacement model, written from the definitions.

No batching, buckets, skipped positions, row store or NodeLayout: node order is spelled out here
(features sorted by layer, position, id | errors layer-major | tokens | logits). The engine
(tracer/attribution.py) is checked against it in tests/test_tracer_reference.py.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsetrace.tracer.replacement import ReplacementModel


def reference_attribution(lm, ts, ids, logit_tokens) -> dict:
    """Dense float64 ``A`` [n, n], ``kappa``, ``value``, ``activation`` [n] and ``nodes`` [(kind, layer,
    pos, feature)] for prompt ``ids`` and targets the demeaned logits of ``logit_tokens``."""
    rm = ReplacementModel(lm, ts)
    run = rm.run(torch.as_tensor(ids))
    L, T = rm.n_layers, run.n_pos
    W_U = rm.unembedding()
    logit_vectors = [W_U[k] - W_U.mean(0) for k in logit_tokens]
    feats = [tuple(x) for x in torch.nonzero(run.act > 0).tolist()]  # (layer, pos, feature), sorted
    # each source: (layer of its write, or L for the layer-0 input; position; vector)
    sources = [(l, c, run.act[l, c, f] * ts[l].W_dec[f]) for l, c, f in feats]
    sources += [(l, c, run.error[l, c]) for l in range(L) for c in range(T)]
    sources += [(L, c, run.h0[c]) for c in range(T)]
    src_layer, src_pos = torch.tensor([s[0] for s in sources]), torch.tensor([s[1] for s in sources])
    src_vec = torch.stack([s[2] for s in sources]).detach()
    # each target: (its row, layer of its read (L: the final normed residual), position, read vector, bias)
    n_src = len(sources)
    targets = [(i, l, c, ts[l].W_enc[f].detach(), ts[l].b_enc[f].detach()) for i, (l, c, f) in enumerate(feats)]
    targets += [(n_src + k, L, T - 1, v, 0.0) for k, v in enumerate(logit_vectors)]
    n = n_src + len(logit_vectors)
    A, kappa, value = np.zeros((n, n)), np.zeros(n), np.zeros(n)
    clean = rm.clean_writes(run)
    zeroed = []  # every source zeroed: MLP writes b_dec; position 0 keeps its whole constant output
    for l in range(L):
        z = ts[l].b_dec.expand(T, -1).clone()
        z[0] = clean[l][0]
        zeroed.append(z[None])
    with torch.no_grad():
        base = rm.frozen(run, torch.zeros_like(run.h0)[None], zeroed)
        full = rm.frozen(run, run.h0[None], [w[None] for w in clean])

    def read(out, l, c, r, b):
        return (out.final if l == L else out.x[l])[0, c] @ r + b

    for t, l, c, r, b in targets:
        h0 = run.h0.clone().requires_grad_(True)
        writes = [w.clone().requires_grad_(True) for w in clean]
        with torch.enable_grad():
            out = rm.frozen(run, h0[None], [w[None] for w in writes])
            grads = torch.autograd.grad(read(out, l, c, r, b), writes + [h0], allow_unused=True)
        g = torch.stack([torch.zeros_like(run.h0) if x is None else x for x in grads])  # [L + 1, T, d]
        A[t, :n_src] = (g[src_layer, src_pos] * src_vec).sum(-1).numpy()  # A[t, s] = gradient · v_s
        kappa[t], value[t] = float(read(base, l, c, r, b)), float(read(full, l, c, r, b))
    activation = np.zeros(n)
    activation[: len(feats)] = [float(run.act[l, c, f]) for l, c, f in feats]
    activation[len(feats) : len(feats) + L * T] = run.error.norm(dim=-1).flatten().double().numpy()
    activation[n_src:] = value[n_src:]
    nodes = [(0, l, c, f) for l, c, f in feats] + [(1, l, c, -1) for l in range(L) for c in range(T)]
    nodes += [(2, -1, c, -1) for c in range(T)] + [(3, L, T - 1, -1)] * len(logit_vectors)
    return {"A": A, "kappa": kappa, "value": value, "activation": activation, "nodes": nodes}


def fold(ref: dict, selected: np.ndarray) -> dict:
    """The reference with only the ``selected`` [n_features] features as nodes: each unselected
    feature's column added to the error node at its (layer, position), its row and column dropped
    (``activation`` is left out: an error node's then includes the folded writes)."""
    nodes, A = ref["nodes"], ref["A"].copy()
    error_of = {(l, c): i for i, (k, l, c, _) in enumerate(nodes) if k == 1}
    keep = np.ones(len(nodes), dtype=bool)
    for i in np.flatnonzero(~np.asarray(selected)):
        A[:, error_of[nodes[i][1:3]]] += A[:, i]
        keep[i] = False
    out = {k: v[keep] for k, v in ref.items() if k in ("kappa", "value")}
    return {**out, "A": A[np.ix_(keep, keep)], "nodes": [x for x, k in zip(nodes, keep) if k]}
