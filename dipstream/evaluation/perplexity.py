"""Perplexity over fixed windows: loss over every predicted token, every token sparsified."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

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


def window_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood (nats) of each window (B,)."""
    input_ids = input_ids.to(model.device)
    logits = model(input_ids=input_ids).logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                          reduction="none")
    return nll.view(input_ids.shape[0], -1).sum(-1).cpu()


def perplexity(model, windows: Windows, on_window=None, progress: bool | None = None,
               batch_size: int = 1) -> PerplexityResult:
    """Evaluate `model` on `windows`, `batch_size` windows per forward; `on_window()` runs before
    each batch (e.g. to reset per-sequence method state). A progress bar shows on a terminal."""
    if progress is None:
        progress = sys.stderr.isatty()
    start = time.perf_counter()
    total = 0.0
    with torch.inference_mode():
        for ids in tqdm(torch.split(windows.input_ids, batch_size), desc="windows",
                        disable=not progress, leave=False):
            if on_window is not None:
                on_window()
            total += float(window_nll(model, ids).sum())
    n, nbytes = windows.n_predicted, sum(windows.predicted_bytes)
    return PerplexityResult(perplexity=math.exp(total / n), bits_per_byte=total / math.log(2) / nbytes,
                            nll_sum=total, tokens=n, bytes=nbytes, seconds=time.perf_counter() - start)
