"""Mixture-of-experts blocks viewed generically: a router, routed experts (each one a gated MLP,
seen as `GatedMLPParts` views into the fused 3D expert weights) and an optional shared expert.

Supported: every decoder layer a block of the `ArchSpec.moe` layout (Mixtral, Qwen2-MoE,
Qwen3-MoE in transformers 5). Anything else is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from dipstream.errors import DipstreamError
from dipstream.models.arch import GatedMLPParts, attr_path, check_moe_config, lora_view
from dipstream.models.families import activation_name, arch_spec, text_config


class ExpertMLP(nn.Module):
    """Routed expert `e` of a fused experts module, as its own MLP module: the same operations
    as the transformers eager path (one fused gate/up linear, then down)."""

    def __init__(self, experts: nn.Module, e: int, gate_up: str, down: str, act: nn.Module):
        super().__init__()
        self._experts = [experts]  # plain list: not registered as a submodule
        self.e, self._gate_up, self._down, self.act = e, gate_up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ex = self._experts[0]
        gate, up = F.linear(x, getattr(ex, self._gate_up)[self.e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, getattr(ex, self._down)[self.e])


@dataclass
class MoeLayerParts:
    """One MoE block: its router (x -> (logits, top-k weights, top-k indices)), the routed
    experts' parts (layer order of experts), and the shared expert with its sigmoid gate."""

    path: str
    module: nn.Module
    router: nn.Module
    experts: list[GatedMLPParts]
    top_k: int
    shared: GatedMLPParts | None = None
    shared_gate: nn.Module | None = None

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    @property
    def n_units(self) -> int:
        """Experts the block runs a method in: the routed ones and the shared one."""
        return len(self.experts) + (self.shared is not None)

    @property
    def d_model(self) -> int:
        return self.experts[0].d_model


def is_moe(config) -> bool:
    """Whether a config's architecture puts a mixture-of-experts block in place of the MLP."""
    return arch_spec(config).moe is not None


def moe_parts(model: nn.Module) -> list[MoeLayerParts]:
    """The mixture-of-experts block of every decoder layer, in layer order."""
    spec = arch_spec(model.config)
    ms = spec.moe
    if ms is None:
        raise DipstreamError(f"'{model.config.model_type}' is not a mixture-of-experts architecture")
    check_moe_config(model.config)
    act_name = activation_name(model.config)
    act = ACT2FN[act_name]
    d = text_config(model.config).hidden_size
    out = []
    for i, block in enumerate(attr_path(model, spec.layers)):
        moe = getattr(block, spec.mlp)
        path = f"{spec.layers}.{i}.{spec.mlp}"
        try:
            router, experts = getattr(moe, ms.router), getattr(moe, ms.experts)
            gu, dn = getattr(experts, ms.gate_up), getattr(experts, ms.down)
        except AttributeError:
            raise DipstreamError(f"{path} is not a mixture-of-experts block of the {model.config.model_type} "
                                 "layout dipstream knows (router, fused experts)") from None
        E, two_D, d_in = gu.shape
        D = two_D // 2
        if d_in != d or tuple(dn.shape) != (E, d, D):
            raise DipstreamError(f"{path}: expert weights of shape {tuple(gu.shape)} / {tuple(dn.shape)} are not "
                                 f"(experts, 2 D, {d}) / (experts, {d}, D); transposed expert layouts are not supported")
        ex = [GatedMLPParts(path=f"{path}.experts.{e}", module=ExpertMLP(experts, e, ms.gate_up, ms.down, act),
                            gate_weight=gu[e, :D], up_weight=gu[e, D:], down_weight=dn[e], gate_bias=None,
                            up_bias=None, down_bias=None, act=act, act_name=act_name) for e in range(E)]
        shared = shared_gate = None
        if ms.shared:
            m = getattr(moe, ms.shared)
            g, u, dw = (getattr(m, n) for n in (spec.gate, spec.up, spec.down))
            shared = GatedMLPParts(path=f"{path}.{ms.shared}", module=m, gate_weight=g.weight, up_weight=u.weight,
                                   down_weight=dw.weight, gate_bias=g.bias, up_bias=u.bias, down_bias=dw.bias,
                                   act=act, act_name=act_name, gate_lora=lora_view(g), up_lora=lora_view(u),
                                   down_lora=lora_view(dw))
            shared_gate = getattr(moe, ms.shared_gate)
        out.append(MoeLayerParts(path=path, module=moe, router=router, experts=ex,
                                 top_k=int(getattr(router, "top_k")), shared=shared, shared_gate=shared_gate))
    return out
