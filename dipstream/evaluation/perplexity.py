"""Perplexity over fixed windows: loss over every predicted token, every token sparsified; of a
Hugging Face model (the accuracy lab) or of the engine (scored token by token), by one rule."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dipstream.data.windows import Windows


@dataclass
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    nll_sum: float
    tokens: int
    bytes: int
    seconds: float
    nll_by_position: list  # summed over windows, per predicting position 0 .. seq_len - 2
    windows: int

    def perplexity_from(self, position: int) -> float:
        """Perplexity of the predictions made at positions >= `position` of each window (e.g.
        the tokens a method sparsified after a dense prompt)."""
        tail = self.nll_by_position[position:]
        return math.exp(sum(tail) / (len(tail) * self.windows)) if tail else float("nan")


def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of every position: a Hugging Face model's forward, or a decoder's (the
    engine: `engine.decode`) token by token, a new sequence per window."""
    if isinstance(model, torch.nn.Module):
        return model(input_ids=input_ids.to(model.device)).logits.float()
    rows = []
    for window in input_ids.tolist():
        model.reset()
        rows.append(np.stack([model.step(tok, pos) for pos, tok in enumerate(window)]))
    return torch.from_numpy(np.stack(rows)).float()


def position_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood (nats, float64) per window and position (B, T-1)."""
    logits = _logits(model, input_ids)
    input_ids = input_ids.to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                          reduction="none")
    return nll.view(input_ids.shape[0], -1).double().cpu()


def window_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood (nats) of each window (B,)."""
    return position_nll(model, input_ids).sum(-1)


def perplexity(model, windows: Windows, on_window=None, progress: bool | None = None,
               batch_size: int = 1) -> PerplexityResult:
    """Evaluate `model` on `windows`, `batch_size` windows per forward; `on_window()` runs before
    each batch (e.g. to reset per-sequence method state). A progress bar shows on a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    start = time.perf_counter()
    by_pos = torch.zeros(windows.input_ids.shape[1] - 1, dtype=torch.float64)
    with torch.inference_mode():
        for ids in tqdm(torch.split(windows.input_ids, batch_size), desc="windows",
                        disable=not progress, leave=False):
            if on_window is not None:
                on_window()
            by_pos += position_nll(model, ids).sum(0)
    total = float(by_pos.sum())
    n, nbytes = windows.n_predicted, sum(windows.predicted_bytes)
    return PerplexityResult(perplexity=math.exp(total / n), bits_per_byte=total / math.log(2) / nbytes,
                            nll_sum=total, tokens=n, bytes=nbytes, seconds=time.perf_counter() - start,
                            nll_by_position=by_pos.tolist(), windows=int(windows.input_ids.shape[0]))
