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
    header_bytes,
    header_specs,
    quantize_records,
    record_layout,
    weight_format,
)
from dipstream.engine.storage import FileReader, aligned_empty
from dipstream.errors import DipstreamError
from dipstream.io import atomic_path, write_json_atomic
from dipstream.models.families import ARCHITECTURES, DecoderSpec
from dipstream.names import key_kind, layer_key
from dipstream.simulator.model_shape import ModelShape

FORMAT = "dipstream-engine/4"  # 4: GGUF block formats kept exactly, per-tensor sha256
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


KEEP = "gguf"  # `--weights`: a GGUF source's own block formats, tensor by tensor


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
    hd_offset: int = -1  # header tables (quantized formats): scales (K-quants: their super-block bytes),
    hm_offset: int = -1  # then offsets (int4, q5_1)
    sha256: str = ""

    @property
    def header_specs(self) -> list:
        """[(dtype, shape)] of the header tables (engine.qmatrix.header_specs)."""
        return header_specs(self.fmt, self.rows, self.m)

    @property
    def header_bytes(self) -> int:
        return header_bytes(self.fmt, self.rows, self.m)

    def extents(self) -> list[tuple[int, int]]:
        """(start, end) in the file of its records and of each of its header tables."""
        offs = [o for o in (self.hd_offset, self.hm_offset) if o >= 0]
        return [(self.offset, self.offset + self.nbytes)] + \
            [(o, o + int(np.prod(shape)) * dt.itemsize) for o, (dt, shape) in zip(offs, self.header_specs)]

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

    def add(self, name: str, payload, fmt: str) -> None:
        """A tensor: float32 rows by input (rows x m) quantized to `fmt`, or moved records (a
        generator of ("outputs", m), ("records", slice) pieces, ("headers", [tables]):
        engine.gguf_blocks.move_matrices / move_rows). Records, then the header tables, each on an
        ALIGN boundary; the tensor's own sha256 beside the file's."""
        weight_format(fmt)  # one-line error for an unknown format
        digest = hashlib.sha256()
        self._pad()
        t = {"offset": self.fh.tell(), "fmt": fmt}

        def put(arr: np.ndarray) -> None:
            data = np.ascontiguousarray(arr).tobytes()
            self.fh.write(data)
            self.digest.update(data)
            digest.update(data)

        if isinstance(payload, np.ndarray):
            rows, m = payload.shape
            rec, hd, hm = quantize_records(payload, fmt)
            heads = [h for h in (hd, hm) if h is not None]
            put(rec)
        else:  # moved records: slices of inputs as they come
            rows, heads, m = 0, [], 0
            for kind, part in payload:
                if kind == "records":
                    put(part)
                    rows += part.shape[0]
                elif kind == "outputs":
                    m = int(part)
                else:
                    heads = part
        g, _, stride = record_layout(fmt, m)
        for key, h in zip(("hd_offset", "hm_offset"), heads):
            self._pad()
            t[key] = self.fh.tell()
            put(h)
        t.update(rows=int(rows), m=int(m), group=int(g), stride=int(stride), sha256=digest.hexdigest())
        self.tensors[name] = t

    def finish(self) -> tuple[int, str]:
        """(file size, sha256) once every tensor is written."""
        self._pad()
        return self.fh.tell(), self.digest.hexdigest()


