"""Training checkpoints: one file written atomically, so an interrupted run resumes from the last
finished checkpoint and never from a half-written one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from dipstream.errors import DipstreamError

CHECKPOINT = "checkpoint.pt"


def config_hash(obj: dict) -> str:
    """Short stable hash of a JSON-able description of a run."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(folder: Path, state: dict) -> None:
    """torch.save `state` to folder/checkpoint.pt through a temporary file and an atomic rename."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="tmp-checkpoint-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, folder / CHECKPOINT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(folder: Path, run_key: dict) -> dict | None:
    """The checkpoint in `folder`, or None. A checkpoint of a different run (other model, method,
    density, rank, loss, ...) is a one-line error rather than a silent mix."""
    path = folder / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["run_key"]
    except Exception:  # noqa: BLE001 - unreadable is unreadable
        raise DipstreamError(f"checkpoint '{path}' is unreadable; delete it or pass --restart") from None
    if saved != run_key:
        diff = sorted(k for k in set(saved) | set(run_key) if saved.get(k) != run_key.get(k))
        what = ", ".join(f"{k}: {saved.get(k)} vs {run_key.get(k)}" for k in diff[:3])
        raise DipstreamError(f"'{folder}' holds a checkpoint of a different run ({what}); use another "
                             "--out, or --restart to discard it")
    return state
