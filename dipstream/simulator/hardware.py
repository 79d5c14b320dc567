"""Simulated hardware: DRAM (a software-managed cache of Flash-resident weights) and Flash.

Defaults reproduce the reference simulator (docs/methods.md "The simulator"): time is bytes /
bandwidth, no compute term, no Flash random-read penalty. The switches marked "beyond the reference" are
off by default.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

PRESET_DIR = Path(__file__).with_name("presets")
KINDS = ("mlp", "attention", "kv_cache", "lm_head", "embedding", "predictors", "adapters", "router")


def _default_bits() -> dict:
    return {k: 16 for k in KINDS}


@dataclass
class Hardware:
    name: str = field(default="custom", metadata={"help": "label for reports"})
    dram_bytes: Optional[float] = field(default=None, metadata={
        "help": "DRAM capacity for the model in bytes; None = set per run (e.g. '0.5x' of the "
                "model's weight bytes, see parse_dram)"})
    dram_bw: float = field(default=60e9, metadata={"help": "DRAM read bandwidth, bytes/s"})
    flash_bw: float = field(default=1e9, metadata={"help": "Flash read bandwidth, bytes/s"})
    overlap: bool = field(default=False, metadata={
        "help": "DRAM and Flash reads overlap: time = max(dram, flash); else time = sum"})
    bits: dict = field(default_factory=_default_bits, metadata={
        "help": "precision in bits per module kind: " + ", ".join(KINDS)})
    stream_static_overflow: bool = field(default=True, metadata={
        "help": "static layers that do not fit in DRAM are streamed from Flash every token; "
                "False: raise ValueError instead"})
    compute_flops: Optional[float] = field(default=None, metadata={
        "help": "(beyond the reference) device FLOP/s; per token time = max(I/O time, "
                "2*weights_used/compute_flops); None = no compute term"})
    flash_read_latency_s: Optional[float] = field(default=None, metadata={
        "help": "(beyond the reference) per-read Flash latency, s; Flash time for n reads of "
                "b bytes = n*latency/queue_depth + b/flash_bw; None = off"})
    flash_queue_depth: Optional[int] = field(default=None, metadata={
        "help": "(beyond the reference) outstanding Flash reads overlapping their latency; "
                "None = 1 when a latency is set"})
    bundle: bool = field(default=False, metadata={
        "help": "(beyond the reference) the weight vectors of one unit (e.g. a neuron's up row, "
                "gate row, down column) are stored contiguously: one Flash read per missed unit "
                "instead of one per vector; only matters with flash_read_latency_s"})
    coalesce: bool = field(default=False, metadata={
        "help": "(beyond the reference) missed units with consecutive indices lie next to each "
                "other on Flash (bundled, as in dipstream's offload file) and are read in one "
                "request: Flash reads per hook and token = runs of consecutive missed units "
                "instead of one per unit; only matters with flash_read_latency_s"})
    read_gap_bytes: float = field(default=0.0, metadata={
        "help": "(beyond the reference) with coalesce: missed units at most this many bytes apart "
                "are read in one request and the gap is read too (dipstream's lean engine, "
                "--read-gap); 0 = runs of consecutive units only"})
    host_s_per_token: float = field(default=0.0, metadata={
        "help": "(beyond the reference) per-token time outside weight reads: the runtime's own "
                "overhead (interpreter, norms, attention softmax), measured once per machine by "
                "`dipstream probe --lean-model`"})
    host_s_per_cached_hook: float = field(default=0.0, metadata={
        "help": "(beyond the reference) per token and hook whose cache cannot hold all its units: the "
                "runtime's bookkeeping (cache policy, read planning; dipstream's lean engine offloaded), "
                "measured once per machine by `dipstream probe --lean-model`"})
    pipelined: bool = field(default=False, metadata={
        "help": "(beyond the reference) a hook's Flash reads overlap the compute before it, not only its "
                "own (dipstream's lean engine reads the next hook ahead): a token takes max(its Flash "
                "time, its DRAM, static and host time) instead of the per-hook sum"})
    dram_bw_static: dict = field(default_factory=dict, metadata={
        "help": "(beyond the reference) per module kind, the rate its static bytes are read at from "
                "DRAM, overriding dram_bw for that kind (a CPU runtime's product rate per weight format, "
                "e.g. an 8-bit head beside 4-bit layers; measured by `dipstream probe --lean-model`)"})
    lookahead: bool = field(default=False, metadata={
        "help": "(beyond the reference) a hook's Flash reads are issued when the previous hook's product "
                "starts (dipstream's lean engine reads one hook ahead): a hook waits max(0, its Flash time - "
                "the previous hook's DRAM time, plus the layer's attention for a layer's first hook) instead "
                "of overlapping only its own DRAM time"})
    embedding_lookup: bool = field(default=False, metadata={
        "help": "(beyond the reference) per token read one row of an untied embedding table "
                "instead of the whole table"})

    def __post_init__(self):
        self.bits = {**_default_bits(), **(self.bits or {})}
        bad = set(self.bits) - set(KINDS)
        if bad:
            raise ValueError(f"unknown module kind(s) in bits: {sorted(bad)}; known: {KINDS}")
        for k, b in self.bits.items():
            if not float(b) > 0:
                raise ValueError(f"bits[{k!r}] must be positive, got {b}")
        self.dram_bw = parse_bandwidth(self.dram_bw, "dram_bw")
        self.dram_bw_static = dict(self.dram_bw_static or {})
        bad = set(self.dram_bw_static) - set(KINDS)
        if bad:
            raise ValueError(f"unknown module kind(s) in dram_bw_static: {sorted(bad)}; known: {KINDS}")
        self.dram_bw_static = {k: parse_bandwidth(v, f"dram_bw_static[{k!r}]") for k, v in self.dram_bw_static.items()}
        self.flash_bw = parse_bandwidth(self.flash_bw, "flash_bw")
        if self.dram_bytes is not None:
            self.dram_bytes = parse_bytes(self.dram_bytes)
        if self.dram_bytes is not None and not self.dram_bytes >= 0:
            raise ValueError(f"dram_bytes must be >= 0, got {self.dram_bytes}")
        if self.compute_flops is not None and not 0 < _number(self.compute_flops, "compute_flops") < np.inf:
            raise ValueError(f"compute_flops must be positive and finite (or None), got {self.compute_flops}")
        if self.flash_read_latency_s is not None and \
                not 0 <= _number(self.flash_read_latency_s, "flash_read_latency_s") < np.inf:
            raise ValueError("flash_read_latency_s must be a finite number >= 0 (or None)")
        if self.flash_queue_depth is not None and int(self.flash_queue_depth) < 1:
            raise ValueError("flash_queue_depth must be >= 1 (or None)")
        if self.lookahead and self.pipelined:
            raise ValueError("lookahead and pipelined are two timing models; set one of them")
        for name in ("read_gap_bytes", "host_s_per_token", "host_s_per_cached_hook"):
            if not 0 <= _number(getattr(self, name), name) < np.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")

    def comb(self, t_dram, t_flash):
        """Combine DRAM and Flash read times (max if overlapped, else sum); numpy-friendly."""
        return np.maximum(t_dram, t_flash) if self.overlap else np.add(t_dram, t_flash)

    def flash_time(self, nbytes, n_reads=0):
        """Flash time for ``nbytes`` in ``n_reads`` reads (latency term only when enabled)."""
        t = nbytes / self.flash_bw
        if self.flash_read_latency_s:
            t = t + n_reads * self.flash_read_latency_s / (self.flash_queue_depth or 1)
        return t

    def replace(self, **kw) -> "Hardware":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Hardware":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown hardware field(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def help(cls) -> dict:
        """{field: help text}."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _number(v, name: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
