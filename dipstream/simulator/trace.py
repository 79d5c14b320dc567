"""Mask traces: which units every masked hook selected for every token.

In memory a ``MaskTrace`` holds

* ``metadata``: dict with at least ``model``, ``method``, ``density`` (requested) and the
  ``ModelShape`` fields (``n_layers``, ``d_model``, ``d_ff``, ``vocab``, ``n_heads``,
  ``n_kv_heads``, ``tied_embeddings``, and for MoE ``n_experts``, ``experts_per_token``,
  ``shared_d_ff``, ``head_dim``); optional ``predictor_weights`` (weights of
  predictors kept in DRAM, e.g. DejaVu) and ``adapter_weights`` (LoRA adapters kept in DRAM).
* ``hooks``: list of ``Hook(name, kind, n_units, unit_weights, masks)``; ``masks`` is bool
  (T, n_units), True = unit read for that token. Kinds (unit = one mask index):

  ======== =============================================== ======== ============
  kind     unit                                            n_units  unit_weights
  ======== =============================================== ======== ============
  in       DIP up/gate hook: a column of W_up and W_gate   d        2*D
  out      DIP down hook: a column of W_down               D        d
  neuron   up row + gate row + down column                 D        3*d
           (or two of them, the third read densely: 2*d)
  expert   MoE: a whole routed expert (``experts`` hook)   E        3*d*D
           or one linear of expert e read densely          1        d*D
  dense    any (all-True masks), for completeness          any      any
  ======== =============================================== ======== ============

  Names follow ``layers.<i>.<kind>``. Mixture of experts (``n_experts`` = E > 0, D = one routed
  expert's d_ff; a hook's n_linears and Flash reads per missed unit are the matrices it covers):

  ================================ ====== =========================================================
  name                             kind   mask
  ================================ ====== =========================================================
  layers.<i>.experts               expert the experts the router picked for the token (a method
                                          dense inside experts)
  layers.<i>.expert.<e>.in|out|    in,    the dense hooks inside routed expert e (its d_ff);
  neuron                           out,   all-False for a token not routed to e
                                   neuron
  layers.<i>.expert.<e>.up|gate|   expert (T, 1): that linear of expert e, read densely for the
  down                                    tokens routed to e
  layers.<i>.shared.in|out|neuron  in,    the hooks of the always-on shared expert, with
                                   out,   shared_d_ff for D; a shared expert read densely has no
                                   neuron hook (static, as any MLP weights no hook covers)
  ================================ ====== =========================================================
* ``seq_starts``: int (S,), token index where each sequence starts (first is 0); caches reset
  there. ``prompt_len``: int (S,), leading tokens of each sequence that form the prompt (the
  prefill pass, for TTFT; 0 allowed). All T tokens, prompt included, are in the masks.

On disk (``.npz``, no pickle): ``format`` = "dipstream-mask-trace/1", ``meta_json`` = JSON of
{metadata, hooks: [{name, kind, n_units, unit_weights}]}, ``n_tokens``, ``seq_starts``,
``prompt_len``, and ``mask_<i>`` = ``np.packbits(masks, axis=1, bitorder="little")`` (uint8,
(T, ceil(n_units/8))). Writes are atomic (temporary file, then ``os.replace``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dipstream.budget import dip_split, keep_to_k
from dipstream.io import atomic_path
from dipstream.names import key_layer, key_parts, layer_key

from . import bits
from .model_shape import ModelShape

HOOK_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")  # what a hook's name may hold (it names files and keys)

FORMAT = "dipstream-mask-trace/1"
KINDS = ("in", "out", "neuron", "expert", "dense")
# weight vectors per unit; neuron and expert units vary per hook (simulate.reads_per_unit)
READS_PER_UNIT = {"in": 2, "out": 1, "neuron": 3, "dense": 1}
SHAPE_FIELDS = ("n_layers", "d_model", "d_ff", "vocab", "n_heads", "n_kv_heads")
MOE_CHECKED = ("n_experts", "experts_per_token", "shared_d_ff")  # checked when in the metadata


@dataclass
class HookSpec:
    name: str
    kind: str
    n_units: int
    unit_weights: int


@dataclass(eq=False)
class Hook(HookSpec):
    masks: np.ndarray = field(default=None, repr=False)
    _packed: np.ndarray = field(default=None, repr=False, compare=False)

    def packed(self) -> np.ndarray:
        """Masks as uint64 words (T, ceil(n_units/64)), cached."""
        if self._packed is None:
            self._packed = bits.pack(self.masks)
        return self._packed

    def spec(self) -> HookSpec:
        return HookSpec(self.name, self.kind, self.n_units, self.unit_weights)


def moe_part(name: str):
    """("shared", None) for a ``layers.<i>.shared.*`` hook, ("expert", e) for
    ``layers.<i>.expert.<e>.*``, else (None, None)."""
    p = key_parts(name)
    if len(p) >= 2 and p[0] == "shared":
        return "shared", None
    if len(p) >= 3 and p[0] == "expert" and p[1].isdigit():
        return "expert", int(p[1])
    return None, None


def expected_unit(kind: str, shape: ModelShape, name: str = None):
    """(n_units, unit_weights) a hook of ``kind`` (named ``name``) must have for ``shape``: a shared
    expert's hooks use shared_d_ff; kind expert: the whole-expert hook (E, 3*d*D); None for dense."""
    d = shape.d_model
    D = shape.shared_d_ff if name is not None and moe_part(name)[0] == "shared" else shape.d_ff
    if kind == "expert":
        return (shape.n_experts, 3 * d * D)
    return {"in": (d, 2 * D), "out": (D, d), "neuron": (D, 3 * d)}.get(kind)


