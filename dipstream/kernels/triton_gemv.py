"""Sparse decode MLP on a GPU: a Triton gather-GEMV over the rows a mask selects (bf16/fp16/fp32).

Same layout as the CPU kernel (:class:`~dipstream.runtime.SparseMLPWeights` built with
``device="cuda"``): every selected unit is one contiguous row, so the kernel streams exactly the
selected rows once.  Grid: (column tiles of ``block_m``) x (``splits`` blocks of selected rows);
each program accumulates ``block_k`` rows at a time in float32 and writes one partial row,
and the partials are summed in a fixed order (deterministic, no atomics).  Selection is
:func:`~dipstream.selection.topk_indices` on the device (the CPU kernel's rule: ties to the
lower index; ascending indices).

Status: checked for correctness with Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors)
in the test suite.  The development machine has no GPU, so the real-GPU tests and
``benchmarks/bench_gpu_gemv.py`` (achieved bandwidth vs the dense GEMV) have not been run by us.
"""

from __future__ import annotations

import os

import torch

from dipstream.selection import topk_indices

__all__ = ["available", "gather_gemv_triton", "sparse_mlp_triton"]

try:  # triton is an optional dependency (pip install dipstream[gpu])
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


def available() -> bool:
    """Triton is importable and there is a device to run it on (CUDA, or the interpreter)."""
    return triton is not None and (torch.cuda.is_available()
                                   or os.environ.get("TRITON_INTERPRET", "0") == "1")


if triton is not None:
    @triton.jit
    def _gather_gemv_kernel(W, stride_w, IDX, C, k, PART, m, k_per,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cmask = cols < m
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        start = pid_k * k_per
        stop = tl.minimum(start + k_per, k)
        for r0 in range(start, stop, BLOCK_K):
            r = r0 + tl.arange(0, BLOCK_K)
            rmask = r < stop
            rows = tl.load(IDX + r, mask=rmask, other=0).to(tl.int64)
            c = tl.load(C + r, mask=rmask, other=0.0).to(tl.float32)
            w = tl.load(W + rows[:, None] * stride_w + cols[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0.0,
                        eviction_policy="evict_first")
            acc += w.to(tl.float32) * c[:, None]
        tl.store(PART + pid_k * m + cols, tl.sum(acc, axis=0), mask=cmask)


def _default_splits(n_col: int, k: int, block_k: int, device: torch.device) -> int:
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: few programs
        target = 4
    return max(1, min(-(-target // n_col), -(-k // block_k)))


def gather_gemv_triton(Wt: torch.Tensor, idx: torch.Tensor, coeffs: torch.Tensor, *,
                       block_m: int | None = None, block_k: int = 16, splits: int | None = None,
                       num_warps: int = 4) -> torch.Tensor:
    """``sum_i coeffs[i] * Wt[idx[i], :]`` (float32 result of shape (m,)) reading only rows idx.

    ``Wt`` (n, m) with contiguous rows (any row stride), float32/bf16/fp16, on CUDA (or CPU
    under ``TRITON_INTERPRET=1``).  ``splits``: blocks of selected rows (default: about 8
    programs per SM in total); ``block_m`` columns per program (default 256 for 16-bit weights).
    """
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'dipstream[gpu]')")
    if Wt.dim() != 2 or (Wt.stride(1) != 1 and Wt.shape[1] > 1):
        raise ValueError("Wt must be 2-D with contiguous rows (Wt.stride(1) == 1)")
    n, m = Wt.shape
    idx = idx.reshape(-1).to(device=Wt.device, dtype=torch.int64).contiguous()
    coeffs = coeffs.reshape(-1).to(device=Wt.device, dtype=torch.float32).contiguous()
    if idx.numel() != coeffs.numel():
        raise ValueError(f"idx has {idx.numel()} entries but coeffs has {coeffs.numel()}")
    k = idx.numel()
    if k == 0 or m == 0:
        return torch.zeros(m, dtype=torch.float32, device=Wt.device)
    block_m = block_m or (256 if Wt.element_size() <= 2 else 128)
    n_col = triton.cdiv(m, block_m)
    splits = splits or _default_splits(n_col, k, block_k, Wt.device)
    k_per = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per)
    part = torch.empty(splits, m, dtype=torch.float32, device=Wt.device)
    _gather_gemv_kernel[(n_col, splits)](Wt, Wt.stride(0), idx, coeffs, k, part, m, k_per,
                                         BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps)
    return part[0] if splits == 1 else part.sum(0)


def sparse_mlp_triton(weights, x: torch.Tensor, k_in: int, k_out: int, act_fn, **kernel_kw):
    """One token of the DIP MLP with the Triton gather-GEMV; returns (y float32 (d,), S_in,
    S_out).  ``weights``: a SparseMLPWeights (any float dtype, on the kernel's device);
    ``act_fn``: the activation as a torch function (applied in float32)."""
    xv = x.reshape(-1)
    s_in = topk_indices(xv.abs(), k_in)
    gu = gather_gemv_triton(weights.gate_up_t, s_in, xv.index_select(0, s_in), **kernel_kw)
    D = weights.D
    h = act_fn(gu[:D]) * gu[D:]
    s_out = topk_indices(h.abs(), k_out)
    y = gather_gemv_triton(weights.down_t, s_out, h.index_select(0, s_out), **kernel_kw)
    return y, s_in, s_out
