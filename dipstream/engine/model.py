"""The engine's model: one token at a time, numpy and the native kernels, a preallocated KV cache,
no Hugging Face module dispatch (and no torch). Every family of the architecture table with a
decoder block (Llama, Mistral, Qwen2, Qwen3, SmolLM3, Phi-3, Gemma, Gemma 2, Gemma 3), as its
`DecoderSpec` says: (1 + w) norms and scaled embeddings (Gemma), sandwich norms (Gemma 2 / 3),
attention biases and q/k norms where the checkpoint has them, sliding windows and RoPE tables per
layer (partial rotary, NoPE layers), attention and final logit soft-capping (Gemma 2). The MLP of
each block is a pluggable backend (in RAM, or offloaded to the model file).

Verified token for token against each family's own Hugging Face forward in float32
(tests/test_engine.py).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from dipstream import native
from dipstream.engine.modelfile import (
    DATA,
    TensorInfo,
    family_block,
    is_mlp_tensor,
    verify_tensors,
)
from dipstream.engine.qmatrix import QMatrix, dequantize_records, weight_format
from dipstream.engine.plan import head_buffer_bytes, head_chunk_rows, head_span_bytes
from dipstream.engine.storage import PIECE, FileReader, aligned_empty, block_extents, drop_page_cache
from dipstream.errors import DipstreamError
from dipstream.names import layer_key
from dipstream.simulator.model_shape import ModelShape


# ------------------------------------------------------------------ the head, streamed
# A model's head is read whole every token, so caching part of it saves little; what it costs in RAM
# is its whole size (SmolLM2's int8 head: 30 MB of a 98 MB model; Gemma 3 270M's: most of it).
# Streamed, only its float16 headers and two chunk buffers stay in RAM: each token reads the head's
# records one input group (32 records) at a time with direct I/O, the next chunk's read in flight
# while this one is multiplied, and looks its embedding up with one small read per record (tied) or
# one record (untied). The logits are the same numbers as from RAM (tested).

class EmbeddingReader:
    """An untied embedding read from the model file: one record per token, its headers in RAM
    (an offloaded run keeps a vocabulary-sized table out of its budget for a few kB a token)."""

    def __init__(self, reader: FileReader, info: TensorInfo, q: QMatrix):
        self.reader, self.info, self.q = reader, info, q  # q: its headers (`LeanModel.headers_only`; None: GGUF rows)
        self.ram_bytes = self.q.header_bytes if q is not None else 0
        self.disk_bytes = 0
        self._rec = np.empty((1, info.stride), np.uint8)

    def lookup(self, tok: int) -> np.ndarray:
        e, q = self.info, self.q
        self.reader.read_into(self._rec, e.offset + tok * e.stride)
        self.disk_bytes += e.stride
        if q is None:
            return dequantize_records(self._rec, e.fmt, e.m)[0]
        return dequantize_records(self._rec, e.fmt, e.m, q.hd, q.hm, q.gi or 1, first=tok)[0]


class StreamedHead:
    """`logits(x)` = head(x) and `lookup(tok)` = the embedding of tok, reading the file each time."""

    def __init__(self, reader: FileReader, head: TensorInfo, q: QMatrix, embed: EmbeddingReader | None = None):
        self.reader, self.info, self.q = reader, head, q  # q: the head's headers (`LeanModel.headers_only`)
        self.embed = embed  # an untied embedding's reader (tied: lookups read columns of the head)
        self.rows = head_chunk_rows(head)
        raw = aligned_empty(head_buffer_bytes(head))
        span = head_span_bytes(head)  # a multiple of BLOCK: both buffers start block-aligned
        self.buf = [raw[:span], raw[span:]]
        self.part = np.empty(head.m, np.float32)
        self.ram_bytes = raw.nbytes + self.q.header_bytes + (self.embed.ram_bytes if self.embed else 0)
        self._disk_bytes = 0

    @property
    def disk_bytes(self) -> int:
        """Bytes this head (and its embedding) read from the file."""
        return self._disk_bytes + (self.embed.disk_bytes if self.embed else 0)

    def _extents(self, r0: int, r1: int, buf: np.ndarray):
        """Block-aligned pieces covering records [r0, r1), their destinations in buf, and where
        record r0 lands there."""
        lo = self.info.offset + r0 * self.info.stride
        hi = self.info.offset + r1 * self.info.stride
        a, length, _ = block_extents(np.array([lo], np.int64), np.array([hi], np.int64))
        fo = np.arange(a[0], a[0] + length[0], PIECE, dtype=np.int64)
        lens = np.minimum(PIECE, a[0] + length[0] - fo).astype(np.int64)
        return fo, lens, buf.ctypes.data + (fo - a[0]), int(lo - a[0])

    def logits(self, x: np.ndarray, out: np.ndarray, nthreads: int = 1) -> np.ndarray:
        """out = head(x): every chunk read (the next one while this one is multiplied)."""
        n, st = self.info.rows, self.info.stride
        chunks = [(r, min(r + self.rows, n)) for r in range(0, n, self.rows)]
        out[:] = 0
        fo, lens, dst, skip = self._extents(*chunks[0], self.buf[0])
        nskip = skip
        self.reader.read(fo, lens, dst)
        self._disk_bytes += int(lens.sum())
        for c, (r0, r1) in enumerate(chunks):
            buf = self.buf[c % 2]
            if c > 0:
                self._disk_bytes += self.reader.wait()
                skip = nskip
            if c + 1 < len(chunks):
                fo, lens, dst, nskip = self._extents(*chunks[c + 1], self.buf[(c + 1) % 2])
                self.reader.submit(fo, lens, dst)
            rec = buf[skip:skip + (r1 - r0) * st].reshape(r1 - r0, st)
            self.q.gather(np.arange(r1 - r0, dtype=np.int64), np.ascontiguousarray(x[r0:r1], np.float32),
                          self.part, nthreads, rec=rec, units=np.arange(r0, r1, dtype=np.int64))
            out += self.part
        return out

    def lookup(self, tok: int) -> np.ndarray:
        """The embedding of `tok`: its record (untied) or output `tok` of every head record (tied)."""
        if self.embed is not None:
            return self.embed.lookup(tok)
        q, info = self.q, self.info
        spans = q.column_bytes(tok)
        got = np.zeros((info.rows, 4 * len(spans)), np.uint8)  # small reads per record, on the read pool
        base = info.offset + np.arange(info.rows, dtype=np.int64) * info.stride
        dst = got.ctypes.data + got.shape[1] * np.arange(info.rows, dtype=np.int64)
        for s, (pos, width) in enumerate(spans):
            self.reader.read(base + pos, np.full(info.rows, width, np.int64), dst + 4 * s, buffered=True)
            self._disk_bytes += info.rows * width
        return q.decode_column(np.concatenate([got[:, 4 * s:4 * s + w] for s, (_, w) in enumerate(spans)], axis=1),
                               tok)


class LeanModel:
    """A model file's static weights in RAM, its KV cache, and `forward(token, pos) -> logits`;
    a decoder (`engine.decode`): `reset`, `prefill`, `step`.

    `mlp`: an object with ``block(layer, x (d,))`` (x += the MLP of norm(x)) and ``new_sequence()`` (see
    :mod:`dipstream.engine.mlp`); set after construction (it may need this model's file)."""

    def __init__(self, directory, manifest: dict, max_seq: int, nthreads: int = 1, kv_dtype: str = "float32",
                 head: str = "ram", activations: str = "float32", stream_embed: bool = False,
                 io_threads: int = 4, verify: str = "auto"):
        self.directory, self.manifest = Path(directory), manifest
        a = self.arch = manifest["arch"]
        self.block_spec = family_block(a)
        self.shape = ModelShape.from_dict(a["shape"])
        s = self.shape
        self.L, self.d, self.D, self.V = s.n_layers, s.d_model, s.d_ff, s.vocab
        self.H, self.Hkv, self.hd = s.n_heads, s.n_kv_heads, s.head_dim
        self.act_code = native.ACTIVATION_CODES[a["act"]]
        self.nthreads, self.max_seq = int(nthreads), int(max_seq)
        self._check_length(self.max_seq)
        self.act8 = activations == "int8"
        self.reader = FileReader(self.directory / DATA, io_threads)
        self.verified = verify_tensors(self.directory, self.reader, manifest, verify)
        infos = manifest["tensor_info"]
        self.w: dict[str, QMatrix] = {}
        self.vec: dict[str, np.ndarray] = {}
        self.embed_rows: np.ndarray | None = None
        streamed = ("head", "embed") if head == "stream" else ("embed",) if stream_embed else ()
        for name, info in infos.items():
            if is_mlp_tensor(name) or name in streamed:
                continue  # the MLP backend (and a streamed head) reads these
            if info.rows == 1 and info.fmt == "float32":
                self.vec[name] = dequantize_records(self.load(info).rec, "float32", info.m)[0].copy()
            elif weight_format(info.fmt).rows:  # an untied embedding in its GGUF rows: looked up, not multiplied
                self.embed_rows = self.reader.read_into(np.empty((info.rows, info.stride), np.uint8), info.offset)
            else:
                self.w[name] = self.load(info)
        for i in range(self.L):  # q, k and v in one product where their records lie side by side
            names = [layer_key(i, n) for n in "qkv"]
            qkv = QMatrix.concat_outputs([self.w[n] for n in names])
            if qkv is not None:
                self.w[layer_key(i, "qkv")] = qkv
                for n in names:
                    del self.w[n]
        embed = None  # untied and streamed: one record per token from the file
        if "embed" in streamed and "embed" in infos:
            embed = EmbeddingReader(self.reader, infos["embed"], self.headers_only(infos["embed"]))
        self.head = None if head != "stream" else \
            StreamedHead(self.reader, infos["head"], self.headers_only(infos["head"]), embed)
        self.embed_reader = None if self.head else embed  # a streamed head looks embeddings up itself
        self.static_bytes = sum(q.nbytes for q in self.w.values()) + sum(v.nbytes for v in self.vec.values()) \
            + (self.embed_rows.nbytes if self.embed_rows is not None else 0) \
            + (self.head.ram_bytes if self.head else 0) + (self.embed_reader.ram_bytes if self.embed_reader else 0)
        drop_page_cache(self.reader.fd)  # the copies are in RAM now: the file's cached pages can go
        self.K = np.empty((self.L, self.Hkv, self.max_seq, self.hd), np.dtype(kv_dtype))
        self.Vc = np.empty_like(self.K)
        self.K.fill(0)  # touched: resident now, so RSS accounts for it
        self.Vc.fill(0)
        self.kv_bytes = 2 * self.K.nbytes
        self.rope = {name: self._rope(t) for name, t in a["rope"].items()}
        self.embed_scale = np.float32(self.d ** 0.5) if self.block_spec.embed_scale else None
        self.final_softcap = a["final_softcap"]
        self._eps, self._plus_one = float(a["eps"]), int(self.block_spec.norm_plus_one)
        self._lib = native.require()
        self._blocks()
        self._logits = np.empty(self.V, np.float32)  # the head writes here, in RAM or streamed
        self._head = None if "head" not in self.w else \
            self.w["head"].selector(self._work["idx"], self._work["coef"], self._logits)
        self.mlp = None

    def _check_length(self, n: int) -> None:
        a = self.arch
        if n > a["max_positions"]:
            raise DipstreamError(f"{n} tokens exceed the model's context of {a['max_positions']}")
        for name, t in a["rope"].items():
            if t["limit"] is not None and n > t["limit"]:
                raise DipstreamError(f"{n} tokens exceed the {t['limit']} this model's {t['type']} RoPE holds fixed "
                                     "tables for (beyond it transformers switches to other frequencies); give a "
                                     "shorter prompt or fewer --max-new-tokens")

    def headers(self, info: TensorInfo) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The header tables of a quantized tensor: scales (K-quants: their super-block bytes) and
        offsets (None where it has none)."""
        out = [self.reader.read_into(np.empty(shape, dt), off)
               for off, (dt, shape) in zip((info.hd_offset, info.hm_offset), info.header_specs)]
        return tuple(out + [None] * (2 - len(out)))

    def headers_only(self, info: TensorInfo) -> QMatrix | None:
        """A tensor's headers in RAM over a stand-in record (its records are read where used);
        None for GGUF rows (no headers)."""
        if weight_format(info.fmt).rows:
            return None
        return QMatrix(np.zeros((1, info.stride), np.uint8), info.fmt, info.m, *self.headers(info), units=info.rows,
                       act8=self.act8)

    def load(self, info: TensorInfo) -> QMatrix:
        """One tensor's records and headers, read into RAM (not a mapping of the file)."""
        rec = self.reader.read_into(np.empty((info.rows, info.stride), np.uint8), info.offset)
        return QMatrix(rec, info.fmt, info.m, *self.headers(info), act8=self.act8)

    def _rope(self, table: dict):
        """(cos, sin) (max_seq, rot) of a RoPE table, as transformers computes them in float32."""
        inv = np.asarray(table["inv_freq"], np.float32)
        f = np.arange(self.max_seq, dtype=np.float32)[:, None] * inv[None, :]
        emb = np.concatenate([f, f], axis=1)
        scale = np.float32(table["scale"])
        return (np.cos(emb) * scale).astype(np.float32), (np.sin(emb) * scale).astype(np.float32)

    def close(self) -> None:
        if self.mlp is not None:
            self.mlp.close()
        self.reader.close()

    @property
    def streamed_bytes(self) -> int:
        """Bytes a streamed head and embedding have read from the file."""
        return sum(r.disk_bytes for r in (self.head, self.embed_reader) if r is not None)

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
        if self._lib.ds_rmsnorm(x.ctypes.data, x.size, w.ctypes.data, self._eps, self._plus_one, out.ctypes.data) != 0:
            raise ValueError("ds_rmsnorm failed")
        return out

    def embed(self, tok: int) -> np.ndarray:
        if self.head is not None or self.embed_reader is not None:
            x = (self.head or self.embed_reader).lookup(tok)
        elif self.embed_rows is not None:
            x = dequantize_records(self.embed_rows[tok:tok + 1], self.manifest["tensor_info"]["embed"].fmt, self.d)[0]
        elif "embed" in self.w:
            e = self.w["embed"]
            x = dequantize_records(e.rec[tok:tok + 1], e.fmt, e.m, e.hd, e.hm, e.gi, first=tok)[0]
        else:  # tied: column `tok` of the head's records
            x = self.w["head"].column(tok)
        return x * self.embed_scale if self.embed_scale is not None else x.copy()

    def _blocks(self) -> None:
        """The native attention blocks' arguments, one structure per layer (native.DsAttn)."""
        nq, nk = self.H * self.hd, self.Hkv * self.hd
        wide = max(self.d, nq)
        self._work = {"h": np.empty(self.d, np.float32), "qkv": np.empty(nq + 2 * nk, np.float32),
                      "att": np.empty(nq, np.float32), "o": np.empty(wide, np.float32),
                      "idx": np.empty(wide + 1, np.int64), "coef": np.empty(wide + 1, np.float32)}
        self.ctx = native.DsCtx(self.d, self.H, self.Hkv, self.hd, self.max_seq, self._eps,
                                float(self.arch["query_scale"]), self._plus_one, int(self.K.dtype == np.float16),
                                self.nthreads, self.act_code,
                                *(native.ptr(self._work[n]) for n in ("h", "qkv", "att", "o", "idx", "coef")))
        self.attn = []
        softcap = float(self.arch["attn_softcap"] or 0.0)
        for i, layer in enumerate(self.arch["layers"]):
            vec = self.vec.get
            mats = [self.w[layer_key(i, "qkv")]] if layer_key(i, "qkv") in self.w else \
                [self.w[layer_key(i, n)] for n in "qkv"]
            qkv = (native.DsMat * 3)(*(q.native() for q in mats))
            cos, sin = self.rope[layer["rope"]] if layer["rope"] is not None else (None, None)
            self.attn.append(native.DsAttn(
                qkv, self.w[layer_key(i, "o")].native(),
                *(native.ptr(vec(layer_key(i, n))) for n in ("attn_norm", "post_attn_norm", "q_bias", "k_bias",
                                                             "v_bias", "q_norm", "k_norm")),
                native.ptr(cos), native.ptr(sin), native.ptr(self.K[i]), native.ptr(self.Vc[i]),
                int(layer["window"]), 0 if cos is None else cos.shape[1], softcap))
        self._ctx_ref = ctypes.byref(self.ctx)
        self._attn_ref = [ctypes.byref(a) for a in self.attn]

    def attention_block(self, i: int, x: np.ndarray, pos: int) -> None:
        """x += layer i's attention of the token at `pos` (post-normed where the family does),
        in one native call; the token's k and v enter the cache."""
        if self._lib.ds_attention_block(self._ctx_ref, self._attn_ref[i], x.ctypes.data, pos) != 0:
            raise MemoryError("native attention block failed")

    def native_context(self):
        """The native blocks' shared context (for the MLP backend's one-call blocks)."""
        return self._ctx_ref

    # ------------------------------------------------------------------ one token
    def forward(self, tok: int, pos: int) -> np.ndarray:
        """Logits (vocab,) of the next token after `tok` at position `pos` (KV cache updated)."""
        if pos >= self.max_seq:
            raise DipstreamError(f"position {pos} is past the KV cache of {self.max_seq} tokens")
        if not 0 <= tok < self.V:
            raise DipstreamError(f"token id {tok} is outside the model's vocabulary of {self.V}; the tokenizer and the "
                                 "model file do not match: export the model again")
        x = np.ascontiguousarray(self.embed(int(tok)), np.float32)  # a fresh array: the blocks add into it
        for i in range(self.L):
            self.attention_block(i, x, pos)
            self.mlp.block(i, x)
        xn = self.norm(x, self.vec["final_norm"])
        if self.head is not None:
            logits = self.head.logits(xn, self._logits, self.nthreads).copy()
        else:
            self._head(xn, self.d, self.nthreads)  # k = every record: the dense product
            logits = self._logits.copy()
        if self.final_softcap:
            c = np.float32(self.final_softcap)
            logits = np.tanh(logits / c) * c
        return logits

    # ------------------------------------------------------------------ the decoder interface
    def reset(self) -> None:
        if self.mlp is not None:
            self.mlp.new_sequence()

    def prefill(self, ids) -> np.ndarray:
        """The prompt, token by token through the same path; the logits after its last token."""
        logits = None
        for pos, tok in enumerate(ids):
            logits = self.forward(tok, pos)
        return logits

    def step(self, tok: int, pos: int) -> np.ndarray:
        return self.forward(tok, pos)
