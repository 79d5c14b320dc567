"""`dipstream generate` on the lean engine (:mod:`dipstream.engine`): the model file exported once
(in --model-dir or, with --offload DIR, in DIR), every weight in its --lean-weights format, the MLP
in RAM or offloaded with its caches sized by --memory (the whole process) or --dram (weights and KV
cache, as `simulate` places DRAM)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dipstream import __version__
from dipstream.engine.modelfile import read_manifest
from dipstream.engine.text import encode_and_release
from dipstream.engine.run import (build, disk_read_bytes, ensure_model_file, generate, peak_rss_bytes,
                                  ram_before_caches, rss_bytes)
from dipstream.errors import DipstreamError
from dipstream.io import write_json_atomic
from dipstream.paths import machine
from dipstream.runtime.streaming import text_streamer
from dipstream.simulator import save_trace
from dipstream.simulator.hardware import fmt_bytes, parse_bytes, parse_dram


def _tokenizer(directory: Path, cfg):
    if cfg.chat:  # chat templates need transformers' tokenizer
        from transformers import AutoTokenizer

        from dipstream.models.loading import resolve_checkpoint

        tok = AutoTokenizer.from_pretrained(resolve_checkpoint(cfg.model)[1])
        ids = tok.apply_chat_template([{"role": "user", "content": cfg.prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids), (lambda t: tok.decode(t, skip_special_tokens=True))
    ids, text = encode_and_release(directory / "tokenizer.json", cfg.prompt)
    return ids, text.decode


def _eos(directory: Path, arch: dict) -> set:
    eos = set()
    for e in [arch.get("eos")] + ([json.loads((directory / "generation_config.json").read_text()).get("eos_token_id")]
                                  if (directory / "generation_config.json").exists() else []):
        eos.update(e if isinstance(e, list) else ([] if e is None else [e]))
    return eos


def run_lean(cfg, out=None) -> dict:
    """The lean engine's generate run; returns the results row."""
    out = out or sys.stdout
    o = cfg.lean
    directory = ensure_model_file(cfg.model, cfg.weights, o.head_weights, cfg.offload or o.model_dir)
    ids, decode = _tokenizer(directory, cfg)
    if not ids:
        raise DipstreamError("the prompt is empty after tokenization; give some text")
    threads = cfg.threads or 1
    d = cfg.decoding
    seq = len(ids) + d.max_new_tokens
    kw = dict(policy=cfg.cache.policy, policy_kwargs=cfg.policy_kwargs(), up_keep=cfg.dip.up_keep,
              down_keep=cfg.dip.down_keep, keep_file=cfg.dip.keep_file, gamma=cfg.ca.gamma, n0_frac=cfg.ca.n0_frac, warmup=cfg.ca.warmup,
              threads=threads, io_threads=cfg.io_threads, direct=cfg.direct_io, record_masks=bool(cfg.trace),
              read_gap=int(parse_bytes(o.read_gap)), prefetch=o.prefetch,
              kv_cache=o.kv_cache, head=o.head, activations=o.activations)
    cache_bytes = None
    memory = parse_bytes(o.memory) if o.memory else None
    if cfg.offload and memory is None:  # --dram: weights and KV cache, static first (as simulate)
        man = read_manifest(directory)
        weights = sum(t.nbytes + t.header_bytes for t in man["tensor_info"].values())
        dram = parse_dram(cfg.dram, weights)
        need = ram_before_caches(man, seq, o.kv_cache, "stream" if o.head == "stream" else "ram", stream_embed=True)
        cache_bytes = int(dram - need)
        if cache_bytes < 0:
            raise DipstreamError(f"--dram {fmt_bytes(dram)} is below the static weights, KV cache and read "
                                 f"buffers ({fmt_bytes(need)}); give more than "
                                 f"{fmt_bytes(need, round_up=True).replace(' ', '')}, or size the process with --memory")
    t_load = time.perf_counter()
    lm, info = build(directory, cfg.method, cfg.density, seq, offload=bool(cfg.offload), cache_bytes=cache_bytes,
                     memory=memory, **kw)
    load_s = time.perf_counter() - t_load
    row = {"model": cfg.model, "method": cfg.method, "density_requested": cfg.density, "engine": "lean",
           "prompt_tokens": len(ids), "threads": threads, "model_dir": str(directory), "load_s": load_s, **info}
    if cfg.offload:
        row.update(policy=cfg.cache.policy, hot_profile=cfg.hot_profile)
    on_token = text_streamer(out, decode, cfg.stream, cfg.prompt)
    rb0 = disk_read_bytes()
    try:
        res = generate(lm, ids, d.max_new_tokens, _eos(directory, lm.arch), d.stop_at_eos, d.sample,
                       d.temperature, d.top_k, d.sample_seed, on_token)
        if cfg.stream:
            out.write("\n")
        steps = res["step_s"]
        n = max(len(steps), 1)
        c = lm.mlp.counters
        tokens = max(c.tokens, 1)
        head_read = lm.streamed_bytes  # a streamed head's and embedding's reads
        row.update(new_tokens=len(res["ids"]), ttft_s=res["ttft_s"], decode_steps=len(steps), decode_s=sum(steps),
                   decode_tokens_per_s=len(steps) / sum(steps) if steps else None, ids=res["ids"],
                   text=decode(res["ids"]), mlp_s_per_token=c.mlp_s / tokens,
                   disk_bytes_per_token=(c.disk_bytes + head_read) / tokens, reads_per_token=c.reads / tokens,
                   head_disk_bytes_per_token=head_read / tokens,
                   ram_bytes_per_token=c.ram_bytes / tokens, io_wait_s_per_token=c.io_wait_s / tokens,
                   prefetch_bytes_per_token=c.prefetch_bytes / tokens,
                   prefetch_precision=c.prefetch_useful / c.prefetch_units if c.prefetch_units else None,
                   prefetch_recall=c.prefetch_served / c.missed_units if c.missed_units else None,
                   hit_rate=c.hit_rate_sum / c.hit_rate_n if c.hit_rate_n else None,
                   density_measured=c.selected_bytes / tokens / (lm.L * (lm.d * lm.mlp_stride("in")
                                                                       + lm.D * lm.mlp_stride("out"))),
                   rss_bytes=rss_bytes(), peak_rss_bytes=peak_rss_bytes(), decode_steps_timed=n,
                   prompt_read_bytes=res["prompt_read_bytes"],
                   decode_read_bytes_per_token=res["decode_read_bytes"] / n if res["decode_read_bytes"] >= 0 else None)
        rb1 = disk_read_bytes()
        if rb0 >= 0 and rb1 >= 0:
            row["process_disk_read_bytes"] = rb1 - rb0
        if cfg.trace:
            meta = {"model": cfg.model, "method": cfg.method, "density": cfg.density, **lm.arch_shape().to_dict()}
            save_trace(lm.mlp.rec.trace(lm, len(ids), meta), cfg.trace)
            row["trace"] = cfg.trace
    finally:
        if hasattr(lm.mlp, "close"):
            lm.mlp.close()
        lm.close()
    row["machine"] = machine()
    row["dipstream"] = __version__
    if cfg.json:
        write_json_atomic(cfg.json, row)
    return row
