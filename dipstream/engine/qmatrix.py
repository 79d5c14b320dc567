"""Weight matrices of the lean engine, stored by input rows and read with the native kernels
(numpy and ctypes only: no torch).

A linear map y = W x (W: out x in) is stored as its transpose, one *record* per input index u
holding W[:, u] (length m = out): y = sum_u x_u record_u, which reads each weight once and lets
a sparse method read only the records of the inputs it keeps. A record is float32 or integers;
quantized records are grouped *along the inputs*, as GGUF's Q8_0 / Q4_1 blocks are: the records
of units u with the same u // GI (GI = 32) share, per output j, a float16 scale d and (int4) a
float16 offset o, kept in a small header (groups x m) that stays in RAM:

* int8: w = d q, q in [-127, 127], d = max|w| / 127 over the group (Q8_0);
* int4: w = d q + o, q in [0, 15], o = min w, d = (max w - o) / 15 (Q4_1); in every block of
  G = 32 outputs (or the largest even divisor of m below), byte j holds output j (low nibble)
  and output j + G/2 (high nibble).

So a model whose weights came from such a GGUF is stored without loss, at the GGUF's bytes
(int8 1.0625, int4 0.625 bytes per weight). Records are padded to ``stride`` bytes (a multiple of
4): a record is one contiguous read, and the kernels address record r at ``base + r * stride``.
"""

from __future__ import annotations

import numpy as np

from dipstream import native
from dipstream.errors import DipstreamError

FORMATS = ("float32", "int8", "int4")


def record_layout(fmt: str, m: int) -> tuple[int, int, int]:
    """(output block G, bytes of integers, stride in bytes) of one record of m outputs."""
    if fmt == "float32":
        return m, 4 * m, 4 * m
    if fmt == "int8":
        g, qb = m, m
    elif fmt == "int4":
        g = next((g for g in range(32, 1, -2) if m % g == 0), 0)
        if not g:
            raise DipstreamError(f"int4 packs outputs in pairs: records of {m} outputs cannot be stored so; "
                                 "use int8 for this matrix (e.g. --head-weights int8)")
        qb = m // 2
    else:
        raise DipstreamError(f"unknown weight format '{fmt}'; use one of {', '.join(FORMATS)}")
    return g, qb, qb + (-qb) % 4


def input_group(rows: int) -> int:
    """GI: records per header group (32, or the largest divisor of `rows` below it)."""
    return next(g for g in range(32, 0, -1) if rows % g == 0)


