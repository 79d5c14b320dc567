"""The engine's MLP backends: every block's MLP in RAM (dense or DIP), or offloaded to the model
file with a RAM cache of its units (dense streaming, DIP or DIP-CA).

A unit is one record of the bundled layout: hook ``layers.i.in`` unit j = [W_gate[:, j] | W_up[:, j]],
``layers.i.out`` unit i = W_down[:, i]. Per token and layer: choose the ``in`` mask from |x| by the
method's decode rule (`sparsity.decoding`: all, top-k_in, or the cache-aware choice), compute g
and u from those records, h = act(g) * u, choose the ``out`` mask from |h|, y from those records.

Offloaded, the caches are the simulator's own (a `CacheSet`: the same policies and the same
never-above-capacity rule), mirrored in RAM slots (`SlotCache`), their capacities the reference's
split of the cache RAM per masked linear, in record bytes (`engine.plan`); missed units are read
with positioned direct reads of whole blocks on the native read pool (`engine.storage`), requests
closer than a gap merged, into a buffer laid out like the hook in the file.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import numpy as np

from dipstream import native
from dipstream.budget import LayerKeeps
from dipstream.engine.config import PREFETCH
from dipstream.engine.modelfile import DATA, MLP_KINDS, mlp_tensor
from dipstream.engine.plan import cache_capacities, mlp_buffer_bytes
from dipstream.engine.storage import (
    FileReader,
    aligned_empty,
    covered,
    drop_page_cache,
    read_plan,
)
from dipstream.errors import DipstreamError
from dipstream.names import layer_key
from dipstream.simulator.caches import CacheSet
from dipstream.simulator.trace import TraceRecorder, hook_specs


@dataclass
class MlpCounters:
    """What the MLP read, per decoded token sums (prompt tokens are counted too)."""

    tokens: int = 0
    ram_bytes: int = 0          # record bytes of cached (hit) units
    disk_bytes: int = 0         # bytes read from the file (whole blocks)
    reads: int = 0              # read requests
    selected_bytes: int = 0     # record bytes of every selected unit
    hit_rate_sum: float = 0.0
    hit_rate_n: int = 0
    io_wait_s: float = 0.0
    mlp_s: float = 0.0
    prefetch_bytes: int = 0     # bytes read ahead of the hook that used them
    prefetch_units: int = 0     # units predicted (not cached) and read ahead
    prefetch_useful: int = 0    # ... of which the hook selected
    missed_units: int = 0       # selected units not in the cache
    prefetch_served: int = 0    # ... of which the prefetch had read


class MaskChooser:
    """Each token's masks by a method's decode rule (`sparsity.decoding`) and the k of every layer
    (`k_in` of the d up/gate inputs, `k_out` of the D down inputs); a cache-aware rule steers by
    the cached set."""

    def __init__(self, rule, k_in, k_out):
        self.rule = rule
        self.k = {"in": [int(k) for k in k_in], "out": [int(k) for k in k_out]}

    @classmethod
    def from_keeps(cls, rule, keeps: LayerKeeps, d: int, D: int) -> "MaskChooser":
        L = len(keeps.up)
        return cls(rule, [keeps.k_in(i, d) for i in range(L)], [keeps.k_out(i, D) for i in range(L)])

    def k_of(self, kind: str, layer: int, n: int) -> int:
        return self.rule.k(self.k[kind][layer], n)

    def mask(self, kind: str, layer: int, v: np.ndarray, t: int, cached: np.ndarray | None = None) -> np.ndarray:
        """bool (n,) mask for token t of the sequence from scores |v|."""
        return self.rule.mask(np.abs(v), self.k_of(kind, layer, v.size), t, cached)


def _recorder(model, record: bool) -> TraceRecorder | None:
    return TraceRecorder(hook_specs(model.shape, "dip")) if record else None


class SlotCache:
    """The RAM of one hook's cache: the records of the units its policy holds, in the slots of a
    slab. The policy steps with each token's mask ("mask first", never above capacity); the slots
    mirror its cached set: units it evicts free their slots, units it inserts are copied in from
    where this token read them. So a run's trace replayed through `dipstream simulate` with the
    same policy and capacities sees the same hits (tests/test_engine.py)."""

    def __init__(self, caches: CacheSet, name: str, n_units: int, stride: int, capacity: int):
        self.caches, self.name, self.capacity = caches, name, int(capacity)
        self.slab = np.zeros((self.capacity, stride), np.uint8)
        self.slot = np.full(n_units, -1, np.int64)
        self.free = list(range(self.capacity))

    @property
    def cached(self) -> np.ndarray:
        """bool (n_units,): the units the policy holds now."""
        return self.caches.cached(self.name)[0]

    @property
    def nbytes(self) -> int:
        return self.slab.nbytes

    def _take(self, units: np.ndarray, records: np.ndarray) -> None:
        dest = np.array(self.free[len(self.free) - units.size:], np.int64)
        del self.free[len(self.free) - units.size:]
        self.slot[units] = dest
        self.slab[dest] = records

    def step(self, mask: np.ndarray, read: np.ndarray) -> None:
        """Step the policy with this token's mask; `read` (n_units, stride): the hook's records as
        read this token (a unit the policy newly holds was missed, so it is there)."""
        before = self.cached.copy()
        self.caches.step(self.name, mask[None])
        now = self.cached
        gone = np.flatnonzero(before & ~now)
        if gone.size:  # evicted units free their slots
            self.free.extend(self.slot[gone].tolist())
            self.slot[gone] = -1
        new = np.flatnonzero(now & ~before)
        if new.size:
            self._take(new, read[new])

    def resync(self) -> np.ndarray:
        """After the policy was reset (a new sequence): free the slots of units it no longer holds
        (hot placement keeps its pinned units). Returns the units it holds but no slot has."""
        cached = self.cached
        self.slot[~cached] = -1
        used = set(self.slot[self.slot >= 0].tolist())
        self.free = [s for s in range(self.capacity) if s not in used]
        return np.flatnonzero(cached & (self.slot < 0))

    def load(self, units: np.ndarray, read: np.ndarray) -> None:
        """Copy the records of `units` (held by the policy, in no slot yet) from `read`."""
        if units.size:
            self._take(units, read[units])


class RamMLP:
    """Every block's MLP records in RAM: dense, or DIP with the fused select-GEMV, one native call
    per layer and token."""

    def __init__(self, model, chooser: MaskChooser, record_masks: bool = False):
        if chooser.rule.needs_cache:
            raise DipstreamError("dip-ca picks its masks from a RAM cache of an offloaded MLP: run it with "
                                 "--offload")
        self.model, self.chooser = model, chooser
        self.lib = native.require()
        self.w = {k: [model.load(model.manifest["tensor_info"][mlp_tensor(i, k)]) for i in range(model.L)]
                  for k in MLP_KINDS}
        D, d = model.D, model.d
        self._gu, self._y, self._h = np.empty(2 * D, np.float32), np.empty(d, np.float32), np.empty(D, np.float32)
        self._idx = {k: np.empty(n, np.int64) for k, n in (("in", d), ("out", D))}
        self._coef = np.empty(max(d, D), np.float32)
        work = [native.ptr(a) for a in (self._gu, self._h, self._y, self._idx["in"], self._idx["out"], self._coef)]
        vec = model.vec.get
        self.blk = [native.DsMlp(self.w["in"][i].native(), self.w["out"][i].native(),
                                 native.ptr(vec(layer_key(i, "mlp_norm"))), native.ptr(vec(layer_key(i, "post_mlp_norm"))),
                                 chooser.k_of("in", i, d), chooser.k_of("out", i, D), *work)
                    for i in range(model.L)]
        self._refs = [ctypes.byref(b) for b in self.blk]
        self._got = np.zeros(2, np.int64)
        self._ctx = model.native_context()
        self.rec = _recorder(model, record_masks)
        self.counters = MlpCounters()

    def new_sequence(self) -> None:
        pass

    def close(self) -> None:
        pass

    def block(self, i: int, x: np.ndarray) -> None:
        """x += layer i's MLP of norm(x) (post-normed where the family does), one native call."""
        t0 = time.perf_counter()
        if self.lib.ds_mlp_block(self._ctx, self._refs[i], x.ctypes.data, self._got.ctypes.data) != 0:
            raise MemoryError("native MLP block failed")
        got_in, got_out = int(self._got[0]), int(self._got[1])
        c = self.counters
        read = got_in * self.w["in"][i].stride + got_out * self.w["out"][i].stride
        c.selected_bytes += read
        c.ram_bytes += read
        if self.rec is not None:
            self.rec.add_units(layer_key(i, "in"), self._idx["in"][:got_in])
            self.rec.add_units(layer_key(i, "out"), self._idx["out"][:got_out])
        if i == self.model.L - 1:
            c.tokens += 1
        c.mlp_s += time.perf_counter() - t0


