"""Running the lean engine: export a model once into its quantized file, size the RAM (a
whole-process budget), build the model with its MLP backend, generate, and measure perplexity.
Used by `dipstream export`, `dipstream generate` (the lean engine is the default for the
families it runs) and the benchmarks."""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dipstream.budget import layer_keeps
from dipstream.engine.head import StreamedHead
from dipstream.engine.mlp import MaskChooser, OffloadMLP, RamMLP
from dipstream.engine.model import LeanModel
from dipstream.engine.modelfile import (FAMILIES, FORMAT, MANIFEST, arch_of, default_head, read_manifest,
                                        write_model_file)
from dipstream.engine.qmatrix import FORMATS
from dipstream.errors import DipstreamError
from dipstream.io import folder_lock
from dipstream.paths import cache_root
from dipstream.simulator.hardware import fmt_bytes

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MARGIN = 1 << 20  # RAM left for Python's own growth and numpy temporaries (peak RSS is checked in tests)


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent
    that started it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def disk_read_bytes() -> int:
    """Bytes this process has read from storage (the page cache excluded), or -1."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


@dataclass
class EngineOptions:
    """The lean engine (`--engine lean`): weights, the model file, the whole-process budget."""

    engine: str = field(default="auto", metadata={
        "help": "auto (the lean engine for the families it runs: Llama-style and Gemma 3, without adapters "
                "or CUDA; else the Hugging Face model), lean or hf", "choices": ("auto", "lean", "hf")})
    head_weights: str | None = field(default=None, metadata={
        "help": "lean engine: format of the embedding / output head (default: --weights; int8 with int4, "
                "as GGUF Q4 files keep it in Q8_0)",
        "choices": FORMATS})
    model_dir: str | None = field(default=None, metadata={
        "help": "lean engine: folder of the exported model file (default: in dipstream's cache; written "
                "on first use)", "metavar": "DIR"})
    read_gap: str = field(default="32kB", metadata={
        "help": "lean engine with --offload: missed units closer than this in the file are read in one request "
                "(reading through the gap is cheaper than another request; 0: exact reads)", "metavar": "BYTES"})
    kv_cache: str = field(default="float32", metadata={
        "help": "lean engine: KV cache precision (float16 halves it, as llama.cpp's default; float32 gives the "
                "Hugging Face model's numbers exactly)", "choices": ("float32", "float16")})
    prefetch: str = field(default="auto", metadata={
        "help": "lean engine with --offload: start the next hook's reads before this hook's product: predicted "
                "(the units it will probably select), uncached (every unit it does not cache), auto (uncached "
                "where records are at most half --read-gap, else predicted) or off",
        "choices": ("auto", "predicted", "uncached", "off")})
    activations: str = field(default="float32", metadata={
        "help": "lean engine: int8 multiplies int4 and int8 weights (the head too) by activations quantized to 8 "
                "bits per group of 32 inputs (as llama.cpp does; integer products, about 2x faster, a small "
                "perplexity cost), float32 exact",
        "choices": ("float32", "int8")})
    head: str = field(default="auto", metadata={
        "help": "lean engine: where the output head (and embedding) lives: ram, stream (read from the model "
                "file each token: its RAM goes to the MLP caches) or auto (stream only when --memory cannot "
                "hold it); with --offload an untied embedding is always read from the file, one row a token",
        "choices": ("auto", "ram", "stream")})
    memory: str | None = field(default=None, metadata={
        "help": "lean engine with --offload: RAM budget for the whole process (bytes, e.g. '200MB'): what "
                "Python, the libraries, the static weights, the KV cache and the buffers leave goes to the "
                "MLP caches (default: size the caches by --dram as `simulate` does)", "metavar": "BYTES"})


@dataclass
class ExportConfig:
    """Export a model into the lean engine's quantized model file."""

    model: str = field(default="smollm2-135m", metadata={
        "help": "built-in model name (see `dipstream models`) or a local HF checkpoint folder"})
    weights: str = field(default="float32", metadata={
        "help": "format of every weight matrix: float32, int8, int4 (4-bit in groups of 32)", "choices": FORMATS})
    head_weights: str | None = field(default=None, metadata={
        "help": "format of the embedding / output head (default: --weights; int8 with int4)",
        "choices": FORMATS})
    model_dir: str | None = field(default=None, metadata={
        "help": "folder to write (default: in dipstream's cache, where `generate` looks)", "metavar": "DIR"})


def run_export(cfg: ExportConfig) -> dict:
    """Write (or find) the model file; returns {model_dir, bytes, formats}."""
    from dipstream.validation import output_dir

    output_dir("model_dir", cfg.model_dir)
    d = ensure_model_file(cfg.model, cfg.weights, cfg.head_weights, cfg.model_dir)
    m = read_manifest(d)
    return {"model_dir": str(d), "bytes": int(m["size"]), "weights": m["mlp_fmt"], "head_weights": m["head_fmt"],
            "family": m["arch"]["family"]}


