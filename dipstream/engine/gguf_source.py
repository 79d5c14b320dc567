"""A GGUF file as the export's source: its architecture (through transformers' GGUF config reader),
its tokenizer, and its tensors, the quantized ones moved block for block into records
(`engine.gguf_blocks`), read through the GGUF's memory map one tensor (slice) at a time.

Families: what the GGUF calls llama (Llama, Mistral, SmolLM), qwen2, qwen3 and gemma3. transformers'
own conventions are applied on the way, so the model file equals the Hugging Face conversion of the
same GGUF: llama's q / k rows are put back in Hugging Face's order (the GGUF converter permutes them
for its rotary layout), Gemma's norms lose the +1 the converter adds.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from dipstream.engine.gguf_blocks import FLOATS, move_matrices, move_rows, record_format
from dipstream.engine.qmatrix import record_layout
from dipstream.errors import DipstreamError
from dipstream.names import layer_key

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")  # GGUF general.architecture values the export reads
PERMUTED = ("llama",)  # q / k rows permuted by the converter
NORM_PLUS_ONE = ("gemma3",)  # norms stored as 1 + w
LAYER_PARTS = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "post_attention_norm": "post_attn_norm",
               "post_ffw_norm": "post_mlp_norm", "attn_q_norm": "q_norm", "attn_k_norm": "k_norm"}


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # GGUF type -> struct


def header_values(path: str | Path, keys: set[str]) -> dict:
    """The GGUF metadata values of `keys` (strings and numbers as they are; arrays: their length),
    read by skipping through the header: no tensor, no other value kept (no memory to speak of,
    where gguf's reader holds every array: 500 MB for a 150k-token vocabulary)."""
    import struct

    out: dict = {}
    with open(path, "rb") as f:
        def unpack(fmt: str):
            data = f.read(struct.calcsize(fmt))
            if len(data) != struct.calcsize(fmt):
                raise ValueError("truncated header")
            return struct.unpack(fmt, data)

        def value(t: int, keep: bool):
            if t in _SCALARS:
                return unpack("<" + _SCALARS[t])[0]
            if t == 8:
                n = unpack("<Q")[0]
                if keep:
                    return f.read(n).decode("utf-8", "replace")
                f.seek(n, 1)
                return None
            if t == 9:
                et, n = unpack("<IQ")
                if et in _SCALARS:
                    f.seek(struct.calcsize("<" + _SCALARS[et]) * n, 1)
                else:
                    for _ in range(n):
                        value(et, False)
                return n
            raise ValueError(f"value type {t}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        _version, _tensors, n_kv = unpack("<IQQ")
        for _ in range(n_kv):
            key = f.read(unpack("<Q")[0]).decode("utf-8", "replace")
            v = value(unpack("<I")[0], key in keys)
            if key in keys:
                out[key] = v
                if len(out) == len(keys):
                    break
    return out


def gguf_architecture(path: str | Path) -> str:
    """The GGUF's architecture, refused in one line unless the export reads it (light: no tensors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DipstreamError(f"GGUF file '{path}' does not exist; give the path of a .gguf model file")
    try:
        arch = header_values(path, {"general.architecture"}).get("general.architecture")
    except (OSError, ValueError) as e:
        raise DipstreamError(f"'{path}' is not a readable GGUF file ({e}); download it again") from None
    if arch not in ARCHS:
        raise DipstreamError(f"'{path.name}' is a GGUF of architecture '{arch}'; the engine reads GGUF models of "
                             f"{', '.join(ARCHS)}")
    return arch


EXPORT_BASE = 700 << 20  # measured: transformers and torch, the header, a slice of a tensor (SmolLM2: 842 MB in all)
EXPORT_PER_TOKEN = 6500  # bytes per vocabulary entry of the tokenizer's conversion (Gemma 3, 262k tokens: 1955 MB)


def export_memory(path: str | Path) -> int:
    """A bound on the export's peak resident memory for this GGUF, from its vocabulary's size
    (measured on the EPYC machine: SmolLM2 842 MB, Qwen 1.5B 1531 MB, Gemma 3 270M 1955 MB; the
    bound gives 1.02, 1.69 and 2.36 GB)."""
    try:
        vocab = header_values(path, {"tokenizer.ggml.tokens"}).get("tokenizer.ggml.tokens", 0)
    except (OSError, ValueError):
        vocab = 0
    return EXPORT_BASE + EXPORT_PER_TOKEN * vocab


class GGUFSource:
    """An opened GGUF: `arch` (its general.architecture), `tensors` {name: ReaderTensor}."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path).expanduser()
        self.arch = gguf_architecture(self.path)
        try:
            self.reader = GGUFReader(str(self.path))
        except (ValueError, KeyError, IndexError, OSError, TypeError, AssertionError) as e:
            raise DipstreamError(f"'{self.path}' is not a readable GGUF file ({type(e).__name__}: {e}); "
                                 "download it again") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        end = max((int(t.data_offset) + int(t.n_bytes) for t in self.reader.tensors), default=0)
        if end > self.path.stat().st_size:
            raise DipstreamError(f"'{self.path}' is truncated (its tensors end at byte {end}); download it again")

    def config(self):
        """The transformers config of the GGUF (transformers' GGUF reader: what
        from_pretrained(gguf_file=...) builds)."""
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
        except (ValueError, KeyError, RuntimeError) as e:
            raise DipstreamError(f"transformers cannot read the configuration of '{self.path.name}' ({e})") from None
        parsed = {k: v for k, v in parsed.items() if not k.startswith("_")}
        return AutoConfig.for_model(**parsed)

    def write_tokenizer(self, directory: Path) -> None:
        """tokenizer.json and its companions, from the GGUF's vocabulary (transformers' converter)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        tok.save_pretrained(str(directory))

    # ---------------------------------------------------------------- tensors
    def _get(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise DipstreamError(f"'{self.path.name}' lacks tensor {name}")
        return t

    def _float(self, name: str) -> np.ndarray:
        """A tensor as float32 (out x in, or a vector), dequantized by gguf where it is quantized."""
        from gguf.quants import dequantize

        t = self._get(name)
        a = np.asarray(t.data)
        return a.astype(np.float32) if t.tensor_type.name in ("F32", "F16") else dequantize(a, t.tensor_type)

    def _rows(self, name: str, perm: np.ndarray | None = None) -> tuple[np.ndarray, object]:
        """(raw rows (out, bytes) uint8, type) of a quantized matrix, rows reordered by `perm`."""
        t = self._get(name)
        raw = np.asarray(t.data)
        raw = raw.reshape(raw.shape[0], -1) if raw.ndim > 1 else raw.reshape(1, -1)
        return (raw if perm is None else raw[perm]), t.tensor_type

    def _vector(self, name: str) -> np.ndarray:
        v = self._float(name).reshape(1, -1)
        if self.arch in NORM_PLUS_ONE and "norm" in name:
            v = v - np.float32(1)
        return v

    def _perm(self, kind: str, heads: int, out: int) -> np.ndarray | None:
        """transformers' reverse permutation of llama's q / k rows (None: none)."""
        if self.arch not in PERMUTED or kind not in ("q", "k"):
            return None
        dim = out // heads // 2
        return np.arange(out).reshape(heads, dim, 2).swapaxes(2, 1).reshape(out)

    def release(self, names: list[str]) -> None:
        """Drop the pages of these tensors from this process (read once through the memory map: the
        export's resident set stays one tensor, not the file)."""
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        page = mmap.PAGESIZE
        for n in names:
            t = self.tensors[n]
            a = int(t.data_offset) // page * page
            b = int(t.data_offset) + int(t.n_bytes)
            try:
                mm.madvise(mmap.MADV_DONTNEED, a, b - a)
            except (OSError, ValueError):
                return

    def _moved(self, pieces, names):
        yield from pieces
        self.release(names)

    def _matrix(self, names: list[str], requant: str | None, perms=None):
        """(payload, fmt) of the matrices `names` side by side (outputs concatenated), by input:
        moved blocks (their own format), or float rows to quantize to `requant`."""
        perms = perms or [None] * len(names)
        types = {self._get(n).tensor_type.name for n in names}
        if requant is None and not types & set(FLOATS):
            parts = [self._rows(n, p) for n, p in zip(names, perms)]
            return self._moved(move_matrices(parts), names), record_format(parts[0][1])
        Ws = []
        for n, p in zip(names, perms):
            W = self._float(n)
            Ws.append(W if p is None else W[p])
        rows = np.ascontiguousarray(np.concatenate(Ws, axis=0).T)
        self.release(names)
        return rows, requant or "float32"

    def tensors_of(self, arch: dict, requant: str | None = None, head_requant: str | None = None):
        """(name, payload, format) of every tensor of the engine's model file, one at a time:
        payload a float32 (rows, m) array, or a generator of moved records (`move_matrices`).
        `requant` / `head_requant`: None keeps the GGUF's blocks; a format re-quantizes the
        matrices / the embedding and head to it."""
        from dipstream.simulator.model_shape import ModelShape

        s = ModelShape.from_dict(arch["shape"])
        H, Hkv = s.n_heads, s.n_kv_heads
        tied = "output.weight" not in self.tensors
        if tied != bool(s.tied_embeddings):
            raise DipstreamError(f"'{self.path.name}': the configuration and the tensors disagree on tied embeddings")
        yield ("head", *self._matrix(["token_embd.weight" if tied else "output.weight"], head_requant))
        if not tied:
            yield ("embed", *self._embedding(head_requant))
        yield "final_norm", self._vector("output_norm.weight"), "float32"
        for i in range(s.n_layers):
            b = f"blk.{i}."
            for kind, heads in (("q", H), ("k", Hkv), ("v", Hkv)):
                w = self._get(b + f"attn_{kind}.weight")
                perm = self._perm(kind, heads, int(w.shape[-1]))
                yield (layer_key(i, kind), *self._matrix([b + f"attn_{kind}.weight"], requant, [perm]))
                if b + f"attn_{kind}.bias" in self.tensors:
                    bias = self._float(b + f"attn_{kind}.bias").reshape(-1)
                    yield layer_key(i, f"{kind}_bias"), (bias if perm is None else bias[perm])[None], "float32"
            yield (layer_key(i, "o"), *self._matrix([b + "attn_output.weight"], requant))
            for part, key in LAYER_PARTS.items():
                if b + part + ".weight" in self.tensors:
                    yield layer_key(i, key), self._vector(b + part + ".weight"), "float32"
            yield (layer_key(i, "mlp_in"), *self._matrix([b + "ffn_gate.weight", b + "ffn_up.weight"], requant))
            yield (layer_key(i, "mlp_out"), *self._matrix([b + "ffn_down.weight"], requant))

    def _embedding(self, requant: str | None):
        """An untied embedding: its GGUF rows as they are (a lookup dequantizes one row), or float
        rows to quantize."""
        t = self._get("token_embd.weight")
        if requant is None and t.tensor_type.name not in FLOATS:
            fmt = record_format(t.tensor_type) + "_rows"
            raw, _ = self._rows("token_embd.weight")
            m = int(t.shape[0])  # GGML order: values per row first
            record_layout(fmt, m)  # rows of whole blocks, checked before any is written
            return self._moved(move_rows(raw, fmt, m), ["token_embd.weight"]), fmt
        return self._float("token_embd.weight"), requant or "float32"
