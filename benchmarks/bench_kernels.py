"""Per-kernel speed of the engine's int8-activation products of the GGUF block formats, in RAM.

For each (format, inputs, outputs) below, the records of random GGUF blocks of that type (moved
into the engine's layout as a model's are), copied until the set is well beyond the L3 cache, are
multiplied densely (every record selected, int8 activations, 1 thread) one copy after another, as a
decode walks its layers: GB/s of records and headers read per product, next to a STREAM-like read
of the same arrays (a compiled sum of 64-byte loads) on this machine. The shapes are Qwen2.5-1.5B's
(mlp_in: gate|up, mlp_out: down, q/o, head) and SmolLM2-135M's (Q4_1).

Several builds can be compared in one run (--lib A.so,B.so; "pkg": the package's own build): every
round runs each build and the read in turn, so a busy machine slows them alike; the table gives each
build's best round (the least disturbed; --stat median for medians).

Usage: python benchmarks/bench_kernels.py [--rounds 7] [--set-mb 256] [--only q4_k,q6_k] [--threads 1]
           [--lib pkg,/tmp/old.so] [--stat best|median]
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from dipstream import native
from dipstream.engine.gguf_blocks import move_matrices, record_format
from dipstream.engine.qmatrix import QMatrix

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' block generator
from tests.test_gguf_blocks import random_blocks  # noqa: E402

# (label, GGUF type, inputs, outputs)
CASES = [
    ("qwen mlp_in", "Q4_K", 1536, 17920),
    ("qwen q/o", "Q4_K", 1536, 1536),
    ("qwen mlp_out", "Q6_K", 8960, 1536),
    ("qwen head", "Q6_K", 1536, 151936),
    ("q8_0 mlp_in", "Q8_0", 1536, 17920),
    ("q5_k mlp_in", "Q5_K", 1536, 17920),
    ("q4_0 mlp_in", "Q4_0", 1536, 17920),
    ("smollm2 mlp_in", "Q4_1", 576, 3072),
    ("smollm2 mlp_out", "Q4_1", 1536, 576),
    ("q4_1 mlp_in", "Q4_1", 1536, 17920),
]

READ_C = r"""
#include <stdint.h>
#include <immintrin.h>
uint64_t read_bytes(const uint8_t* p, int64_t n)
{
#if defined(__AVX512F__)
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
    int64_t i = 0;
    for (; i + 256 <= n; i += 256) {
        a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
        b = _mm512_xor_si512(b, _mm512_loadu_si512(p + i + 64));
        c = _mm512_xor_si512(c, _mm512_loadu_si512(p + i + 128));
        d = _mm512_xor_si512(d, _mm512_loadu_si512(p + i + 192));
    }
    a = _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, d));
    uint64_t r = (uint64_t)_mm512_reduce_add_epi64(a);
#else
    uint64_t r = 0; int64_t i = 0;
    for (; i + 8 <= n; i += 8) r ^= *(const uint64_t*)(p + i);
#endif
    for (; i < n; ++i) r += p[i];
    return r;
}
"""


def build(name: str, n_in: int, m: int, rng) -> QMatrix:
    pieces = list(move_matrices([(random_blocks(name, m, n_in, rng), T[name])]))
    heads = pieces[-1][1]
    rec = np.concatenate([p for kind, p in pieces if kind == "records"])
    return QMatrix(rec, record_format(T[name]), m, heads[0], heads[1] if len(heads) > 1 else None, act8=True)


def reader():
    cc = shutil.which("gcc") or shutil.which("cc")
    d = Path(tempfile.mkdtemp())
    (d / "r.c").write_text(READ_C)
    subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", str(d / "r.c"), "-o", str(d / "r.so")], check=True)
    lib = ctypes.CDLL(str(d / "r.so"))
    lib.read_bytes.restype = ctypes.c_uint64
    lib.read_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    return lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--set-mb", type=float, default=256, help="bytes of copies per case (well above L3)")
    ap.add_argument("--only", default="", help="comma-separated GGUF types or labels to run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lib", default="pkg", help="comma-separated kernel libraries to compare (pkg: the package's build)")
    ap.add_argument("--stat", default="best", choices=("best", "median"))
    a = ap.parse_args()
    names = [x.strip() for x in a.lib.split(",") if x.strip()] or ["pkg"]
    libs = []
    for nm in names:
        if nm == "pkg":
            libs.append(native.require())
        else:
            lib = ctypes.CDLL(nm)
            native._declare(lib)
            libs.append(lib)
    pick = min if a.stat == "best" else statistics.median
    rd = reader()
    rng = np.random.default_rng(0)
    print("native builds: " + ", ".join(f"[{i}] {nm if nm != 'pkg' else native.status().get('flags')}"
                                         for i, nm in enumerate(names))
          + f"; threads {a.threads}; {a.stat} of {a.rounds} rounds; GB/s of records + headers per product")
    print(f"{'case':<16} {'type':<5} {'in x out':>13} {'MB/copy':>8} {'copies':>6} "
          + " ".join(f"{f'ms [{i}]':>8} {f'GB/s [{i}]':>9} {'of read':>7}" for i in range(len(libs))) + f" {'read GB/s':>9}")
    only = {s.strip().lower() for s in a.only.split(",") if s.strip()}
    for label, name, n_in, m in CASES:
        if only and name.lower() not in only and label.lower() not in only:
            continue
        q0 = build(name, n_in, m, rng)
        copies = max(1, int(np.ceil(a.set_mb * 1e6 / q0.nbytes)))
        mats = [q0] + [QMatrix(q0.rec.copy(), q0.fmt, q0.m, None if q0.hd is None else q0.hd.copy(),
                               None if q0.hm is None else q0.hm.copy(), act8=True) for _ in range(copies - 1)]
        idx, coef, out = np.empty(n_in, np.int64), np.empty(n_in, np.float32), np.empty(m, np.float32)
        sels = []
        for lib in libs:
            ss = []
            for q in mats:
                q._lib = lib
                ss.append(q.selector(idx, coef, out))
            sels.append(ss)
        v = rng.standard_normal(n_in).astype(np.float32)
        arrays = [[x for x in (q.rec, q.hd, q.hm) if x is not None] for q in mats]
        for ss in sels:  # warm up (and page in)
            for s in ss:
                s(v, n_in, a.threads)
        ts, tr = [[] for _ in libs], []
        for _ in range(a.rounds):
            for li, ss in enumerate(sels):
                t = time.perf_counter()
                for s in ss:
                    s(v, n_in, a.threads)
                ts[li].append((time.perf_counter() - t) / copies)
            t = time.perf_counter()
            for arrs in arrays:
                for x in arrs:
                    rd.read_bytes(x.ctypes.data, x.nbytes)
            tr.append((time.perf_counter() - t) / copies)
        r = pick(tr)
        rgbs = q0.nbytes / r / 1e9
        cols = []
        for li in range(len(libs)):
            t = pick(ts[li])
            gbs = q0.nbytes / t / 1e9
            cols.append(f"{t * 1e3:8.3f} {gbs:9.2f} {gbs / rgbs:7.2f}")
        print(f"{label:<16} {name:<5} {f'{n_in}x{m}':>13} {q0.nbytes / 1e6:8.2f} {copies:6d} " + " ".join(cols)
              + f" {rgbs:9.2f}", flush=True)
        del mats, sels, arrays
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
