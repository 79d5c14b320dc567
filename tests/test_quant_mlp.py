"""int8 / 4-bit sparse decode MLP: equal to the masked dense MLP on the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from dipstream.kernels.sparse_mlp import masked_dense_reference, sparse_mlp
from dipstream.kernels.quant import QuantizedSparseMLPWeights, quantize_rows
from tests.test_sparse_mlp import BACKENDS, _kernel_or_skip, assert_close_y, hidden, make_mlp


def test_quantize_rows_hand_worked():
    # one row, one group of 4: max |w| = 1.4 -> 4-bit scale 0.2, q = round(w / 0.2) + 8
    w = torch.tensor([[0.2, -1.4, 0.5, 0.0]])
    q4 = quantize_rows(w, 4, 4)
    assert q4.scales.flatten().tolist() == pytest.approx([0.2])
    # nibbles: q = [9, 1, 10 (0.5/0.2 = 2.5 rounds to even 2 -> 10), 8]; byte j = q[j] | q[j+2] << 4
    assert q4.q.tolist() == [[9 | (10 << 4), 1 | (8 << 4)]]
    torch.testing.assert_close(q4.dequantize(), torch.tensor([[0.2, -1.4, 0.4, 0.0]]))
    q8 = quantize_rows(w, 8, 2)  # groups [0.2, -1.4] and [0.5, 0.0]
    assert q8.scales[0].tolist() == pytest.approx([1.4 / 127, 0.5 / 127])
    assert q8.q.tolist() == [[18, -127, 127, 0]]
    zero = quantize_rows(torch.zeros(2, 4), 4, 4)  # all-zero groups: scale 0, dequantized 0
    assert torch.equal(zero.dequantize(), torch.zeros(2, 4))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_error_bounded(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 96, generator=g)
    q = quantize_rows(w, bits, 32)
    err = (q.dequantize() - w).abs().view(50, 3, 32)
    assert (err <= q.scales.unsqueeze(-1) / 2 + 1e-6).all()  # round to nearest level


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d,D,group", [(32, 48, 16), (64, 96, None), (576, 1536, None),
                                       (128, 4096, 64)])
def test_matches_dequantized_masked_dense(d, D, group, bits, backend):
    if group is None and bits == 4 and D % 32:
        pytest.skip("default 4-bit group does not divide D")
    Wg, Wu, Wd, x = make_mlp(d, D, seed=d * 7 + bits)
    w = QuantizedSparseMLPWeights(Wg, Wu, Wd, bits=bits, group=group)
    G, U, Dn = w.dense_weights()
    for fin, fout in [(0.25, 0.25), (0.5, 0.35), (1.0, 1.0), (0.1, 0.9), (0.0, 0.5), (0.5, 0.0)]:
        k_in, k_out = int(fin * d), int(fout * D)
        y, s_in, s_out = sparse_mlp(w, x, k_in, k_out, "silu", return_indices=True,
                                    backend=backend)
        y_ref, r_in, r_out = masked_dense_reference(G, U, Dn, x, k_in, k_out, "silu",
                                                    return_indices=True)
        assert torch.equal(s_in, r_in) and torch.equal(s_out, r_out), (fin, fout)
        if k_in == 0 or k_out == 0:
            assert torch.equal(y, torch.zeros(d))
        assert_close_y(y, y_ref, Dn, hidden(G, U, x, r_in, "silu"), r_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_reads_only_selected_rows(bits, backend):
    d, D = 96, 320
    Wg, Wu, Wd, x = make_mlp(d, D, seed=5)
    w = QuantizedSparseMLPWeights(Wg, Wu, Wd, bits=bits)
    k_in, k_out = 30, 100
    y, s_in, s_out = sparse_mlp(w, x, k_in, k_out, "gelu_tanh", return_indices=True,
                                backend=backend)
    keep_in = torch.zeros(d, dtype=torch.bool)
    keep_in[s_in] = True
    keep_out = torch.zeros(D, dtype=torch.bool)
    keep_out[s_out] = True
    w.rows_in.scales[~keep_in] = float("nan")  # a read of an unselected row would spread NaN
    w.rows_out.scales[~keep_out] = float("nan")
    y2 = sparse_mlp(w, x, k_in, k_out, "gelu_tanh", backend=backend)
    assert torch.isfinite(y2).all() and torch.equal(y2, y)


def test_quantized_weights_accounting_and_errors():
    d, D = 64, 96
    Wg, Wu, Wd, _ = make_mlp(d, D)
    w8 = QuantizedSparseMLPWeights(Wg, Wu, Wd, bits=8)
    assert w8.rows_in.scales.shape == (d, 2) and w8.rows_out.scales.shape == (D, 1)
    assert w8.bytes_read(10, 20) == 10 * (2 * D + 2 * 4) + 20 * (d + 4)
    w4 = QuantizedSparseMLPWeights(Wg, Wu, Wd, bits=4)
    assert w4.rows_in.q.shape == (d, D) and w4.rows_in.scales.shape == (d, 2 * D // 32)
    assert w4.nbytes < w8.nbytes < 3 * d * D * 4 / 3
    with pytest.raises(ValueError, match="divide"):
        QuantizedSparseMLPWeights(Wg, Wu, Wd, bits=4, group=40)
    with pytest.raises(ValueError, match="bits"):
        QuantizedSparseMLPWeights(Wg, Wu, Wd, bits=3)


def test_quantized_threaded_large():
    """Large enough for the thread pool's column chunks x row blocks (4-bit chunks stay group-
    aligned)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        Wg, Wu, Wd, x = make_mlp(512, 8192, seed=3)
        for bits in (8, 4):
            w = QuantizedSparseMLPWeights(Wg, Wu, Wd, bits=bits)
            y = sparse_mlp(w, x, 400, 5000)
            y_t = sparse_mlp(w, x, 400, 5000, backend="torch")
            torch.testing.assert_close(y, y_t, rtol=1e-4, atol=1e-4)
            assert torch.equal(sparse_mlp(w, x, 400, 5000), y)  # fixed summation order
    finally:
        torch.set_num_threads(old)


def test_quantized_4bit_threaded_group_not_dividing_16():
    """4-bit rows longer than one column chunk (8192) with a group size that neither divides 16
    nor is a multiple of it: the threaded kernel's column chunks must start on group bounds."""
    _kernel_or_skip()
    d, D, G = 80, 8200, 10
    Wg, Wu, Wd, x = make_mlp(d, D, seed=11)
    w = QuantizedSparseMLPWeights(Wg, Wu, Wd, bits=4, group=G)
    y = sparse_mlp(w, x, d, 4000, backend="native", num_threads=2)
    y_t = sparse_mlp(w, x, d, 4000, backend="torch")
    torch.testing.assert_close(y, y_t, rtol=1e-4, atol=1e-4)
