"""The sparsity methods: dense, DIP, GLU / gate (CATS) / up pruning, TEAL, GRIFFIN, random.

Every method returns the Selection of what it read; the docstrings say which weights a token needs.
Budgets are in MLP weight bytes: density = (up + gate + down weights needed) / (3 d D).
"""

from __future__ import annotations


import torch

from dipstream.budget import LayerKeeps, check_density, layer_keeps
from dipstream.errors import DipstreamError
from dipstream.options import MethodOptions
from dipstream.sparsity.catalog import method_info
from dipstream.selection import topk_mask
from dipstream.sparsity.base import (
    METHODS,
    Method,
    Selection,
    down_from_h,
    register,
    sequence_dims,
)
from dipstream.sparsity.ops import part_linear


@register
class Dense(Method):
    """Every token reads every MLP weight; runs the model's own MLP module unchanged."""

    name = "dense"

    def __init__(self, density: float = 1.0, options: MethodOptions | None = None):
        super().__init__(1.0)

    def mlp(self, layer, p, x, batch_shape):
        return p.module(x), Selection()



def _neuron_keep(density: float, dense_linears: int, name: str) -> float:
    """Fraction of neurons kept when `dense_linears` of the three linears are read in full."""
    floor = dense_linears / 3.0
    if density < floor - 1e-9:
        raise DipstreamError(f"{name} reads {dense_linears} of the 3 MLP matrices densely, so its density "
                             f"is at least {floor:.3f}; ask for --density >= {floor:.3f}")
    return (3.0 * density - dense_linears) / (3.0 - dense_linears)


class _KeepsMethod(Method):
    """Methods that mask the up/gate input columns and the down input columns (DIP family)."""

    def __init__(self, density: float = 1.0, options: MethodOptions | None = None):
        super().__init__(check_density(density))
        self.options = options or MethodOptions()
        self.keeps: LayerKeeps | None = None

    def prepare(self, parts):
        o = self.options
        self.keeps = layer_keeps(self.density, len(parts), o.up_keep, o.down_keep, o.keep_file)

    def describe(self):
        d = super().describe()
        d["up_keep"] = sum(self.keeps.up) / len(self.keeps.up)
        d["down_keep"] = sum(self.keeps.down) / len(self.keeps.down)
        return d


