"""Unit-frequency profiles: how often each unit of each hook was read over some text, the input
of the `hot` policy (PowerInfer's offline profiling). Written atomically as plain arrays (.npz, no
pickles); made by `experiments.hot_profile` and read by the simulator's and the runtimes' users."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from dipstream.errors import DipstreamError


def save_profile(path: Path, freq: dict, meta: dict) -> None:
    """Write {hook: counts} and its metadata atomically (a killed run leaves no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, __meta__=np.array(json.dumps(meta)), **{f"hook:{k}": v for k, v in freq.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_profile(path: Path) -> tuple[dict, dict]:
    """({hook: counts}, metadata) of a saved profile (no pickles: plain arrays only)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            return {k[5:]: z[k] for k in z.files if k.startswith("hook:")}, meta
    except (OSError, ValueError, KeyError) as exc:
        raise DipstreamError(f"the hot-policy profile {path} is unreadable ({type(exc).__name__}); "
                             "delete it to compute it again") from None
