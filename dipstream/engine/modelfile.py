"""The lean engine's model file: every weight of a model, quantized as the engine reads it, in one
file the engine can keep in RAM whole or read in part (the MLP) with direct I/O.

``DIR/model.bin`` holds the tensors; ``DIR/model.json`` (the manifest) their places and shapes,
the architecture fields the engine needs, the formats, the file size and a sha256. Each tensor is
a block of records (see :mod:`dipstream.engine.qmatrix`) starting on a 4096-byte boundary:

* static: per layer the attention projections (records by input index) and norms, the embedding
  (records by token, or - tied - the head's records by input index), the final norm, the head;
* MLP, per layer, in the bundled layout: ``in`` = d records [W_gate[:, j] | W_up[:, j]] (2D
  outputs), ``out`` = D records W_down[:, i] (d outputs), so the units a DIP mask selects are
  whole records and consecutive units are contiguous.

Written from a Hugging Face checkpoint folder (safetensors, read tensor by tensor: no copy of
the whole model in RAM), atomically; every open checks the manifest field by field and the size
(and, on request, the sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dipstream.engine.qmatrix import FORMATS, input_group, quantize_records, record_layout
from dipstream.engine.text import write_lean_tokenizer
from dipstream.errors import DipstreamError
from dipstream.io import atomic_path, write_json_atomic

FORMAT = "dipstream-engine/2"  # 2: int8/int4 grouped along inputs, float16 headers
DATA, MANIFEST = "model.bin", "model.json"
ALIGN = 4096
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "smollm3": "llama",
            "gemma3": "gemma3", "gemma3_text": "gemma3"}


def default_head(weights: str) -> str:
    """The embedding / head format that goes with `weights`: int8 beside int4 (as GGUF Q4 files
    keep token_embd in Q8_0; a 4-bit head costs SmolLM2 5% perplexity: tests/test_generate_real.py),
    else the same."""
    return "int8" if weights == "int4" else weights


@dataclass(frozen=True)
class TensorInfo:
    name: str
    offset: int
    rows: int
    m: int
    fmt: str
    group: int
    stride: int
    hd_offset: int = -1  # float16 headers (quantized formats): scales, then (int4) offsets
    hm_offset: int = -1

    @property
    def header_shape(self) -> tuple[int, int]:
        return (self.rows // input_group(self.rows), self.m)

    @property
    def header_bytes(self) -> int:
        return 2 * self.header_shape[0] * self.m * ((self.hd_offset >= 0) + (self.hm_offset >= 0))

    @property
    def nbytes(self) -> int:
        return self.rows * self.stride


def arch_of(config: dict) -> dict:
    """The fields of a HF config (config.json as a dict) the engine needs, or a one-line error
    for architectures it does not run."""
    cfg = config.get("text_config") or config
    mt = config.get("model_type")
    if mt == "gemma3" and "text_config" in config:
        mt = "gemma3_text"
    fam = FAMILIES.get(mt)
    if fam is None:
        raise DipstreamError(f"the lean engine runs {', '.join(sorted(set(FAMILIES)))}, not '{mt}'")
    heads = cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta") if isinstance(rope, dict) and "rope_theta" in rope else \
        cfg.get("rope_theta", 10000.0)
    if isinstance(rope, dict) and "full_attention" in rope:  # gemma3: per layer type
        rope_theta = rope["full_attention"].get("rope_theta", rope_theta)
    local_theta = cfg.get("rope_local_base_freq")
    if isinstance(rope, dict) and "sliding_attention" in rope:
        local_theta = rope["sliding_attention"].get("rope_theta", local_theta)
    rtype = (rope.get("rope_type") if isinstance(rope, dict) else None) or "default"
    if isinstance(rope, dict) and "full_attention" in rope:
        rtype = rope["full_attention"].get("rope_type", "default")
    if rtype != "default":
        raise DipstreamError(f"the lean engine supports the default RoPE, not '{rtype}'")
    L = cfg["num_hidden_layers"]
    return {
        "family": fam, "model_type": mt, "n_layers": L, "d": cfg["hidden_size"], "D": cfg["intermediate_size"],
        "vocab": cfg["vocab_size"], "n_heads": heads, "n_kv": cfg.get("num_key_value_heads") or heads,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "eps": float(cfg.get("rms_norm_eps", 1e-6)), "rope_theta": float(rope_theta),
        "rope_local_theta": float(local_theta) if local_theta else None,
        "tied": bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        "act": cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
        "attention_bias": bool(cfg.get("attention_bias", mt == "qwen2")),
        "qk_norm": fam == "gemma3" or mt == "qwen3",
        "query_scale": float(cfg.get("query_pre_attn_scalar", cfg.get("head_dim") or cfg["hidden_size"] // heads))
        ** -0.5,
        "sliding_window": cfg.get("sliding_window"),
        "layer_types": cfg.get("layer_types") or ["full_attention"] * L,
        "max_positions": cfg.get("max_position_embeddings", 2048),
        "bos": config.get("bos_token_id"), "eos": config.get("eos_token_id"),
    }


def _hf_names(arch: dict, i: int) -> dict:
    p = f"model.layers.{i}."
    names = {"attn_norm": p + "input_layernorm.weight", "q": p + "self_attn.q_proj.weight",
             "k": p + "self_attn.k_proj.weight", "v": p + "self_attn.v_proj.weight",
             "o": p + "self_attn.o_proj.weight", "mlp_norm": p + "post_attention_layernorm.weight",
             "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight", "down": p + "mlp.down_proj.weight"}
    if arch["attention_bias"]:
        names.update(q_bias=p + "self_attn.q_proj.bias", k_bias=p + "self_attn.k_proj.bias",
                     v_bias=p + "self_attn.v_proj.bias")
    if arch["qk_norm"]:
        names.update(q_norm=p + "self_attn.q_norm.weight", k_norm=p + "self_attn.k_norm.weight")
    if arch["family"] == "gemma3":
        names.update(post_attn_norm=p + "post_attention_layernorm.weight",
                     mlp_norm=p + "pre_feedforward_layernorm.weight",
                     post_mlp_norm=p + "post_feedforward_layernorm.weight")
    return names


class _Writer:
    def __init__(self, fh, digest):
        self.fh, self.digest, self.tensors = fh, digest, {}

    def _pad(self):
        pad = (-self.fh.tell()) % ALIGN
        if pad:
            self.fh.write(bytes(pad))
            self.digest.update(bytes(pad))

    def _write(self, data: bytes) -> int:
        self._pad()
        off = self.fh.tell()
        self.fh.write(data)
        self.digest.update(data)
        return off

    def add(self, name: str, rows_by_input: np.ndarray, fmt: str) -> None:
        """A tensor stored as records of its rows (rows x m float32), then its headers."""
        m = rows_by_input.shape[1]
        g, _, stride = record_layout(fmt, m)
        rec, hd, hm = quantize_records(rows_by_input, fmt)
        t = {"offset": self._write(rec.tobytes()), "rows": int(rows_by_input.shape[0]), "m": int(m), "fmt": fmt,
             "group": int(g), "stride": int(stride)}
        if hd is not None:
            t["hd_offset"] = self._write(hd.tobytes())
        if hm is not None:
            t["hm_offset"] = self._write(hm.tobytes())
        self.tensors[name] = t


def write_model_file(ckpt: str | os.PathLike, directory: str | os.PathLike, model: str,
                     static_fmt: str = "int4", mlp_fmt: str = "int4", head_fmt: str | None = None) -> dict:
    """Convert a HF checkpoint folder (config.json + *.safetensors) into DIR/model.bin + model.json,
    reading one tensor at a time. `static_fmt`: attention projections; `head_fmt` (default
    default_head(static_fmt)): the embedding / head; `mlp_fmt`: the MLP records. Returns the manifest."""
    from safetensors import safe_open

    head_fmt = head_fmt or default_head(static_fmt)
    for f in (static_fmt, mlp_fmt, head_fmt):
        if f not in FORMATS:
            raise DipstreamError(f"unknown weight format '{f}'; use one of {', '.join(FORMATS)}")
    ckpt, directory = Path(ckpt), Path(directory)
    config = json.loads((ckpt / "config.json").read_text())
    arch = arch_of(config)
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise DipstreamError(f"{ckpt} has no .safetensors weights")
    handles = [safe_open(str(f), framework="numpy") for f in files]
    index = {k: h for h in handles for k in h.keys()}

    def get(name):
        if name not in index:
            raise DipstreamError(f"{ckpt} lacks tensor {name}")
        return index[name].get_tensor(name).astype(np.float32)

    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_path(directory / DATA) as tmp, open(tmp, "wb") as fh:
        w = _Writer(fh, digest)
        E = get("model.embed_tokens.weight")  # (V, d)
        if arch["tied"]:
            w.add("head", np.ascontiguousarray(E.T), head_fmt)  # d records of V outputs; lookup reads a column
        else:
            w.add("embed", E, head_fmt)  # V records of d: a lookup reads one record
            w.add("head", np.ascontiguousarray(get("lm_head.weight").T), head_fmt)
        del E
        w.add("final_norm", get("model.norm.weight")[None], "float32")
        layers = []
        for i in range(arch["n_layers"]):
            n = _hf_names(arch, i)
            for key in ("q", "k", "v", "o"):
                w.add(f"layers.{i}.{key}", np.ascontiguousarray(get(n[key]).T), static_fmt)
            for key in ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm",
                        "q_bias", "k_bias", "v_bias"):
                if key in n:
                    w.add(f"layers.{i}.{key}", get(n[key])[None], "float32")
            gate_up = np.concatenate([get(n["gate"]).T, get(n["up"]).T], axis=1)  # d x 2D
            w.add(f"layers.{i}.mlp_in", gate_up, mlp_fmt)
            del gate_up
            w.add(f"layers.{i}.mlp_out", np.ascontiguousarray(get(n["down"]).T), mlp_fmt)  # D x d
            layers.append(i)
        w._pad()
        size = fh.tell()
    manifest = {"format": FORMAT, "model": model, "arch": arch, "static_fmt": static_fmt, "mlp_fmt": mlp_fmt,
                "head_fmt": head_fmt, "tensors": w.tensors, "size": size, "sha256": digest.hexdigest()}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (ckpt / name).exists():
            (directory / name).write_bytes((ckpt / name).read_bytes())
    write_lean_tokenizer(directory)
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checked manifest of a model file folder (one-line errors say what to do)."""
    directory = Path(directory)
    path = directory / MANIFEST
    rebuild = f"delete {directory} and export the model again"
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise DipstreamError(f"{directory} has no {MANIFEST}: not a lean-engine model folder") from None
    except (OSError, ValueError) as e:
        raise DipstreamError(f"{path} is unreadable ({type(e).__name__}); {rebuild}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DipstreamError(f"{path} is not a {FORMAT} manifest; {rebuild}")
    try:
        arch, tensors = m["arch"], m["tensors"]
        size = int(m["size"])
        infos = {}
        for name, t in tensors.items():
            g, _, stride = record_layout(t["fmt"], int(t["m"]))
            info = TensorInfo(name, int(t["offset"]), int(t["rows"]), int(t["m"]), t["fmt"], g, stride,
                              int(t.get("hd_offset", -1)), int(t.get("hm_offset", -1)))
            hbytes = 2 * info.header_shape[0] * info.m
            quant = t["fmt"] != "float32"
            if stride != t["stride"] or g != t["group"] or info.offset % ALIGN or info.offset + info.nbytes > size \
                    or (info.hd_offset >= 0) != quant or (info.hm_offset >= 0) != (t["fmt"] == "int4") \
                    or any(o >= 0 and (o % ALIGN or o + hbytes > size) for o in (info.hd_offset, info.hm_offset)):
                raise ValueError(name)
            infos[name] = info
        L, d, D = int(arch["n_layers"]), int(arch["d"]), int(arch["D"])
        for i in range(L):
            if (infos[f"layers.{i}.mlp_in"].rows, infos[f"layers.{i}.mlp_in"].m) != (d, 2 * D) or \
                    (infos[f"layers.{i}.mlp_out"].rows, infos[f"layers.{i}.mlp_out"].m) != (D, d):
                raise ValueError(f"layers.{i} MLP shapes")
    except (KeyError, TypeError, ValueError, DipstreamError) as e:
        raise DipstreamError(f"{path} is inconsistent ({type(e).__name__}: {e}); {rebuild}") from None
    data = directory / DATA
    try:
        actual = data.stat().st_size
    except OSError:
        raise DipstreamError(f"{data} is missing; {rebuild}") from None
    if actual != size:
        raise DipstreamError(f"{data} has {actual} bytes, the manifest says {size}; {rebuild}")
    m["tensor_info"] = infos
    return m


def verify_sha256(directory: str | os.PathLike, manifest: dict) -> None:
    """Refuse a data file whose sha256 is not the manifest's."""
    h = hashlib.sha256()
    with open(Path(directory) / DATA, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != manifest["sha256"]:
        raise DipstreamError(f"{Path(directory) / DATA} is corrupt (sha256 mismatch); delete {directory} "
                             "and export the model again")
