"""The output head (and the embedding) streamed from the model file instead of held in RAM.

A model's head is read whole every token, so caching part of it saves little; what it costs in
RAM is its whole size (SmolLM2's int8 head: 30 MB of a 98 MB model; Gemma 3 270M's: most of it).
Streamed, only its float16 headers and two chunk buffers stay in RAM: each token reads the head's
records one input group (32 records) at a time with direct I/O, the next chunk's read in flight
while this one is multiplied, and looks its embedding up with one small read per record (tied)
or one record (untied). The logits are the same numbers as from RAM (tested)."""

from __future__ import annotations

import os
import time

import numpy as np

from dipstream.engine.modelfile import DATA, TensorInfo
from dipstream.engine.qmatrix import QMatrix, dequantize_records, engine_lib, input_group
from dipstream.errors import DipstreamError

BLOCK = 4096        # direct reads: offsets, lengths and buffers in whole blocks
PIECE = 256 << 10   # a chunk is read as pieces of this size, several in flight


def _check(rc: int) -> None:
    if rc != 0:
        raise DipstreamError(f"reading the model file failed: {os.strerror(rc)}")


class EmbeddingReader:
    """An untied embedding read from the model file: one record per token, its headers in RAM
    (an offloaded run keeps a vocabulary-sized table out of its budget for a few kB a token)."""

    def __init__(self, directory, info: TensorInfo, headers: tuple):
        self.info = info
        self.q = QMatrix(np.zeros((1, info.stride), np.uint8), info.fmt, info.m, *headers, units=info.rows)
        self.fd = os.open(os.path.join(directory, DATA), os.O_RDONLY)
        self.ram_bytes = self.q.header_bytes
        self.disk_bytes = 0

    def lookup(self, tok: int) -> np.ndarray:
        e = self.info
        rec = np.empty((1, e.stride), np.uint8)
        if os.preadv(self.fd, [memoryview(rec).cast("B")], e.offset + tok * e.stride) != e.stride:
            raise DipstreamError("the model file ended early; export the model again")
        self.disk_bytes += e.stride
        return dequantize_records(rec, e.fmt, e.m, self.q.hd, self.q.hm, self.q.gi or 1, first=tok)[0]

    def close(self) -> None:
        os.close(self.fd)


