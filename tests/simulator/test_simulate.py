"""Placement and timing on a tiny hand-checkable model.

Tiny model: L=1, d=2, D=4, V=3, one head (g=1), untied; every module at 8 bits, so
bytes = weights: attention d^2*(2+2g)*L = 16, lm_head = embedding = d*V = 6, mlp = d*D*3*L = 24,
kv(seq) = seq*d*2*L*g = 4*seq. DIP hooks: in (2 units of 2D = 8 bytes), out (4 units of d = 2
bytes); together they cover the 24 MLP bytes. dram_bw 100 B/s, flash_bw 10 B/s.
Trace: one sequence of 2 tokens, no prompt; in masks {0}, {0}; out masks {0,1}, {1,2}.
"""
import numpy as np
import pytest

from dipstream.simulator import (ClosedLoop, Hardware, Hook, MaskTrace, ModelShape,
                                 dense_streaming_baseline, plan_placement, simulate,
                                 synthetic_trace)

SHAPE = ModelShape(1, 2, 4, 3, 1, 1)
BITS = {k: 8 for k in ("mlp", "attention", "kv_cache", "lm_head", "embedding", "predictors", "adapters")}


def hw(**kw):
    return Hardware(name="tiny", dram_bw=100, flash_bw=10, bits=BITS, **kw)


def tiny_trace():
    m_in = np.array([[1, 0], [1, 0]], bool)
    m_out = np.array([[1, 1, 0, 0], [0, 1, 1, 0]], bool)
    return MaskTrace([Hook("layers.0.in", "in", 2, 8, m_in),
                      Hook("layers.0.out", "out", 4, 2, m_out)],
                     metadata={"model": "tiny", "method": "dip", "density": 0.5,
                               **SHAPE.to_dict()})


def test_placement_capacity_split():
    # static at seq_len 2: 16 + 6 + 6 + 4*2 = 36; DRAM 56 leaves 20, split per linear (the
    # reference): in (up + gate) 2/3 = 13.33 -> floor(13.33 / 8) = 1 unit; out 6.67 / 2 -> 3
    pl = plan_placement(SHAPE, hw(), tiny_trace().hooks, 56, seq_len=2)
    assert pl.static_bytes == 36 and pl.cache_bytes == 20 and pl.overflow_bytes == 0
    assert pl.capacity.tolist() == [1, 3]
    # in proportion to weights: the same for a gated MLP (in 16 of 24 weights)
    pl = plan_placement(SHAPE, hw(), tiny_trace().hooks, 56, seq_len=2, cache_split="weights")
    assert pl.capacity.tolist() == [1, 3]
    # one share per hook (not the reference): 10 each -> in 1, out 5 (more than its 4)
    pl = plan_placement(SHAPE, hw(), tiny_trace().hooks, 56, seq_len=2, cache_split="hook")
    assert pl.capacity.tolist() == [1, 5]
    with pytest.raises(ValueError, match="cache_split must be one of linear, hook, weights"):
        plan_placement(SHAPE, hw(), tiny_trace().hooks, 56, seq_len=2, cache_split="even")


def test_timing_serial():
    r = simulate(tiny_trace(), hw(), SHAPE, "lru", dram_bytes=56)
    # token 0: in miss 1 -> 8 B Flash = 0.8 s; out miss 2 -> 4 B Flash = 0.4 s
    # token 1: in hit -> 8 B DRAM = 0.08 s; out hit {1} 2 B DRAM 0.02 + miss {2} 2 B Flash 0.2
    # mean sum_h t = (1.2 + 0.3) / 2 = 0.75
    # static per token: KV at (P + S) / 2 = (0 + 2) / 2 = 1 -> 4 B; 16+6+6+4 = 32 B DRAM = 0.32 s
    assert r.kv_len_avg == 1.0
    assert r.t_static_s == pytest.approx(0.32)
    assert r.t_mlp_s == pytest.approx(0.75)
    assert r.tokens_per_s == pytest.approx(1 / 1.07)
    # hit rate, hooks weighted by linears (in 2, out 1): (2 (0/1 + 1/1) + (0/2 + 1/2)) / (2*2 + 2)
    assert r.hit_rate == pytest.approx(2.5 / 6)
    assert r.hit_rate_per_hook == pytest.approx([0.5, 0.25])
    assert r.dram_bytes_per_token == pytest.approx(32 + (0 + 10) / 2)
    assert r.flash_bytes_per_token == pytest.approx((12 + 2) / 2)
    assert r.density_measured == pytest.approx(0.5)  # (8 + 2*2) / 24 both tokens
    # TTFT (no prompt): first token, KV length 1: (16+6+6+4)/100 + 1.2
    assert r.ttft_s == pytest.approx(1.52)
    # peak occupancy after token 1: in {0} 8 B + out {0,1,2} 6 B, plus 36 B static
    assert r.dram_used_bytes == 50
    assert r.capacity_units == [1, 3]


