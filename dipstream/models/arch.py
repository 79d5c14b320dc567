"""A loaded model's gated MLPs viewed generically, down(act(gate(x)) * up(x)), through the one
architecture table (:mod:`dipstream.models.families`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

from dipstream.errors import DipstreamError
from dipstream.models.families import ArchSpec, activation_name, arch_spec, text_config
from dipstream.simulator.model_shape import ModelShape, dense_layers_of_moe


@dataclass
class LoraView:
    """The active LoRA terms of a peft `LoraLayer`; `out` selects part of its outputs (the gate
    or up half of a fused gate_up projection)."""

    module: nn.Module
    out: slice | None = None

    def terms(self) -> list[tuple[torch.Tensor, torch.Tensor, float, nn.Module]]:
        """[(A (r, in), B (out, r), scaling, dropout)] of the enabled adapters; empty when disabled."""
        m = self.module
        if getattr(m, "disable_adapters", False) or getattr(m, "merged", False):
            return []
        out = []
        for name in m.active_adapters:
            if name not in m.lora_A:
                continue
            if getattr(m, "use_dora", {}).get(name, False):
                raise DipstreamError("DoRA adapters are not supported by the sparse MLP; use plain LoRA")
            B = m.lora_B[name].weight
            out.append((m.lora_A[name].weight, B if self.out is None else B[self.out],
                        float(m.scaling[name]), m.lora_dropout[name]))
        return out


def lora_view(module: nn.Module, out: slice | None = None) -> LoraView | None:
    """A LoraView when `module` is a peft LoRA layer, else None."""
    return LoraView(module, out) if hasattr(module, "lora_A") and hasattr(module, "lora_B") else None



def attr_path(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def replace_mlps(model: nn.Module, make) -> list[nn.Module]:
    """Put `make(layer, original_mlp)` in place of every decoder block's MLP module (the one swap
    behind sparse methods and the decode runtimes); returns the originals for `restore_mlps`."""
    spec = arch_spec(model.config)
    originals = []
    for i, block in enumerate(attr_path(model, spec.layers)):
        originals.append(getattr(block, spec.mlp))
        setattr(block, spec.mlp, make(i, originals[-1]))
    return originals


def restore_mlps(model: nn.Module, originals: list[nn.Module]) -> None:
    """Undo `replace_mlps`."""
    spec = arch_spec(model.config)
    for block, orig in zip(attr_path(model, spec.layers), originals):
        setattr(block, spec.mlp, orig)


@dataclass
class GatedMLPParts:
    """The weights of one gated MLP block, viewed generically (no copies).

    gate_weight/up_weight: (D, d) views; down_weight: (d, D); biases may be None. The *_lora fields
    are live views of peft LoRA adapters on those linears (None without adapters).
    """

    path: str
    module: nn.Module
    gate_weight: torch.Tensor
    up_weight: torch.Tensor
    down_weight: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    act: nn.Module
    act_name: str
    gate_lora: LoraView | None = None
    up_lora: LoraView | None = None
    down_lora: LoraView | None = None

    @property
    def d_model(self) -> int:
        return self.down_weight.shape[0]

    @property
    def d_ff(self) -> int:
        return self.down_weight.shape[1]


def check_supported(config) -> ArchSpec:
    """The ArchSpec of a config, or a one-line error: an architecture without a supported gated
    MLP, or a mixture-of-experts variant dipstream does not run."""
    spec = arch_spec(config)
    if spec.moe is not None:
        check_moe_config(config)
    return spec


def check_moe_config(config) -> None:
    """One-line refusal of MoE variants dipstream does not run: some layers with a dense MLP."""
    mixed = dense_layers_of_moe(text_config(config))
    if mixed:
        raise DipstreamError(f"{config.model_type} with dense-MLP layers ({mixed}) is not supported; dipstream "
                             "runs MoE models whose every layer is a mixture-of-experts block")


def mlp_parts(model: nn.Module) -> list[GatedMLPParts]:
    """The gated MLP of every decoder block of a transformers CausalLM, in layer order (dense-MLP
    architectures; `models.moe.moe_parts` views mixture-of-experts blocks)."""
    spec = arch_spec(model.config)
    if spec.moe is not None:
        raise DipstreamError(f"'{model.config.model_type}' is a mixture-of-experts model, which this command does "
                             "not run; `dipstream eval`, `simulate` and `sweep` run MoE models")
    act_name = activation_name(model.config)
    act = ACT2FN[act_name]
    parts = []
    for i, block in enumerate(attr_path(model, spec.layers)):
        mlp = getattr(block, spec.mlp)
        down = getattr(mlp, spec.down)
        if spec.fused_gate_up:
            fused = getattr(mlp, spec.fused_gate_up)
            D = fused.weight.shape[0] // 2
            gw, uw = fused.weight[:D], fused.weight[D:]
            gb = ub = None
            if fused.bias is not None:
                gb, ub = fused.bias[:D], fused.bias[D:]
            gl, ul = lora_view(fused, slice(0, D)), lora_view(fused, slice(D, 2 * D))
        else:
            g, u = getattr(mlp, spec.gate), getattr(mlp, spec.up)
            gw, uw, gb, ub = g.weight, u.weight, g.bias, u.bias
            gl, ul = lora_view(g), lora_view(u)
        parts.append(GatedMLPParts(
            path=f"{spec.layers}.{i}.{spec.mlp}", module=mlp, gate_weight=gw, up_weight=uw,
            down_weight=down.weight, gate_bias=gb, up_bias=ub, down_bias=down.bias, act=act,
            act_name=act_name, gate_lora=gl, up_lora=ul, down_lora=lora_view(down)))
    return parts


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model: its architecture, its shape (the simulator's ModelShape, whose fields read
    through: ``info.d_model`` is ``info.shape.d_model``) and what runs need besides."""

    model_type: str
    shape: ModelShape
    max_positions: int
    act: str

    def __getattr__(self, name):
        if name == "shape" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.shape, name)


def describe(model: nn.Module) -> ModelInfo:
    """Summary of a supported CausalLM: its config's shape, checked against its MLP weights (for a
    mixture-of-experts model, one routed expert's and the number of experts)."""
    s = ModelShape.from_hf_config(model.config)
    spec = arch_spec(model.config)
    if spec.moe is not None:
        check_moe_config(model.config)
        fused = [getattr(getattr(getattr(b, spec.mlp), spec.moe.experts), spec.moe.gate_up)
                 for b in attr_path(model, spec.layers)]
        if s.n_experts != fused[0].shape[0]:
            raise DipstreamError(f"model config says {s.n_experts} experts per layer but its weights hold "
                                 f"{fused[0].shape[0]}")
        dims = (len(fused), fused[0].shape[2], fused[0].shape[1] // 2)  # (experts, 2 D, d) each
    else:
        parts = mlp_parts(model)
        dims = (len(parts), parts[0].d_model, parts[0].d_ff)
    if (s.n_layers, s.d_model, s.d_ff) != dims:
        raise DipstreamError(f"model config says {s.n_layers} layers of {s.d_model} x {s.d_ff} but its MLP "
                             f"weights are {dims[0]} layers of {dims[1]} x {dims[2]}")
    return ModelInfo(model_type=model.config.model_type, shape=s,
                     max_positions=getattr(text_config(model.config), "max_position_embeddings", 2048),
                     act=activation_name(model.config))
