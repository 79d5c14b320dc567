"""Trace-driven DRAM/Flash simulator (reference semantics: docs/methods.md, "The simulator").

Placement: static layers (attention, embedding, lm_head - once if tied -, predictors, LoRA adapters, MLP
weights no hook covers, a MoE router, KV cache at the full ``seq_len``) take DRAM first; what is left is split
uniformly per masked *linear* (``cache_split="linear"``, the reference): a hook whose mask is
shared by n linears gets n shares (DIP: up/gate hook 2, down hook 1; neuron hooks 2 or 3; an
``expert`` hook one per expert linear it covers: n_units * unit_weights / (d * D), so a
``layers.i.experts`` hook of E whole experts gets 3E).
Not the reference: ``"hook"`` (one share per hook) and ``"weights"`` (in proportion to each
hook's weights; the same as ``"linear"`` for gated MLPs). Per hook, capacity =
floor(share / unit bytes). Static bytes that do not fit (``overflow``) are streamed from Flash
every token.

Per decoded token and hook with mask m and cache c: DRAM bytes = |m & c| * unit bytes, Flash
bytes = |m & ~c| * unit bytes, t = comb(DRAM / dram_bw, Flash / flash_bw) (comb = max when
``overlap`` else sum). Static per token: every static byte is read, the KV cache at the average
length (P + S) / 2 of the sequence (P prompt tokens of S); the overflow part comes from Flash,
the rest from DRAM (dram = max(0, static_read - overflow)). Per sequence, tokens/s = 1 /
(t_static + mean over its decoded tokens of sum_h t); ``tokens_per_s`` is the mean over
sequences (the reference), ``time_per_token_s`` the mean of the per-sequence times. Hit rate:
the mean over tokens and hooks of |m & c| / |m|, hooks weighted by their number of linears
(the reference); per hook, unweighted.

Prompt tokens (the first ``prompt_len`` tokens of a sequence) step the caches like every token
but are left out of the decode statistics. TTFT, averaged over sequences: with a prompt, the
prefill reads every weight once, densely, from where it lives (static placement as above;
MLP units from DRAM if cached when the sequence starts - never, with per-sequence resets -
else from Flash, as large sequential reads) plus the KV cache at the prompt length; without a
prompt, the time of the sequence's first token (KV length 1).

Beyond the reference (``Hardware`` switches, off by default): ``compute_flops`` adds a
roofline per token: t = max(I/O time of the token, flops / compute_flops), flops = 2 * weights
used + 4 * kv_len * d * L (prefill: every prompt token, causal attention); Flash read latency
(per missed unit ``reads_per_unit`` reads: in 2, out 1, neuron 3 (2 for a two-matrix unit),
expert one per matrix (unit_weights / (d * D)), dense 1, or 1 when ``bundle``; with ``coalesce``
one read per run of consecutive missed units of a hook); ``embedding_lookup``.

Mixture of experts (``ModelShape.n_experts`` > 0; hooks in ``trace``'s docstring): routed experts
are cached and read through their hooks like any MLP unit; routed experts no hook covers and a
shared expert without hooks are static (read in full every token). The prefill compute term
counts every hooked expert for every prompt token (an upper bound; its I/O, every weight read
once, is exact).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from dipstream.names import key_layer, layer_key

from . import bits
from .caches import CacheSet
from .hardware import Hardware, load_hardware, parse_dram
from .model_shape import ModelShape, get_shape
from .trace import READS_PER_UNIT, HookSpec, MaskTrace, check_trace_matches

CACHE_SPLITS = ("linear", "hook", "weights")


@dataclass
class Placement:
    dram_bytes: float
    seq_len: int
    static_parts: dict            # bytes per static part (kv_cache at seq_len)
    static_bytes: float
    static_resident_bytes: float
    overflow_bytes: float
    cache_bytes: float
    unit_bytes: np.ndarray        # per hook
    unit_weights: np.ndarray
    n_units: np.ndarray
    capacity: np.ndarray          # per hook, units (may exceed n_units)
    reads_per_unit: np.ndarray
    n_linears: np.ndarray         # per hook: linears sharing its mask (cache shares, hit-rate weights)
    uncovered_mlp_weights: float
    predictor_weights: float
    adapter_weights: float
    fixed_reads: np.ndarray = None  # Flash reads per token per hook when any unit misses
    hook_names: list = None       # in hook order


def resolve_dram(dram_bytes, hardware: Hardware, shape: ModelShape) -> float:
    spec = hardware.dram_bytes if dram_bytes is None else dram_bytes
    if spec is None:
        raise ValueError("no DRAM size: pass dram_bytes (e.g. '0.5x', '4GB') or set "
                         "Hardware.dram_bytes")
    return float(parse_dram(spec, shape.weight_bytes(hardware.bits)))


def reads_per_unit(hook, shape: ModelShape) -> int:
    """Weight vectors (Flash reads) per unit: in 2, out 1, neuron 2 or 3, dense 1, expert one per
    d*D matrix (3 for a whole expert, 1 for one linear)."""
    if hook.kind == "neuron":
        return max(1, int(hook.unit_weights) // shape.d_model)
    if hook.kind == "expert":
        return max(1, int(hook.unit_weights) // (shape.d_model * shape.d_ff))
    return READS_PER_UNIT[hook.kind]


def n_linears(hook, shape: ModelShape) -> int:
    """Linears that share ``hook``'s mask (its cache shares): in 2 (up, gate), out 1 (down), neuron
    2 or 3, dense 1, expert n_units * unit_weights / (d*D) (every expert linear it covers)."""
    if hook.kind == "expert":
        return max(1, int(hook.n_units) * int(hook.unit_weights) // (shape.d_model * shape.d_ff))
    return reads_per_unit(hook, shape)


def split_cache(hooks, shape: ModelShape, cache_bytes: float, unit_bytes, cache_split: str = "linear") -> np.ndarray:
    """Units each hook's cache holds when ``cache_bytes`` are split between the hooks (the
    reference: per masked linear; or per hook, or by weights) and a unit of hook h takes
    ``unit_bytes[h]`` bytes."""
    hooks = list(hooks)
    if not hooks:
        return np.zeros(0, np.int64)
    ub = np.asarray(unit_bytes, np.float64)
    nl = np.array([n_linears(h, shape) for h in hooks], np.int64)
    if cache_split == "linear":
        share = cache_bytes * nl / nl.sum()
    elif cache_split == "hook":
        share = np.full(len(hooks), cache_bytes / len(hooks))
    elif cache_split == "weights":
        w = np.array([h.unit_weights * h.n_units for h in hooks], np.float64)
        share = cache_bytes * w / w.sum()
    else:
        raise ValueError(f"cache_split must be one of {', '.join(CACHE_SPLITS)}, got {cache_split!r}")
    return np.floor(share / ub * (1 + 1e-12)).astype(np.int64)


def plan_placement(shape: ModelShape, hardware: Hardware, hooks, dram_bytes: float,
                   seq_len: int, predictor_weights: float = 0,
                   cache_split: str = "linear", adapter_weights: float = 0) -> Placement:
    """Static placement and per-hook cache capacities (see module docstring)."""
    b = {k: v / 8 for k, v in hardware.bits.items()}
    hooks = list(hooks)
    uw = np.array([h.unit_weights for h in hooks], np.int64)
    nu = np.array([h.n_units for h in hooks], np.int64)
    covered = float((uw * nu).sum())
    uncovered = shape.mlp_weights() - covered
    if uncovered < 0:
        raise ValueError(f"hooks cover {covered:.0f} MLP weights, more than the model's "
                         f"{shape.mlp_weights()}")
    parts = {"attention": shape.attention_weights() * b["attention"],
             "lm_head": shape.lm_head_weights() * b["lm_head"],
             "embedding": 0.0 if shape.tied_embeddings else shape.embedding_weights() * b["embedding"],
             "predictors": predictor_weights * b["predictors"],
             "adapters": adapter_weights * b["adapters"],
             "mlp_uncovered": uncovered * b["mlp"],
             "router": shape.router_weights() * b["router"],
             "kv_cache": shape.kv_cache_weights(seq_len) * b["kv_cache"]}
    static = float(sum(parts.values()))
    dram = float(dram_bytes)
    if static > dram:
        if not hardware.stream_static_overflow:
            raise ValueError(f"DRAM ({dram / 1e9:.3g} GB) is smaller than the static layers "
                             f"({static / 1e9:.3g} GB); give more DRAM or set "
                             "stream_static_overflow=True to stream the overflow from Flash")
        overflow, resident, cache = static - dram, dram, 0.0
    else:
        overflow, resident, cache = 0.0, static, dram - static
    ub = uw * b["mlp"]
    nl = np.array([n_linears(h, shape) for h in hooks], np.int64)
    cap = split_cache(hooks, shape, cache, ub, cache_split)
    rpu = np.array([1 if hardware.bundle else reads_per_unit(h, shape) for h in hooks], np.int64)
    return Placement(dram, int(seq_len), parts, static, resident, overflow, cache, ub, uw, nu,
                     cap, rpu, nl, uncovered, float(predictor_weights), float(adapter_weights),
                     np.zeros(len(hooks), np.int64), [h.name for h in hooks])


@dataclass
class SimResult:
    model: str
    method: str
    policy: str
    hardware: str
    dram_bytes: float
    dram_used_bytes: float
    static_bytes: float
    static_overflow_bytes: float
    cache_bytes: float
    seq_len: int
    kv_len_avg: float
    n_tokens: int
    n_sequences: int
    hook_names: list
    n_units: list
    capacity_units: list
    hit_rate: float
    hit_rate_per_hook: list
    density_requested: float
    density_measured: float
    dram_bytes_per_token: float
    flash_bytes_per_token: float
    mlp_dram_bytes_per_token: float
    mlp_flash_bytes_per_token: float
    t_static_s: float
    t_mlp_s: float
    time_per_token_s: float
    tokens_per_s: float
    ttft_s: float
    compute_bound_fraction: float = 0.0
    extra: dict = field(default_factory=dict)  # free-form, for callers

    def to_dict(self) -> dict:
        return _plain(asdict(self))


def _plain(o):
    if isinstance(o, dict):
        return {k: _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return _plain(o.tolist())
    if isinstance(o, np.generic):
        return o.item()
    return o


class _Timing:
    """Byte and time accounting shared by simulate, ClosedLoop and the dense baseline."""

    def __init__(self, shape: ModelShape, hw: Hardware, plan: Placement):
        self.shape, self.hw, self.plan = shape, hw, plan
        self.static_w = (shape.attention_weights() + shape.lm_head_weights() + shape.router_weights()
                         + plan.predictor_weights + plan.adapter_weights + plan.uncovered_mlp_weights)
        # lookahead: 1.0 for the first hook of each layer (names layers.<i>.*), in hook order
        self.first_of_layer = _first_of_layer(plan.hook_names) if hw.lookahead else None
        # host time per token: the runtime's own, plus its bookkeeping for every cache-managed hook
        self.host_s = hw.host_s_per_token + hw.host_s_per_cached_hook * int(np.sum(plan.capacity < plan.n_units))

    def static_bytes(self, kv_len: float, prefill: bool = False) -> dict:
        """Bytes of each static part read for one token at KV length kv_len (prefill: for the
        whole prompt of kv_len tokens), by module kind."""
        p, s, hw = self.plan.static_parts, self.shape, self.hw
        emb = p["embedding"]
        if hw.embedding_lookup and not s.tied_embeddings:
            emb = min(emb, (kv_len if prefill else 1) * s.d_model * hw.bits["embedding"] / 8)
        return {"attention": p["attention"], "lm_head": p["lm_head"], "embedding": emb, "predictors": p["predictors"],
                "adapters": p["adapters"], "mlp": p["mlp_uncovered"], "router": p["router"],
                "kv_cache": s.kv_cache_weights(kv_len) * hw.bits["kv_cache"] / 8}

    def static_io(self, kv_len: float, prefill: bool = False):
        """(DRAM bytes, Flash bytes) of the static layers for one token at KV length kv_len
        (prefill: for the whole prompt of kv_len tokens)."""
        total = sum(self.static_bytes(kv_len, prefill).values())
        flash = self.plan.overflow_bytes
        return max(0.0, total - flash), flash

    def static_time(self, kv_len, prefill=False):
        """Time of the static reads; with ``dram_bw_static`` each kind's DRAM bytes at its own rate
        (the DRAM share of every kind in proportion when some static bytes overflow to Flash)."""
        parts = self.static_bytes(kv_len, prefill)
        total = sum(parts.values())
        f = self.plan.overflow_bytes
        d = max(0.0, total - f)
        if not self.hw.dram_bw_static:
            t_dram = d / self.hw.dram_bw
        else:
            t_dram = (d / total if total else 0.0) * self._dram_time(parts)
        return float(self.hw.comb(t_dram, f / self.hw.flash_bw))

    def _dram_time(self, parts: dict) -> float:
        """DRAM read time of static bytes by module kind, each at its ``dram_bw_static`` rate (else
        ``dram_bw``)."""
        rates, bw = self.hw.dram_bw_static, self.hw.dram_bw
        return sum(b / rates.get(k, bw) for k, b in parts.items())

    def static_flops(self, kv_len):
        return 2 * self.static_w + 4 * kv_len * self.q_dim * self.shape.n_layers

    @property
    def q_dim(self) -> int:
        """Width of the attention's queries: n_heads * head_dim (d_model unless head_dim is set)."""
        return self.shape.n_heads * self.shape.head_dim or self.shape.d_model

    def hook_parts(self, sel, hit, runs=None, read=None):
        """(DRAM, Flash) times per token and hook (T, H) for selected / hit unit counts; ``runs``
        (given with ``coalesce``): Flash reads = runs of consecutive missed units; ``read``: units
        read from Flash (the missed ones and, with ``read_gap_bytes``, the gaps read through)."""
        pl, hw = self.plan, self.hw
        miss = sel - hit if read is None else read
        if runs is not None:
            reads = runs
        else:
            reads = miss * pl.reads_per_unit + (miss > 0) * pl.fixed_reads
        return hit * pl.unit_bytes / hw.dram_bw, hw.flash_time(miss * pl.unit_bytes, reads)

    def attention_time(self, kv_len: float) -> float:
        """DRAM time of one layer's attention weights and KV cache (static, read per token)."""
        parts = self.static_bytes(kv_len)
        return self._dram_time({k: parts[k] for k in ("attention", "kv_cache")}) / self.shape.n_layers

    def hook_times(self, sel, hit, runs=None, read=None):
        """Per token and hook times (T, H): DRAM and Flash combined (hw.comb)."""
        return self.hw.comb(*self.hook_parts(sel, hit, runs, read))

    def token_io(self, kv, sel, hit, runs=None, read=None):
        """Time per token (T,) outside compute: static reads, the hooks and the host time; with
        ``pipelined`` the token's Flash reads overlap all of its other time, with ``lookahead``
        each hook's the previous hook's DRAM time (and its layer's attention, for a layer's first
        hook), else only its own."""
        hw = self.hw
        if hw.lookahead:
            t_dram, t_flash = self.hook_parts(sel, hit, runs, read)
            t_dram, t_flash = np.atleast_2d(t_dram), np.atleast_2d(t_flash)
            window = np.concatenate([np.zeros_like(t_dram[:, :1]), t_dram[:, :-1]], axis=1)
            window = window + self.first_of_layer * self.attention_time(kv)
            out = self.static_time(kv) + np.sum(t_dram + np.maximum(t_flash - window, 0.0), axis=-1) + self.host_s
            return out if np.ndim(sel) > 1 else out[0]
        if hw.pipelined:
            t_dram, t_flash = self.hook_parts(sel, hit, runs, read)
            return np.maximum(np.sum(t_flash, axis=-1),
                              self.static_time(kv) + np.sum(t_dram, axis=-1) + self.host_s)
        return self.static_time(kv) + np.sum(self.hook_times(sel, hit, runs, read), axis=-1) + self.host_s

    def roofline(self, t_io, flops):
        if not self.hw.compute_flops:
            return t_io
        return np.maximum(t_io, flops / self.hw.compute_flops)

    def prefill_time(self, p: int, occ0: np.ndarray) -> float:
        """Dense prompt pass of p tokens; occ0 = cached units per hook at the sequence start."""
        pl, hw = self.plan, self.hw
        t = self.static_time(p, prefill=True) + p * self.host_s
        t += float(np.sum(hw.comb(occ0 * pl.unit_bytes / hw.dram_bw,
                                  (pl.n_units - occ0) * pl.unit_bytes / hw.flash_bw)))
        L, d = self.shape.n_layers, self.q_dim
        flops = p * (2 * self.static_w + 2 * float(np.sum(pl.n_units * pl.unit_weights))) \
            + 2 * d * L * p * (p + 1)
        return float(self.roofline(t, flops))


