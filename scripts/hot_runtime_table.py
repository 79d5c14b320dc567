"""LRU vs PowerInfer's hot/cold placement in the offloading runtime, measured: `dipstream generate
--offload` with DIP, the same prompt and greedy tokens, LRU caches vs the units DIP reads most on
the wiki train split pinned (50% or 100% of each cache; the rest LRU) and the cold ones streamed.
Policies run interleaved, round by round; every run is a separate process whose JSON row is kept
in --out (a killed script resumes); the table gives medians over rounds. Placement never changes
what is computed, only where records come from, so tokens agree up to float rounding (the sums of
cached and read units are added separately: a near-tie in the logits can flip a greedy token).

    python scripts/hot_runtime_table.py --out results/hot-runtime   # smollm2-135m, int4, 0.5x
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from run_once import dipstream_json

POLICIES = [("lru", ["--policy", "lru"]),
            ("hot, 50% pinned", ["--policy", "hot", "--hot-fraction", "0.5"]),
            ("hot, 100% pinned (cold streamed)", ["--policy", "hot", "--hot-fraction", "1.0"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--density", default="0.5")
    ap.add_argument("--weights", default="int4", choices=["float32", "int8", "int4"])
    ap.add_argument("--dram", default="0.5x", help="RAM for weights and KV cache (fraction of the model file)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--read-gap", default=None, help="the engine's --read-gap (default: its own)")
    ap.add_argument("--out", default="results/hot-runtime")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["generate", "--model", a.model, "--method", "dip", "--density", a.density, "--weights", a.weights,
            "--offload", str(out / "model"), "--dram", a.dram, "--max-new-tokens", str(a.tokens),
            "--no-stop-at-eos", "--threads", "1", "--no-stream"]
    if a.read_gap is not None:
        base += ["--read-gap", a.read_gap]
    rows: dict[str, list[dict]] = {name: [] for name, _ in POLICIES}
    for r in range(a.rounds):
        for name, extra in POLICIES:
            key = "-".join(extra[1::2]).replace(".", "")
            rows[name].append(dipstream_json([*base, *extra], out / f"round{r}-{key}.json"))
    ref = rows["lru"][0]["ids"]
    lines = [f"{a.model}, {a.weights}, DIP d {a.density}, --dram {a.dram}, read gap {a.read_gap or 'default'}, "
             f"{a.tokens} new tokens, 1 thread, medians of {a.rounds} interleaved rounds", "",
             "| placement | hit rate | disk MB / token | reads / token | decode tok/s | vs LRU | pinned units read at "
             "load (MB) | first token differing from LRU's |", "|---|---|---|---|---|---|---|---|"]
    med = {n: statistics.median(x["decode_tokens_per_s"] for x in rs) for n, rs in rows.items()}
    for name, rs in rows.items():
        x = rs[0]
        diff = next((i for i, (p, q) in enumerate(zip(x["ids"], ref)) if p != q), None)
        lines.append(f"| {name} | {x['hit_rate']:.4f} | {x['disk_bytes_per_token'] / 1e6:.3f} | "
                     f"{x['reads_per_token']:.1f} | {med[name]:.2f} | {med[name] / med['lru']:.2f}x | "
                     f"{x.get('preload_bytes', 0) / 1e6:.2f} | {'none' if diff is None else diff} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
