"""DIP-CA selection (methods.md section 4)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dipstream.simulator.cache_aware import cache_aware_select, gamma_schedule, topk_mask


def test_hand_example():
    s = torch.tensor([[0.9, 0.8, 0.5, 0.4]])
    c = torch.tensor([[False, False, True, True]])
    # n0 = 1 protects unit 0; gamma_t -> 0.1: s' = [0.9, 0.08, 0.5, 0.4] -> top-2 = {0, 2}
    m = cache_aware_select(s, 2, c, 0.1, n0=1, t=10 ** 6)
    assert m.tolist() == [[True, False, True, False]]
    # t = 0: gamma_0 = 1 -> plain top-2 = {0, 1}
    assert cache_aware_select(s, 2, c, 0.1, n0=1, t=0).tolist() == [[True, True, False, False]]
    # gamma_4 = 1 - 0.9 * (1 - 0.1) = 0.19
    assert gamma_schedule(0.1, 4) == pytest.approx(0.19)


def test_gamma_range():
    with pytest.raises(ValueError, match="gamma must be in"):
        cache_aware_select(torch.ones(1, 3), 1, torch.zeros(1, 3, dtype=torch.bool), 1.5)


def test_numpy_in_numpy_out_and_per_row_k():
    s = np.array([[3.0, 2, 1], [1, 2, 3]])
    m = cache_aware_select(s, np.array([1, 2]), np.zeros((2, 3), bool), 0.5, n0=0, t=8)
    assert isinstance(m, np.ndarray) and m.tolist() == [[True, False, False],
                                                        [False, True, True]]


rows = st.integers(1, 4)
cols = st.integers(1, 40)


@settings(max_examples=80, deadline=None)
@given(rows, cols, st.integers(0, 2 ** 31), st.integers(0, 50), st.data())
def test_gamma_one_is_topk(R, n, seed, t, data):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(R, n, generator=g)
    c = torch.rand(R, n, generator=g) < 0.5
    k = data.draw(st.integers(0, n))
    ref = torch.zeros(R, n, dtype=torch.bool).scatter_(1, torch.topk(s, k, dim=1).indices, True)
    assert torch.equal(cache_aware_select(s, k, c, 1.0, n0=k // 2, t=t), ref)
    assert torch.equal(topk_mask(s, k), ref)


@settings(max_examples=80, deadline=None)
@given(rows, cols, st.integers(0, 2 ** 31), st.integers(1, 50), st.data())
def test_gamma_zero_prefers_cached(R, n, seed, t, data):
    """gamma = 0, n0 = 0, t >= 1 (gamma_t = 0), positive scores: every row selects exactly k
    units, min(k, #cached) of them cached - all cached units when #cached <= k, otherwise
    only cached units (the k highest-scoring ones)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(R, n, generator=g) + 0.01
    c = torch.rand(R, n, generator=g) < data.draw(st.floats(0, 1))
    k = data.draw(st.integers(0, n))
    m = cache_aware_select(s, k, c, 0.0, n0=0, t=t)
    assert (m.sum(1) == k).all()
    assert torch.equal((m & c).sum(1), torch.clamp(c.sum(1), max=k))
    for r in range(R):
        if c[r].sum() >= k:  # the k best cached units
            assert torch.equal(m[r], topk_mask(torch.where(c[r], s[r], 0).unsqueeze(0), k)[0])


@settings(max_examples=50, deadline=None)
@given(rows, cols, st.integers(0, 2 ** 31), st.floats(0, 1), st.integers(0, 30), st.data())
def test_protected_always_selected(R, n, seed, gamma, t, data):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(R, n, generator=g)
    c = torch.rand(R, n, generator=g) < 0.5
    k = data.draw(st.integers(0, n))
    n0 = data.draw(st.integers(0, k))
    m = cache_aware_select(s, k, c, gamma, n0=n0, t=t)
    assert (m.sum(1) == k).all()
    assert not (topk_mask(s, n0) & ~m).any()
