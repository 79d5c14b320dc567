"""`dipstream generate` on the Hugging Face model (`--engine hf`, and the fallback for families the
lean engine does not run, adapters and CUDA): stream text token by token with a KV cache, the
MLPs run for real.

Dense runs the model unchanged. ``dip`` runs every block's MLP through the in-RAM runtime (the
fused sparse kernel reads only the selected weight rows; float32, int8 or 4-bit weights; Triton on
CUDA). With ``--offload DIR`` the MLP weights live in a file on disk and the MLP caches and one
read buffer share what ``--dram`` leaves after the static layers, as the simulator places them
(:mod:`dipstream.runtime.offload`); ``dense``, ``dip`` and ``dip-ca`` all run from that file.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict

import torch
from torch import nn

from dipstream import __version__
from dipstream.budget import layer_keeps
from dipstream.errors import DipstreamError
from dipstream.io import write_json_atomic
from dipstream.models import load_model
from dipstream.models.loading import refuse_moe
from dipstream.models.adapter_folder import apply_adapter
from dipstream.models.arch import mlp_parts
from dipstream.paths import machine
from dipstream.runtime.options import GenerateConfig
from dipstream.runtime.decode import (
    attach_runtime,
    decode_tokens,
    detach_runtime,
)
from dipstream.runtime.in_memory import InMemoryRuntime, runtime_activation
from dipstream.runtime.offload import OffloadRuntime, static_ram_bytes
from dipstream.runtime.offload_file import Layout, ensure_offload
from dipstream.runtime.streaming import text_streamer
from dipstream.simulator import save_trace
from dipstream.simulator.hardware import fmt_bytes, parse_dram
from dipstream.sparsity import build_method
from dipstream.sparsity.methods import MethodOptions

def _device(cfg: GenerateConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DipstreamError("--device cuda: no CUDA device is available")
        if cfg.offload:
            if cfg.device == "cuda":
                raise DipstreamError("the offloading runtime runs on the CPU only (no GPU "
                                     "variant is implemented); use --device cpu")
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def _prompt_ids(tok, cfg: GenerateConfig) -> torch.Tensor:
    if cfg.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": cfg.prompt}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tok(cfg.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise DipstreamError("the prompt is empty after tokenization; give some text")
    return ids


def _eos_ids(tok, model) -> set:
    eos = set()
    for e in (getattr(tok, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        eos.update(e if isinstance(e, (list, tuple)) else ([] if e is None else [e]))
    return eos


def _offload_runtime(cfg: GenerateConfig, lm, parts, method, k_in, k_out, seq_len: int, row: dict):
    """The offloading runtime: the MLP file (written on first use) and the RAM --dram leaves for
    MLP caches after the static layers."""
    shape = lm.info.shape
    lay = Layout(len(parts), parts[0].d_model, parts[0].d_ff)
    dram = parse_dram(cfg.dram, shape.weight_bytes({k: 32 for k in ("attention", "mlp", "lm_head",
                                                                    "embedding")}))
    static = static_ram_bytes(shape, seq_len)
    if dram < static:
        raise DipstreamError(f"--dram {fmt_bytes(dram)} is smaller than the static layers and KV cache "
                             f"({fmt_bytes(static)}); give at least {fmt_bytes(static)} plus the MLP's read "
                             "buffer")
    t0 = time.perf_counter()
    bf, written = ensure_offload(cfg.offload, parts, lm.name, direct=cfg.direct_io,
                                 io_threads=cfg.io_threads, verify=cfg.verify)
    try:
        runtime = OffloadRuntime(bf, runtime_activation(parts[0].act_name), method, k_in, k_out,
                                 int(dram - static), shape, seq_len, cfg.cache.policy, record_masks=True,
                                 min_dram=static, **cfg.policy_kwargs())
    except BaseException:
        bf.close()
        raise
    row.update(offload_dir=str(cfg.offload), offload_written=written, offload_open_s=time.perf_counter() - t0,
               direct_io=bf.direct, dram_budget_bytes=dram, static_bytes=static, mlp_bytes=lay.mlp_bytes,
               policy=cfg.cache.policy, hot_profile=cfg.hot_profile, io_threads=cfg.io_threads, ram_mlp_bytes=runtime.ram_bytes(),
               cache_bytes=runtime.cache_bytes, read_buffer_bytes=runtime.read_bytes,
               sim_dram_bytes=runtime.sim_dram_bytes, sim_seq_len=runtime.seq_len,
               capacity_in=runtime.capacity["layers.0.in"], capacity_out=runtime.capacity["layers.0.out"])
    return runtime, bf


def run_hf(cfg: GenerateConfig, out=None) -> dict:
    """Generate on the Hugging Face model with the sparse MLP runtimes (streaming to ``out``,
    default stdout, when cfg.stream); returns a results row."""
    out = out or sys.stdout
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = _device(cfg)
    if dev.type == "cuda" and cfg.weights != "float32":
        raise DipstreamError(f"--weights {cfg.weights} runs on the CPU kernel; add --device cpu")
    if dev.type == "cuda" and cfg.adapter and cfg.method == "dip":
        raise DipstreamError("--adapter with --method dip runs on the CPU (the LoRA terms stay "
                             "there); add --device cpu")
    method = build_method(cfg.method, cfg.density, MethodOptions(**asdict(cfg.dip), **asdict(cfg.ca)))
    refuse_moe(cfg.model, "generate")  # before loading (the lean engine refuses it by its architecture table)
    lm = load_model(cfg.model)
    row_adapter = apply_adapter(lm, cfg.adapter, method) if cfg.adapter else {}
    model, tok = lm.model, lm.tokenizer
    parts = mlp_parts(model)
    L, d, D = len(parts), parts[0].d_model, parts[0].d_ff
    keeps = layer_keeps(cfg.density, L, cfg.dip.up_keep, cfg.dip.down_keep, cfg.dip.keep_file)
    k_in = [keeps.k_in(i, d) for i in range(L)]
    k_out = [keeps.k_out(i, D) for i in range(L)]
    ids = _prompt_ids(tok, cfg)
    P = int(ids.shape[1])
    row = {"model": lm.name, "method": cfg.method, "density_requested": cfg.density, "engine": "hf",
           "weights": cfg.weights, "prompt_tokens": P, "device": str(dev),
           "threads": torch.get_num_threads(), **row_adapter}
    runtime, originals, bf = None, None, None
    try:
        if cfg.offload:
            runtime, bf = _offload_runtime(cfg, lm, parts, method, k_in, k_out,
                                           P + cfg.decoding.max_new_tokens, row)
            originals = attach_runtime(model, runtime)
            _release_mlp_weights(parts)
        elif cfg.method == "dip":
            runtime = InMemoryRuntime(parts, k_in, k_out, cfg.weights, dev if dev.type == "cuda" else None,
                                      record_masks=bool(cfg.trace))
            originals = attach_runtime(model, runtime)
        if dev.type == "cuda":
            model.to(dev, torch.bfloat16)
            ids = ids.to(dev)
        on_token = text_streamer(out, lambda g: tok.decode(g, skip_special_tokens=True), cfg.stream, cfg.prompt)
        res = decode_tokens(model, ids, cfg.decoding, _eos_ids(tok, model), on_token)
        if cfg.stream:
            out.write("\n")
        steps = res["step_s"]
        row.update(new_tokens=len(res["ids"]), ttft_s=res["ttft_s"], decode_steps=len(steps),
                   decode_s=sum(steps), decode_tokens_per_s=(len(steps) / sum(steps)) if steps else None,
                   ids=res["ids"], text=tok.decode(res["ids"], skip_special_tokens=True))
        if runtime is not None:
            row.update(runtime.stats(len(steps)))
        if cfg.trace and runtime is not None:
            meta = {"model": lm.name, "method": cfg.method, "density": cfg.density, **lm.info.shape.to_dict()}
            save_trace(runtime.trace(P, meta), cfg.trace)
            row["trace"] = cfg.trace
    finally:
        if bf is not None:
            bf.close()
        if originals is not None and not cfg.offload:
            detach_runtime(model, originals)
    row["machine"] = machine()
    row["dipstream"] = __version__
    if cfg.json:
        write_json_atomic(cfg.json, row)
    return row


def _release_mlp_weights(parts) -> None:
    """Offloading: the MLP weights now live in the file; drop the in-RAM copies."""
    for p in parts:
        for lin in p.module.children():
            if isinstance(lin, nn.Linear):
                lin.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        p.gate_weight = p.up_weight = p.down_weight = None
