"""The engine's model file: every weight of a model, as the engine reads it, in one file it can keep
in RAM whole or read in part (the MLP) with direct I/O. One writer, one reader, one validator.

``DIR/model.bin`` holds the tensors; ``DIR/model.json`` (the manifest) their places and shapes,
the architecture the engine runs (its family, shape, norms, RoPE tables, attention windows), the
formats, the file size and a sha256. Each tensor is a block of records (see
:mod:`dipstream.engine.qmatrix`) starting on a 4096-byte boundary, then its float16 headers:

* static: per layer the attention projections (records by input index), norms and biases, the
  embedding (records by token, or - tied - the head's records by input index), the final norm,
  the head;
* MLP, per layer, in the bundled layout: ``mlp_in`` = d records [W_gate[:, j] | W_up[:, j]] (2D
  outputs), ``mlp_out`` = D records W_down[:, i] (d outputs), so the units a DIP mask selects are
  whole records and consecutive units are contiguous.

Every open checks the manifest field by field against what the architecture implies (each
tensor's shape, offsets inside the file, the RoPE tables' widths) and the file's size; the sha256
on request (``verify``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dipstream.engine.qmatrix import (
    FORMATS,
    input_group,
    quantize_records,
    record_layout,
)
from dipstream.engine.storage import FileReader, aligned_empty
from dipstream.errors import DipstreamError
from dipstream.io import atomic_path, write_json_atomic
from dipstream.models.families import ARCHITECTURES, DecoderSpec
from dipstream.names import key_kind, layer_key
from dipstream.simulator.model_shape import ModelShape

FORMAT = "dipstream-engine/3"  # 3: the architecture as the family table runs it, RoPE tables from transformers
DATA, MANIFEST = "model.bin", "model.json"
ALIGN = 4096
MLP_KINDS = ("in", "out")
NORMS = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm")


def mlp_tensor(layer: int, kind: str) -> str:
    """The name of layer `layer`'s MLP records of hook kind `kind` ("in": [gate | up], "out": down)."""
    return layer_key(layer, f"mlp_{kind}")


def is_mlp_tensor(name: str) -> bool:
    """Whether a tensor of the file holds MLP records (what an offloaded run leaves in the file)."""
    return key_kind(name) in ("mlp_in", "mlp_out")


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


class ModelWriter:
    """Writes tensors into a model file being made (offsets aligned, sha256 as it goes)."""

    def __init__(self, fh):
        self.fh, self.digest, self.tensors = fh, hashlib.sha256(), {}

    def _pad(self) -> None:
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

    def finish(self) -> tuple[int, str]:
        """(file size, sha256) once every tensor is written."""
        self._pad()
        return self.fh.tell(), self.digest.hexdigest()


