"""Attach a method to an unmodified Hugging Face model through small, removable wrapper modules.

Each block's MLP module is replaced by a `SparseMLP` that holds the original module (so `dense`
mode runs it unchanged) and the method. `SparseModel.detach()` puts the originals back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from dipstream.errors import DipstreamError
from dipstream.models.arch import GatedMLPParts, mlp_parts, replace_mlps, restore_mlps
from dipstream.models.families import arch_spec
from dipstream.models.moe import MoeLayerParts, moe_parts
from dipstream.sparsity.base import METHODS, Method, Selection
from dipstream.sparsity.moe import moe_mlp


@dataclass
class DensityStats:
    """Running sums of the per-token needed fractions, per layer."""

    n_layers: int
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    uncounted: int = 0

    def __post_init__(self):
        self.reset()

    def reset(self):
        self.sums = {k: torch.zeros(self.n_layers, dtype=torch.float64)
                     for k in ("mlp", "up", "gate", "down")}
        self.tokens = torch.zeros(self.n_layers, dtype=torch.float64)
        self.uncounted = 0

    def add(self, layer: int, sel: Selection, n_tokens: int) -> None:
        fr = sel.fractions()
        for k in fr:  # a MoE block adds "expert": the fraction in the experts its tokens were routed to
            if k not in self.sums:
                self.sums[k] = torch.zeros(self.n_layers, dtype=torch.float64)
        counted = sel.counted
        if counted is not None:
            self.uncounted += int((~counted).sum()) if layer == 0 else 0
        sums = []
        for k in self.sums:
            v = fr[k].double()
            if v.dim() == 0:
                v = v.expand(n_tokens)
            if counted is not None:
                v = v[counted.to(v.device)]
            sums.append(v.sum())
        for k, s in zip(self.sums, torch.stack(sums).cpu()):  # one copy to the host per layer
            self.sums[k][layer] += s
        self.tokens[layer] += n_tokens if counted is None else int(counted.sum())

    def per_layer(self, key: str = "mlp") -> list[float]:
        return (self.sums[key] / self.tokens.clamp_min(1)).tolist()

    def mean(self, key: str = "mlp") -> float:
        """Measured density: mean over layers and counted tokens of the fraction of weights read."""
        return float((self.sums[key] / self.tokens.clamp_min(1)).mean())


class SparseMLP(nn.Module):
    """Stands in for one block's MLP (or mixture-of-experts block): runs `method` on it (inside
    each routed expert), or the original when switched to dense."""

    def __init__(self, parts: GatedMLPParts | MoeLayerParts, layer: int, owner: "SparseModel"):
        super().__init__()
        self.inner = parts.module
        self.layer = layer
        self._parts = [parts]    # plain list: not registered twice as a submodule
        self._owner = [owner]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        if not owner.sparse:
            return self.inner(x)
        flat = x.reshape(-1, x.shape[-1])
        p = self._parts[0]
        if isinstance(p, MoeLayerParts):
            y, sel = moe_mlp(owner.method, self.layer, p, flat, tuple(x.shape[:-1]))
        else:
            y, sel = owner.method.mlp(self.layer, p, flat, tuple(x.shape[:-1]))
        owner.stats.add(self.layer, sel, flat.shape[0])
        for fn in owner.observers:
            fn(self.layer, sel, flat)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class SparseModel:
    """Handle of a model with a method attached; `sparse` switches all blocks between the method
    and the original dense MLPs. Observers `fn(layer, selection, x)` see every selection."""

    def __init__(self, model: nn.Module, method: Method):
        self.model = model
        self.method = method
        self.blocks = moe_parts(model) if arch_spec(model.config).moe else None
        if self.blocks is not None:
            check_runs_on_experts(method.name)
        # one gated MLP per layer for the method's per-layer set-up (MoE: a routed expert's)
        self.parts = mlp_parts(model) if self.blocks is None else [b.experts[0] for b in self.blocks]
        self.stats = DensityStats(len(self.parts))
        self.observers: list = []
        self.sparse = True
        method.prepare(self.parts)
        if self.blocks is not None:
            method.prepare_experts(self.blocks)
        blocks = self.blocks or self.parts
        self._originals = replace_mlps(model, lambda i, _: SparseMLP(blocks[i], i, self))

    @property
    def n_units(self) -> int:
        """Per-layer (per-expert for a MoE model) state a method may keep: calibrated thresholds."""
        return len(self.parts) if self.blocks is None else sum(b.n_units for b in self.blocks)

    def detach(self) -> nn.Module:
        """Restore the original MLP modules; returns the unmodified model."""
        restore_mlps(self.model, self._originals)
        self._originals = []
        return self.model

    @contextlib.contextmanager
    def dense(self):
        """Temporarily run the original dense MLPs."""
        prev, self.sparse = self.sparse, False
        try:
            yield self
        finally:
            self.sparse = prev


def check_runs_on_experts(method: str) -> None:
    """One-line refusal of a method that cannot run inside routed experts (state kept per layer
    only: trained predictors, a sequence's prompt set)."""
    cls = METHODS.get(method)
    if cls is not None and not cls.on_experts:
        ok = ", ".join(n for n, c in METHODS.items() if c.on_experts)
        raise DipstreamError(f"method '{method}' does not run on mixture-of-experts models (its per-layer state "
                             f"does not cover routed experts); use one of {ok}")


def attach(model: nn.Module, method: Method) -> SparseModel:
    """Wrap every block's MLP of `model` with `method`; call `.detach()` to undo."""
    return SparseModel(model, method)
