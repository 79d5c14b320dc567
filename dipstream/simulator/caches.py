"""The DRAM caches of a set of hooks, stepped token by token: the one closed-loop cache stepper
behind the simulator's replay (``ClosedLoop``), DIP-CA's evaluation (masks chosen from the live
cache) and the offloading runtime (its RAM slots mirror these caches).

Each hook has ``n_streams`` independent caches (streams: e.g. the windows of a batch evaluated
together, each its own sequence). Policies are vectorised over rows, so hooks are grouped into
one policy object: ``grouping="units"`` puts every hook with the same number of units in one
group (fast when all hooks step together, token-major), ``grouping="hook"`` gives each hook its
own (fast when one hook steps through its tokens at a time, hook-major). Both give the same
caches (every row is independent; the random over-capacity fill is keyed by hook name).
"""

from __future__ import annotations

import copy

import numpy as np

from . import bits
from .policies import CachePolicy, hook_key, make_policy


def _packed(a) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == bits.WORD else bits.pack(a)


class CacheSet:
    """Caches of `hooks` (HookSpec-like: name, n_units) with `capacity` units each (per hook),
    managed by `policy` (a name or a configured CachePolicy) with `policy_kwargs`.

    Policy extras: ``frequency`` (hot: usage counts per hook, a list in hook order or a dict by
    name), ``future`` + ``future_seq_starts`` (belady, one stream, token-major: the masks to
    come, as a MaskTrace or per-hook (T, n_units) arrays)."""

    def __init__(self, hooks, capacity, policy="lru", n_streams: int = 1, grouping: str = "units",
                 future=None, future_seq_starts=None, frequency=None, **policy_kwargs):
        if grouping not in ("units", "hook"):
            raise ValueError(f"grouping must be 'units' or 'hook', got {grouping!r}")
        self.hooks = list(hooks)
        self.names = [h.name for h in self.hooks]
        self.n_streams = S = int(n_streams)
        capacity = np.broadcast_to(np.asarray(capacity, np.int64), (len(self.hooks),))
        groups: dict = {}
        for i, h in enumerate(self.hooks):
            groups.setdefault(int(h.n_units) if grouping == "units" else i, []).append(i)
        self.group_index = [np.array(ix) for ix in groups.values()]
        self.row_of = {i: (g, r) for g, ix in enumerate(self.group_index) for r, i in enumerate(ix)}
        self.policies: list[CachePolicy] = []
        self.future_groups = []  # belady: the packed future masks of each group
        for g, ix in enumerate(self.group_index):
            kw = {}
            if frequency is not None:
                kw["frequency"] = np.repeat(np.stack([np.asarray(self._by_hook(frequency, i), np.float64)
                                                      for i in ix]), S, axis=0)
            if future is not None:
                if S != 1:
                    raise ValueError("belady's future masks need one stream")
                fg = future.packed_group(ix) if hasattr(future, "packed_group") else \
                    np.stack([_packed(self._by_hook(future, i)) for i in ix], axis=1)
                self.future_groups.append(fg)
                kw["future"], kw["seq_starts"] = fg, future_seq_starts
            pol = (copy.deepcopy(policy) if isinstance(policy, CachePolicy)
                   else make_policy(policy, **policy_kwargs))
            self.policies.append(pol.init(len(ix) * S, int(self.hooks[ix[0]].n_units),
                                          np.repeat(capacity[ix], S),
                                          keys=np.repeat([hook_key(self.names[i]) for i in ix], S), **kw))

    def _by_hook(self, obj, i):
        return obj[self.names[i]] if isinstance(obj, dict) else obj[i]

    def _where(self, hook):
        """(policy, its rows of this hook, whether the hook is the policy's only hook)."""
        i = hook if isinstance(hook, (int, np.integer)) else self.names.index(hook)
        g, r = self.row_of[int(i)]
        alone = len(self.group_index[g]) == 1
        return self.policies[g], np.arange(r * self.n_streams, (r + 1) * self.n_streams), alone

    def cached(self, hook) -> np.ndarray:
        """bool (n_streams, n_units): the hook's units in DRAM before its next token."""
        pol, rows, alone = self._where(hook)
        return pol.cached() if alone else pol.cached(rows=rows)

    def cached_packed(self, hook) -> np.ndarray:
        pol, rows, alone = self._where(hook)
        return pol.cached_packed() if alone else pol.cached_packed(rows=rows)

    def step(self, hook, masks) -> tuple[np.ndarray, np.ndarray]:
        """One token of one hook: masks bool (n_streams, n_units) or packed words; returns
        (selected, hits) per stream."""
        pol, rows, alone = self._where(hook)
        m = np.asarray(masks)
        words = m if m.dtype == bits.WORD else bits.pack(m.astype(bool, copy=False).reshape(self.n_streams, -1))
        return pol.step_packed(words) if alone else pol.step_packed(words, rows=rows)

    def step_group(self, g: int, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One token of every hook of group g (token-major fast path): packed words (rows, W) in
        the group's row order (hook-major, streams inside)."""
        return self.policies[g].step_packed(words)

    def occupancy(self, hook=None) -> np.ndarray:
        """Units cached per stream of `hook`, or per row of every group (in group order)."""
        if hook is None:
            return np.concatenate([p.occupancy() for p in self.policies])
        pol, rows, _ = self._where(hook)
        return pol.occupancy()[rows]

    def cached_units(self) -> int:
        """Units cached over every hook and stream."""
        return int(sum(int(p.occupancy().sum()) for p in self.policies))

    def reset(self) -> None:
        """Empty every cache (a new sequence in every stream)."""
        for p in self.policies:
            p.reset()