def test_timing_lookahead():
    """lookahead: a hook's Flash reads overlap the previous hook's DRAM time (and, for the layer's
    first hook, the layer's attention: (16 B weights + 4 B KV) / 100 B/s = 0.2 s).
    token 0: in waits 0.8 - 0.2 = 0.6; out waits 0.4 - 0 (in read nothing from DRAM) = 0.4 -> 1.0
    token 1: in 0.08 DRAM, no Flash; out 0.02 DRAM + max(0, 0.2 - 0.08) = 0.14 -> 0.22
    mean 0.61, static 0.32 as in test_timing_serial."""
    r = simulate(tiny_trace(), hw(lookahead=True), SHAPE, "lru", dram_bytes=56)
    assert r.t_static_s == pytest.approx(0.32)
    assert r.tokens_per_s == pytest.approx(1 / (0.32 + 0.61))
    with pytest.raises(ValueError, match="two timing models"):
        hw(lookahead=True, pipelined=True)


def test_static_rates_per_kind():
    """dram_bw_static: the head's 6 B at 20 B/s instead of 100: static 0.32 s -> 0.26 + 0.3 = 0.56 s
    (attention 16, embedding 6, KV 4 at 100 B/s; lm_head 6 at 20 B/s); the MLP's hooks unchanged."""
    r = simulate(tiny_trace(), hw(dram_bw_static={"lm_head": 20}), SHAPE, "lru", dram_bytes=56)
    assert r.t_static_s == pytest.approx(0.26 + 0.3)
    assert r.t_mlp_s == pytest.approx(0.75)
    assert r.tokens_per_s == pytest.approx(1 / (0.56 + 0.75))
    with pytest.raises(ValueError, match="unknown module kind"):
        hw(dram_bw_static={"head": 20})


def test_adapters_and_predictors_are_static_dram_weights():
    # 4 adapter + 2 predictor weights (8 bits): static 36 + 6 = 42; DRAM 62 leaves the same 20
    tr = tiny_trace()
    tr.metadata.update(adapter_weights=4, predictor_weights=2)
    pl = plan_placement(SHAPE, hw(), tr.hooks, 62, seq_len=2, predictor_weights=2, adapter_weights=4)
    assert pl.static_parts["adapters"] == 4 and pl.static_parts["predictors"] == 2
    assert pl.static_bytes == 42 and pl.capacity.tolist() == [1, 3]
    r = simulate(tr, hw(), SHAPE, "lru", dram_bytes=62)
    # every token also reads the 6 extra static bytes from DRAM: 0.32 + 0.06 s static
    assert r.t_static_s == pytest.approx(0.38)
    assert r.tokens_per_s == pytest.approx(1 / (0.38 + 0.75))
    assert r.dram_used_bytes == 56


def test_timing_overlapped():
    r = simulate(tiny_trace(), hw(overlap=True), SHAPE, "lru", dram_bytes=56)
    # token 0: max(0, 0.8) + max(0, 0.4) = 1.2; token 1: 0.08 + max(0.02, 0.2) = 0.28
    assert r.t_mlp_s == pytest.approx(0.74)
    assert r.tokens_per_s == pytest.approx(1 / (0.32 + 0.74))


def test_no_cache_all_flash():
    r = simulate(tiny_trace(), hw(), SHAPE, "none", dram_bytes=56)
    # every selected unit from Flash: token 0 1.2 s, token 1 0.8 + 0.4 = 1.2 s
    assert r.hit_rate == 0 and r.t_mlp_s == pytest.approx(1.2)


def test_static_overflow_streamed():
    # DRAM 30 < static 36: overflow 6 B streamed from Flash every token, no cache space
    r = simulate(tiny_trace(), hw(), SHAPE, "lru", dram_bytes=30)
    assert r.static_overflow_bytes == 6 and r.cache_bytes == 0 and r.capacity_units == [0, 0]
    # static per token: 32 B read, 6 from Flash (0.6 s), 26 from DRAM (0.26 s)
    assert r.t_static_s == pytest.approx(0.86)
    # capacity 0: the caches never hold a unit (reference), every unit from Flash: 1.2 s
    assert r.t_mlp_s == pytest.approx(1.2) and r.hit_rate == 0
    # keep-mask (not the reference) keeps the last mask even at capacity 0: the hits of above
    r = simulate(tiny_trace(), hw(), SHAPE, "lru", dram_bytes=30, over_capacity="keep-mask")
    assert r.t_mlp_s == pytest.approx(0.75)


def test_static_overflow_error():
    with pytest.raises(ValueError, match=r"DRAM \(3e-08 GB\) is smaller than the static "
                                         r"layers \(3.6e-08 GB\)"):
        simulate(tiny_trace(), hw(stream_static_overflow=False), SHAPE, dram_bytes=30)


def test_dram_relative_and_missing():
    r = simulate(tiny_trace(), hw(), SHAPE, dram_bytes="1x")  # 16+6+6+24 = 52 B
    assert r.dram_bytes == 52
    with pytest.raises(ValueError, match="no DRAM size"):
        simulate(tiny_trace(), hw(), SHAPE)


