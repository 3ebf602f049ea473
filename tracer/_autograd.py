"""Rows by autograd through a kept frozen forward (``AttributionConfig.backward = "autograd"``): the
plain engine the hand-written linear backward (``_linear.py``) is checked against (docs/design.md §4)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from sparsetrace.errors import AttributionError

from .replacement import CleanRun, ReplacementModel

__all__: list[str] = []


class AutogradBackward:
    """Backward passes over one kept frozen forward of B copies of the prompt.

    The frozen model is linear, so the one forward serves every batch of rows. (Measured here: B copies
    with a plain backward beat one copy with ``is_grads_batched`` (vmap) by ~1.5–2× on CPU.)
    """

    def __init__(self, rm: ReplacementModel, run: CleanRun, batch: int) -> None:
        self.rm, self.run, self.B = rm, run, batch
        T, d = run.n_pos, run.h0.shape[-1]
        self.h0 = run.h0.expand(batch, T, d).clone().requires_grad_(True)
        self.writes = [w.expand(batch, T, d).clone().requires_grad_(True) for w in rm.clean_writes(run)]
        with torch.enable_grad():
            self.out = rm.frozen(run, self.h0, self.writes)
        self.passes = 0

    def backward(self, reads: list[tuple[int, int, Tensor]]) -> tuple[Tensor, Tensor]:
        """``reads[b] = (layer, pos, vector)``: copy b reads ``vector`` at the MLP input of ``layer``
        (``layer == L``: the final normed residual) at ``pos``. Returns the write gradients [L, n, T, d]
        and the layer-0 input gradient [n, T, d] (n = len(reads))."""
        L = self.rm.n_layers
        n = len(reads)
        if not 0 < n <= self.B:
            raise AttributionError(f"{n} reads for a batch of {self.B}")
        outs = self.out.x + [self.out.final]
        gouts: list[Tensor | None] = [None] * (L + 1)
        for b, (l, c, v) in enumerate(reads):
            if gouts[l] is None:
                gouts[l] = torch.zeros_like(outs[l])
            gouts[l][b, c] = v.detach()
        used = [i for i in range(L + 1) if gouts[i] is not None]
        with torch.enable_grad():
            grads = torch.autograd.grad(
                [outs[i] for i in used],
                self.writes + [self.h0],
                [gouts[i] for i in used],
                retain_graph=True,
                allow_unused=True,
            )
        self.passes += 1
        layer_grads = torch.stack([torch.zeros_like(self.h0[:n]) if g is None else g[:n] for g in grads[:L]])
        return layer_grads, grads[L][:n]

    p0 = 0  # every position is carried

    def backward_into(self, reads: list[tuple[int, int, Tensor]],
                      sink: Callable[[int, Tensor], None]) -> tuple[Tensor, None]:
        """:meth:`backward`, handing each layer's write gradient to ``sink(layer, g)``; returns the
        layer-0 input gradient (and None: position 0 is not skipped)."""
        grads, g_emb = self.backward(reads)
        for l in range(grads.shape[0]):
            sink(l, grads[l])
        return g_emb, None
