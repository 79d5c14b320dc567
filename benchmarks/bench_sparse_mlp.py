"""Sparse (DIP) gated MLP vs dense, batch-1 decode, random fp32 weights.

For SmolLM2-135M (d=576, D=1536) and Llama-3-8B (d=4096, D=14336) layer shapes, times
dipstream.kernels.sparse_mlp (fused kernel reading only the selected weight rows, including
both top-k selections) against the dense MLP (three F.linear calls, batch 1) at weight-read
densities 0.25/0.5/0.75, with the uniform split (up_keep = down_keep = density) and DIP's split.
Every round runs each variant once (interleaved, fresh random x per round); medians are reported.
Target: >= 1.7x faster than dense at density 0.5 on the 8B shapes.
``--dtypes float32,int8,int4`` adds the engine's quantized records (dipstream.engine.qmatrix,
grouped along the inputs as GGUF's Q8_0 / Q4_1; DIP split only), still timed against the float32
dense MLP; their "GB/s" counts the record bytes they stream (integers; headers stay in cache).

Usage: python benchmarks/bench_sparse_mlp.py [--shapes smollm2,llama3-8b] [--rounds N]
                                             [--no-gather] [--dense-hugepages] [--sparse-threads N]
                                             [--dtypes float32,int8,int4]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dipstream.budget import dip_split, keep_to_k
from dipstream.kernels.sparse_mlp import SparseMLPWeights, _alloc, native_status, sparse_mlp

SHAPES = {"smollm2": (576, 1536, 300), "llama3-8b": (4096, 14336, 15)}  # d, D, default rounds
DENSITIES = (0.25, 0.5, 0.75)
TARGET = ("llama3-8b", 0.5, 1.7)


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def _engine_records(Wg, Wu, Wd, fmt: str):
    """The engine's records of one MLP in `fmt`: [gate | up] per input, down per hidden unit."""
    from dipstream.engine.qmatrix import QMatrix

    return (QMatrix.from_dense(torch.cat([Wg, Wu]).numpy(), fmt), QMatrix.from_dense(Wd.numpy(), fmt))


def _engine_dip(q_in, q_out, x, k_in: int, k_out: int, threads: int):
    """One token's DIP MLP on the engine's records (the native select-GEMV both times)."""
    import numpy as np

    D = q_out.rows
    idx, coef = np.empty(max(q_in.rows, D), np.int64), np.empty(max(q_in.rows, D), np.float32)
    gu, y = np.empty(2 * D, np.float32), np.empty(q_out.m, np.float32)
    q_in.select(x, k_in, idx, coef, gu, threads)
    h = (gu[:D] / (1 + np.exp(-gu[:D])) * gu[D:]).astype(np.float32)
    q_out.select(h, k_out, idx, coef, y, threads)
    return y


