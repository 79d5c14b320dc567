"""dipstream's engine against llama.cpp, in RAM and under the same memory cap.

Both engines run the same model (llama.cpp its GGUF, mmap'd; dipstream its exported model file
at --weights, default int4), the same prompt, greedy, --new-tokens tokens without stopping at EOS,
at 1 and 2 threads. Scenarios:

* ram: no cap (dipstream: the whole model in RAM);
* cap F: each process's memory (cgroup v1, page cache included) capped at the same absolute limit,
  the larger of the two baselines (the interpreter and libraries, no model) plus F times the GGUF's
  bytes (shared/reference/peer-llamacpp.md); dipstream offloads its MLP and gets the same number as
  its whole-process --memory budget (a budget it cannot run in is reported as its one-line refusal).

Configurations: llama.cpp; dipstream dense (in RAM, or streaming its MLP from its file), DIP and
DIP-CA (capped scenarios only) at --density. Rounds are interleaved (the order rotates), the page
cache is dropped before every run, and the load average is recorded; the table shows medians and
each configuration's ratio to llama.cpp in the same scenario and thread count. Perplexity of every
configuration on the same token windows of the eval text (llama.cpp's from its logits; dipstream's
with the same cache budget, uncapped, since capping does not change the arithmetic).

Needs: llama-cpp-python (the `bench` extra, or --llama-python PATH: an interpreter that has it) and
a writable cgroup-v1 memory controller for the capped scenarios (skipped, with a note, without).

Usage: python benchmarks/bench_vs_llamacpp.py [--model smollm2-135m] [--rounds 3] [--threads 1,2]
           [--scenarios ram,0.75,0.5] [--llama-python /path/to/python] [--out results/vs_llamacpp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llamacpp_child import _status  # noqa: E402  (standard library only: both interpreters run it)

from dipstream.limits import cgroup_kind, run_limited, why_not  # noqa: E402
PROMPT = "The history of the city begins with"


def cgroup_ok() -> bool:
    return cgroup_kind() is not None


def drop_caches() -> None:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def run_child(cmd: list[str], cap: int | None, json_file: Path | None = None, timeout: int = 1800) -> dict:
    """Run cmd (printing one JSON line, or writing `json_file`) in a fresh memory cgroup capped at
    `cap` bytes (None: no cap; dipstream.limits); adds the group's peak usage and limit hits."""
    if json_file is not None:
        json_file.unlink(missing_ok=True)
    r = run_limited(cmd, cap, timeout)
    if r.returncode == 0 and json_file is not None:
        out = json.loads(json_file.read_text())
    elif r.returncode == 0 and r.stdout.strip():
        out = json.loads(r.stdout.strip().splitlines()[-1])
    else:
        out = {"error": f"exit {r.returncode}{' (timed out)' if r.timed_out else ''}: {r.stderr.strip()[-400:]}"}
    if cap is not None:
        out["cgroup_peak_bytes"] = r.peak_bytes
        out["cgroup_failcnt"] = r.limit_hits
    return out


def ours_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dipstream.cli.main", *args]


