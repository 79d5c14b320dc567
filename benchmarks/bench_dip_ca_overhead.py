"""Cost of closed-loop DIP-CA evaluation relative to plain DIP on the same windows (target <= 1.5x).

Both runs go through `dipstream simulate` (mask recording included for both); the figure compared
is the evaluation time of the windows, rounds interleaved, median taken.

    python benchmarks/bench_dip_ca_overhead.py [--tokens 4088] [--rounds 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from dipstream.experiments.evaluate import EvalConfig
from dipstream.experiments.simulate import SimConfig, SimulateConfig, run_simulate
from dipstream.sparsity import MethodOptions


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8 * 511)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    print(f"# {a.model}, {a.tokens} tokens, batch {a.batch_size}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    times = {"dip": [], "dip-ca": []}
    for _ in range(a.rounds):
        for m in times:
            ev = EvalConfig(model=a.model, method=m, density=0.5, tokens=a.tokens,
                            options=MethodOptions(gamma=0.1))
            row = run_simulate(SimulateConfig(ev, SimConfig(batch_size=a.batch_size)), progress=False)
            times[m].append(row["seconds"])
            print(f"{m:>7}: {row['seconds']:.2f} s  ppl {row['perplexity']:.3f}  hit {row['hit_rate']:.3f}",
                  flush=True)
    dip, ca = statistics.median(times["dip"]), statistics.median(times["dip-ca"])
    print(f"median: dip {dip:.2f} s, dip-ca {ca:.2f} s, ratio {ca / dip:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