@register
class DIP(_KeepsMethod):
    """Dynamic Input Pruning: top-k_in of |x| picks up/gate COLUMNS; h~ from those columns;
    top-k_out of |h~| picks down COLUMNS. Needs no dense read and no training."""

    name = "dip"

    def select_in(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Mask over the d inputs of up/gate (seam for cache-aware selection)."""
        return topk_mask(scores, self.keeps.k_in(layer, scores.shape[-1]))

    def select_out(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """Mask over the D inputs of down (seam for cache-aware selection)."""
        return topk_mask(scores, self.keeps.k_out(layer, scores.shape[-1]))


    def mlp(self, layer, p, x, batch_shape):
        m_in = self.select_in(layer, x.abs())
        h = p.act(part_linear(p, "gate", x, cols=m_in)) * part_linear(p, "up", x, cols=m_in)
        m_out = self.select_out(layer, h.abs())
        return down_from_h(p, h, m_out), Selection(up_cols=m_in, gate_cols=m_in, down_cols=m_out)


@register
class RandomMasks(DIP):
    """Control: DIP-shaped masks (same k_in, k_out) chosen uniformly at random per token."""

    name = "random"

    def prepare(self, parts):
        super().prepare(parts)
        self.generator = torch.Generator().manual_seed(self.options.seed)

    def _random(self, scores, k):
        return topk_mask(torch.rand(scores.shape, generator=self.generator), k)

    def select_in(self, layer, scores):
        return self._random(scores, self.keeps.k_in(layer, scores.shape[-1]))

    def select_out(self, layer, scores):
        return self._random(scores, self.keeps.k_out(layer, scores.shape[-1]))


def threshold_for_keep(scores: torch.Tensor, keep: float) -> float:
    """Value t with a `keep` fraction of `scores` strictly above it (-inf when keep >= 1)."""
    flat = scores.reshape(-1).float()
    n = flat.numel()
    k = int(keep * n)
    if k >= n:
        return float("-inf")
    if k <= 0:
        return float("inf")
    return float(flat.kthvalue(n - k).values)


class Calibrated:
    """Mixin for methods with thresholds calibrated on text, one per layer (per expert of a
    mixture-of-experts model: `ExpertCall.unit`). In calibration mode each layer (expert) sets its
    thresholds from the whole calibration batch it sees (upstream layers already sparse)."""

    threshold_names: tuple[str, ...] = ()
    calibrating = False

    def init_thresholds(self, n_units: int) -> None:
        if not hasattr(self, "thresholds"):
            self.thresholds = {}
        for name in self.threshold_names:
            self.thresholds.setdefault(name, [float("nan")] * n_units)

    def prepare_experts(self, blocks):
        self.thresholds = {name: [float("nan")] * sum(b.n_units for b in blocks) for name in self.threshold_names}

    def threshold(self, name: str, layer: int, scores: torch.Tensor, keep: float) -> float:
        unit = layer if self.in_expert is None else self.in_expert.unit
        if self.calibrating:
            self.thresholds[name][unit] = threshold_for_keep(scores, keep)
        t = self.thresholds[name][unit]
        if t != t:  # NaN: never calibrated
            raise DipstreamError(f"method '{self.name}' has no calibrated thresholds; calibrate it first "
                                 "or pass --thresholds FILE")
        return t


@register
class TEAL(Calibrated, DIP):
    """TEAL restricted to the MLP: DIP's column masks, but chosen by per-layer thresholds on |x|
    (up/gate columns) and |h~| (down columns), calibrated so that calibration text keeps the DIP
    split's fractions. The realised density varies per token."""

    name = "teal"
    threshold_names = ("t_in", "t_out")

    def prepare(self, parts):
        super().prepare(parts)
        self.init_thresholds(len(parts))

    def select_in(self, layer, scores):
        return scores > self.threshold("t_in", layer, scores, self.keeps.up[layer])

    def select_out(self, layer, scores):
        return scores > self.threshold("t_out", layer, scores, self.keeps.down[layer])


@register
class CATS(Calibrated, Method):
    """CATS / gate pruning: the gate is read densely; neurons with |act(W_gate x)| above a per-layer
    calibrated threshold keep their up row and down column."""

    name = "cats"
    threshold_names = ("t",)

    def __init__(self, density=1.0, options=None):
        super().__init__(check_density(density))
        self.keep = _neuron_keep(self.density, 1, self.name)

    def prepare(self, parts):
        self.init_thresholds(len(parts))

    def mlp(self, layer, p, x, batch_shape):
        a = p.act(part_linear(p, "gate", x))
        s = a.abs()
        m = s > self.threshold("t", layer, s, self.keep)
        h = a * part_linear(p, "up", x, rows=m)
        return down_from_h(p, h, m), Selection(up_rows=m, down_cols=m)


class _TopNeurons(Method):
    """Methods that read `dense_linears` of the three linears in full and keep, per token, the top
    neurons of a score for the rest: keep = (3 density - dense_linears) / (3 - dense_linears)."""

    dense_linears = 0

    def __init__(self, density=1.0, options=None):
        super().__init__(check_density(density))
        self.keep = _neuron_keep(self.density, self.dense_linears, self.name)

    def n_kept(self, D: int) -> int:
        """Neurons kept per token in an MLP of width D (truncated, as the reference)."""
        return int(self.keep * D)


@register
class GLU(_TopNeurons):
    """GLU pruning: up and gate are read densely, h is exact; top-k |h| picks down columns."""

    name = "glu"
    dense_linears = 2

    def mlp(self, layer, p, x, batch_shape):
        h = p.act(part_linear(p, "gate", x)) * part_linear(p, "up", x)
        m = topk_mask(h.abs(), self.n_kept(p.d_ff))
        return down_from_h(p, h, m), Selection(down_cols=m)


@register
class UpPruning(_TopNeurons):
    """Up pruning: up is read densely; top-k |W_up x| keeps gate rows and down columns."""

    name = "up"
    dense_linears = 1

    def mlp(self, layer, p, x, batch_shape):
        u = part_linear(p, "up", x)
        m = topk_mask(u.abs(), self.n_kept(p.d_ff))
        h = p.act(part_linear(p, "gate", x, rows=m)) * u * m
        return down_from_h(p, h, m), Selection(gate_rows=m, down_cols=m)


@register
class Griffin(Method):
    """GRIFFIN: the prompt runs dense; per sequence, the k neurons with the largest norm of
    token-normalised |h| over the prompt are fixed for the rest (up/gate rows + down columns).
    In teacher-forced evaluation the first `prompt_frac` of each window is the prompt; its tokens
    are computed dense and excluded from measured density."""

    name = "griffin"

    def __init__(self, density=1.0, options=None):
        super().__init__(check_density(density))
        self.options = options or MethodOptions()
        if not 0.0 < self.options.prompt_frac < 1.0:
            raise DipstreamError(f"--prompt-frac {self.options.prompt_frac} must be in (0, 1)")
        self.sets: dict[int, torch.Tensor] = {}

    def prepare(self, parts):
        self.k = int(self.density * parts[0].d_ff)

    def reset(self):
        self.sets.clear()

    def dense_prefix(self, seq_len):
        return max(1, int(seq_len * self.options.prompt_frac))

    def mlp(self, layer, p, x, batch_shape):
        B, T = sequence_dims(batch_shape, x.shape[0])
        if T == 1 and layer in self.sets:  # decoding after a prompt pass: read only the set
            rows = self.sets[layer]
            h = p.act(part_linear(p, "gate", x, rows=rows)) * part_linear(p, "up", x, rows=rows)
            return down_from_h(p, h, rows), Selection(up_rows=rows, gate_rows=rows, down_cols=rows)
        # teacher-forced window: the prompt part needs up and gate densely anyway
        h = p.act(part_linear(p, "gate", x)) * part_linear(p, "up", x)
        P = self.dense_prefix(T)
        z = h.view(B, T, -1)[:, :P]
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.sets[layer] = topk_mask(z.norm(dim=1), self.k)  # (B, D)
        masks = self.sets[layer][:, None, :].expand(B, T, h.shape[-1]).clone()
        masks[:, :P] = True
        masks = masks.reshape(B * T, -1)
        counted = torch.zeros(B, T, dtype=torch.bool)
        counted[:, P:] = True
        return down_from_h(p, h * masks, masks), Selection(
            up_rows=masks, gate_rows=masks, down_cols=masks, counted=counted.reshape(-1))


def build_method(name: str, density: float = 1.0, options: MethodOptions | None = None) -> Method:
    """A method instance by registry name, or a one-line error listing the known names."""
    method_info(name)  # the one-line error for a name the catalog does not know
    return METHODS[name](density, options)
