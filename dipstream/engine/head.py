"""The output head (and the embedding) streamed from the model file instead of held in RAM.

A model's head is read whole every token, so caching part of it saves little; what it costs in
RAM is its whole size (SmolLM2's int8 head: 30 MB of a 98 MB model; Gemma 3 270M's: most of it).
Streamed, only its float16 headers and two chunk buffers stay in RAM: each token reads the head's
records one input group (32 records) at a time with direct I/O, the next chunk's read in flight
while this one is multiplied, and looks its embedding up with one small read per record (tied)
or one record (untied). The logits are the same numbers as from RAM (tested)."""

from __future__ import annotations

import numpy as np

from dipstream.engine.modelfile import TensorInfo
from dipstream.engine.plan import head_buffer_bytes, head_chunk_rows, head_span_bytes
from dipstream.engine.qmatrix import QMatrix, dequantize_records
from dipstream.engine.storage import PIECE, FileReader, aligned_empty, block_extents


class EmbeddingReader:
    """An untied embedding read from the model file: one record per token, its headers in RAM
    (an offloaded run keeps a vocabulary-sized table out of its budget for a few kB a token)."""

    def __init__(self, reader: FileReader, info: TensorInfo, headers: tuple):
        self.reader, self.info = reader, info
        self.q = QMatrix(np.zeros((1, info.stride), np.uint8), info.fmt, info.m, *headers, units=info.rows)
        self.ram_bytes = self.q.header_bytes
        self.disk_bytes = 0
        self._rec = np.empty((1, info.stride), np.uint8)

    def lookup(self, tok: int) -> np.ndarray:
        e = self.info
        self.reader.read_into(self._rec, e.offset + tok * e.stride)
        self.disk_bytes += e.stride
        return dequantize_records(self._rec, e.fmt, e.m, self.q.hd, self.q.hm, self.q.gi or 1, first=tok)[0]


class StreamedHead:
    """`logits(x)` = head(x) and `lookup(tok)` = the embedding of tok, reading the file each time."""

    def __init__(self, reader: FileReader, head: TensorInfo, embed: TensorInfo | None, headers: dict,
                 act8: bool = False):
        self.reader, self.info = reader, head
        self.q = QMatrix(np.zeros((1, head.stride), np.uint8), head.fmt, head.m, *headers["head"], units=head.rows,
                         act8=act8)
        self.embed = None if embed is None else EmbeddingReader(reader, embed, headers["embed"])
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
        pos, width = q.column_bytes(tok)
        got = np.zeros((info.rows, 4), np.uint8)  # one small read per record, on the read pool
        fo = info.offset + np.arange(info.rows, dtype=np.int64) * info.stride + pos
        dst = got.ctypes.data + 4 * np.arange(info.rows, dtype=np.int64)
        self.reader.read(fo, np.full(info.rows, width, np.int64), dst, buffered=True)
        self._disk_bytes += info.rows * width
        return q.decode_column(got[:, :width], tok)
