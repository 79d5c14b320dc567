"""GGUF block formats kept exactly: a GGUF matrix's blocks moved into the engine's records
dequantize to gguf's own dequantization bit for bit, and the native kernels multiply them as the
dense matrix does (float32 activations to rounding, int8 activations to their quantization)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from dipstream.engine.gguf_blocks import block_shape, move_matrices, record_format, split_blocks
from dipstream.engine.qmatrix import QMatrix, dequantize_records, input_group, unpack_records
from dipstream.errors import DipstreamError

TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def random_blocks(name: str, rows: int, cols: int, rng) -> np.ndarray:
    """GGUF rows (rows, bytes) of type `name`: random integers and scales, finite float16 scales."""
    bs, ts = block_shape(T[name])
    raw = rng.integers(0, 256, (rows, cols // bs, ts), dtype=np.uint8)
    f16 = (lambda: rng.uniform(0.001, 0.02, raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2))
    if name == "Q6_K":
        raw[..., 208:210] = f16()
    else:
        raw[..., 0:2] = f16()
        if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
            raw[..., 2:4] = f16()
    if name == "Q8_0":  # Q8_0's integers are in [-127, 127] (ggml's quantizer never writes -128)
        q = raw[..., 2:]
        q[q == 128] = 129
    return raw.reshape(rows, -1)


def moved(parts, slice_inputs=None):
    pieces = list(move_matrices(parts, slice_inputs))
    rec = np.concatenate([p for kind, p in pieces if kind == "records"])
    heads = pieces[-1][1]
    return rec, heads[0], (heads[1] if len(heads) > 1 else None)


@pytest.mark.parametrize("name", TYPES)
def test_moved_records_dequantize_to_ggufs_values_bit_for_bit(name):
    rng = np.random.default_rng(TYPES.index(name))
    gate, up = random_blocks(name, 64, 512, rng), random_blocks(name, 96, 512, rng)
    fmt = record_format(T[name])
    rec, hd, hm = moved([(gate, T[name]), (up, T[name])], slice_inputs=256)  # two slices, side by side
    got = dequantize_records(rec, fmt, 160, hd, hm, input_group(512, fmt)).T
    want = np.concatenate([dequantize(gate, T[name]), dequantize(up, T[name])]).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("act8", [False, True])
def test_kernels_multiply_moved_records_as_the_dense_matrix(name, act8):
    rng = np.random.default_rng(7)
    n_out, n_in = 4160, 512  # more outputs than one accumulator chunk (4096)
    rec, hd, hm = moved([(random_blocks(name, n_out, n_in, rng), T[name])])
    q = QMatrix(rec, record_format(T[name]), n_out, hd, hm, act8=act8)
    W = q.dense()
    x = rng.standard_normal(n_in).astype(np.float32)
    out, idx, coef = np.empty(n_out, np.float32), np.empty(n_in + 1, np.int64), np.empty(n_in + 1, np.float32)
    tol = 2e-2 if act8 else 1e-5  # int8 activations: 1/254 of each group's max per coefficient
    for k, threads in ((n_in, 1), (100, 2)):
        got = q.select(x, k, idx, coef, out, nthreads=threads)
        sel = idx[:got]
        ref = W[:, sel] @ x[sel]
        assert got == k and np.abs(out - ref).max() <= tol * np.abs(ref).max()
    sel = np.sort(rng.choice(n_in, 50, replace=False)).astype(np.int64)  # cache slots: records by slot, units given
    q.gather(np.arange(50, dtype=np.int64), x[sel].copy(), out, 1, rec=np.ascontiguousarray(rec[sel]), units=sel)
    ref = W[:, sel] @ x[sel]
    assert np.abs(out - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("name", ["Q5_0", "Q6_K", "Q4_K"])
def test_columns_and_side_by_side_matrices_of_packed_records(name):
    rng = np.random.default_rng(3)
    a, b = (moved([(random_blocks(name, m, 256, rng), T[name])]) for m in (64, 32))
    fmt = record_format(T[name])
    qa, qb = QMatrix(a[0], fmt, 64, a[1], a[2]), QMatrix(b[0], fmt, 32, b[1], b[2])
    both = QMatrix.concat_outputs([qa, qb])
    np.testing.assert_array_equal(both.dense(), np.concatenate([qa.dense(), qb.dense()]))
    for j in (0, 17, 40, 63):  # a tied embedding's lookup: output j of every record
        np.testing.assert_array_equal(qa.column(j), qa.dense()[j])


def test_integers_round_trip_and_unsupported_types_are_named():
    rng = np.random.default_rng(0)
    raw = random_blocks("Q6_K", 32, 256, rng)
    q, _ = split_blocks(raw.reshape(32, 1, -1), T.Q6_K)
    rec, hd, _ = moved([(raw, T.Q6_K)])
    np.testing.assert_array_equal(unpack_records(rec, "q6_k", 32), q.T)
    with pytest.raises(DipstreamError, match="Q2_K is not supported"):
        record_format(T.Q2_K)
    with pytest.raises(DipstreamError, match="must share a GGUF block type"):
        list(move_matrices([(raw, T.Q6_K), (random_blocks("Q4_K", 32, 256, rng), T.Q4_K)]))
