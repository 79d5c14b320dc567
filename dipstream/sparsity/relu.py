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
from dipstream.sparsity.predictor import TrainedPredictors


def swapped_h(g: torch.Tensor, u: torch.Tensor, both_factors: bool, among: torch.Tensor | None = None):
    """h of the swapped activation from the gate and up outputs: g * u where g > 0 (and u > 0 for
    dReLU), else exactly 0; `among` restricts it to those neurons (the others are 0 too)."""
    on = (g > 0) & (u > 0) if both_factors else g > 0
    if among is not None:
        on &= among
    return torch.where(on, g * u, g.new_zeros(()))


class _ReluSwap(Method):
    """Common part: exact non-zeros of a ReLU-gated h, capped at `density * D` neurons."""

    both_factors = True
    changes_activation = True  # not the original model even at density 1

    def __init__(self, density: float = 1.0, options=None):
        super().__init__(check_density(density))
        self.penalty_terms: list[torch.Tensor] | None = None  # set to [] to collect mean |h| per call

    def n_kept(self, D: int) -> int:
        """At most this many active neurons per token in an MLP of width D (density * D)."""
        return int(self.density * D)

    def mlp(self, layer, p, x, batch_shape):
        h = swapped_h(part_linear(p, "gate", x), part_linear(p, "up", x), self.both_factors)
        m, k = h != 0, self.n_kept(p.d_ff)
        if k < h.shape[-1]:
            m &= topk_mask(h.abs(), k)
        if self.penalty_terms is not None:
            self.penalty_terms.append(h.abs().mean())
        return down_from_h(p, h, m), Selection(up_rows=m, gate_rows=m, down_cols=m)

    def describe(self):
        return {**super().describe(), "activation": self.name}


@register
class DReLU(_ReluSwap):
    """Turbo Sparse's dReLU: h = ReLU(gate) * ReLU(up); the mask is its exact non-zeros."""

    name = "drelu"


@register
class Relufied(_ReluSwap):
    """ReLUfication baseline: h = ReLU(gate) * up; the mask is its exact non-zeros."""

    name = "relufied"
    both_factors = False


class _PredictedSkip(TrainedPredictors, _ReluSwap):
    """The same activation swap, with the zeros *predicted* (Turbo Sparse / PowerInfer): a trained
    per-layer low-rank predictor says which neurons are active (logit > 0, at most density*D of
    them), and only those neurons' up row, gate row and down column are read. A neuron predicted
    inactive that was in fact active is lost (its contribution is zero). The cost is the predicted
    set plus the predictor itself (`density_with_predictor` in a results row)."""

    predicts_zeros = True  # its predictors are trained on the swapped activation's non-zeros

    def prepare(self, parts):
        self.check_predictors(parts, "trained predictors of its zeros")

    def mlp(self, layer, p, x, batch_shape):
        logits = self.predictors[layer](x)
        read, k = logits > 0, self.n_kept(p.d_ff)
        if k < read.shape[-1]:
            read &= topk_mask(logits, k)
        g, u = part_linear(p, "gate", x, rows=read), part_linear(p, "up", x, rows=read)
        h = swapped_h(g, u, self.both_factors, read)
        return down_from_h(p, h, read), Selection(up_rows=read, gate_rows=read, down_cols=read)

    def describe(self):
        return {**super().describe(), "skipping": "predicted"}


@register
class DReLUPredicted(_PredictedSkip):
    """dReLU with predicted zeros: a trained predictor picks the neurons read."""

    name = "drelu-predicted"


@register
class RelufiedPredicted(_PredictedSkip):
    """ReLUfication with predicted zeros: a trained predictor picks the neurons read."""

    name = "relufied-predicted"
    both_factors = False
