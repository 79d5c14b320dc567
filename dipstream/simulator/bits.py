"""Bit-packed row sets: the fast core shared by the cache policies.

A set of units per row (hook) is stored as ``uint64`` words, unit ``i`` at word ``i // 64``,
bit ``i % 64`` (little-endian bit order, as ``np.packbits(..., bitorder="little")``).
Padding bits past ``n_units`` are always zero.
"""
from __future__ import annotations

import numpy as np

WORD = np.dtype("<u8")
ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def n_words(n_units: int) -> int:
    return (int(n_units) + 63) // 64


def pack(masks: np.ndarray) -> np.ndarray:
    """bool (..., N) -> uint64 (..., ceil(N/64))."""
    m = np.asarray(masks)
    if m.dtype != np.bool_:
        m = m.astype(bool)
    by = np.packbits(m, axis=-1, bitorder="little")
    pad = (-by.shape[-1]) % 8
    if pad:
        by = np.concatenate([by, np.zeros(by.shape[:-1] + (pad,), np.uint8)], axis=-1)
    return np.ascontiguousarray(by).view(WORD)


def unpack(words: np.ndarray, n_units: int) -> np.ndarray:
    """uint64 (..., W) -> bool (..., N)."""
    by = np.ascontiguousarray(words).view(np.uint8)
    return np.unpackbits(by, axis=-1, count=int(n_units), bitorder="little").view(bool)


def popcount(words: np.ndarray) -> np.ndarray:
    """Number of set bits per row (last axis reduced), int64."""
    return np.add.reduce(np.bitwise_count(words), axis=-1, dtype=np.uint32).astype(np.int64)


def run_count(words: np.ndarray) -> np.ndarray:
    """Number of runs of consecutive set bits (units i, i+1, ... all set) per row, int64."""
    w = np.asarray(words, WORD)
    carry = np.zeros_like(w)
    carry[..., 1:] = w[..., :-1] >> np.uint64(63)
    return popcount(w & ~((w << np.uint64(1)) | carry))


def close_gaps(words: np.ndarray, n_units: int, gap) -> np.ndarray:
    """The sets with every gap of at most ``gap`` unset units between two set units filled in
    (reads that merge requests less than a gap apart). ``gap``: int, or one per row."""
    g = np.broadcast_to(np.asarray(gap, np.int64).reshape(-1, *([1] * (np.ndim(words) - 1))) if np.ndim(gap)
                        else np.asarray(gap, np.int64), np.shape(words)[:-1] + (1,))
    if not np.any(g > 0):
        return words
    m = unpack(words, n_units)
    pos = np.arange(n_units, dtype=np.int64)
    prev = np.maximum.accumulate(np.where(m, pos, -1), axis=-1)
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(m, pos, n_units), -1), axis=-1), -1)
    fill = ~m & (prev >= 0) & (nxt < n_units) & (nxt - prev - 1 <= g)
    return pack(m | fill)


def _lowest_bits_table() -> np.ndarray:
    t = np.zeros((256, 9), np.uint8)
    for v in range(256):
        for r in range(9):
            out, left = 0, r
            for b in range(8):
                if left and (v >> b) & 1:
                    out |= 1 << b
                    left -= 1
            t[v, r] = out
    return t


_LOW = _lowest_bits_table()


_BYTES = np.uint64(0x0101010101010101)


def select_lowest(words: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per row h, the ``r[h]`` set bits of ``words[h]`` with the lowest unit indices.

    ``words`` (H, W) uint64, ``r`` (H,) ints with 0 <= r <= popcount(row).
    """
    r = np.asarray(r, np.int64)
    out = np.zeros_like(words)
    if words.size == 0 or not r.any():
        return out
    H, W = words.shape
    pc = np.bitwise_count(words)
    cum = np.cumsum(pc, axis=1, dtype=np.int32)
    full = cum <= r[:, None]  # a prefix of each row's words is taken whole
    np.copyto(out, words, where=full)
    nfull = np.add.reduce(full, axis=1, dtype=np.int64)
    # boundary word, taken partially (re-taking a fully taken last word is harmless)
    idx = np.arange(H) * W + np.minimum(nfull, W - 1)
    r_in = r - (cum.ravel()[idx] - pc.ravel()[idx])
    x = np.ascontiguousarray(words.ravel()[idx])
    xb = x.view(np.uint8)                                   # (H*8,) bytes, low first
    pcb = np.bitwise_count(xb)
    cb = (pcb.view(WORD) * _BYTES).view(np.uint8)           # inclusive prefix counts per byte
    fb = cb.reshape(H, 8) <= r_in[:, None]
    res = np.where(fb.ravel(), xb, np.uint8(0))
    nb = (np.ascontiguousarray(fb).view(WORD)[:, 0] * _BYTES) >> np.uint64(56)
    i8 = np.arange(H) * 8 + np.minimum(nb.astype(np.int64), 7)
    rb = np.minimum(r_in - (cb[i8].astype(np.int64) - pcb[i8]), 8)
    res[i8] |= _LOW[xb[i8], rb]
    out.ravel()[idx] |= res.view(WORD)
    return out


def row_mask(flags: np.ndarray) -> np.ndarray:
    """bool (H,) -> uint64 (H, 1): all ones where True (for broadcasting over words)."""
    return np.where(np.asarray(flags, bool), ALL, np.uint64(0))[:, None]


def select_smallest(planes: np.ndarray, nbits: int, cand: np.ndarray, need: np.ndarray):
    """Bit-sliced radix selection.

    ``planes`` (B, H, W): bit k of each unit's integer key is ``planes[k]``. Per row select the
    ``need[h]`` units of ``cand[h]`` with the smallest (key, unit index); only bits < ``nbits``
    may differ among candidates (higher bits must be equal). Returns (selected words, v) with v a
    per-row lower bound of the keys of the candidates left unselected.
    """
    need = np.asarray(need, np.int64).copy()
    sel = np.zeros_like(cand)
    v = np.zeros(cand.shape[0], np.int64)
    for k in range(nbits - 1, -1, -1):
        hi = cand & planes[k]
        z = cand ^ hi  # candidates with bit k == 0: all taken where they fit in need
        cz = popcount(z)
        take = cz <= need
        if take.all():
            sel |= z
            cand = hi
        else:
            tk = take[:, None]
            np.bitwise_or(sel, z, out=sel, where=tk)
            cand = np.where(tk, hi, z)
        need -= cz * take
        v |= take.astype(np.int64) << k
        if not need.any():
            return sel, v
    sel |= select_lowest(cand, need)
    return sel, v
