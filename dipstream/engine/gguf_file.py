"""The GGUF container, read at little memory: its metadata (the values asked for, arrays included)
and its tensors' places, each tensor a view of the file's memory map.

gguf's own `GGUFReader` keeps a numpy view per element of every metadata array (a 150k-token
vocabulary: about 500 MB resident), so the export reads the header here instead: it skips what
it is not asked for, keeps string arrays as Python lists and numeric arrays as numpy arrays, and
checks every length against the file before it reads (a damaged header gives ValueError).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # type -> struct
NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
         7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}
MAX_DIMS = 4


@dataclass
class GGUFTensor:
    """One tensor: `shape` in GGML order (values per row first), its type, where its bytes are."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data_offset: int  # from the start of the file
    n_bytes: int
    data: np.ndarray  # float types: (rows, values) of their dtype; block types: (rows, bytes) uint8


class GGUFRows:
    """A block-type tensor's rows (rows, bytes per row) uint8, read from the file slice by slice
    (`rows[a:b]`: a fresh array) instead of through the memory map: what a pass over a large
    matrix has read does not stay in the process."""

    def __init__(self, path: Path, t: GGUFTensor):
        self.path, self.offset, self.shape = path, t.data_offset, t.data.shape

    def __getitem__(self, s: slice) -> np.ndarray:
        a, b, step = s.indices(self.shape[0])
        if step != 1:
            raise ValueError("rows are read in one contiguous slice")
        out = np.empty((max(b - a, 0), self.shape[1]), np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.offset + a * self.shape[1])
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise ValueError(f"truncated: rows {a}..{b} past the file's end")
        return out


class _Cursor:
    """Little-endian values read from a buffer, every length checked."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ValueError("truncated header")
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self, keep: bool = True) -> str | None:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("truncated header")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace") if keep else None
        self.pos += n
        return s

    def value(self, t: int, keep: bool):
        """A metadata value of type `t` (kept, or skipped and None; a skipped array: its length)."""
        if t in SCALARS:
            return self.take(SCALARS[t])
        if t == STRING:
            return self.string(keep)
        if t != ARRAY:
            raise ValueError(f"metadata value type {t}")
        et, n = self.take("IQ")
        if et in SCALARS:
            size = n * struct.calcsize("<" + SCALARS[et])
            if self.pos + size > len(self.buf):
                raise ValueError("truncated header")
            out = np.frombuffer(self.buf, NUMPY[et], n, self.pos).copy() if keep else n
            self.pos += size
            return out
        if n > (len(self.buf) - self.pos) // 8:  # every element takes 8 bytes at least
            raise ValueError("array length")
        items = [self.value(et, keep) for _ in range(n)]
        return items if keep else n


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_metadata(path: str | Path, keys=None) -> dict:
    """The metadata values of `keys` (a set, or a predicate on a key; None: all of them) of a GGUF;
    the others are skipped unread. OSError / ValueError for a file that is not a readable GGUF."""
    mm = _map(Path(path))
    try:
        return _header(mm, keys)[0]
    finally:
        mm.close()


def _header(buf, keys) -> tuple[dict, _Cursor, int]:
    c = _Cursor(buf)
    if len(buf) < 24 or bytes(buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file")
    c.pos = 4
    version, n_tensors, n_kv = c.take("IQQ")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}")
    out: dict = {}
    for _ in range(n_kv):
        key = c.string()
        keep = keys is None or key == "general.alignment" or (keys(key) if callable(keys) else key in keys)
        v = c.value(c.take("I"), keep)
        if keep:
            out[key] = v
    return out, c, n_tensors


class GGUFFile:
    """An opened GGUF: `meta` (the metadata of `keys`, as `read_metadata`), `tensors`
    {name: GGUFTensor} viewing the file's memory map (`mmap`)."""

    def __init__(self, path: str | Path, keys=None):
        self.path = Path(path)
        self.mmap = _map(self.path)
        self.meta, c, n_tensors = _header(self.mmap, keys)
        align = int(self.meta.get("general.alignment", 32))
        if not 0 < align <= 1 << 16 or align & (align - 1):
            raise ValueError(f"alignment {align}")
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.take("I")
            if not 0 < n_dims <= MAX_DIMS:
                raise ValueError(f"tensor {name}: {n_dims} dimensions")
            dims = tuple(int(c.take("Q")) for _ in range(n_dims))
            qtype, offset = c.take("IQ")
            infos.append((name, dims, GGMLQuantizationType(qtype), offset))
        start = -(-c.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, qtype, offset in infos:
            block, size = GGML_QUANT_SIZES[qtype]
            count = int(np.prod(dims, dtype=np.int64))
            if dims[0] % block or count <= 0:
                raise ValueError(f"tensor {name}: {dims[0]} values per row, not whole blocks of {block}")
            n_bytes, pos = count // block * size, start + int(offset)
            if pos + n_bytes > len(self.mmap):
                raise ValueError(f"truncated: tensor {name} ends at byte {pos + n_bytes}, past the file's end")
            rows = count // dims[0]
            if qtype.name in FLOAT_DTYPES:
                data = np.frombuffer(self.mmap, FLOAT_DTYPES[qtype.name], count, pos).reshape(rows, dims[0])
            else:
                data = np.frombuffer(self.mmap, np.uint8, n_bytes, pos).reshape(rows, n_bytes // rows)
            self.tensors[name] = GGUFTensor(name, dims, qtype, pos, n_bytes, data)

    def close(self) -> None:
        """Unmap the file (its tensors' views go with it)."""
        self.tensors = {}
        try:
            self.mmap.close()
        except BufferError:  # a view of it still held elsewhere: it goes with that view
            pass

    def rows(self, name: str) -> GGUFRows:
        return GGUFRows(self.path, self.tensors[name])

    def release(self, names) -> None:
        """Drop these tensors' pages from this process (each read once: the resident set stays a
        tensor, not the file)."""
        page = mmap.PAGESIZE
        for n in names:
            t = self.tensors[n]
            a = t.data_offset // page * page
            try:
                self.mmap.madvise(mmap.MADV_DONTNEED, a, t.data_offset + t.n_bytes - a)
            except (OSError, ValueError, AttributeError):
                return