def runs_lean(model_type: str) -> bool:
    return model_type in FAMILIES


def default_model_dir(model: str, weights: str, head: str) -> Path:
    return cache_root() / "engine" / f"{Path(model).name}-{weights}-{head}-{FORMAT.split('/')[-1]}"


def ensure_model_file(model: str, weights: str, head: str | None = None, directory: str | None = None) -> Path:
    """The exported model file of `model` (built-in name or HF folder) in these formats, written
    once under a lock (exporting loads the Hugging Face stack; reusing the file does not)."""
    head = head or default_head(weights)
    d = Path(directory) if directory else default_model_dir(model, weights, head)
    if (d / MANIFEST).exists():
        m = read_manifest(d)
        if (m["mlp_fmt"], m["static_fmt"], m["head_fmt"]) != (weights, weights, head):
            raise DipstreamError(f"{d} holds {m['mlp_fmt']} / {m['head_fmt']} weights, not {weights} / {head}; "
                                 "use another --model-dir")
        return d
    from dipstream.models.loading import resolve_checkpoint

    name, ckpt = resolve_checkpoint(model)
    with folder_lock(d, "model export", wait=True):
        if not (d / MANIFEST).exists():
            write_model_file(ckpt, d, name, weights, weights, head)
    return d


def build(directory: Path, method: str, density: float, max_seq: int, *, offload: bool = False,
          cache_bytes: int | None = None, memory: int | None = None, policy: str = "lru",
          policy_kwargs: dict | None = None, up_keep=None, down_keep=None, gamma: float = 0.1,
          n0_frac: float = 0.5, warmup: bool = True, keep_file: str | None = None, threads: int = 1, io_threads: int = 4,
          direct: bool = True, record_masks: bool = False, read_gap: int = 0,
          prefetch: str | bool = "auto", kv_cache: str = "float32", head: str = "auto",
          activations: str = "float32") -> tuple[LeanModel, dict]:
    """The lean model with its MLP backend and a description of its RAM. With `offload`, the
    MLP caches get `cache_bytes`, or what `memory` (the whole process) leaves after the RSS now,
    the static weights, the KV cache, the buffers and a margin. `head`: ram, stream (read from
    the file each token) or auto (stream only when a --memory budget cannot hold it). Offloaded,
    an untied embedding is always read from the file (one record per token)."""
    baseline = rss_bytes()
    if head == "auto":
        fits = memory is None or not offload or \
            baseline + ram_before_caches(read_manifest(directory), max_seq, kv_cache, stream_embed=True) + MARGIN \
            <= memory
        head = "ram" if fits else "stream"
    lm = LeanModel(directory, max_seq, threads, kv_dtype=kv_cache, head=head, io_threads=io_threads,
                   activations=activations, stream_embed=offload)
    a = lm.arch
    keeps = layer_keeps(density, lm.L, up_keep, down_keep, keep_file)
    chooser = MaskChooser(method, [keeps.k_in(i, lm.d) for i in range(lm.L)],
                          [keeps.k_out(i, lm.D) for i in range(lm.L)], gamma, n0_frac, warmup)
    info = {"baseline_rss": baseline, "static_bytes": lm.static_bytes, "kv_bytes": lm.kv_bytes,
            "family": a["family"], "weights": lm.manifest["mlp_fmt"], "head_weights": lm.manifest["head_fmt"],
            "head": head, "activations": activations}
    if not offload:
        lm.mlp = RamMLP(lm, chooser, record_masks)
        info.update(mlp_ram_bytes=lm.mlp.bytes)
        return lm, info
    if cache_bytes is None:
        if memory is None:
            raise DipstreamError("give --memory (or --dram) to size the offloaded MLP's caches")
        man = lm.manifest
        n = {"in": lm.d, "out": lm.D}
        fixed = OffloadMLP.fixed_bytes(n, {k: lm.mlp_stride(k) for k in n}, mlp_header_bytes(man), lm.L)
        now = rss_bytes()  # Python, libraries, static weights and the (touched) KV cache
        cache_bytes = int(memory - now - fixed - MARGIN)
        if cache_bytes < 0:
            need = now + fixed + MARGIN
            raise DipstreamError(f"--memory {fmt_bytes(memory)} is below what the process needs before any MLP "
                                 f"cache (Python and libraries {fmt_bytes(baseline)}, static weights "
                                 f"{fmt_bytes(lm.static_bytes)}, KV cache {fmt_bytes(lm.kv_bytes)}, buffers "
                                 f"{fmt_bytes(fixed)}, margin {fmt_bytes(MARGIN)}); give more than "
                                 f"{fmt_bytes(need, round_up=True).replace(' ', '')}")
        info["model_file_bytes"] = int(man["size"])
    lm.mlp = OffloadMLP(lm, chooser, cache_bytes, policy, io_threads, direct, record_masks, read_gap, prefetch,
                        **(policy_kwargs or {}))
    info.update(cache_bytes=int(cache_bytes), mlp_ram_bytes=lm.mlp.ram_bytes, cache_ram_bytes=lm.mlp.cache_ram,
                direct_io=lm.mlp.direct, capacity_in=lm.mlp.capacity["layers.0.in"],
                capacity_out=lm.mlp.capacity["layers.0.out"], memory_budget=memory,
                preload_bytes=lm.mlp.preload_bytes)
    return lm, info


