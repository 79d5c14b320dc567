"""Training checkpoints: one file written atomically, so an interrupted run resumes from the last
finished checkpoint and never from a half-written one. Read back as data only
(``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts), so a crafted
file cannot run code."""

from __future__ import annotations

from pathlib import Path

import torch

from dipstream.errors import DipstreamError
from dipstream.io import atomic_path

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(folder: Path, state: dict) -> None:
    """torch.save `state` to folder/checkpoint.pt through a temporary file and an atomic rename."""
    with atomic_path(folder / CHECKPOINT, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(folder: Path, run_key: dict) -> dict | None:
    """The checkpoint in `folder`, or None. A checkpoint of a different run (other model, method,
    density, rank, loss, ...) is a one-line error rather than a silent mix."""
    path = folder / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["run_key"]
        if not isinstance(saved, dict):
            raise TypeError("run_key is not a mapping")
    except Exception:  # noqa: BLE001 - unreadable (or not plain data) is unreadable
        raise DipstreamError(f"checkpoint '{path}' is unreadable or not a dipstream checkpoint; delete it "
                             "or pass --restart") from None
    if saved != run_key:
        diff = sorted(k for k in set(saved) | set(run_key) if saved.get(k) != run_key.get(k))
        what = ", ".join(f"{k}: {saved.get(k)} vs {run_key.get(k)}" for k in diff[:3])
        raise DipstreamError(f"'{folder}' holds a checkpoint of a different run ({what}); use another "
                             "--out, or --restart to discard it")
    return state