def bench_shape(name: str, d: int, D: int, rounds: int, gather: bool, dense_hp: bool,
                sparse_threads: int | None = None, dtypes=("float32",)):
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    if dense_hp:  # dense weights on 2 MiB-aligned, THP-advised memory like the sparse layout
        Wg, Wu, Wd = _alloc(D, d, True), _alloc(D, d, True), _alloc(d, D, True)
        for w in (Wg, Wu, Wd):
            w.normal_(0, d ** -0.5, generator=g)
    else:
        Wg = torch.randn(D, d, generator=g) * d ** -0.5
        Wu = torch.randn(D, d, generator=g) * d ** -0.5
        Wd = torch.randn(d, D, generator=g) * D ** -0.5
    t1 = time.perf_counter()
    w = SparseMLPWeights(Wg, Wu, Wd)
    quant = {dt: _engine_records(Wg, Wu, Wd, dt) for dt in dtypes if dt != "float32"}
    t2 = time.perf_counter()
    xs = [torch.randn(1, d, generator=g) for _ in range(8)]
    dense_bytes = 3 * d * D * 4
    print(f"\n== {name}: d={d} D={D}, dense weights {dense_bytes / 2**20:.1f} MiB; "
          f"random init {t1 - t0:.1f} s, layout build {t2 - t1:.2f} s, {rounds} rounds")

    state = {"x": xs[0]}

    def dense():
        x = state["x"]
        return F.linear(F.silu(F.linear(x, Wg)) * F.linear(x, Wu), Wd)

    variants = {"dense": (dense, dense_bytes, None)}
    for split in ("uniform", "dip"):
        for dens in DENSITIES:
            up, down = (dens, dens) if split == "uniform" else dip_split(dens)
            k_in, k_out = keep_to_k(up, d), keep_to_k(down, D)

            def f(k_in=k_in, k_out=k_out):
                return sparse_mlp(w, state["x"], k_in, k_out, "silu", num_threads=sparse_threads)
            variants[(split, dens)] = (f, w.bytes_read(k_in, k_out), (k_in, k_out))
    for dt, (q_in, q_out) in quant.items():
        for dens in DENSITIES:
            up, down = dip_split(dens)
            k_in, k_out = keep_to_k(up, d), keep_to_k(down, D)

            def f(k_in=k_in, k_out=k_out, q_in=q_in, q_out=q_out):
                return _engine_dip(q_in, q_out, state["x"][0].numpy(), k_in, k_out,
                                   sparse_threads or torch.get_num_threads())
            variants[(f"dip {dt}", dens)] = (f, k_in * q_in.stride + k_out * q_out.stride, (k_in, k_out))
    if gather:  # what torch indexing gives: gather (copy) the selected columns, then multiply
        k_in, k_out = keep_to_k(0.5, d), keep_to_k(0.5, D)

        def gathered():
            x = state["x"][0]
            s_in = x.abs().topk(k_in).indices
            xs_ = x[s_in]
            h = (F.silu(F.linear(xs_, Wg.index_select(1, s_in)))
                 * F.linear(xs_, Wu.index_select(1, s_in)))
            s_out = h.abs().topk(k_out).indices
            return F.linear(h[s_out], Wd.index_select(1, s_out))
        variants["gather"] = (gathered, w.bytes_read(k_in, k_out), (k_in, k_out))

    for f, _, _ in variants.values():  # warm-up (page faults, kernel build, thread pool)
        f()
    times = {k: [] for k in variants}
    for r in range(rounds):
        state["x"] = xs[r % len(xs)]
        keys = list(variants)
        keys = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate the order every round
        for k in keys:
            times[k].append(_timed(variants[k][0]))
    med = {k: statistics.median(v) for k, v in times.items()}
    t_dense = med["dense"]
    print(f"{'variant':22s} {'k_in':>5s} {'k_out':>6s} {'read':>5s} {'time ms':>8s} "
          f"{'speed-up':>8s} {'GB/s':>6s}")
    print(f"{'dense (F.linear x3)':22s} {d:5d} {D:6d} {1.0:5.2f} {t_dense * 1e3:8.3f} "
          f"{1.0:7.2f}x {dense_bytes / t_dense / 1e9:6.1f}")
    result = {}
    for k, (_, nbytes, ks) in variants.items():
        if k == "dense":
            continue
        if k == "gather":
            label = "torch index_select 0.5"
        elif k[0] in ("uniform", "dip"):  # float32 layout, split
            label = f"sparse {k[0]:7s} {k[1]:.2f}"
        else:  # quantized, DIP split
            label = f"{k[0]} {k[1]:.2f}"
        sp = t_dense / med[k]
        result[k] = sp
        print(f"{label:22s} {ks[0]:5d} {ks[1]:6d} {nbytes / dense_bytes:5.2f} "
              f"{med[k] * 1e3:8.3f} {sp:7.2f}x {nbytes / med[k] / 1e9:6.1f}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=0, help="override the per-shape round count")
    ap.add_argument("--no-gather", action="store_true", help="skip the torch-gather baseline")
    ap.add_argument("--dense-hugepages", action="store_true",
                    help="put the dense weights on huge-page-advised memory too")
    ap.add_argument("--dtypes", default="float32",
                    help="comma-separated weight formats for the sparse MLP: float32,int8,int4")
    ap.add_argument("--sparse-threads", type=int, default=None,
                    help="kernel threads (default: torch.get_num_threads(), as dense uses)")
    a = ap.parse_args(argv)
    st = native_status()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; sparse kernel threads "
          f"{a.sparse_threads or torch.get_num_threads()}; kernel: "
          + (f"native C ({' '.join(st['flags'])}), caller-runs thread pool" if st["available"]
             else f"torch fallback ({st['reason']})"))
    out = {}
    for name in a.shapes.split(","):
        d, D, rounds = SHAPES[name]
        out[name] = bench_shape(name, d, D, a.rounds or rounds, not a.no_gather, a.dense_hugepages,
                                a.sparse_threads, tuple(a.dtypes.split(",")))
    tname, tdens, tgoal = TARGET
    if tname in out:
        for split in ("uniform", "dip"):
            sp = out[tname][(split, tdens)]
            print(f"target {tname} density {tdens} ({split} split): {sp:.2f}x vs goal {tgoal}x "
                  f"-> {'MET' if sp >= tgoal else 'MISSED'}")


if __name__ == "__main__":
    main()
