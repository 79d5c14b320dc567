"""The lean engine's MLP backends: every block's MLP in RAM (dense or DIP), or offloaded to the
model file with a RAM cache of its units (dense streaming, DIP or DIP-CA).

A unit is one record of the bundled layout: ``layers.i.in`` unit j = [W_gate[:, j] | W_up[:, j]],
``layers.i.out`` unit i = W_down[:, i]. Per token and layer: choose the ``in`` mask from |x|
(dense: all; DIP: top-k_in; DIP-CA: the cache-aware choice), compute g and u from those records,
h = act(g) * u, choose the ``out`` mask from |h|, y from those records.

Offloaded, the caches are the simulator's own (``simulator.caches.CacheSet``: the same policies
and the same never-above-capacity rule), their capacities the reference's split of the cache RAM
per masked linear, in record bytes; the RAM slots mirror the cached sets. Missed units are read
with positioned direct reads of whole blocks (512 bytes) on the native read pool, requests closer
than a gap merged, into a buffer laid out like the hook in the file.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field

import numpy as np

from dipstream.engine import blocks
from dipstream.engine.model import LeanModel, load_matrix, read_headers
from dipstream.engine.qmatrix import QMatrix, engine_lib, topk_abs
from dipstream.errors import DipstreamError
from dipstream.simulator.caches import CacheSet
from dipstream.simulator.simulate import split_cache
from dipstream.simulator.trace import Hook, HookSpec, MaskTrace

KINDS = ("in", "out")
PREFETCH = ("auto", "predicted", "uncached", "off")
BLOCK = 512  # direct reads: offsets and lengths in whole blocks
BOOKKEEPING = 48  # RAM per MLP unit besides its record (SmolLM2: ~2 MB over 30 layers, measured by RSS)


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
    per_layer: list = field(default_factory=list)


class MaskChooser:
    """Each token's masks: `method` dense, dip or dip-ca (with gamma, n0_frac, warmup), the k of
    every layer; DIP-CA steers by the cached set it is given."""

    def __init__(self, method: str, k_in, k_out, gamma: float = 0.1, n0_frac: float = 0.5,
                 warmup: bool = True):
        if method not in ("dense", "dip", "dip-ca"):
            raise DipstreamError(f"the lean engine runs dense, dip or dip-ca, not '{method}'")
        self.method, self.k = method, {"in": list(k_in), "out": list(k_out)}
        self.gamma, self.n0_frac, self.warmup = float(gamma), float(n0_frac), bool(warmup)
        self._idx = np.empty(max(max(k_in, default=1), max(k_out, default=1), 1) + 1, np.int64)

    def k_of(self, kind: str, layer: int, n: int) -> int:
        return n if self.method == "dense" else min(n, self.k[kind][layer])

    def mask(self, kind: str, layer: int, v: np.ndarray, t: int, cached: np.ndarray | None = None) -> np.ndarray:
        """bool (n,) mask for token t of the sequence from scores |v|."""
        from dipstream.budget import gamma_at

        n = v.size
        k = self.k_of(kind, layer, n)
        m = np.zeros(n, bool)
        if k >= n:
            m[:] = True
            return m
        idx = np.empty(k, np.int64)
        g = gamma_at(self.gamma, t, self.warmup) if self.method == "dip-ca" else 1.0
        if g >= 1.0 or cached is None:
            m[topk_abs(v, k, idx)] = True
            return m
        s = np.abs(v)
        n0 = int(self.n0_frac * k)
        keep = cached.copy()
        if n0:
            keep[topk_abs(s, n0, np.empty(n0, np.int64))] = True
        m[topk_abs(np.where(keep, s, s * np.float32(g)).astype(np.float32), k, idx)] = True
        return m


class _Recorder:
    """Masks of every token (prompt included), for a simulator trace."""

    def __init__(self, L: int, record: bool):
        self.record = record
        self.masks = {k: [[] for _ in range(L)] for k in KINDS}

    def add(self, kind: str, layer: int, m: np.ndarray) -> None:
        if self.record:
            self.masks[kind][layer].append(np.packbits(m, bitorder="little"))

    def trace(self, model: LeanModel, prompt_len: int, metadata: dict) -> MaskTrace:
        hooks = []
        for i in range(model.L):
            for kind, n, unit in (("in", model.d, 2 * model.D), ("out", model.D, model.d)):
                packed = np.array(self.masks[kind][i], np.uint8).reshape(-1, (n + 7) // 8)
                m = np.unpackbits(packed, axis=1, count=n, bitorder="little").view(bool)
                hooks.append(Hook(f"layers.{i}.{kind}", kind, n, unit, m))
        return MaskTrace(hooks, [0], [prompt_len], metadata)


class RamMLP:
    """Every block's MLP records in RAM: dense, or DIP with the fused select-GEMV."""

    def __init__(self, model: LeanModel, chooser: MaskChooser, record_masks: bool = False):
        if chooser.method == "dip-ca":
            raise DipstreamError("dip-ca picks its masks from a RAM cache of an offloaded MLP: run it with "
                                 "--offload")
        self.model, self.chooser = model, chooser
        infos = model.manifest["tensor_info"]
        self.w = {k: [] for k in KINDS}
        for i in range(model.L):
            for kind, name in (("in", "mlp_in"), ("out", "mlp_out")):
                info = infos[f"layers.{i}.{name}"]
                self.w[kind].append(load_matrix(model.fd, info, model.act8))
        self.bytes = sum(q.nbytes for qs in self.w.values() for q in qs)
        D, d = model.D, model.d
        self._gu, self._y, self._h = np.empty(2 * D, np.float32), np.empty(d, np.float32), np.empty(D, np.float32)
        self._idx = {k: np.empty(n, np.int64) for k, n in (("in", d), ("out", D))}
        self._coef = np.empty(max(d, D), np.float32)
        self._blocks()
        self.rec = _Recorder(model.L, record_masks)
        self.counters = MlpCounters()
        self.pos = 0

    def new_sequence(self) -> None:
        self.pos = 0

    def close(self) -> None:
        pass

    def _blocks(self) -> None:
        """The native MLP blocks' arguments, one structure per layer (see engine.blocks)."""
        m, vec = self.model, self.model.vec.get
        work = [blocks.ptr(a) for a in (self._gu, self._h, self._y, self._idx["in"], self._idx["out"], self._coef)]
        self.blk = [blocks.DsMlp(blocks.mat(self.w["in"][i]), blocks.mat(self.w["out"][i]),
                                 blocks.ptr(vec(f"layers.{i}.mlp_norm")), blocks.ptr(vec(f"layers.{i}.post_mlp_norm")),
                                 self.chooser.k_of("in", i, m.d), self.chooser.k_of("out", i, m.D), *work)
                    for i in range(m.L)]
        self._refs = [ctypes.byref(b) for b in self.blk]
        self._got = np.zeros(2, np.int64)

    def block(self, i: int, x: np.ndarray) -> None:
        """x += layer i's MLP of norm(x) (post-normed where the family does), one native call."""
        t0 = time.perf_counter()
        m = self.model
        if m._lib.ds_mlp_block(m._ctx_ref, self._refs[i], x.ctypes.data, self._got.ctypes.data) != 0:
            raise MemoryError("native MLP block failed")
        got, got2 = int(self._got[0]), int(self._got[1])
        c = self.counters
        read = got * self.w["in"][i].stride + got2 * self.w["out"][i].stride
        c.selected_bytes += read
        c.ram_bytes += read
        if self.rec.record:
            for kind, idx, n in (("in", self._idx["in"][:got], m.d), ("out", self._idx["out"][:got2], m.D)):
                mk = np.zeros(n, bool)
                mk[idx] = True
                self.rec.add(kind, i, mk)
        if i == m.L - 1:
            c.tokens += 1
            self.pos += 1
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

    @staticmethod
    def buffer_sizes(n: dict, stride: dict) -> dict:
        """Bytes of each kind's read buffer: its hook plus block slack, in whole blocks."""
        size = {k: n[k] * stride[k] + 2 * BLOCK for k in KINDS}
        return {k: v + (-v) % BLOCK for k, v in size.items()}

    @staticmethod
    def fixed_bytes(n: dict, stride: dict, header_bytes: int = 0, layers: int = 0) -> int:
        """RAM besides the caches: the two read buffers (one per hook kind), the records' headers
        and per unit of every hook BOOKKEEPING bytes (slot map, policy state, masks; measured)."""
        return sum(OffloadMLP.buffer_sizes(n, stride).values()) + BLOCK + header_bytes \
            + BOOKKEEPING * layers * sum(n.values())

    def __init__(self, model: LeanModel, chooser: MaskChooser, cache_bytes: int, policy: str = "lru",
                 io_threads: int = 4, direct: bool = True, record_masks: bool = True, read_gap: int = 0,
                 prefetch: bool = True, **policy_kwargs):
        self.model, self.chooser = model, chooser
        lib = engine_lib()
        self.lib, self.io_threads, self.read_gap = lib, int(io_threads), int(read_gap)
        self.prefetch = {True: "auto", False: "off"}.get(prefetch, prefetch)
        if self.prefetch not in PREFETCH:
            raise DipstreamError(f"prefetch must be one of {', '.join(PREFETCH)}, got {prefetch!r}")
        infos = model.manifest["tensor_info"]
        self.info = {k: [infos[f"layers.{i}.mlp_{k}"] for i in range(model.L)] for k in KINDS}
        fi, fo = self.info["in"][0], self.info["out"][0]
        self.stride = {"in": fi.stride, "out": fo.stride}
        self.n = {"in": model.d, "out": model.D}
        # per layer and kind: the records' float16 headers (static, in RAM) over a stand-in record
        self.q = {k: [QMatrix(np.zeros((1, self.stride[k]), np.uint8), f.fmt, f.m, *read_headers(model.fd, f),
                              units=f.rows, act8=model.act8) for f in self.info[k]] for k in KINDS}
        self.header_bytes = sum(q.header_bytes for qs in self.q.values() for q in qs)
        if hasattr(os, "posix_fadvise"):  # the headers are copied: drop their pages from the page cache
            os.posix_fadvise(model.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        hooks = [HookSpec(f"layers.{i}.{k}", k, self.n[k], 2 * model.D if k == "in" else model.d)
                 for i in range(model.L) for k in KINDS]
        unit_bytes = np.array([self.stride[h.kind] for h in hooks], np.int64)
        cap = np.minimum(split_cache(hooks, model.arch_shape(), float(max(cache_bytes, 0)), unit_bytes),
                         [h.n_units for h in hooks])
        self.capacity = {h.name: int(c) for h, c in zip(hooks, cap)}
        self.caches = CacheSet(hooks, cap, policy, grouping="hook", **policy_kwargs)
        # RAM: per hook its cache slots; a block-aligned read buffer per hook kind (an "in" hook
        # computes from one while the next "out" hook's prefetch fills the other)
        self.slab, self.slot, self.free = {}, {}, {}
        for h in hooks:
            c = self.capacity[h.name]
            self.slab[h.name] = np.zeros((c, self.stride[h.kind]), np.uint8)
            self.slot[h.name] = np.full(h.n_units, -1, np.int64)
            self.free[h.name] = list(range(c))
        size = self.buffer_sizes(self.n, self.stride)  # whole blocks: both buffers block-aligned
        raw = np.empty(sum(size.values()) + BLOCK, np.uint8)
        off = (-raw.ctypes.data) % BLOCK
        self.buf = {"in": raw[off:off + size["in"]], "out": raw[off + size["in"]:off + size["in"] + size["out"]]}
        self.valid = {k: np.zeros(self.n[k], bool) for k in KINDS}
        # per hook kind, read ahead every uncached unit (dense streaming; "uncached"; "auto" where
        # records are small enough that reads through gaps would bring most of them anyway) or
        # only the predicted ones
        self._every = {k: chooser.method == "dense" or self.prefetch == "uncached"
                       or (self.prefetch == "auto" and 2 * self.stride[k] <= self.read_gap) for k in KINDS}
        self.pending = None  # the prefetch in flight: (kind, layer, offsets, lengths, file offsets, dst)
        self.prev_out = [None] * model.L
        self.ram_bytes = sum(s.nbytes for s in self.slab.values()) + raw.nbytes + self.header_bytes
        self.cache_ram = sum(self.capacity[n] * self.stride[n.split(".")[-1]] for n in self.capacity)
        flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
        path = model.directory / "model.bin"
        try:
            self.fd = os.open(path, flags)
        except OSError:
            self.fd = os.open(path, os.O_RDONLY)
            direct = False
        self.direct = direct
        self._gu = np.empty(2 * model.D, np.float32)
        self._h = np.empty(model.D, np.float32)
        self._y = np.empty(model.d, np.float32)
        self._part = {"in": np.empty(2 * model.D, np.float32), "out": np.empty(model.d, np.float32)}
        self.rec = _Recorder(model.L, record_masks)
        self.counters = MlpCounters()
        self.pos = 0
        self.preload_bytes = 0
        self._load_pinned()

    def close(self) -> None:
        self._wait()
        os.close(self.fd)

    def new_sequence(self) -> None:
        self._wait()
        self.caches.reset()
        for name, slots in self.slot.items():  # units the policy holds from the start (hot) keep their slots
            slots[~self.caches.cached(name)[0]] = -1
            used = set(slots[slots >= 0].tolist())
            self.free[name] = [s for s in range(self.capacity[name]) if s not in used]
        self._load_pinned()
        self.prev_out = [None] * self.model.L
        self.pos = 0

    def _load_pinned(self) -> None:
        """Read the units a policy holds before any token (hot: the pinned ones) into their slots,
        at load time, as PowerInfer preloads its hot neurons; counted in `preload_bytes`, not in
        the per-token figures."""
        c = self.counters
        for name, slots in self.slot.items():
            _, layer, kind = name.split(".")
            units = np.flatnonzero(self.caches.cached(name)[0] & (slots < 0))
            if not units.size:
                continue
            before = (c.disk_bytes, c.reads, c.io_wait_s)
            self._read_now(kind, int(layer), units)
            self.preload_bytes += c.disk_bytes - before[0]
            c.disk_bytes, c.reads, c.io_wait_s = before
            read = self.buf[kind][:self.n[kind] * self.stride[kind]].reshape(self.n[kind], self.stride[kind])
            free = self.free[name]
            dest = np.array(free[-units.size:], np.int64)
            del free[-units.size:]
            slots[units] = dest
            self.slab[name][dest] = read[units]
        for k in KINDS:  # the buffers hold preloaded records now, not a prefetch
            self.valid[k][:] = False

    # ------------------------------------------------------------------ reads
    def read_plan(self, kind: str, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, lengths) within the hook of the reads that fetch `units` (ascending): their
        records rounded out to whole blocks, requests closer than `read_gap` merged."""
        if units.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        stride = self.stride[kind]
        lo = units.astype(np.int64) * stride
        hi = lo + stride
        lo -= lo % BLOCK
        hi += (-hi) % BLOCK
        new = np.ones(units.size, bool)
        new[1:] = lo[1:] > hi[:-1] + self.read_gap
        first = np.flatnonzero(new)
        last = np.append(first[1:], units.size) - 1
        return lo[first], hi[last] - lo[first]

    def _covered(self, kind: str, offs: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """Units whose whole record lies inside the extents (offs, lens) (sorted, disjoint)."""
        stride, n = self.stride[kind], self.n[kind]
        lo = np.arange(n, dtype=np.int64) * stride
        j = np.searchsorted(offs, lo, side="right") - 1
        ok = j >= 0
        jj = np.maximum(j, 0)
        return ok & (lo + stride <= offs[jj] + lens[jj])

    def _extents(self, kind: str, layer: int, units: np.ndarray):
        offs, lens = self.read_plan(kind, units)
        fo = self.info[kind][layer].offset + offs
        dst = self.buf[kind].ctypes.data + offs
        return offs, lens, fo, dst

    def _read_now(self, kind: str, layer: int, units: np.ndarray) -> None:
        """Read the records of `units` into the kind's buffer and wait."""
        offs, lens, fo, dst = self._extents(kind, layer, units)
        if not offs.size:
            return
        t0 = time.perf_counter()
        rc = self.lib.ds_pread_batch(self.fd, offs.size, fo.ctypes.data, lens.ctypes.data, dst.ctypes.data,
                                     self.io_threads)
        self.counters.io_wait_s += time.perf_counter() - t0
        if rc != 0:
            raise DipstreamError(f"reading the model file failed: {os.strerror(rc)}")
        self.counters.disk_bytes += int(lens.sum())
        self.counters.reads += offs.size
        self.valid[kind] |= self._covered(kind, offs, lens)

    def _start_prefetch(self, kind: str, layer: int, units: np.ndarray) -> None:
        """Start reading `units` of hook (kind, layer) into the kind's buffer (not waited)."""
        self.valid[kind][:] = False
        offs, lens, fo, dst = self._extents(kind, layer, units)
        if not offs.size:
            return
        rc = self.lib.ds_pread_submit(self.fd, offs.size, fo.ctypes.data, lens.ctypes.data, dst.ctypes.data,
                                      self.io_threads)
        if rc != 0:
            raise DipstreamError(f"reading the model file failed: {os.strerror(rc)}")
        self.pending = (kind, layer, offs, lens, fo, dst, units)

    def _wait(self):
        """Finish the prefetch in flight; returns (kind, layer, units) it was for, or None."""
        if self.pending is None:
            return None
        kind, layer, offs, lens, fo, dst, units = self.pending
        self.pending = None
        t0 = time.perf_counter()
        rc = self.lib.ds_pread_wait(None)
        c = self.counters
        c.io_wait_s += time.perf_counter() - t0
        if rc != 0:
            raise DipstreamError(f"reading the model file failed: {os.strerror(rc)}")
        c.disk_bytes += int(lens.sum())
        c.prefetch_bytes += int(lens.sum())
        c.reads += offs.size
        self.valid[kind] = self._covered(kind, offs, lens)
        return kind, layer, units

    # ------------------------------------------------------------------ one hook
    def _hook(self, kind: str, layer: int, v: np.ndarray, out: np.ndarray, next_hook=None) -> np.ndarray:
        """sum over selected units u of v[u] * record(u): cached units from their RAM slots, the
        others from the read buffer (and copied into the cache when it takes them). `next_hook`:
        (kind, layer, predicted mask) whose reads start before this hook's product."""
        name = f"layers.{layer}.{kind}"
        done = self._wait()
        if done is None or done[:2] != (kind, layer):
            self.valid[kind][:] = False
        cached = self.caches.cached(name)[0]
        mask = self.chooser.mask(kind, layer, v, self.pos, cached)
        self.rec.add(kind, layer, mask)
        sel = np.flatnonzero(mask)
        hit, miss = sel[cached[sel]], sel[~cached[sel]]
        c = self.counters
        if done is not None and done[:2] == (kind, layer):
            c.prefetch_units += done[2].size
            c.prefetch_useful += int(mask[done[2]].sum())
            c.prefetch_served += int(self.valid[kind][miss].sum())
        c.missed_units += miss.size
        self._read_now(kind, layer, miss[~self.valid[kind][miss]])
        read = self.buf[kind][:self.n[kind] * self.stride[kind]].reshape(self.n[kind], self.stride[kind])
        self.caches.step(name, mask[None])
        now = self.caches.cached(name)[0]
        slots, slab, free = self.slot[name], self.slab[name], self.free[name]
        gone = np.flatnonzero(cached & ~now)
        if gone.size:  # evicted units free their slots
            free.extend(slots[gone].tolist())
            slots[gone] = -1
        kept = miss[now[miss]]
        if kept.size:
            dest = np.array(free[-kept.size:], np.int64)
            del free[-kept.size:]
            slots[kept] = dest
            slab[dest] = read[kept]
        if next_hook is not None and self.prefetch != "off":
            nk, nl, nmask = next_hook
            ncached = self.caches.cached(f"layers.{nl}.{nk}")[0]
            self._start_prefetch(nk, nl, np.flatnonzero(nmask & ~ncached))
        out[:] = 0
        if hit.size:
            self.q[kind][layer].gather(slots[hit], np.ascontiguousarray(v[hit], np.float32), out,
                                       self.model.nthreads, rec=slab, units=hit)
        if miss.size:
            part = self._part[kind]
            self.q[kind][layer].gather(miss.astype(np.int64), np.ascontiguousarray(v[miss], np.float32), part,
                                       self.model.nthreads, rec=read)
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
                xn = m.norm(resid, m.vec[f"layers.{i + 1}.mlp_norm"])
                cached = self.caches.cached(f"layers.{i + 1}.in")[0]
                nxt_in = ("in", i + 1, self.chooser.mask("in", i + 1, xn, self.pos, cached))
        y = self._hook("out", i, h, self._y, nxt_in).copy()
        if i == m.L - 1:
            self.pos += 1
            self.counters.tokens += 1
        self.counters.mlp_s += time.perf_counter() - t0
        return y

    def block(self, i: int, x: np.ndarray) -> None:
        """x += layer i's MLP of norm(x) (post-normed where the family does)."""
        m, p = self.model, f"layers.{i}."
        y = self(i, m.norm(x, m.vec[p + "mlp_norm"]), x)
        x += m.norm(y, m.vec[p + "post_mlp_norm"]) if p + "post_mlp_norm" in m.vec else y
