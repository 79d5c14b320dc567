"""Mixture-of-experts in the simulator: shapes, the hook contract (trace module docstring), a
simulate() and the MoE dense streaming baseline worked by hand, the synthetic MoE generator and
scripts/turbosparse_phone.py. Every tiny model here is at 8 bits (bytes = weights), DRAM 100 B/s,
Flash 10 B/s, reads not overlapped (time = sum)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import transformers

from dipstream.simulator import (Hardware, Hook, MaskTrace, ModelShape, check_trace_matches,
                                 dense_streaming_baseline, get_shape, hook_specs, load_hardware,
                                 plan_placement, simulate, synthetic_trace)
from dipstream.simulator.hardware import KINDS
from dipstream.simulator.simulate import n_linears, reads_per_unit
from dipstream.simulator.synthetic_moe import synthetic_moe_trace

HW = Hardware(name="tiny", dram_bw=100, flash_bw=10, bits={k: 8 for k in KINDS})
ROOT = Path(__file__).resolve().parents[2]


# ---- ModelShape -----------------------------------------------------------------------------

def test_moe_weights_by_hand():
    # L=2, d=4, one expert's D=3, V=10, 2 heads / 1 KV head (g=0.5), 4 experts, top-2
    s = ModelShape(2, 4, 3, 10, 2, 1, n_experts=4, experts_per_token=2)
    assert s.is_moe and s.expert_weights() == 3 * 4 * 3 == 36
    assert s.mlp_weights() == 2 * 4 * 36 == 288          # every expert of every layer
    assert s.router_weights() == 2 * 4 * 4 == 32          # L * d * E
    assert s.attention_weights() == 16 * (2 + 1) * 2 == 96  # head_dim d / n_heads: d^2 (2 + 2g) L
    assert s.kv_cache_weights(5) == 5 * 4 * 2 * 2 * 0.5 == 40
    assert s.weights() == {"attention": 96, "mlp": 288, "lm_head": 40, "embedding": 40, "router": 32}
    assert s.weight_bytes({k: 8 for k in KINDS}) == 96 + 288 + 40 + 40 + 32


def test_moe_weights_with_shared_expert_and_head_dim():
    # as above plus a shared expert of D=5 and head_dim 3 (n_heads * head_dim = 6 != d = 4)
    s = ModelShape(2, 4, 3, 10, 2, 1, n_experts=4, experts_per_token=2, shared_d_ff=5, head_dim=3)
    assert s.mlp_weights() == 3 * 4 * 2 * (3 * 4 + 5) == 408
    assert s.router_weights() == 2 * 4 * (4 + 1) == 40     # + the shared expert's gate
    assert s.attention_weights() == 2 * (2 * 4 * 6 + 2 * 4 * 3) == 144  # q, o: d*6; k, v: d*3
    assert s.kv_cache_weights(5) == 5 * 2 * 1 * 3 * 2 == 60


def test_dense_shapes_unchanged_and_dicts_round_trip():
    dense = get_shape("llama3-8b")
    assert "router" not in dense.weights() and not dense.is_moe and dense.router_weights() == 0
    old = {k: v for k, v in dense.to_dict().items()
           if k not in ("n_experts", "experts_per_token", "shared_d_ff", "head_dim")}
    assert ModelShape.from_dict(old) == dense  # a dict written before the MoE fields
    for name in ("qwen3-30b-a3b", "qwen1.5-moe-a2.7b"):
        assert ModelShape.from_dict(get_shape(name).to_dict()) == get_shape(name)


@pytest.mark.parametrize("kw,msg", [
    (dict(n_experts=4, experts_per_token=5), "experts_per_token must be in 1..n_experts=4"),
    (dict(n_experts=4), "experts_per_token must be in 1..n_experts=4"),
    (dict(shared_d_ff=8), "need n_experts > 0"),
    (dict(experts_per_token=2), "need n_experts > 0"),
    (dict(head_dim=-1), "head_dim must be >= 0")])
def test_bad_moe_fields(kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        ModelShape(2, 4, 3, 10, 2, 1, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,total", [("mixtral-8x7b", 46.7e9), ("turbosparse-mixtral-47b", 46.7e9),
                                        ("qwen3-30b-a3b", 30.5e9), ("qwen1.5-moe-a2.7b", 14.3e9)])
def test_presets_near_public_parameter_counts(name, total):
    # norms and biases are left out: within 2% of the published totals
    assert sum(get_shape(name).weights().values()) == pytest.approx(total, rel=0.02)


def test_from_hf_config_moe():
    mix = transformers.MixtralConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=12, vocab_size=20,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2)
    assert ModelShape.from_hf_config(mix) == ModelShape(2, 8, 12, 20, 2, 1, n_experts=4, experts_per_token=2)
    q2 = transformers.Qwen2MoeConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=16,
                                     moe_intermediate_size=6, shared_expert_intermediate_size=10, num_experts=4,
                                     num_experts_per_tok=2, vocab_size=20, num_attention_heads=2,
                                     num_key_value_heads=2)
    assert ModelShape.from_hf_config(q2) == ModelShape(2, 8, 6, 20, 2, 2, n_experts=4, experts_per_token=2,
                                                       shared_d_ff=10)
    q3 = dict(num_hidden_layers=2, hidden_size=8, moe_intermediate_size=6, num_experts=4, num_experts_per_tok=2,
              num_attention_heads=2, num_key_value_heads=1, vocab_size=20)
    assert ModelShape.from_hf_config(transformers.Qwen3MoeConfig(head_dim=8, **q3)) == \
        ModelShape(2, 8, 6, 20, 2, 1, n_experts=4, experts_per_token=2, head_dim=8)
    # head_dim equal to hidden_size // heads: the reference's dense formulas, d^2 (2 + 2g) L
    s = ModelShape.from_hf_config(transformers.Qwen3MoeConfig(head_dim=4, **q3))
    assert s.head_dim == 4 and s == ModelShape(2, 8, 6, 20, 2, 1, n_experts=4, experts_per_token=2)
    assert s.attention_weights() == 8 ** 2 * (2 + 2 * 0.5) * 2 and s.kv_cache_weights(10) == 10 * 8 * 2 * 2 * 0.5
    with pytest.raises(ValueError, match="mixes dense and MoE layers"):
        ModelShape.from_hf_config(transformers.Qwen2MoeConfig(num_hidden_layers=2, mlp_only_layers=[1]))


# ---- hooks and check_trace_matches ----------------------------------------------------------

TINY = ModelShape(1, 2, 2, 3, 1, 1, n_experts=4, experts_per_token=1, shared_d_ff=2)


def _trace(hooks, T=2):
    return MaskTrace([Hook(n, k, u, w, np.ones((T, u), bool)) for n, k, u, w in hooks], metadata={"model": "tiny"})


def test_expert_hooks_accepted():
    tr = _trace([("layers.0.experts", "expert", 4, 12), ("layers.0.expert.1.up", "expert", 1, 4),
                 ("layers.0.expert.2.neuron", "neuron", 2, 6), ("layers.0.expert.3.in", "in", 2, 4),
                 ("layers.0.shared.neuron", "neuron", 2, 6)])
    for h in tr.hooks:  # alternatives (together they cover more than the MLP)
        check_trace_matches(MaskTrace([h]), TINY)
    # cache shares: one per expert linear covered (4 experts x 3 matrices; one linear); reads per
    # missed unit: one per matrix
    assert [n_linears(h, TINY) for h in tr.hooks] == [12, 1, 3, 2, 3]
    assert [reads_per_unit(h, TINY) for h in tr.hooks] == [3, 1, 3, 2, 3]
    assert [h.name for h in hook_specs(TINY, "experts")] == ["layers.0.experts"]
    assert [(h.name, h.n_units, h.unit_weights) for h in hook_specs(TINY, "neuron")][-2:] == \
        [("layers.0.expert.3.neuron", 2, 6), ("layers.0.shared.neuron", 2, 6)]


@pytest.mark.parametrize("hook,shape,msg", [
    (("layers.0.experts", "expert", 3, 12), TINY, "recorded for n_experts=3 .* has n_experts=4"),
    (("layers.0.experts", "expert", 4, 18), TINY, "recorded for d_model\\*d_ff=6 .* has d_model\\*d_ff=4"),
    (("layers.0.expert.0.up", "expert", 1, 6), TINY, "recorded for d_model\\*d_ff=6 .* has d_model\\*d_ff=4"),
    (("layers.0.expert.4.neuron", "neuron", 2, 6), TINY, "more experts .* has n_experts=4"),
    (("layers.0.shared.neuron", "neuron", 3, 6), TINY, "recorded for shared_d_ff=3 .* has shared_d_ff=2"),
    (("layers.0.expert.0.in", "in", 2, 6), TINY, "recorded for d_ff=3 .* has d_ff=2"),
    (("layers.0.shared.in", "in", 2, 4), ModelShape(1, 2, 2, 3, 1, 1, n_experts=4, experts_per_token=1),
     "shared_d_ff=0"),
    (("layers.0.experts", "expert", 4, 12), ModelShape(1, 2, 2, 3, 1, 1), "has n_experts=0")])
def test_check_rejects_wrong_expert_hooks(hook, shape, msg):
    tr = _trace([hook])
    with pytest.raises(ValueError, match=msg) as e:
        check_trace_matches(tr, shape, "tiny")
    assert "\n" not in str(e.value)


def test_check_rejects_other_expert_count_in_metadata():
    tr = MaskTrace([Hook("layers.0.experts", "expert", 4, 12, np.ones((2, 4), bool))],
                   metadata={"model": "tiny", "n_experts": 8})
    with pytest.raises(ValueError, match="recorded for n_experts=8 .* has n_experts=4"):
        check_trace_matches(tr, TINY)


# ---- simulate() worked by hand ----------------------------------------------------------------

def test_simulate_experts_hook_by_hand():
    """TINY: L=1, d=2, expert D=2, V=3, one head, 4 experts (top-1), shared expert D=2.
    Weights: attention d^2 (2+2g) L = 16, lm_head 6, embedding 6, router L d (E+1) = 10, kv(s) = 4s;
    a routed expert 3 d D = 12, the shared expert 12 (MLP 4*12 + 12 = 60).
    Hooks: layers.0.experts (4 units of 12 B, 12 linears) and layers.0.shared.neuron (2 units of
    6 B, 3 linears): they cover all 60 MLP weights. One sequence of 4 tokens, no prompt: KV placed
    at 4 (16 B): static 16+6+6+10+16 = 54 B. DRAM 84 B leaves 30 B: 15 linear shares of 2 B ->
    experts 24 B = 2 experts, shared 6 B = 1 neuron.

        token  experts  shared    experts LRU (cap 2)      shared (cap 1)
        t0     {0}      {0}       miss -> {0}              miss -> {0}
        t1     {1}      {0,1}     miss -> {0,1}            hit 0; new 1 over capacity, dropped
        t2     {0}      {1}       hit                      miss, evict 0 -> {1}
        t3     {2}      {1}       miss, evict 1 -> {0,2}   hit

    MLP time (DRAM B / 100 + Flash B / 10): t0 1.2 + 0.6 = 1.8; t1 1.2 + 0.06 + 0.6 = 1.86;
    t2 0.12 + 0.6 = 0.72; t3 1.2 + 0.06 = 1.26; mean 5.64 / 4 = 1.41. Static per token, KV at
    (0 + 4) / 2 = 2: 16+6+6+10+8 = 46 B = 0.46 s. tokens/s = 1 / 1.87.
    Hit rate (weights 12 and 3): (12 * (0+0+1+0) + 3 * (0 + 1/2 + 0 + 1)) / (12*4 + 3*4) = 16.5 / 60.
    """
    m_exp = np.zeros((4, 4), bool)
    m_exp[[0, 1, 2, 3], [0, 1, 0, 2]] = True
    m_sh = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], bool)
    tr = MaskTrace([Hook("layers.0.experts", "expert", 4, 12, m_exp),
                    Hook("layers.0.shared.neuron", "neuron", 2, 6, m_sh)],
                   metadata={"model": "tiny", "density": None, **TINY.to_dict()})
    pl = plan_placement(TINY, HW, tr.hooks, 84, 4)
    assert pl.static_parts["router"] == 10 and pl.static_bytes == 54 and pl.cache_bytes == 30
    assert pl.capacity.tolist() == [2, 1] and pl.n_linears.tolist() == [12, 3]
    assert pl.reads_per_unit.tolist() == [3, 3]
    assert plan_placement(TINY, HW.replace(bundle=True), tr.hooks, 84, 4).reads_per_unit.tolist() == [1, 1]
    r = simulate(tr, HW, policy="lru", dram_bytes=84)
    assert r.tokens_per_s == pytest.approx(1 / 1.87)
    assert r.t_mlp_s == pytest.approx(1.41) and r.t_static_s == pytest.approx(0.46)
    assert r.hit_rate == pytest.approx(16.5 / 60)
    assert r.hit_rate_per_hook == pytest.approx([1 / 4, 1.5 / 4])
    assert r.mlp_flash_bytes_per_token == pytest.approx((18 + 18 + 6 + 12) / 4)
    assert r.mlp_dram_bytes_per_token == pytest.approx((0 + 6 + 12 + 6) / 4)
    assert r.density_measured == pytest.approx((18 + 24 + 18 + 18) / 4 / 60)


# ---- MoE dense streaming baseline -------------------------------------------------------------

@pytest.mark.parametrize("shared,static_read", [(0, 40), (2, 54)])
def test_moe_dense_baseline_by_hand(shared, static_read):
    """L=1, d=2, expert D=4, 2 experts, top-1: an expert is 3*2*4 = 24 B, a neuron 6 B. Static at
    seq_len 4: attention 16, lm_head 6, embedding 6, router 2*(2 [+1]) = 4 [6], kv 16, [shared
    expert 3*2*2 = 12, no hook: static] = 48 [62]; DRAM static + 12 leaves 12 B over the 2 experts
    (3 linear shares each): 6 B = 1 resident neuron per expert. Each token reads 1 expert: 1
    neuron from DRAM (6 B, 0.06 s) and 3 from Flash (18 B, 1.8 s). Static per token, KV at 2:
    16+6+6+4+8 = 40 [+2 router +12 shared = 54] B."""
    s = ModelShape(1, 2, 4, 3, 1, 1, n_experts=2, experts_per_token=1, shared_d_ff=shared)
    static = 48 + (2 + 12 if shared else 0)
    b = dense_streaming_baseline(s, HW, dram_bytes=static + 12, seq_len=4)
    assert b.static_bytes == static and b.capacity_units == [1, 1]
    assert b.mlp_dram_bytes_per_token == pytest.approx(6) and b.mlp_flash_bytes_per_token == pytest.approx(18)
    assert b.tokens_per_s == pytest.approx(1 / (static_read / 100 + 1.86))
    assert b.hit_rate == pytest.approx(0.25)
    assert b.density_measured == pytest.approx((24 + 12 * bool(shared)) / (48 + 12 * bool(shared)))
    # Flash latency: 3 matrix reads per routed expert (1 bundled) at 0.01 s
    lat = dense_streaming_baseline(s, HW.replace(flash_read_latency_s=0.01), dram_bytes=static + 12, seq_len=4)
    assert 1 / lat.tokens_per_s == pytest.approx(static_read / 100 + 1.86 + 0.03)
    bun = dense_streaming_baseline(s, HW.replace(flash_read_latency_s=0.01, bundle=True),
                                   dram_bytes=static + 12, seq_len=4)
    assert 1 / bun.tokens_per_s == pytest.approx(static_read / 100 + 1.86 + 0.01)


# ---- synthetic MoE traces -------------------------------------------------------------------------

SYN = ModelShape(2, 4, 50, 10, 2, 1, n_experts=8, experts_per_token=2, shared_d_ff=20)


def _routed(tr, shape=SYN):
    """bool (T, L, E): experts with any neuron selected."""
    return np.stack([np.stack([tr.hooks[[h.name for h in tr.hooks].index(f"layers.{i}.expert.{e}.neuron")]
                               .masks.any(axis=1) for e in range(shape.n_experts)], axis=1)
                     for i in range(shape.n_layers)], axis=1)


def test_synthetic_moe_rates():
    tr = synthetic_moe_trace(SYN, 0.2, n_tokens=64, seed=1)
    assert len(tr.hooks) == 2 * (8 + 1) and tr.metadata["method"] == "moe-neuron"
    counts = {h.name: h.masks.sum(axis=1) for h in tr.hooks}
    for i in range(2):
        for e in range(8):
            assert set(np.unique(counts[f"layers.{i}.expert.{e}.neuron"])) <= {0, 10}  # round(0.2 * 50)
        assert np.all(counts[f"layers.{i}.shared.neuron"] == 4)  # every token, round(0.2 * 20)
    assert np.all(_routed(tr).sum(axis=2) == 2)  # 2 of 8 experts per token and layer
    assert tr.metadata["density"] == pytest.approx((2 * 10 + 4) / (8 * 50 + 20))
    assert tr.metadata["neuron_density"] == 0.2 and tr.metadata["expert_density"] == 0.25
    d = synthetic_moe_trace(SYN, n_tokens=64, seed=1, kind="dense")
    assert [h.name for h in d.hooks] == ["layers.0.experts", "layers.1.experts"]
    assert all(h.kind == "expert" and (h.n_units, h.unit_weights) == (8, 600) for h in d.hooks)
    assert np.all(np.stack([h.masks for h in d.hooks], 1) == _routed(tr))  # the same router
    assert d.metadata["density"] == pytest.approx((2 * 50 + 20) / (8 * 50 + 20))
    r = simulate(d, HW, policy="lru", dram_bytes="0.5x")
    assert r.density_measured == pytest.approx(d.metadata["density"])


def test_synthetic_moe_temporal_correlation():
    def repeat(tr):
        m = _routed(tr)
        return (m[1:] & m[:-1]).sum() / m[1:].sum()
    sticky = repeat(synthetic_moe_trace(SYN, 0.2, n_tokens=200, expert_rho=0.98, expert_skew=0, seed=2))
    fresh = repeat(synthetic_moe_trace(SYN, 0.2, n_tokens=200, expert_rho=0.0, expert_skew=0, seed=2))
    assert fresh == pytest.approx(0.25, abs=0.06) and sticky > 0.7  # random: k/E = 0.25
    a = synthetic_moe_trace(SYN, 0.2, n_tokens=8, seed=3)
    b = synthetic_moe_trace(SYN, 0.2, n_tokens=8, seed=3)
    assert all(np.array_equal(x.masks, y.masks) for x, y in zip(a.hooks, b.hooks))


def test_synthetic_generators_refuse_the_other_kind_of_shape():
    with pytest.raises(ValueError, match="needs a mixture-of-experts shape"):
        synthetic_moe_trace(ModelShape(1, 2, 4, 3, 1, 1), 0.5)
    with pytest.raises(ValueError, match="use dipstream.simulator.synthetic_moe.synthetic_moe_trace"):
        synthetic_trace(SYN, "neuron", 0.5)


# ---- scripts/turbosparse_phone.py -------------------------------------------------------------------

def test_turbosparse_script_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("turbosparse_phone", ROOT / "scripts" / "turbosparse_phone.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out
    out = tmp_path / "t.md"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "SIMULATED FROM REPORTED RATES" in text and "0.03 / (2/8) = 0.12" in text and "11.68" in text
    row = next(line for line in text.splitlines() if line.startswith("| a18 | 0.5x"))
    # the baseline cell is dense_streaming_baseline at the script's settings
    hw = load_hardware("a18", bits=mod.BITS, embedding_lookup=True)
    shape = get_shape("turbosparse-mixtral-47b")
    base = dense_streaming_baseline(shape, hw, 0.5 * shape.weight_bytes(hw.bits), seq_len=1024,
                                    sequences=[(0, 8)])
    assert row.split(" | ")[2] == f"{base.tokens_per_s:.2f} ({base.hit_rate:.2f})"
    assert len(row.split(" | ")) == 3 + 4  # experts only and neurons 12%, two policies each
    assert text in capsys.readouterr().out