def hook_specs(shape: ModelShape, method: str = "dip") -> list:
    """Standard hooks: ``dip`` -> layers.i.in + layers.i.out; ``neuron`` -> layers.i.neuron. For
    a MoE shape the same hooks inside every routed expert (layers.i.expert.e.*) and the shared
    expert (layers.i.shared.*), or ``experts`` -> layers.i.experts (whole experts)."""
    kinds = {"dip": ("in", "out"), "neuron": ("neuron",)}.get(method)
    if method == "experts" and shape.is_moe:
        return [HookSpec(layer_key(i, "experts"), "expert", *expected_unit("expert", shape))
                for i in range(shape.n_layers)]
    if kinds is None:
        raise ValueError(f"method must be 'dip' or 'neuron' (or 'experts' for a MoE shape), got {method!r}")
    if not shape.is_moe:
        return [HookSpec(layer_key(i, k), k, *expected_unit(k, shape))
                for i in range(shape.n_layers) for k in kinds]
    parts = [("expert", e) for e in range(shape.n_experts)] + ([("shared",)] if shape.shared_d_ff else [])
    return [HookSpec(layer_key(i, *p, k), k, *expected_unit(k, shape, layer_key(i, *p, k)))
            for i in range(shape.n_layers) for p in parts for k in kinds]


