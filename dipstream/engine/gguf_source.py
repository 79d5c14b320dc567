"""A GGUF file as the export's source: its architecture (`engine.gguf_arch`), its tokenizer
(`engine.gguf_tokenizer`) and its tensors, the quantized ones moved block for block into records
(`engine.gguf_blocks`), a slice of one tensor at a time (matrices read by `pread`, small tensors
through the memory map): neither
torch nor transformers is imported, except for a configuration or tokenizer those modules do not
map (then transformers' GGUF readers build them, at a much larger memory).

Families: what the GGUF calls llama (Llama, Mistral, SmolLM), qwen2, qwen3 and gemma3. transformers'
own conventions are applied on the way, so the model file equals the Hugging Face conversion of the
same GGUF: llama's q / k rows are put back in Hugging Face's order (the GGUF converter permutes them
for its rotary layout), Gemma's norms lose the +1 the converter adds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dipstream.engine.gguf_arch import FAMILIES, Unsupported, gguf_arch
from dipstream.engine.gguf_blocks import FLOATS, move_matrices, move_rows, record_format
from dipstream.engine.gguf_file import GGUFFile, read_metadata
from dipstream.engine.qmatrix import record_layout
from dipstream.errors import DipstreamError
from dipstream.names import layer_key

ARCHS = tuple(FAMILIES)  # GGUF general.architecture values the export reads
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type", "tokenizer.ggml.precompiled_charsmap")  # read at the end only
LAYER_PARTS = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "post_attention_norm": "post_attn_norm",
               "post_ffw_norm": "post_mlp_norm", "attn_q_norm": "q_norm", "attn_k_norm": "k_norm"}


def gguf_architecture(path: str | Path) -> str:
    """The GGUF's architecture, refused in one line unless the export reads it (light: no tensors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DipstreamError(f"GGUF file '{path}' does not exist; give the path of a .gguf model file")
    try:
        arch = read_metadata(path, {"general.architecture"}).get("general.architecture")
    except (OSError, ValueError) as e:
        raise DipstreamError(f"'{path}' is not a readable GGUF file ({e}); download it again") from None
    if arch not in ARCHS:
        raise DipstreamError(f"'{path.name}' is a GGUF of architecture '{arch}'; the engine reads GGUF models of "
                             f"{', '.join(ARCHS)}")
    return arch


EXPORT_BASE = 700 << 20  # transformers' readers: transformers, torch, a tensor slice (SmolLM2: 842 MB in all)
EXPORT_PER_TOKEN = 6500  # bytes per vocabulary entry of transformers' tokenizer conversion (Gemma 3, 262k: 1955 MB)
LIGHT_BASE = 50_000_000  # the light export: Python, numpy, gguf, a slice of records (SmolLM2's 49k tokens: 95 MB)
LIGHT_PER_TOKEN = 1500  # bytes per vocabulary entry: `tokenizers` checking the lean tokenizer (Gemma 3: 436 MB)


def export_memory(path: str | Path, requant: bool = False) -> int:
    """A bound on the export's peak resident memory for this GGUF, from its vocabulary's size and
    whether the light readers map it (`engine.gguf_arch`, `engine.gguf_tokenizer`; else
    transformers'), measured on the EPYC machine: light SmolLM2 95 MB, Qwen 1.5B 183 MB, Gemma 3
    270M 436 MB (bounds: 124, 278, 443 MB); transformers' 842, 1531, 1955 MB. `requant`: the
    blocks are re-quantized, each matrix dequantized whole (float32, three copies at most)."""
    from dipstream.engine.gguf_tokenizer import covers

    try:
        src = GGUFSource(path)
    except DipstreamError:
        return EXPORT_BASE  # the export says what is wrong with the file
    try:
        embd = src.tensors.get("token_embd.weight")
        vocab = int(embd.shape[1]) if embd is not None else 0
        largest = max((int(np.prod(t.shape)) for t in src.tensors.values()), default=0)
        try:
            src.engine_arch()
            light = covers(src.meta)
        except (Unsupported, DipstreamError):
            light = False
    finally:
        src.file.close()
    need = LIGHT_BASE + LIGHT_PER_TOKEN * vocab if light else EXPORT_BASE + EXPORT_PER_TOKEN * vocab
    return need + (12 * largest if requant else 0)


class GGUFSource:
    """An opened GGUF: `arch` (its general.architecture), `meta` (its metadata but the tokenizer's
    arrays), `tensors` {name: GGUFTensor}."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.arch = gguf_architecture(self.path)
        self.family = FAMILIES[self.arch]
        try:
            self.file = GGUFFile(self.path, keys=lambda k: k not in TOKENIZER_ARRAYS)
        except (ValueError, KeyError, IndexError, OSError, TypeError, UnicodeDecodeError) as e:
            raise DipstreamError(f"'{self.path}' is not a readable GGUF file ({type(e).__name__}: {e}); "
                                 "download it again") from None
        self.meta, self.tensors = self.file.meta, self.file.tensors

    def engine_arch(self) -> dict:
        """The manifest's architecture, read from the metadata (`gguf_arch`); Unsupported for a
        configuration that reader does not map (then `transformers_config` reads it)."""
        try:
            return gguf_arch(self.meta, self.tensors)
        except (ValueError, KeyError, TypeError) as e:
            raise DipstreamError(f"'{self.path.name}' has a configuration that does not add up ({e}); download it "
                                 "again") from None

    def transformers_config(self):
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
        """tokenizer.json and its companions from the GGUF's vocabulary: by `write_gguf_tokenizer`,
        or by transformers' converter for a tokenizer that does not reproduce."""
        from dipstream.engine.gguf_tokenizer import write_gguf_tokenizer

        meta = dict(self.meta, **read_metadata(self.path, set(TOKENIZER_ARRAYS)))
        written = write_gguf_tokenizer(meta, directory)
        del meta
        if written:
            return
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
        return t.data.astype(np.float32) if t.tensor_type.name in FLOATS else dequantize(t.data, t.tensor_type)

    def _rows(self, name: str, perm: np.ndarray | None = None) -> tuple[object, object]:
        """(raw rows (out, bytes) uint8, type) of a quantized matrix: read slice by slice from the
        file (`GGUFRows`), or reordered by `perm` (q / k: small)."""
        t = self._get(name)
        return (self.file.rows(name) if perm is None else t.data[perm]), t.tensor_type

    def _vector(self, name: str) -> np.ndarray:
        v = self._float(name).reshape(1, -1)
        if self.family.norm_plus_one and "norm" in name:
            v = v - np.float32(1)
        return v

    def _perm(self, kind: str, heads: int, out: int) -> np.ndarray | None:
        """transformers' reverse permutation of llama's q / k rows (None: none)."""
        if not self.family.permuted or kind not in ("q", "k"):
            return None
        dim = out // heads // 2
        return np.arange(out).reshape(heads, dim, 2).swapaxes(2, 1).reshape(out)

    def release(self, names: list[str]) -> None:
        self.file.release(names)

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
