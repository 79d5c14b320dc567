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
    return np.add.reduce(np.bitwise_count(words), axis=-1, dtype=np.int64)


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


def select_lowest(words: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per row h, the ``r[h]`` set bits of ``words[h]`` with the lowest unit indices.

    ``words`` (H, W) uint64, ``r`` (H,) ints with 0 <= r <= popcount(row).
    """
    r = np.asarray(r, np.int64)
    out = np.zeros_like(words)
    if words.size == 0 or not r.any():
        return out
    pc = np.bitwise_count(words)
    cum = np.cumsum(pc, axis=1, dtype=np.int64)
    full = cum <= r[:, None]  # a prefix of each row's words is taken whole
    np.copyto(out, words, where=full)
    ar = np.arange(words.shape[0])
    b = np.minimum(np.count_nonzero(full, axis=1), words.shape[1] - 1)  # boundary word
    r_in = r - (cum[ar, b] - pc[ar, b])
    r_in = np.where(full[ar, b], 0, r_in)  # rows taken whole have no boundary word
    xb = words[ar, b].view(np.uint8).reshape(-1, 8)
    pcb = np.bitwise_count(xb)
    cb = np.cumsum(pcb, axis=1, dtype=np.int64)
    fb = cb <= r_in[:, None]
    res = np.where(fb, xb, np.uint8(0))
    bb = np.minimum(np.count_nonzero(fb, axis=1), 7)
    rb = np.clip(r_in - (cb[ar, bb] - pcb[ar, bb]), 0, 8)
    res[ar, bb] |= np.where(fb[ar, bb], np.uint8(0), _LOW[xb[ar, bb], rb])
    out[ar, b] |= res.reshape(-1).view(WORD)
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
        if not need.any():
            break
        p = planes[k]
        hi = cand & p
        z = cand ^ hi  # candidates with bit k == 0
        cz = popcount(z)
        take = cz <= need
        if take.all():
            sel |= z
            need -= cz
            cand = hi
            v |= 1 << k
        elif not take.any():
            cand = z
        else:
            tm = row_mask(take)
            sel |= z & tm
            need -= np.where(take, cz, 0)
            cand = z ^ (cand & tm)
            v |= take.astype(np.int64) << k
    if need.any():
        sel |= select_lowest(cand, need)
    return sel, v
