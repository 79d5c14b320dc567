"""Cache policies for the per-hook DRAM caches, vectorised over the hooks of one kind.

One policy object holds ``n_hooks`` independent caches (rows) over ``n_units`` units each.
Per token (reference "mask first" rule, methods.md section 5)::

    hit      = m & c
    unused   = c & ~m
    n_evict  = clip(min(|unused|, |m| + |unused| - capacity), 0)
    c        = (c minus the n_evict lowest-priority units of unused) | m

so a cache exceeds its capacity only when one token's mask alone does (and then holds exactly
that mask). Ties in priority are broken by evicting the lowest unit index first.

Usage::

    pol = make_policy("lru").init(n_hooks, n_units, capacity)   # capacity: int or (n_hooks,)
    c = pol.cached()            # bool (n_hooks, n_units), state before the token
    n_sel, n_hit = pol.step(m)  # m: bool (n_hooks, n_units)
    pol.reset()                 # new sequence: empty caches

``step``/``cached``/``reset`` accept ``rows=`` (indices) to drive a subset of the hooks, e.g.
one hook at a time across all tokens (every policy but belady). Internally sets are bit-packed
(``bits.py``) and priorities are bit-sliced integers, so a step costs a few dozen numpy ops on
``n_hooks * n_units / 64`` words whatever the number of units.
"""
from __future__ import annotations

import numpy as np

from . import bits
from .bits import pack, popcount, row_mask, select_lowest, select_smallest, unpack


class CachePolicy:
    """Base class: mask-first update with policy-specific eviction order."""

    name = "base"
    strict = False  # beyond the reference: never hold more than capacity (see make_policy)
    _row0 = ("C", "cap", "t", "ncached")  # state arrays with the hook axis first
    _row1: tuple = ()                      # state arrays with the hook axis second

    def init(self, n_hooks: int, n_units: int, capacity, **_ignored) -> "CachePolicy":
        self.H, self.N, self.W = int(n_hooks), int(n_units), bits.n_words(n_units)
        cap = np.broadcast_to(np.asarray(capacity, np.int64), (self.H,)).copy()
        self.cap = np.maximum(cap, 0)
        self.capacity = self.cap.copy()  # public, as configured
        self.C = np.zeros((self.H, self.W), bits.WORD)
        self.t = np.zeros(self.H, np.int64)
        self.ncached = np.zeros(self.H, np.int64)
        self._init_state()
        return self

    def _init_state(self) -> None:
        pass

    # ---------------------------------------------------------------- public API
    def reset(self, rows=None) -> None:
        """Empty the caches (all rows, or ``rows``)."""
        r = slice(None) if rows is None else np.atleast_1d(rows)
        self.C[r] = 0
        self.t[r] = 0
        self.ncached[r] = 0
        self._reset_state(r)

    def _reset_state(self, r) -> None:
        pass

    def cached_packed(self, rows=None) -> np.ndarray:
        c = self.C if rows is None else self.C[np.atleast_1d(rows)]
        return c

    def cached(self, rows=None) -> np.ndarray:
        """bool (n_rows, n_units): units resident in DRAM before the next token."""
        return unpack(self.cached_packed(rows), self.N)

    def occupancy(self) -> np.ndarray:
        """Units resident per row after the last step."""
        return self.ncached.copy()

    def step(self, masks, rows=None):
        """Advance one token with bool masks (n_rows, n_units); returns (n_selected, n_hits)."""
        m = np.asarray(masks, bool)
        if m.ndim == 1:
            m = m[None]
        return self.step_packed(pack(m), rows)

    def step_packed(self, words: np.ndarray, rows=None):
        if rows is None:
            return self._core(words)
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        self._prepare(int(self.t[rows].max()))
        saved = {n: getattr(self, n) for n in self._row0 + self._row1}
        try:
            for n in self._row0:
                setattr(self, n, saved[n][rows])
            for n in self._row1:
                setattr(self, n, saved[n][:, rows])
            out = self._core(words)
            sub = {n: getattr(self, n) for n in self._row0 + self._row1}
        finally:
            for n, a in saved.items():
                setattr(self, n, a)
        for n in self._row0:
            saved[n][rows] = sub[n]
        for n in self._row1:
            saved[n][:, rows] = sub[n]
        return out

    # ---------------------------------------------------------------- core
    def _prepare(self, t_max: int) -> None:
        """Grow internal state before a step at clock ``t_max`` (bit-plane counts)."""

    def _core(self, M: np.ndarray):
        self._prepare(int(self.t.max()))
        nM = popcount(M)
        MC = M & self.C
        hit = popcount(MC)
        U = self.C ^ MC  # cached, not used by this token
        nU = self.ncached - hit
        n_ev = np.maximum(np.minimum(nU, nM + nU - self.cap), 0)
        full = None
        if n_ev.any():
            full = n_ev == nU
            if full.all():
                U[:] = 0
            else:
                part = (n_ev > 0) & ~full
                if full.any():
                    U &= row_mask(~full)
                if part.any():
                    Up = U if part.all() else U & row_mask(part)
                    U ^= self._select(Up, np.where(part, n_ev, 0), part)
        self._after_evict(full, n_ev)
        self.C = U | M
        self.ncached = nU - n_ev + nM
        if self.strict:  # the mask alone exceeds capacity: only `cap` of its units stay cached
            over = np.maximum(self.ncached - self.cap, 0)
            if over.any():
                self.C ^= select_lowest(self.C, over)
                self.ncached -= over
        self._update(M)
        self.t += 1
        return nM, hit

    def _select(self, U, need, part):  # pragma: no cover - abstract
        raise NotImplementedError

    def _after_evict(self, full, n_ev) -> None:
        pass

    def _update(self, M) -> None:
        pass