def write_model_file(directory: str | os.PathLike, manifest: dict, tensors) -> dict:
    """Write DIR/model.bin from `tensors` (an iterable of (name, rows x m float32 array, format),
    produced one at a time) and DIR/model.json from `manifest` (format, model, arch, formats; the
    tensors, size and sha256 are added here), each atomically. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / DATA) as tmp, open(tmp, "wb") as fh:
        w = ModelWriter(fh)
        for name, rows, fmt in tensors:
            if fmt not in FORMATS:
                raise DipstreamError(f"unknown weight format '{fmt}'; use one of {', '.join(FORMATS)}")
            w.add(name, rows, fmt)
        size, sha = w.finish()
    manifest = {"format": FORMAT, **manifest, "tensors": w.tensors, "size": size, "sha256": sha}
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------- reading

OPTIONAL = ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm")  # per layer, where the checkpoint has them


def expected_tensors(arch: dict) -> dict[str, tuple[int, int]]:
    """{tensor name: (rows, m)} of every tensor an architecture may have: all but the optional
    ones (`OPTIONAL`: attention biases, q/k norms) are required."""
    s = ModelShape.from_dict(arch["shape"])
    d, D, V, H, Hkv, hd = s.d_model, s.d_ff, s.vocab, s.n_heads, s.n_kv_heads, s.head_dim
    dec = family_block(arch)
    want = {"head": (d, V), "final_norm": (1, d)}
    if not s.tied_embeddings:
        want["embed"] = (V, d)
    for i in range(s.n_layers):
        parts = {"attn_norm": (1, d), "mlp_norm": (1, d), "q": (d, H * hd), "k": (d, Hkv * hd), "v": (d, Hkv * hd),
                 "o": (H * hd, d), "mlp_in": (d, 2 * D), "mlp_out": (D, d), "q_bias": (1, H * hd),
                 "k_bias": (1, Hkv * hd), "v_bias": (1, Hkv * hd), "q_norm": (1, hd), "k_norm": (1, hd)}
        if dec.post_attn_norm:
            parts.update(post_attn_norm=(1, d), post_mlp_norm=(1, d))
        want.update({layer_key(i, p): v for p, v in parts.items()})
    return want


def family_block(arch: dict) -> DecoderSpec:
    """How the engine runs the block of the manifest's family (the family table's entry)."""
    spec = ARCHITECTURES.get(arch["model_type"])
    if spec is None or spec.decoder is None:
        raise ValueError(f"model_type {arch['model_type']!r} is not a family the engine runs")
    return spec.decoder


def _check_arch(arch: dict) -> None:
    """ValueError unless the architecture fields are of their types and consistent."""
    family_block(arch)
    s = ModelShape.from_dict(arch["shape"])
    if s.is_moe:
        raise ValueError("mixture-of-experts shape")
    for f in ("eps", "query_scale"):
        if not (isinstance(arch[f], (int, float)) and np.isfinite(arch[f]) and arch[f] > 0):
            raise ValueError(f)
    for f in ("attn_softcap", "final_softcap"):
        if arch[f] is not None and not (isinstance(arch[f], (int, float)) and np.isfinite(arch[f]) and arch[f] > 0):
            raise ValueError(f)
    layers, rope = arch["layers"], arch["rope"]
    if not isinstance(layers, list) or len(layers) != s.n_layers:
        raise ValueError("layers")
    for name, t in rope.items():
        inv = t["inv_freq"]
        if not (isinstance(inv, list) and 0 < 2 * len(inv) <= s.head_dim and all(np.isfinite(inv))
                and np.isfinite(t["scale"]) and (t["limit"] is None or int(t["limit"]) > 0)):
            raise ValueError(f"rope {name}")
    for layer in layers:
        if int(layer["window"]) < 0 or (layer["rope"] is not None and layer["rope"] not in rope):
            raise ValueError("layer window or rope")
    if int(arch["max_positions"]) <= 0 or not isinstance(arch["act"], str):
        raise ValueError("max_positions or act")


def _check_tensors(infos: dict[str, TensorInfo], arch: dict, size: int) -> None:
    """ValueError unless every tensor the architecture needs is there with its shape, inside the
    file, and the optional ones (biases, q/k norms) are there for every layer or for none."""
    want = expected_tensors(arch)
    extra = set(infos) - set(want)
    if extra:
        raise ValueError(f"unexpected tensors {sorted(extra)[:3]}")
    for name, shape in want.items():
        if name not in infos:
            if key_kind(name) in OPTIONAL:
                continue
            raise ValueError(f"missing tensor {name}")
        if (infos[name].rows, infos[name].m) != shape:
            raise ValueError(f"{name} has shape {(infos[name].rows, infos[name].m)}, not {shape}")
    layers = ModelShape.from_dict(arch["shape"]).n_layers
    for part in OPTIONAL:
        count = sum(1 for n in infos if key_kind(n) == part)
        if count not in (0, layers):
            raise ValueError(f"{part} in some layers only")
    for t in infos.values():
        quant = t.fmt != "float32"
        hbytes = 2 * t.header_shape[0] * t.m
        if t.offset % ALIGN or t.offset + t.nbytes > size or (t.hd_offset >= 0) != quant \
                or (t.hm_offset >= 0) != (t.fmt == "int4") \
                or any(o >= 0 and (o % ALIGN or o + hbytes > size) for o in (t.hd_offset, t.hm_offset)):
            raise ValueError(f"{t.name} placement")


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checked manifest of a model file folder (one-line errors say what to do); its
    ``tensor_info`` holds a TensorInfo per tensor."""
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
        size = int(m["size"])
        infos = {}
        for name, t in m["tensors"].items():
            g, _, stride = record_layout(t["fmt"], int(t["m"]))
            info = TensorInfo(name, int(t["offset"]), int(t["rows"]), int(t["m"]), t["fmt"], g, stride,
                              int(t.get("hd_offset", -1)), int(t.get("hm_offset", -1)))
            if stride != t["stride"] or g != t["group"] or info.rows <= 0:
                raise ValueError(name)
            infos[name] = info
        _check_arch(m["arch"])
        _check_tensors(infos, m["arch"], size)
    except (KeyError, TypeError, ValueError, AttributeError, DipstreamError) as e:
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


def verify_sha256(reader: FileReader, manifest: dict) -> None:
    """Refuse a model file whose sha256 is not the manifest's (read with the file's reader: direct
    where it can, so hashing fills no page cache)."""
    h = hashlib.sha256()
    chunk = 8 << 20
    buf = aligned_empty(chunk)
    size = int(manifest["size"])  # a multiple of ALIGN: whole blocks
    for pos in range(0, size, chunk):
        n = min(chunk, size - pos)
        reader.read(np.array([pos], np.int64), np.array([n], np.int64), np.array([buf.ctypes.data], np.int64))
        h.update(memoryview(buf)[:n])
    if h.hexdigest() != manifest["sha256"]:
        raise DipstreamError(f"{reader.path} is corrupt (sha256 mismatch); delete {reader.path.parent} and export "
                             "the model again")
