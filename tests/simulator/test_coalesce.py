"""Flash reads of coalesced runs (Hardware.coalesce, beyond the reference): hand-worked."""

import numpy as np
import pytest

from dipstream.simulator import Hardware, Hook, MaskTrace, ModelShape, simulate
from dipstream.simulator.bits import pack, run_count
from dipstream.simulator.hardware import KINDS


def test_run_count_hand_worked():
    m = np.zeros((3, 130), bool)
    m[0, [0, 1, 2, 5, 63, 64, 65, 129]] = True  # runs: 0-2, 5, 63-65 (across a word), 129
    m[1, :] = True                              # one run
    assert run_count(pack(m)).tolist() == [4, 1, 0]


SHAPE = ModelShape(n_layers=1, d_model=4, d_ff=8, vocab=16, n_heads=1, n_kv_heads=1)


def _trace():
    m_in = np.array([[1, 1, 0, 1]], bool)              # 3 units, 2 runs, 16 B each
    m_out = np.array([[1, 0, 1, 1, 1, 0, 0, 1]], bool)  # 5 units, 3 runs, 4 B each
    return MaskTrace([Hook("layers.0.in", "in", 4, 16, m_in),
                      Hook("layers.0.out", "out", 8, 4, m_out)], [0], [0],
                     {"model": "t", "method": "dip", "density": 0.5, **SHAPE.to_dict()})


@pytest.mark.parametrize("flags,reads", [({"coalesce": True}, 2 + 3),
                                         ({"bundle": True}, 3 + 5),
                                         ({}, 2 * 3 + 5)])
def test_flash_time_counts_runs(flags, reads):
    """No cache: 3 * 16 + 5 * 4 = 68 Flash bytes at 1 MB/s plus reads * 1 ms latency (queue 1)."""
    hw = Hardware(name="h", dram_bw=1e9, flash_bw=1e6, bits={k: 8 for k in KINDS},
                  flash_read_latency_s=1e-3, flash_queue_depth=1, **flags)
    res = simulate(_trace(), hw, SHAPE, policy="none", dram_bytes=1e6, seq_len=1)
    assert res.t_mlp_s == pytest.approx(68 / 1e6 + reads * 1e-3)


def test_runs_count_only_misses():
    """With everything but unit 2 of the out hook cached, the out hook's misses are 1 run."""
    tr = _trace()
    tr2 = MaskTrace([Hook(h.name, h.kind, h.n_units, h.unit_weights, np.repeat(h.masks, 2, 0))
                     for h in tr.hooks], [0], [1], tr.metadata)
    hw = Hardware(name="h", dram_bw=1e12, flash_bw=1e12, bits={k: 8 for k in KINDS},
                  flash_read_latency_s=1e-3, flash_queue_depth=1, coalesce=True)
    # token 0 (the prompt) fills big caches; token 1 hits everything: no reads at all
    res = simulate(tr2, hw, SHAPE, policy="lru", dram_bytes=1e6, seq_len=2)
    assert res.hit_rate == 1.0 and res.t_mlp_s == pytest.approx((3 * 16 + 5 * 4) / 1e12)


def test_close_gaps_hand_worked():
    from dipstream.simulator.bits import close_gaps, unpack

    m = np.zeros((2, 70), bool)
    m[0, [0, 2, 3, 7, 66]] = True   # gaps of 1, 3 and 58 units
    m[1, [1, 69]] = True
    got = unpack(close_gaps(pack(m), 70, np.array([1, 67])), 70)
    want = m.copy()
    want[0, 1] = True               # row 0, gap <= 1: only the gap between 0 and 2 closes
    want[1, 1:70] = True            # row 1, gap <= 67: the one gap of 67 closes (never past the ends)
    assert (got == want).all()


@pytest.mark.parametrize("gap,reads,units_in,units_out", [(0, 2 + 3, 3, 5), (4, 2 + 2, 3, 6), (8, 2 + 1, 3, 8),
                                                          (16, 1 + 1, 4, 8)])
