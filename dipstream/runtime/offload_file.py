"""The MLP weights of a model in one file on disk, in the bundled layout, read with direct I/O.

Layout (``mlp.bin``, float32, little-endian), per layer l:

* ``in`` region: d records, record j = ``[W_gate[:, j] | W_up[:, j]]`` (2D floats): everything an
  input index selects;
* ``out`` region: D records, record i = ``W_down[:, i]`` (d floats): everything a hidden index
  selects.

Records are padded to a multiple of ``align`` bytes (512: the logical block size direct reads
need on common devices) and regions start at multiples of 4096, so a run of consecutive units is
one aligned read.  ``mlp.json`` (the manifest) holds the shapes, offsets, file size, a sha256 of
the file and a fingerprint of the source weights; :func:`open_offload` checks size and checksum
before use.  Both files are written atomically.

Reads (:meth:`BundledFile.read_runs`) are positioned reads of whole runs of units into an aligned
buffer, issued ``io_threads`` at a time by the native library (or Python threads), through a
file descriptor opened with ``O_DIRECT`` so that they come from the disk, not the OS page cache.
Where direct I/O is not available (other OS, a filesystem such as tmpfs that refuses it) the
file is read through the page cache after one warning saying so.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dipstream.errors import DipstreamError
from dipstream.io import atomic_path, clean_temps, folder_lock, write_json_atomic
from dipstream.kernels import native as _native

__all__ = ["Layout", "BundledFile", "ExtentReader", "open_direct", "open_for_reads",
           "write_offload",
           "open_offload", "ensure_offload", "read_manifest", "aligned_bytes", "fingerprint",
           "FORMAT", "DATA_NAME", "MANIFEST_NAME"]

FORMAT = "dipstream-offload/1"
DATA_NAME, MANIFEST_NAME = "mlp.bin", "mlp.json"
RECORD_ALIGN = 512
REGION_ALIGN = 4096
_CHUNK = 8 << 20


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    """Offsets of the bundled layout for (n_layers, d, D) float32 weights."""

    n_layers: int
    d: int
    D: int
    align: int = RECORD_ALIGN

    @property
    def in_unit_bytes(self) -> int:
        return 2 * self.D * 4

    @property
    def out_unit_bytes(self) -> int:
        return self.d * 4

    @property
    def in_stride(self) -> int:
        return _round_up(self.in_unit_bytes, self.align)

    @property
    def out_stride(self) -> int:
        return _round_up(self.out_unit_bytes, self.align)

    @property
    def layer_bytes(self) -> int:
        return _round_up(self.d * self.in_stride, REGION_ALIGN) + \
            _round_up(self.D * self.out_stride, REGION_ALIGN)

    def in_offset(self, layer: int) -> int:
        return layer * self.layer_bytes

    def out_offset(self, layer: int) -> int:
        return layer * self.layer_bytes + _round_up(self.d * self.in_stride, REGION_ALIGN)

    @property
    def size(self) -> int:
        return self.n_layers * self.layer_bytes

    @property
    def mlp_bytes(self) -> int:
        """Bytes of MLP weights (no padding): 3 d D float32 per layer."""
        return self.n_layers * 3 * self.d * self.D * 4

    def hook(self, kind: str):
        """(n_units, unit_bytes, stride) of a hook kind ('in' or 'out')."""
        if kind == "in":
            return self.d, self.in_unit_bytes, self.in_stride
        return self.D, self.out_unit_bytes, self.out_stride

    def offset(self, kind: str, layer: int) -> int:
        return self.in_offset(layer) if kind == "in" else self.out_offset(layer)


def aligned_bytes(n: int, align: int = REGION_ALIGN) -> torch.Tensor:
    """An uninitialised uint8 tensor of n bytes whose data pointer is ``align``-aligned."""
    buf = torch.empty(n + align, dtype=torch.uint8)
    off = (-buf.data_ptr()) % align
    return buf[off:off + n]


def fingerprint(parts) -> str:
    """sha256 (16 hex digits) of the first and last layers' MLP weights: ties a file to its model."""
    h = hashlib.sha256()
    for p in (parts[0], parts[-1]):
        for w in (p.gate_weight, p.up_weight, p.down_weight):
            h.update(w.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _layer_records(p, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(in region, out region) bytes of one layer (records padded to their stride)."""
    D, d = lay.D, lay.d
    rin = np.zeros((d, lay.in_stride // 4), np.float32)
    rin[:, :D] = p.gate_weight.detach().to(torch.float32).t().numpy()
    rin[:, D:2 * D] = p.up_weight.detach().to(torch.float32).t().numpy()
    rout = np.zeros((D, lay.out_stride // 4), np.float32)
    rout[:, :d] = p.down_weight.detach().to(torch.float32).t().numpy()
    return rin, rout


def write_offload(directory, parts, model: str, fingerprint_: str | None = None) -> dict:
    """Write the MLP weights of ``parts`` (``mlp_parts(model)``) to ``directory`` in the bundled
    layout, atomically; returns the manifest.  ``fingerprint_``: ``fingerprint(parts)`` if the
    caller has it already."""
    for p in parts:
        if p.gate_bias is not None or p.up_bias is not None or p.down_bias is not None:
            raise DipstreamError("offloading needs bias-free MLP projections")
    d, D = parts[0].d_model, parts[0].d_ff
    lay = Layout(len(parts), d, D)
    directory = Path(directory)
    digest = hashlib.sha256()
    with atomic_path(directory / DATA_NAME) as tmp, open(tmp, "wb") as fh:
        for i, p in enumerate(parts):
            rin, rout = _layer_records(p, lay)
            for region, off in ((rin, lay.in_offset(i)), (rout, lay.out_offset(i))):
                pad = off - fh.tell()
                if pad:
                    fh.write(bytes(pad))
                    digest.update(bytes(pad))
                b = region.tobytes()
                fh.write(b)
                digest.update(b)
        pad = lay.size - fh.tell()
        fh.write(bytes(pad))
        digest.update(bytes(pad))
    drop_page_cache(directory / DATA_NAME)
    manifest = {"format": FORMAT, "model": model,
                "fingerprint": fingerprint_ or fingerprint(parts),
                "n_layers": lay.n_layers, "d": d, "D": D, "dtype": "float32",
                "record_align": lay.align, "region_align": REGION_ALIGN,
                "in_stride": lay.in_stride, "out_stride": lay.out_stride,
                "layer_bytes": lay.layer_bytes, "size": lay.size, "sha256": digest.hexdigest()}
    write_json_atomic(directory / MANIFEST_NAME, manifest)
    return manifest


def drop_page_cache(path: Path) -> None:
    """Ask the OS to forget the file's cached pages (best effort)."""
    if hasattr(os, "posix_fadvise"):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except OSError:
            pass


def open_direct(path, align: int = REGION_ALIGN) -> int | None:
    """A file descriptor with O_DIRECT that passed an aligned trial read, or None."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None
    try:
        buf = aligned_bytes(align)
        mv = memoryview(buf.numpy())
        if os.preadv(fd, [mv], align) != align:
            raise OSError("short read")
        return fd
    except OSError:
        os.close(fd)
        return None


def open_for_reads(path, direct: bool, align: int = REGION_ALIGN) -> tuple[int, bool]:
    """(fd, is_direct): ``path`` opened with O_DIRECT when ``direct`` and the filesystem allows
    it; else through the page cache, after one RuntimeWarning if direct I/O was asked for."""
    fd = open_direct(path, align) if direct else None
    if fd is not None:
        return fd, True
    if direct:
        warnings.warn(f"direct I/O (O_DIRECT) is not supported for {path}; reading through the "
                      "OS page cache, so measured speeds include the page cache, not just the "
                      "disk", RuntimeWarning, stacklevel=3)
    return os.open(path, os.O_RDONLY), False


class ExtentReader:
    """Positioned reads of (offset, length) extents of one file into a buffer, ``io_threads``
    in flight (native ``ds_pread_batch``, or Python threads without the native library)."""

    def __init__(self, fd: int, io_threads: int = 8, label: str = "file"):
        self.fd, self.io_threads, self.label = fd, max(1, int(io_threads)), label
        self._pool = None
        self.reads = 0
        self.bytes_read = 0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def read_extents(self, offsets, lengths, dst_addrs, buf: torch.Tensor) -> None:
        """Read extents (file offset, length) to absolute addresses inside ``buf``."""
        n = len(offsets)
        if n == 0:
            return
        off = np.ascontiguousarray(offsets, np.int64)
        ln = np.ascontiguousarray(lengths, np.int64)
        dst = np.ascontiguousarray(dst_addrs, np.int64)
        lib = _native.load()
        if lib is not None:
            rc = lib.ds_pread_batch(self.fd, n, off.ctypes.data, ln.ctypes.data, dst.ctypes.data,
                                    self.io_threads)
            if rc != 0:
                raise DipstreamError(f"reading {self.label} failed: {os.strerror(rc)}")
        else:
            self._read_python(off, ln, dst, buf)
        self.reads += n
        self.bytes_read += int(ln.sum())

    def _read_python(self, off, ln, dst, buf: torch.Tensor) -> None:
        base = buf.data_ptr()
        mv = memoryview(buf.numpy())

        def one(i):
            a = int(dst[i]) - base
            view, pos, want = mv[a:a + int(ln[i])], int(off[i]), int(ln[i])
            while want:
                got = os.preadv(self.fd, [view], pos)
                if got <= 0:
                    raise DipstreamError(f"reading {self.label} failed: unexpected end of file "
                                         f"at byte {pos}")
                view, pos, want = view[got:], pos + got, want - got
        if self.io_threads == 1 or len(off) == 1:
            for i in range(len(off)):
                one(i)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.io_threads)
        list(self._pool.map(one, range(len(off))))


class PendingRead:
    """Reads in flight from ``BundledFile.submit_runs``."""

    def __init__(self, lib, n: int, t0, label: str, keep=None):
        self.lib, self.n, self.t0, self.label, self._keep = lib, n, t0, label, keep
        self._done = lib is None

    def result(self) -> tuple[int, float]:
        """Wait; (reads, seconds from submission until the last read finished)."""
        if self._done:
            return self.n, self.t0
        end = ctypes.c_int64(0)
        rc = self.lib.ds_pread_wait(ctypes.byref(end))
        self._done, self._keep = True, None
        if rc != 0:
            raise DipstreamError(f"reading {self.label} failed: {os.strerror(rc)}")
        self.t0 = max(0.0, (end.value - self.t0) / 1e9)
        return self.n, self.t0


class BundledFile(ExtentReader):
    """An open, verified offload file: positioned reads of unit runs into aligned buffers."""

    def __init__(self, directory, manifest: dict, fd: int, direct: bool, io_threads: int):
        super().__init__(fd, io_threads, str(Path(directory) / DATA_NAME))
        self.directory, self.manifest = Path(directory), manifest
        self.layout = Layout(manifest["n_layers"], manifest["d"], manifest["D"],
                             manifest["record_align"])
        self.direct = direct

    def _extents(self, kind: str, layer: int, units: np.ndarray, buf: torch.Tensor,
                 max_read: int):
        n_units, _, stride = self.layout.hook(kind)
        units = np.asarray(units, np.int64)
        if units.size * stride > buf.numel():
            raise ValueError("read buffer too small")
        starts = np.flatnonzero(np.diff(units, prepend=units[0] - 2) != 1)
        lens = np.diff(np.append(starts, units.size))
        per = max(1, max_read // stride)
        pieces = (lens + per - 1) // per  # long runs are split into reads of <= max_read
        a = np.repeat(starts, pieces) + per * (np.arange(pieces.sum()) -
                                               np.repeat(np.cumsum(pieces) - pieces, pieces))
        b = np.minimum(a + per, np.repeat(starts + lens, pieces))
        base = self.layout.offset(kind, layer)
        return (np.ascontiguousarray(base + units[a] * stride, np.int64),
                np.ascontiguousarray((b - a) * stride, np.int64),
                np.ascontiguousarray(buf.data_ptr() + a * stride, np.int64))

    def read_runs(self, kind: str, layer: int, units: np.ndarray, buf: torch.Tensor,
                  max_read: int = 64 << 20) -> int:
        """Read the records of ``units`` (sorted unit indices of hook ``kind`` of ``layer``) into
        ``buf`` back to back (record r of the list at byte r * stride).  Consecutive units are one
        read (split at ``max_read`` bytes).  Returns the number of reads."""
        if len(units) == 0:
            return 0
        off, ln, dst = self._extents(kind, layer, units, buf, max_read)
        self.read_extents(off, ln, dst, buf)
        return len(off)

    def submit_runs(self, kind: str, layer: int, units: np.ndarray, buf: torch.Tensor,
                    max_read: int = 64 << 20) -> "PendingRead":
        """Start ``read_runs`` on the native library's I/O threads and return at once (the
        caller computes meanwhile); ``.result()`` waits and gives (reads, seconds from the
        submission until the last read finished).  Without the native library the reads happen
        here, synchronously."""
        off, ln, dst = self._extents(kind, layer, units, buf, max_read)
        lib = _native.load()
        t0 = time.monotonic_ns()
        if lib is None or len(off) >= (1 << 20) - 1:
            self.read_extents(off, ln, dst, buf)
            return PendingRead(None, len(off), (time.monotonic_ns() - t0) / 1e9, self.label)
        rc = lib.ds_pread_submit(self.fd, len(off), off.ctypes.data, ln.ctypes.data,
                                 dst.ctypes.data, self.io_threads)
        if rc != 0:
            raise DipstreamError(f"reading {self.label} failed: {os.strerror(rc)}")
        self.reads += len(off)
        self.bytes_read += int(ln.sum())
        return PendingRead(lib, len(off), t0, self.label, keep=(off, ln, dst))

    def read_region(self, kind: str, layer: int, buf: torch.Tensor,
                    max_read: int = 64 << 20) -> int:
        """All units of a hook (the prefill reads every weight once)."""
        return self.read_runs(kind, layer, np.arange(self.layout.hook(kind)[0]), buf, max_read)


def _checksum(fd_direct: int | None, path: Path, size: int) -> str:
    h = hashlib.sha256()
    if fd_direct is not None:
        buf = aligned_bytes(_CHUNK)
        mv = memoryview(buf.numpy())
        pos = 0
        while pos < size:
            want = min(_CHUNK, size - pos)
            got = os.preadv(fd_direct, [mv[:_round_up(want, REGION_ALIGN)]], pos)
            if got <= 0:
                break
            h.update(mv[:min(got, want)])
            pos += min(got, want)
        return h.hexdigest()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    drop_page_cache(path)
    return h.hexdigest()


def read_manifest(directory) -> dict | None:
    p = Path(directory) / MANIFEST_NAME
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise DipstreamError(f"offload manifest {p} is unreadable ({e.__class__.__name__}); "
                             f"delete {Path(directory)} to rebuild it") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DipstreamError(f"{p} is not a {FORMAT} manifest; delete {Path(directory)} to "
                             "rebuild it")
    _check_manifest(m, p, Path(directory))
    return m


_INT_KEYS = ("n_layers", "d", "D", "record_align", "region_align", "in_stride", "out_stride",
             "layer_bytes", "size")


def _check_manifest(m: dict, path: Path, directory: Path) -> None:
    """Every field present, of its type, and describing exactly the layout this version writes
    (alignment, strides, offsets), so a tampered manifest is refused rather than read askew."""
    rebuild = f"delete {directory} and run again to rebuild it from the model"
    for k in _INT_KEYS:
        if not isinstance(m.get(k), int) or isinstance(m.get(k), bool) or m[k] <= 0:
            raise DipstreamError(f"{path} lacks a valid '{k}' (a positive integer); {rebuild}")
    for k in ("model", "fingerprint", "sha256", "dtype"):
        if not isinstance(m.get(k), str):
            raise DipstreamError(f"{path} lacks a valid '{k}'; {rebuild}")
    if m["dtype"] != "float32" or m["record_align"] != RECORD_ALIGN or m["region_align"] != REGION_ALIGN:
        raise DipstreamError(f"{path} describes another layout (dtype {m['dtype']}, record alignment "
                             f"{m['record_align']}, region alignment {m['region_align']}) than this "
                             f"version reads; {rebuild}")
    lay = Layout(m["n_layers"], m["d"], m["D"])
    got = (m["in_stride"], m["out_stride"], m["layer_bytes"], m["size"])
    if got != (lay.in_stride, lay.out_stride, lay.layer_bytes, lay.size):
        raise DipstreamError(f"{path} is inconsistent (strides or sizes do not follow from its shapes); "
                             f"{rebuild}")


def open_offload(directory, *, model: str | None = None, shape: tuple | None = None,
                 fingerprint_: str | None = None, direct: bool = True, io_threads: int = 8,
                 verify: bool = True) -> BundledFile:
    """Open and check an offload directory: manifest, model, shape, size, then sha256.

    ``direct=False`` reads through the page cache on purpose; when direct I/O is asked for but
    the filesystem refuses it, one RuntimeWarning says the numbers will include the page cache.
    """
    directory = Path(directory)
    m = read_manifest(directory)
    if m is None:
        raise DipstreamError(f"{directory} has no {MANIFEST_NAME}: not an offload directory "
                             "(dipstream generate --offload DIR writes one)")
    return _open_checked(directory, m, model, shape, fingerprint_, direct, io_threads, verify)


def _open_checked(directory: Path, m: dict, model, shape, fingerprint_, direct, io_threads,
                  verify) -> BundledFile:
    """open_offload with the manifest ``m`` of ``directory`` in hand."""
    data = directory / DATA_NAME
    rebuild = f"delete {directory} and run again to rebuild it from the model"
    if model is not None and m.get("model") != model:
        raise DipstreamError(f"{directory} holds the MLP of model '{m.get('model')}', not "
                             f"'{model}'; use another --offload directory or {rebuild}")
    if shape is not None and (m["n_layers"], m["d"], m["D"]) != tuple(shape):
        raise DipstreamError(f"{directory} holds MLP shapes (layers, d, D) = "
                             f"{(m['n_layers'], m['d'], m['D'])}, the model has {tuple(shape)}; "
                             f"{rebuild}")
    if fingerprint_ is not None and m.get("fingerprint") != fingerprint_:
        raise DipstreamError(f"{directory} was written from different weights than this "
                             f"model's; {rebuild}")
    lay = Layout(m["n_layers"], m["d"], m["D"], m["record_align"])
    if lay.size != m["size"] or lay.in_stride != m["in_stride"] or lay.out_stride != m["out_stride"]:
        raise DipstreamError(f"{directory / MANIFEST_NAME} is inconsistent; {rebuild}")
    try:
        actual = data.stat().st_size
    except OSError:
        raise DipstreamError(f"{data} is missing; {rebuild}") from None
    if actual != m["size"]:
        raise DipstreamError(f"{data} is truncated or corrupt: {actual} bytes, expected "
                             f"{m['size']}; {rebuild}")
    fd, is_direct = open_for_reads(data, direct, max(lay.align, REGION_ALIGN))
    try:
        if verify and _checksum(fd if is_direct else None, data, m["size"]) != m["sha256"]:
            raise DipstreamError(f"{data} is corrupt: its sha256 does not match the manifest; "
                                 f"{rebuild}")
    except BaseException:
        os.close(fd)
        raise
    return BundledFile(directory, m, fd, is_direct, io_threads)


def ensure_offload(directory, parts, model: str, *, direct: bool = True, io_threads: int = 8,
                   verify: bool = True) -> tuple[BundledFile, bool]:
    """Open the offload file of ``parts`` in ``directory``, writing it first if the directory
    has none.  Returns (file, whether it was written now)."""

    directory = Path(directory)
    fp = fingerprint(parts)
    with folder_lock(directory, "offload file", wait=True):  # one writer; readers wait for it
        clean_temps(directory, (DATA_NAME, MANIFEST_NAME))  # a write killed half-way
        m = read_manifest(directory)
        written = m is None
        if written:
            if (directory / DATA_NAME).exists():
                raise DipstreamError(f"{directory / DATA_NAME} exists without its manifest; delete "
                                     f"{directory} and run again to rebuild it")
            m = write_offload(directory, parts, model, fp)
    d, D = parts[0].d_model, parts[0].d_ff
    # a file written just now was hashed while writing: no second sha256 pass (size still checked)
    f = _open_checked(directory, m, model, (len(parts), d, D), fp, direct, io_threads,
                      verify and not written)
    return f, written

