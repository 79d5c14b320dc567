"""Tiny random-weight models of each supported architecture, built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_config(arch: str):
    from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config, Qwen2Config

    if arch == "llama":
        return LlamaConfig(**TINY, hidden_act="silu")
    if arch == "qwen2":
        return Qwen2Config(**TINY, hidden_act="silu")
    if arch == "phi3":
        return Phi3Config(**TINY, hidden_act="silu", pad_token_id=0)
    if arch == "gemma3":
        return Gemma3TextConfig(**TINY, head_dim=8, hidden_activation="gelu_pytorch_tanh",
                                sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    return tiny_moe_config(arch)


def tiny_moe_config(arch: str, **kw):
    """Tiny mixture-of-experts configs: 4 routed experts of intermediate size 24, 2 per token;
    qwen2_moe adds a shared expert of 40. `kw` overrides any field."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    base = {**TINY, "num_experts_per_tok": 2, "hidden_act": "silu"}
    if arch == "mixtral":
        return MixtralConfig(**{**base, "intermediate_size": 24, "num_local_experts": 4, **kw})
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**{**base, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40,
                                 "num_experts": 4, "norm_topk_prob": False, **kw})
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**{**base, "moe_intermediate_size": 24, "num_experts": 4, "norm_topk_prob": True,
                                 "head_dim": 8, **kw})
    raise ValueError(arch)


MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def shape_of(model):
    """The simulator's ModelShape of a loaded model."""
    from dipstream.models.arch import describe

    return describe(model).shape


def tiny_model(arch: str, seed: int = 0):
    """A tiny random CausalLM in eval mode, float32, weights large enough to make masks matter."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # 3D: the fused routed experts of a MoE model
                p.normal_(0, 0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


ARCHS = ["llama", "qwen2", "phi3", "gemma3"]

# a small text in three paragraphs (documents), for runs on the tiny checkpoint
TEXT = ("the quick brown fox jumps over the lazy dog. pack my box with five dozen jugs. " * 40 + "\n\n") * 3


@pytest.fixture
def text_file(tmp_path):
    """TEXT in a file."""
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    return f


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def tokens():
    return torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(1))


def _byte_tokenizer():
    """A small byte-level BPE tokenizer, trained on the fly (no hub)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen jugs"]
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="<s>")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A local HF checkpoint folder: tiny Llama + byte-level tokenizer (vocab 300)."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY, "vocab_size": 300}, hidden_act="silu")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_moe_checkpoint(tmp_path_factory):
    """A local HF checkpoint folder: tiny Qwen2-MoE (4 experts, 2 per token, a shared expert) with
    the byte-level tokenizer (vocab 300)."""
    path = tmp_path_factory.mktemp("tiny-qwen2-moe")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config("qwen2_moe", vocab_size=300))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path
