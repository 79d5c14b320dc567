"""What first use costs: the export of a built-in GGUF model (time, peak RSS, disk) on its own, and
`generate`'s first use in a fresh model folder inside a kernel memory limit equal to its --memory
(the export included), each in a fresh process.

    python benchmarks/bench_first_use.py                      # SmolLM2, and Qwen 1.5B / Gemma 3 where installed
    python benchmarks/bench_first_use.py --models smollm2-135m --budgets smollm2-135m=150MB,100MB

The export's peak is its own VmHWM (printed by `dipstream export`); a limited run's peak is the
cgroup's (page cache included, so the limit bounds it) beside the process's own peak RSS (the run's
JSON row). Where no memory cgroup can be made, the runs go without a limit and say so."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from dipstream.limits import cgroup_kind, run_limited, why_not
from dipstream.simulator.hardware import fmt_bytes, parse_bytes

DEFAULT_BUDGETS = {"smollm2-135m": ["150MB"], "qwen2.5-coder-1.5b": ["800MB", "601MB"], "gemma3-270m": ["500MB"]}
CLI = [sys.executable, "-m", "dipstream.cli.main"]


def installed(model: str) -> bool:
    from dipstream.errors import DipstreamError
    from dipstream.models.builtins import gguf_of

    try:
        gguf_of(model)
        return True
    except DipstreamError:
        return False


def folder_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def export_row(model: str, work: Path) -> dict:
    d = work / f"{model}-export"
    t = time.perf_counter()
    r = run_limited([*CLI, "export", "--model", model, "--model-dir", str(d)], None, 1800)
    wall = time.perf_counter() - t
    if r.returncode:
        return {"model": model, "what": "export", "exit": r.returncode, "error": r.stderr.strip()[-300:]}
    peak = re.search(r"peak RSS ([0-9.]+ [kMG]?B)", r.stdout + r.stderr)
    return {"model": model, "what": "export", "exit": 0, "seconds": wall,
            "peak": peak.group(1) if peak else "?", "disk": fmt_bytes(folder_bytes(d))}


def first_use_row(model: str, budget: str, work: Path, tokens: int, limited: bool) -> dict:
    d = work / f"{model}-{budget}"
    row_file = work / f"{model}-{budget}.json"
    cmd = [*CLI, "generate", "--model", model, "--offload", str(d), "--memory", budget, "--no-stream",
           "--max-new-tokens", str(tokens), "--prompt", "The three primary colours are", "--json", str(row_file)]
    if model != "smollm2-135m":
        cmd += ["--activations", "int8", "--kv-cache", "float16"]
    t = time.perf_counter()
    r = run_limited(cmd, int(parse_bytes(budget)) if limited else None, 1800)
    wall = time.perf_counter() - t
    out = {"model": model, "what": f"first use --memory {budget}", "exit": r.returncode, "seconds": wall,
           "limit_peak": fmt_bytes(r.peak_bytes) if r.peak_bytes else "-", "oom_kills": r.oom_kills,
           "timed_out": r.timed_out}
    if r.returncode == 0:
        row = json.loads(row_file.read_text())
        out.update(peak=fmt_bytes(row["peak_rss_bytes"]), tok_s=row.get("decode_tokens_per_s"), disk=fmt_bytes(folder_bytes(d)))
    else:
        out["error"] = r.stderr.strip()[-300:]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_BUDGETS), help="built-in models (absent ones skipped)")
    ap.add_argument("--budgets", default="", help="MODEL=SIZE[,SIZE] per model, ';'-separated (default: "
                                                  + "; ".join(f"{m}={','.join(b)}" for m, b in DEFAULT_BUDGETS.items()) + ")")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens of each first-use run")
    args = ap.parse_args(argv)
    budgets = dict(DEFAULT_BUDGETS)
    for item in filter(None, args.budgets.split(";")):
        m, _, sizes = item.partition("=")
        budgets[m.strip()] = [s.strip() for s in sizes.split(",") if s.strip()]
    limited = cgroup_kind() is not None
    if not limited:
        print(f"no kernel limit: {why_not()}; the runs go unlimited")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dipstream-first-use-") as tmp:
        for model in args.models:
            if not installed(model):
                print(f"{model}: not installed, skipped")
                continue
            rows.append(export_row(model, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
            for budget in budgets.get(model, []):
                rows.append(first_use_row(model, budget, Path(tmp), args.tokens, limited))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| model | what | exit | seconds | peak RSS | limit's peak | decode tok/s | disk |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tok = f"{r['tok_s']:.2f}" if isinstance(r.get("tok_s"), float) else "-"
        print(f"| {r['model']} | {r['what']} | {r['exit']} | {r.get('seconds', 0):.1f} | {r.get('peak', '-')} | "
              f"{r.get('limit_peak', '-')} | {tok} | {r.get('disk', '-')} |")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
