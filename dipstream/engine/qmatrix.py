"""Weight matrices of the lean engine, stored by input rows and read with the native kernels
(numpy and ctypes only: no torch).

A linear map y = W x (W: out x in) is stored as its transpose, one *record* per input index i
holding W[:, i] (length m = out): y = sum_i x_i record_i, which reads each weight once and lets
a sparse method read only the records of the inputs it keeps. A record is float32, or quantized
in groups of G consecutive outputs with one float32 scale per group (the kernels' formats):

* int8: q = round(w / s) in [-127, 127], s = max|w| / 127 (G = m unless given);
* int4: q = round(w / s) + 8 in [1, 15], s = max|w| / 7, G = 32 (or the largest even divisor
  of m below it); byte j of a group holds
  output j (low nibble) and output j + G/2 (high nibble).

Record layout: [integers | scales] padded to ``stride`` bytes (a multiple of 4), so a record is
one contiguous read and the kernels address row r at ``base + r * stride``.
"""

from __future__ import annotations

import ctypes

import numpy as np

from dipstream.errors import DipstreamError
from dipstream.kernels import native

FORMATS = ("float32", "int8", "int4")


def _lib():
    lib = native.load(quiet=True)
    if lib is None:
        raise DipstreamError(f"the lean engine needs the native kernel library, which is unavailable "
                             f"({native.status().get('reason')}); install a C compiler (gcc) or use --engine hf")
    return lib