def _first_of_layer(names) -> np.ndarray:
    """(H,) 1.0 for the first hook of each layer (hook names layers.<i>.*), in hook order."""
    layers = [-1 if key_layer(n) is None else key_layer(n) for n in names]
    return np.array([i == 0 or layers[i] != layers[i - 1] for i in range(len(layers))], np.float64)


def _summarize(timing: _Timing, sel, hit, seq_of, kv_seq, ttft, *, names, policy, meta,
               occ_peak_bytes, runs=None, read=None) -> SimResult:
    """Figures of the decoded tokens: ``sel``/``hit`` (T, H) per token and hook, ``seq_of`` (T,)
    the sequence of each token, ``kv_seq`` the average KV length (P + S) / 2 of every sequence."""
    pl, hw, shape = timing.plan, timing.hw, timing.shape
    sel = np.asarray(sel, np.float64).reshape(-1, len(names))
    hit = np.asarray(hit, np.float64).reshape(-1, len(names))
    seq_of = np.asarray(seq_of, np.int64).reshape(-1)
    kv_seq = np.asarray(kv_seq, np.float64).reshape(-1)
    if runs is not None:
        runs = np.asarray(runs, np.float64).reshape(-1, len(names))
    read = sel - hit if read is None else np.asarray(read, np.float64).reshape(-1, len(names))
    T = sel.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(sel > 0, hit / np.where(sel > 0, sel, 1), np.nan)
    nanmean = (lambda a, **k: np.nan if np.all(np.isnan(a)) else np.nanmean(a, **k))
    per_hook = [nanmean(ratio[:, j]) for j in range(len(names))] if T else [np.nan] * len(names)
    w = np.broadcast_to(pl.n_linears.astype(np.float64), ratio.shape)
    valid = ~np.isnan(ratio)
    hit_rate = float((np.where(valid, ratio, 0) * w).sum() / (w * valid).sum()) if valid.any() else np.nan
    t_h = timing.hook_times(sel, hit, runs, read)
    t_mlp = t_h.sum(axis=1)
    mlp_used_w = (sel * pl.unit_weights).sum(axis=1)
    seqs = np.unique(seq_of)
    t_seq, t_stat, cb_seq = [], [], []
    for q in seqs:  # the reference: tokens/s per sequence, then the mean over sequences
        i = seq_of == q
        kv = float(kv_seq[q])
        io = timing.token_io(kv, sel[i], hit[i], None if runs is None else runs[i], read[i])
        if hw.compute_flops:
            fl = timing.static_flops(kv) + 2 * mlp_used_w[i]
            t_seq.append(float(np.mean(timing.roofline(io, fl))))
            cb_seq.append(float(np.mean(fl / hw.compute_flops > io)))
        else:
            t_seq.append(float(np.mean(io)))
            cb_seq.append(0.0)
        t_stat.append(timing.static_time(kv))
    kv_avg = float(np.mean(kv_seq[seqs])) if T else 0.0
    sd, sf = timing.static_io(kv_avg)
    mean = (lambda a: float(np.mean(a)) if T else np.nan)
    mlp_d = mean((hit * pl.unit_bytes).sum(axis=1))
    mlp_f = mean((read * pl.unit_bytes).sum(axis=1))
    mlp_total = shape.mlp_weights()
    return SimResult(
        model=str(meta.get("model", "")), method=str(meta.get("method", "")), policy=policy,
        hardware=hw.name, dram_bytes=pl.dram_bytes,
        dram_used_bytes=pl.static_resident_bytes + occ_peak_bytes,
        static_bytes=pl.static_bytes, static_overflow_bytes=pl.overflow_bytes,
        cache_bytes=pl.cache_bytes, seq_len=pl.seq_len, kv_len_avg=kv_avg, n_tokens=T,
        n_sequences=len(seqs), hook_names=list(names), n_units=pl.n_units.tolist(),
        capacity_units=np.minimum(pl.capacity, pl.n_units).tolist(),
        hit_rate=hit_rate, hit_rate_per_hook=per_hook,
        density_requested=meta.get("density"),
        density_measured=mean((mlp_used_w + pl.uncovered_mlp_weights) / mlp_total),
        dram_bytes_per_token=sd + mlp_d, flash_bytes_per_token=sf + mlp_f,
        mlp_dram_bytes_per_token=mlp_d, mlp_flash_bytes_per_token=mlp_f,
        t_static_s=mean(t_stat), t_mlp_s=mean(t_mlp), time_per_token_s=mean(t_seq),
        tokens_per_s=mean(1.0 / np.asarray(t_seq)) if T else np.nan, ttft_s=ttft,
        compute_bound_fraction=mean(cb_seq))


