"""Where dipstream keeps what it computes once: converted models, calibration thresholds,
compiled kernels, probe files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$DIPSTREAM_CACHE, else the platform's user cache folder ($XDG_CACHE_HOME or ~/.cache on
    Linux, ~/Library/Caches on macOS) / dipstream."""
    env = os.environ.get("DIPSTREAM_CACHE")
    if env:
        return Path(env).expanduser()
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif os.uname().sysname == "Darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dipstream"


SIMD = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "asimd", "sve")  # the flags the kernels use


def cpu() -> tuple[str, list[str]]:
    """(CPU model name, the SIMD flags among SIMD it has), from /proc/cpuinfo where there is one."""
    import platform

    name, flags = platform.processor() or "unknown cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("unknown cpu", platform.processor()):
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                if not line.strip() and flags:
                    break
    except OSError:
        pass
    return name, [f for f in SIMD if f in flags]


def machine() -> str:
    """Where a run ran, for results rows: the CPU model and its SIMD flags, the architecture, the
    CPU count (and the torch version when torch is loaded)."""
    import platform
    import sys

    name, flags = cpu()
    torch = sys.modules.get("torch")
    return (f"{name} ({' '.join(flags) or 'no SIMD flags read'}), {platform.machine()}, {os.cpu_count()} cpus"
            + (f", torch {torch.__version__}" if torch else ""))
