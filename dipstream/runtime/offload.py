"""Offloaded sparse MLP: weights in a bundled file on disk, a RAM cache of units, direct reads.

Units are the simulator's DIP hooks (``layers.<i>.in``: input index j = [W_gate[:, j] | W_up[:, j]],
``layers.<i>.out``: hidden index i = W_down[:, i]).  Each hook has a cache of ``capacity`` unit
slots in RAM, managed by the simulator's policy objects (``make_policy(name)``,
stepped with each token's mask, "mask first"); the runtime mirrors the policy's cached set
physically: units the policy evicts free their slot, units it inserts are copied from the read
buffer.  Capacities come from the simulator's own placement (:func:`offload_capacities`), so
a trace of this run replayed through ``simulate`` with the same policy sees the same hits.

RAM for MLP weights = the caches + one read buffer that holds a whole hook (the working set of
one layer of one token, at most); ``budget`` bounds their sum.  Per decoded token and layer:
select the mask (DIP: top-k |x| / |h|; DIP-CA: ``ca_select`` on the caches' real state; dense:
everything), start the positioned reads of the missed units on a background thread (runs of
consecutive units are one read), meanwhile compute the gather-GEMV over the cached slots and
step the policy, then add the read units' product and update the cache.  The prompt pass reads each layer's regions whole (sequential reads), runs
the same selection per prompt token and steps the caches token by token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from dipstream.errors import DipstreamError
from dipstream.kernels.sparse_mlp import activation, gather_gemv
from dipstream.runtime.offload_file import BundledFile, aligned_bytes
from dipstream.simulator import Hardware, Hook, MaskTrace, hook_specs, plan_placement
from dipstream.simulator.caches import CacheSet
from dipstream.simulator.hardware import KINDS, fmt_bytes, parse_dram
from dipstream.simulator.policies import OFFLINE_POLICIES

__all__ = ["OffloadRuntime", "offload_capacities", "HookCache", "parse_budget"]


def parse_budget(spec, mlp_bytes: int) -> int:
    """RAM budget for MLP weights: bytes ('150MB', '1.5GiB', 123) or a fraction of the MLP's
    bytes ('0.5x')."""

    try:
        return int(parse_dram(spec, mlp_bytes))
    except ValueError as e:
        raise DipstreamError(f"--dram: {e}") from None


FP32 = Hardware(name="fp32", bits={k: 32 for k in KINDS})  # how the runtime holds every weight


def static_ram_bytes(shape, seq_len: int) -> float:
    """RAM the static layers take in the runtime (float32 attention, embeddings and head, the KV
    cache at ``seq_len``), as the simulator places them: what --dram holds before any MLP cache."""
    return plan_placement(shape, FP32, hook_specs(shape, "dip"), 0.0, seq_len).static_bytes


def offload_capacities(shape, cache_bytes: float, seq_len: int):
    """Per-hook capacities (in units) of the DIP hooks for ``cache_bytes`` of float32 caches,
    computed by the simulator's placement (static layers are added and taken away again, so
    the caches split cache_bytes per masked linear, as in the simulator: 2/3 of a layer's to
    the up/gate cache, 1/3 to the down cache).  Returns (hooks, capacity array, simulator DRAM)."""
    hooks = hook_specs(shape, "dip")
    static = static_ram_bytes(shape, seq_len)
    plan = plan_placement(shape, FP32, hooks, static + cache_bytes, seq_len)
    return hooks, np.minimum(plan.capacity, plan.n_units), static + cache_bytes


class HookCache:
    """One hook's RAM cache: ``capacity`` slots of one unit each and the unit -> slot map."""

    def __init__(self, n_units: int, unit_len: int, capacity: int):
        self.capacity = int(capacity)
        self.slab = torch.empty(self.capacity, unit_len, dtype=torch.float32)
        self.slot = np.full(n_units, -1, np.int64)
        self.cached = np.zeros(n_units, bool)
        self.free = list(range(self.capacity - 1, -1, -1))

    @property
    def nbytes(self) -> int:
        return self.slab.numel() * 4

    def reset(self) -> None:
        self.slot[:] = -1
        self.cached[:] = False
        self.free = list(range(self.capacity - 1, -1, -1))

    def update(self, new_cached: np.ndarray, rows: torch.Tensor, units_in_rows: np.ndarray):
        """Make the cache hold ``new_cached`` (kept, not copied: pass an array of its own, as the
        policies' ``cached()`` gives): evicted units free their slots, inserted units (which must
        be among ``units_in_rows``, sorted, whose data are ``rows``) are copied in."""
        gone = np.flatnonzero(self.cached & ~new_cached)
        if gone.size:
            self.free.extend(self.slot[gone].tolist())
            self.slot[gone] = -1
        new = np.flatnonzero(new_cached & ~self.cached)
        if new.size:
            if new.size > len(self.free):
                raise AssertionError("cache policy holds more units than the capacity")
            pos = np.searchsorted(units_in_rows, new)
            if np.any(pos >= units_in_rows.size) or np.any(units_in_rows[np.minimum(
                    pos, units_in_rows.size - 1)] != new):
                raise AssertionError("cache inserted a unit that was not read")
            slots = np.array([self.free.pop() for _ in range(new.size)], np.int64)
            self.slot[new] = slots
            self.slab.index_copy_(0, torch.from_numpy(slots),
                                  rows.index_select(0, torch.from_numpy(pos)))
        self.cached = new_cached


