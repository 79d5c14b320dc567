"""Record the per-token masks of any method as a simulator mask trace.

A method's `Selection` is turned into hooks (units sharing one mask index):
- up/gate input columns -> `layers.i.in` (unit: a column of W_up and of W_gate, 2D weights);
- a neuron mask shared by some of up rows, gate rows and down columns -> `layers.i.neuron`
  (unit: those vectors, d weights each) or, when it masks down columns only, `layers.i.out`.
Linears a method reads densely get no hook: the simulator treats them as static weights.
Mixture-of-experts blocks record the expert hooks of `sparsity.moe.MoeSelection.trace_hooks`.
"""

from __future__ import annotations

import numpy as np
import torch

from dipstream.names import layer_key
from dipstream.simulator.trace import Hook, MaskTrace
from dipstream.sparsity.base import Selection


def selection_hooks(sel: Selection, d: int, D: int, layer: int, *where) -> list[tuple[str, str, int, int, torch.Tensor]]:
    """[(name, kind, n_units, unit_weights, masks (N, n_units))] of one gated MLP's selection, its
    hooks named `layers.<layer>.<where...>.<kind>` (`where`: ("expert", e) or ("shared",) inside a
    mixture-of-experts block, nothing for a layer's MLP)."""
    hooks = []
    if sel.up_cols is not None or sel.gate_cols is not None:
        cols = [m for m in (sel.up_cols, sel.gate_cols) if m is not None]
        if len(cols) == 2 and cols[0] is not cols[1]:
            raise ValueError("up and gate column masks differ: no shared unit to record")
        hooks.append((layer_key(layer, *where, "in"), "in", d, len(cols) * D, cols[0]))
    neuron = [m for m in (sel.up_rows, sel.gate_rows, sel.down_cols) if m is not None]
    if neuron:
        if any(m is not neuron[0] for m in neuron):
            raise ValueError("neuron masks of up/gate rows and down columns differ")
        if len(neuron) == 1 and sel.down_cols is not None:
            hooks.append((layer_key(layer, *where, "out"), "out", D, d, neuron[0]))
        else:
            hooks.append((layer_key(layer, *where, "neuron"), "neuron", D, len(neuron) * d, neuron[0]))
    return hooks


class MaskRecorder:
    """Observer for `SparseModel.observers` that keeps every hook's masks bit-packed."""

    def __init__(self, d_model: int, d_ff: int):
        self.d, self.D = d_model, d_ff
        self.specs: dict[str, tuple[str, int, int]] = {}
        self.chunks: dict[str, list[np.ndarray]] = {}

    def __call__(self, layer: int, sel: Selection, x: torch.Tensor) -> None:
        hooks = sel.trace_hooks(layer) if hasattr(sel, "trace_hooks") else \
            selection_hooks(sel, self.d, self.D, layer)  # a MoE block's MoeSelection: its own
        for name, kind, n, uw, m in hooks:
            self.specs[name] = (kind, n, uw)
            self.chunks.setdefault(name, []).append(np.packbits(m.cpu().numpy(), axis=1, bitorder="little"))

    def trace(self, seq_starts, prompt_len, metadata: dict):
        """The recorded masks as a `MaskTrace` (hooks in layer order)."""

        hooks = []
        for name, (kind, n, uw) in self.specs.items():
            packed = np.concatenate(self.chunks[name])
            masks = np.unpackbits(packed, axis=1, count=n, bitorder="little").astype(bool)
            hooks.append(Hook(name, kind, n, uw, masks))
        return MaskTrace(hooks, np.asarray(seq_starts), np.asarray(prompt_len), metadata)
