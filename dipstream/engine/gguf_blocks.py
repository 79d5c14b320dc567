"""A GGUF tensor's quantized blocks moved into the engine's records, without re-quantizing.

GGUF stores a matrix (out x in) as `out` rows of blocks along the inputs; the engine stores it by
input (`engine.qmatrix`): records of `out` integers, with the blocks' scales in a header table per
(input group, output). Moving a block's integers and scales from one layout to the other changes
no value: the records' dequantization equals gguf's, bit for bit (tests/test_gguf_blocks.py).
Matrices are moved a slice of inputs at a time, so the working set is one slice, not the tensor.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dipstream.engine.qmatrix import FORMATS, HK_F16, pack_records, packing_block, record_layout, weight_format
from dipstream.errors import DipstreamError

BY_GGUF = {f.gguf: f.name for f in FORMATS.values() if f.gguf and not f.rows}  # GGUF block type -> record format
FLOATS = ("F32", "F16", "BF16")
SLICE_BYTES = 8 << 20  # integers of one slice of inputs, at most (a block's width at least)
CHUNK_ROWS = 4096  # outputs split / packed at a time within a slice (a multiple of every output block)


def record_format(qtype) -> str:
    """The engine format that keeps GGUF type `qtype` exactly (float types: float32)."""
    name = GGMLQuantizationType(qtype).name
    if name in FLOATS:
        return "float32"
    if name not in BY_GGUF:
        raise DipstreamError(f"GGUF block type {name} is not supported (the engine keeps "
                             f"{', '.join(sorted(BY_GGUF))} and float tensors); re-quantize the model to one of them")
    return BY_GGUF[name]


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32): low nibbles, then high (the 32-value blocks' order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def split_blocks(blocks: np.ndarray, qtype) -> tuple[np.ndarray, list[np.ndarray]]:
    """(integers (rows, nb * block) uint8 (Q8_0: int8), headers) of `rows` rows of nb blocks
    (rows, nb, type size) of GGUF type `qtype`; headers as the engine keeps them per block: float16
    d [and m] (rows, nb), or the K-quants' bytes (rows, nb, 16 | 18)."""
    name = GGMLQuantizationType(qtype).name
    rows, nb, _ = blocks.shape
    b = blocks
    if name == "Q8_0":
        return b[..., 2:].view(np.int8).reshape(rows, nb * 32), [_f16(b[..., 0:2])]
    if name in ("Q4_0", "Q4_1"):
        off = 2 if name == "Q4_0" else 4
        q = _nibbles(b[..., off:off + 16])
        heads = [_f16(b[..., 0:2])] + ([_f16(b[..., 2:4])] if name == "Q4_1" else [])
        return q.reshape(rows, nb * 32), heads
    if name in ("Q5_0", "Q5_1"):
        off = 2 if name == "Q5_0" else 4
        qh = np.unpackbits(b[..., off:off + 4], axis=-1, bitorder="little")  # bit j: value j's 5th bit
        q = _nibbles(b[..., off + 4:off + 20]) | (qh << 4)
        heads = [_f16(b[..., 0:2])] + ([_f16(b[..., 2:4])] if name == "Q5_1" else [])
        return q.reshape(rows, nb * 32), heads
    if name in ("Q4_K", "Q5_K"):
        qs = b[..., -128:].reshape(rows, nb, 4, 32)
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, nb, 8, 32)
        if name == "Q5_K":
            qh = b[..., 16:48].reshape(rows, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
            q = q | ((qh & 1) << 4)
        return q.reshape(rows, nb * 256), [np.ascontiguousarray(b[..., :16])]
    if name == "Q6_K":
        ql = b[..., :128].reshape(rows, nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        ql = (ql & 15).reshape(rows, nb, 8, 32)
        qh = b[..., 128:192].reshape(rows, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        qh = (qh & 3).reshape(rows, nb, 8, 32)
        return (ql | (qh << 4)).reshape(rows, nb * 256), [np.ascontiguousarray(b[..., 192:210])]
    raise DipstreamError(f"GGUF block type {name} is not supported")


def block_shape(qtype) -> tuple[int, int]:
    """(values, bytes) of one block of GGUF type `qtype`."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


def _engine_headers(heads: list[np.ndarray], fmt: str) -> list[np.ndarray]:
    """Per-block headers (rows, nb[, bytes]) -> the engine's tables: float16 (groups, outputs),
    or the K-quants' header bytes by column (super-blocks, bytes, outputs): row i holds byte i of
    every output's block header (qmatrix.group_scales reads a group's scales as vectors)."""
    if weight_format(fmt).headers == HK_F16:
        return [np.ascontiguousarray(np.swapaxes(h, 0, 1)) for h in heads]
    return [np.ascontiguousarray(np.transpose(heads[0], (1, 2, 0)))]


def move_matrices(parts: list[tuple[np.ndarray, int]], slice_inputs: int | None = None, chunk_rows: int = CHUNK_ROWS):
    """The records of the matrices `parts` side by side (their outputs concatenated: e.g. gate and
    up), from their GGUF rows [(raw (outputs, bytes per row) uint8, qtype)], all of one type and
    input count; `raw` is an array or anything that gives one for a slice of rows (`GGUFRows`).
    Yields ("outputs", m), then ("records", (n, stride) uint8) a slice of inputs at a time, then
    ("headers", [arrays]) once. A slice is filled `chunk_rows` outputs at a time (whole blocks of
    outputs), so the working set is one slice's records plus a chunk, whatever the matrix's size."""
    qtype = parts[0][1]
    if any(GGMLQuantizationType(t) != GGMLQuantizationType(qtype) for _, t in parts):
        raise DipstreamError("matrices stored side by side must share a GGUF block type, got "
                             + ", ".join(GGMLQuantizationType(t).name for _, t in parts))
    fmt = record_format(qtype)
    bs, ts = block_shape(qtype)
    n_in = parts[0][0].shape[1] // ts * bs
    m = sum(r.shape[0] for r, _ in parts)
    stride, g = record_layout(fmt, m)[2], packing_block(fmt, m)
    if chunk_rows % g or any(r.shape[0] % g for r, _ in parts):
        chunk_rows = max(r.shape[0] for r, _ in parts)  # parts not in whole output blocks: a part at a time
    width = weight_format(fmt).block if weight_format(fmt).block > 1 else bs
    step = slice_inputs or max(width, SLICE_BYTES // max(m, 1) // width * width)
    heads_all: list[list[np.ndarray]] = []
    yield "outputs", m
    for u0 in range(0, n_in, step):
        u1 = min(n_in, u0 + step)
        b0, b1 = u0 // bs, u1 // bs
        out = np.zeros((u1 - u0, stride), np.uint8)
        hs, o0 = [], 0
        for raw, _ in parts:
            for r0 in range(0, raw.shape[0], chunk_rows):
                rows = np.asarray(raw[r0:r0 + chunk_rows])
                q, h = split_blocks(rows.reshape(rows.shape[0], -1, ts)[:, b0:b1], qtype)
                pack_records(q.T, fmt, m, o0 + r0, out)
                hs.append(h)
            o0 += raw.shape[0]
        yield "records", out
        heads_all.append([np.concatenate([h[i] for h in hs], axis=0) for i in range(len(hs[0]))])
    merged = [np.concatenate([h[i] for h in heads_all], axis=1) for i in range(len(heads_all[0]))]  # (rows, nb, ...)
    del heads_all
    yield "headers", _engine_headers(merged, fmt)


def move_rows(raw: np.ndarray, fmt: str, m: int, rows_per_slice: int = 4096):
    """An embedding kept as its GGUF rows (raw (rows, bytes) uint8), in the ModelWriter protocol of
    move_matrices: ("outputs", m), padded ("records", slice) pieces, ("headers", [])."""
    stride = record_layout(fmt, m)[2]
    yield "outputs", m
    for r0 in range(0, raw.shape[0], rows_per_slice):
        part = raw[r0:r0 + rows_per_slice]
        out = np.zeros((part.shape[0], stride), np.uint8)
        out[:, :part.shape[1]] = part
        yield "records", out
    yield "headers", []
