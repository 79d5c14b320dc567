"""Triton gather-GEMV: interpreter checks on CPU (where triton is installed) and real-GPU checks
(skipped without CUDA; this project's CI and development machine have no GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_interpreter_checks():
    """The kernel's indexing, masking, split-K and the DIP MLP around it, run by Triton's
    interpreter on CPU tensors (a separate process: the interpreter is chosen at import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "tests.gpu.triton_checks"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "checks passed" in r.stdout


@cuda
def test_gpu_small_checks():
    from tests.gpu import triton_checks as tc

    assert tc.check_gather_gemv("cuda") > 0
    assert tc.check_nan_poison("cuda") == 1
    assert tc.check_sparse_mlp("cuda", d=256, D=1024) > 0


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama3_8b_shapes(dtype):
    """Real Llama-3-8B layer shapes: [gate | up]^T rows (4096 x 28672) and W_down^T rows
    (14336 x 4096), densities 0.25 / 0.5 / 0.75 of the rows."""
    from dipstream.kernels.triton_gemv import gather_gemv_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    for n, m in ((4096, 2 * 14336), (14336, 4096)):
        W = torch.randn(n, m, generator=g, device="cuda").to(dtype)
        for dens in (0.25, 0.5, 0.75):
            k = int(dens * n)
            idx = torch.randperm(n, generator=g, device="cuda")[:k].sort().values
            c = torch.randn(k, generator=g, device="cuda")
            out = gather_gemv_triton(W, idx, c)
            ref = (c.double() @ W.double()[idx]).float()
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max()))


@cuda
def test_gpu_auto_dispatch():
    """CUDA weights take the Triton path automatically (backend='auto')."""
    from dipstream.kernels.sparse_mlp import SparseMLPWeights, sparse_mlp

    d, D = 512, 1536
    Wg, Wu, Wd = (torch.randn(D, d) * d ** -0.5, torch.randn(D, d) * d ** -0.5,
                  torch.randn(d, D) * D ** -0.5)
    w = SparseMLPWeights(Wg, Wu, Wd, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(d, device="cuda")
    y, s_in, s_out = sparse_mlp(w, x, 256, 500, return_indices=True)
    y2, t_in, t_out = sparse_mlp(w, x, 256, 500, return_indices=True, backend="triton")
    assert y.is_cuda and torch.equal(s_in, t_in) and torch.equal(s_out, t_out)
    torch.testing.assert_close(y, y2)
