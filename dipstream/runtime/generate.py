"""`dipstream generate`: stream text token by token with a KV cache, the MLPs run for real.

Dense runs the model unchanged.  ``dip`` replaces every block's MLP by a removable
:class:`RuntimeMLP` whose batch-1 decode step calls the fused sparse kernel (reads only the
selected weight rows; float32, int8 or 4-bit weights; Triton on CUDA).  With ``--offload DIR``
the MLP weights live in a file on disk and only ``--dram`` bytes of them in RAM
(:mod:`dipstream.runtime.offload`); ``dense``, ``dip`` and ``dip-ca`` all run from that file.
"""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dipstream import __version__
from dipstream.errors import DipstreamError
from dipstream.io import write_json_atomic

METHODS = ("dense", "dip", "dip-ca")


@dataclass
class GenerateConfig:
    """One generation run."""

    model: str = field(default="smollm2-135m", metadata={
        "help": "built-in model name (see `dipstream models`) or a local HF checkpoint folder"})
    method: str = field(default="dip", metadata={
        "help": "dense, dip or dip-ca (dip-ca needs --offload: it follows the runtime's cache)",
        "choices": METHODS})
    density: float = field(default=0.5, metadata={
        "help": "fraction of MLP weight bytes a decoded token reads, in (0, 1]"})
    prompt: str = field(default="The three primary colours are", metadata={
        "help": "the text to continue"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens to generate"})
    chat: bool = field(default=False, metadata={
        "help": "wrap the prompt in the tokenizer's chat template (instruct models)"})
    stop_at_eos: bool = field(default=True, metadata={
        "help": "stop at the end-of-sequence token (--no-stop-at-eos: always max_new_tokens)"})
    sample: bool = field(default=False, metadata={
        "help": "sample instead of greedy decoding (with --temperature, --top-k, --sample-seed)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "sample among the top-k tokens (0: all)"})
    sample_seed: int = field(default=0, metadata={"help": "seed of the sampler"})
    weights: str = field(default="float32", metadata={
        "help": "sparse MLP weight format in RAM: float32, int8 or int4 (not with --offload)",
        "choices": ("float32", "int8", "int4")})
    up_keep: float | None = field(default=None, metadata={
        "help": "fraction of up/gate input columns kept (overrides DIP's reference split)"})
    down_keep: float | None = field(default=None, metadata={
        "help": "fraction of down input columns kept (overrides DIP's reference split)"})
    gamma: float = field(default=0.1, metadata={
        "help": "dip-ca: weight of uncached units' scores in [0, 1] (1 = plain DIP)"})
    n0_frac: float = field(default=0.5, metadata={
        "help": "dip-ca: fraction of k protected as the top-n0 scores"})
    warmup: bool = field(default=True, metadata={
        "help": "dip-ca: warm gamma up over the first tokens (the reference's schedule); "
                "--no-warmup uses gamma from the first token"})
    adapter: str | None = field(default=None, metadata={
        "help": "apply the LoRA adapters of this `dipstream finetune` folder (dense and dip, in RAM)",
        "metavar": "DIR"})
    offload: str | None = field(default=None, metadata={
        "help": "keep the MLP weights in a file in this directory (written on first use) and "
                "only --dram bytes of them in RAM", "metavar": "DIR"})
    dram: str = field(default="0.5x", metadata={
        "help": "with --offload: RAM for MLP weights (caches + one read buffer): bytes ('150MB') "
                "or a fraction of the MLP's float32 bytes ('0.5x')"})
    policy: str = field(default="lru", metadata={
        "help": "with --offload: cache policy (the simulator's): lru, lfu, window, none",
        "choices": ("lru", "lfu", "window", "none")})
    window_k: int = field(default=5, metadata={"help": "window policy: tokens whose units are kept"})
    direct_io: bool = field(default=True, metadata={
        "help": "with --offload: read with O_DIRECT (bypass the page cache); --no-direct-io reads "
                "through it"})
    io_threads: int = field(default=8, metadata={"help": "with --offload: reads in flight"})
    verify: bool = field(default=True, metadata={
        "help": "with --offload: check the file's sha256 when opening it"})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch and the sparse kernel (default: torch's)"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when present), cpu or cuda", "choices": ("auto", "cpu", "cuda")})
    stream: bool = field(default=True, metadata={"help": "print the text as it is generated"})
    trace: str | None = field(default=None, metadata={
        "help": "write this run's MLP masks (prompt included) as a simulator trace (.npz)",
        "metavar": "PATH"})
    json: str | None = field(default=None, metadata={
        "help": "write the result as one JSON object to this file", "metavar": "PATH"})


# --------------------------------------------------------------------------- MLP modules

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


class InMemoryRuntime:
    """DIP with every layer's weights in RAM in the sparse layout: decode steps call the fused
    kernel; prompt tokens go through it one by one as well."""

    def __init__(self, parts, k_in, k_out, weights: str = "float32", device=None,
                 record_masks: bool = False):
        from dipstream.kernels import QuantizedSparseMLPWeights, SparseMLPWeights

        self.L, self.d, self.D = len(parts), parts[0].d_model, parts[0].d_ff
        self.k_in, self.k_out = list(k_in), list(k_out)
        self.act = _act_name(parts[0].act_name)
        self.w = []
        for p in parts:
            if weights == "float32":
                dt = torch.float32 if device is None or device.type == "cpu" else torch.bfloat16
                self.w.append(SparseMLPWeights(p.gate_weight, p.up_weight, p.down_weight,
                                               device=device, dtype=dt))
            else:
                self.w.append(QuantizedSparseMLPWeights(p.gate_weight, p.up_weight,
                                                        p.down_weight, bits=8 if weights == "int8"
                                                        else 4))
        # LoRA adapters (peft) on the MLP linears: their terms B A x are added with A fed the
        # same selected inputs as the host weights (A[:, S] x_S), so no dense read is added
        self.adapters = [_adapter_terms(p) for p in parts]
        if any(a is not None for a in self.adapters) and weights != "float32":
            raise DipstreamError("LoRA adapters run with --weights float32 only")
        self.record_masks = record_masks
        self.masks = {"in": [[] for _ in range(self.L)], "out": [[] for _ in range(self.L)]}
        self.mlp_s = 0.0

    def _run(self, layer, x):
        from dipstream.kernels import sparse_mlp

        if self.adapters[layer] is not None:
            y, s_in, s_out = self._run_adapted(layer, x)
        else:
            y, s_in, s_out = sparse_mlp(self.w[layer], x, self.k_in[layer], self.k_out[layer],
                                        self.act, return_indices=True)
        if self.record_masks:
            for key, idx, n in (("in", s_in, self.d), ("out", s_out, self.D)):
                for s in (idx if isinstance(idx, list) else [idx]):
                    m = torch.zeros(n, dtype=torch.bool)
                    m[s.cpu()] = True
                    self.masks[key][layer].append(m.numpy())
        return y

    def _run_adapted(self, layer, x):
        """One token (or rows one by one) of DIP with adapters: the kernel's gather-GEMVs plus
        each adapter's term on the selected inputs."""
        from dipstream.kernels.sparse_mlp import _act_torch, gather_gemv, select_topk_abs

        if x.dim() == 2 and x.shape[0] > 1:
            outs = [self._run_adapted(layer, row) for row in x]
            return torch.stack([o[0] for o in outs]), [o[1] for o in outs], [o[2] for o in outs]
        w, lora, D = self.w[layer], self.adapters[layer], self.D
        xt = x.reshape(-1).float()
        s_in = select_topk_abs(xt, self.k_in[layer])
        xs = xt.index_select(0, s_in)
        gu = gather_gemv(w.gate_up_t, s_in, xs)
        g = gu[:D] + _lora_on(lora["gate"], xs, s_in)
        u = gu[D:] + _lora_on(lora["up"], xs, s_in)
        h = _act_torch(g, self.act) * u
        s_out = select_topk_abs(h, self.k_out[layer])
        hs = h.index_select(0, s_out)
        y = gather_gemv(w.down_t, s_out, hs) + _lora_on(lora["down"], hs, s_out)
        return y.reshape(x.shape[:-1] + (self.d,)), s_in, s_out

    def decode(self, layer, x):
        t0 = time.perf_counter()
        y = self._run(layer, x)
        self.mlp_s += time.perf_counter() - t0
        return y

    def prefill(self, layer, X):
        return self._run(layer, X)

    def trace(self, prompt_len: int, metadata: dict):
        """The recorded masks (prompt included) as a simulator MaskTrace of DIP hooks."""
        import numpy as np

        from dipstream.simulator import Hook, MaskTrace

        hooks = []
        for i in range(self.L):
            for kind, n, unit in (("in", self.d, 2 * self.D), ("out", self.D, self.d)):
                hooks.append(Hook(f"layers.{i}.{kind}", kind, n, unit,
                                  np.array(self.masks[kind][i], bool).reshape(-1, n)))
        return MaskTrace(hooks, [0], [prompt_len], metadata)


def _adapter_terms(p) -> dict | None:
    """{linear: [(A, B, scale)]} of the LoRA adapters on one MLP block, or None."""
    terms = {n: [(A.detach(), B.detach(), s) for A, B, s, _ in getattr(p, f"{n}_lora").terms()]
             if getattr(p, f"{n}_lora") is not None else [] for n in ("gate", "up", "down")}
    return terms if any(terms.values()) else None


def _lora_on(terms, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | float:
    """sum of s * B (A[:, idx] v) over adapters: v holds the selected inputs `idx` only."""
    out = 0.0
    for A, B, scale in terms:
        out = out + scale * (B @ (A.index_select(1, idx) @ v))
    return out


def _act_name(name: str) -> str:
    from dipstream.kernels.sparse_mlp import _ACTS

    if name not in _ACTS:
        raise DipstreamError(f"the sparse runtime supports the activations {sorted(_ACTS)}, "
                             f"not '{name}'")
    return name


def attach_runtime(model: nn.Module, runtime) -> list:
    """Replace every block's MLP by a RuntimeMLP; returns the originals (for detach_runtime)."""
    from dipstream.sparsity.attach import _blocks

    blocks, mlp = _blocks(model)
    originals = []
    for i, block in enumerate(blocks):
        originals.append(getattr(block, mlp))
        setattr(block, mlp, RuntimeMLP(runtime, i))
    return originals


def detach_runtime(model: nn.Module, originals: list) -> None:
    from dipstream.sparsity.attach import _blocks

    blocks, mlp = _blocks(model)
    for block, orig in zip(blocks, originals):
        setattr(block, mlp, orig)


# --------------------------------------------------------------------------- decoding

def _pick(logits: torch.Tensor, cfg: GenerateConfig, gen: torch.Generator | None) -> int:
    if not cfg.sample:
        return int(torch.argmax(logits))
    z = logits.float() / max(cfg.temperature, 1e-6)
    if cfg.top_k > 0:
        kth = torch.topk(z, min(cfg.top_k, z.numel())).values[-1]
        z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
    return int(torch.multinomial(torch.softmax(z, -1).cpu(), 1, generator=gen))


def decode_tokens(model, input_ids: torch.Tensor, cfg: GenerateConfig, eos_ids=(),
                  on_token=None) -> dict:
    """Prefill + token-by-token decode with a KV cache.  Returns ids and timings."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(cfg.sample_seed) if cfg.sample else None
    cache = DynamicCache(config=model.config)
    params = inspect.signature(model.forward).parameters
    kw = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1  # the prompt pass needs only the last position's logits
    out_ids, steps = [], []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, **kw)
        nxt = _pick(out.logits[0, -1], cfg, gen)
        ttft = time.perf_counter() - t0
        out_ids.append(nxt)
        if on_token:
            on_token(out_ids)
        while len(out_ids) < cfg.max_new_tokens and not (cfg.stop_at_eos and nxt in eos_ids):
            t = time.perf_counter()
            ids = torch.tensor([[nxt]], device=input_ids.device)
            out = model(input_ids=ids, **kw)  # the cache object grows in place
            nxt = _pick(out.logits[0, -1], cfg, gen)
            steps.append(time.perf_counter() - t)
            out_ids.append(nxt)
            if on_token:
                on_token(out_ids)
    return {"ids": out_ids, "ttft_s": ttft, "step_s": steps}


def _check(cfg: GenerateConfig) -> None:
    """Every option, file and output path, before the model is loaded."""
    from dipstream.budget import check_density
    from dipstream.validation import at_least, finite, input_dir, output_file

    check_density(cfg.density)
    at_least("max_new_tokens", cfg.max_new_tokens, 1)
    at_least("threads", cfg.threads, 1, optional=True)
    at_least("io_threads", cfg.io_threads, 1)
    at_least("window_k", cfg.window_k, 1)
    at_least("top_k", cfg.top_k, 0)
    finite("temperature", cfg.temperature, lo=0, lo_open=True)
    finite("up_keep", cfg.up_keep, lo=0, hi=1, optional=True)
    finite("down_keep", cfg.down_keep, lo=0, hi=1, optional=True)
    finite("n0_frac", cfg.n0_frac, lo=0, hi=1)
    if cfg.offload:
        from dipstream.simulator.hardware import parse_dram

        try:
            parse_dram(cfg.dram, 1.0)
        except ValueError as exc:
            raise DipstreamError(f"--dram: {exc}") from None
    if cfg.trace and cfg.method == "dense" and not cfg.offload:
        raise DipstreamError("--trace records the sparse MLP's masks: a dense run in RAM has none; use "
                             "--method dip, or --offload DIR for dense streaming's trace")
    input_dir("adapter", cfg.adapter, "finetune --out folder")
    output_file("json", cfg.json)
    output_file("trace", cfg.trace)
    if cfg.method == "dip-ca" and not cfg.offload:
        raise DipstreamError("dip-ca picks its masks from the runtime's RAM cache: run it with "
                             "--offload DIR --dram BUDGET")
    if cfg.offload and cfg.weights != "float32":
        raise DipstreamError("--offload keeps float32 weights on disk; drop --weights "
                             f"{cfg.weights} (quantized weights run in RAM only)")
    if cfg.weights != "float32" and cfg.method != "dip":
        raise DipstreamError(f"--weights {cfg.weights} applies to the sparse kernel: use it with "
                             "--method dip")
    if not 0.0 <= cfg.gamma <= 1.0:
        raise DipstreamError(f"--gamma {cfg.gamma} is outside [0, 1]")
    if cfg.adapter and cfg.offload:
        raise DipstreamError("--adapter runs with the MLP in RAM; drop --offload (the offloading "
                             "runtime does not apply adapters)")
    if cfg.sample and cfg.temperature <= 0:
        raise DipstreamError("--temperature must be positive when sampling")


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


def run_generate(cfg: GenerateConfig, out=None) -> dict:
    """Generate (streaming to ``out``, default stdout, when cfg.stream) and return a results row."""
    from dipstream.paths import machine
    from dipstream.models import load_model
    from dipstream.models.arch import mlp_parts
    from dipstream.budget import layer_keeps

    _check(cfg)
    out = out or sys.stdout
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = _device(cfg)
    if dev.type == "cuda" and cfg.weights != "float32":
        raise DipstreamError(f"--weights {cfg.weights} runs on the CPU kernel; add --device cpu")
    if dev.type == "cuda" and cfg.adapter and cfg.method == "dip":
        raise DipstreamError("--adapter with --method dip runs on the CPU (the LoRA terms stay "
                             "there); add --device cpu")
    lm = load_model(cfg.model)
    row_adapter = {}
    if cfg.adapter:
        from dipstream.sparsity import build_method
        from dipstream.training.artifacts import apply_adapter

        row_adapter = apply_adapter(lm, cfg.adapter, build_method(cfg.method, cfg.density))
    model, tok = lm.model, lm.tokenizer
    parts = mlp_parts(model)
    L, d, D = len(parts), parts[0].d_model, parts[0].d_ff
    keeps = layer_keeps(cfg.density, L, cfg.up_keep, cfg.down_keep)
    k_in = [keeps.k_in(i, d) for i in range(L)]
    k_out = [keeps.k_out(i, D) for i in range(L)]
    if cfg.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": cfg.prompt}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tok(cfg.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise DipstreamError("the prompt is empty after tokenization; give some text")
    P = int(ids.shape[1])
    shape = lm.info.shape
    row = {"model": lm.name, "method": cfg.method, "density_requested": cfg.density,
           "weights": cfg.weights, "prompt_tokens": P, "device": str(dev),
           "threads": torch.get_num_threads(), **row_adapter}
    runtime, originals, bf = None, None, None
    try:
        if cfg.offload:
            from dipstream.runtime.offload import OffloadRuntime, parse_budget
            from dipstream.runtime.offload_file import Layout, ensure_offload

            lay = Layout(L, d, D)
            budget = parse_budget(cfg.dram, lay.mlp_bytes)
            t0 = time.perf_counter()
            bf, written = ensure_offload(cfg.offload, parts, lm.name, direct=cfg.direct_io,
                                         io_threads=cfg.io_threads, verify=cfg.verify)
            row.update(offload_dir=str(cfg.offload), offload_written=written,
                       offload_open_s=time.perf_counter() - t0, direct_io=bf.direct,
                       dram_budget_bytes=budget, mlp_bytes=lay.mlp_bytes, policy=cfg.policy,
                       io_threads=cfg.io_threads)
            kw = {"k": cfg.window_k} if cfg.policy == "window" else {}
            runtime = OffloadRuntime(bf, _act_name(parts[0].act_name), cfg.method, k_in, k_out,
                                     budget, shape, P + cfg.max_new_tokens, cfg.policy,
                                     cfg.gamma, cfg.n0_frac, record_masks=True,
                                     warmup=cfg.warmup, **kw)
            row.update(ram_mlp_bytes=runtime.ram_bytes(), cache_bytes=runtime.cache_bytes,
                       read_buffer_bytes=runtime.read_bytes,
                       sim_dram_bytes=runtime.sim_dram_bytes, sim_seq_len=runtime.seq_len,
                       capacity_in=runtime.capacity["layers.0.in"],
                       capacity_out=runtime.capacity["layers.0.out"])
            originals = attach_runtime(model, runtime)
            _release_mlp_weights(parts)
        elif cfg.method == "dip":
            runtime = InMemoryRuntime(parts, k_in, k_out, cfg.weights,
                                      dev if dev.type == "cuda" else None,
                                      record_masks=bool(cfg.trace))
            originals = attach_runtime(model, runtime)
        if dev.type == "cuda":
            model.to(dev, torch.bfloat16)
            ids = ids.to(dev)
        eos = set()
        for e in (getattr(tok, "eos_token_id", None), getattr(model.generation_config,
                                                             "eos_token_id", None)):
            eos.update(e if isinstance(e, (list, tuple)) else ([] if e is None else [e]))
        printed = [""]

        def on_token(gen_ids):
            if not cfg.stream:
                return
            text = tok.decode(gen_ids, skip_special_tokens=True)
            if text.startswith(printed[0]):
                out.write(text[len(printed[0]):])
            else:
                out.write(text)
            out.flush()
            printed[0] = text

        if cfg.stream:
            out.write(cfg.prompt)
            out.flush()
        res = decode_tokens(model, ids, cfg, eos, on_token)
        if cfg.stream:
            out.write("\n")
        steps = res["step_s"]
        row.update(new_tokens=len(res["ids"]), ttft_s=res["ttft_s"], decode_steps=len(steps),
                   decode_s=sum(steps), decode_tokens_per_s=(len(steps) / sum(steps))
                   if steps else None, ids=res["ids"],
                   text=tok.decode(res["ids"], skip_special_tokens=True))
        if runtime is not None:
            row.update(_runtime_stats(runtime, len(steps)))
        if cfg.trace and runtime is not None:
            from dipstream.simulator import save_trace

            meta = {"model": lm.name, "method": cfg.method, "density": cfg.density,
                    **shape.to_dict()}
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


def _runtime_stats(rt, steps: int) -> dict:
    n = max(steps, 1)
    if hasattr(rt, "stats"):
        s = rt.stats
        return {"mlp_s_per_token": s.mlp_s / n, "io_s_per_token": s.io_s / n,
                "io_wait_s_per_token": s.io_wait_s / n,
                "reads_per_token": s.reads / n, "disk_bytes_per_token": s.disk_bytes / n,
                "ram_bytes_per_token": s.ram_bytes / n,
                "hit_rate": s.hit_rate_sum / s.hit_rate_n if s.hit_rate_n else None,
                "density_measured": s.selected_bytes / n / rt.lay.mlp_bytes,
                "prefill_mlp_s": s.prefill_s, "prefill_io_s": s.prefill_io_s,
                "prefill_disk_bytes": s.prefill_disk_bytes,
                "peak_cached_bytes": s.peak_cache_bytes, "ram_mlp_bytes_max": rt.ram_bytes()}
    return {"mlp_s_per_token": rt.mlp_s / n}