def fit_flash(disk: dict, io_threads: int) -> dict:
    """flash_bw, flash_read_latency_s, flash_queue_depth from measured reads: ``disk["seq_bw"]``
    (bytes/s of long reads) and ``disk["random"][chunk bytes]`` with ``s_per_read_qd1`` and
    ``s_per_read_qd{io_threads}``. Latency = time per read at one in flight minus its transfer;
    the per-read cost at ``io_threads`` in flight (minus transfer) is latency / queue depth; the
    latency written is that cost times the (integer) queue depth, so the simulator's per-read
    term equals what was measured."""
    bw = disk["seq_bw"]
    lat1, latq = [], []
    for c, r in disk["random"].items():
        lat1.append(max(r["s_per_read_qd1"] - int(c) / bw, 0.0))
        latq.append(max(r[f"s_per_read_qd{io_threads}"] - int(c) / bw, 0.0))
    lat, per_read = float(np.mean(lat1)), float(np.mean(latq))
    qd = max(1, int(round(lat / per_read))) if per_read > 0 else io_threads
    return {"flash_bw": bw, "flash_read_latency_s": per_read * qd if per_read > 0 else lat,
            "flash_queue_depth": qd, "latency_qd1_s": lat, "per_read_s": per_read}


def fmt_bytes(n: float, round_up: bool = False) -> str:
    """'512 B', '3.2 kB', '1.5 MB', '2.1 GB' (decimal units, 3 significant digits; `round_up` for
    minimums a user passes back, which then always suffice)."""
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1)):
        if n >= f or f == 1:
            x = n / f
            if round_up and x > 0:
                scale = 10.0 ** (2 - math.floor(math.log10(x)))
                x = math.ceil(x * scale - 1e-9) / scale
            return f"{x:.3g} {unit}" if f > 1 else f"{math.ceil(x) if round_up else int(x)} B"
    raise AssertionError


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.I)


