"""The RAM plan: what an engine run keeps resident and what its MLP caches get, from a `--memory`
budget (the whole process) or a `--dram` budget (the model's weights and KV cache, placed as
`simulate` places DRAM). The one home of the engine's RAM accounting: the MLP's and the streamed
head's buffers are sized here, and the plan refuses a budget before anything is loaded.

Per-hook capacities are the simulator's own split of the cache bytes (`simulator.simulate.split_cache`:
per masked linear, in record bytes), taken by the offloaded MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dipstream.engine.config import EngineSetup
from dipstream.engine.modelfile import MLP_KINDS, TensorInfo, is_mlp_tensor, mlp_tensor
from dipstream.engine.qmatrix import input_group
from dipstream.engine.storage import BLOCK, PAGE
from dipstream.errors import DipstreamError
from dipstream.simulator.hardware import fmt_bytes, parse_bytes, parse_dram
from dipstream.simulator.model_shape import ModelShape
from dipstream.simulator.simulate import split_cache
from dipstream.simulator.trace import hook_specs

MARGIN = 1 << 20    # RAM left for Python's own growth and numpy temporaries (peak RSS is checked in tests)
BOOKKEEPING = 48    # RAM per MLP unit besides its record: slot map, policy state, masks (measured by RSS)


def head_chunk_rows(head: TensorInfo) -> int:
    """Records per chunk of a streamed head: one header group (32 for float32)."""
    return input_group(head.rows, head.fmt) if head.fmt != "float32" else 32


def head_span_bytes(head: TensorInfo) -> int:
    """Bytes of one chunk buffer of a streamed head: a chunk's records and the blocks its start and
    end round out to."""
    span = head_chunk_rows(head) * head.stride + 2 * BLOCK
    return span + (-span) % BLOCK


def head_buffer_bytes(head: TensorInfo) -> int:
    """RAM of a streamed head's two chunk buffers (one being read, one multiplied)."""
    return 2 * head_span_bytes(head)


def mlp_buffer_bytes(manifest: dict) -> dict[str, int]:
    """Bytes of the offloaded MLP's read buffer of each hook kind: a whole hook plus block slack."""
    infos = manifest["tensor_info"]
    sizes = {}
    for k in MLP_KINDS:
        t = infos[mlp_tensor(0, k)]
        n = t.rows * t.stride + 2 * BLOCK
        sizes[k] = n + (-n) % BLOCK
    return sizes


def mlp_fixed_bytes(manifest: dict) -> int:
    """RAM of an offloaded MLP besides its caches: the read buffers, the records' headers and
    BOOKKEEPING bytes per unit of every hook."""
    infos = manifest["tensor_info"]
    mlp = [t for n, t in infos.items() if is_mlp_tensor(n)]
    return sum(mlp_buffer_bytes(manifest).values()) + PAGE + sum(t.header_bytes for t in mlp) \
        + BOOKKEEPING * sum(t.rows for t in mlp)


def cache_capacities(shape: ModelShape, cache_bytes: float, stride: dict[str, int]) -> dict[str, int]:
    """Units each DIP hook's cache holds when `cache_bytes` are split as the simulator splits them
    (per masked linear: an up/gate hook 2 shares, a down hook 1), a unit taking its record's
    `stride[kind]` bytes; at most the hook's units."""
    hooks = hook_specs(shape, "dip")
    cap = split_cache(hooks, shape, float(max(cache_bytes, 0)), np.array([stride[h.kind] for h in hooks], np.int64))
    return {h.name: int(min(c, h.n_units)) for h, c in zip(hooks, cap)}


def kv_bytes(manifest: dict, max_seq: int, kv_dtype: str) -> int:
    s = ModelShape.from_dict(manifest["arch"]["shape"])
    return 2 * (2 if kv_dtype == "float16" else 4) * s.n_layers * s.n_kv_heads * max_seq * s.head_dim


