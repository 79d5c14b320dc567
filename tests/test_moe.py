"""Mixture-of-experts blocks: methods inside routed experts, proved on tiny random MoE models.

Every unread expert and every unread column is NaN-poisoned: the output must not change. The
dense method reproduces the transformers eager path bit for bit; density accounting is checked
against hand-worked byte counts.
"""

from __future__ import annotations

import pytest
import torch

from dipstream.errors import DipstreamError
from dipstream.models.arch import mlp_parts
from dipstream.models.moe import moe_parts
from dipstream.sparsity.attach import attach
from dipstream.sparsity.methods import build_method
from tests.conftest import MOE_ARCHS, tiny_model, tiny_moe_config


@pytest.fixture(params=MOE_ARCHS)
def moe_arch(request):
    return request.param


def _ids(seed=1, T=12):
    return torch.randint(1, 96, (2, T), generator=torch.Generator().manual_seed(seed))


def _eager(arch, seed=0):
    m = tiny_model(arch, seed)
    m.set_experts_implementation("eager")
    return m


def test_dense_method_is_the_eager_moe_forward_bit_for_bit(moe_arch):
    m = _eager(moe_arch)
    ids = _ids()
    ref = m(ids).logits
    sm = attach(m, build_method("dense"))
    assert torch.equal(m(ids).logits, ref)
    with sm.dense():  # the switch runs the original blocks
        assert torch.equal(m(ids).logits, ref)
    sm.detach()
    assert torch.equal(m(ids).logits, ref)


def test_dip_at_density_one_reads_all_of_the_routed_experts(moe_arch):
    m = _eager(moe_arch)
    ids = _ids()
    ref = m(ids).logits
    sm = attach(m, build_method("dip", 1.0))
    out = m(ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    # inside the routed experts nothing is skipped: FFN bytes read = those of the routed experts
    assert sm.stats.mean("mlp") == pytest.approx(sm.stats.mean("expert"), abs=1e-12)


@pytest.mark.parametrize("arch,expected", [("mixtral", 2 / 4), ("qwen3_moe", 2 / 4),
                                           ("qwen2_moe", (2 * 24 + 40) / (4 * 24 + 40))])
def test_expert_level_density_by_hand(arch, expected):
    """2 of 4 routed experts of intermediate size 24 per token (+ the shared expert of 40 for
    qwen2_moe), over all of the block's FFN weights."""
    m = tiny_model(arch)
    sm = attach(m, build_method("dense"))
    m(_ids())
    assert sm.stats.mean("expert") == pytest.approx(expected, abs=1e-12)
    assert sm.stats.mean("mlp") == pytest.approx(expected, abs=1e-12)


def test_dip_density_splits_into_expert_and_neuron_level():
    """DIP d=0.5 inside each routed expert: k_in = int(0.574 * 32) = 18 of 32 up/gate columns,
    k_out = int(0.352 * 24) = 8 of 24 down columns, so a routed expert reads (2*18/32 + 8/24)/3
    of its weights; 2 of 4 experts are routed: measured = 0.5 * that."""
    m = tiny_model("mixtral")
    sm = attach(m, build_method("dip", 0.5))
    m(_ids())
    from dipstream.budget import dip_split

    up, down = dip_split(0.5)
    inside = (2 * int(up * 32) / 32 + int(down * 24) / 24) / 3
    assert sm.stats.mean("expert") == pytest.approx(0.5, abs=1e-12)
    assert sm.stats.mean("mlp") == pytest.approx(0.5 * inside, abs=1e-7)  # float32 fractions


class _Keep:
    """Observer keeping every layer's MoeSelection."""

    def __init__(self):
        self.sel = {}

    def __call__(self, layer, sel, x):
        self.sel[layer] = sel


def _poison_unread(sm, seen: _Keep) -> tuple[int, int]:
    """NaN every expert no token was routed to and every up/gate/down column of a routed expert
    (and of the shared expert) that no token read. Returns (experts poisoned, columns poisoned)."""
    experts = cols = 0
    with torch.no_grad():
        for i, block in enumerate(sm.blocks):
            s = seen.sel[i]
            gu, dn = block.module.experts.gate_up_proj, block.module.experts.down_proj
            for e, p in enumerate(block.experts):
                if e not in s.picked:
                    gu[e].fill_(float("nan"))
                    dn[e].fill_(float("nan"))
                    experts += 1
                    continue
                sel = s.picked[e][1]
                cols += _poison_cols(p, sel)
            if block.shared is not None:
                cols += _poison_cols(block.shared, s.shared)
    return experts, cols


def _poison_cols(p, sel) -> int:
    n = 0
    if sel.up_cols is not None:
        unused = ~sel.up_cols.any(0)
        p.gate_weight[:, unused] = float("nan")
        p.up_weight[:, unused] = float("nan")
        n += int(unused.sum())
    if sel.down_cols is not None:
        unused = ~sel.down_cols.any(0)
        p.down_weight[:, unused] = float("nan")
        n += int(unused.sum())
    return n


@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("method,density", [("dip", 0.5), ("dip", 0.3), ("dense", 1.0), ("glu", 0.8)])
def test_unread_experts_and_columns_can_be_nan(moe_arch, method, density, T):
    m = tiny_model(moe_arch, seed=3)
    ids = _ids(T=1)[:1] if T == 1 else _ids(T=T)  # one token reads 2 of the 4 experts of a layer
    seen = _Keep()
    sm = attach(m, build_method(method, density))
    sm.observers.append(seen)
    ref = m(ids).logits
    experts, cols = _poison_unread(sm, seen)
    assert experts > 0 or T > 1, "no expert went unread: the test proves nothing about skipped experts"
    assert cols > 0 or method == "dense"
    out = m(ids).logits
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)


