"""Cost of sparse evaluation relative to dense evaluation on the same windows (target <= 1.25x).

Runs the unmodified model and each method attached to it on the same windows, interleaved over
several rounds (this machine is shared and noisy), and prints the median time ratio to dense.

    python benchmarks/bench_eval_overhead.py [--model smollm2-135m] [--windows 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from dipstream.data import load_text, make_windows
from dipstream.evaluation.perplexity import window_nll
from dipstream.models import load_model
from dipstream.sparsity import attach, build_method
from dipstream.sparsity.calibration import calibrate

DENSITY = {"dip": 0.5, "random": 0.5, "teal": 0.5, "cats": 0.6, "glu": 0.8, "up": 0.6, "griffin": 0.5}


def _time(model, windows, reset=None) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for w in windows:
            if reset:
                reset()
            window_nll(model, w[None])
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    lm = load_model(a.model)
    win = make_windows(lm.tokenizer, load_text("wiki", "eval"), 512, a.windows * 511).input_ids
    calib = make_windows(lm.tokenizer, load_text("wiki", "train"), 512, 4 * 511).input_ids
    print(f"# {a.model}, {len(win)} windows x 512 tokens, {a.rounds} rounds, "
          f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    times = {m: [] for m in ["dense", *DENSITY]}
    methods = {}
    for m, d in DENSITY.items():
        sm = attach(lm.model, build_method(m, d))
        if sm.method.needs_calibration:
            calibrate(sm, calib)
        methods[m] = sm.method
        sm.detach()
    for _ in range(max(1, a.rounds)):
        times["dense"].append(_time(lm.model, win))
        for m, method in methods.items():
            sm = attach(lm.model, method)  # re-attach the calibrated method
            times[m].append(_time(lm.model, win, method.reset))
            sm.detach()
    base = statistics.median(times["dense"])
    print(f"{'method':>8} {'density':>7} {'median s':>9} {'x dense':>8}")
    print(f"{'dense':>8} {1.0:>7.2f} {base:>9.2f} {1.0:>8.2f}")
    for m, d in DENSITY.items():
        t = statistics.median(times[m])
        print(f"{m:>8} {d:>7.2f} {t:>9.2f} {t / base:>8.2f}")


if __name__ == "__main__":
    main()