@dataclass
class TokenStats:
    """Sums over the decode tokens (prompt tokens are counted separately)."""

    tokens: int = 0
    mlp_s: float = 0.0
    io_s: float = 0.0
    io_wait_s: float = 0.0
    reads: int = 0
    disk_bytes: int = 0
    ram_bytes: int = 0
    selected_bytes: int = 0
    hit_units: int = 0
    hit_rate_sum: float = 0.0
    hit_rate_n: int = 0
    prefill_s: float = 0.0
    prefill_io_s: float = 0.0
    prefill_disk_bytes: int = 0
    peak_cache_bytes: int = 0


class OffloadRuntime:
    """The offloaded MLPs of all layers (see the module docstring).

    ``method``: a Method that runs in the decode runtimes (``decodes``: dense, dip, dip-ca) and
    chooses each token's masks; ``k_in`` / ``k_out``: per-layer counts; ``policy``: lru, lfu,
    window or none (never above capacity); ``budget``:
    bytes of RAM for MLP weights (caches + read buffer); ``shape``: the simulator ModelShape;
    ``seq_len``: the longest sequence (prompt + new tokens), for the placement.
    """

    def __init__(self, file: BundledFile, act: str, method, k_in, k_out, budget: int,
                 shape, seq_len: int, policy: str = "lru", record_masks: bool = True, min_dram: int = 0,
                 **policy_kwargs):
        if not getattr(method, "decodes", False):
            raise DipstreamError(f"the offloading runtime runs the methods that decode (dense, dip, dip-ca), "
                                 f"not '{getattr(method, 'name', method)}'")
        if policy in OFFLINE_POLICIES and not (policy == "hot" and policy_kwargs.get("frequency") is not None):
            raise DipstreamError(f"policy '{policy}' needs the future or calibration counts; the "
                                 "runtime supports lru, lfu, window, none and hot with a profile's counts")
        lay = file.layout
        self.file, self.lay, self.act, self.method = file, lay, act, method
        self.L, self.d, self.D = lay.n_layers, lay.d, lay.D
        self.k_in = [int(k) for k in k_in]
        self.k_out = [int(k) for k in k_out]
        self.read_bytes = max(lay.d * lay.in_stride, lay.D * lay.out_stride)
        self.budget = int(budget)
        if self.budget < self.read_bytes:
            raise DipstreamError(
                f"--dram leaves {fmt_bytes(self.budget)} for the MLP, less than one token's working set of "
                f"one layer ({fmt_bytes(self.read_bytes)}: the read buffer for a whole hook of this "
                f"model); give at least --dram {int(min_dram + self.read_bytes)}")
        self.cache_bytes = self.budget - self.read_bytes
        self.seq_len = int(seq_len)
        hooks, cap, self.sim_dram_bytes = offload_capacities(shape, self.cache_bytes, seq_len)
        self.capacity = {h.name: int(c) for h, c in zip(hooks, cap)}
        self.policy_name = policy
        self.cacheset = CacheSet(hooks, [self.capacity[h.name] for h in hooks], policy, grouping="hook",
                                 **policy_kwargs)
        self.caches = {kind: [HookCache(lay.hook(kind)[0], lay.hook(kind)[1] // 4,
                                        self.capacity[f"layers.{i}.{kind}"])
                              for i in range(self.L)] for kind in ("in", "out")}
        self.buffer = aligned_bytes(self.read_bytes)
        self._out = {k: torch.zeros(lay.hook(k)[1] // 4) for k in ("in", "out")}
        self.record_masks = record_masks
        self.max_read = 64 << 20  # one read per run (as the simulator counts; measured faster)
        self.masks = {kind: [[] for _ in range(self.L)] for kind in ("in", "out")}
        self.counters = TokenStats()
        self.pos = 0  # tokens of the current sequence already through the model
        used = self.ram_bytes()
        if used > self.budget:  # cannot happen: capacities are floor(share / unit bytes)
            raise AssertionError(f"caches {used} B exceed the budget {self.budget} B")

    # ------------------------------------------------------------------ accounting
    def ram_bytes(self) -> int:
        """RAM held for MLP weights: every cache slab (allocated at full capacity) + buffer."""
        return sum(c.nbytes for cs in self.caches.values() for c in cs) + self.buffer.numel()

    def cached_bytes(self) -> int:
        """Bytes of units currently cached (<= the slabs' size; the caches mirror the policies,
        which keep the counts)."""
        return sum(int(self.cacheset.occupancy(f"layers.{i}.{k}")[0]) * self.lay.hook(k)[1]
                   for i in range(self.L) for k in ("in", "out"))

    def reset(self) -> None:
        """A new sequence: empty caches (as the simulator resets per sequence)."""
        self.cacheset.reset()
        for cs in self.caches.values():
            for c in cs:
                c.reset()
        self.pos = 0

    def _rows(self, kind: str, n: int) -> torch.Tensor:
        """The read buffer as n records of this hook kind (float32 rows, padded stride)."""
        _, unit_bytes, stride = self.lay.hook(kind)
        f = self.buffer.view(torch.float32)
        return f.as_strided((n, unit_bytes // 4), (stride // 4, 1))

    # ------------------------------------------------------------------ selection
    def _select(self, kind: str, layer: int, scores: torch.Tensor, t: int,
                cached: np.ndarray | None = None) -> np.ndarray:
        """bool mask over the hook's units for token t of the sequence; DIP-CA steers by
        ``cached`` (default: the cache's current contents)."""
        k = self.k_in[layer] if kind == "in" else self.k_out[layer]
        c = self.caches[kind][layer].cached if cached is None else cached
        return self.method.decode_mask(scores.abs(), k, t, c)

    # ------------------------------------------------------------------ one hook, one token
    def _hook_decode(self, kind: str, layer: int, v: torch.Tensor, mask: np.ndarray):
        """sum over selected units u of v[u] * record(u): cached units from RAM, the rest read."""
        cache = self.caches[kind][layer]
        sel = np.flatnonzero(mask)
        hit_m = cache.cached[sel]
        hit, miss = sel[hit_m], sel[~hit_m]
        # the reads of the missed units run on the I/O threads while the cached units'
        # product and the cache policy's step are computed (DRAM and disk reads overlap)
        fut = self.file.submit_runs(kind, layer, miss, self.buffer, self.max_read) if miss.size else None
        reads, t_io, t_wait = 0, 0.0, 0.0
        try:
            out = self._out[kind]
            out.zero_()
            if hit.size:
                gather_gemv(cache.slab, torch.from_numpy(cache.slot[hit]),
                            v[torch.from_numpy(hit)], out=out)
            hook = f"layers.{layer}.{kind}"
            self.cacheset.step(hook, mask[None])
            new_cached = self.cacheset.cached(hook)[0]
        finally:  # always collect the reads (the buffer must not be reused while in flight)
            if fut is not None:
                t0 = time.perf_counter()
                reads, t_io = fut.result()
                t_wait = time.perf_counter() - t0
        rows = self._rows(kind, miss.size)
        if miss.size:
            out += gather_gemv(rows, torch.arange(miss.size), v[torch.from_numpy(miss)])
        cache.update(new_cached, rows, miss)
        st, ub, stride = self.counters, self.lay.hook(kind)[1], self.lay.hook(kind)[2]
        st.io_s += t_io
        st.io_wait_s += t_wait
        st.reads += reads
        st.disk_bytes += miss.size * stride
        st.ram_bytes += hit.size * ub
        st.selected_bytes += sel.size * ub
        st.hit_units += hit.size
        if sel.size:
            st.hit_rate_sum += hit.size / sel.size
            st.hit_rate_n += 1
        return out

    def decode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP output for one token x (d,) at ``layer`` (float32)."""
        t0 = time.perf_counter()
        x = x.detach().reshape(-1).to(torch.float32).contiguous()
        t = self.pos
        m_in = self._select("in", layer, x, t)
        gu = self._hook_decode("in", layer, x, m_in)
        h = activation(gu[:self.D], self.act) * gu[self.D:]
        m_out = self._select("out", layer, h, t)
        y = self._hook_decode("out", layer, h, m_out).clone()
        if self.record_masks:
            self.masks["in"][layer].append(m_in)
            self.masks["out"][layer].append(m_out)
        self.counters.mlp_s += time.perf_counter() - t0
        if layer == self.L - 1:
            self.pos += 1
            self.counters.tokens += 1
            self.counters.peak_cache_bytes = max(self.counters.peak_cache_bytes, self.cached_bytes())
        return y

    # ------------------------------------------------------------------ the prompt pass
    def _hook_prefill(self, kind: str, layer: int, V: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """All prompt tokens V (T, n) through one hook: the region is read whole, masks chosen
        token by token (the caches stepped in order), then one masked dense product."""
        n_units = self.lay.hook(kind)[0]
        t0 = time.perf_counter()
        self.file.read_region(kind, layer, self.buffer, self.max_read)
        self.counters.prefill_io_s += time.perf_counter() - t0
        self.counters.prefill_disk_bytes += n_units * self.lay.hook(kind)[2]
        rows = self._rows(kind, n_units)
        hook, cache = f"layers.{layer}.{kind}", self.caches[kind][layer]
        masks = np.zeros((V.shape[0], n_units), bool)
        for t in range(V.shape[0]):
            cached = self.cacheset.cached(hook)[0]
            masks[t] = self._select(kind, layer, V[t], self.pos + t, cached)
            self.cacheset.step(hook, masks[t][None])
        # the buffer holds every unit: copy in what the policy keeps
        new = self.cacheset.cached(hook)[0]
        out = (V * torch.from_numpy(masks)) @ rows
        cache.update(new, rows, np.arange(n_units))
        return out, masks

    def prefill(self, layer: int, X: torch.Tensor) -> torch.Tensor:
        """MLP outputs (T, d) for the T prompt tokens X (T, d) at ``layer``."""
        t0 = time.perf_counter()
        X = X.detach().to(torch.float32)
        gu, m_in = self._hook_prefill("in", layer, X)
        H = activation(gu[:, :self.D], self.act) * gu[:, self.D:]
        y, m_out = self._hook_prefill("out", layer, H)
        if self.record_masks:
            self.masks["in"][layer].extend(m_in)
            self.masks["out"][layer].extend(m_out)
        self.counters.prefill_s += time.perf_counter() - t0
        if layer == self.L - 1:
            self.pos += X.shape[0]
        return y

    # ------------------------------------------------------------------ results
    def trace(self, prompt_len: int, metadata: dict) -> MaskTrace:
        """The masks of this sequence as a simulator MaskTrace (DIP hooks, prompt included)."""
        hooks = []
        for i in range(self.L):
            for kind in ("in", "out"):
                n, ub, _ = self.lay.hook(kind)
                hooks.append(Hook(f"layers.{i}.{kind}", kind, n, ub // 4,
                                  np.array(self.masks[kind][i], bool).reshape(-1, n)))
        return MaskTrace(hooks, [0], [prompt_len], metadata)

    def stats(self, steps: int) -> dict:
        """Per decoded token figures of the run so far (`steps` decoded tokens)."""
        n, s = max(steps, 1), self.counters
        return {"mlp_s_per_token": s.mlp_s / n, "io_s_per_token": s.io_s / n,
                "io_wait_s_per_token": s.io_wait_s / n,
                "reads_per_token": s.reads / n, "disk_bytes_per_token": s.disk_bytes / n,
                "ram_bytes_per_token": s.ram_bytes / n,
                "hit_rate": s.hit_rate_sum / s.hit_rate_n if s.hit_rate_n else None,
                "density_measured": s.selected_bytes / n / self.lay.mlp_bytes,
                "prefill_mlp_s": s.prefill_s, "prefill_io_s": s.prefill_io_s,
                "prefill_disk_bytes": s.prefill_disk_bytes,
                "peak_cached_bytes": s.peak_cache_bytes, "ram_mlp_bytes_max": self.ram_bytes()}