def test_poisoning_a_read_expert_does_change_the_output():
    """The check above can fail: NaN in an expert some token reads reaches the output."""
    m = tiny_model("mixtral", seed=3)
    ids = _ids(T=1)[:1]
    seen = _Keep()
    sm = attach(m, build_method("dip", 0.5))
    sm.observers.append(seen)
    m(ids)
    e = next(iter(seen.sel[0].picked))
    with torch.no_grad():
        sm.blocks[0].experts[e].down_weight.fill_(float("nan"))
    assert not torch.isfinite(m(ids).logits).all()


@pytest.mark.parametrize("method", ["cats", "teal", "griffin", "dip-ca", "predictor", "drelu-predicted"])
def test_methods_with_per_layer_state_are_refused_in_one_line(method):
    m = tiny_model("mixtral")
    with pytest.raises(DipstreamError, match=f"method '{method}' does not run on mixture-of-experts"):
        attach(m, build_method(method, 0.5))


def test_dense_mlp_paths_refuse_moe_models_and_unsupported_variants():
    m = tiny_model("mixtral")
    with pytest.raises(DipstreamError, match="mixture-of-experts model"):
        mlp_parts(m)
    from transformers import AutoModelForCausalLM

    mixed = AutoModelForCausalLM.from_config(tiny_moe_config("qwen2_moe", mlp_only_layers=[0]))
    with pytest.raises(DipstreamError, match="dense-MLP layers"):
        attach(mixed, build_method("dip", 0.5))


def test_expert_views_share_the_fused_weights():
    m = tiny_model("qwen2_moe")
    b = moe_parts(m)[1]
    ex = m.model.layers[1].mlp.experts
    assert b.n_experts == 4 and b.top_k == 2 and b.experts[0].d_ff == 24 and b.shared.d_ff == 40
    assert b.experts[2].gate_weight.data_ptr() == ex.gate_up_proj[2].data_ptr()
    assert b.experts[2].up_weight.data_ptr() == ex.gate_up_proj[2, 24:].data_ptr()
    assert b.experts[2].down_weight.data_ptr() == ex.down_proj[2].data_ptr()