class NoCache(CachePolicy):
    """No DRAM cache: every selected unit comes from Flash."""

    name = "none"

    def _core(self, M):
        self.t += 1
        return popcount(M), np.zeros(M.shape[0], np.int64)


class _Planes(CachePolicy):
    """Policies with a bit-sliced integer key per unit (``P[k]`` = bit k)."""

    _row1 = ("P",)

    def _init_state(self):
        self.P = np.zeros((1, self.H, self.W), bits.WORD)

    def _grow(self, nbits: int) -> None:
        if nbits > self.P.shape[0]:
            extra = np.zeros((nbits - self.P.shape[0], self.H, self.W), bits.WORD)
            self.P = np.concatenate([self.P, extra], axis=0)


class LRU(_Planes):
    """Evict the least recently used units (key = last-use token index)."""

    name = "lru"
    _row0 = CachePolicy._row0 + ("lo",)

    def _init_state(self):
        super()._init_state()
        self.lo = np.zeros(self.H, np.int64)  # lower bound of cached units' stamps

    def _reset_state(self, r):
        self.lo[r] = 0

    def _prepare(self, t_max):
        self._grow(max(1, int(t_max).bit_length()))

    def _select(self, U, need, part):
        tm1 = self.t - 1
        nb = int(np.max(np.where(part, self.lo ^ tm1, 0))).bit_length()
        sel, v = select_smallest(self.P, nb, U, need)
        high = (tm1 >> nb) << nb
        self.lo = np.where(part, np.maximum(self.lo, high | v), self.lo)
        return sel

    def _after_evict(self, full, n_ev):
        if full is not None:
            self.lo = np.where(full & (n_ev > 0), self.t, self.lo)

    def _update(self, M):
        t = self.t
        if (t == t[0]).all():
            notM = ~M
            tv = int(t[0])
            for k in range(self.P.shape[0]):
                if (tv >> k) & 1:
                    self.P[k] |= M
                else:
                    self.P[k] &= notM
        else:
            for k in range(self.P.shape[0]):
                self.P[k] = (self.P[k] & ~M) | (M & row_mask((t >> k) & 1))


