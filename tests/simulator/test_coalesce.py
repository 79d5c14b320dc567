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
