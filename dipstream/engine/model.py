"""The lean decode loop's model: one token at a time, numpy + the native kernels, a preallocated
KV cache, no Hugging Face module dispatch (and no torch). Families: Llama-style (Llama, Mistral,
Qwen2 with attention biases, Qwen3 with q/k norms, SmolLM) and Gemma 3 (scaled embeddings,
(1 + w) norms around attention and MLP, q/k norms, sliding-window layers with their own RoPE
base). The MLP of each block is a pluggable backend (in RAM, or offloaded to the model file).

Verified token for token against the model's own Hugging Face forward in float32
(tests/test_engine.py).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from dipstream.engine import blocks
from dipstream.engine.head import EmbeddingReader, StreamedHead
from dipstream.engine.modelfile import DATA, TensorInfo, read_manifest, verify_sha256
from dipstream.engine.qmatrix import QMatrix, dequantize_records, engine_lib
from dipstream.errors import DipstreamError
from dipstream.simulator.model_shape import ModelShape


HEAD_PLACES = ("ram", "stream")
ACTIVATIONS = ("float32", "int8")  # int8: int4 / int8 products with activations quantized per input group


def read_block(fd: int, info: TensorInfo) -> np.ndarray:
    """The records of one tensor, read into anonymous RAM (not a mapping of the file)."""
    buf = np.empty((info.rows, info.stride), np.uint8)
    view, off, done = memoryview(buf).cast("B"), info.offset, 0
    while done < buf.nbytes:
        n = os.preadv(fd, [view[done:]], off + done)
        if n <= 0:
            raise DipstreamError("the model file ended early; export the model again")
        done += n
    return buf


def read_headers(fd: int, info: TensorInfo) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The float16 scale and offset headers of a quantized tensor (None where it has none)."""
    out = []
    for off in (info.hd_offset, info.hm_offset):
        if off < 0:
            out.append(None)
            continue
        h = np.empty(info.header_shape, np.float16)
        if os.preadv(fd, [memoryview(h).cast("B")], off) != h.nbytes:
            raise DipstreamError("the model file ended early; export the model again")
        out.append(h)
    return out[0], out[1]


def load_matrix(fd: int, info: TensorInfo, act8: bool = False) -> QMatrix:
    """One tensor's records and headers, in RAM."""
    return QMatrix(read_block(fd, info), info.fmt, info.m, *read_headers(fd, info), act8=act8)


ACTS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1, "gelu_new": 1}  # ds_glu's codes


