"""int8 and 4-bit weights for the sparse decode MLP (same row layout as SparseMLPWeights).

Each row of the layout (one selected unit) is quantized symmetrically in groups of ``G``
consecutive columns, one float32 scale per (row, group):

* int8: ``q = round(w / s)`` in [-127, 127], ``s = max|w| / 127``; dequantized ``w' = s q``.
* 4-bit: ``q = round(w / s) + 8`` in [1, 15], ``s = max|w| / 7``; ``w' = s (q - 8)``.  In each
  group, byte j (j < G/2) holds column j in its low nibble and column j + G/2 in its high nibble
  (so the kernel's inner loop is two contiguous runs of G/2 columns).

Default groups: int8 one scale per row and matrix (G = D for the [gate | up] rows, so gate and
up get separate scales, G = d for the W_down^T rows); 4-bit G = 32.  The fused kernel multiplies
each selected row's coefficient by its group scale and streams the small integers, so the
result equals the masked dense computation on the dequantized weights up to float rounding.
"""

from __future__ import annotations

import threading

import torch

from dipstream.kernels.sparse_mlp import SparseMLPWeights

__all__ = ["QuantRows", "QuantizedSparseMLPWeights", "quantize_rows"]

BITS = (8, 4)


class QuantRows:
    """A quantized (rows, m) row matrix: ``q`` (int8 (rows, m) or uint8 (rows, m/2) nibbles),
    ``scales`` float32 (rows, m / G)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bits: int, group: int, m: int):
        self.q, self.scales, self.bits, self.group, self.m = q, scales, int(bits), int(group), int(m)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.m)

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scales.numel() * 4

    def row_bytes(self) -> int:
        """Bytes one row costs to read (integers + its scales)."""
        return self.nbytes // max(1, self.q.shape[0])

    def dequantize(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """float32 rows (all, or the rows ``idx``)."""
        q = self.q if idx is None else self.q.index_select(0, idx)
        s = self.scales if idx is None else self.scales.index_select(0, idx)
        n, G = q.shape[0], self.group
        if self.bits == 8:
            v = q.to(torch.float32).view(n, self.m // G, G)
        else:
            b = q.view(n, self.m // G, G // 2).to(torch.int16)
            v = torch.cat([(b & 15) - 8, (b >> 4) - 8], dim=-1).to(torch.float32)
        return (v * s.unsqueeze(-1)).reshape(n, self.m)

    def native_args(self) -> tuple:
        """(W, ldb, S, lds, G, bits, m) as the C kernel takes them."""
        return (self.q.data_ptr(), self.q.stride(0) * self.q.element_size(),
                self.scales.data_ptr(), self.scales.stride(0), self.group, self.bits, self.m)


def quantize_rows(rows: torch.Tensor, bits: int, group: int) -> QuantRows:
    """Quantize a float (n, m) row matrix in groups of ``group`` columns (see module doc)."""
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    n, m = rows.shape
    if group < 2 or m % group or (bits == 4 and group % 2):
        raise ValueError(f"group size {group} must divide the row length {m}"
                         + (" and be even" if bits == 4 else ""))
    w = rows.detach().to(torch.float32).reshape(n, m // group, group)
    qmax = 127.0 if bits == 8 else 7.0
    amax = w.abs().amax(-1)
    scales = (amax / qmax).contiguous()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(w / safe.unsqueeze(-1)).clamp_(-qmax, qmax)
    if bits == 8:
        return QuantRows(q.to(torch.int8).reshape(n, m).contiguous(), scales, 8, group, m)
    u = (q + 8).to(torch.uint8)
    h = group // 2
    packed = (u[..., :h] | (u[..., h:] << 4)).reshape(n, m // 2).contiguous()
    return QuantRows(packed, scales, 4, group, m)


class QuantizedSparseMLPWeights:
    """:class:`SparseMLPWeights` with int8 (``bits=8``) or 4-bit (``bits=4``) rows.

    ``group``: columns per scale (default: int8 one scale per row and matrix, 4-bit 32); it must
    divide d and D.  Use with :func:`dipstream.kernels.sparse_mlp`; ``dense_weights()`` gives
    the dequantized (W_gate, W_up, W_down) that results are exact against.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
                 bits: int = 8, group: int | None = None):
        if bits not in BITS:
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        f = SparseMLPWeights(w_gate, w_up, w_down, huge_pages=False)
        self.d, self.D, self.bits = f.d, f.D, int(bits)
        if group is None:
            g_in, g_out = (self.D, self.d) if bits == 8 else (32, 32)
        else:
            g_in = g_out = int(group)
        if self.D % g_in or self.d % g_out:
            raise ValueError(f"group size {group or g_in} must divide d={self.d} and D={self.D}; "
                             f"pass group= a common divisor (even for 4-bit)")
        self.rows_in = quantize_rows(f.gate_up_t, bits, g_in)
        self.rows_out = quantize_rows(f.down_t, bits, g_out)
        self._scratch = threading.local()

    _buffers = SparseMLPWeights._buffers

    @classmethod
    def from_linears(cls, gate_proj, up_proj, down_proj, **kw) -> "QuantizedSparseMLPWeights":
        for lin in (gate_proj, up_proj, down_proj):
            if getattr(lin, "bias", None) is not None:
                raise ValueError("biased projections are not supported")
        return cls(gate_proj.weight, up_proj.weight, down_proj.weight, **kw)

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized (W_gate (D, d), W_up (D, d), W_down (d, D)), float32 copies."""
        gu = self.rows_in.dequantize()
        return gu[:, :self.D].t().contiguous(), gu[:, self.D:].t().contiguous(), \
            self.rows_out.dequantize().t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.rows_in.nbytes + self.rows_out.nbytes

    def bytes_read(self, k_in: int, k_out: int) -> int:
        """Weight bytes (integers and scales) one token reads at these k."""
        return min(k_in, self.d) * self.rows_in.row_bytes() + \
            min(k_out, self.D) * self.rows_out.row_bytes()

    def __repr__(self) -> str:
        return (f"QuantizedSparseMLPWeights(d={self.d}, D={self.D}, int{self.bits}, "
                f"{self.nbytes / 2**20:.1f} MiB)")
