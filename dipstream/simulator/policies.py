"""Cache policies for the per-hook DRAM caches, vectorised over the hooks of one kind.

One policy object holds ``n_hooks`` independent caches (rows) over ``n_units`` units each.
Per token (reference "mask first" rule, docs/methods.md "The simulator")::

    hit      = m & c
    unused   = c & ~m
    n_evict  = clip(min(|unused|, |m| + |unused| - capacity), 0)
    c        = (c minus the n_evict lowest-priority units of unused) | m

A cache never exceeds its capacity (reference): when one token's mask alone is larger, the
cache keeps that token's hits and a seeded random subset of its new units, up to capacity (the
rest were read from Flash for this token and are not kept). ``over_capacity`` names the
non-reference alternatives: ``keep-mask`` (the cache holds the whole mask, above capacity) and
``highest-index`` (keep the highest-index units of the mask). Ties in priority are broken by
evicting the lowest unit index first.

The random subset is a pure function of (seed, hook key, token index in the sequence, unit), so
a hook gives the same cache whether it is stepped alone, with other hooks, or in another
process (the closed-loop evaluation and the trace replay agree).

Usage::

    pol = make_policy("lru").init(n_hooks, n_units, capacity)   # capacity: int or (n_hooks,)
    c = pol.cached()            # bool (n_hooks, n_units), state before the token
    n_sel, n_hit = pol.step(m)  # m: bool (n_hooks, n_units)
    pol.reset()                 # new sequence: empty caches

``step``/``cached``/``reset`` accept ``rows=`` (indices) to drive a subset of the hooks, e.g.
one hook at a time across all tokens (every policy but belady). Internally sets are bit-packed
(``bits.py``) and priorities are bit-sliced integers, so a step costs a few dozen numpy ops on
``n_hooks * n_units / 64`` words whatever the number of units; the random over-capacity fill
runs in the native library (``simfill.c``), or in numpy on the flat list of the new units of the
rows it concerns where the library is unavailable (the same units, bit for bit).

The `hot` policy's input, a unit-frequency profile, is saved and loaded here too (`save_profile`,
`load_profile`).
"""
from __future__ import annotations

import json
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dipstream.errors import DipstreamError

from . import bits
from .bits import pack, popcount, row_mask, select_lowest, select_smallest, unpack

OVER_CAPACITY = ("random", "keep-mask", "highest-index")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_G1, _G2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD6E8FEB86659FD93)


