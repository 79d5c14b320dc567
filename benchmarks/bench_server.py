"""Tokens/s and time to first token of `dipstream serve` for 1 and for several concurrent streaming
clients, against `dipstream generate` on the same settings, measured in the same run.

The model's MLP is offloaded (--offload DIR, a temporary folder by default: the first run exports the
model there, before anything is timed) and the whole process capped by --memory. Each client sends a
streamed completion of --tokens new tokens (greedy, ignore_eos: always that many) for its own fixed
prompt. Per stream: ttft (request sent -> first text), decode tokens/s (first -> last text, as
`generate` times its decode); per run: aggregate tokens/s (all tokens / wall time). After a warm-up
of each (it fills the page cache), --rounds rounds run `generate` once and each client count once,
interleaved; the table gives the medians.

Usage: python benchmarks/bench_server.py [--model smollm2-135m] [--memory 300MB] [--offload DIR]
                                         [--tokens 64] [--clients 1,4] [--rounds 3] [--context 512]
                                         [--threads N]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:  # the openai client's HTTP library: httpx, renamed httpx2 in its 2.x releases
    import httpx2 as httpx
except ImportError:
    import httpx

PROMPTS = ["The three primary colours are", "Once upon a time, in a small village,",
           "The best way to learn to program is", "Paris is the capital of", "def fibonacci(n):", "The sea is"]
CLI = [sys.executable, "-m", "dipstream.cli.main"]


def engine_args(a, offload: str) -> list[str]:
    return ["--model", a.model, "--offload", offload, "--memory", a.memory] + \
        (["--threads", str(a.threads)] if a.threads else [])


def run_generate(a, offload: str, prompt: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "row.json"
        cmd = [*CLI, "generate", *engine_args(a, offload), "--prompt", prompt, "--max-new-tokens", str(a.tokens),
               "--no-stop-at-eos", "--no-stream", "--json", str(out)]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"generate failed: {r.stderr.strip()}")
        return json.loads(out.read_text())


def start_server(a, offload: str):
    cmd = [*CLI, "serve", *engine_args(a, offload), "--context", str(a.context), "--port", "0",
           "--max-queue", str(max(map(int, a.clients.split(","))))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, m.group(1)
        print(line, end="", file=sys.stderr)
    sys.exit("the server did not start")


def one_stream(url: str, prompt: str, tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    times, n = [], 0
    t0 = time.perf_counter()
    with httpx.Client(timeout=600) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
            elif ev["choices"][0]["text"]:
                times.append(time.perf_counter())
    t_end = time.perf_counter()
    decode = (n - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    return {"ttft_s": times[0] - t0, "decode_tokens_per_s": decode, "tokens": n, "t0": t0, "t_end": t_end}


def serve_round(url: str, clients: int, tokens: int) -> dict:
    with ThreadPoolExecutor(clients) as pool:
        rows = list(pool.map(lambda i: one_stream(url, PROMPTS[i % len(PROMPTS)], tokens), range(clients)))
    wall = max(r["t_end"] for r in rows) - min(r["t0"] for r in rows)
    return {"aggregate": sum(r["tokens"] for r in rows) / wall,
            "decode": statistics.mean(r["decode_tokens_per_s"] for r in rows),
            "ttft": statistics.mean(r["ttft_s"] for r in rows), "ttft_max": max(r["ttft_s"] for r in rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--memory", default="300MB", help="the process's RAM cap of both commands")
    ap.add_argument("--offload", help="folder of the offloaded model file (default: a temporary one)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4", help="concurrent streaming clients of each server round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--context", type=int, default=512, help="the server's context (prompt + tokens must fit)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    from dipstream.paths import machine

    tmp = None if a.offload else tempfile.TemporaryDirectory(prefix="bench-server-")
    offload = a.offload or tmp.name
    try:
        run_generate(a, offload, PROMPTS[0])  # exports the model on first use, warms the page cache
        proc, url = start_server(a, offload)
        try:
            one_stream(url, PROMPTS[0], 8)  # warm-up
            gens, runs = [], {c: [] for c in map(int, a.clients.split(","))}
            for _ in range(a.rounds):
                gens.append(run_generate(a, offload, PROMPTS[0]))
                for c, rs in runs.items():
                    rs.append(serve_round(url, c, a.tokens))
            health = httpx.get(url + "/health").json()
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(60)
    finally:
        if tmp:
            tmp.cleanup()
    print(f"machine: {machine()}")
    print("command: " + " ".join(shlex.quote(x) for x in [Path(sys.argv[0]).name, *(argv or sys.argv[1:])]))
    print(f"{a.model}, MLP offloaded, --memory {a.memory}, {a.tokens} tokens per request (greedy, ignore_eos), "
          f"engine threads {a.threads or 'default'}, median of {a.rounds} rounds, server exit code {rc}")
    gen = {k: statistics.median(g[k] for g in gens) for k in ("decode_tokens_per_s", "ttft_s", "peak_rss_bytes")}
    rounds = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
    print("\n| run | clients | aggregate tokens/s | decode tokens/s per stream | ttft s (mean) | ttft s (max) "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dipstream generate | 1 | - | {gen['decode_tokens_per_s']:.1f} | {gen['ttft_s']:.3f} | "
          f"{gen['ttft_s']:.3f} | {gen['peak_rss_bytes'] / 1e6:.0f} |")
    for c, r in rounds.items():
        print(f"| dipstream serve | {c} | {r['aggregate']:.1f} | {r['decode']:.1f} | {r['ttft']:.3f} | "
              f"{r['ttft_max']:.3f} | {health['peak_rss_bytes'] / 1e6:.0f} (whole run) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
