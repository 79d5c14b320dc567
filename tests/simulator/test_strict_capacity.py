"""Strict capacity (beyond the reference): a cache never holds more than its capacity."""

import numpy as np
import pytest

from dipstream.simulator import make_policy


def test_lru_strict_keeps_capacity_units_of_an_oversized_mask():
    m = np.array([[True, True, True, False]])
    loose = make_policy("lru").init(1, 4, 2)
    strict = make_policy("lru", strict=True).init(1, 4, 2)
    # reference: the whole 3-unit mask stays cached (capacity 2), the repeat hits all 3
    assert loose.step(m) == (3, 0) and loose.cached().tolist() == [[True, True, True, False]]
    assert loose.step(m)[1] == 3
    # strict: the lowest index (0) is dropped, units 1 and 2 stay, so the repeat hits 2
    assert strict.step(m) == (3, 0) and strict.cached().tolist() == [[False, True, True, False]]
    assert strict.step(m)[1] == 2 and strict.occupancy().tolist() == [2]


@pytest.mark.parametrize("name", ["lru", "lfu", "window"])
def test_strict_never_exceeds_capacity(name):
    rng = np.random.default_rng(0)
    pol = make_policy(name, strict=True).init(3, 40, np.array([5, 12, 30]))
    for _ in range(50):
        pol.step(rng.random((3, 40)) < 0.4)
        assert (pol.cached().sum(1) <= np.array([5, 12, 30])).all()
        assert (pol.occupancy() == pol.cached().sum(1)).all()


def test_strict_refused_for_oracle_and_hot():
    with pytest.raises(ValueError, match="not supported by policy 'belady'"):
        make_policy("belady", strict=True)