class TraceRecorder:
    """Every token's masks of a set of hooks (HookSpecs), bit-packed as they come, and the one-sequence
    MaskTrace they make (what a generate run's `--trace` writes)."""

    def __init__(self, specs: list):
        self.specs = {h.name: h for h in specs}
        self.rows: dict[str, list[np.ndarray]] = {h.name: [] for h in specs}

    def add(self, name: str, mask: np.ndarray) -> None:
        self.rows[name].append(np.packbits(np.asarray(mask, bool), bitorder="little"))

    def add_units(self, name: str, units) -> None:
        """Record the mask that selects `units` (indices) of hook `name`."""
        mask = np.zeros(self.specs[name].n_units, bool)
        mask[np.asarray(units, np.int64)] = True
        self.add(name, mask)

    def trace(self, prompt_len: int, metadata: dict) -> "MaskTrace":
        hooks = []
        for name, h in self.specs.items():
            packed = np.array(self.rows[name], np.uint8).reshape(-1, (h.n_units + 7) // 8)
            masks = np.unpackbits(packed, axis=1, count=h.n_units, bitorder="little").view(bool)
            hooks.append(Hook(name, h.kind, h.n_units, h.unit_weights, masks))
        return MaskTrace(hooks, [0], [prompt_len], metadata)


@dataclass(eq=False)
class MaskTrace:
    hooks: list
    seq_starts: np.ndarray = None
    prompt_len: np.ndarray = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        self.seq_starts = np.asarray([0] if self.seq_starts is None else self.seq_starts, np.int64)
        pl = np.zeros(len(self.seq_starts)) if self.prompt_len is None else self.prompt_len
        self.prompt_len = np.atleast_1d(np.asarray(pl, np.int64))
        for h in self.hooks:
            h.masks = np.asarray(h.masks, dtype=bool)
        self.validate()

    @property
    def n_tokens(self) -> int:
        return int(self.hooks[0].masks.shape[0]) if self.hooks else 0

    def sequences(self) -> list:
        """[(start, end)] token ranges of the sequences."""
        ends = list(self.seq_starts[1:]) + [self.n_tokens]
        return [(int(a), int(b)) for a, b in zip(self.seq_starts, ends)]

    def shape(self):
        """ModelShape from metadata, or None when the metadata lacks it."""
        if all(f in self.metadata for f in SHAPE_FIELDS):
            return ModelShape.from_dict(self.metadata)
        return None

    def packed_group(self, indices) -> np.ndarray:
        """uint64 (T, len(indices), n_words) masks of hooks with equal n_units, cached (treat
        masks as read-only once simulated)."""
        key = tuple(int(i) for i in indices)
        cache = self.__dict__.setdefault("_groups", {})
        if key not in cache:
            cache[key] = np.stack([self.hooks[i].packed() for i in key], axis=1)
        return cache[key]

    def frequencies(self) -> dict:
        """{hook name: how often each unit was selected} (calibration for policy 'hot')."""
        return {h.name: np.add.reduce(h.masks.view(np.uint8), axis=0, dtype=np.int64)
                for h in self.hooks}

    def validate(self) -> None:
        if not self.hooks:
            raise ValueError("trace has no hooks")
        names = [h.name for h in self.hooks]
        bad = [n for n in names if not isinstance(n, str) or not HOOK_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"trace hook name {str(bad[0])[:60]!r} is not letters, digits, '.', '_' or '-' "
                             "(at most 128)")
        if len(set(names)) != len(names):
            raise ValueError("trace hook names are not unique")
        T = self.n_tokens
        for h in self.hooks:
            if h.kind not in KINDS:
                raise ValueError(f"hook {h.name}: kind {h.kind!r} is not one of {KINDS}")
            if int(h.n_units) <= 0 or int(h.unit_weights) <= 0:
                raise ValueError(f"hook {h.name}: n_units and unit_weights must be positive")
            if h.masks.ndim != 2 or h.masks.shape != (T, h.n_units):
                raise ValueError(f"hook {h.name}: masks have shape {h.masks.shape}, expected "
                                 f"(T={T}, n_units={h.n_units})")
        s = self.seq_starts
        if s.ndim != 1 or len(s) == 0 or s[0] != 0 or np.any(np.diff(s) <= 0) or s[-1] >= max(T, 1):
            raise ValueError(f"seq_starts must start at 0, increase strictly and stay below "
                             f"T={T}; got {s.tolist()[:10]}")
        if self.prompt_len.shape != s.shape:
            raise ValueError(f"prompt_len has {self.prompt_len.size} entries for {s.size} "
                             "sequences")
        lens = np.diff(np.append(s, T))
        if np.any(self.prompt_len < 0) or np.any(self.prompt_len > lens):
            raise ValueError("prompt_len must be in [0, sequence length] for every sequence")
        shape = self.shape()
        if shape is not None:
            check_trace_matches(self, shape)

    def save(self, path) -> None:
        save_trace(self, path)


def save_trace(trace: MaskTrace, path) -> None:
    """Write ``trace`` to ``path`` (.npz) atomically."""
    path = Path(path)
    meta = {"metadata": trace.metadata,
            "hooks": [dict(name=h.name, kind=h.kind, n_units=int(h.n_units),
                           unit_weights=int(h.unit_weights)) for h in trace.hooks]}
    arrays = {"format": np.array(FORMAT), "meta_json": np.array(json.dumps(meta, default=_jsonable)),
              "n_tokens": np.array(trace.n_tokens, np.int64),
              "seq_starts": trace.seq_starts, "prompt_len": trace.prompt_len}
    for i, h in enumerate(trace.hooks):
        arrays[f"mask_{i}"] = np.packbits(h.masks, axis=1, bitorder="little")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"metadata value {o!r} is not JSON serialisable")


def load_trace(path) -> MaskTrace:
    """Read and validate a trace written by ``save_trace``; ValueError if malformed (never
    unpickles anything: the arrays are read as plain data)."""
    try:
        if hasattr(path, "read"):  # a file object (e.g. the bytes of a trace)
            magic = path.read(4)
            path.seek(0)
        else:
            with open(path, "rb") as fh:
                magic = fh.read(4)
    except OSError as e:
        raise ValueError(f"cannot read mask trace {str(path)!r}: {e.strerror or e}") from None
    if magic != b"PK\x03\x04":
        raise ValueError(f"{path} is not a mask trace (not an .npz file); give a trace written by "
                         "`dipstream simulate --save-trace`")
    try:
        return _load_trace(path)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or damaged archive, a missing field
        raise ValueError(f"mask trace {str(path)!r} is damaged or incomplete ({type(e).__name__}); "
                         "record it again") from None