def _streamed(head: str, stream_embed: bool) -> tuple[str, ...]:
    return ("head", "embed") if head == "stream" else ("embed",) if stream_embed else ()


def resident_bytes(name: str, t: TensorInfo, streamed: tuple[str, ...]) -> int:
    """RAM of one static tensor: its records and headers, or, streamed, its headers (and the head
    its chunk buffers)."""
    if name not in streamed:
        return t.nbytes + t.header_bytes
    return t.header_bytes + (head_buffer_bytes(t) if name == "head" else 0)


def static_bytes(manifest: dict, head: str, stream_embed: bool) -> int:
    """RAM of the weights besides the MLP records: every other tensor with its headers; a streamed
    head or embedding leaves its headers (and the head its chunk buffers)."""
    streamed = _streamed(head, stream_embed)
    return sum(resident_bytes(n, t, streamed) for n, t in manifest["tensor_info"].items() if not is_mlp_tensor(n))


def budget_breakdown(manifest: dict, plan: "RamPlan") -> dict[str, int]:
    """Where the plan's bytes go: the interpreter, the static weights by kind (attention records,
    their scale tables, norms and biases, embedding, head), the KV cache, the offloaded MLP's
    scale tables, read buffers and per-unit bookkeeping, its caches (or, in RAM, its records and
    tables) and the margin. Sums to the plan's total."""
    infos = manifest["tensor_info"]
    streamed = _streamed(plan.head, plan.stream_embed)
    out = {"interpreter": plan.baseline, "attention": 0, "attention_scale_tables": 0, "norms_biases": 0,
           "embedding": 0, "head": 0}
    for n, t in infos.items():
        if is_mlp_tensor(n):
            continue
        if n in ("head", "embed"):
            out["head" if n == "head" else "embedding"] += resident_bytes(n, t, streamed)
        elif t.rows == 1:
            out["norms_biases"] += t.nbytes
        else:
            out["attention"] += t.nbytes
            out["attention_scale_tables"] += t.header_bytes
    out["kv_cache"] = plan.kv_bytes
    out["loading"] = plan.loading
    if plan.stream_embed:  # offloaded (a run in RAM keeps its embedding and MLP resident)
        mlp = [t for n, t in infos.items() if is_mlp_tensor(n)]
        out["mlp_scale_tables"] = sum(t.header_bytes for t in mlp)
        out["mlp_read_buffers"] = sum(mlp_buffer_bytes(manifest).values()) + PAGE
        out["mlp_bookkeeping"] = BOOKKEEPING * sum(t.rows for t in mlp)
        out["mlp_caches"] = plan.cache_bytes
        out["margin"] = MARGIN if plan.budget_kind == "memory" else 0
    else:
        out["mlp_in_ram"] = plan.mlp_bytes
    return out