class OffloadMLP:
    """The MLP records stay in the model file; `cache_bytes` of RAM hold cached units (the
    simulator's caches, split per masked linear), plus two read buffers laid out like a hook in
    the file (a missed unit is computed from where it was read). Reads use direct I/O unless
    `direct` is False; missed units closer than `read_gap` bytes are read in one request (reading
    through the gap costs less than another request's latency).

    With `prefetch`, the reads of the next hook are started before this hook's product is
    computed: "predicted" reads the units it will probably select and not find cached (the next
    layer's up/gate inputs chosen from the current residual stream, normed as that layer will
    norm it; a layer's down inputs from the previous token's choice there); "uncached" reads
    every uncached unit (what dense streaming needs); "auto" (the default) reads every uncached
    unit of a hook kind whose records are at most half `read_gap` (reads through the gaps between
    selected units would bring most of them anyway), else the predicted ones. After the wait, the
    hook reads whatever it selected that the prefetch did not bring; the output never depends on
    the prediction (tested)."""

    def __init__(self, model, chooser: MaskChooser, cache_bytes: int, policy: str = "lru",
                 io_threads: int = 4, direct: bool = True, record_masks: bool = True, read_gap: int = 0,
                 prefetch: str = "auto", **policy_kwargs):
        if prefetch not in PREFETCH:
            raise DipstreamError(f"prefetch must be one of {', '.join(PREFETCH)}, got {prefetch!r}")
        self.model, self.chooser, self.read_gap, self.prefetch = model, chooser, int(read_gap), prefetch
        infos = model.manifest["tensor_info"]
        self.info = {k: [infos[mlp_tensor(i, k)] for i in range(model.L)] for k in MLP_KINDS}
        self.stride = {k: self.info[k][0].stride for k in MLP_KINDS}
        self.n = {"in": model.d, "out": model.D}
        # per layer and kind: the records' float16 headers (in RAM) over a stand-in record
        self.q = {k: [model.headers_only(f) for f in self.info[k]] for k in MLP_KINDS}
        drop_page_cache(model.reader.fd)  # the headers are copied: their pages can go
        hooks = hook_specs(model.shape, "dip")
        self.capacity = cache_capacities(model.shape, cache_bytes, self.stride)
        self.caches = CacheSet(hooks, [self.capacity[h.name] for h in hooks], policy, grouping="hook", **policy_kwargs)
        self.slots = {h.name: SlotCache(self.caches, h.name, h.n_units, self.stride[h.kind], self.capacity[h.name])
                      for h in hooks}
        # a block-aligned read buffer per hook kind (an "in" hook computes from one while the next
        # "out" hook's prefetch fills the other)
        size = mlp_buffer_bytes(model.manifest)
        self.buf = {k: aligned_empty(size[k]) for k in MLP_KINDS}
        self.read = {k: self.buf[k][:self.n[k] * self.stride[k]].reshape(self.n[k], self.stride[k]) for k in MLP_KINDS}
        self.valid = {k: np.zeros(self.n[k], bool) for k in MLP_KINDS}
        # per hook kind, read ahead every uncached unit (dense streaming; "uncached"; "auto" where
        # records are small enough that reads through gaps would bring most of them anyway) or
        # only the predicted ones
        self._every = {k: chooser.rule.reads_all or prefetch == "uncached" or (prefetch == "auto" and 2 * self.stride[k] <= read_gap)
                       for k in MLP_KINDS}
        self.pending = None  # the prefetch in flight: (kind, layer, offsets, lengths, units)
        self.prev_out = [None] * model.L
        self.cache_ram = sum(s.nbytes for s in self.slots.values())
        self.reader = FileReader(model.directory / DATA, io_threads, direct)
        self.direct = self.reader.direct
        self._gu = np.empty(2 * model.D, np.float32)
        self._h = np.empty(model.D, np.float32)
        self._y = np.empty(model.d, np.float32)
        self._part = {"in": np.empty(2 * model.D, np.float32), "out": np.empty(model.d, np.float32)}
        self.rec = _recorder(model, record_masks)
        self.counters = MlpCounters()
        self.pos = 0
        self.preload_bytes = 0
        self._load_pinned()

    def close(self) -> None:
        self._wait()
        self.reader.close()

    def new_sequence(self) -> None:
        self._wait()
        self.caches.reset()
        self._load_pinned()
        self.prev_out = [None] * self.model.L
        self.pos = 0

    def _load_pinned(self) -> None:
        """Read the units a policy holds before any token (hot: the pinned ones) into their slots,
        at load time, as PowerInfer preloads its hot neurons; counted in `preload_bytes`, not in
        the per-token figures."""
        before = self.reader.bytes_read
        for name, slots in self.slots.items():
            units = slots.resync()
            if units.size:
                layer, kind = int(name.split(".")[1]), name.rsplit(".", 1)[1]
                offs, lens, fo, dst = self._extents(kind, layer, units)
                self.reader.read(fo, lens, dst)
                slots.load(units, self.read[kind])
        self.preload_bytes += self.reader.bytes_read - before
        for k in MLP_KINDS:  # the buffers hold preloaded records now, not a prefetch
            self.valid[k][:] = False

    # ------------------------------------------------------------------ reads
    def read_plan(self, kind: str, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, lengths) within the hook of the reads that fetch `units` (ascending)."""
        return read_plan(units, self.stride[kind], self.read_gap)

    def _extents(self, kind: str, layer: int, units: np.ndarray):
        offs, lens = self.read_plan(kind, units)
        return offs, lens, self.info[kind][layer].offset + offs, self.buf[kind].ctypes.data + offs

    def _read_now(self, kind: str, layer: int, units: np.ndarray) -> None:
        """Read the records of `units` into the kind's buffer and wait."""
        offs, lens, fo, dst = self._extents(kind, layer, units)
        if not offs.size:
            return
        t0 = time.perf_counter()
        self.reader.read(fo, lens, dst)
        c = self.counters
        c.io_wait_s += time.perf_counter() - t0
        c.disk_bytes += int(lens.sum())
        c.reads += offs.size
        self.valid[kind] |= covered(offs, lens, self.n[kind], self.stride[kind])

    def _start_prefetch(self, kind: str, layer: int, units: np.ndarray) -> None:
        """Start reading `units` of hook (kind, layer) into the kind's buffer (not waited)."""
        self.valid[kind][:] = False
        offs, lens, fo, dst = self._extents(kind, layer, units)
        if not offs.size:
            return
        self.reader.submit(fo, lens, dst)
        self.pending = (kind, layer, offs, lens, units)

    def _wait(self):
        """Finish the prefetch in flight; returns (kind, layer, units) it was for, or None."""
        if self.pending is None:
            return None
        kind, layer, offs, lens, units = self.pending
        self.pending = None
        t0 = time.perf_counter()
        n = self.reader.wait()
        c = self.counters
        c.io_wait_s += time.perf_counter() - t0
        c.disk_bytes += n
        c.prefetch_bytes += n
        c.reads += offs.size
        self.valid[kind] = covered(offs, lens, self.n[kind], self.stride[kind])
        return kind, layer, units

    # ------------------------------------------------------------------ one hook
    def _hook(self, kind: str, layer: int, v: np.ndarray, out: np.ndarray, next_hook=None) -> np.ndarray:
        """sum over selected units u of v[u] * record(u): cached units from their RAM slots, the
        others from the read buffer (and copied into the cache when it takes them). `next_hook`:
        (kind, layer, predicted mask) whose reads start before this hook's product."""
        name = layer_key(layer, kind)
        done = self._wait()
        if done is None or done[:2] != (kind, layer):
            self.valid[kind][:] = False
        slots = self.slots[name]
        cached = slots.cached.copy()
        mask = self.chooser.mask(kind, layer, v, self.pos, cached)
        if self.rec is not None:
            self.rec.add(name, mask)
        sel = np.flatnonzero(mask)
        hit, miss = sel[cached[sel]], sel[~cached[sel]]
        c = self.counters
        if done is not None and done[:2] == (kind, layer):
            c.prefetch_units += done[2].size
            c.prefetch_useful += int(mask[done[2]].sum())
            c.prefetch_served += int(self.valid[kind][miss].sum())
        c.missed_units += miss.size
        self._read_now(kind, layer, miss[~self.valid[kind][miss]])
        slots.step(mask, self.read[kind])  # evicts only units this token did not use: the hits keep their slots
        if next_hook is not None and self.prefetch != "off":  # read while this hook computes
            nk, nl, nmask = next_hook
            self._start_prefetch(nk, nl, np.flatnonzero(nmask & ~self.slots[layer_key(nl, nk)].cached))
        out[:] = 0
        q = self.q[kind][layer]
        gmax = q.group_max(v)  # one int8 scale per group across the cached and the read part
        if hit.size:
            q.gather(slots.slot[hit], np.ascontiguousarray(v[hit], np.float32), out, self.model.nthreads,
                     rec=slots.slab, units=hit, gmax=gmax)
        if miss.size:
            part = self._part[kind]
            q.gather(miss.astype(np.int64), np.ascontiguousarray(v[miss], np.float32), part, self.model.nthreads,
                     rec=self.read[kind], gmax=gmax)
            out += part
        stride = self.stride[kind]
        c.ram_bytes += hit.size * stride
        c.selected_bytes += sel.size * stride
        if sel.size:
            c.hit_rate_sum += hit.size / sel.size
            c.hit_rate_n += 1
        if kind == "out":
            self.prev_out[layer] = mask
        return out

    def __call__(self, i: int, x: np.ndarray, resid: np.ndarray | None = None) -> np.ndarray:
        """The MLP of layer i on its normed input x; `resid` (the residual stream) lets the next
        layer's reads start early."""
        t0 = time.perf_counter()
        m, D = self.model, self.model.D
        every = self._every
        nxt_out = None
        if self.prefetch != "off":
            guess = np.ones(D, bool) if every["out"] else self.prev_out[i]
            nxt_out = ("out", i, guess) if guess is not None else None
        gu = self._hook("in", i, x, self._gu, nxt_out)
        h = m.glu(gu, self._h)
        nxt_in = None
        if self.prefetch != "off" and resid is not None and i + 1 < m.L:
            if every["in"]:
                nxt_in = ("in", i + 1, np.ones(m.d, bool))
            else:
                xn = m.norm(resid, m.vec[layer_key(i + 1, "mlp_norm")])
                cached = self.slots[layer_key(i + 1, "in")].cached
                nxt_in = ("in", i + 1, self.chooser.mask("in", i + 1, xn, self.pos, cached))
        y = self._hook("out", i, h, self._y, nxt_in).copy()
        if i == m.L - 1:
            self.pos += 1
            self.counters.tokens += 1
        self.counters.mlp_s += time.perf_counter() - t0
        return y

    def block(self, i: int, x: np.ndarray) -> None:
        """x += layer i's MLP of norm(x) (post-normed where the family does)."""
        m = self.model
        y = self(i, m.norm(x, m.vec[layer_key(i, "mlp_norm")]), x)
        post = m.vec.get(layer_key(i, "post_mlp_norm"))
        x += m.norm(y, post) if post is not None else y