def record_layout(fmt: str, m: int, group: int | None = None) -> tuple[int, int, int]:
    """(group, bytes of integers, stride in bytes) of one record of m outputs."""
    if fmt == "float32":
        return m, 4 * m, 4 * m
    if fmt == "int8":
        g = group or m
        qb = m
    elif fmt == "int4":
        g = group or next((g for g in range(32, 1, -2) if m % g == 0), 0)
        if not g or g % 2 or m % g:
            raise DipstreamError(f"int4 packs outputs in pairs within groups: records of {m} outputs cannot be "
                                 "stored so; use int8 for this matrix (e.g. --head-weights int8)")
        qb = m // 2
    else:
        raise DipstreamError(f"unknown weight format '{fmt}'; use one of {', '.join(FORMATS)}")
    if m % g:
        raise DipstreamError(f"{fmt} groups of {g} do not divide records of {m} outputs")
    return g, qb, qb + 4 * (m // g) + (-(qb + 4 * (m // g))) % 4


def quantize_records(Wt: np.ndarray, fmt: str, group: int | None = None) -> np.ndarray:
    """Records (rows, stride) uint8 of the float32 rows Wt (rows, m)."""
    Wt = np.ascontiguousarray(Wt, np.float32)
    rows, m = Wt.shape
    g, qb, stride = record_layout(fmt, m, group)
    out = np.zeros((rows, stride), np.uint8)
    if fmt == "float32":
        out[:] = Wt.view(np.uint8).reshape(rows, stride)
        return out
    w = Wt.reshape(rows, m // g, g)
    amax = np.abs(w).max(-1)
    levels = 127.0 if fmt == "int8" else 7.0
    s = (amax / levels).astype(np.float32)
    safe = np.where(s > 0, s, 1.0)[..., None]
    q = np.clip(np.rint(w / safe), -levels, levels).astype(np.int32)
    if fmt == "int8":
        out[:, :qb] = q.reshape(rows, m).astype(np.int8).view(np.uint8)
    else:
        u = (q + 8).astype(np.uint8)
        h = g // 2
        out[:, :qb] = (u[..., :h] | (u[..., h:] << 4)).reshape(rows, qb)
    out[:, qb:qb + 4 * (m // g)] = s.view(np.uint8).reshape(rows, -1)
    return out


def dequantize_records(rec: np.ndarray, fmt: str, m: int, group: int | None = None) -> np.ndarray:
    """float32 rows (rows, m) of records."""
    g, qb, stride = record_layout(fmt, m, group)
    rows = rec.shape[0]
    if fmt == "float32":
        return np.ascontiguousarray(rec[:, :4 * m]).view(np.float32).reshape(rows, m)
    s = np.ascontiguousarray(rec[:, qb:qb + 4 * (m // g)]).view(np.float32).reshape(rows, m // g, 1)
    if fmt == "int8":
        q = rec[:, :qb].view(np.int8).astype(np.float32).reshape(rows, m // g, g)
    else:
        b = rec[:, :qb].reshape(rows, m // g, g // 2)
        q = np.concatenate([(b & 15), (b >> 4)], axis=-1).astype(np.float32) - 8.0
    return (q * s).reshape(rows, m)


class QMatrix:
    """A matrix W (m x rows) as `rows` records of m outputs (see the module docstring), over a
    uint8 buffer (rows, stride) in RAM."""

    def __init__(self, records: np.ndarray, fmt: str, m: int, group: int | None = None):
        self.fmt, self.m = fmt, int(m)
        self.group, self.qbytes, self.stride = record_layout(fmt, m, group)
        if records.dtype != np.uint8 or records.ndim != 2 or records.shape[1] != self.stride:
            raise ValueError(f"records must be uint8 (rows, {self.stride}), got {records.dtype}{records.shape}")
        self.rec = np.ascontiguousarray(records)
        self.rows = self.rec.shape[0]
        self.bits = {"int8": 8, "int4": 4}.get(fmt, 32)
        self._lib = _lib()

    @classmethod
    def from_dense(cls, W: np.ndarray, fmt: str, group: int | None = None) -> "QMatrix":
        """From a float32 weight W (out x in), stored by input rows."""
        Wt = np.ascontiguousarray(np.asarray(W, np.float32).T)
        return cls(quantize_records(Wt, fmt, group), fmt, Wt.shape[1], group)

    @property
    def nbytes(self) -> int:
        return self.rec.nbytes

    def dense(self) -> np.ndarray:
        """float32 W (m x rows), for tests."""
        return dequantize_records(self.rec, self.fmt, self.m, self.group).T

    def _args(self, rec: np.ndarray):
        base = rec.ctypes.data
        if self.fmt == "float32":
            return base
        return base, self.stride, base + self.qbytes, self.stride // 4, self.group, self.bits

    def gather(self, idx: np.ndarray, coef: np.ndarray, out: np.ndarray, nthreads: int = 1,
               rec: np.ndarray | None = None) -> np.ndarray:
        """out = sum_i coef[i] * record idx[i] (of `rec`, default this matrix's records)."""
        rec = self.rec if rec is None else rec
        k = idx.size
        if self.fmt == "float32":
            rc = self._lib.ds_gather_gemv(rec.ctypes.data, rec.shape[0], self.m, self.m, idx.ctypes.data,
                                          coef.ctypes.data, k, out.ctypes.data, nthreads)
        else:
            b, ldb, s, lds, g, bits = self._args(rec)
            rc = self._lib.ds_gather_gemv_q(b, rec.shape[0], ldb, s, lds, g, bits, self.m, idx.ctypes.data,
                                            coef.ctypes.data, k, out.ctypes.data, nthreads)
        if rc != 0:
            raise IndexError("record index out of range")
        return out

    def select(self, v: np.ndarray, k: int, idx: np.ndarray, coef: np.ndarray, out: np.ndarray,
               nthreads: int = 1) -> int:
        """The top-k |v| rows (ascending into idx) and out = sum v[idx] * record idx; k = rows is
        the dense product. Returns how many were selected."""
        if self.fmt == "float32":
            got = self._lib.ds_select_gemv(v.ctypes.data, self.rows, k, self.rec.ctypes.data, self.m, self.m,
                                           idx.ctypes.data, coef.ctypes.data, out.ctypes.data, nthreads)
        else:
            b, ldb, s, lds, g, bits = self._args(self.rec)
            got = self._lib.ds_select_gemv_q(v.ctypes.data, self.rows, k, b, ldb, s, lds, g, bits, self.m,
                                             idx.ctypes.data, coef.ctypes.data, out.ctypes.data, nthreads)
        if got < 0:
            raise MemoryError("native select-gemv failed")
        return int(got)


def topk_abs(v: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
    """Ascending indices of the k largest |v| (dipstream.selection's rule), written to out[:k]."""
    got = _lib().ds_topk_abs(v.ctypes.data, v.size, int(k), out.ctypes.data)
    if got < 0:
        raise MemoryError("ds_topk_abs failed")
    return out[:got]


def as_ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)
