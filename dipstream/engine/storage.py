"""Reads of the model file: the one place that opens it for direct I/O, the one block size reads
are rounded to, aligned buffers, positioned reads (now, or started and waited for) on the native
read pool, the plan that turns a hook's units into reads, and a measurement of the file's reads
(for the probe).

Direct I/O (O_DIRECT) bypasses the OS page cache, so what the engine reports as read from disk
was read from the disk. Offsets and lengths of direct reads are whole ``BLOCK``s (512 bytes, the
logical block of common devices) and buffers are page-aligned. Where a filesystem refuses direct
reads (tmpfs before Linux 6.6, another OS, a 4096-byte-sector device) the file is read through the
page cache after one warning saying so.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np

from dipstream import native
from dipstream.errors import DipstreamError

BLOCK = 512         # direct reads: offsets and lengths in whole blocks
PAGE = 4096         # buffers start on a page
PIECE = 256 << 10   # a long read is split into pieces of this size, several in flight


def aligned_empty(nbytes: int) -> np.ndarray:
    """A page-aligned, zeroed uint8 buffer of `nbytes`. np.zeros maps a large one lazily: its pages
    become resident (and count in RSS) when first written, not now."""
    raw = np.zeros(int(nbytes) + PAGE, np.uint8)
    off = (-raw.ctypes.data) % PAGE
    return raw[off:off + int(nbytes)]


def _open_direct(path) -> int | None:
    """A descriptor opened with O_DIRECT that passed an aligned trial read, or None."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size >= BLOCK:
            buf = aligned_empty(BLOCK)
            if os.preadv(fd, [memoryview(buf)], 0) != BLOCK:
                raise OSError("short read")
        return fd
    except OSError:
        os.close(fd)
        return None


def drop_page_cache(fd: int) -> None:
    """Ask the OS to forget the file's cached pages (best effort): what was copied into RAM is not
    also held by the page cache, and later reads come from the disk."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


class FileReader:
    """Positioned reads of one file: direct where asked and possible (`direct`), else through the
    page cache; `io_threads` reads in flight on the native read pool. Counts its reads."""

    def __init__(self, path, io_threads: int = 4, direct: bool = True):
        self.path, self.io_threads = Path(path), max(1, int(io_threads))
        self.lib = native.require()
        self.fd = os.open(self.path, os.O_RDONLY)  # buffered: headers, single records
        self.dfd = _open_direct(self.path) if direct else None
        self.direct = self.dfd is not None
        if direct and not self.direct:
            warnings.warn(f"direct I/O (O_DIRECT) is not supported for {self.path}; reading through the OS "
                          "page cache, so measured speeds include the page cache, not just the disk",
                          RuntimeWarning, stacklevel=2)
        self.size = os.fstat(self.fd).st_size
        self.bytes_read = 0
        self.reads = 0
        self.wait_s = 0.0
        self._pending = 0

    def close(self) -> None:
        if self._pending:
            self.wait()
        for fd in {self.fd, self.dfd} - {None}:
            os.close(fd)
        self.fd = self.dfd = None  # closed: closing again does nothing

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise DipstreamError(f"reading {self.path} failed: {os.strerror(rc)}")

    def read_into(self, array: np.ndarray, offset: int) -> np.ndarray:
        """Fill `array` (contiguous) from the file at `offset` (buffered; any alignment)."""
        view, done = memoryview(array).cast("B"), 0
        while done < view.nbytes:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise DipstreamError(f"{self.path} ended early; export the model again")
            done += n
        self.bytes_read += view.nbytes
        return array

    @property
    def _rfd(self) -> int:
        """The descriptor bulk reads use (direct where open)."""
        return self.dfd if self.dfd is not None else self.fd

    def read(self, offs: np.ndarray, lens: np.ndarray, dst: np.ndarray, buffered: bool = False) -> None:
        """Read extents (file offset, length) to absolute addresses `dst`, and wait (block-aligned
        offsets and lengths and page-aligned destinations where the reads are direct; `buffered`:
        through the page cache, any alignment, e.g. many small pieces of records)."""
        if not len(offs):
            return
        t0 = time.perf_counter()
        self._check(self.lib.ds_pread_batch(self.fd if buffered else self._rfd, len(offs), offs.ctypes.data,
                                            lens.ctypes.data, dst.ctypes.data, self.io_threads))
        self.wait_s += time.perf_counter() - t0
        self.bytes_read += int(lens.sum())
        self.reads += len(offs)

    def submit(self, offs: np.ndarray, lens: np.ndarray, dst: np.ndarray) -> None:
        """Start `read` on the read pool and return at once (the arrays must live until `wait`)."""
        if not len(offs):
            return
        self._check(self.lib.ds_pread_submit(self._rfd, len(offs), offs.ctypes.data,
                                             lens.ctypes.data, dst.ctypes.data, self.io_threads))
        self._pending = (offs, lens, dst)

    def wait(self) -> int:
        """Finish the submitted reads; returns their bytes (0 when none were in flight)."""
        if not self._pending:
            return 0
        offs, lens, _ = self._pending
        self._pending = 0
        t0 = time.perf_counter()
        self._check(self.lib.ds_pread_wait(None))
        self.wait_s += time.perf_counter() - t0
        n = int(lens.sum())
        self.bytes_read += n
        self.reads += len(offs)
        return n


def block_extents(lo: np.ndarray, hi: np.ndarray, gap: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte ranges [lo, hi) (ascending) rounded out to whole blocks, ranges closer than `gap`
    bytes merged (reading through a gap costs less than another request): (offsets, lengths, the
    extent each range landed in)."""
    lo = lo - lo % BLOCK
    hi = hi + (-hi) % BLOCK
    new = np.ones(lo.size, bool)
    new[1:] = lo[1:] > hi[:-1] + gap
    first = np.flatnonzero(new)
    last = np.append(first[1:], lo.size) - 1
    return lo[first], hi[last] - lo[first], np.cumsum(new) - 1


