"""Which units a token keeps: one top-k rule for every path (evaluation, DIP-CA, the runtime's
torch fallback; the C kernel implements the same rule), and DIP-CA's cache-aware choice.

The rule: the k largest scores; NaN counts as +inf; among equal scores the lower index first
(what a stable descending sort gives). It is computed with `torch.topk` plus a pass that settles
ties at the k-th value, so it costs little more than topk.
"""

from __future__ import annotations

import torch

from dipstream.budget import gamma_at


def topk_mask(scores: torch.Tensor, k) -> torch.Tensor:
    """bool mask of the k largest entries of each row of `scores` (..., n) by the rule above;
    `k` an int, or a tensor of one k per row."""
    n = scores.shape[-1]
    if not isinstance(k, torch.Tensor):
        k = int(k)
        if k >= n:
            return torch.ones_like(scores, dtype=torch.bool)
        if k <= 0:
            return torch.zeros_like(scores, dtype=torch.bool)
        kk = k
    else:
        k = k.to(scores.device).clamp(0, n).reshape(*scores.shape[:-1], 1)
        kk = int(k.max()) if k.numel() else 0
        if kk == 0:
            return torch.zeros_like(scores, dtype=torch.bool)
    s = scores
    lazy = s.device.type == "meta"  # no values to look at: take the general path throughout
    if s.is_floating_point():
        nan = torch.isnan(s)
        if lazy or bool(nan.any()):
            s = torch.where(nan, torch.full((), float("inf"), dtype=s.dtype, device=s.device), s)
    if isinstance(k, torch.Tensor):  # per-row k: the k-th value of each row from its sorted top
        top = s.topk(kk, dim=-1).values
        t = top.gather(-1, (k - 1).clamp_min(0))
        t = torch.where(k > 0, t, torch.full_like(t, float("inf")))
    else:
        t = s.topk(kk, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = s > t
    tie = s == t
    need = k - above.sum(-1, keepdim=True)
    if not lazy and bool((tie.sum(-1, keepdim=True) <= need).all()):  # no row has surplus ties (the usual case)
        return above | tie
    return above | (tie & (tie.cumsum(-1) <= need))


def topk_indices(v: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending int64 indices of the k largest entries of a vector, by the rule above."""
    v = v.reshape(-1)
    k = max(0, min(int(k), v.numel()))
    m = topk_mask(v, k).to(torch.float32)  # exactly k ones: their positions, sorted
    return m.topk(k).indices.sort().values


def ca_select(scores: torch.Tensor, k: int, cached: torch.Tensor, gamma: float, n0: int, t: int,
              protected: torch.Tensor | None = None, warmup: bool = True) -> torch.Tensor:
    """DIP-CA's mask for one token of each row (docs/methods.md, "Cache-aware masking"): the
    top-n0 scores (`protected`, computed here when not given) keep their value, the scores of
    uncached units are multiplied by gamma_t, then the same top-k as DIP. When gamma_t is 1 this
    is DIP's top-k exactly."""
    g = gamma_at(gamma, t, warmup)
    if g >= 1.0:
        return topk_mask(scores, k)
    keep = cached | (topk_mask(scores, n0) if protected is None else protected)
    return topk_mask(torch.where(keep, scores, scores * g), k)