def quantize_records(Wt: np.ndarray, fmt: str):
    """(records (rows, stride) uint8, scales d (rows/GI, m) float16 or None, offsets o or None)
    of the float32 rows Wt (rows, m)."""
    Wt = np.ascontiguousarray(Wt, np.float32)
    rows, m = Wt.shape
    g, qb, stride = record_layout(fmt, m)
    out = np.zeros((rows, stride), np.uint8)
    if fmt == "float32":
        out[:] = Wt.view(np.uint8).reshape(rows, stride)
        return out, None, None
    if not np.isfinite(Wt).all() or np.abs(Wt).max(initial=0) > 6e4:
        raise DipstreamError("weights are not finite or exceed float16's range; use --weights float32")
    gi = input_group(rows)
    w = Wt.reshape(rows // gi, gi, m)
    if fmt == "int8":
        d = (np.abs(w).max(1) / 127.0).astype(np.float16)
        safe = np.where(d > 0, d.astype(np.float32), 1.0)[:, None]
        q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
        out[:, :qb] = q.reshape(rows, m).view(np.uint8)
        return out, d, None
    lo = w.min(1).astype(np.float16)
    d = ((w.max(1) - lo.astype(np.float32)) / 15.0).astype(np.float16)
    safe = np.where(d > 0, d.astype(np.float32), 1.0)[:, None]
    u = np.clip(np.rint((w - lo.astype(np.float32)[:, None]) / safe), 0, 15).astype(np.uint8)
    u = u.reshape(rows, m // g, g)
    out[:, :qb] = (u[..., :g // 2] | (u[..., g // 2:] << 4)).reshape(rows, qb)
    return out, d, lo


def dequantize_records(rec: np.ndarray, fmt: str, m: int, hd=None, hm=None, gi: int = 32,
                       first: int = 0) -> np.ndarray:
    """float32 rows (rows, m) of records with headers hd / hm of groups of `gi` units; `first`:
    the unit of rec[0]."""
    g, qb, stride = record_layout(fmt, m)
    rows = rec.shape[0]
    if fmt == "float32":
        return np.ascontiguousarray(rec[:, :4 * m]).view(np.float32).reshape(rows, m)
    grp = (first + np.arange(rows)) // gi
    d = hd[grp].astype(np.float32)
    if fmt == "int8":
        return rec[:, :qb].view(np.int8).astype(np.float32).reshape(rows, m) * d
    b = rec[:, :qb].reshape(rows, m // g, g // 2)
    q = np.concatenate([(b & 15), (b >> 4)], axis=-1).astype(np.float32).reshape(rows, m)
    return q * d + hm[grp].astype(np.float32)


class QMatrix:
    """A matrix W (m x rows) as `rows` records of m outputs over a uint8 buffer (rows, stride) in
    RAM, with its headers (see the module docstring)."""

    def __init__(self, records: np.ndarray, fmt: str, m: int, hd: np.ndarray | None = None,
                 hm: np.ndarray | None = None, units: int | None = None, act8: bool = False):
        self.rec, self.fmt, self.m = records, fmt, int(m)
        self.group, self.qbytes, self.stride = record_layout(fmt, m)
        self.units = int(units if units is not None else records.shape[0])  # rows of the whole matrix
        self.gi = input_group(self.units) if fmt != "float32" else 0
        if fmt != "float32":
            want = (self.units // self.gi, self.m)
            if hd is None or hd.shape != want or hd.dtype != np.float16 or \
                    (fmt == "int4") != (hm is not None) or (hm is not None and hm.shape != want):
                raise DipstreamError(f"{fmt} records need float16 headers of shape {want}")
        self.hd = None if hd is None else np.ascontiguousarray(hd)
        self.hm = None if hm is None else np.ascontiguousarray(hm)
        self.bits = {"int8": 8, "int4": 4}.get(fmt, 32)
        self.act8 = bool(act8)  # int4 / int8: products with each input group's coefficients quantized to int8
        self._lib = native.require()

    @classmethod
    def from_dense(cls, W: np.ndarray, fmt: str) -> "QMatrix":
        """From a float32 W (m x rows)."""
        Wt = np.ascontiguousarray(np.asarray(W, np.float32).T)
        rec, hd, hm = quantize_records(Wt, fmt)
        return cls(rec, fmt, Wt.shape[1], hd, hm)

    @classmethod
    def concat_outputs(cls, mats: list["QMatrix"]) -> "QMatrix | None":
        """One matrix whose outputs are those of `mats` in order (same inputs), so one product
        does all (e.g. q, k and v); None where their records cannot be laid side by side."""
        fmt, rows = mats[0].fmt, mats[0].rows
        m = sum(q.m for q in mats)
        if any(q.fmt != fmt or q.rows != rows or q.units != rows or q.act8 != mats[0].act8 for q in mats):
            return None
        if fmt == "int4" and any(q.group != 32 or q.m % 32 for q in mats):
            return None
        g, qb, stride = record_layout(fmt, m)
        if fmt == "int4" and g != 32:
            return None
        rec = np.zeros((rows, stride), np.uint8)
        rec[:, :qb] = np.concatenate([q.rec[:, :q.qbytes] for q in mats], axis=1)
        cat = (lambda hs: None if hs[0] is None else np.concatenate(hs, axis=1))
        return cls(rec, fmt, m, cat([q.hd for q in mats]), cat([q.hm for q in mats]), act8=mats[0].act8)

    @property
    def rows(self) -> int:
        return self.rec.shape[0]

    @property
    def header_bytes(self) -> int:
        return sum(h.nbytes for h in (self.hd, self.hm) if h is not None)

    @property
    def nbytes(self) -> int:
        return self.rec.nbytes + self.header_bytes

    def dense(self) -> np.ndarray:
        """float32 W (m x rows), for tests."""
        return dequantize_records(self.rec, self.fmt, self.m, self.hd, self.hm, self.gi or 1).T

    def column_bytes(self, j: int) -> tuple[int, int]:
        """(position, width) in a record of the bytes that hold output j."""
        if self.fmt == "float32":
            return 4 * j, 4
        if self.fmt == "int8":
            return j, 1
        gb, jj = divmod(j, self.group)
        return gb * (self.group // 2) + jj % (self.group // 2), 1

    def decode_column(self, raw: np.ndarray, j: int) -> np.ndarray:
        """Output j of every record, from the bytes column_bytes(j) of each (rows x width uint8)."""
        if self.fmt == "float32":
            return np.ascontiguousarray(raw[:, :4]).view(np.float32)[:, 0].copy()
        grp = np.arange(raw.shape[0]) // self.gi
        d = self.hd[grp, j].astype(np.float32)
        if self.fmt == "int8":
            return raw[:, 0].view(np.int8).astype(np.float32) * d
        nib = (raw[:, 0] & 15) if j % self.group < self.group // 2 else (raw[:, 0] >> 4)
        return nib.astype(np.float32) * d + self.hm[grp, j].astype(np.float32)

    def column(self, j: int) -> np.ndarray:
        """Output j of every record (a tied embedding's row j), dequantized."""
        pos, width = self.column_bytes(j)
        return self.decode_column(self.rec[:, pos:pos + width], j)

    def native(self) -> native.DsMat:
        """This matrix as the decode blocks' ds_mat_t (pointers into its arrays)."""
        return native.DsMat(native.ptr(self.rec), native.ptr(self.hd), native.ptr(self.hm), self.rows, self.m,
                            self.stride, self.group, self.gi, self.bits, int(self.act8))

    def _hp(self):
        return (self.hd.ctypes.data, None if self.hm is None else self.hm.ctypes.data, self.gi)

    def group_max(self, v: np.ndarray) -> np.ndarray | None:
        """max |v| per input group of the whole activation vector v (one entry per unit): the int8
        activations' scales, for products gathered in parts (None: float32 activations)."""
        if not self.act8 or self.fmt == "float32":
            return None
        return np.ascontiguousarray(np.abs(v, dtype=np.float32).reshape(-1, self.gi).max(1))

    def gather(self, idx: np.ndarray, coef: np.ndarray, out: np.ndarray, nthreads: int = 1,
               rec: np.ndarray | None = None, units: np.ndarray | None = None,
               gmax: np.ndarray | None = None) -> np.ndarray:
        """out = sum_i coef[i] * record idx[i] of `rec` (default this matrix's records); `units`:
        the unit of each of those records (for its header), when rec is not laid out by unit;
        `gmax`: `group_max` of the whole vector (int8 activations quantized with the whole group's
        scale, so a product gathered in parts equals the product in one call)."""
        rec = self.rec if rec is None else rec
        k = idx.size
        if gmax is not None and (gmax.dtype != np.float32 or gmax.size * self.gi < self.units):
            raise ValueError(f"gmax needs {-(-self.units // self.gi)} float32 group maxima, got {gmax.size}")
        if self.fmt == "float32":
            rc = self._lib.ds_gather_gemv(rec.ctypes.data, rec.shape[0], self.m, self.m, idx.ctypes.data,
                                          coef.ctypes.data, k, out.ctypes.data, nthreads)
        else:
            if units is None and rec.shape[0] > self.units:
                raise IndexError("records beyond the matrix need their units")
            rc = self._lib.ds_gather_gemv_qg(rec.ctypes.data, rec.shape[0], self.stride, self.group, self.bits,
                                             *self._hp(), self.units, self.m, idx.ctypes.data,
                                             None if units is None else units.ctypes.data, coef.ctypes.data, k,
                                             out.ctypes.data, nthreads, int(self.act8),
                                             None if gmax is None else gmax.ctypes.data,
                                             0 if gmax is None else gmax.size)
        if rc != 0:
            raise IndexError("record index out of range")
        return out

    def selector(self, idx: np.ndarray, coef: np.ndarray, out: np.ndarray):
        """`select` over fixed work buffers with their pointers taken once (a decode loop calls it
        hundreds of times per token): returns f(v, k, nthreads) -> count selected."""
        n = self.rows
        if self.fmt == "float32":
            fn = self._lib.ds_select_gemv
            rest = (self.rec.ctypes.data, self.m, self.m, idx.ctypes.data, coef.ctypes.data, out.ctypes.data)
        else:
            fn = self._lib.ds_select_gemv_qg
            rest = (self.rec.ctypes.data, self.stride, self.group, self.bits, *self._hp(), self.m, idx.ctypes.data,
                    coef.ctypes.data, out.ctypes.data)
        act8 = (int(self.act8),) if self.fmt != "float32" else ()

        def run(v: np.ndarray, k: int, nthreads: int = 1) -> int:
            got = fn(v.ctypes.data, n, k, *rest, nthreads, *act8)
            if got < 0:
                raise MemoryError("native select-gemv failed")
            return got

        return run

    def select(self, v: np.ndarray, k: int, idx: np.ndarray, coef: np.ndarray, out: np.ndarray,
               nthreads: int = 1) -> int:
        """The top-k |v| rows (ascending into idx) and out = sum v[idx] * record idx; k = rows is
        the dense product. Returns how many were selected."""
        return int(self.selector(idx, coef, out)(v, k, nthreads))