def test_dense_baseline_hand():
    # DRAM 56: static 36, 20 B left for the one layer; neuron = 3d = 6 B -> 3 of 4 resident
    # per token: MLP 18 B DRAM (0.18 s) + 6 B Flash (0.6 s); static KV at (0+2)/2 -> 32 B
    r = dense_streaming_baseline(SHAPE, hw(), dram_bytes=56, seq_len=2)
    assert r.capacity_units == [3]
    assert r.mlp_dram_bytes_per_token == 18 and r.mlp_flash_bytes_per_token == 6
    assert r.tokens_per_s == pytest.approx(1 / (0.32 + 0.78))
    assert r.hit_rate == pytest.approx(0.75) and r.density_measured == 1.0
    # DRAM only for the static layers: the whole MLP streams (24 B Flash = 2.4 s)
    r = dense_streaming_baseline(SHAPE, hw(), dram_bytes=36, seq_len=2)
    assert r.tokens_per_s == pytest.approx(1 / (0.32 + 2.4))


def test_roofline_and_latency_switches():
    # compute: flops/token = 2*(16 + 6) static weights + 4*kv*d*L + 2*MLP weights used (12)
    # per token 44 + 4*1*2 + 24 = 76; at 40 FLOP/s that is 1.9 s > I/O (1.52 s, 0.62 s)
    r = simulate(tiny_trace(), hw(compute_flops=40), SHAPE, "lru", dram_bytes=56)
    assert r.time_per_token_s == pytest.approx(1.9) and r.compute_bound_fraction == 1.0
    # latency 0.1 s per read, queue depth 2: token 0 reads in 2 (one unit x up+gate), out 2
    # -> +0.1 +0.1; token 1: out 1 read -> +0.05; mean extra (0.2 + 0.05)/2
    r = simulate(tiny_trace(), hw(flash_read_latency_s=0.1, flash_queue_depth=2), SHAPE,
                 "lru", dram_bytes=56)
    assert r.t_mlp_s == pytest.approx(0.75 + 0.125)
    r = simulate(tiny_trace(), hw(flash_read_latency_s=0.1, flash_queue_depth=2, bundle=True),
                 SHAPE, "lru", dram_bytes=56)
    assert r.t_mlp_s == pytest.approx(0.75 + (0.05 + 0.1 + 0.05) / 2)


def test_prompt_ttft():
    tr = tiny_trace()
    tr.prompt_len = np.array([1])
    r = simulate(tr, hw(), SHAPE, "lru", dram_bytes=56)
    # decode statistics over token 1 only; KV at (P + S) / 2 = 1.5 -> 6 B: static 34 B = 0.34 s
    assert r.n_tokens == 1 and r.t_static_s == pytest.approx(0.34)
    assert r.t_mlp_s == pytest.approx(0.3)
    # prefill of 1 token: static with KV 1 (32 B, 0.32 s) + whole MLP from Flash (2.4 s)
    assert r.ttft_s == pytest.approx(2.72)


SMALL = ModelShape(3, 64, 192, 100, 4, 2)


@pytest.mark.parametrize("policy", ["none", "lru", "lfu", "window", "hot"])
def test_closed_loop_equals_simulate(policy):
    tr = synthetic_trace(SMALL, "dip", 0.5, n_tokens=24, seq_len=10, prompt_len=3, seed=3)
    kw = {"frequency": tr.frequencies()} if policy == "hot" else {}
    ref = simulate(tr, "a18", SMALL, policy, dram_bytes="0.6x", **kw).to_dict()
    # token-major: cached() then record(masks) per token
    loop = ClosedLoop(tr.hooks, SMALL, "a18", policy, "0.6x", seq_len=10,
                      metadata=tr.metadata, **kw)
    for (a, b), p in zip(tr.sequences(), tr.prompt_len):
        loop.new_sequence(int(p))
        for t in range(a, b):
            loop.cached()
            loop.record([h.masks[t] for h in tr.hooks])
    assert loop.result().to_dict() == ref
    # hook-major: each hook runs through a sequence before the next hook starts
    loop = ClosedLoop(tr.hooks, SMALL, "a18", policy, "0.6x", seq_len=10,
                      metadata=tr.metadata, **kw)
    for (a, b), p in zip(tr.sequences(), tr.prompt_len):
        loop.new_sequence(int(p))
        for h in tr.hooks:
            hs = loop.hook(h.name)
            for t in range(a, b):
                hs.cached()
                hs.record(h.masks[t])
    assert loop.result().to_dict() == ref


def test_belady_beats_lru_on_trace():
    tr = synthetic_trace(SMALL, "neuron", 0.3, n_tokens=40, seq_len=20, seed=1)
    res = {p: simulate(tr, "a18", SMALL, p, dram_bytes="0.6x") for p in ("lru", "belady")}
    assert res["belady"].hit_rate >= res["lru"].hit_rate
    assert res["belady"].tokens_per_s >= res["lru"].tokens_per_s


def test_result_to_dict_plain():
    import json
    r = simulate(tiny_trace(), hw(), SHAPE, dram_bytes=56)
    json.dumps(r.to_dict())
