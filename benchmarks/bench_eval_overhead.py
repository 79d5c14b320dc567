"""Cost of sparse evaluation relative to dense evaluation on the same windows (target <= 1.25x).

Runs the unmodified model and each method attached to it on the same windows, interleaved over
several rounds (this machine is shared and noisy), and prints the median time ratio to dense.
`--random-shape llama3-8b` builds a random-weight model of that shape on `--device` in `--dtype`
(evaluation speed does not depend on weights) and times it on random tokens.

    python benchmarks/bench_eval_overhead.py [--model smollm2-135m] [--windows 4] [--rounds 3]
    python benchmarks/bench_eval_overhead.py --random-shape llama3-8b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from model_args import add_model_args

from dipstream.evaluation.perplexity import window_nll
from dipstream.sparsity import attach, build_method
from dipstream.sparsity.calibration import calibrate

DENSITY = {"dip": 0.5, "random": 0.5, "teal": 0.5, "cats": 0.6, "glu": 0.8, "up": 0.6, "griffin": 0.5}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(model, windows, reset=None) -> float:
    """Seconds to score `windows` one at a time (`reset` before each, as evaluation does)."""
    sync(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        for w in windows:
            if reset:
                reset()
            window_nll(model, w[None])
    sync(model.device)
    return time.perf_counter() - start


def model_and_windows(a):
    """(model, eval windows, calibration windows, description) of the command line."""
    from dipstream.devices import pick_device

    device, dtype = pick_device(a.device), getattr(torch, a.dtype)
    if a.random_shape:
        from dipstream.models.synthetic import random_causal_lm

        model = random_causal_lm(a.random_shape, dtype, device, a.layers)
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        win = torch.randint(vocab, (a.windows, a.seq_len), generator=g)
        calib = torch.randint(vocab, (2, a.seq_len), generator=g)
        layers = model.config.num_hidden_layers
        return model, win, calib, f"random {a.random_shape} ({layers} layers), random tokens"
    from dipstream.data import load_text, make_windows
    from dipstream.models import load_model

    lm = load_model(a.model, dtype, device)
    win = make_windows(lm.tokenizer, load_text("wiki", "eval"), a.seq_len, a.windows * (a.seq_len - 1)).input_ids
    calib = make_windows(lm.tokenizer, load_text("wiki", "train"), a.seq_len, 4 * (a.seq_len - 1)).input_ids
    return lm.model, win, calib, a.model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(DENSITY), help="comma-separated subset of " + ",".join(DENSITY))
    a = ap.parse_args()
    model, win, calib, what = model_and_windows(a)
    chosen = {m: DENSITY[m] for m in a.methods.split(",")}
    print(f"# {what}, {len(win)} windows x {a.seq_len} tokens, {a.rounds} rounds, {a.dtype} on {model.device}, "
          f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    methods = {}
    for m, d in chosen.items():
        sm = attach(model, build_method(m, d))
        if sm.method.needs_calibration:
            calibrate(sm, calib)
        methods[m] = sm.method
        sm.detach()
    timed(model, win[:1])  # warm-up (CUDA context, kernels)
    times = {m: [] for m in ["dense", *chosen]}
    for _ in range(max(1, a.rounds)):
        times["dense"].append(timed(model, win))
        for m, method in methods.items():
            sm = attach(model, method)  # re-attach the calibrated method
            times[m].append(timed(model, win, method.reset))
            sm.detach()
    base = statistics.median(times["dense"])
    print(f"{'method':>8} {'density':>7} {'median s':>9} {'x dense':>8}")
    print(f"{'dense':>8} {1.0:>7.2f} {base:>9.3f} {1.0:>8.2f}")
    for m, d in chosen.items():
        t = statistics.median(times[m])
        print(f"{m:>8} {d:>7.2f} {t:>9.3f} {t / base:>8.2f}")


if __name__ == "__main__":
    main()
