"""Random-weight models of real shapes (a simulator preset such as llama3-8b), built from a config
straight on the target device and dtype: kernel and evaluation speed do not depend on weights."""

from __future__ import annotations

import torch

from dipstream.simulator.model_shape import get_shape


def random_causal_lm(shape_name: str, dtype: torch.dtype, device, layers: int | None = None, seed: int = 0):
    """A Llama-architecture CausalLM with the preset's widths (`layers` overrides its depth, to
    keep CPU runs short), random weights, eval mode, no gradients."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    s = get_shape(shape_name)
    cfg = LlamaConfig(hidden_size=s.d_model, intermediate_size=s.d_ff, num_hidden_layers=layers or s.n_layers,
                      num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, vocab_size=s.vocab,
                      tie_word_embeddings=s.tied_embeddings, hidden_act="silu", max_position_embeddings=8192)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
