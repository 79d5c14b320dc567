import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dipstream.errors import DipstreamError
from dipstream.models import describe, mlp_parts
from tests.conftest import tiny_model


def test_generic_mlp_equals_module(arch):
    model = tiny_model(arch)
    x = torch.randn(5, 32)
    for p in mlp_parts(model):
        g = torch.nn.functional.linear(x, p.gate_weight)
        u = torch.nn.functional.linear(x, p.up_weight)
        y = torch.nn.functional.linear(p.act(g) * u, p.down_weight)
        torch.testing.assert_close(y, p.module(x), rtol=1e-5, atol=1e-6)


def test_activation_per_architecture():
    assert mlp_parts(tiny_model("llama"))[0].act_name == "silu"
    assert mlp_parts(tiny_model("gemma3"))[0].act_name == "gelu_pytorch_tanh"


def test_phi3_fused_split_is_a_view():
    model = tiny_model("phi3")
    p = mlp_parts(model)[0]
    fused = p.module.gate_up_proj.weight
    assert p.gate_weight.data_ptr() == fused.data_ptr()
    assert p.up_weight.data_ptr() == fused[48:].data_ptr()


def test_describe_shapes():
    info = describe(tiny_model("gemma3"))
    assert (info.n_layers, info.d_model, info.d_ff, info.vocab) == (2, 32, 48, 96)
    assert (info.n_heads, info.n_kv_heads) == (4, 2)


def test_non_gated_architecture_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(DipstreamError, match="'gpt2'.*supported: .*llama"):
        mlp_parts(model)
