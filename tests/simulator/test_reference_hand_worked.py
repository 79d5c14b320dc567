"""The simulator against an example worked by hand from the reference rules (docs/methods.md,
"The simulator"): per-linear cache split, a mask larger than its cache, LRU and LFU, hit rate
weighted by linears, tokens/s averaged per sequence, KV cache at (P + S) / 2.

Tiny model: L=1, d=2, D=4, V=3, one head (g=1), untied, every module at 8 bits (bytes =
weights): attention 16, lm_head 6, embedding 6, MLP 24, kv(s) = 4 s. DIP hooks: ``in`` (2 units
of 2D = 8 B, shared by up and gate: 2 linears), ``out`` (4 units of d = 2 B: 1 linear).
DRAM 100 B/s, Flash 10 B/s, reads not overlapped (time = sum).

Two sequences: A = 3 tokens whose first is the prompt (P=1, S=3), B = 6 tokens, no prompt
(P=0, S=6). Placement at the longest sequence (6): static = 16 + 6 + 6 + 4*6 = 52 B; DRAM 64 B
leaves 12 B of cache, split per linear (3 shares of 4 B): ``in`` gets 2 shares = 8 B -> 1 unit,
``out`` 1 share = 4 B -> 2 units. (One share per hook would give 6 B each: 0 and 3 units.)

    token   in mask  out mask       (a0 is A's prompt: it steps the caches, is not counted)
    a0      {0}      {0,1,2}
    a1      {0,1}    {0,1,2}
    a2      {1}      {0,1,2,3}
    b0      {1}      {0,1}
    b1      {1}      {0}
    b2      {0}      {0}
    b3      {0}      {1}
    b4      {1}      {3}
    b5      {1}      {0}

in (capacity 1), LRU = LFU (at most one candidate to evict):
  a0: miss, cache {0}. a1: hit 0, new 1; the mask (2) exceeds the capacity (1): keep the hit,
  drop the new unit -> {0}. a2: miss (the reference; keep-mask would hold {0,1} and hit), evict 0
  -> {1}. B resets: b0 miss {1}; b1 hit; b2 miss -> {0}; b3 hit; b4 miss -> {1}; b5 hit.
out (capacity 2):
  a0: 3 new units, capacity 2: a random 2 of {0,1,2} stay (X). a1: hits X (2 of 3); the third
  unit is new and dropped -> X. a2: hits X (2 of 4); units {0,1,2,3} minus X are new, both
  dropped -> X. Whatever X is, a1 hits 2 and a2 hits 2.
  B: b0 2 misses -> {0,1}; b1 hit; b2 hit; b3 hit (unit 1); b4 miss, one of {0,1} goes:
  LRU: unit 0 (last used at b2, unit 1 at b3) -> {1,3}, so b5 misses;
  LFU: unit 1 (used twice, unit 0 three times) -> {0,3}, so b5 hits.

Times per decoded token (in + out; DRAM bytes / 100 + Flash bytes / 10):
  a1: in 1 hit 1 miss = 0.08 + 0.8; out 2 hits 1 miss = 0.04 + 0.2   -> 1.12
  a2: in 1 miss = 0.8;              out 2 hits 2 misses = 0.04 + 0.4 -> 1.24
  b0: 0.8 + 0.4 = 1.2; b1: 0.08 + 0.02 = 0.10; b2: 0.8 + 0.02 = 0.82; b3: 0.08 + 0.02 = 0.10;
  b4: 0.8 + 0.2 = 1.0; b5: LRU 0.08 + 0.2 = 0.28, LFU 0.08 + 0.02 = 0.10
Static per token, KV at (P + S) / 2: A (1+3)/2 = 2 -> 28 + 8 = 36 B = 0.36 s;
B (0+6)/2 = 3 -> 28 + 12 = 40 B = 0.40 s.
  A: 0.36 + (1.12 + 1.24)/2 = 1.54 s.
  B, LRU: 0.40 + (1.2 + 0.1 + 0.82 + 0.1 + 1.0 + 0.28)/6 = 0.40 + 3.5/6
  B, LFU: 0.40 + 3.32/6
tokens/s = the mean over sequences of 1 / time: LRU (1/1.54 + 1/(0.4 + 3.5/6)) / 2.
Hit rate per (token, hook) = hits / selected, hooks weighted by linears (in 2, out 1):
  in: 1/2, 0, 0, 1, 0, 1, 0, 1 (sum 3.5); out LRU: 2/3, 2/4, 0, 1, 1, 1, 0, 0 (sum 4 1/6)
  LRU: (2 * 3.5 + 4 1/6) / (2 * 8 + 8); LFU: out sum 5 1/6.
"""
import numpy as np
import pytest

from dipstream.simulator import (Hardware, Hook, MaskTrace, ModelShape, dense_streaming_baseline,
                                 plan_placement, simulate)