class StreamedHead:
    """`logits(x)` = head(x) and `lookup(tok)` = the embedding of tok, reading the file each time."""

    def __init__(self, directory, head: TensorInfo, embed: TensorInfo | None, headers: dict,
                 io_threads: int = 4, direct: bool = True, act8: bool = False):
        lib = engine_lib()
        self.lib, self.io_threads, self.info = lib, int(io_threads), head
        self.q = QMatrix(np.zeros((1, head.stride), np.uint8), head.fmt, head.m, *headers["head"], units=head.rows,
                         act8=act8)
        self.embed = None if embed is None else EmbeddingReader(directory, embed, headers["embed"])
        path = os.path.join(directory, DATA)
        self.fd = os.open(path, os.O_RDONLY)  # buffered: the lookup's small reads
        self.dfd, self.direct = self.fd, False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.dfd, self.direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError:
                pass
        self.rows = self.chunk_rows(head)
        raw = np.empty(self.buffer_bytes(head), np.uint8)
        span = (raw.nbytes - BLOCK) // 2
        raw.fill(0)  # resident now, so the RSS a budget is taken from counts it
        off = (-raw.ctypes.data) % BLOCK
        self.buf = [raw[off:off + span], raw[off + span:off + 2 * span]]
        self.part = np.empty(head.m, np.float32)
        self.ram_bytes = raw.nbytes + self.q.header_bytes + (self.embed.ram_bytes if self.embed else 0)
        self._disk_bytes = 0
        self.io_wait_s = 0.0

    @staticmethod
    def chunk_rows(head: TensorInfo) -> int:
        """Records per chunk: one header group (32 for float32)."""
        return input_group(head.rows) if head.fmt != "float32" else 32

    @staticmethod
    def buffer_bytes(head: TensorInfo) -> int:
        """RAM of the two block-aligned chunk buffers (one being read, one multiplied)."""
        span = StreamedHead.chunk_rows(head) * head.stride + 2 * BLOCK
        return 2 * (span + (-span) % BLOCK) + BLOCK

    @property
    def disk_bytes(self) -> int:
        return self._disk_bytes + (self.embed.disk_bytes if self.embed else 0)

    def close(self) -> None:
        if self.embed is not None:
            self.embed.close()
        if self.dfd != self.fd:
            os.close(self.dfd)
        os.close(self.fd)

    def _extents(self, r0: int, r1: int, buf: np.ndarray):
        """Block-aligned pieces covering records [r0, r1) and where record r0 lands in buf."""
        lo = self.info.offset + r0 * self.info.stride
        hi = self.info.offset + r1 * self.info.stride
        a, b = lo - lo % BLOCK, hi + (-hi) % BLOCK
        fo = np.arange(a, b, PIECE, dtype=np.int64)
        lens = np.minimum(PIECE, b - fo).astype(np.int64)
        dst = buf.ctypes.data + (fo - a)
        return fo, lens, dst, lo - a

    def logits(self, x: np.ndarray, out: np.ndarray, nthreads: int = 1) -> np.ndarray:
        """out = head(x): every chunk read (the next one while this one is multiplied)."""
        n, st = self.info.rows, self.info.stride
        chunks = [(r, min(r + self.rows, n)) for r in range(0, n, self.rows)]
        out[:] = 0
        pending = None
        for c, (r0, r1) in enumerate(chunks):
            buf = self.buf[c % 2]
            if pending is None:  # the first chunk: read now
                fo, lens, dst, skip = self._extents(r0, r1, buf)
                t0 = time.perf_counter()
                _check(self.lib.ds_pread_batch(self.dfd, fo.size, fo.ctypes.data, lens.ctypes.data, dst.ctypes.data,
                                               self.io_threads))
                self.io_wait_s += time.perf_counter() - t0
                self._disk_bytes += int(lens.sum())
            else:
                t0 = time.perf_counter()
                _check(self.lib.ds_pread_wait(None))
                self.io_wait_s += time.perf_counter() - t0
                skip = pending
            pending = None
            if c + 1 < len(chunks):
                fo, lens, dst, nskip = self._extents(*chunks[c + 1], self.buf[(c + 1) % 2])
                _check(self.lib.ds_pread_submit(self.dfd, fo.size, fo.ctypes.data, lens.ctypes.data, dst.ctypes.data,
                                                self.io_threads))
                self._disk_bytes += int(lens.sum())
                pending = nskip
            rec = buf[skip:skip + (r1 - r0) * st].reshape(r1 - r0, st)
            units = np.arange(r0, r1, dtype=np.int64)
            self.q.gather(np.arange(r1 - r0, dtype=np.int64), np.ascontiguousarray(x[r0:r1], np.float32),
                          self.part, nthreads, rec=rec, units=units)
            out += self.part
        return out

    def lookup(self, tok: int) -> np.ndarray:
        """The embedding of `tok`: its record (untied) or output `tok` of every head record (tied)."""
        if self.embed is not None:
            return self.embed.lookup(tok)
        q, info = self.q, self.info
        pos, width = q.column_bytes(tok)
        fo = info.offset + np.arange(info.rows, dtype=np.int64) * info.stride + pos
        lens = np.full(info.rows, width, np.int64)
        got = np.zeros((info.rows, 4), np.uint8)
        dst = got.ctypes.data + 4 * np.arange(info.rows, dtype=np.int64)
        _check(self.lib.ds_pread_batch(self.fd, info.rows, fo.ctypes.data, lens.ctypes.data, dst.ctypes.data,
                                       self.io_threads))
        self._disk_bytes += info.rows * width
        return q.decode_column(got[:, :width], tok)