class _Log:
    """Growable (T, rows) int64 log with a write position per row."""

    def __init__(self, rows: int):
        # sel, hit, occupancy after, missed runs, units read from Flash
        self.a = np.zeros((5, 256, rows), np.int64)
        self.pos = np.zeros(rows, np.int64)

    def write(self, rows, sel, hit, occ, runs=0, read=None):
        """One token of the hooks `rows` (an index array)."""
        p = self.pos[rows]
        while int(p.max()) >= self.a.shape[1]:
            self.a = np.concatenate([self.a, np.zeros_like(self.a)], axis=1)
        self.a[:3, p, rows] = (sel, hit, occ)
        self.a[3, p, rows] = runs
        self.a[4, p, rows] = np.asarray(sel) - np.asarray(hit) if read is None else read
        self.pos[rows] += 1


class HookStepper:
    """One hook of a ``ClosedLoop``, stepped on its own (hook-major order)."""

    def __init__(self, loop: "ClosedLoop", index: int):
        self.loop, self.index = loop, index
        self.spec = loop.hooks[index]

    def cached(self) -> np.ndarray:
        """bool (n_units,): units in DRAM before this hook's next token."""
        return self.loop.caches.cached(self.index)[0]

    def record(self, mask) -> None:
        """This hook's mask (bool (n_units,)) for its next token."""
        loop = self.loop
        loop._ensure_sequence()
        w = bits.pack(np.asarray(mask, bool).reshape(1, -1))
        runs, read = loop._reads(np.array([self.index]), w & ~loop.caches.cached_packed(self.index))
        sel, hit = loop.caches.step(self.index, w)
        loop._log.write(np.array([self.index]), sel, hit, loop.caches.occupancy(self.index), runs, read)