def parse_bytes(spec) -> float:
    """'2GB' (1e9), '512MB', '1.5GiB' (2**30), '123' or a number -> bytes."""
    if isinstance(spec, bool):
        raise ValueError(f"cannot parse size {spec!r}")
    if isinstance(spec, (int, float)):
        if not np.isfinite(spec):
            raise ValueError(f"size {spec!r} is not a finite number of bytes")
        return spec
    m = _SIZE.match(str(spec))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {spec!r}: use e.g. '8GB', '512MB', '1.5GiB' or a "
                         "byte count")
    v = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not np.isfinite(v):
        raise ValueError(f"size {spec!r} is not a finite number of bytes")
    return int(v) if v.is_integer() else v


def parse_bandwidth(spec, what="bandwidth") -> float:
    """'60GB/s' or a number of bytes/s; must be positive."""
    s = spec
    if isinstance(spec, str):
        s = spec.strip()
        s = s[:-2] if s.lower().endswith("/s") else s
    try:
        v = float(parse_bytes(s))
    except ValueError:
        raise ValueError(f"cannot parse {what} {spec!r}: use bytes/s or e.g. '60GB/s'") from None
    if not v > 0:
        raise ValueError(f"{what} must be positive, got {spec!r}")
    return v


def parse_dram(spec, model_bytes: float) -> float:
    """DRAM size: '0.5x' (of the model's total weight bytes), '2GB', '512MB', '1.5GiB', bytes."""
    if isinstance(spec, str) and spec.strip().lower().endswith("x"):
        try:
            f = float(spec.strip()[:-1])
        except ValueError:
            f = -1.0
        if not (np.isfinite(f) and f >= 0):
            raise ValueError(f"cannot parse DRAM size {spec!r}: relative sizes look like '0.5x' "
                             "(a finite, non-negative fraction of the model's weight bytes)")
        return f * model_bytes
    try:
        v = parse_bytes(spec)
    except ValueError:
        raise ValueError(f"cannot parse DRAM size {spec!r}: use e.g. '0.5x' (of the model's "
                         "weight bytes), '8GB', '512MB', '1.5GiB' or a byte count") from None
    if v < 0:
        raise ValueError(f"DRAM size must be >= 0, got {spec!r}")
    return v


def available_presets() -> list:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_hardware(name_or_path, **overrides) -> Hardware:
    """A preset by name (``presets/<name>.yaml``) or a YAML/JSON file path; ``overrides``
    replace fields (e.g. ``dram_bytes=8e9``)."""
    if isinstance(name_or_path, Hardware):
        return name_or_path.replace(**overrides) if overrides else name_or_path
    p = Path(str(name_or_path))
    if not (p.suffix.lower() in (".yaml", ".yml", ".json") or p.exists()):
        p = PRESET_DIR / f"{name_or_path}.yaml"
        if not p.exists():
            raise ValueError(f"unknown hardware {name_or_path!r}; available presets: "
                             f"{', '.join(available_presets())} (or a .yaml/.json path)")
    if not p.exists():
        raise ValueError(f"hardware file {str(p)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"hardware file {str(p)!r} is not a file; give a YAML or JSON file")
    try:
        text = p.read_text()
        d = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"hardware file {str(p)!r} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}"
                         f" ({first[:120]})") from None
    if not isinstance(d, dict):
        raise ValueError(f"hardware file {str(p)!r} must hold a mapping of fields")
    d.setdefault("name", p.stem)
    d.update(overrides)
    return Hardware.from_dict(d)