class LFU(_Planes):
    """Evict the least frequently used units (key = uses since the sequence start)."""

    name = "lfu"

    def _reset_state(self, r):
        self.P[:, r] = 0

    def _prepare(self, t_max):
        self._grow(max(1, int(t_max + 1).bit_length()))

    def _select(self, U, need, part):
        nb = int(np.max(np.where(part, self.t, 0))).bit_length()
        return select_smallest(self.P, nb, U, need)[0]

    def _update(self, M):
        carry = M
        for k in range(self.P.shape[0]):
            p = self.P[k]
            nxt = p & carry
            p ^= carry
            carry = nxt


class Window(LRU):
    """Keep the units used by the last ``k`` tokens (LLM-in-a-Flash), LRU within capacity."""

    name = "window"
    _row1 = ("P", "R")

    def __init__(self, k: int = 5):
        if int(k) < 1:
            raise ValueError(f"window k must be >= 1, got {k}")
        self.k = int(k)

    def _init_state(self):
        super()._init_state()
        self.R = np.zeros((self.k, self.H, self.W), bits.WORD)  # ring of the last k masks

    def _reset_state(self, r):
        super()._reset_state(r)
        self.R[:, r] = 0

    def _core(self, M):
        slot = self.t % self.k
        if (slot == slot[0]).all():
            self.R[slot[0]] = M
        else:
            self.R[slot, np.arange(M.shape[0])] = M
        nM, hit = super()._core(M)
        keep = np.bitwise_or.reduce(self.R, axis=0)
        self.C &= keep
        self.ncached = popcount(self.C)
        return nM, hit


class Hot(LRU):
    """PowerInfer-style: the most frequent units (from calibration) fill ``fraction`` of each
    cache permanently; LRU manages the rest of the capacity."""

    name = "hot"
    _row0 = LRU._row0 + ("hot", "nhot")

    def __init__(self, fraction: float = 0.5, frequency=None):
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"hot fraction must be in [0, 1], got {fraction}")
        self.fraction, self.frequency = float(fraction), frequency

    def init(self, n_hooks, n_units, capacity, frequency=None, **kw):
        freq = self.frequency if frequency is None else frequency
        if freq is None:
            raise ValueError("policy 'hot' needs frequency= (n_hooks, n_units) usage counts "
                             "from a calibration trace")
        super().init(n_hooks, n_units, capacity)
        freq = np.broadcast_to(np.asarray(freq, np.float64), (self.H, self.N))
        nhot = np.minimum(np.floor(self.fraction * self.capacity).astype(np.int64), self.N)
        order = np.argsort(-freq, axis=1, kind="stable")  # most frequent first, low index on ties
        hot = np.arange(self.N)[None, :] < nhot[:, None]
        hotm = np.zeros((self.H, self.N), bool)
        np.put_along_axis(hotm, order, hot, axis=1)
        self.hot, self.nhot = pack(hotm), nhot
        self.cap = np.maximum(self.capacity - nhot, 0)
        return self

    def cached_packed(self, rows=None):
        c = self.C | self.hot
        return c if rows is None else c[np.atleast_1d(rows)]

    def occupancy(self):
        return self.ncached + self.nhot

    def _core(self, M):
        nM = popcount(M)
        Mh = M & self.hot
        _, hit = super()._core(M ^ Mh)
        return nM, hit + popcount(Mh)


