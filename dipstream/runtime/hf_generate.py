"""`dipstream generate` on the Hugging Face model: where the engine does not go (CUDA, or `--engine
hf` as a reference), a thin front end over the same decode loop, sampler, prompt and results as the
engine (:mod:`dipstream.engine.decode`, :mod:`dipstream.engine.text`). Dense runs the model
unchanged; ``dip`` replaces each block's MLP by a removable module running the fused sparse kernel
(`kernels.sparse_mlp`: the native C gather-GEMV on the CPU, Triton on CUDA) token by token.
LoRA adapters are merged into the weights, as the engine's export merges them."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch import nn

from dipstream import __version__
from dipstream.budget import layer_keeps
from dipstream.engine.decode import generate, timing_row
from dipstream.engine.text import encode_prompt, eos_ids, text_streamer
from dipstream.errors import DipstreamError
from dipstream.io import write_json_atomic
from dipstream.kernels.sparse_mlp import ACTIVATIONS, SparseMLPWeights, sparse_mlp
from dipstream.models import load_model
from dipstream.models.adapter_folder import inject_lora
from dipstream.models.adapters import merge_lora
from dipstream.models.arch import mlp_parts, replace_mlps, restore_mlps
from dipstream.models.loading import refuse_moe, resolve_checkpoint
from dipstream.names import layer_key
from dipstream.paths import machine
from dipstream.simulator import save_trace
from dipstream.simulator.trace import TraceRecorder, hook_specs


class RuntimeMLP(nn.Module):
    """Stands in for one block's MLP: its tokens through `runtime.run(layer, x)`."""

    def __init__(self, runtime, layer: int):
        super().__init__()
        self.layer = layer
        self._runtime = [runtime]  # plain list: not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = self._runtime[0].run(self.layer, flat)
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


class InMemoryRuntime:
    """DIP over every layer of `model` (its MLP `parts`), `k_in` / `k_out` per layer, on `device`
    (CUDA: bfloat16 and the Triton kernel); `record` keeps every token's masks for a trace."""

    def __init__(self, model, parts, shape, k_in, k_out, device=None, record: bool = False):
        if parts[0].act_name not in ACTIVATIONS:
            raise DipstreamError(f"the sparse kernel runs the activations {sorted(ACTIVATIONS)}, not "
                                 f"'{parts[0].act_name}'")
        self.k_in, self.k_out, self.act = list(k_in), list(k_out), parts[0].act_name
        dt = torch.float32 if device is None or device.type == "cpu" else torch.bfloat16
        self.w = [SparseMLPWeights(p.gate_weight, p.up_weight, p.down_weight, device=device, dtype=dt) for p in parts]
        self.rec = TraceRecorder(hook_specs(shape, "dip")) if record else None
        self.mlp_s = 0.0
        self.model, self._originals = model, replace_mlps(model, lambda i, _: RuntimeMLP(self, i))

    def detach(self) -> None:
        restore_mlps(self.model, self._originals)

    def run(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y, s_in, s_out = sparse_mlp(self.w[layer], x, self.k_in[layer], self.k_out[layer], self.act,
                                    return_indices=True)
        if self.rec is not None:
            for kind, idx in (("in", s_in), ("out", s_out)):
                for s in (idx if isinstance(idx, list) else [idx]):
                    self.rec.add_units(layer_key(layer, kind), s.cpu().numpy())
        if x.shape[0] == 1:
            self.mlp_s += time.perf_counter() - t0
        return y


class HfDecoder:
    """A transformers CausalLM as a decoder (`engine.decode`): its own KV cache, the logits of the
    last position as a float32 numpy vector."""

    def __init__(self, model, device: torch.device):
        from transformers import DynamicCache

        self.model, self.device, self._cache_type = model, device, DynamicCache
        self.cache = None

    def reset(self) -> None:
        self.cache = self._cache_type(config=self.model.config)

    def _logits(self, ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=self.cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float().cpu().numpy()

    def prefill(self, ids) -> np.ndarray:
        return self._logits(list(ids))

    def step(self, tok: int, pos: int) -> np.ndarray:
        return self._logits([tok])


def _device(cfg) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DipstreamError("--device cuda: no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def run_hf(cfg, out=None) -> dict:
    """Generate `cfg` (a GenerateConfig) on the Hugging Face model (streaming to ``out``, default
    stdout, when cfg.stream); returns a results row."""
    out = out or sys.stdout
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = _device(cfg)
    refuse_moe(cfg.model, "generate")  # before loading
    lm = load_model(cfg.model)
    row = {"model": lm.name, "method": cfg.method, "density_requested": cfg.density, "engine": "hf",
           "weights": "float32" if dev.type == "cpu" else "bfloat16", "device": str(dev),
           "threads": torch.get_num_threads()}
    if cfg.file.adapter:
        meta, n_lora = inject_lora(lm, cfg.file.adapter)
        row.update(adapter=str(cfg.file.adapter), adapter_method=meta.get("method"), adapter_weights=n_lora,
                   adapters_merged=merge_lora(lm.model))
    folder = resolve_checkpoint(cfg.model)[1]
    ids, decode = encode_prompt(folder, cfg.prompt, cfg.chat)
    row["prompt_tokens"] = len(ids)
    model = lm.model
    if dev.type == "cuda":
        model.to(dev, torch.bfloat16)
    runtime = None
    if cfg.method == "dip":
        parts = mlp_parts(model)
        keeps = layer_keeps(cfg.density, len(parts), cfg.dip.up_keep, cfg.dip.down_keep, cfg.dip.keep_file)
        d, D = parts[0].d_model, parts[0].d_ff
        runtime = InMemoryRuntime(model, parts, lm.info.shape, [keeps.k_in(i, d) for i in range(len(parts))],
                                  [keeps.k_out(i, D) for i in range(len(parts))],
                                  dev if dev.type == "cuda" else None, record=bool(cfg.trace))
    try:
        on_token = text_streamer(out, decode, cfg.stream, cfg.prompt)
        res = generate(HfDecoder(model, dev), ids, cfg.decoding, eos_ids(folder, model.generation_config.eos_token_id),
                       on_token)
        if cfg.stream:
            out.write("\n")
        row.update(timing_row(res), text=decode(res["ids"]))
        if runtime is not None:
            row["mlp_s_per_token"] = runtime.mlp_s / max(len(res["step_s"]) + 1, 1)
            if cfg.trace:
                meta = {"model": lm.name, "method": cfg.method, "density": cfg.density, **lm.info.shape.to_dict()}
                save_trace(runtime.rec.trace(len(ids), meta), cfg.trace)
                row["trace"] = cfg.trace
    finally:
        if runtime is not None:
            runtime.detach()
    row.update(machine=machine(), dipstream=__version__)
    if cfg.json:
        write_json_atomic(cfg.json, row)
    if row.get("interrupted"):  # kept what was made; the command stops as interrupted
        raise KeyboardInterrupt
    return row