def child_ours(argv: list[str]) -> int:
    """In-process modes for dipstream's side: baseline RSS and perplexity."""
    mode = argv[0]
    if mode == "baseline":
        import dipstream.runtime.engine_generate  # noqa: F401
        import dipstream.runtime.generate  # noqa: F401

        print(json.dumps({"engine": "dipstream", "baseline_rss": _status("VmRSS")}))
        return 0
    spec = json.loads(argv[1])
    import torch

    from dipstream.budget import layer_keeps
    from dipstream.data.windows import Windows
    from dipstream.devices import rss_bytes
    from dipstream.engine.build import build
    from dipstream.engine.config import EngineOptions, EngineSetup
    from dipstream.evaluation.perplexity import perplexity
    from dipstream.options import CacheAwareOptions
    from dipstream.sparsity.decoding import decode_rule

    ids = torch.tensor(json.loads(Path(spec["windows"]).read_text()))
    windows = Windows(ids, [1] * ids.shape[0])
    # this process also holds torch (the one perplexity rule): its budget grows by what torch adds to
    # the generate process's baseline, so the caches get the bytes they get in the timed runs
    memory = None if spec["memory"] is None else int(spec["memory"] + rss_bytes() - spec["baseline"])
    options = EngineOptions(memory=None if memory is None else str(memory), kv_cache=spec["kv_cache"],
                            read_gap="32000", activations=spec["activations"])
    n_layers = json.loads((Path(spec["model_dir"]) / "model.json").read_text())["arch"]["shape"]["n_layers"]
    setup = EngineSetup(decode_rule(spec["method"], CacheAwareOptions(gamma=spec["gamma"])),
                        layer_keeps(spec["density"], n_layers), ids.shape[1], options, spec["threads"],
                        offload=spec["memory"] is not None)
    lm, plan = build(Path(spec["model_dir"]), setup)
    try:
        res = perplexity(lm, windows, progress=False)
    finally:
        lm.close()
    print(json.dumps({"engine": "dipstream", "perplexity": res.perplexity, "predictions": res.tokens,
                      "cache_bytes": plan.cache_bytes}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a built-in model (its GGUF is llama.cpp's input)")
    ap.add_argument("--weights", default="gguf",
                    help="dipstream's weight format (gguf: the GGUF's own blocks; float32, int8, int4: re-quantized)")
    ap.add_argument("--llama-python", default=sys.executable, help="an interpreter that has llama-cpp-python")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--scenarios", default="ram,0.75,0.5", help="ram and/or cap fractions of the model's bytes")
    ap.add_argument("--configs", default="llama.cpp,dense,dip,dip-ca")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--gamma", type=float, default=0.1, help="DIP-CA's gamma")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--llama-token-by-token", action="store_true",
                    help="llama.cpp evaluates prompts and perplexity windows one token at a time (its AMX kernels "
                         "crash on multi-token batches on some Xeons, ggml-org/llama.cpp#20824; decoding is batch 1 "
                         "either way, TTFT is slower)")
    ap.add_argument("--llama-no-repack", action="store_true",
                    help="llama.cpp keeps only its mmap of the GGUF: no repacked weight copies (extra buffer types, "
                         "e.g. Q4_K for AVX-512), which live in anonymous memory and do not fit under a cap")
    ap.add_argument("--ppl-windows", type=int, default=4, help="eval windows for perplexity (0: skip)")
    ap.add_argument("--ppl-len", type=int, default=256, help="tokens per perplexity window (BOS first)")
    ap.add_argument("--kv-cache", default="float16", help="dipstream's KV cache precision (llama.cpp's default: f16)")
    ap.add_argument("--head", default="auto", choices=("auto", "ram", "stream"),
                    help="dipstream's output head under a cap: auto (in RAM when it fits), ram, stream (read each token)")
    ap.add_argument("--activations", default="float32", choices=("float32", "int8"),
                    help="dipstream's activations in int4 products (llama.cpp quantizes them to 8 bits)")
    ap.add_argument("--out", default="results/vs_llamacpp", help="folder: runs.jsonl and table.md")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child_ours(a.child)

    from dipstream.engine.export import ensure_model_file
    from dipstream.engine.modelfile import read_manifest
    from dipstream.models.loading import BUILTIN_MODELS
    from dipstream.paths import machine

    if a.model not in BUILTIN_MODELS:
        raise SystemExit(f"--model {a.model}: use a built-in model ({', '.join(BUILTIN_MODELS)}); llama.cpp needs its GGUF")
    gguf = BUILTIN_MODELS[a.model].gguf()
    r = subprocess.run([a.llama_python, "-c", "import llama_cpp"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{a.llama_python} has no llama_cpp: pip install '.[bench]' (builds llama.cpp, 10+ min), "
                         "or pass --llama-python /path/to/python that has it")
    threads = [int(t) for t in a.threads.split(",")]
    scenarios = a.scenarios.split(",")
    configs = a.configs.split(",")
    capped = [s for s in scenarios if s != "ram"]
    if capped and not cgroup_ok():
        print(f"{why_not()}: skipping the capped scenarios {capped}")
        scenarios = [s for s in scenarios if s == "ram"]
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model_file(a.model, a.weights)
    ours_bytes = int(read_manifest(model_dir)["size"])
    llama_bytes = gguf.stat().st_size
    base = {"llama.cpp": run_child([a.llama_python, str(HERE / "llamacpp_child.py"), "baseline"], None),
            "dipstream": run_child([sys.executable, __file__, "--child", "baseline"], None)}
    for k, v in base.items():
        if "error" in v:
            raise SystemExit(f"{k} baseline failed: {v['error']}")
    meta = {"machine": machine(), "model": a.model, "gguf": gguf.name, "gguf_bytes": llama_bytes,
            "ours_weights": a.weights, "ours_file_bytes": ours_bytes, "llama_baseline_rss": base["llama.cpp"]["baseline_rss"],
            "ours_baseline_rss": base["dipstream"]["baseline_rss"], "llama_cpp_version": base["llama.cpp"].get("version"),
            "llama_cpp_system_info": base["llama.cpp"].get("system_info")}
    print(json.dumps(meta))

    def cap_of(engine: str, scen: str) -> int | None:
        """The same absolute limit for both (the peer's rule, shared/reference/peer-llamacpp.md): the
        larger baseline plus F times the GGUF's bytes."""
        if scen == "ram":
            return None
        return int(max(base["llama.cpp"]["baseline_rss"], base["dipstream"]["baseline_rss"]) + float(scen) * llama_bytes)

    from dipstream.engine.text import FolderTokenizer

    # the same work: llama.cpp's context holds the prompt and the new tokens, as our KV cache does
    n_ctx = len(FolderTokenizer(model_dir).encode(a.prompt)) + a.new_tokens + 1
    meta["llama_n_ctx"] = n_ctx

    def run_one(cfg: str, scen: str, t: int) -> dict:
        cap = cap_of(cfg, scen)
        row_file = None
        if cfg == "llama.cpp":
            spec = {"prompt": a.prompt, "new_tokens": a.new_tokens, "token_by_token": a.llama_token_by_token,
                    "no_repack": a.llama_no_repack, "n_ctx": n_ctx}
            cmd = [a.llama_python, str(HERE / "llamacpp_child.py"), "generate", str(gguf), str(t), json.dumps(spec)]
        else:
            row_file = out_dir / "row.json"
            cmd = ours_cmd(["generate", "--engine", "lean", "--model", a.model, "--weights", a.weights,
                            "--method", cfg, "--density", str(a.density), "--gamma", str(a.gamma), "--prompt", a.prompt,
                            "--max-new-tokens", str(a.new_tokens), "--no-stop-at-eos", "--no-stream",
                            "--threads", str(t), "--kv-cache", a.kv_cache, "--activations", a.activations,
                            "--head", a.head,
                            "--json", str(row_file)])
            cmd += ["--offload", str(model_dir), "--memory", str(cap)] if cap else ["--model-dir", str(model_dir)]
        drop_caches()
        load = os.getloadavg()[0]
        res = run_child(cmd, cap, row_file)
        res.update(config=cfg, scenario=scen, threads=t, cap_bytes=cap, load_before=load)
        return res

    plan = [(c, s, t) for s in scenarios for t in threads for c in configs
            if not (c == "dip-ca" and s == "ram")]
    runs = []
    with open(out_dir / "runs.jsonl", "w") as log:
        for rnd in range(a.rounds):
            order = plan[rnd % len(plan):] + plan[:rnd % len(plan)]
            for c, s, t in order:
                res = run_one(c, s, t)
                res["round"] = rnd
                runs.append(res)
                log.write(json.dumps({k: v for k, v in res.items() if k not in ("ids", "text")}) + "\n")
                log.flush()
                tps = res.get("decode_tokens_per_s")
                print(f"round {rnd} {c:>9} {s:>5} {t} threads: "
                      + (f"{tps:.2f} tok/s" if tps else res.get("error", "?")[:300]), flush=True)

    ppl = {}
    if a.ppl_windows:
        ppl = perplexities(a, gguf, model_dir, configs, scenarios, cap_of, base["dipstream"]["baseline_rss"])
    table = summarize(runs, ppl, configs, scenarios, threads)
    text = (f"machine: {meta['machine']}; {time.strftime('%Y-%m-%d')}; llama.cpp {meta['llama_cpp_version']}: "
            f"{meta['llama_cpp_system_info']}\nmodel {a.model} (llama.cpp: {gguf.name}, {llama_bytes / 1e6:.1f} MB; "
            f"dipstream: {a.weights} file, {ours_bytes / 1e6:.1f} MB); baselines llama.cpp "
            f"{meta['llama_baseline_rss'] / 1e6:.0f} MB, dipstream {meta['ours_baseline_rss'] / 1e6:.0f} MB; "
            f"{a.rounds} interleaved rounds, medians; {a.new_tokens} new tokens, greedy; density {a.density}, "
            f"gamma {a.gamma}; llama.cpp context {n_ctx} tokens (prompt + new tokens); dipstream KV cache {a.kv_cache}, "
            f"activations {a.activations}, read gap 32 kB, prefetch auto, 8 reads in flight, head {a.head}\ncommand: python benchmarks/bench_vs_llamacpp.py {' '.join(sys.argv[1:])}\n\n" + table)
    (out_dir / "table.md").write_text(text + "\n")
    (out_dir / "meta.json").write_text(json.dumps({**meta, "perplexity": {f"{k[0]}|{k[1]}": v for k, v in ppl.items()}}))
    print(text)
    return 0


def perplexities(a, gguf: Path, model_dir: Path, configs, scenarios, cap_of, ours_baseline: int) -> dict:
    """{(config, scenario): perplexity} on the same eval windows."""
    from transformers import AutoTokenizer

    from dipstream.data.corpora import load_text
    from dipstream.data.windows import make_windows
    tok = AutoTokenizer.from_pretrained(model_dir)  # the model file's tokenizer: the GGUF's
    w = make_windows(tok, load_text("wiki", "eval"), a.ppl_len, a.ppl_windows * (a.ppl_len - 1))
    wfile = Path(a.out) / "ppl_windows.json"
    wfile.write_text(json.dumps(w.input_ids.tolist()))
    out = {}
    for c in configs:
        for s in scenarios:
            if c == "dip-ca" and s == "ram":
                continue
            if c == "llama.cpp":
                if ("llama.cpp", "ram") in out:
                    out[c, s] = out["llama.cpp", "ram"]
                    continue
                r = run_child([a.llama_python, str(HERE / "llamacpp_child.py"), "perplexity", str(gguf), "2",
                               str(wfile), str(int(a.llama_token_by_token))], None)
            else:
                cap = cap_of(c, s)
                if c != "dip-ca" and (c, "ram") in out:  # dense and DIP: the cache does not change the result
                    out[c, s] = out[c, "ram"]
                    continue
                spec = {"windows": str(wfile), "model_dir": str(model_dir), "method": c, "density": a.density,
                        "memory": cap, "gamma": a.gamma, "threads": 2, "kv_cache": a.kv_cache,
                        "activations": a.activations, "baseline": ours_baseline}
                r = run_child([sys.executable, __file__, "--child", "ppl", json.dumps(spec)], None)
            out[c, s] = r.get("perplexity")
            print(f"perplexity {c} {s}: {r.get('perplexity', r.get('error'))}", flush=True)
    return out


def summarize(runs, ppl, configs, scenarios, threads) -> str:
    def med(c, s, t, key):
        vals = [r[key] for r in runs if (r["config"], r["scenario"], r["threads"]) == (c, s, t)
                and r.get(key) is not None and "error" not in r]
        return statistics.median(vals) if vals else None

    rows = ["| scenario | threads | config | decode tok/s | x llama.cpp | TTFT s | MB read / token | "
            "peak MB (cgroup) | perplexity | load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in scenarios:
        for t in threads:
            ref = med("llama.cpp", s, t, "decode_tokens_per_s")
            for c in configs:
                tps = med(c, s, t, "decode_tokens_per_s")
                if tps is None and c == "dip-ca" and s == "ram":
                    continue
                rb = med(c, s, t, "decode_read_bytes_per_token")
                peak = med(c, s, t, "cgroup_peak_bytes")
                p = ppl.get((c, s))
                ratio = f"{tps / ref:.2f}" if tps and ref else "-"
                rows.append(f"| {s} | {t} | {c} | {tps:.2f} | {ratio} | {med(c, s, t, 'ttft_s'):.3f} | "
                            f"{rb / 1e6:.1f} | {peak / 1e6 if peak else float('nan'):.0f} | "
                            f"{p if p is None else round(p, 3)} | {med(c, s, t, 'load_before'):.2f} |"
                            if tps else f"| {s} | {t} | {c} | failed | | | | | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
