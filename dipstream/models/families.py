"""One table of the architectures dipstream runs (no torch): where the gated MLP and the attention
of each Hugging Face family live, and how the lean engine runs its decoder block.

The accuracy lab reads the module paths (`models.arch` views a loaded model's MLPs through them);
the engine's export reads the checkpoint tensors by the same names and runs the block as
``DecoderSpec`` says. A family without a ``decoder`` is one the engine does not run (the
mixture-of-experts blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

from dipstream.errors import DipstreamError


@dataclass(frozen=True)
class MoeSpec:
    """Where the parts of a mixture-of-experts block live (transformers 5 layout: routed experts'
    weights fused into 3D tensors, gate rows first)."""

    router: str = "gate"             # returns (logits, top-k weights, top-k expert indices)
    experts: str = "experts"
    gate_up: str = "gate_up_proj"    # (E, 2 D, d)
    down: str = "down_proj"          # (E, d, D)
    shared: str | None = None        # an always-on shared expert (a gated MLP), Qwen2-MoE
    shared_gate: str | None = None   # its sigmoid gate, d -> 1


@dataclass(frozen=True)
class DecoderSpec:
    """A family's decoder block as the lean engine runs it. Per layer: x += [post_attn_norm]
    attention(attn_norm(x)); x += [post_mlp_norm] MLP(mlp_norm(x)); then final_norm and the head.
    Attention biases and per-head q/k norms are taken where the checkpoint has them."""

    norm_plus_one: bool = False        # Gemma: RMS norms multiply by (1 + w)
    embed_scale: bool = False          # Gemma: embeddings scaled by sqrt(d)
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    post_attn_norm: str | None = None  # Gemma 2 / 3: the "sandwich" norms after attention and MLP
    post_mlp_norm: str | None = None
    qkv: str | None = None             # fused [q; k; v] projection (Phi-3)
    window_all_layers: bool = False    # a config's sliding_window without layer_types: every layer (Mistral, Phi-3)


@dataclass(frozen=True)
class ArchSpec:
    """Where the gated MLP lives in one architecture, and how the engine runs its block."""

    layers: str            # dotted path from the CausalLM to the list of decoder blocks
    mlp: str               # attribute of a block holding the MLP
    gate: str | None       # gate projection name (None when fused)
    up: str | None         # up projection name (None when fused)
    down: str              # down projection name
    fused_gate_up: str | None = None  # fused [gate; up] projection (Phi-3): first half gate
    act_attrs: tuple[str, ...] = ("hidden_act",)  # config fields naming the activation, in order
    attn: str = "self_attn"  # attribute of a block holding the attention
    attn_proj: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    moe: MoeSpec | None = None  # a mixture-of-experts block in place of the MLP (models/moe.py)
    decoder: DecoderSpec | None = None  # how the lean engine runs the block (None: it does not)


_LLAMA_BLOCK = DecoderSpec()
_LLAMA = ArchSpec("model.layers", "mlp", "gate_proj", "up_proj", "down_proj", decoder=_LLAMA_BLOCK)
_GEMMA_ACT = ("hidden_activation", "hidden_act")
_SANDWICH = DecoderSpec(norm_plus_one=True, embed_scale=True, mlp_norm="pre_feedforward_layernorm",
                        post_attn_norm="post_attention_layernorm", post_mlp_norm="post_feedforward_layernorm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": ArchSpec("model.layers", "mlp", "gate_proj", "up_proj", "down_proj",
                        decoder=DecoderSpec(window_all_layers=True)),
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "smollm3": _LLAMA,
    "phi3": ArchSpec("model.layers", "mlp", None, None, "down_proj", fused_gate_up="gate_up_proj",
                     attn_proj=("qkv_proj", "o_proj"),
                     decoder=DecoderSpec(qkv="qkv_proj", window_all_layers=True)),
    "gemma": ArchSpec("model.layers", "mlp", "gate_proj", "up_proj", "down_proj", act_attrs=_GEMMA_ACT,
                      decoder=DecoderSpec(norm_plus_one=True, embed_scale=True)),
    "gemma2": ArchSpec("model.layers", "mlp", "gate_proj", "up_proj", "down_proj", act_attrs=_GEMMA_ACT,
                       decoder=_SANDWICH),
    "gemma3_text": ArchSpec("model.layers", "mlp", "gate_proj", "up_proj", "down_proj", act_attrs=_GEMMA_ACT,
                            decoder=_SANDWICH),
    "mixtral": ArchSpec("model.layers", "mlp", "gate_proj", "up_proj", "down_proj", moe=MoeSpec()),
    "qwen3_moe": ArchSpec("model.layers", "mlp", "gate_proj", "up_proj", "down_proj", moe=MoeSpec()),
    "qwen2_moe": ArchSpec("model.layers", "mlp", "gate_proj", "up_proj", "down_proj",
                          moe=MoeSpec(shared="shared_expert", shared_gate="shared_expert_gate")),
}
ARCHITECTURES["gemma3"] = ARCHITECTURES["gemma3_text"]


def model_type_of(config) -> str | None:
    """The model_type of a config (its text part's for a multimodal Gemma 3)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and getattr(config, "text_config", None) is not None:
        return "gemma3_text"
    return model_type


def arch_spec(config) -> ArchSpec:
    """The ArchSpec of a transformers config, or a one-line error for unsupported architectures."""
    model_type = model_type_of(config)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise DipstreamError(
            f"architecture '{model_type}' has no gated MLP that dipstream supports; "
            f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return spec


def decoder_spec(config) -> DecoderSpec:
    """How the lean engine runs this config's family, or a one-line error naming the families it runs."""
    spec = arch_spec(config)
    if spec.decoder is None:
        raise DipstreamError(f"the lean engine runs {', '.join(engine_families())}, not "
                             f"'{model_type_of(config)}' (a mixture-of-experts model: `eval`, `simulate` and "
                             "`sweep` run it)")
    return spec.decoder


def engine_families() -> list[str]:
    """The model types the lean engine runs."""
    return sorted(t for t, s in ARCHITECTURES.items() if s.decoder is not None)


def text_config(config):
    return getattr(config, "text_config", None) or config


def activation_name(config) -> str:
    """The MLP activation a config names (the family's fields, in order)."""
    cfg = text_config(config)
    for attr in arch_spec(config).act_attrs:
        name = getattr(cfg, attr, None)
        if name:
            return name
    raise DipstreamError(f"config of '{model_type_of(config)}' names no MLP activation")
