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


def machine() -> str:
    """Where a run ran, for results rows (the torch version when torch is loaded)."""
    import platform
    import sys

    torch = sys.modules.get("torch")
    return f"{platform.machine()}, {os.cpu_count()} cpus" + (f", torch {torch.__version__}" if torch else "")
