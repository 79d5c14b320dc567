"""Small I/O helpers: atomic writes so an interrupted run never leaves a half-written file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from dipstream.errors import DipstreamError


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path beside `path` to write; when the block ends normally the file is
    synced and renamed onto `path` (readable as a normal file would be), otherwise removed.
    `suffix`: for writers that insist on an extension (``.pt``, ``.npz``)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from other users
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path).expanduser()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and an atomic rename."""
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write `obj` as JSON to `path` through a temporary file and an atomic rename."""
    return write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open without following a symbolic link at `path` (one-line error if it is one): what
    dipstream writes stays inside its folder."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DipstreamError(f"{path} is a symbolic link; dipstream does not write through links: remove it "
                                 "or use another folder") from None
        raise


def refuse_links(folder: Path) -> None:
    """A folder dipstream writes in holds no symbolic links (one-line error naming one)."""
    links = sorted(p.name for p in Path(folder).iterdir() if p.is_symlink())
    if links:
        raise DipstreamError(f"{folder} holds symbolic links ({', '.join(links[:3])}); dipstream does not write "
                             "in a folder with links: remove them or use another folder")


@contextmanager
def folder_lock(folder: str | Path, what: str, wait: bool = False):
    """Hold an exclusive lock on `folder` (a `.lock` file in it, created with the folder) for one
    writer at a time; a second writer gets a one-line error instead of interleaving its output
    (or, with `wait`, waits for the first). The lock goes with the process, also when it is
    killed."""
    import fcntl


    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    refuse_links(folder)
    fh = os.fdopen(open_nofollow(folder / ".lock", os.O_RDWR | os.O_CREAT), "r+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise DipstreamError(f"{folder} is in use by {holder}; wait for it to finish or use another "
                             f"folder for this {what}") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"dipstream {what} (pid {os.getpid()})\n")
        fh.flush()
        yield folder
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def clean_temps(folder: str | Path, names=(), patterns=()) -> int:
    """Remove what an interrupted writer left in `folder`: `atomic_path` temporaries of the files
    `names` (`.NAME.*`) and anything matching `patterns` (globs). Call it holding the folder's
    lock, when no other writer can be mid-write. Returns how many were removed."""
    import shutil

    folder = Path(folder)
    n = 0
    for pattern in [f".{name}.*" for name in names] + list(patterns):
        for p in folder.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


def config_hash(obj) -> str:
    """Short stable hash of a JSON-able description of a run (its identity in result tables)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines results file; a line cut short by a crash is skipped (it is re-run)."""
    path = Path(path)
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one finished row as a single line, flushed to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
