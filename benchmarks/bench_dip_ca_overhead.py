"""Cost of closed-loop DIP-CA evaluation relative to plain DIP on the same windows (target <= 1.5x).

Named model (default): both run through `dipstream simulate` (mask recording included for both);
the figure compared is the evaluation time of the windows. `--random-shape llama3-8b`: a
random-weight model of that shape on `--device` in `--dtype`, random tokens, DIP vs DIP-CA with an
LRU cache of half of every hook's units, batches of `--batch-size` windows. Rounds interleaved,
medians taken.

    python benchmarks/bench_dip_ca_overhead.py [--tokens 4088] [--rounds 2] [--batch-size 8]
    python benchmarks/bench_dip_ca_overhead.py --random-shape llama3-8b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from model_args import add_model_args

from dipstream.sparsity import MethodOptions


def simulated(a) -> dict:
    from dipstream.experiments.evaluate import EvalConfig
    from dipstream.experiments.simulate import SimConfig, SimulateConfig, run_simulate

    times = {"dip": [], "dip-ca": []}
    for _ in range(a.rounds):
        for m in times:
            ev = EvalConfig(model=a.model, method=m, density=0.5, tokens=a.tokens, device=a.device, dtype=a.dtype,
                            options=MethodOptions(gamma=0.1))
            row = run_simulate(SimulateConfig(ev, SimConfig(batch_size=a.batch_size)), progress=False)
            times[m].append(row["seconds"])
            print(f"{m:>7}: {row['seconds']:.2f} s  ppl {row['perplexity']:.3f}  hit {row['hit_rate']:.3f}",
                  flush=True)
    return times


def random_weights(a) -> dict:
    from dipstream.devices import pick_device
    from dipstream.evaluation.perplexity import window_nll
    from dipstream.models.synthetic import random_causal_lm
    from dipstream.sparsity import attach, build_method

    device = pick_device(a.device)
    model = random_causal_lm(a.random_shape, getattr(torch, a.dtype), device, a.layers)
    windows = max(1, a.tokens // (a.seq_len - 1))
    ids = torch.randint(model.config.vocab_size, (windows, a.seq_len), generator=torch.Generator().manual_seed(0))
    methods = {m: build_method(m, 0.5, MethodOptions(gamma=0.1)) for m in ("dip", "dip-ca")}

    def run(method) -> float:
        sm = attach(model, method)
        try:
            if hasattr(method, "configure_cache"):
                method.configure_cache({h.name: h.n_units // 2 for h in method.hooks}, "lru")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode():
                for b in range(0, windows, a.batch_size):
                    method.reset()
                    window_nll(model, ids[b:b + a.batch_size])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start
        finally:
            sm.detach()

    run(methods["dip"])  # warm-up
    times = {"dip": [], "dip-ca": []}
    for _ in range(a.rounds):
        for m, method in methods.items():
            times[m].append(run(method))
            print(f"{m:>7}: {times[m][-1]:.3f} s", flush=True)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--tokens", type=int, default=8 * 511)
    ap.add_argument("--seq-len", type=int, default=512, help="with --random-shape: window length")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    what = f"random {a.random_shape}" if a.random_shape else a.model
    print(f"# {what}, {a.tokens} tokens, batch {a.batch_size}, {a.dtype} on {a.device}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    times = random_weights(a) if a.random_shape else simulated(a)
    dip, ca = statistics.median(times["dip"]), statistics.median(times["dip-ca"])
    print(f"median: dip {dip:.3f} s, dip-ca {ca:.3f} s, ratio {ca / dip:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