class Belady(CachePolicy):
    """Offline oracle: evict the units whose next use (within the sequence) is furthest.

    ``init(..., future=masks, seq_starts=...)`` with masks bool (T, n_hooks, n_units) or packed
    uint64 (T, n_hooks, W), for the whole token stream this object will be stepped through (in
    order, all rows at once; ``reset()`` at each sequence start does not rewind the clock).
    """

    name = "belady"

    def init(self, n_hooks, n_units, capacity, future=None, seq_starts=None, **kw):
        if future is None:
            raise ValueError("policy 'belady' is an offline oracle: pass future= the full "
                             "(T, n_hooks, n_units) masks")
        super().init(n_hooks, n_units, capacity)
        f = np.asarray(future)
        self.F = f if f.dtype == bits.WORD else pack(f.astype(bool, copy=False))
        if self.F.shape[1:] != (self.H, self.W):
            raise ValueError(f"belady future has shape {f.shape}, expected (T, {self.H}, "
                             f"{self.N})")
        T = self.F.shape[0]
        st = np.asarray([0] if seq_starts is None else seq_starts, np.int64)
        self.bounds = np.append(st, T)
        self.g = 0
        self._suffix_for = None
        return self

    def step_packed(self, words, rows=None):
        if rows is not None:
            raise ValueError("belady steps all hooks together (it indexes the future masks)")
        if self.g >= self.F.shape[0]:
            raise ValueError("belady stepped past the end of its future masks")
        out = self._core(words)
        self.g += 1
        return out

    BLOCK = 8  # the next-use scan tries 8 future tokens at once

    def _suffix(self):
        """(S, a, b): S[j] = union of this sequence's masks strictly after token a + j, for the
        sequence [a, b) holding the clock; block unions of BLOCK tokens in ``self._blocks``."""
        i = int(np.searchsorted(self.bounds, self.g, side="right")) - 1
        a, b = int(self.bounds[i]), int(self.bounds[i + 1])
        if self._suffix_for != (a, b):
            S = np.zeros((b - a, self.H, self.W), bits.WORD)
            for j in range(b - a - 2, -1, -1):
                np.bitwise_or(S[j + 1], self.F[a + j + 1], out=S[j])
            nb = (b - a) // self.BLOCK
            blk = self.F[a:a + nb * self.BLOCK].reshape(nb, self.BLOCK, self.H, self.W)
            self._blocks = np.bitwise_or.reduce(blk, axis=1)
            self._suffix_arr, self._suffix_for = S, (a, b)
        return self._suffix_arr, a, b

    def _select(self, U, need, part):
        S, a, end = self._suffix()
        S = S[self.g - a]
        dead = U & ~S
        nd = popcount(dead)
        E = select_lowest(dead, np.minimum(need, nd))
        active = need > nd
        if not active.any():
            return E
        live = U & S & row_mask(active)
        q = np.where(active, popcount(live) - (need - nd), 0)  # live units to keep
        keep = np.zeros_like(U)
        cand, s = live.copy(), self.g + 1
        while q.any():
            j, r = divmod(s - a, self.BLOCK)
            if r == 0 and j < len(self._blocks):  # a whole block of future tokens at once
                f = cand & self._blocks[j]
                cf = popcount(f)
                if (cf <= q).all():
                    keep |= f
                    q = q - cf
                    cand ^= f
                    s += self.BLOCK
                    continue
            f = cand & self.F[s]
            cf = popcount(f)
            fit = cf <= q
            if fit.all():
                keep |= f
                q = q - cf
                cand ^= f
            else:  # rows whose quota ends at token s keep the highest indices of f
                drop = select_lowest(f, np.where(fit, 0, cf - q))
                keep |= f ^ drop
                q = np.where(fit, q - cf, 0)
                cand = (cand ^ f) & row_mask(q > 0)
            s += 1
            if s >= end and q.any():  # cannot happen: every live unit is used again
                raise AssertionError("belady scan ran past the sequence end")
        return E | (live ^ keep)


POLICIES = {c.name: c for c in (NoCache, LRU, LFU, Belady, Window, Hot)}


def make_policy(name: str, **kwargs) -> CachePolicy:
    """Policy by name: none, lru, lfu, belady, window (k=5), hot (fraction=0.5, frequency=...).

    ``strict=True`` (beyond the reference, lru/lfu/window): when one token's mask alone exceeds
    a cache's capacity, only ``capacity`` of its units (the highest indices) stay cached, so
    DRAM use never exceeds the budget; the reference keeps the whole mask."""
    if isinstance(name, CachePolicy):
        return name
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; available: "
                         f"{', '.join(POLICIES)}") from None
    strict = bool(kwargs.pop("strict", False))
    if strict and name in ("belady", "hot"):
        raise ValueError(f"strict capacity is not supported by policy '{name}'; use lru, lfu or window")
    pol = cls(**kwargs)
    pol.strict = strict
    return pol