class LeanModel:
    """A model file's static weights in RAM, its KV cache, and `forward(token, pos) -> logits`.

    `mlp`: an object with ``block(layer, x (d,))`` (x += the MLP of norm(x)) and ``new_sequence()`` (see
    :mod:`dipstream.engine.mlp`); set after construction (it may need this model's file)."""

    def __init__(self, directory: str | os.PathLike, max_seq: int, nthreads: int = 1, verify: bool = False,
                 kv_dtype: str = "float32", head: str = "ram", io_threads: int = 4, activations: str = "float32",
                 stream_embed: bool = False):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if verify:
            verify_sha256(self.directory, self.manifest)
        a = self.arch = self.manifest["arch"]
        self.family = a["family"]
        self.L, self.d, self.D, self.V = a["n_layers"], a["d"], a["D"], a["vocab"]
        self.H, self.Hkv, self.hd = a["n_heads"], a["n_kv"], a["head_dim"]
        if a["act"] not in ACTS:
            raise DipstreamError(f"the lean engine has no activation '{a['act']}'")
        self.act_code = ACTS[a["act"]]
        self.nthreads = int(nthreads)
        self.max_seq = int(max_seq)
        if self.max_seq > a["max_positions"]:
            raise DipstreamError(f"{self.max_seq} tokens exceed the model's context of {a['max_positions']}")
        if head not in HEAD_PLACES:
            raise DipstreamError(f"head placement must be one of {', '.join(HEAD_PLACES)}, not {head!r}")
        if activations not in ACTIVATIONS:
            raise DipstreamError(f"activations must be one of {', '.join(ACTIVATIONS)}, not {activations!r}")
        if kv_dtype not in ("float32", "float16"):
            raise DipstreamError(f"KV cache dtype must be float32 or float16, not {kv_dtype!r}")
        self.act8 = activations == "int8"
        infos = self.manifest["tensor_info"]
        self.fd = os.open(self.directory / DATA, os.O_RDONLY)
        self.w: dict[str, QMatrix] = {}
        self.vec: dict[str, np.ndarray] = {}
        streamed = ("head", "embed") if head == "stream" else ("embed",) if stream_embed else ()
        for name, info in infos.items():
            if name.endswith(("mlp_in", "mlp_out")) or name in streamed:
                continue  # the MLP backend (and a streamed head) reads these
            rec = read_block(self.fd, info)
            if info.rows == 1 and info.fmt == "float32":
                self.vec[name] = dequantize_records(rec, "float32", info.m)[0].copy()
            else:
                self.w[name] = QMatrix(rec, info.fmt, info.m, *read_headers(self.fd, info), act8=self.act8)
        for i in range(self.L):  # q, k and v in one product where their records lie side by side
            names = [f"layers.{i}.{n}" for n in "qkv"]
            qkv = QMatrix.concat_outputs([self.w[n] for n in names])
            if qkv is not None:
                self.w[f"layers.{i}.qkv"] = qkv
                for n in names:
                    del self.w[n]
        self.head = self.embed_reader = None
        if head == "stream":
            self.head = StreamedHead(self.directory, infos["head"], infos.get("embed"),
                                     {n: read_headers(self.fd, infos[n]) for n in streamed if n in infos}, io_threads,
                                     act8=self.act8)
        elif stream_embed and "embed" in infos:  # untied: one record per token from the file
            self.embed_reader = EmbeddingReader(self.directory, infos["embed"], read_headers(self.fd, infos["embed"]))
        self.static_bytes = sum(q.nbytes for q in self.w.values()) + sum(v.nbytes for v in self.vec.values()) \
            + (self.head.ram_bytes if self.head else 0) + (self.embed_reader.ram_bytes if self.embed_reader else 0)
        if hasattr(os, "posix_fadvise"):  # the copies are in RAM now: drop the file's cached pages
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # KV cache and RoPE tables, allocated once
        self.K = np.empty((self.L, self.Hkv, self.max_seq, self.hd), np.dtype(kv_dtype))
        self.Vc = np.empty_like(self.K)
        self.K.fill(0)  # touched: resident now, so RSS accounts for it
        self.Vc.fill(0)
        self.kv_bytes = 2 * self.K.nbytes
        self.rope = {t: self._rope(t) for t in {a["rope_theta"], a["rope_local_theta"]} if t}
        self.local = [lt == "sliding_attention" for lt in a["layer_types"]]
        self.window = a["sliding_window"]
        self.scale = np.float32(a["query_scale"])
        self.embed_scale = np.float32(self.d ** 0.5) if self.family == "gemma3" else None
        self._eps, self._gemma = float(a["eps"]), int(self.family == "gemma3")
        self._lib = engine_lib()
        self._blocks()
        self._logits = np.empty(self.V, np.float32)  # the head writes here, in RAM or streamed
        self._head = None if "head" not in self.w else \
            self.w["head"].selector(self._work["idx"], self._work["coef"], self._logits)
        self.mlp = None

    def _rope(self, theta: float):
        inv = 1.0 / (theta ** (np.arange(0, self.hd, 2, dtype=np.int64).astype(np.float32) / self.hd))
        f = np.arange(self.max_seq, dtype=np.float32)[:, None] * inv[None, :].astype(np.float32)
        emb = np.concatenate([f, f], axis=1)
        return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)

    def close(self) -> None:
        for reader in (self.head, self.embed_reader):
            if reader is not None:
                reader.close()
        os.close(self.fd)

    @property
    def streamed_bytes(self) -> int:
        """Bytes a streamed head and embedding have read from the file so far."""
        return sum(r.disk_bytes for r in (self.head, self.embed_reader) if r is not None)

    def mlp_stride(self, kind: str) -> int:
        """Bytes of one MLP record of hook kind "in" or "out"."""
        return self.manifest["tensor_info"][f"layers.0.mlp_{kind}"].stride

    def arch_shape(self) -> ModelShape:
        """The simulator's shape of this model."""
        a = self.arch
        return ModelShape(self.L, self.d, self.D, self.V, self.H, self.Hkv, a["tied"])

    # ------------------------------------------------------------------ pieces
    def glu(self, gu: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out = act(gate) * up of the MLP's [gate | up] product (float32, contiguous)."""
        if self._lib.ds_glu(gu.ctypes.data, out.size, self.act_code, out.ctypes.data) != 0:
            raise ValueError("ds_glu failed")
        return out

    def norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """RMS norm of a vector (native: one call instead of a handful of numpy steps)."""
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty_like(x)
        if self._lib.ds_rmsnorm(x.ctypes.data, x.size, w.ctypes.data, self._eps, self._gemma, out.ctypes.data) != 0:
            raise ValueError("ds_rmsnorm failed")
        return out

    def embed(self, tok: int) -> np.ndarray:
        if self.head is not None or self.embed_reader is not None:
            x = (self.head or self.embed_reader).lookup(tok)
        elif "embed" in self.w:
            e = self.w["embed"]
            x = dequantize_records(e.rec[tok:tok + 1], e.fmt, e.m, e.hd, e.hm, e.gi, first=tok)[0]
        else:  # tied: column `tok` of the head's records
            x = self.w["head"].column(tok)
        return x * self.embed_scale if self.embed_scale is not None else x.copy()

    def _blocks(self) -> None:
        """The native attention blocks' arguments, one structure per layer (see engine.blocks)."""
        nq, nk = self.H * self.hd, self.Hkv * self.hd
        wide = max(self.d, nq)
        self._work = {"h": np.empty(self.d, np.float32), "qkv": np.empty(nq + 2 * nk, np.float32),
                      "att": np.empty(nq, np.float32), "o": np.empty(wide, np.float32),
                      "idx": np.empty(wide + 1, np.int64), "coef": np.empty(wide + 1, np.float32)}
        self.ctx = blocks.DsCtx(self.d, self.H, self.Hkv, self.hd, self.max_seq, self._eps, float(self.scale),
                                self._gemma, int(self.K.dtype == np.float16), self.nthreads, self.act_code,
                                *(blocks.ptr(self._work[n]) for n in ("h", "qkv", "att", "o", "idx", "coef")))
        self.attn = []
        for i in range(self.L):
            p, vec = f"layers.{i}.", self.vec.get
            mats = [self.w[p + "qkv"]] if p + "qkv" in self.w else [self.w[p + n] for n in "qkv"]
            qkv = (blocks.DsMat * 3)(*(blocks.mat(q) for q in mats))
            theta = self.arch["rope_local_theta"] if self.local[i] and self.arch["rope_local_theta"] else \
                self.arch["rope_theta"]
            cos, sin = self.rope[theta]
            self.attn.append(blocks.DsAttn(
                qkv, blocks.mat(self.w[p + "o"]),
                *(blocks.ptr(vec(p + n)) for n in ("attn_norm", "post_attn_norm", "q_bias", "k_bias", "v_bias",
                                                   "q_norm", "k_norm")),
                blocks.ptr(cos), blocks.ptr(sin), blocks.ptr(self.K[i]), blocks.ptr(self.Vc[i]),
                self.window if self.local[i] and self.window else 0))
        self._ctx_ref = ctypes.byref(self.ctx)
        self._attn_ref = [ctypes.byref(a) for a in self.attn]

    def attention_block(self, i: int, x: np.ndarray, pos: int) -> None:
        """x += layer i's attention of the token at `pos` (post-normed where the family does),
        in one native call; the token's k and v enter the cache."""
        if self._lib.ds_attention_block(self._ctx_ref, self._attn_ref[i], x.ctypes.data, pos) != 0:
            raise MemoryError("native attention block failed")

    # ------------------------------------------------------------------ one token
    def forward(self, tok: int, pos: int) -> np.ndarray:
        """Logits (vocab,) of the next token after `tok` at position `pos` (KV cache updated)."""
        if pos >= self.max_seq:
            raise DipstreamError(f"position {pos} is past the KV cache of {self.max_seq} tokens")
        x = np.ascontiguousarray(self.embed(int(tok)), np.float32)  # a fresh array: the blocks add into it
        for i in range(self.L):
            self.attention_block(i, x, pos)
            self.mlp.block(i, x)
        xn = self.norm(x, self.vec["final_norm"])
        if self.head is not None:
            return self.head.logits(xn, self._logits, self.nthreads).copy()
        self._head(xn, self.d, self.nthreads)  # k = every record: the dense product
        return self._logits.copy()

    def new_sequence(self) -> None:
        if self.mlp is not None:
            self.mlp.new_sequence()