def ram_before_caches(manifest: dict, max_seq: int, kv_cache: str = "float32", head: str = "ram",
                      stream_embed: bool = False) -> int:
    """Weight and KV bytes an offloaded run holds before any MLP cache: the static weights and
    their headers (a streamed head or embedding: its headers and chunk buffers), the KV cache at
    `max_seq`, the MLP's read buffers and headers."""
    infos = manifest["tensor_info"]
    a = manifest["arch"]
    streamed = ("head", "embed") if head == "stream" else ("embed",) if stream_embed else ()
    static = sum(t.nbytes + t.header_bytes for n, t in infos.items()
                 if not n.endswith(("mlp_in", "mlp_out")) and n not in streamed)
    for n in streamed:
        if n in infos:
            t = infos[n]
            static += t.header_bytes + (StreamedHead.buffer_bytes(t) if n == "head" else 0)
    kv = 2 * (2 if kv_cache == "float16" else 4) * a["n_layers"] * a["n_kv"] * max_seq * a["head_dim"]
    n = {"in": a["d"], "out": a["D"]}
    stride = {k: infos[f"layers.0.mlp_{k}"].stride for k in n}
    return int(static + kv + OffloadMLP.fixed_bytes(n, stride, mlp_header_bytes(manifest), a["n_layers"]))


def mlp_header_bytes(manifest: dict) -> int:
    """RAM of the MLP records' headers (resident while the records are offloaded)."""
    return sum(t.header_bytes for name, t in manifest["tensor_info"].items() if name.endswith(("mlp_in", "mlp_out")))


def pick(logits: np.ndarray, sample: bool, temperature: float, top_k: int, rng) -> int:
    if not sample:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / max(temperature, 1e-6)
    if top_k > 0:
        kth = np.partition(z, -min(top_k, z.size))[-min(top_k, z.size)]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    return int(rng.choice(z.size, p=p / p.sum()))


def generate(lm: LeanModel, ids: list[int], max_new: int, eos=(), stop_at_eos: bool = True,
             sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
             on_token=None) -> dict:
    """Prompt pass (token by token through the same path) and decode. Returns ids, timings and
    the bytes this process read from storage in each phase (-1 where unknown)."""
    rng = np.random.default_rng(seed)
    lm.new_sequence()
    rb0 = disk_read_bytes()
    t0 = time.perf_counter()
    logits = None
    for pos, tok in enumerate(ids):
        logits = lm.forward(tok, pos)
    nxt = pick(logits, sample, temperature, top_k, rng)
    ttft = time.perf_counter() - t0
    out, steps = [nxt], []
    rb1 = disk_read_bytes()
    if on_token:
        on_token(out)
    pos = len(ids)
    while len(out) < max_new and not (stop_at_eos and nxt in eos):
        t = time.perf_counter()
        logits = lm.forward(nxt, pos)
        nxt = pick(logits, sample, temperature, top_k, rng)
        steps.append(time.perf_counter() - t)
        pos += 1
        out.append(nxt)
        if on_token:
            on_token(out)
    rb2 = disk_read_bytes()
    ok = min(rb0, rb1, rb2) >= 0
    return {"ids": out, "ttft_s": ttft, "step_s": steps, "prompt_read_bytes": rb1 - rb0 if ok else -1,
            "decode_read_bytes": rb2 - rb1 if ok else -1}


def perplexity(lm: LeanModel, windows: np.ndarray) -> tuple[float, int]:
    """Perplexity over token windows (n, T) (BOS first), every prediction counted, a fresh cache
    per window. Returns (perplexity, predictions)."""
    nll, n = 0.0, 0
    for w in np.asarray(windows):
        lm.new_sequence()
        for pos in range(len(w) - 1):
            z = lm.forward(int(w[pos]), pos).astype(np.float64)
            zmax = z.max()
            nll += float(np.log(np.exp(z - zmax).sum()) + zmax - z[int(w[pos + 1])])
            n += 1
    return math.exp(nll / n), n


def arch_supported(config: dict) -> bool:
    try:
        arch_of(config)
        return True
    except DipstreamError:
        return False
