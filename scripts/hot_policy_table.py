"""LRU vs PowerInfer-style `hot` (pinned by a train-split profile) vs `hot-same-trace` (pinned by the
evaluated text itself: an upper bound), replaying one DIP trace per density on the simulated a18
phone. Each cell is one `dipstream simulate` run kept as JSON in --out (resumable).

    python scripts/hot_policy_table.py --out results/hot   # smollm2-135m, DRAM 0.7x, 2044 tokens
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from run_once import dipstream_json

POLICIES = [("lru", []), ("hot, profile, 50% pinned", ["--policy", "hot", "--hot-fraction", "0.5"]),
            ("hot, profile, 100% pinned", ["--policy", "hot", "--hot-fraction", "1.0"]),
            ("hot-same-trace, 50% (upper bound)", ["--policy", "hot-same-trace", "--hot-fraction", "0.5"]),
            ("hot-same-trace, 100% (upper bound)", ["--policy", "hot-same-trace", "--hot-fraction", "1.0"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--densities", default="0.5,0.8")
    ap.add_argument("--dram", default="0.7x")
    ap.add_argument("--tokens", type=int, default=2044)
    ap.add_argument("--out", default="results/hot")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| DIP density | perplexity | policy | hit rate | tok/s | vs dense streaming |", "|---|---|---|---|---|---|"]
    for d in a.densities.split(","):
        base = ["--model", a.model, "--method", "dip", "--density", d, "--tokens", str(a.tokens), "--dram", a.dram]
        trace = out / f"dip{d}.npz"
        live = dipstream_json(["simulate", *base, "--save-trace", str(trace)], out / f"live-{d}.json")
        for name, extra in POLICIES:
            key = name.split(",")[0].replace(" ", "") + "-" + (extra[-1] if extra else "")
            r = dipstream_json(["simulate", *base, "--trace", str(trace), *extra], out / f"r-{d}-{key}.json")
            lines.append(f"| {d} | {live['perplexity']:.2f} | {name} | {r['hit_rate']:.4f} | {r['tokens_per_s']:.2f} | "
                         f"{r['speedup_vs_dense_streaming']:.3f}x |")
    print(f"\n{a.model}, a18, DRAM {a.dram}, {a.tokens} eval tokens of wiki; profile: DIP at the same density "
          f"over 4096 tokens of the wiki train split; dense streaming {live['dense_streaming']['tokens_per_s']:.2f} tok/s\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