def write_model_file(directory: str | os.PathLike, manifest: dict, tensors) -> dict:
    """Write DIR/model.bin from `tensors` (an iterable of (name, payload, format), produced one at
    a time: see ModelWriter.add) and DIR/model.json from `manifest` (format, model, arch, formats;
    the tensors, size and sha256 are added here), each atomically. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / DATA) as tmp, open(tmp, "wb") as fh:
        w = ModelWriter(fh)
        for name, payload, fmt in tensors:
            w.add(name, payload, fmt)
        size, sha = w.finish()
    manifest = {"format": FORMAT, **manifest, "tensors": w.tensors, "size": size, "sha256": sha}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's fields (canonical JSON) but its own digest: an edited manifest that
    was not re-signed is refused (a forged one must still pass every structural check)."""
    body = {k: v for k, v in manifest.items() if k not in ("manifest_sha256", "tensor_info")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


LIMITS = {"n_layers": 4096, "d_model": 1 << 17, "d_ff": 1 << 20, "vocab": 1 << 22, "n_heads": 4096,
          "n_kv_heads": 4096, "head_dim": 4096}  # beyond any real model: a manifest past them is refused


def _int(v, name: str, lo: int = 0, hi: int = 1 << 62) -> int:
    """v as an int in [lo, hi], or ValueError (no bools, floats or strings)."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} = {v!r}")
    return v


def _number(v, name: str, positive: bool = True, optional: bool = False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} = {v!r}")


def _check_arch(arch: dict) -> None:
    """ValueError unless the architecture fields are of their types, finite, in range and
    consistent (heads, kv heads and head width; layers; RoPE tables; windows)."""
    if not isinstance(arch, dict) or not isinstance(arch.get("shape"), dict):
        raise ValueError("arch")
    family_block(arch)
    sh = arch["shape"]
    for f, hi in LIMITS.items():
        _int(sh.get(f), f"shape.{f}", 1, hi)
    for f in ("n_experts", "experts_per_token", "shared_d_ff"):
        _int(sh.get(f, 0), f"shape.{f}", 0, 0)  # the engine runs dense MLPs
    if not isinstance(sh.get("tied_embeddings", False), bool) or sh["n_heads"] % sh["n_kv_heads"]:
        raise ValueError("shape.tied_embeddings or n_heads / n_kv_heads")
    s = ModelShape.from_dict(sh)
    for f in ("eps", "query_scale"):
        _number(arch[f], f)
    for f in ("attn_softcap", "final_softcap"):
        _number(arch[f], f, optional=True)
    layers, rope = arch["layers"], arch["rope"]
    if not isinstance(layers, list) or len(layers) != s.n_layers or not isinstance(rope, dict):
        raise ValueError("layers")
    for name, t in rope.items():
        inv = t["inv_freq"]
        if not (isinstance(inv, list) and 0 < 2 * len(inv) <= s.head_dim):
            raise ValueError(f"rope {name}")
        for v in inv:
            _number(v, f"rope {name} inv_freq", positive=False)
        _number(t["scale"], f"rope {name} scale", positive=False)
        if t["limit"] is not None:
            _int(t["limit"], f"rope {name} limit", 1)
    for layer in layers:
        if not isinstance(layer, dict):
            raise ValueError("layer")
        _int(layer["window"], "layer window", 0)
        if layer["rope"] is not None and (not isinstance(layer["rope"], str) or layer["rope"] not in rope):
            raise ValueError("layer rope")
    _int(arch["max_positions"], "max_positions", 1, 1 << 24)
    if not isinstance(arch["act"], str):
        raise ValueError("act")
    from dipstream.native import ACTIVATION_CODES

    if arch["act"] not in ACTIVATION_CODES:
        raise ValueError(f"act {arch['act']!r}")
    for f in ("bos", "eos"):
        ids = arch.get(f)
        for v in (ids if isinstance(ids, list) else [ids]):
            if v is not None:
                _int(v, f, 0)  # ids outside the vocabulary are never sampled; the model refuses them as input


def _check_tensors(infos: dict[str, TensorInfo], arch: dict, size: int) -> None:
    """ValueError unless every tensor the architecture needs is there with its shape, in a format
    that tensor may have, inside the file, not overlapping another, and the optional ones (biases,
    q/k norms) are there for every layer or for none."""
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
    extents = []
    for t in infos.values():
        f = weight_format(t.fmt)
        vector = key_kind(t.name) in NORMS + OPTIONAL or t.name == "final_norm"
        if (f.rows and t.name != "embed") or (vector and t.fmt != "float32"):
            raise ValueError(f"{t.name} cannot be stored as {t.fmt}")
        specs = t.header_specs  # raises for shapes the format cannot hold
        offs = [o for o in (t.hd_offset, t.hm_offset) if o >= 0]
        if len(offs) != len(specs) or (t.hm_offset >= 0 and t.hd_offset < 0):
            raise ValueError(f"{t.name} headers")
        for a, b in t.extents():
            if a % ALIGN or a < 0 or b > size:
                raise ValueError(f"{t.name} placement")
            extents.append((a, b, t.name))
    extents.sort()
    for (a0, a1, na), (b0, b1, nb) in zip(extents, extents[1:]):
        if b0 < a1:
            raise ValueError(f"{na} and {nb} overlap")


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
        signed = m.get("manifest_sha256") == manifest_digest(m)
    except (TypeError, ValueError):
        signed = False
    if not signed:
        raise DipstreamError(f"{path} was edited after the export (its fields do not match their sha256); {rebuild}")
    try:
        size = int(m["size"])
        infos = {}
        _int(size, "size", 0)
        for name, t in m["tensors"].items():
            fmt = t["fmt"]
            if not isinstance(fmt, str):
                raise ValueError(f"{name} format")
            g, _, stride = record_layout(fmt, _int(t["m"], f"{name} m", 1))
            info = TensorInfo(name, _int(t["offset"], f"{name} offset"), _int(t["rows"], f"{name} rows", 1),
                              t["m"], fmt, g, stride, _int(t.get("hd_offset", -1), f"{name} hd_offset", -1),
                              _int(t.get("hm_offset", -1), f"{name} hm_offset", -1), str(t.get("sha256", "")))
            if stride != t["stride"] or g != t["group"] or len(info.sha256) != 64:
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


VERIFY = ("auto", "always", "never")


def _stamp_path(directory: Path) -> Path:
    """Where this machine records that a folder's model file was verified (in dipstream's cache,
    not in the folder: a folder cannot vouch for itself)."""
    from dipstream.paths import cache_root

    key = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:24]
    return cache_root() / "verified" / f"{key}.json"


def _stamp(directory: Path) -> dict:
    st = (Path(directory) / DATA).stat()
    return {"manifest": hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest(),
            "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def verify_tensors(directory: str | os.PathLike, reader: FileReader, manifest: dict, mode: str = "auto") -> bool:
    """Check every tensor's bytes (records and header tables) against its sha256 in the manifest,
    and the whole file's: one sequential pass over the file (direct reads where the file system
    allows: no page cache filled). `mode` auto: on the first open of this folder and whenever
    model.bin (size, mtime, inode) or the manifest changes; always; never. Returns whether it
    checked."""
    if mode not in VERIFY:
        raise DipstreamError(f"--verify {mode!r}: use one of {', '.join(VERIFY)}")
    directory = Path(directory)
    if mode == "never":
        return False
    stamp, path = _stamp(directory), _stamp_path(directory)
    if mode == "auto":
        try:
            if json.loads(path.read_text()) == stamp:
                return False
        except (OSError, ValueError):
            pass
    infos = manifest["tensor_info"]
    pieces = sorted((a, b, t.name) for t in infos.values() for a, b in t.extents())  # records and tables
    hashers = {n: hashlib.sha256() for n in infos}
    whole = hashlib.sha256()
    chunk = 8 << 20
    buf = aligned_empty(chunk)
    size = int(manifest["size"])  # a multiple of ALIGN: whole blocks
    i = 0
    for pos in range(0, size, chunk):
        n = min(chunk, size - pos)
        reader.read(np.array([pos], np.int64), np.array([n], np.int64), np.array([buf.ctypes.data], np.int64))
        view = memoryview(buf)[:n]
        whole.update(view)
        while i < len(pieces) and pieces[i][0] < pos + n:  # pieces overlapping this chunk
            a, b, name = pieces[i]
            lo, hi = max(a, pos), min(b, pos + n)
            hashers[name].update(view[lo - pos:hi - pos])
            if b > pos + n:
                break
            i += 1
    rebuild = f"delete {directory} and export the model again"
    for name, h in hashers.items():
        if h.hexdigest() != infos[name].sha256:
            raise DipstreamError(f"{reader.path} is corrupt (tensor {name} does not match its sha256); {rebuild}")
    if whole.hexdigest() != manifest["sha256"]:
        raise DipstreamError(f"{reader.path} is corrupt (sha256 mismatch); {rebuild}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, stamp)
    except OSError:
        pass  # a read-only cache: verified again next time
    return True