def _mix(x: np.ndarray, out: np.ndarray = None) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic); ``out=x`` mixes in place
    (the hot path: one temporary, not one per operation)."""
    x = np.array(x, np.uint64) if out is None else out
    tmp = np.empty_like(x)
    for shift, mul in ((30, _M1), (27, _M2), (31, None)):
        x ^= np.right_shift(x, np.uint64(shift), out=tmp)
        if mul is not None:
            x *= mul
    return x


def hook_key(name: str) -> int:
    """Stable per-hook key of the random over-capacity fill (crc32 of the hook name)."""
    return zlib.crc32(str(name).encode())


def _streams(seed: int, key, t) -> np.ndarray:
    """The base of ``unit_priority`` of each (hook key, token index) (arrays broadcast)."""
    k = np.atleast_1d(np.asarray(key)).astype(np.uint64)  # wraps like & 0xFFFFFFFFFFFFFFFF
    t = np.atleast_1d(np.asarray(t)).astype(np.uint64)
    return _mix((k + np.uint64((int(seed) * 0x9E3779B1) & 0xFFFFFFFFFFFFFFFF)) ^ (t * _G1))


def unit_priority(seed: int, key: int, t: int, units: np.ndarray) -> np.ndarray:
    """Pseudo-random uint64 priority of ``units`` for hook ``key`` at token ``t`` (uniform, seeded;
    distinct for distinct units: both steps are bijections of uint64)."""
    return _mix(_streams(seed, key, t) + (np.asarray(units, np.uint64) + np.uint64(1)) * _G2)


def _native_random_drop(new: np.ndarray, over: np.ndarray, base: np.ndarray, n_units: int):
    """`CachePolicy._random_new` by the native kernel (per row, the ``over`` set units of ``new``
    of lowest priority ``_mix(base + (unit + 1) * _G2)``), or None where the library is unavailable
    (imported here: ``import dipstream.simulator`` loads no library)."""
    from dipstream import native

    return native.sim_random_drop(new, over, base, n_units)


class CachePolicy:
    """Base class: mask-first update with policy-specific eviction order."""

    name = "base"
    over_capacity = "random"  # see the module docstring and make_policy
    seed = 0
    _row0 = ("C", "cap", "t", "ncached", "key")  # state arrays with the hook axis first
    _row1: tuple = ()                             # state arrays with the hook axis second

    def init(self, n_hooks: int, n_units: int, capacity, keys=None, **_ignored) -> "CachePolicy":
        """``keys``: per row, the hook key of the random over-capacity fill (``hook_key(name)``;
        default 0: rows that are windows of one hook share it)."""
        self.H, self.N, self.W = int(n_hooks), int(n_units), bits.n_words(n_units)
        cap = np.broadcast_to(np.asarray(capacity, np.int64), (self.H,)).copy()
        self.cap = np.maximum(cap, 0)
        self.capacity = self.cap.copy()  # public, as configured
        self.C = np.zeros((self.H, self.W), bits.WORD)
        self.t = np.zeros(self.H, np.int64)
        self.ncached = np.zeros(self.H, np.int64)
        self.key = np.broadcast_to(np.asarray(0 if keys is None else keys, np.int64), (self.H,)).copy()
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
        if self.over_capacity != "keep-mask":  # the mask alone exceeds capacity
            over = np.maximum(self.ncached - self.cap, 0)
            if over.any():
                if self.over_capacity == "random":
                    self.C ^= self._random_new(M ^ MC, over)
                else:  # highest-index
                    self.C ^= select_lowest(self.C, over)
                self.ncached -= over
        self._update(M)
        self.t += 1
        return nM, hit

    def _random_new(self, new: np.ndarray, over: np.ndarray) -> np.ndarray:
        """Per row, the ``over`` units of ``new`` (this token's misses) of lowest ``unit_priority``:
        the ones not kept, so that the cache holds its hits plus a random subset of the rest.
        The native library's kernel (``simfill.c``) where it is available, else the numpy path
        (``DIPSTREAM_NATIVE=0`` forces it); both give the same units, bit for bit."""
        drop = _native_random_drop(new, over, _streams(self.seed, self.key, self.t), self.N)
        return self._random_new_numpy(new, over) if drop is None else drop

    def _random_new_numpy(self, new: np.ndarray, over: np.ndarray) -> np.ndarray:
        """`_random_new` in numpy: all rows at once, on the flat list of their new units (row
        after row)."""
        H, rows = len(new), None if over.all() else np.flatnonzero(over)
        key, t = self.key, self.t
        if rows is not None:
            new, over, key, t = new[rows], over[rows], key[rows], t[rows]
        R, N = len(new), self.N
        n = popcount(new)
        u = unpack(new, N)
        f = np.flatnonzero(u)  # row i's new units are its f - i * N
        # unit_priority of them all: stream(i) + (f - i*N + 1) * G2, in wrapping uint64
        off = _streams(self.seed, key, t) + (1 - np.arange(R) * N).astype(np.uint64) * _G2
        p = f.view(np.uint64) * _G2
        p += np.repeat(off, n)
        _mix(p, out=p)
        # Drop each row's units up to its over-th smallest priority: a histogram over (row, top 8
        # bits) finds the bucket that holds it; the buckets below are dropped whole and only that
        # bucket's few units are sorted. A row's priorities are distinct: no ties to break.
        b = p >> np.uint64(56)
        b += np.repeat(np.arange(0, 256 * R, 256, dtype=np.uint64), n)
        cnt = np.bincount(b.view(np.int64), minlength=256 * R)
        cum = np.cumsum(cnt)
        rank = np.cumsum(n) - n + over  # of each row's over-th smallest, in (row, priority) order
        bk = np.searchsorted(cum, rank)  # its bucket
        bk_rep = np.repeat(bk.astype(np.uint64), n)
        drop = b < bk_rep
        cand = np.flatnonzero(b == bk_rep)
        pc, rc = p[cand], (b[cand] >> np.uint64(8)).astype(np.intp)  # priorities, rows
        # the over-th smallest: past the candidates of the rows before, and the lower buckets
        kth = pc[np.lexsort((pc, rc))][np.cumsum(cnt[bk]) - cum[bk] + rank - 1]
        drop[cand] = pc <= kth[rc]
        u.reshape(-1)[f] = drop
        if rows is None:
            return pack(u)
        out = np.zeros((H, new.shape[1]), bits.WORD)
        out[rows] = pack(u)
        return out

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

    def init(self, n_hooks, n_units, capacity, frequency=None, keys=None, **kw):
        freq = self.frequency if frequency is None else frequency
        if freq is None:
            raise ValueError("policy 'hot' needs frequency= (n_hooks, n_units) usage counts "
                             "from a calibration trace")
        super().init(n_hooks, n_units, capacity, keys)
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

    def init(self, n_hooks, n_units, capacity, future=None, seq_starts=None, keys=None, **kw):
        if future is None:
            raise ValueError("policy 'belady' is an offline oracle: pass future= the full "
                             "(T, n_hooks, n_units) masks")
        super().init(n_hooks, n_units, capacity, keys)
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
POLICY_NAMES = (*POLICIES, "hot-same-trace")  # hot pinned by the replayed trace itself (simulate())
# policies that need more than the live cache (the future, or unit frequencies): replay only, so
# neither DIP-CA's closed loop nor the runtime can use them
OFFLINE_POLICIES = ("belady", "hot", "hot-same-trace")


@dataclass
class CacheOptions:
    """The DRAM caches: policy and semantics (the reference's by default). Shared by `simulate`,
    sweeps and the offloading runtime of `generate`."""

    policy: str = field(default="lru", metadata={
        "help": "cache policy: none, lru, lfu, belady, window, hot (units pinned by frequencies profiled "
                "on the train split), hot-same-trace (pinned by the evaluated text's own frequencies: an "
                "upper bound, not a deployable policy)"})
    window_k: int = field(default=5, metadata={"help": "window policy: tokens whose units are kept"})
    hot_fraction: float = field(default=0.5, metadata={
        "help": "hot policy: share of each cache pinned to the most frequent units"})
    over_capacity: str = field(default="random", metadata={
        "help": "what a cache keeps when one token's mask alone exceeds its capacity: random (the "
                "reference: its hits and a seeded random subset of the new units, never above "
                "capacity); not the reference: keep-mask (the whole mask, above its DRAM share) or "
                "highest-index (the highest-index units, within capacity)",
        "choices": list(OVER_CAPACITY)})
    cache_split: str = field(default="linear", metadata={
        "help": "how the DRAM left after the static layers is split between the caches: linear (the "
                "reference: one share per masked linear, so a DIP up/gate cache gets 2/3 of a layer's "
                "and the down cache 1/3); not the reference: hook (one share per cache) or weights "
                "(in proportion to each cache's weights)", "choices": ["linear", "hook", "weights"]})
    cache_seed: int = field(default=0, metadata={
        "help": "seed of the random subset kept when a mask exceeds its cache (--over-capacity random)"})

    def validate(self) -> None:
        """ValueError for a policy, rule or number that cannot work."""
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"unknown cache policy '{self.policy}'; use one of {', '.join(POLICY_NAMES)}")
        if self.over_capacity not in OVER_CAPACITY:
            raise ValueError(f"--over-capacity {self.over_capacity} is not one of {', '.join(OVER_CAPACITY)}")
        if self.cache_split not in ("linear", "hook", "weights"):
            raise ValueError(f"--cache-split {self.cache_split} is not one of linear, hook, weights")
        if int(self.window_k) < 1:
            raise ValueError(f"--window-k {self.window_k} must be at least 1")
        if not 0.0 <= float(self.hot_fraction) <= 1.0:
            raise ValueError(f"--hot-fraction {self.hot_fraction} must be in [0, 1]")

    def policy_kwargs(self) -> dict:
        """The `make_policy` arguments of these options."""
        kw = {"window": {"k": self.window_k}, "hot": {"fraction": self.hot_fraction},
              "hot-same-trace": {"fraction": self.hot_fraction}}.get(self.policy, {})
        return {**kw, "over_capacity": self.over_capacity, "seed": self.cache_seed}


def make_policy(name: str, **kwargs) -> CachePolicy:
    """Policy by name: none, lru, lfu, belady, window (k=5), hot (fraction=0.5, frequency=...).

    ``over_capacity``: what a cache keeps when one token's mask alone exceeds its capacity:
    ``random`` (the reference: its hits and a random subset of the new units, seeded by
    ``seed``), or, not the reference, ``keep-mask`` (the whole mask, above capacity) or
    ``highest-index`` (the highest-index units of the cache)."""
    if isinstance(name, CachePolicy):
        return name
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; available: "
                         f"{', '.join(POLICIES)}") from None
    over = kwargs.pop("over_capacity", "random")
    if over not in OVER_CAPACITY:
        raise ValueError(f"over_capacity must be one of {', '.join(OVER_CAPACITY)}, got {over!r}")
    seed = int(kwargs.pop("seed", 0))
    pol = cls(**kwargs)
    pol.over_capacity, pol.seed = over, seed
    return pol


# ------------------------------------------------------------------ hot policy profiles
# How often each unit of each hook was read over some text, the input of the `hot` policy
# (PowerInfer's offline profiling). Written atomically as plain arrays (.npz, no pickles); made by
# `experiments.hot_profile` and read by `simulate` and `generate`.

def save_profile(path: Path, freq: dict, meta: dict) -> None:
    """Write {hook: counts} and its metadata atomically (a killed run leaves no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, __meta__=np.array(json.dumps(meta)), **{f"hook:{k}": v for k, v in freq.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_profile(path: Path) -> tuple[dict, dict]:
    """({hook: counts}, metadata) of a saved profile (no pickles: plain arrays only), checked: the
    model it was made for named, every hook's counts a finite, non-negative vector (one-line
    error otherwise)."""
    from .trace import HOOK_NAME

    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            freq = {k[5:]: z[k] for k in z.files if k.startswith("hook:")}
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise DipstreamError(f"the hot-policy profile {path} is unreadable ({type(exc).__name__}); "
                             "delete it to compute it again") from None
    why = None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), str) or not meta["model"]:
        why = "it names no model"
    elif not freq:
        why = "it has no hook counts"
    for name, counts in freq.items():
        if why:
            break
        if not HOOK_NAME.fullmatch(name):
            why = f"hook name {name[:40]!r} is not a hook's"
        elif counts.ndim != 1 or counts.size == 0 or counts.dtype.kind not in "iuf":
            why = f"hook {name}'s counts are not a vector of numbers"
        elif not np.isfinite(counts).all() or (counts < 0).any():
            why = f"hook {name}'s counts are not finite and non-negative"
    if why:
        raise DipstreamError(f"the hot-policy profile {path} is damaged ({why}); delete it to compute it again")
    return freq, meta