def test_read_gap_reads_through_gaps(gap, reads, units_in, units_out):
    """in hook 1 1 0 1 (16 B units: one gap of 16 B), out hook 1 0 1 1 1 0 0 1 (4 B units: gaps of
    4 and 8 B). A gap of 4 B merges the out hook's first two runs (reading unit 1 too), 8 B all
    three (units 1, 5, 6), 16 B also the in hook's two (unit 2). Plus the per-token host time."""
    hw = Hardware(name="h", dram_bw=1e9, flash_bw=1e6, bits={k: 8 for k in KINDS}, flash_read_latency_s=1e-3,
                  flash_queue_depth=1, coalesce=True, read_gap_bytes=gap, host_s_per_token=0.25)
    res = simulate(_trace(), hw, SHAPE, policy="none", dram_bytes=1e6, seq_len=1)
    t_mlp = (units_in * 16 + units_out * 4) / 1e6 + reads * 1e-3
    assert res.t_mlp_s == pytest.approx(t_mlp)
    assert res.mlp_flash_bytes_per_token == units_in * 16 + units_out * 4
    assert res.time_per_token_s == pytest.approx(res.t_static_s + t_mlp + 0.25)


@pytest.mark.parametrize("host", [0.25, 0.0])
def test_pipelined_token_time_is_the_larger_of_flash_and_the_rest(host):
    """The same trace with nothing cached (policy none): 3 in units of 16 B and 5 out units of 4 B
    from Flash (68 B at 1 MB/s = 68 us, plus 5 reads x 1 ms). Per hook (default) a token takes
    static + Flash + host; pipelined, the Flash reads overlap the rest: max(Flash, static + host)."""
    kw = dict(name="h", dram_bw=1e9, flash_bw=1e6, bits={k: 8 for k in KINDS}, flash_read_latency_s=1e-3,
              flash_queue_depth=1, coalesce=True, host_s_per_token=host)
    flash = 68 / 1e6 + 5 * 1e-3
    per_hook = simulate(_trace(), Hardware(**kw), SHAPE, policy="none", dram_bytes=1e6, seq_len=1)
    piped = simulate(_trace(), Hardware(**kw, pipelined=True), SHAPE, policy="none", dram_bytes=1e6, seq_len=1)
    assert per_hook.time_per_token_s == pytest.approx(per_hook.t_static_s + flash + host)
    assert piped.time_per_token_s == pytest.approx(max(flash, piped.t_static_s + host))
    assert piped.t_static_s == per_hook.t_static_s and piped.mlp_flash_bytes_per_token == 68


def test_cache_managed_hooks_add_their_bookkeeping_time():
    """host_s_per_cached_hook: the same trace costs 2 x 0.1 s more per token when both hooks are
    cache-managed (LRU in 0.9x of the weights: the static parts first, so each cache holds fewer
    units than its hook has), and nothing more when DRAM holds every unit (as the engine's MLP in
    RAM)."""
    kw = dict(name="h", dram_bw=1e9, flash_bw=1e6, bits={k: 8 for k in KINDS}, host_s_per_token=0.25)
    for policy, dram, extra in (("lru", "0.9x", 2 * 0.1), ("hot-same-trace", 1e15, 0.0)):
        pk = {"fraction": 1.0} if policy.startswith("hot") else {}
        base = simulate(_trace(), Hardware(**kw), SHAPE, policy=policy, dram_bytes=dram, seq_len=1, **pk)
        more = simulate(_trace(), Hardware(**kw, host_s_per_cached_hook=0.1), SHAPE, policy=policy, dram_bytes=dram,
                        seq_len=1, **pk)
        assert more.time_per_token_s == pytest.approx(base.time_per_token_s + extra)
        assert (base.capacity_units == [2, 4]) == (extra > 0)  # of 4 and 8 units
