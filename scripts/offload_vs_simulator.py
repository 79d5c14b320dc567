"""Measured offloaded decoding vs the simulator's prediction for the same masks, on this machine.

1. ``dipstream probe`` measures this machine (RAM, CPU GEMV, and direct reads of the offload
   file itself: sequential, and random at its record sizes) and writes a hardware file, once per
   round just before that round's runs (or pass ``--hardware`` to use one file throughout).
2. ``dipstream generate --offload DIR --dram 0.5x`` runs dense streaming, DIP and DIP-CA from
   the same MLP file with half the MLP's bytes in RAM (``--rounds`` interleaved runs each; each
   run records its masks as a trace).
3. Each run's trace is replayed by the simulator (``simulate``: same policy, caches never above
   capacity, the runtime's cache capacities via its DRAM figure, the probe's hardware).

Printed per method (medians over rounds): measured tokens/s and its parts (MLP time per token,
of which disk-read time; the rest of the decode step), and the simulator's prediction of the
same quantities: Flash (disk) time, MLP time (Flash + DRAM reads), and tokens/s (MLP + static
layers read at DRAM bandwidth, with the compute roofline).  What the simulator does not model:
Python/PyTorch overhead of the attention blocks and the LM head beyond their bytes, the
runtime's own bookkeeping (selection, cache policy steps, copies into the cache), and record
padding (2304 -> 2560 B per W_down^T record for SmolLM2).  The last column sets the simulated
MLP time beside the measured rest of the step ("hybrid").

Usage: python scripts/offload_vs_simulator.py [--model smollm2-135m] [--offload DIR]
           [--hardware HW.yaml] [--tokens 48] [--rounds 3] [--gamma 0.2] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("dense", "dip", "dip-ca")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--offload", default=None, help="offload directory (default: in the cache)")
    ap.add_argument("--hardware", default=None, help="a probe YAML to reuse instead of probing")
    ap.add_argument("--dram", default="0.5x")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--gamma", type=float, default=0.2)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--prompt", default="The three primary colours are")
    ap.add_argument("--out", default="results/offload_vs_simulator.jsonl")
    a = ap.parse_args(argv)

    import os

    import torch

    from dipstream.io import append_jsonl
    from dipstream.paths import cache_root
    from dipstream.config import flat
    from dipstream.runtime.generate import GenerateConfig, run_generate
    from dipstream.runtime.probe import ProbeConfig, run_probe
    from dipstream.simulator import load_hardware, load_trace, simulate

    torch.set_num_threads(a.threads)
    offload = Path(a.offload or cache_root() / "offload" / a.model)
    # the offload file is written first (if needed): the probe measures reads of that file
    run_generate(flat(GenerateConfig, model=a.model, method="dense", max_new_tokens=1, stream=False,
                                offload=str(offload), dram=a.dram))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)

    def probe(r):
        if a.hardware:
            return a.hardware
        path = str(Path(a.out).with_name(f"hardware-probe-round{r}.yaml"))
        run_probe(ProbeConfig(out=path, file=str(offload / "mlp.bin"), model=a.model,
                              io_threads=a.io_threads,
                              json=str(Path(a.out).with_name(f"hardware-probe-round{r}.json"))),
                  log=lambda m: None)
        return path

    print(f"load average before: {os.getloadavg()}")
    runs = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="dipstream-ovs-") as tmp_dir:  # the traces
        tmp = Path(tmp_dir)
        for r in range(a.rounds):
            hw_path = probe(r)  # the machine as it is now (shared machines drift)
            hw = load_hardware(hw_path)
            print(f"round {r} hardware {hw_path}: dram_bw {hw.dram_bw / 1e9:.2f} GB/s, "
                  f"flash_bw {hw.flash_bw / 1e9:.3f} GB/s, latency "
                  f"{hw.flash_read_latency_s * 1e6:.1f} us / queue depth {hw.flash_queue_depth}, "
                  f"compute {hw.compute_flops / 1e9:.2f} GFLOP/s", flush=True)
            order = METHODS[r % 3:] + METHODS[:r % 3]  # rotate the order every round
            for m in order:
                trace = tmp / f"{m}-{r}.npz"
                row = run_generate(flat(GenerateConfig, 
                    model=a.model, method=m, density=1.0 if m == "dense" else a.density,
                    prompt=a.prompt, max_new_tokens=a.tokens, stop_at_eos=False, stream=False,
                    gamma=a.gamma, offload=str(offload), dram=a.dram, io_threads=a.io_threads,
                    threads=a.threads, trace=str(trace)))
                sim = simulate(load_trace(trace), hw, None, policy="lru",
                               dram_bytes=row["sim_dram_bytes"], seq_len=row["sim_seq_len"]).to_dict()
                sim_flash = sim["t_mlp_s"] - sim["mlp_dram_bytes_per_token"] / hw.dram_bw
                step = row["decode_s"] / row["decode_steps"]
                rec = {"round": r, "method": m, "load_avg": os.getloadavg(),
                       "measured": {k: row[k] for k in (
                           "decode_tokens_per_s", "mlp_s_per_token", "io_s_per_token",
                           "reads_per_token", "disk_bytes_per_token", "ram_bytes_per_token",
                           "hit_rate", "density_measured", "ttft_s", "ram_mlp_bytes",
                           "dram_budget_bytes", "direct_io")},
                       "measured_rest_s_per_token": step - row["mlp_s_per_token"],
                       "simulated": {"flash_s_per_token": sim_flash,
                                     "mlp_s_per_token": sim["t_mlp_s"],
                                     "static_s_per_token": sim["t_static_s"],
                                     "tokens_per_s": sim["tokens_per_s"],
                                     "hit_rate": sim["hit_rate"],
                                     "flash_bytes_per_token": sim["mlp_flash_bytes_per_token"],
                                     "compute_bound_fraction": sim["compute_bound_fraction"]},
                       "hardware": hw_path, "model": a.model, "density": a.density,
                       "gamma": a.gamma, "threads": a.threads,
                       "time": time.strftime("%Y-%m-%d %H:%M:%S")}
                runs[m].append(rec)
                append_jsonl(a.out, rec)
                print(f"round {r} {m:7s}: measured {row['decode_tokens_per_s']:.2f} tok/s "
                      f"(MLP {row['mlp_s_per_token'] * 1e3:.0f} ms, disk "
                      f"{row['io_s_per_token'] * 1e3:.0f} ms); simulated "
                      f"{sim['tokens_per_s']:.2f} tok/s (MLP {sim['t_mlp_s'] * 1e3:.0f} ms, flash "
                      f"{sim_flash * 1e3:.0f} ms)", flush=True)
    print(f"load average after: {os.getloadavg()}")

    def med(m, f):
        return statistics.median(f(x) for x in runs[m])

    print("\n| method | measured tok/s | simulated tok/s | sim / measured | MLP ms/token measured "
          "| MLP ms/token simulated | sim / measured | disk ms/token measured | Flash ms/token "
          "simulated | rest of step ms (measured) | hybrid tok/s (measured rest + simulated MLP) "
          "| hybrid / measured | disk MB/token | reads/token | hit rate |")
    print("|" + "---|" * 15)
    for m in METHODS:
        mt = med(m, lambda x: x["measured"]["decode_tokens_per_s"])
        st = med(m, lambda x: x["simulated"]["tokens_per_s"])
        mm = med(m, lambda x: x["measured"]["mlp_s_per_token"])
        sm = med(m, lambda x: x["simulated"]["mlp_s_per_token"])
        mi = med(m, lambda x: x["measured"]["io_s_per_token"])
        sf = med(m, lambda x: x["simulated"]["flash_s_per_token"])
        rest = med(m, lambda x: x["measured_rest_s_per_token"])
        hy = med(m, lambda x: 1.0 / (x["measured_rest_s_per_token"]
                                     + x["simulated"]["mlp_s_per_token"]))
        # ratios: medians of the per-run ratios (each run against its own round's probe)
        r_tok = med(m, lambda x: x["simulated"]["tokens_per_s"] / x["measured"]["decode_tokens_per_s"])
        r_mlp = med(m, lambda x: x["simulated"]["mlp_s_per_token"] / x["measured"]["mlp_s_per_token"])
        r_hy = med(m, lambda x: 1.0 / (x["measured_rest_s_per_token"]
                                       + x["simulated"]["mlp_s_per_token"])
                   / x["measured"]["decode_tokens_per_s"])
        print(f"| {m} | {mt:.2f} | {st:.2f} | {r_tok:.2f} | {mm * 1e3:.0f} | {sm * 1e3:.0f} | "
              f"{r_mlp:.2f} | {mi * 1e3:.0f} | {sf * 1e3:.0f} | {rest * 1e3:.0f} | {hy:.2f} | "
              f"{r_hy:.2f} | {med(m, lambda x: x['measured']['disk_bytes_per_token']) / 1e6:.1f}"
              f" | {med(m, lambda x: x['measured']['reads_per_token']):.0f} | "
              f"{med(m, lambda x: x['measured']['hit_rate']):.3f} |")
    by_round = {(x["round"], x["method"]): x["measured"]["decode_tokens_per_s"]
                for m in METHODS for x in runs[m]}
    for m in ("dip", "dip-ca"):
        ratios = [by_round[(r, m)] / by_round[(r, "dense")] for r in range(a.rounds)]
        print(f"{m} vs dense streaming from the same file (measured tokens/s, same round): "
              f"median {statistics.median(ratios):.2f}x, rounds "
              + ", ".join(f"{v:.2f}" for v in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
