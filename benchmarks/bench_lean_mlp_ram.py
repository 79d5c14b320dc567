"""Where DIP's time goes in the lean engine in RAM (why DIP d 0.5 is no faster than dense there).

On an exported lean-engine model (default: SmolLM2-135M, int4, int8 activations, 1 thread), in one
run, medians over rounds:
1. each MLP hook of every layer in turn (30 layers: the records stay in a large L3 cache), dense
   vs DIP's k (k_in, k_out of DIP at --density): the products alone;
2. the native top-k alone, per call (ctypes call included);
3. in-RAM decodes, dense vs DIP: ms per token, the MLP's ms per token, and the share of the
   token spent in Python (outside the native calls) under cProfile.

Usage: python benchmarks/bench_lean_mlp_ram.py [--model-dir DIR] [--density 0.5] [--rounds 15]
(DIR: `dipstream export --model smollm2-135m --weights int4`'s folder, the default below).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from pathlib import Path

import numpy as np

from dipstream.budget import layer_keeps
from dipstream.engine.mlp import MaskChooser, RamMLP
from dipstream.engine.model import LeanModel
from dipstream.engine.qmatrix import engine_lib

DEFAULT_DIR = Path.home() / ".cache/dipstream/engine/smollm2-135m-int4-int8-2"


def _median_ms(fn, rounds: int, inner: int = 1) -> float:
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t) / inner)
    return statistics.median(ts) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(DEFAULT_DIR))
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=60, help="decoded tokens per decode measurement")
    a = ap.parse_args()
    m = LeanModel(Path(a.model_dir), a.tokens + 8, 1, activations="int8")
    keeps = layer_keeps(a.density, m.L)
    k_in = [keeps.k_in(i, m.d) for i in range(m.L)]
    k_out = [keeps.k_out(i, m.D) for i in range(m.L)]
    rng = np.random.default_rng(0)

    print(f"model {a.model_dir}: {m.L} layers, d {m.d}, D {m.D}; DIP density {a.density}: k_in {k_in[0]}, "
          f"k_out {k_out[0]}")
    mlp = RamMLP(m, MaskChooser("dip", k_in, k_out))
    print("\n1. the products of one hook of every layer in turn (records in L3), ms for all layers")
    for kind, n, ks in (("in", m.d, k_in), ("out", m.D, k_out)):
        vs = [rng.standard_normal(n).astype(np.float32) for _ in range(m.L)]
        idx, coef, out = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(mlp.w[kind][0].m, np.float32)
        sel = [q.selector(idx, coef, out) for q in mlp.w[kind]]
        dense = _median_ms(lambda: [sel[i](vs[i], n, 1) for i in range(m.L)], a.rounds)
        dip = _median_ms(lambda: [sel[i](vs[i], ks[i], 1) for i in range(m.L)], a.rounds)
        print(f"   {kind:>3} hook: dense {dense:.3f} ms, DIP {dip:.3f} ms ({dip / dense:.2f}x)")

    print("\n2. the native top-k alone, us per call")
    lib = engine_lib()
    for n, k in ((m.d, k_in[0]), (m.D, k_out[0])):
        v = rng.standard_normal(n).astype(np.float32)
        out = np.empty(n, np.int64)
        pv, po = v.ctypes.data, out.ctypes.data
        us = _median_ms(lambda: lib.ds_topk_abs(pv, n, k, po), a.rounds, inner=2000) * 1e3
        print(f"   {k} of {n}: {us:.2f} us")

    print("\n3. in-RAM decodes (token ids pos % 97 + 3)")
    for method in ("dense", "dip"):
        m.mlp = RamMLP(m, MaskChooser(method, k_in, k_out))
        m.new_sequence()
        ts = []
        for pos in range(a.tokens):
            t = time.perf_counter()
            m.forward(pos % 97 + 3, pos)
            ts.append(time.perf_counter() - t)
        c = m.mlp.counters
        m.new_sequence()
        prof = cProfile.Profile()
        prof.enable()
        for pos in range(a.tokens):
            m.forward(pos % 97 + 3, pos)
        prof.disable()
        st = pstats.Stats(prof)
        calls = {("qmatrix.py", "run"), ("model.py", "attention_block"), ("mlp.py", "block")}  # native inside
        native = sum(v[2] for f, v in st.stats.items() if (f[0].rsplit("/", 1)[-1], f[2]) in calls)
        print(f"   {method:>5}: {statistics.median(ts[5:]) * 1e3:.2f} ms/token, MLP {c.mlp_s / c.tokens * 1e3:.2f} "
              f"ms/token; under cProfile, Python outside the native calls {1 - native / st.total_tt:.0%} of the time")
    m.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
