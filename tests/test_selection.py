"""The one selection rule (dipstream.selection) and DIP-CA's choice (docs/methods.md, "Cache-aware
masking"): hand examples and properties."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dipstream.budget import dip_split, gamma_at, keep_to_k
from dipstream.selection import ca_select, topk_indices, topk_mask


def test_hand_example():
    s = torch.tensor([[0.9, 0.8, 0.5, 0.4]])
    c = torch.tensor([[False, False, True, True]])
    # n0 = 1 protects unit 0; gamma_t -> 0.1: s' = [0.9, 0.08, 0.5, 0.4] -> top-2 = {0, 2}
    assert ca_select(s, 2, c, 0.1, 1, 10 ** 6).tolist() == [[True, False, True, False]]
    # t = 0: gamma_0 = 1 -> plain top-2 = {0, 1}
    assert ca_select(s, 2, c, 0.1, 1, 0).tolist() == [[True, True, False, False]]
    # gamma_4 = 1 - 0.9 * (1 - 0.1) = 0.19; without the warm-up gamma itself
    assert gamma_at(0.1, 4) == pytest.approx(0.19) and gamma_at(0.1, 4, warmup=False) == 0.1


def test_ties_go_to_the_lower_index_and_nan_counts_as_inf():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert topk_mask(s, 2).tolist() == [[False, True, True, False, False]]
    assert topk_mask(s, 4).tolist() == [[False, True, True, True, True]]
    n = torch.tensor([[float("inf"), float("nan"), 1.0, float("inf")]])
    assert topk_mask(n, 2).tolist() == [[True, True, False, False]]
    assert topk_indices(torch.tensor([0.0, 0.0, 0.0, 5.0]), 2).tolist() == [0, 3]
    # per-row k
    rows = torch.tensor([[3.0, 2, 1], [1, 2, 3]])
    assert topk_mask(rows, torch.tensor([1, 2])).tolist() == [[True, False, False], [False, True, True]]


def test_budget_counts():
    for keep in (0.1, 0.25, 0.5, 0.75, 0.9):
        up, down = dip_split(keep)
        assert abs(2 / 3 * up + 1 / 3 * down - keep) < 1e-12
    assert dip_split(0.5) == pytest.approx((0.5744, 0.3512), abs=1e-4)
    assert dip_split(1.0) == (1.0, 1.0)
    # int() truncation as the reference: 0.7 * 48 = 33.6 -> 33
    assert keep_to_k(0.7, 48) == 33 and keep_to_k(1.0, 7) == 7 and keep_to_k(0.0, 7) == 0


rows = st.integers(1, 4)
cols = st.integers(1, 40)


@settings(max_examples=100, deadline=None)
@given(rows, cols, st.integers(0, 2 ** 31), st.data())
def test_topk_is_a_stable_descending_sort(R, n, seed, data):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 5, (R, n), generator=g).float()  # many ties
    k = data.draw(st.integers(0, n))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    ref = torch.zeros(R, n, dtype=torch.bool).scatter_(1, order, True)
    assert torch.equal(topk_mask(s, k), ref)
    ks = torch.tensor([data.draw(st.integers(0, n)) for _ in range(R)])
    got = topk_mask(s, ks)
    for r in range(R):
        assert torch.equal(got[r], topk_mask(s[r:r + 1], int(ks[r]))[0])


@settings(max_examples=80, deadline=None)
@given(rows, cols, st.integers(0, 2 ** 31), st.integers(0, 50), st.data())
def test_gamma_one_is_topk(R, n, seed, t, data):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(R, n, generator=g)
    c = torch.rand(R, n, generator=g) < 0.5
    k = data.draw(st.integers(0, n))
    assert torch.equal(ca_select(s, k, c, 1.0, k // 2, t), topk_mask(s, k))


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
    m = ca_select(s, k, c, 0.0, 0, t)
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
    m = ca_select(s, k, c, gamma, n0, t)
    assert (m.sum(1) == k).all()
    assert not (topk_mask(s, n0) & ~m).any()
