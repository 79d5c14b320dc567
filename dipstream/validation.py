"""Checks run before any long work starts: numbers finite and in range, input files readable and
of the right kind, output paths writable. Each failure is a one-line `DipstreamError` naming the
option and what to give instead. Nothing here creates files or folders."""

from __future__ import annotations

import math
import os
from pathlib import Path

from dipstream.errors import DipstreamError


def flag(name: str) -> str:
    """`--name` of a config field."""
    return "--" + name.replace("_", "-")


def finite(name: str, value, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
    """`value` is a finite number within [lo, hi] (open ends when asked)."""
    if value is None and optional:
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DipstreamError(f"{flag(name)} {value!r} is not a number") from None
    if not math.isfinite(v):
        raise DipstreamError(f"{flag(name)} {value} is not a finite number; give a real value")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise DipstreamError(f"{flag(name)} {value} must be {'>' if lo_open else '>='} {lo:g}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise DipstreamError(f"{flag(name)} {value} must be {'<' if hi_open else '<='} {hi:g}")


def at_least(name: str, value, lo: int, optional: bool = False) -> None:
    """An integer option is at least `lo`."""
    if value is None and optional:
        return
    if int(value) < lo:
        raise DipstreamError(f"{flag(name)} {value} must be at least {lo}")


def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def output_file(name: str, path) -> None:
    """`path` can be written as a file: not a folder, and its folder exists (or can be made)
    and is writable."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise DipstreamError(f"{flag(name)} {p} is a folder; give a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise DipstreamError(f"{flag(name)} {p} is not writable; give another path")
    base = _first_existing(p.parent)
    if not base.is_dir():
        raise DipstreamError(f"{flag(name)} {p}: {base} is not a folder; give a path in a writable folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise DipstreamError(f"{flag(name)} {p}: cannot write in {base}; give a path in a writable folder")


def output_dir(name: str, path) -> None:
    """`path` is (or can be made) a writable folder."""
    if path is None:
        return
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise DipstreamError(f"{flag(name)} {p} is a file, not a folder; give a folder")
    base = _first_existing(p)
    if not base.is_dir():
        raise DipstreamError(f"{flag(name)} {p}: {base} is not a folder; give a path in a writable folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise DipstreamError(f"{flag(name)} {p}: cannot write in {base}; give a writable folder")


def input_file(name: str, path, what: str = "file") -> Path | None:
    """`path` is an existing, readable regular file."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise DipstreamError(f"{flag(name)} {p} does not exist; give an existing {what}")
    if not p.is_file():
        raise DipstreamError(f"{flag(name)} {p} is not a file; give a {what}")
    if not os.access(p, os.R_OK):
        raise DipstreamError(f"{flag(name)} {p} is not readable")
    return p


def input_dir(name: str, path, what: str = "folder") -> Path | None:
    """`path` is an existing, readable folder."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DipstreamError(f"{flag(name)} {p} is not an existing folder; give a {what}")
    if not os.access(p, os.R_OK | os.X_OK):
        raise DipstreamError(f"{flag(name)} {p} is not readable")
    return p


def private_dir(path) -> Path:
    """Create `path` (and its parents) readable and writable by this user only, and check that an
    existing one is owned by this user and not writable by others (a shared cache folder could
    be made to hold someone else's files, e.g. a compiled kernel). Returns the path."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = p.stat()
    except OSError as exc:
        raise DipstreamError(f"cannot make the cache folder {p} ({exc.strerror}); set DIPSTREAM_CACHE to a "
                             "writable folder of your own") from None
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise DipstreamError(f"cache folder {p} is owned by another user or writable by others; "
                             "remove it or set DIPSTREAM_CACHE to a folder of your own")
    return p
