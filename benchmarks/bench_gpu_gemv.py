"""GPU: achieved bandwidth of the Triton gather-GEMV as a fraction of the dense GEMV's.

For Llama-3-8B layer shapes (d=4096, D=14336; random weights, bf16 and fp16) times

* dense: ``F.linear(x, W)`` (cuBLAS GEMV, batch 1) on W_gate|W_up stacked (28672 x 4096) and on
  W_down (4096 x 14336);
* sparse: ``gather_gemv_triton`` over k = density * n random (sorted) rows of the transposed
  layouts ([gate|up]^T, 4096 x 28672, and W_down^T, 14336 x 4096), densities 0.25 / 0.5 / 0.75;

and prints bytes moved / time for each and the ratio (target: >= 0.80 on H100-class GPUs).
It also times the whole DIP MLP (selection included) against the dense MLP.  Times are medians
of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).

Not run by the dipstream developers: their machines have no GPU.  Run it where one is:
    python benchmarks/bench_gpu_gemv.py [--dtypes bf16,fp16] [--configs]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

D_MODEL, D_FF = 4096, 14336
DENSITIES = (0.25, 0.5, 0.75)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CONFIGS = ({}, {"block_m": 128}, {"block_m": 512}, {"block_k": 32}, {"num_warps": 8},
           {"block_m": 512, "num_warps": 8})


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--configs", action="store_true",
                    help="also try a few kernel tile settings and report the best per case")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_gemv: needs a CUDA GPU (none found); nothing was measured")
        return 1
    from dipstream.budget import dip_split, keep_to_k
    from dipstream.kernels.sparse_mlp import SparseMLPWeights, sparse_mlp
    from dipstream.kernels.triton_gemv import gather_gemv_triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for dname in a.dtypes.split(","):
        dt = DTYPES[dname]
        W_gu = torch.randn(2 * D_FF, D_MODEL, generator=g, device="cuda").to(dt)  # [gate; up]
        W_dn = torch.randn(D_MODEL, D_FF, generator=g, device="cuda").to(dt)
        print(f"\n== {dname}: matrix, density, dense GB/s, gather GB/s, fraction of dense")
        for name, W in (("[gate|up]", W_gu), ("down", W_dn)):
            x = torch.randn(W.shape[1], generator=g, device="cuda").to(dt)
            t_dense = bench(lambda: F.linear(x, W))
            bw_dense = W.numel() * W.element_size() / t_dense
            Wt = W.t().contiguous()  # the row layout: one row per input index
            n, m = Wt.shape
            for dens in DENSITIES:
                k = int(dens * n)
                idx = torch.randperm(n, generator=g, device="cuda")[:k].sort().values
                c = torch.randn(k, generator=g, device="cuda")
                nbytes = k * m * Wt.element_size() + k * 12
                best = None
                for cfg in (CONFIGS if a.configs else ({},)):
                    t = bench(lambda cfg=cfg: gather_gemv_triton(Wt, idx, c, **cfg))
                    if best is None or t < best[0]:
                        best = (t, cfg)
                bw = nbytes / best[0]
                print(f"{name:>10} {dens:5.2f} {bw_dense / 1e9:9.0f} {bw / 1e9:9.0f} "
                      f"{bw / bw_dense:7.2f}  {best[1] or 'default tiles'}")
        # the whole DIP MLP, selection included, vs the dense MLP
        Wg, Wu = W_gu[:D_FF], W_gu[D_FF:]
        w = SparseMLPWeights(Wg, Wu, W_dn, device="cuda", dtype=dt)
        x = torch.randn(1, D_MODEL, generator=g, device="cuda").to(dt)
        t_dense = bench(lambda: F.linear(F.silu(F.linear(x, Wg)) * F.linear(x, Wu), W_dn))
        print(f"   whole MLP: dense {t_dense * 1e6:.0f} us")
        for dens in DENSITIES:
            up, down = dip_split(dens)
            k_in, k_out = keep_to_k(up, D_MODEL), keep_to_k(down, D_FF)
            t = bench(lambda: sparse_mlp(w, x, k_in, k_out))
            print(f"   DIP density {dens:.2f} (k_in {k_in}, k_out {k_out}): {t * 1e6:.0f} us, "
                  f"{t_dense / t:.2f}x vs dense")
    return 0


if __name__ == "__main__":
    sys.exit(main())