class ClosedLoop:
    """Drive the hooks' caches token by token, e.g. when masks depend on the cache (DIP-CA), and
    account for every token as ``simulate`` does.

    Token-major: ``cached()`` -> list of bool (n_units,) per hook, then ``record(masks)`` with a
    list (hook order) or dict (name -> mask) of bool masks (numpy, or CPU torch tensors).
    Hook-major: ``h = loop.hook("layers.3.in")``; per token ``h.cached()`` / ``h.record(m)``;
    every hook must record the same number of tokens. Call ``new_sequence(prompt_len)`` at each
    sequence start (caches reset there unless ``reset_per_sequence=False``). ``result()`` gives
    the ``SimResult`` that ``simulate`` gives for a trace of the same masks.

    ``hooks``: HookSpec/Hook objects or (name, kind, n_units, unit_weights) tuples; other
    arguments as in ``simulate``; the caches are a ``CacheSet`` (``caches``). Policy extras:
    ``frequency`` (hot: {name: counts} or a list in hook order), ``future`` +
    ``future_seq_starts`` (belady: the masks to come, as a MaskTrace or per-hook (T, n_units)
    arrays; token-major stepping only).
    """

    def __init__(self, hooks, shape, hardware, policy="lru", dram_bytes=None, seq_len=2048,
                 cache_split="linear", reset_per_sequence=True, predictor_weights=0, adapter_weights=0,
                 metadata=None, future=None, future_seq_starts=None, frequency=None,
                 **policy_kwargs):
        self.hw = load_hardware(hardware)
        self.shape = get_shape(shape)
        self.hooks = [HookSpec(h.name, h.kind, int(h.n_units), int(h.unit_weights))
                      if isinstance(h, HookSpec) else HookSpec(*h) for h in hooks]
        self.names = [h.name for h in self.hooks]
        self.meta = dict(metadata or {})
        self.policy_name = policy if isinstance(policy, str) else policy.name
        dram = resolve_dram(dram_bytes, self.hw, self.shape)
        self.plan = plan_placement(self.shape, self.hw, self.hooks, dram, seq_len,
                                   predictor_weights, cache_split, adapter_weights)
        self.timing = _Timing(self.shape, self.hw, self.plan)
        self.reset_per_sequence = reset_per_sequence
        self.caches = CacheSet(self.hooks, self.plan.capacity, policy, future=future,
                               future_seq_starts=future_seq_starts, frequency=frequency, **policy_kwargs)
        self._log = _Log(len(self.hooks))
        self._starts, self._prompts, self._occ0 = [], [], []

    @property
    def future_groups(self) -> list:
        return self.caches.future_groups

    @property
    def group_index(self) -> list:
        return self.caches.group_index

    @property
    def capacity(self) -> dict:
        """{hook name: cache capacity in units}."""
        return dict(zip(self.names, self.plan.capacity.tolist()))

    def hook(self, name_or_index) -> HookStepper:
        i = name_or_index if isinstance(name_or_index, int) else self.names.index(name_or_index)
        return HookStepper(self, i)

    def _counts(self) -> np.ndarray:
        return self._log.pos.copy()

    def _occupancy(self) -> np.ndarray:
        occ = np.zeros(len(self.hooks), np.int64)
        for ix, pol in zip(self.caches.group_index, self.caches.policies):
            occ[ix] = pol.occupancy()
        return occ

    def new_sequence(self, prompt_len: int = 0) -> None:
        c = self._counts()
        if np.any(c != c[0]):
            raise ValueError("every hook must record the same number of tokens before "
                             "new_sequence()")
        start = int(c[0])
        if self._starts and self._starts[-1] == start:  # previous sequence had no tokens
            self._starts.pop(), self._prompts.pop(), self._occ0.pop()
        if self.reset_per_sequence or not self._starts:
            self.caches.reset()
        self._starts.append(start)
        self._prompts.append(int(prompt_len))
        self._occ0.append(self._occupancy())

    def _ensure_sequence(self):
        if not self._starts:
            self.new_sequence(0)

    def cached(self) -> list:
        """Per hook, bool (n_units,): units in DRAM before the next token."""
        return [self.caches.cached(i)[0] for i in range(len(self.hooks))]

    def record(self, masks) -> None:
        """Masks of all hooks for one token (list in hook order, or dict name -> mask)."""
        words = []
        for ix in self.caches.group_index:
            m = np.stack([np.asarray(masks[self.names[i]] if isinstance(masks, dict) else masks[i], bool)
                          for i in ix])
            words.append(bits.pack(m))
        self.record_packed(words)

    def record_packed(self, words) -> None:
        """Fast path: per hook group, uint64 words (rows, n_words) as in ``bits.pack``."""
        self._ensure_sequence()
        for g, (ix, pol) in enumerate(zip(self.caches.group_index, self.caches.policies)):
            runs, read = self._reads(ix, words[g] & ~pol.cached_packed())
            sel, hit = self.caches.step_group(g, words[g])
            self._log.write(ix, sel, hit, pol.occupancy(), runs, read)

    def _reads(self, ix, missed):
        """(Flash reads, units read) of hooks `ix` for their missed units (packed rows): with
        ``coalesce``, runs of consecutive units (gaps of at most ``read_gap_bytes`` read through);
        else (0, None: one read per unit, the missed units)."""
        if not self.hw.coalesce:
            return 0, None
        if self.hw.read_gap_bytes > 0:
            gap = np.floor(self.hw.read_gap_bytes / self.plan.unit_bytes[ix]).astype(np.int64)
            missed = bits.close_gaps(missed, int(self.hooks[ix[0]].n_units), gap)
        return bits.run_count(missed), bits.popcount(missed)

    def logs(self):
        """(sel, hit, occupancy, missed runs, units read) arrays (T, n_hooks) in hook order (runs
        are counted with ``coalesce`` only)."""
        c = self._counts()
        if np.any(c != c[0]):
            raise ValueError(f"hooks recorded different numbers of tokens: {sorted(set(c))}")
        return self._log.a[:, :int(c[0])].copy()

    def result(self) -> SimResult:
        sel, hit, occ, runs, read = self.logs()
        runs = runs if self.hw.coalesce else None
        T = sel.shape[0]
        starts = np.array(self._starts or [0])
        ends = np.append(starts[1:], T)
        prompts = np.array(self._prompts or [0])
        decode = np.zeros(T, bool)
        seq_of = np.zeros(T, np.int64)
        for q, (a, b, p) in enumerate(zip(starts, ends, prompts)):
            decode[a + p:b] = True
            seq_of[a:b] = q
        kv_seq = (prompts + (ends - starts)) / 2  # the reference: (P + S) / 2
        tm, pl = self.timing, self.plan
        ttfts = []
        for s, (a, b, p) in enumerate(zip(starts, ends, prompts)):
            if p > 0:
                ttfts.append(tm.prefill_time(int(p), self._occ0[s] if self._occ0 else 0))
            elif b > a:
                io = float(tm.token_io(1, sel[a], hit[a], None if runs is None else runs[a], read[a]))
                fl = tm.static_flops(1) + 2 * float((sel[a] * pl.unit_weights).sum())
                ttfts.append(float(tm.roofline(io, fl)))
        occ_peak = float((occ * pl.unit_bytes).sum(axis=1).max()) if T else 0.0
        return _summarize(tm, sel[decode], hit[decode], seq_of[decode], kv_seq,
                          float(np.mean(ttfts)) if ttfts else np.nan, names=self.names,
                          policy=self.policy_name, meta=self.meta,
                          occ_peak_bytes=occ_peak, runs=None if runs is None else runs[decode],
                          read=read[decode])