@dataclass
class RamPlan:
    """What a run keeps in RAM (bytes): the static weights, the KV cache, the MLP (all of it in
    RAM, or its fixed part and caches when offloaded), against the budget that sized it."""

    head: str
    stream_embed: bool
    static_bytes: int
    kv_bytes: int
    mlp_bytes: int            # in RAM: every record; offloaded: buffers, headers, bookkeeping
    cache_bytes: int          # offloaded: the MLP caches
    budget: int | None = None
    budget_kind: str | None = None  # "memory" (the whole process), "dram" (weights + KV) or None
    baseline: int = 0               # RSS before loading (Python and libraries)
    loading: int = 0                # measured after loading: RSS beyond the baseline, static weights and KV

    def row(self) -> dict:
        return {"head": self.head, "static_bytes": self.static_bytes, "kv_bytes": self.kv_bytes,
                "mlp_ram_bytes": self.mlp_bytes + self.cache_bytes, "cache_bytes": self.cache_bytes,
                "memory_budget": self.budget if self.budget_kind == "memory" else None,
                "dram_budget_bytes": self.budget if self.budget_kind == "dram" else None,
                "baseline_rss": self.baseline}

    def settle(self, rss_now: int) -> None:
        """After loading, under a --memory budget: the caches get what the process's measured RSS
        (Python, libraries, static weights and the touched KV cache) leaves."""
        if self.budget_kind != "memory":
            return
        self.loading = int(rss_now - self.baseline - self.static_bytes - self.kv_bytes)
        self.cache_bytes = int(self.budget - rss_now - self.mlp_bytes - MARGIN)
        if self.cache_bytes < 0:
            raise DipstreamError(self.too_small(rss_now))

    def too_small(self, before: int) -> str:
        """The refusal of a budget below `before` (what the process holds before any cache) plus the
        MLP buffers and the margin: what it needs and what to give."""
        need = before + self.mlp_bytes + MARGIN
        other = before - self.baseline - self.static_bytes - self.kv_bytes  # measured after loading: its overhead
        loading = f", loading {fmt_bytes(other)} more" if other >= 1 << 20 else ""
        return (f"--memory {fmt_bytes(self.budget)} is below what the process needs before any MLP cache (Python and "
                f"libraries {fmt_bytes(self.baseline)}, static weights {fmt_bytes(self.static_bytes)}, KV cache "
                f"{fmt_bytes(self.kv_bytes)}{loading}, buffers {fmt_bytes(self.mlp_bytes)}, margin "
                f"{fmt_bytes(MARGIN)}); give more than {fmt_bytes(need, round_up=True).replace(' ', '')}")


def plan_ram(manifest: dict, setup: EngineSetup, baseline: int) -> RamPlan:
    """The plan of a run (one-line errors for a budget that cannot hold what the run needs before
    any MLP cache), from the model file alone: nothing is loaded yet."""
    o = setup.options
    kv = kv_bytes(manifest, setup.max_seq, o.kv_cache)
    if not setup.offload:
        head = "ram" if o.head == "auto" else o.head
        mlp = sum(t.nbytes + t.header_bytes for n, t in manifest["tensor_info"].items() if is_mlp_tensor(n))
        return RamPlan(head, False, static_bytes(manifest, head, False), kv, mlp, 0, baseline=baseline)
    fixed = mlp_fixed_bytes(manifest)
    if setup.cache_bytes is not None:
        head = "ram" if o.head == "auto" else o.head
        return RamPlan(head, True, static_bytes(manifest, head, True), kv, fixed, int(setup.cache_bytes),
                       baseline=baseline)
    if o.memory is not None:
        memory = int(parse_bytes(o.memory))
        head = o.head
        if head == "auto":  # stream the head only when the budget cannot hold it in RAM
            fits = baseline + static_bytes(manifest, "ram", True) + kv + fixed + MARGIN <= memory
            head = "ram" if fits else "stream"
        plan = RamPlan(head, True, static_bytes(manifest, head, True), kv, fixed, 0, memory, "memory", baseline)
        plan.cache_bytes = memory - baseline - plan.static_bytes - kv - fixed - MARGIN
        if plan.cache_bytes < 0:
            raise DipstreamError(plan.too_small(baseline + plan.static_bytes + kv))
        return plan
    head = "stream" if o.head == "stream" else "ram"
    weights = sum(t.nbytes + t.header_bytes for t in manifest["tensor_info"].values())
    dram = int(parse_dram(setup.dram or "0.7x", weights))
    plan = RamPlan(head, True, static_bytes(manifest, head, True), kv, fixed, 0, dram, "dram", baseline)
    need = plan.static_bytes + kv + fixed
    plan.cache_bytes = dram - need
    if plan.cache_bytes < 0:
        raise DipstreamError(f"--dram {fmt_bytes(dram)} is below the static weights, KV cache and read buffers "
                             f"({fmt_bytes(need)}); give more than {fmt_bytes(need, round_up=True).replace(' ', '')}, "
                             "or size the process with --memory")
    return plan
