"""Correctness checks of the Triton gather-GEMV, shared by the interpreter test (run as
``TRITON_INTERPRET=1 python -m tests.gpu.triton_checks`` on CPU tensors) and the real-GPU tests.

Every check compares against a float64 reference of the same (already bf16/fp16-rounded)
weights, so the only allowed difference is float32 accumulation order.
"""

from __future__ import annotations

import sys

import torch

from dipstream.kernels.sparse_mlp import SparseMLPWeights, sparse_mlp
from dipstream.kernels.sparse_mlp import activation
from dipstream.kernels.triton_gemv import gather_gemv_triton

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ref(W, idx, c):
    return (c.double() @ W.double()[idx]).float()


def _close(a, b, what):
    a, b = a.cpu(), b.cpu()
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=what)


def check_gather_gemv(device, n=300, m=1000, shapes_extra=((37, 70),)):
    """Unsorted and repeated indices, k = 0 / 1 / not a multiple of the block / all rows,
    column counts not a multiple of the tile, several split and block settings, strided rows."""
    g = torch.Generator().manual_seed(0)
    count = 0
    for dt in DTYPES:
        for rows, cols in ((n, m), *shapes_extra):
            W = torch.randn(rows, cols, generator=g).to(dt).to(device)
            for k in (0, 1, 17, rows):
                idx = torch.randint(0, rows, (k,), generator=g)
                if k == rows:
                    idx = torch.randperm(rows, generator=g)
                c = torch.randn(k, generator=g)
                for kw in ({}, {"splits": 3, "block_k": 8, "block_m": 64},
                           {"splits": 1, "block_m": 128}):
                    out = gather_gemv_triton(W, idx.to(device), c.to(device), **kw)
                    assert out.dtype == torch.float32 and out.shape == (cols,)
                    _close(out, _ref(W.cpu(), idx, c), f"{dt} k={k} {kw}")
                    count += 1
        # rows with a stride larger than the width: a column slice of a wider matrix
        big = torch.randn(n, m + 64, generator=g).to(dt).to(device)
        view = big[:, 32:32 + m]
        idx = torch.randperm(n, generator=g)[:50]
        c = torch.randn(50, generator=g)
        _close(gather_gemv_triton(view, idx.to(device), c.to(device), splits=2),
               _ref(view.cpu(), idx, c), f"{dt} strided")
        count += 1
    return count


def check_nan_poison(device):
    """Only the selected rows may be read: NaN everywhere else leaves the result unchanged."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(200, 300, generator=g).to(torch.bfloat16)
    idx = torch.randperm(200, generator=g)[:60]
    c = torch.randn(60, generator=g)
    clean = gather_gemv_triton(W.to(device), idx.to(device), c.to(device), splits=4)
    keep = torch.zeros(200, dtype=torch.bool)
    keep[idx] = True
    Wp = W.clone()
    Wp[~keep] = float("nan")
    poisoned = gather_gemv_triton(Wp.to(device), idx.to(device), c.to(device), splits=4)
    assert torch.isfinite(poisoned).all()
    assert torch.equal(poisoned.cpu(), clean.cpu())
    return 1


def check_sparse_mlp(device, d=64, D=160, acts=("silu", "gelu_tanh")):
    """The DIP MLP through backend='triton' equals the masked dense MLP on the same (rounded)
    weights with the indices it chose, and those indices are a valid top-k."""
    g = torch.Generator().manual_seed(2)
    count = 0
    for dt in DTYPES:
        Wg = (torch.randn(D, d, generator=g) * d ** -0.5).to(dt)
        Wu = (torch.randn(D, d, generator=g) * d ** -0.5).to(dt)
        Wd = (torch.randn(d, D, generator=g) * D ** -0.5).to(dt)
        w = SparseMLPWeights(Wg, Wu, Wd, device=device, dtype=dt)
        Wg32, Wu32, Wd32 = Wg.float(), Wu.float(), Wd.float()
        x = torch.randn(d, generator=g)
        for act in acts:
            for k_in, k_out in ((d // 2, D // 3), (d, D), (0, 5), (7, 0), (1, 1)):
                y, s_in, s_out = sparse_mlp(w, x.to(device), k_in, k_out, act,
                                            return_indices=True, backend="triton")
                s_in, s_out, y = s_in.cpu(), s_out.cpu(), y.cpu()
                assert s_in.numel() == min(k_in, d) and s_out.numel() == min(k_out, D)
                assert torch.equal(s_in, s_in.sort().values)
                xm = torch.zeros(d)
                xm[s_in] = x[s_in]
                h = activation(xm.double() @ Wg32.double().T, act).float() * \
                    (xm.double() @ Wu32.double().T).float()
                if 0 < s_in.numel() < d:  # selected |x| dominate the rest
                    rest = torch.ones(d, dtype=torch.bool)
                    rest[s_in] = False
                    assert x[s_in].abs().min() >= x[rest].abs().max()
                hm = torch.zeros(D)
                hm[s_out] = h[s_out]
                y_ref = (hm.double() @ Wd32.double().T).float()
                scale = float((hm.abs() @ Wd32.abs().T).max()) if s_out.numel() else 0.0
                torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * scale + 1e-30)
                if k_in == 0 or k_out == 0:
                    assert torch.equal(y, torch.zeros(d))
                count += 1
    return count


def main() -> int:
    n = check_gather_gemv("cpu") + check_nan_poison("cpu") + check_sparse_mlp("cpu")
    print(f"triton interpreter checks passed: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