def simulate(trace: MaskTrace, hardware, shape=None, policy="lru", dram_bytes=None,
             seq_len: int = None, cache_split: str = "linear", reset_per_sequence: bool = True,
             **policy_kwargs) -> SimResult:
    """Replay ``trace`` through per-hook DRAM caches managed by ``policy``.

    ``hardware``: Hardware or preset name/path; ``shape``: ModelShape or preset name (default:
    from the trace metadata); ``dram_bytes``: bytes or spec ('0.5x', '4GB'; default
    ``hardware.dram_bytes``); ``seq_len``: KV length used for placement (default: longest
    sequence in the trace); ``cache_split``: "linear" (the reference), "hook" or "weights";
    ``reset_per_sequence=False`` keeps caches warm across sequences (beyond the reference).
    Policy kwargs: ``over_capacity`` ("random", the reference; "keep-mask", "highest-index") and
    ``seed`` (see ``make_policy``), ``k`` (window), ``fraction`` and ``frequency`` (hot:
    {hook: counts} or a calibration MaskTrace, from other text; policy "hot-same-trace" takes this
    trace's own counts instead, an optimistic upper bound).
    """
    hw = load_hardware(hardware)
    shape = get_shape(shape) if shape is not None else trace.shape()
    if shape is None:
        raise ValueError("pass shape=: the trace metadata does not describe the model shape")
    check_trace_matches(trace, shape)
    seqs = trace.sequences()
    seq_len = seq_len or max(b - a for a, b in seqs)
    kw = dict(policy_kwargs)
    if policy == "hot-same-trace":  # an upper bound: pinned by the replayed text's own counts
        policy, kw["frequency"] = "hot", trace.frequencies()
    elif policy == "hot":
        f = kw.pop("frequency", None)
        if f is None:
            raise ValueError("policy 'hot' needs frequency= (unit counts profiled on other text); "
                             "'hot-same-trace' pins by the replayed trace's own counts, an upper bound")
        kw["frequency"] = f.frequencies() if isinstance(f, MaskTrace) else f
    if policy == "belady":
        kw["future"] = trace
        kw["future_seq_starts"] = trace.seq_starts if reset_per_sequence else None
    loop = ClosedLoop(trace.hooks, shape, hw, policy, dram_bytes, seq_len, cache_split,
                      reset_per_sequence, trace.metadata.get("predictor_weights", 0),
                      trace.metadata.get("adapter_weights", 0),
                      trace.metadata, **kw)
    groups = loop.future_groups or [trace.packed_group(ix) for ix in loop.group_index]
    for (a, b), p in zip(seqs, trace.prompt_len):
        loop.new_sequence(int(p))
        for t in range(a, b):
            loop.record_packed([G[t] for G in groups])
    return loop.result()


