"""Activation swaps that make the MLP naturally sparse: dReLU (Turbo Sparse) and ReLUfication.

dReLU:        h = ReLU(W_gate x) * ReLU(W_up x)   (neuron j inactive if either factor <= 0)
ReLUfication: h = ReLU(W_gate x) * (W_up x)       (inactive if the gate factor <= 0)

The mask is the set of exact non-zeros of h (optionally capped at the `density * D` largest |h|),
and it is priced as a neuron mask: up row + gate row + down column per active neuron. That is an
oracle accounting, as in Turbo Sparse's own figures: to skip the up/gate rows of inactive neurons a
deployment needs a predictor of the zeros. Here h is computed from the gate (and up) outputs and
inactive neurons contribute only the fact that they are inactive: their down columns are never
read, and only the signs of their gate/up outputs are used (NaN-poisoning those rows leaves the
output unchanged: a NaN compares as "not positive"). The swap costs accuracy until fine-tuned
(`dipstream finetune --method drelu`).
"""

from __future__ import annotations

import torch

from dipstream.budget import check_density
from dipstream.selection import topk_mask
from dipstream.sparsity.base import Method, Selection, down_from_h, register
from dipstream.sparsity.ops import part_linear


class _ReluSwap(Method):
    """Common part: exact non-zeros of a ReLU-gated h, capped at `density * D` neurons."""

    both_factors = True
    changes_activation = True  # not the original model even at density 1

    def __init__(self, density: float = 1.0, options=None):
        super().__init__(check_density(density))
        self.penalty_terms: list[torch.Tensor] | None = None  # set to [] to collect mean |h| per call

    def prepare(self, parts):
        self.k = int(self.density * parts[0].d_ff)

    def mlp(self, layer, p, x, batch_shape):
        g, u = part_linear(p, "gate", x), part_linear(p, "up", x)
        on = (g > 0) & (u > 0) if self.both_factors else g > 0
        zero = g.new_zeros(())
        h = torch.where(on, g * u, zero)
        m = h != 0
        if self.k < h.shape[-1]:
            m &= topk_mask(h.abs(), self.k)
        if self.penalty_terms is not None:
            self.penalty_terms.append(h.abs().mean())
        return down_from_h(p, h, m), Selection(up_rows=m, gate_rows=m, down_cols=m)

    def describe(self):
        return {**super().describe(), "activation": self.name}


@register
class DReLU(_ReluSwap):
    """Turbo Sparse's dReLU: h = ReLU(gate) * ReLU(up); the mask is its exact non-zeros."""

    name = "drelu"
    summary = "dReLU (Turbo Sparse): ReLU(gate)*ReLU(up), exact zeros skipped (oracle accounting)"
    reads = ("up rows, gate rows, down columns of neurons with ReLU(g)*ReLU(u) != 0 "
             "(at most density*D; skipping up/gate rows needs a predictor of the zeros)")


@register
class Relufied(_ReluSwap):
    """ReLUfication baseline: h = ReLU(gate) * up; the mask is its exact non-zeros."""

    name = "relufied"
    summary = "ReLUfication: ReLU(gate)*up, exact zeros skipped (oracle accounting)"
    reads = ("up rows, gate rows, down columns of neurons with ReLU(g)*u != 0 "
             "(at most density*D; skipping up/gate rows needs a predictor of the zeros)")
    both_factors = False
