"""The decode runtime with every layer's MLP in RAM in the sparse layout: each decoded token's
MLP calls the fused DIP kernel (float32, int8 or 4-bit rows; Triton on CUDA), LoRA adapters on
the selected inputs only; prompt tokens go through it one by one as well."""

from __future__ import annotations

import time

import numpy as np
import torch

from dipstream.errors import DipstreamError
from dipstream.kernels.quant import QuantizedSparseMLPWeights
from dipstream.kernels.sparse_mlp import ACTIVATIONS, SparseMLPWeights, sparse_mlp
from dipstream.simulator import Hook, MaskTrace


def runtime_activation(name: str) -> str:
    """`name` if the kernels implement it, else a one-line error."""
    if name not in ACTIVATIONS:
        raise DipstreamError(f"the sparse runtime supports the activations {sorted(ACTIVATIONS)}, not '{name}'")
    return name


def adapter_terms(p) -> dict | None:
    """{linear: [(A, B, scale)]} of the LoRA adapters on one MLP block, or None."""
    terms = {n: [(A.detach(), B.detach(), s) for A, B, s, _ in getattr(p, f"{n}_lora").terms()]
             if getattr(p, f"{n}_lora") is not None else [] for n in ("gate", "up", "down")}
    return terms if any(terms.values()) else None


class InMemoryRuntime:
    """DIP over every layer, weights in RAM (`weights`: float32, int8 or int4; `device`: CUDA
    for the Triton kernel), `k_in` / `k_out` per layer; `record_masks` keeps every token's masks
    for `trace`."""

    def __init__(self, parts, k_in, k_out, weights: str = "float32", device=None,
                 record_masks: bool = False):
        self.L, self.d, self.D = len(parts), parts[0].d_model, parts[0].d_ff
        self.k_in, self.k_out = list(k_in), list(k_out)
        self.act = runtime_activation(parts[0].act_name)
        self.w = []
        for p in parts:
            if weights == "float32":
                dt = torch.float32 if device is None or device.type == "cpu" else torch.bfloat16
                self.w.append(SparseMLPWeights(p.gate_weight, p.up_weight, p.down_weight,
                                               device=device, dtype=dt))
            else:
                self.w.append(QuantizedSparseMLPWeights(p.gate_weight, p.up_weight, p.down_weight,
                                                        bits=8 if weights == "int8" else 4))
        # LoRA adapters (peft) on the MLP linears: their terms B A x are added with A fed the
        # same selected inputs as the host weights (A[:, S] x_S), so no dense read is added
        self.adapters = [adapter_terms(p) for p in parts]
        if any(a is not None for a in self.adapters) and weights != "float32":
            raise DipstreamError("LoRA adapters run with --weights float32 only")
        self.record_masks = record_masks
        self.masks = {"in": [[] for _ in range(self.L)], "out": [[] for _ in range(self.L)]}
        self.mlp_s = 0.0

    def _run(self, layer, x):
        y, s_in, s_out = sparse_mlp(self.w[layer], x, self.k_in[layer], self.k_out[layer], self.act,
                                    return_indices=True, adapters=self.adapters[layer])
        if self.record_masks:
            for key, idx, n in (("in", s_in, self.d), ("out", s_out, self.D)):
                for s in (idx if isinstance(idx, list) else [idx]):
                    m = np.zeros(n, bool)
                    m[s.cpu().numpy()] = True
                    self.masks[key][layer].append(m)
        return y

    def decode(self, layer, x):
        t0 = time.perf_counter()
        y = self._run(layer, x)
        self.mlp_s += time.perf_counter() - t0
        return y

    def prefill(self, layer, X):
        return self._run(layer, X)

    def trace(self, prompt_len: int, metadata: dict) -> MaskTrace:
        """The recorded masks (prompt included) as a simulator MaskTrace of DIP hooks."""
        hooks = []
        for i in range(self.L):
            for kind, n, unit in (("in", self.d, 2 * self.D), ("out", self.D, self.d)):
                hooks.append(Hook(f"layers.{i}.{kind}", kind, n, unit,
                                  np.array(self.masks[kind][i], bool).reshape(-1, n)))
        return MaskTrace(hooks, [0], [prompt_len], metadata)

    def stats(self, steps: int) -> dict:
        return {"mlp_s_per_token": self.mlp_s / max(steps, 1)}