def dense_streaming_baseline(shape, hardware, dram_bytes=None, seq_len: int = 2048,
                             sequences=None, prompt_len: int = 0) -> SimResult:
    """Dense MLP streamed from Flash every token (the reference headline baseline).

    Static placement as in ``simulate``; DRAM left after the static layers is split uniformly
    over the L layers' MLPs, each keeping a fixed set of floor(share / (3*d*bytes)) neurons (up
    row + gate row + down column) resident; the other neurons are read from Flash every token,
    as contiguous matrix reads (3 reads per layer, 1 with ``bundle``, for the latency model).
    Mixture of experts: every token reads ``experts_per_token`` routed experts of each layer in
    full (a shared expert is static); the DRAM left is split uniformly over all L*E routed experts,
    each keeping a fixed set of neurons resident, the rest of a routed expert from Flash (3 reads,
    1 with ``bundle``). Deterministic: every expert is used with probability k/E, so each hook
    counts k/E of an expert's units and reads per token (the expected value, no trace needed).
    ``sequences``: [(P, S)] prompt and total length of each sequence (default one sequence of
    ``prompt_len`` and ``seq_len``): the KV cache is charged at (P + S) / 2 per sequence and
    tokens/s averaged over sequences, as in ``simulate``.
    """
    hw, shape = load_hardware(hardware), get_shape(shape)
    L, D, d = shape.n_layers, shape.d_ff, shape.d_model
    if shape.is_moe:
        E, use = shape.n_experts, shape.experts_per_token / shape.n_experts
        hooks = [HookSpec(layer_key(i, "expert", e, "neuron"), "neuron", D, 3 * d) for i in range(L) for e in range(E)]
    else:
        use = 1.0
        hooks = [HookSpec(layer_key(i, "neuron"), "neuron", D, 3 * d) for i in range(L)]
    H = len(hooks)
    plan = plan_placement(shape, hw, hooks, resolve_dram(dram_bytes, hw, shape), seq_len)
    r = np.minimum(plan.capacity, D)
    plan.reads_per_unit = np.zeros(H, np.int64)  # contiguous matrix reads, not per unit
    plan.fixed_reads = np.full(H, (1 if hw.bundle or hw.coalesce else 3) * use)
    tm = _Timing(shape, hw, plan)
    seqs = [(int(prompt_len), int(seq_len))] if sequences is None else [(int(p), int(n)) for p, n in sequences]
    n = len(seqs)
    sel, hit = np.full((n, H), D * use), np.broadcast_to(r[None, :] * use, (n, H))
    res = _summarize(tm, sel, hit, np.arange(n), [(p + q) / 2 for p, q in seqs], 0.0,
                     names=[h.name for h in hooks], policy="static",
                     meta={"model": "", "method": "dense", "density": 1.0},
                     occ_peak_bytes=float((r * plan.unit_bytes).sum()))
    p0 = seqs[0][0]
    if p0 > 0:
        res.ttft_s = tm.prefill_time(p0, r)
    else:
        io = tm.static_time(1) + float(tm.hook_times(sel[0], hit[0]).sum())
        fl = tm.static_flops(1) + 2 * float((sel[0] * plan.unit_weights).sum())
        res.ttft_s = float(tm.roofline(io, fl))
    return res
