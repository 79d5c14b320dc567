"""The decode loop: a prompt pass, then one token at a time with a KV cache, greedy or sampled;
and the seam through which a decode runtime runs every block's MLP.

A *decode runtime* is any object with

    decode(layer, x)          -> the MLP output of one token x (d,) at `layer`
    prefill(layer, X)         -> the MLP outputs (T, d) of the prompt's tokens X (T, d)
    trace(prompt_len, meta)   -> the run's masks as a simulator MaskTrace (None if it has none)
    stats(decode_steps)       -> {figure: value} for the results row

(`InMemoryRuntime`: every layer's weights in RAM in the sparse layout; `OffloadRuntime`: the MLP
in a file with a RAM cache). `attach_runtime` puts a `RuntimeMLP` in place of every block's MLP.
"""

from __future__ import annotations

import inspect
import time
import torch
from torch import nn

from dipstream.models.arch import replace_mlps, restore_mlps
from dipstream.runtime.options import DecodeOptions


class RuntimeMLP(nn.Module):
    """Stands in for one block's MLP: one token -> ``runtime.decode``, several -> ``prefill``."""

    def __init__(self, runtime, layer: int):
        super().__init__()
        self.layer = layer
        self._runtime = [runtime]  # plain list: not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rt = self._runtime[0]
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 1:
            y = rt.decode(self.layer, flat[0]).reshape(1, -1)
        else:
            y = rt.prefill(self.layer, flat)
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def attach_runtime(model: nn.Module, runtime) -> list:
    """Run every block's MLP through `runtime`; returns the originals (for `detach_runtime`)."""
    return replace_mlps(model, lambda i, _: RuntimeMLP(runtime, i))


def detach_runtime(model: nn.Module, originals: list) -> None:
    restore_mlps(model, originals)


def pick_token(logits: torch.Tensor, opts: DecodeOptions, gen: torch.Generator | None) -> int:
    """Greedy, or a sample at `opts.temperature` among the top-k logits."""
    if not opts.sample:
        return int(torch.argmax(logits))
    z = logits.float() / max(opts.temperature, 1e-6)
    if opts.top_k > 0:
        kth = torch.topk(z, min(opts.top_k, z.numel())).values[-1]
        z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    return int(torch.multinomial(torch.softmax(z, -1).cpu(), 1, generator=gen))


def decode_tokens(model, input_ids: torch.Tensor, opts: DecodeOptions, eos_ids=(), on_token=None) -> dict:
    """Prefill + token-by-token decode with a KV cache. Returns {ids, ttft_s, step_s}."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(opts.sample_seed) if opts.sample else None
    cache = DynamicCache(config=model.config)
    params = inspect.signature(model.forward).parameters
    kw = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1  # the prompt pass needs only the last position's logits
    out_ids, steps = [], []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, **kw)
        nxt = pick_token(out.logits[0, -1], opts, gen)
        ttft = time.perf_counter() - t0
        out_ids.append(nxt)
        if on_token:
            on_token(out_ids)
        while len(out_ids) < opts.max_new_tokens and not (opts.stop_at_eos and nxt in eos_ids):
            t = time.perf_counter()
            ids = torch.tensor([[nxt]], device=input_ids.device)
            out = model(input_ids=ids, **kw)  # the cache object grows in place
            nxt = pick_token(out.logits[0, -1], opts, gen)
            steps.append(time.perf_counter() - t)
            out_ids.append(nxt)
            if on_token:
                on_token(out_ids)
    return {"ids": out_ids, "ttft_s": ttft, "step_s": steps}