SHAPE = ModelShape(1, 2, 4, 3, 1, 1)
BITS = {k: 8 for k in ("mlp", "attention", "kv_cache", "lm_head", "embedding", "predictors", "adapters")}
HW = Hardware(name="tiny", dram_bw=100, flash_bw=10, bits=BITS)
IN = [{0}, {0, 1}, {1}, {1}, {1}, {0}, {0}, {1}, {1}]
OUT = [{0, 1, 2}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1}, {0}, {0}, {1}, {3}, {0}]


def masks(sets, n):
    m = np.zeros((len(sets), n), bool)
    for t, s in enumerate(sets):
        m[t, sorted(s)] = True
    return m


def trace():
    return MaskTrace([Hook("layers.0.in", "in", 2, 8, masks(IN, 2)),
                      Hook("layers.0.out", "out", 4, 2, masks(OUT, 4))],
                     seq_starts=[0, 3], prompt_len=[1, 0],
                     metadata={"model": "tiny", "method": "dip", "density": 0.5, **SHAPE.to_dict()})


def test_per_linear_split_is_the_default():
    pl = plan_placement(SHAPE, HW, trace().hooks, 64, seq_len=6)
    assert pl.static_bytes == 52 and pl.cache_bytes == 12
    assert pl.n_linears.tolist() == [2, 1]
    assert pl.capacity.tolist() == [1, 2]
    assert plan_placement(SHAPE, HW, trace().hooks, 64, seq_len=6, cache_split="hook").capacity.tolist() == [0, 3]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_lru_hand_worked(seed):
    r = simulate(trace(), HW, SHAPE, "lru", dram_bytes=64, seed=seed)
    t_a, t_b = 0.36 + (1.12 + 1.24) / 2, 0.40 + 3.5 / 6
    assert r.n_tokens == 8 and r.n_sequences == 2
    assert r.kv_len_avg == pytest.approx(2.5)  # mean of (1+3)/2 and (0+6)/2
    assert r.tokens_per_s == pytest.approx((1 / t_a + 1 / t_b) / 2)
    assert r.time_per_token_s == pytest.approx((t_a + t_b) / 2)
    assert r.hit_rate == pytest.approx((2 * 3.5 + 25 / 6) / 24)
    assert r.hit_rate_per_hook == pytest.approx([3.5 / 8, 25 / 6 / 8])
    # the caches never exceed their capacity: 52 B static + 1 unit of 8 B + 2 units of 2 B
    assert r.dram_used_bytes == 64 <= r.dram_bytes
    # TTFT: A's prompt pass reads every weight once (static with KV 1: 16 + 6 + 6 + 4 = 32 B =
    # 0.32 s; the whole MLP, 24 B, from Flash: 2.4 s); B's first token: 0.32 + 1.2 (b0's MLP).
    # Mean over the sequences.
    assert r.ttft_s == pytest.approx(((0.32 + 2.4) + (0.32 + 1.2)) / 2)


def test_lfu_hand_worked():
    r = simulate(trace(), HW, SHAPE, "lfu", dram_bytes=64)
    t_a, t_b = 1.54, 0.40 + 3.32 / 6
    assert r.tokens_per_s == pytest.approx((1 / t_a + 1 / t_b) / 2)
    assert r.hit_rate == pytest.approx((2 * 3.5 + 31 / 6) / 24)


def test_keep_mask_is_not_the_reference():
    # keep-mask (the old default): a1's in cache holds {0,1}, so a2 hits in; out holds the
    # whole masks, so a1 hits 3 of 3 and a2 3 of 4; the caches use more than the budget
    r = simulate(trace(), HW, SHAPE, "lru", dram_bytes=64, over_capacity="keep-mask")
    t_a = 0.36 + ((0.08 + 0.8 + 0.06) + (0.08 + 0.06 + 0.2)) / 2
    assert r.tokens_per_s == pytest.approx((1 / t_a + 1 / (0.40 + 3.5 / 6)) / 2)
    # after a1: in {0,1} (16 B) + out {0,1,2} (6 B) on top of the 52 B static
    assert r.dram_used_bytes == 52 + 16 + 6 > r.dram_bytes


def test_dense_baseline_per_sequence():
    # one neuron hook of 3 linears (6 B a unit): 12 B of cache -> 2 of 4 neurons resident; per
    # token 12 B DRAM (0.12 s) + 12 B Flash (1.2 s); static 0.36 s (A), 0.40 s (B)
    b = dense_streaming_baseline(SHAPE, HW, dram_bytes=64, seq_len=6, sequences=[(1, 3), (0, 6)])
    assert b.capacity_units == [2]
    assert b.tokens_per_s == pytest.approx((1 / (0.36 + 1.32) + 1 / (0.40 + 1.32)) / 2)
