"""Decode tokens/s of `dipstream generate` on the engine with the MLP in RAM: dense vs DIP, in each
weight format.

Runs each configuration ``--rounds`` times, interleaved (the order rotates every round), greedy,
``--tokens`` new tokens without stopping at EOS, and prints the median decode tokens/s, the
median MLP time per token and the speed-up over dense in the same format, measured in the same run.

Usage: python benchmarks/bench_generate.py [--model smollm2-135m] [--tokens 48] [--rounds 3]
                                           [--threads 2] [--densities 0.25,0.5,0.75]
                                           [--weights float32,int8,int4]
"""
from __future__ import annotations

import argparse
import os
import statistics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--densities", default="0.25,0.5,0.75")
    ap.add_argument("--weights", default="float32,int8,int4")
    ap.add_argument("--prompt", default="The three primary colours are")
    a = ap.parse_args(argv)


    from dipstream.config import flat
    from dipstream.runtime.generate import GenerateConfig, run_generate

    configs = [c for w in a.weights.split(",")
               for c in [("dense", 1.0, w)] + [("dip", float(d), w) for d in a.densities.split(",")]]
    res = {c: [] for c in configs}
    print(f"load average before: {os.getloadavg()}")
    for r in range(a.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for c in order:
            row = run_generate(flat(GenerateConfig,
                model=a.model, method=c[0], density=c[1], weights=c[2], prompt=a.prompt,
                max_new_tokens=a.tokens, stop_at_eos=False, stream=False, threads=a.threads,
                device="cpu"))
            res[c].append(row)
    print(f"load average after: {os.getloadavg()}; engine threads {a.threads or 'default'}")
    dense = {c[2]: statistics.median(r["decode_tokens_per_s"] for r in res[c]) for c in configs if c[0] == "dense"}
    print("\n| method | weights | density | decode tokens/s | MLP ms/token | x dense (same weights) |")
    print("|---|---|---|---|---|---|")
    for c in configs:
        tps = statistics.median(r["decode_tokens_per_s"] for r in res[c])
        mlp = [r.get("mlp_s_per_token") for r in res[c]]
        mlp_s = f"{statistics.median(mlp) * 1e3:.1f}" if mlp[0] is not None else "-"
        print(f"| {c[0]} | {c[2]} | {c[1]:.2f} | {tps:.2f} | {mlp_s} | {tps / dense[c[2]]:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
