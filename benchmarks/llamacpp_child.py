"""llama.cpp's side of benchmarks/bench_vs_llamacpp.py, run in its own process (possibly under a
memory cap) by an interpreter that has llama-cpp-python. Standard library, numpy and llama_cpp
only. Prints one JSON object.

  python llamacpp_child.py baseline
  python llamacpp_child.py generate GGUF THREADS '{"prompt": "...", "new_tokens": 64}'
  python llamacpp_child.py perplexity GGUF THREADS WINDOWS.json
"""

from __future__ import annotations

import json
import sys
import time


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return -1


def _load(gguf: str, threads: int, n_ctx: int, logits_all: bool = False, no_repack: bool = False):
    from llama_cpp import Llama

    if no_repack:  # llama-cpp-python has no argument for it: default model params without extra buffers
        import llama_cpp.llama as L

        default = L.llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        L.llama_cpp.llama_model_default_params = params

    return Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                 use_mmap=True, verbose=False)


def _last_logits(llm):
    """The last evaluated token's logits (llama-cpp-python 0.3 keeps none without logits_all)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def _eval(llm, ids: list[int], token_by_token: bool) -> None:
    """Evaluate ids as one batch, or one token at a time: llama.cpp's AMX kernels crash on
    multi-token batches on some Xeons (ggml-org/llama.cpp#20824) while its batch-1 path is fine."""
    for chunk in ([[t] for t in ids] if token_by_token else [ids]):
        llm.eval(chunk)


def generate(gguf: str, threads: int, spec: dict) -> dict:
    """Greedy decoding of spec["new_tokens"] tokens (EOS not stopping), token by token."""
    import numpy as np

    t0 = time.perf_counter()
    llm = _load(gguf, threads, spec.get("n_ctx", 512), no_repack=spec.get("no_repack", False))
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(spec["prompt"].encode(), add_bos=spec.get("add_bos", False), special=False)
    rb0 = _read_bytes()
    t0 = time.perf_counter()
    _eval(llm, ids, spec.get("token_by_token", False))
    nxt = int(np.argmax(_last_logits(llm)))
    ttft = time.perf_counter() - t0
    out, steps = [nxt], []
    rb1 = _read_bytes()
    while len(out) < spec["new_tokens"]:
        t = time.perf_counter()
        llm.eval([nxt])
        nxt = int(np.argmax(_last_logits(llm)))
        steps.append(time.perf_counter() - t)
        out.append(nxt)
    rb2 = _read_bytes()
    return {"engine": "llama.cpp", "prompt_tokens": len(ids), "new_tokens": len(out), "ids": out,
            "text": llm.detokenize(out).decode(errors="replace"), "load_s": load_s, "ttft_s": ttft,
            "decode_tokens_per_s": len(steps) / sum(steps), "prompt_read_bytes": rb1 - rb0,
            "decode_read_bytes_per_token": (rb2 - rb1) / max(len(steps), 1), "peak_rss_bytes": _status("VmHWM"),
            "rss_bytes": _status("VmRSS")}


def perplexity(gguf: str, threads: int, windows: list[list[int]], token_by_token: bool = False) -> dict:
    """Perplexity over token windows (each evaluated from an empty cache; every prediction
    counted), from llama.cpp's logits."""
    import numpy as np

    llm = _load(gguf, threads, max(len(w) for w in windows), logits_all=True)
    nll, n = 0.0, 0
    for w in windows:
        llm.reset()
        _eval(llm, w, token_by_token)
        z = np.asarray(llm.scores[:len(w) - 1], np.float64)
        zmax = z.max(1, keepdims=True)
        lse = np.log(np.exp(z - zmax).sum(1)) + zmax[:, 0]
        nll += float((lse - z[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    return {"engine": "llama.cpp", "perplexity": float(np.exp(nll / n)), "predictions": n}


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "baseline":
        import llama_cpp  # noqa: F401
        import numpy  # noqa: F401

        res = {"engine": "llama.cpp", "baseline_rss": _status("VmRSS"), "version": llama_cpp.__version__,
               "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
    elif mode == "generate":
        res = generate(argv[1], int(argv[2]), json.loads(argv[3]))
    elif mode == "perplexity":
        with open(argv[3]) as f:
            res = perplexity(argv[1], int(argv[2]), json.load(f), len(argv) > 4 and argv[4] == "1")
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
