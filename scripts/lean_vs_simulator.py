"""Does the simulator predict the lean engine? Calibrate once, then predict held-out runs.

1. `dipstream probe --lean-model DIR` on the calibration model (default SmolLM2-135M) measures the
   engine's products and the per-token host time (fitted to its in-RAM dense and DIP decodes) and
   the model file's reads while the CPU computes: one hardware file for this machine.
2. Every configuration (each model; in RAM: DIP; offloaded with --dram F of the model file's
   bytes, static weights and KV cache first: dense streaming, DIP, DIP-CA) runs `dipstream generate`
   in its own process with --trace, greedy, --tokens new tokens, --rounds times (interleaved).
3. Each run's masks are replayed by `simulate` with that hardware file, the runtime's cache bytes
   and policy (in RAM: every unit resident), and its decode tokens/s compared with the measured.

The configurations the probe fitted (the calibration model in RAM) are marked; all others are
held out. Prints the table and writes JSONL.

Usage: python scripts/lean_vs_simulator.py [--models smollm2-135m,gemma3-270m] [--weights int4]
           [--dram 0.5x,0.75x] [--tokens 48] [--rounds 2] [--out results/lean_vs_simulator.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


# the timing models compared with the probe's (hardware switches)
OTHER_MODELS = {"per hook": {"pipelined": False, "lookahead": False},
                "one hook ahead": {"pipelined": False, "lookahead": True},
                "pipelined": {"pipelined": True, "lookahead": False}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--calibrate-on", default="smollm2-135m")
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--dram", default="0.5x,0.75x")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", default="The history of the city begins with")
    ap.add_argument("--out", default="results/lean_vs_simulator.jsonl")
    a = ap.parse_args(argv)

    from dipstream.engine.export import ensure_model_file
    from dipstream.io import append_jsonl
    from dipstream.paths import machine
    from dipstream.runtime.probe import ProbeConfig, run_probe
    from dipstream.simulator import load_hardware, load_trace, simulate
    from dipstream.simulator.simulate import plan_placement

    models = a.models.split(",")
    dirs = {m: ensure_model_file(m, a.weights) for m in models}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    hw_path = str(Path(a.out).with_name("lean-probe.yaml"))
    print(f"load average before: {os.getloadavg()}", flush=True)
    run_probe(ProbeConfig(out=hw_path, lean_model=str(dirs[a.calibrate_on]), threads=a.threads,
                          json=str(Path(a.out).with_name("lean-probe.json"))), log=lambda m: None)
    hw = load_hardware(hw_path)
    print(f"hardware {hw_path}: products {hw.dram_bw / 1e9:.2f} GB/s, host {hw.host_s_per_token * 1e3:.2f} ms/token "
          f"(+{hw.host_s_per_cached_hook * 1e6:.0f} us per cache-managed hook), "
          f"flash {hw.flash_bw / 1e9:.3f} GB/s, latency {hw.flash_read_latency_s * 1e6:.1f} us / queue depth "
          f"{hw.flash_queue_depth}", flush=True)
    configs = [(m, "dip", None) for m in models]  # in RAM (a dense run in RAM has no masks to replay)
    configs += [(m, meth, f) for m in models for f in a.dram.split(",") for meth in ("dense", "dip", "dip-ca")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="dipstream-lvs-") as tmp:
        for r in range(a.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for model, meth, dram in order:
                trace, row_file = Path(tmp) / "t.npz", Path(tmp) / "row.json"
                cmd = [sys.executable, "-m", "dipstream.cli.main", "generate", "--engine", "lean", "--model", model,
                       "--weights", a.weights, "--method", meth, "--density", str(a.density), "--gamma",
                       str(a.gamma), "--prompt", a.prompt, "--max-new-tokens", str(a.tokens), "--no-stop-at-eos",
                       "--no-stream", "--threads", str(a.threads), "--trace", str(trace), "--json", str(row_file)]
                cmd += ["--offload", str(dirs[model]), "--dram", dram] if dram else ["--model-dir", str(dirs[model])]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    print(f"{model} {meth} {dram}: failed: {p.stderr.strip()[-300:]}", flush=True)
                    continue
                row = json.loads(row_file.read_text())
                tr = load_trace(trace)
                shape = tr.shape()
                seq = row["prompt_tokens"] + a.tokens
                sims = []
                for h in [hw] + [replace(hw, **kw) for kw in OTHER_MODELS.values()]:  # the probe's model, then each
                    if dram:
                        static = plan_placement(shape, h, tr.hooks, 1e18, seq).static_bytes
                        sims.append(simulate(tr, h, shape, policy="lru", dram_bytes=static + row["cache_bytes"],
                                             seq_len=seq))
                    else:  # in RAM: every unit resident
                        sims.append(simulate(tr, h, shape, policy="hot-same-trace", fraction=1.0, dram_bytes=1e15, seq_len=seq))
                sim = sims[0]
                rec = {"round": r, "model": model, "method": meth, "dram": dram or "ram",
                       "fitted": model == a.calibrate_on and dram is None,
                       "measured_tokens_per_s": row["decode_tokens_per_s"], "simulated_tokens_per_s": sim.tokens_per_s,
                       **{f"{name}_tokens_per_s": x.tokens_per_s for name, x in zip(OTHER_MODELS, sims[1:])},
                       "pipelined": hw.pipelined, "lookahead": hw.lookahead,
                       "measured_disk_bytes_per_token": row.get("disk_bytes_per_token"),
                       "simulated_flash_bytes_per_token": sim.mlp_flash_bytes_per_token,
                       "measured_hit_rate": row.get("hit_rate"), "simulated_hit_rate": sim.hit_rate,
                       "cache_bytes": row.get("cache_bytes"), "load_avg": os.getloadavg(), "hardware": hw_path,
                       "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
                runs.append(rec)
                append_jsonl(a.out, rec)
                print(f"round {r} {model} {meth} {dram or 'ram'}: measured {rec['measured_tokens_per_s']:.2f} tok/s, "
                      f"simulated {rec['simulated_tokens_per_s']:.2f}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    print("\n| model | method | memory | fitted? | measured tok/s | simulated tok/s | sim / measured | "
          + " | ".join(f"{n}: sim / measured" for n in OTHER_MODELS)
          + " | disk MB/token measured | Flash MB/token simulated | hit rate measured / simulated |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(OTHER_MODELS) + "---|---|---|")
    worst = 0.0
    for model, meth, dram in configs:
        rs = [x for x in runs if (x["model"], x["method"], x["dram"]) == (model, meth, dram or "ram")]
        if not rs:
            continue
        med = lambda k: statistics.median(x[k] for x in rs if x[k] is not None)  # noqa: E731
        ratio = statistics.median(x["simulated_tokens_per_s"] / x["measured_tokens_per_s"] for x in rs)
        others = " | ".join(f"{statistics.median(x[n + '_tokens_per_s'] / x['measured_tokens_per_s'] for x in rs):.2f}"
                            for n in OTHER_MODELS)
        if not rs[0]["fitted"]:
            worst = max(worst, abs(ratio - 1))
        hit = (f"{med('measured_hit_rate'):.3f} / {med('simulated_hit_rate'):.3f}" if dram else "- / 1.000")
        disk = f"{med('measured_disk_bytes_per_token') / 1e6:.1f}" if dram else "-"
        print(f"| {model} | {meth} | {dram or 'RAM'} | {'fitted' if rs[0]['fitted'] else 'held out'} | "
              f"{med('measured_tokens_per_s'):.2f} | {med('simulated_tokens_per_s'):.2f} | {ratio:.2f} | {others} | "
              f"{disk} | "
              f"{med('simulated_flash_bytes_per_token') / 1e6:.1f} | {hit} |")
    print(f"\nworst held-out error: {worst * 100:.0f}% (target: within 25%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