def read_plan(units: np.ndarray, stride: int, gap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) within a tensor of the reads that fetch the records of `units`
    (ascending) of `stride` bytes: rounded out to whole blocks, requests closer than `gap` merged."""
    if units.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo = units.astype(np.int64) * stride
    offs, lens, _ = block_extents(lo, lo + stride, gap)
    return offs, lens


def covered(offs: np.ndarray, lens: np.ndarray, n: int, stride: int) -> np.ndarray:
    """bool (n,): the records whose bytes lie wholly inside the extents (offs, lens) (sorted, disjoint)."""
    lo = np.arange(n, dtype=np.int64) * stride
    j = np.searchsorted(offs, lo, side="right") - 1
    jj = np.maximum(j, 0)
    return (j >= 0) & (lo + stride <= offs[jj] + lens[jj])


def measure_reads(reader: FileReader, regions: list[tuple[int, int]], sizes: list[int], reads: int,
                  rounds: int = 2, random_regions: list[tuple[int, int]] | None = None, seed: int = 2) -> dict:
    """Reads of the file as the engine reads it: every region (offset, length) whole, one request
    each (``seq_bw``), and random reads of each size in `sizes` inside `random_regions` (default:
    the regions) at one and at ``io_threads`` in flight, in batches of 64 (s per read), as
    `simulator.hardware.fit_flash` takes them."""
    random_regions = random_regions or regions
    rng = np.random.default_rng(seed)
    big = max(max(length for _, length in regions), 64 * (max(sizes) + BLOCK)) + 2 * BLOCK
    buf = aligned_empty(big + (-big) % BLOCK)
    res = {"direct_io": reader.direct, "io_threads": reader.io_threads, "random": {}}

    def timed(offs, lens):
        dst = buf.ctypes.data + np.concatenate([[0], np.cumsum(lens[:-1])]).astype(np.int64)
        t = time.perf_counter()
        reader.read(offs.astype(np.int64), lens.astype(np.int64), dst)
        return time.perf_counter() - t

    t, n = 0.0, 0
    for _ in range(rounds):
        for off, length in regions:
            lo, ln, _ = block_extents(np.array([off], np.int64), np.array([off + length], np.int64))
            ln = np.minimum(ln, reader.size - lo)
            t += timed(lo, ln)
            n += int(ln[0])
    res["seq_bw"] = n / t
    threads = reader.io_threads
    for size in sizes:
        size = size + (-size) % BLOCK
        per = {}
        for q in (1, threads):
            reader.io_threads = q
            count = reads if q > 1 else max(64, reads // 4)
            tt = 0.0
            for a in range(0, count, 64):
                k = min(64, count - a)
                region = random_regions[rng.integers(len(random_regions))]
                span = max(region[1] - size, 1)
                offs = (region[0] + rng.integers(0, span, k)) // BLOCK * BLOCK
                tt += timed(offs.astype(np.int64), np.minimum(size, reader.size - offs).astype(np.int64))
            per[q] = tt / count
        reader.io_threads = threads
        res["random"][size] = {"s_per_read_qd1": per[1], f"s_per_read_qd{threads}": per[threads]}
    return res
