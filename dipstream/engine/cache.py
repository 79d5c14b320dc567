"""The RAM of one hook's cache: the records of the units its policy holds, in the slots of a slab.

The policy is the simulator's own (`simulator.caches.CacheSet`, stepped with each token's mask,
"mask first", never above capacity); a `SlotCache` mirrors its cached set physically: units the
policy evicts free their slots, units it inserts are copied in from where this token read them.
So a run's trace replayed through `dipstream simulate` with the same policy and capacities sees
the same hits (tests/test_engine.py)."""

from __future__ import annotations

import numpy as np

from dipstream.simulator.caches import CacheSet


class SlotCache:
    """Slots for hook `name` of `caches`: `capacity` records of `stride` bytes."""

    def __init__(self, caches: CacheSet, name: str, n_units: int, stride: int, capacity: int):
        self.caches, self.name, self.capacity = caches, name, int(capacity)
        self.slab = np.zeros((self.capacity, stride), np.uint8)
        self.slot = np.full(n_units, -1, np.int64)
        self.free = list(range(self.capacity))

    @property
    def cached(self) -> np.ndarray:
        """bool (n_units,): the units the policy holds now."""
        return self.caches.cached(self.name)[0]

    @property
    def nbytes(self) -> int:
        return self.slab.nbytes

    def _take(self, units: np.ndarray, records: np.ndarray) -> None:
        dest = np.array(self.free[len(self.free) - units.size:], np.int64)
        del self.free[len(self.free) - units.size:]
        self.slot[units] = dest
        self.slab[dest] = records

    def step(self, mask: np.ndarray, read: np.ndarray) -> None:
        """Step the policy with this token's mask; `read` (n_units, stride): the hook's records as
        read this token (a unit the policy newly holds was missed, so it is there)."""
        before = self.cached.copy()
        self.caches.step(self.name, mask[None])
        now = self.cached
        gone = np.flatnonzero(before & ~now)
        if gone.size:  # evicted units free their slots
            self.free.extend(self.slot[gone].tolist())
            self.slot[gone] = -1
        new = np.flatnonzero(now & ~before)
        if new.size:
            self._take(new, read[new])

    def resync(self) -> np.ndarray:
        """After the policy was reset (a new sequence): free the slots of units it no longer holds
        (hot placement keeps its pinned units). Returns the units it holds but no slot has."""
        cached = self.cached
        self.slot[~cached] = -1
        used = set(self.slot[self.slot >= 0].tolist())
        self.free = [s for s in range(self.capacity) if s not in used]
        return np.flatnonzero(cached & (self.slot < 0))

    def load(self, units: np.ndarray, read: np.ndarray) -> None:
        """Copy the records of `units` (held by the policy, in no slot yet) from `read`."""
        if units.size:
            self._take(units, read[units])
