"""Weight matrices of the lean engine, stored by input rows and read with the native kernels
(numpy and ctypes only: no torch).

A linear map y = W x (W: out x in) is stored as its transpose, one *record* per input index u
holding W[:, u] (length m = out): y = sum_u x_u record_u, which reads each weight once and lets
a sparse method read only the records of the inputs it keeps. A record is float32 or integers q;
quantized records are grouped *along the inputs*, as GGUF's blocks are: the records of units u
with the same u // gi share, per output j, a scale D and an offset M (w = D q + M) kept in a small
header table that stays in RAM. The formats (`FORMATS`):

* float32;
* int8 (GGUF Q8_0): q in [-127, 127] signed, per (group of 32, output) a float16 d: w = d q;
* int4 (Q4_1): q in [0, 15], float16 d and m: w = d q + m;
* q4_0 / q5_0 (Q4_0 / Q5_0): 4 / 5-bit q, float16 d: w = d (q - 8) / d (q - 16);
* q5_1 (Q5_1): 5-bit q, float16 d and m;
* q4_k / q5_k (Q4_K / Q5_K): 4 / 5-bit q in groups of 32 inside super-blocks of 256 inputs whose
  header, per output, is the GGUF block's own 16 bytes (float16 d, dmin and twelve bytes of 6-bit
  scales and mins: 0.5 bit per weight): w = (d sc) q - dmin mn;
* q6_k (Q6_K): 6-bit q in groups of 16 inside super-blocks of 256 inputs, per output the block's
  sixteen int8 scales and float16 d (18 bytes): w = (d sc) (q - 32).

A GGUF's blocks are moved into records without re-quantizing (`engine.gguf_blocks`): dequantized,
a record equals gguf's dequantization bit for bit. int8 and int4 are also what `--weights`
quantizes float checkpoints to. Packed records: in every block of G = 32 outputs (int4 from a
float checkpoint: the largest even divisor of m up to 32), byte j holds output j (low nibble) and
output j + G/2 (high nibble); 5- and 6-bit records follow with a plane of the high bits (5 bits:
output j's bit in bit j % 8 of byte j / 8; 6 bits: per 32 outputs 8 bytes, byte t holding outputs
t, t+8, t+16, t+24 at shifts 0, 2, 4, 6). Records are padded to ``stride`` bytes (a multiple of
4): a record is one contiguous read, and the kernels address record r at ``base + r * stride``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dipstream import native
from dipstream.errors import DipstreamError

HK_F16, HK_K45, HK_Q6K = 0, 1, 2  # header kinds of the native kernels (gemv.c group_scales)


@dataclass(frozen=True)
class WeightFormat:
    """One record format: its integers, its header table and the GGUF block type it keeps."""

    name: str
    bits: int  # 32: float32; 8: signed; 4, 5, 6: unsigned
    headers: int = HK_F16
    zero: int = 0  # zero point: w = d (q - zero)
    offsets: bool = False  # a float16 offset m per group: w = d q + m
    gi: int = 32  # inputs per group of one scale (float checkpoints' int8 / int4: a divisor of the rows)
    block: int = 1  # inputs per header row (K-quants: a super-block of 256)
    hbytes: int = 2  # header bytes per (header row, output) of each header array
    gguf: str | None = None  # the GGUF block type these records keep exactly
    rows: bool = False  # an embedding kept as the GGUF's own rows (looked up, never multiplied)

    @property
    def quantized(self) -> bool:
        return self.bits != 32 and not self.rows


FORMATS = {f.name: f for f in (
    WeightFormat("float32", 32, gi=0, hbytes=0),
    WeightFormat("int8", 8, gguf="Q8_0"),
    WeightFormat("int4", 4, offsets=True, gguf="Q4_1"),
    WeightFormat("q4_0", 4, zero=8, gguf="Q4_0"),
    WeightFormat("q5_0", 5, zero=16, gguf="Q5_0"),
    WeightFormat("q5_1", 5, offsets=True, gguf="Q5_1"),
    WeightFormat("q4_k", 4, HK_K45, block=256, hbytes=16, gguf="Q4_K"),
    WeightFormat("q5_k", 5, HK_K45, block=256, hbytes=16, gguf="Q5_K"),
    WeightFormat("q6_k", 6, HK_Q6K, gi=16, block=256, hbytes=18, gguf="Q6_K"),
)}
FORMATS.update({f"{f.name}_rows": WeightFormat(f"{f.name}_rows", 0, gi=0, hbytes=0, gguf=f.gguf, rows=True)
                for f in list(FORMATS.values()) if f.gguf})  # an untied embedding in its GGUF rows
QUANTIZE = ("float32", "int8", "int4")  # what a float checkpoint can be quantized to (`--weights`)


def weight_format(fmt: str) -> WeightFormat:
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise DipstreamError(f"unknown weight format {fmt!r}; use one of {', '.join(FORMATS)}") from None


def record_layout(fmt: str, m: int) -> tuple[int, int, int]:
    """(output block G, bytes of integers, stride in bytes) of one record of m outputs."""
    f = weight_format(fmt)
    if f.bits == 32:
        return m, 4 * m, 4 * m
    if f.rows:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[f.gguf]]
        if m % bs:
            raise DipstreamError(f"a row of {m} values is not whole {f.gguf} blocks")
        return m, m // bs * ts, m // bs * ts + (-(m // bs * ts)) % 4
    if f.bits == 8:
        g, qb = m, m
    elif f.bits == 4 and f.name == "int4":
        g = next((g for g in range(32, 1, -2) if m % g == 0), 0)
        if not g:
            raise DipstreamError(f"int4 packs outputs in pairs: records of {m} outputs cannot be stored so; "
                                 "use int8 for this matrix (e.g. --head-weights int8)")
        qb = m // 2
    else:
        if m % 32:
            raise DipstreamError(f"{fmt} records pack outputs in blocks of 32: {m} outputs cannot be stored so")
        g, qb = 32, m // 2 + {4: 0, 5: m // 8, 6: m // 4}[f.bits]
    return g, qb, qb + (-qb) % 4


def input_group(rows: int, fmt: str = "int8") -> int:
    """gi: records per header group (the format's; float checkpoints' int8 / int4: 32, or the
    largest divisor of `rows` below it)."""
    f = weight_format(fmt)
    if f.gguf and f.name not in ("int8", "int4"):
        return f.gi
    return next(g for g in range(32, 0, -1) if rows % g == 0)


def header_specs(fmt: str, rows: int, m: int) -> list[tuple[np.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each header array of a `fmt` matrix of `rows` records of m outputs: the
    scales (and offsets) per (group, output) in float16, or the K-quants' bytes per (super-block,
    output)."""
    f = weight_format(fmt)
    if not f.quantized:
        return []
    if f.headers != HK_F16:
        return [(np.dtype(np.uint8), (rows // f.block, f.hbytes, m))]
    shape = (rows // input_group(rows, fmt), m)
    return [(np.dtype(np.float16), shape)] * (2 if f.offsets else 1)


def header_bytes(fmt: str, rows: int, m: int) -> int:
    return sum(int(np.prod(s)) * dt.itemsize for dt, s in header_specs(fmt, rows, m))


def _scale_min_k4(sub: int, sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A K-quant's 6-bit scale and min of sub-block `sub` (0..7) from its 12 bytes (..., 12)."""
    if sub < 4:
        return sc[..., sub] & 63, sc[..., sub + 4] & 63
    return ((sc[..., sub + 4] & 15) | ((sc[..., sub - 4] >> 6) << 4),
            (sc[..., sub + 4] >> 4) | ((sc[..., sub] >> 6) << 4))


def group_scales(fmt: str, hd, hm, gi: int, units: np.ndarray, cols=slice(None)):
    """(D, M, zero) float32 (len(units), outputs) of records of the given units (w = D (q - zero)
    + M; M None: no offsets), the float32 operations of gguf's dequantizers."""
    f = weight_format(fmt)
    units = np.asarray(units)
    if f.headers == HK_F16:
        g = units // gi  # the columns first: a lookup of one output never copies whole tables
        d = hd[:, cols][g].astype(np.float32)
        return d, (hm[:, cols][g].astype(np.float32) if f.offsets else None), f.zero
    t = hd[:, :, cols][units // f.block]  # (n, hbytes, outputs): the super-blocks' header bytes, by column
    sub = (units % f.block) // f.gi

    def half(r0: int) -> np.ndarray:  # a float16 field (rows r0, r0 + 1: its low and high bytes) as float32
        return (t[:, r0].astype(np.uint16) | (t[:, r0 + 1].astype(np.uint16) << 8)).view(np.float16).astype(np.float32)

    if f.headers == HK_Q6K:
        sc = t[np.arange(len(units)), sub].view(np.int8).astype(np.float32)
        return half(16) * sc, None, 32
    d, dmin = half(0), half(2)
    D, M = np.empty_like(d), np.empty_like(d)
    for s in np.unique(sub):
        r = sub == s
        sc, mn = _scale_min_k4(int(s), np.moveaxis(t[r][:, 4:16, :], 1, -1))
        D[r] = d[r] * sc.astype(np.float32)
        M[r] = -(dmin[r] * mn.astype(np.float32))
    return D, M, 0


def unpack_records(rec: np.ndarray, fmt: str, m: int) -> np.ndarray:
    """The integers (rows, m) of packed records: int8 signed, else unsigned uint8."""
    f = weight_format(fmt)
    g, qb, _ = record_layout(fmt, m)
    rows = rec.shape[0]
    if f.bits == 8:
        return rec[:, :m].view(np.int8)
    b = rec[:, :m // 2].reshape(rows, m // g, g // 2)
    q = np.concatenate([(b & 15), (b >> 4)], axis=-1).reshape(rows, m)
    if f.bits == 5:
        hi = np.unpackbits(rec[:, m // 2:m // 2 + m // 8], axis=1, bitorder="little")
        q = q | (hi << 4)
    elif f.bits == 6:
        hb = rec[:, m // 2:m // 2 + m // 4].reshape(rows, m // 32, 1, 8)
        hi = (hb >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        q = q | (hi.reshape(rows, m) << 4)
    return q


def packing_block(fmt: str, m: int) -> int:
    """The outputs a part of a record must come in whole multiples of (`pack_records`)."""
    return 1 if weight_format(fmt).bits in (8, 32) else record_layout(fmt, m)[0]


def pack_records(q: np.ndarray, fmt: str, m: int | None = None, o0: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Records (rows, stride) uint8 of integers q (rows, mc) (the inverse of unpack_records): the
    outputs o0 .. o0 + mc of records of m outputs (default: all of them, m = mc), written into `out`
    (rows, stride) when given. A part (o0, mc) must be whole output blocks (multiples of G)."""
    f = weight_format(fmt)
    rows, mc = q.shape
    m = mc if m is None else m
    g, qb, stride = record_layout(fmt, m)
    blk = packing_block(fmt, m)
    if o0 % blk or mc % blk or o0 + mc > m:
        raise ValueError(f"outputs {o0}..{o0 + mc} are not whole blocks of {blk} of {m}")
    if out is None:
        out = np.zeros((rows, stride), np.uint8)
    if f.bits == 8:
        out[:, o0:o0 + mc] = q.astype(np.int8).view(np.uint8)
        return out
    u = q.astype(np.uint8)
    lo = (u & 15).reshape(rows, mc // g, g)
    out[:, o0 // 2:(o0 + mc) // 2] = (lo[..., :g // 2] | (lo[..., g // 2:] << 4)).reshape(rows, mc // 2)
    if f.bits == 5:
        out[:, m // 2 + o0 // 8:m // 2 + (o0 + mc) // 8] = np.packbits((u >> 4) & 1, axis=1, bitorder="little")
    elif f.bits == 6:
        hi = ((u >> 4) & 3).reshape(rows, mc // 32, 4, 8)
        out[:, m // 2 + o0 // 4:m // 2 + (o0 + mc) // 4] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4)
                                                            | (hi[:, :, 3] << 6)).reshape(rows, mc // 4)
    return out


def quantize_records(Wt: np.ndarray, fmt: str):
    """(records (rows, stride) uint8, scales d (rows/gi, m) float16 or None, offsets o or None)
    of the float32 rows Wt (rows, m), in float32, int8 or int4 (`QUANTIZE`)."""
    Wt = np.ascontiguousarray(Wt, np.float32)
    rows, m = Wt.shape
    if fmt not in QUANTIZE:
        raise DipstreamError(f"a float checkpoint is stored in {', '.join(QUANTIZE)}, not {fmt!r} "
                             "(GGUF block formats come from a GGUF file's own blocks)")
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
    rows = rec.shape[0]
    if fmt == "float32":
        return np.ascontiguousarray(rec[:, :4 * m]).view(np.float32).reshape(rows, m)
    f = weight_format(fmt)
    if f.rows:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(np.ascontiguousarray(rec[:, :record_layout(fmt, m)[1]]), GGMLQuantizationType[f.gguf])
    q = unpack_records(rec, fmt, m)
    D, M, zero = group_scales(fmt, hd, hm, gi, first + np.arange(rows))
    w = D * (q.astype(np.int16) - zero).astype(np.float32) if zero else D * q.astype(np.float32)
    return w + M if M is not None else w


class QMatrix:
    """A matrix W (m x rows) as `rows` records of m outputs over a uint8 buffer (rows, stride) in
    RAM, with its headers (see the module docstring)."""

    def __init__(self, records: np.ndarray, fmt: str, m: int, hd: np.ndarray | None = None,
                 hm: np.ndarray | None = None, units: int | None = None, act8: bool = False):
        self.rec, self.fmt, self.m = records, fmt, int(m)
        self.format = weight_format(fmt)
        if self.format.rows:
            raise DipstreamError(f"{fmt} is an embedding's rows, not records a product reads")
        self.group, self.qbytes, self.stride = record_layout(fmt, m)
        self.units = int(units if units is not None else records.shape[0])  # rows of the whole matrix
        self.gi = input_group(self.units, fmt) if self.format.quantized else 0
        if self.format.quantized:
            if self.units % max(self.gi, self.format.block):
                raise DipstreamError(f"{fmt} records come in groups of {max(self.gi, self.format.block)} inputs, "
                                     f"not {self.units}")
            want = header_specs(fmt, self.units, self.m)
            got = [h for h in (hd, hm) if h is not None]
            if len(got) != len(want) or any(h.dtype != dt or h.shape != s for h, (dt, s) in zip(got, want)):
                raise DipstreamError(f"{fmt} records need headers {[(str(dt), s) for dt, s in want]}")
        self.hd = None if hd is None else np.ascontiguousarray(hd)
        self.hm = None if hm is None else np.ascontiguousarray(hm)
        self.bits = self.format.bits
        self.act8 = bool(act8)  # quantized: products with each input group's coefficients quantized to int8
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
        packed = mats[0].bits in (4, 5, 6)
        if packed and any(q.group != 32 or q.m % 32 for q in mats):
            return None
        g, qb, stride = record_layout(fmt, m)
        if packed and g != 32:
            return None
        rec = np.zeros((rows, stride), np.uint8)
        if packed:  # nibble planes side by side, then the high planes
            parts = [q.rec[:, :q.m // 2] for q in mats] + [q.rec[:, q.m // 2:q.qbytes] for q in mats]
        else:
            parts = [q.rec[:, :q.qbytes] for q in mats]
        rec[:, :qb] = np.concatenate(parts, axis=1)
        cat = (lambda hs: None if hs[0] is None else np.concatenate(hs, axis=-1))  # outputs: the last axis
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

    def column_bytes(self, j: int) -> list[tuple[int, int]]:
        """[(position, width)] in a record of the bytes that hold output j (the nibble, then the
        high plane's byte of 5- and 6-bit records)."""
        if self.bits == 32:
            return [(4 * j, 4)]
        if self.bits == 8:
            return [(j, 1)]
        gb, jj = divmod(j, self.group)
        spans = [(gb * (self.group // 2) + jj % (self.group // 2), 1)]
        if self.bits == 5:
            spans.append((self.m // 2 + j // 8, 1))
        elif self.bits == 6:
            spans.append((self.m // 2 + (j // 32) * 8 + j % 8, 1))
        return spans

    def decode_column(self, raw: np.ndarray, j: int, first: int = 0) -> np.ndarray:
        """Output j of every record (records first, first + 1, ...), from the bytes column_bytes(j)
        of each, side by side (rows x total width uint8)."""
        if self.bits == 32:
            return np.ascontiguousarray(raw[:, :4]).view(np.float32)[:, 0].copy()
        units = first + np.arange(raw.shape[0])
        D, M, zero = group_scales(self.fmt, self.hd, self.hm, self.gi, units, slice(j, j + 1))
        if self.bits == 8:
            q = raw[:, 0].view(np.int8)
        else:
            q = (raw[:, 0] & 15) if j % self.group < self.group // 2 else (raw[:, 0] >> 4)
            if self.bits == 5:
                q = q | (((raw[:, 1] >> (j % 8)) & 1) << 4)
            elif self.bits == 6:
                q = q | (((raw[:, 1] >> (2 * ((j % 32) // 8))) & 3) << 4)
        w = D[:, 0] * (q.astype(np.int16) - zero).astype(np.float32) if zero else D[:, 0] * q.astype(np.float32)
        return w + M[:, 0] if M is not None else w

    def column(self, j: int) -> np.ndarray:
        """Output j of every record (a tied embedding's row j), dequantized."""
        raw = np.concatenate([self.rec[:, p:p + w] for p, w in self.column_bytes(j)], axis=1)
        return self.decode_column(raw, j)

    def _kind(self) -> tuple:
        """The native kernels' description of the headers: (hd, hm, gi, header kind, zero point)."""
        return (native.ptr(self.hd), native.ptr(self.hm), self.gi, self.format.headers, self.format.zero)

    def native(self) -> native.DsMat:
        """This matrix as the decode blocks' ds_mat_t (pointers into its arrays)."""
        hd, hm, gi, hk, zp = self._kind() if self.format.quantized else (None, None, 0, 0, 0)
        return native.DsMat(native.ptr(self.rec), hd, hm, self.rows, self.m, self.stride, self.group, gi, self.bits,
                            int(self.act8), hk, zp)

    def group_max(self, v: np.ndarray) -> np.ndarray | None:
        """max |v| per input group of the whole activation vector v (one entry per unit): the int8
        activations' scales, for products gathered in parts (None: float32 activations)."""
        if not self.act8 or not self.format.quantized:
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
                                             *self._kind(), self.units, self.m, idx.ctypes.data,
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
            rest = (self.rec.ctypes.data, self.stride, self.group, self.bits, *self._kind(), self.m, idx.ctypes.data,
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