def _load_trace(path) -> MaskTrace:
    try:  # read every array first: numpy's own errors (damaged zip, object arrays) are data errors
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        why = "it holds pickled objects, which are never loaded" if "allow_pickle" in str(e) else str(e)
        raise ValueError(f"mask trace {str(path)!r} is damaged or not a dipstream trace ({why[:100]})") from None
    keys = set(arrays)
    need = {"format", "meta_json", "n_tokens", "seq_starts", "prompt_len"}
    if not need <= keys:
        raise ValueError(f"{path}: not a mask trace (missing {sorted(need - keys)})")
    if str(arrays["format"]) != FORMAT:
        raise ValueError(f"{path}: unsupported trace format {str(arrays['format'])!r}")
    meta = json.loads(str(arrays["meta_json"]))
    T = int(arrays["n_tokens"])
    hooks = []
    for i, hd in enumerate(meta["hooks"]):
        k = f"mask_{i}"
        if k not in keys:
            raise ValueError(f"{path}: hook {hd['name']} has no {k} array")
        pk = arrays[k]
        want = (T, (int(hd["n_units"]) + 7) // 8)
        if pk.dtype != np.uint8 or pk.shape != want:
            raise ValueError(f"{path}: hook {hd['name']} masks are {pk.dtype}{pk.shape}, "
                             f"expected uint8{want} for T={T}, n_units={hd['n_units']}")
        m = np.unpackbits(pk, axis=1, count=int(hd["n_units"]), bitorder="little").view(bool)
        hooks.append(Hook(hd["name"], hd["kind"], int(hd["n_units"]), int(hd["unit_weights"]), m))
    extra = sorted(k for k in keys if k.startswith("mask_")
                   and not (k[5:].isdigit() and int(k[5:]) < len(hooks)))
    if extra:
        raise ValueError(f"{path}: mask arrays {extra} have no hook description")
    return MaskTrace(hooks, arrays["seq_starts"], arrays["prompt_len"], meta["metadata"])


def check_trace_matches(trace: MaskTrace, shape: ModelShape, model: str = None) -> None:
    """ValueError when ``trace`` was recorded for a different model shape than ``shape`` (of the
    model named ``model``, the one the trace is to be replayed for)."""
    recorded = trace.metadata.get("model")
    model = f"model {model}" if model else "the given model"
    where = f" (model {recorded})" if recorded else ""
    for f in SHAPE_FIELDS + MOE_CHECKED:
        if f in trace.metadata and int(trace.metadata[f]) != int(getattr(shape, f)):
            raise ValueError(f"trace was recorded for {f}={trace.metadata[f]}{where} but {model} "
                             f"has {f}={getattr(shape, f)}")
    if "head_dim" in trace.metadata:  # 0 in traces of earlier versions: d_model // n_heads
        hd = int(trace.metadata["head_dim"]) or \
            int(trace.metadata.get("d_model", shape.d_model)) // int(trace.metadata.get("n_heads", shape.n_heads))
        if hd != shape.head_dim:
            raise ValueError(f"trace was recorded for head_dim={hd}{where} but {model} has "
                             f"head_dim={shape.head_dim}")
    covered = 0
    for h in trace.hooks:
        part, e = moe_part(h.name)
        if (part is not None or h.kind == "expert") and not shape.is_moe:
            raise ValueError(f"trace has mixture-of-experts hooks (hook {h.name}){where} but {model} "
                             "has n_experts=0 (a dense MLP)")
        if part == "shared" and not shape.shared_d_ff:
            raise ValueError(f"trace has shared-expert hooks (hook {h.name}){where} but {model} has "
                             "shared_d_ff=0 (no shared expert)")
        if part == "expert" and e >= shape.n_experts:
            raise ValueError(f"trace was recorded for more experts (hook {h.name}){where} but {model} "
                             f"has n_experts={shape.n_experts}")
        if h.kind == "expert":
            _check_expert_hook(h, shape, where, model)
        exp = None if h.kind == "expert" else expected_unit(h.kind, shape, h.name)
        D_f = "shared_d_ff" if part == "shared" else "d_ff"
        if h.kind == "neuron" and (h.n_units, h.unit_weights) == (getattr(shape, D_f), 2 * shape.d_model):
            exp = None  # neuron unit of two matrices (CATS, up pruning: the third is read densely)
        if exp is not None and (h.n_units, h.unit_weights) != exp:
            n_f = "d_model" if h.kind == "in" else D_f
            u_f = D_f if h.kind == "in" else "d_model"
            rec = {n_f: h.n_units, u_f: h.unit_weights // {"in": 2, "out": 1, "neuron": 3}[h.kind]}
            bad = n_f if h.n_units != exp[0] else u_f
            raise ValueError(f"trace was recorded for {bad}={rec[bad]}{where} but {model} has "
                             f"{bad}={getattr(shape, bad)} (hook {h.name})")
        layer = key_layer(h.name)
        if layer is not None and layer >= shape.n_layers:
            raise ValueError(f"trace was recorded for more layers (hook {h.name}){where} but "
                             f"{model} has n_layers={shape.n_layers}")
        covered += h.n_units * h.unit_weights
    if covered > shape.mlp_weights():
        raise ValueError(f"trace hooks cover {covered} MLP weights{where} but {model} has only "
                         f"{shape.mlp_weights()}")


def _check_expert_hook(h, shape: ModelShape, where: str, model: str) -> None:
    """An ``expert`` hook: n_units 1 (one expert's linear(s)) or n_experts (whole experts), units of
    1 to 3 matrices of d_model*d_ff weights."""
    dD = shape.d_model * shape.d_ff
    if h.n_units not in (1, shape.n_experts):
        raise ValueError(f"trace was recorded for n_experts={h.n_units}{where} but {model} has "
                         f"n_experts={shape.n_experts} (hook {h.name})")
    if h.unit_weights % dD or not 1 <= h.unit_weights // dD <= 3:
        k = 3 if h.n_units == shape.n_experts and h.n_units > 1 else 1
        raise ValueError(f"trace was recorded for d_model*d_ff={h.unit_weights // k}{where} but {model} "
                         f"has d_model*d_ff={dD} (hook {h.name}: expert units are 1 to 3 such matrices)")


def synthetic_trace(shape: ModelShape, method: str = "dip", density: float = 0.5,
                    n_tokens: int = 256, rho: float = 0.9, skew: float = 1.0,
                    seq_len: int = None, prompt_len: int = 0, seed: int = 0,
                    model: str = "synthetic") -> MaskTrace:
    """Random masks with temporal correlation, for tests and benchmarks.

    Per hook, unit scores are a static popularity (N(0, skew)) plus an AR(1) process with
    correlation ``rho`` between consecutive tokens; each token keeps the top-k units, with k
    from the DIP split of ``density`` (``method="dip"``) or k = density * D (``"neuron"``).
    """
    if shape.is_moe:
        raise ValueError("synthetic_trace draws dense-MLP masks; for a mixture-of-experts shape use "
                         "dipstream.simulator.synthetic_moe.synthetic_moe_trace")
    rng = np.random.default_rng(seed)
    specs = hook_specs(shape, method)
    up, down = dip_split(density) if method == "dip" else (density, density)
    keep = {"in": up, "out": down, "neuron": density}
    seq_len = seq_len or n_tokens
    hooks = []
    for n_units in sorted({s.n_units for s in specs}):
        grp = [s for s in specs if s.n_units == n_units]
        k = keep_to_k(keep[grp[0].kind], n_units)
        H = len(grp)
        bias = rng.normal(0, skew, (H, n_units)).astype(np.float32)
        x = rng.normal(0, 1, (H, n_units)).astype(np.float32)
        masks = np.zeros((n_tokens, H, n_units), bool)
        a, b = np.float32(rho), np.float32(np.sqrt(1 - rho ** 2))
        for t in range(n_tokens):
            if t % seq_len == 0:
                x = rng.normal(0, 1, (H, n_units)).astype(np.float32)
            else:
                x = a * x + b * rng.standard_normal((H, n_units), dtype=np.float32)
            if k > 0:
                idx = np.argpartition(-(bias + x), k - 1, axis=1)[:, :k]
                np.put_along_axis(masks[t], idx, True, axis=1)
        for j, s in enumerate(grp):
            hooks.append((specs.index(s), Hook(s.name, s.kind, s.n_units, s.unit_weights,
                                               masks[:, j])))
    hooks = [h for _, h in sorted(hooks, key=lambda p: p[0])]
    starts = np.arange(0, n_tokens, seq_len)
    lens = np.diff(np.append(starts, n_tokens))
    meta = {"model": model, "method": method, "density": density, **shape.to_dict()}
    return MaskTrace(hooks, starts, np.minimum(prompt_len, lens), meta)
