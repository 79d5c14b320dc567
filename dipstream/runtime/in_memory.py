"""DIP on the Hugging Face model, weights in RAM in the sparse layout (the Hugging Face front end
of `generate`: CUDA, or `--engine hf`): each block's MLP is replaced by a module that runs the
fused DIP kernel (`kernels.sparse_mlp`: native on the CPU, Triton on CUDA) token by token."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from dipstream.errors import DipstreamError
from dipstream.kernels.sparse_mlp import ACTIVATIONS, SparseMLPWeights, sparse_mlp
from dipstream.models.arch import replace_mlps, restore_mlps
from dipstream.names import layer_key
from dipstream.simulator.trace import TraceRecorder, hook_specs


class RuntimeMLP(nn.Module):
    """Stands in for one block's MLP: its tokens through `runtime.run(layer, x)`."""

    def __init__(self, runtime, layer: int):
        super().__init__()
        self.layer = layer
        self._runtime = [runtime]  # plain list: not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = self._runtime[0].run(self.layer, flat)
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


class InMemoryRuntime:
    """DIP over every layer of `model` (its MLP `parts`), `k_in` / `k_out` per layer, on `device`
    (CUDA: bfloat16 and the Triton kernel); `record` keeps every token's masks for a trace."""

    def __init__(self, model, parts, shape, k_in, k_out, device=None, record: bool = False):
        if parts[0].act_name not in ACTIVATIONS:
            raise DipstreamError(f"the sparse kernel runs the activations {sorted(ACTIVATIONS)}, not "
                                 f"'{parts[0].act_name}'")
        self.L, self.d, self.D = len(parts), parts[0].d_model, parts[0].d_ff
        self.k_in, self.k_out, self.act = list(k_in), list(k_out), parts[0].act_name
        dt = torch.float32 if device is None or device.type == "cpu" else torch.bfloat16
        self.w = [SparseMLPWeights(p.gate_weight, p.up_weight, p.down_weight, device=device, dtype=dt) for p in parts]
        self.rec = TraceRecorder(hook_specs(shape, "dip")) if record else None
        self.mlp_s = 0.0
        self.model, self._originals = model, replace_mlps(model, lambda i, _: RuntimeMLP(self, i))

    def detach(self) -> None:
        restore_mlps(self.model, self._originals)

    def run(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y, s_in, s_out = sparse_mlp(self.w[layer], x, self.k_in[layer], self.k_out[layer], self.act,
                                    return_indices=True)
        if self.rec is not None:
            for kind, idx, n in (("in", s_in, self.d), ("out", s_out, self.D)):
                for s in (idx if isinstance(idx, list) else [idx]):
                    m = np.zeros(n, bool)
                    m[s.cpu().numpy()] = True
                    self.rec.add(layer_key(layer, kind), m)
        if x.shape[0] == 1:
            self.mlp_s += time.perf_counter() - t0
        return y
