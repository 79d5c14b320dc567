"""Cache-aware masking (DIP-CA, docs/methods.md "Cache-aware masking"), vectorised over rows
(hooks/tokens).

Per row with scores s (|x| or |h~|, non-negative) and cache state c (True = in DRAM):
F = the n0 largest s (protected); s'_i = gamma_t * s_i where c_i is False and i not in F, else
s_i; mask = top-k(s'). Warm-up over the token index t: gamma_t = 1 - (1-gamma)(1-gamma^(t/4)),
so gamma_0 = 1 (plain top-k) and gamma_t -> gamma. gamma = 1 is exactly plain top-k
(``topk_mask``, which plain DIP should use so the two agree bit for bit).

Accepts torch tensors (returns a bool tensor on the same device) or numpy arrays (returns a
bool numpy array).
"""
from __future__ import annotations

import numpy as np
import torch


def gamma_schedule(gamma, t):
    """gamma_t = 1 - (1 - gamma) * (1 - gamma ** (t / 4)); t scalar or tensor."""
    if isinstance(t, torch.Tensor):
        g = torch.as_tensor(float(gamma), dtype=torch.float64, device=t.device)
        return 1 - (1 - g) * (1 - torch.pow(g, t.to(torch.float64) / 4))
    return 1 - (1 - gamma) * (1 - gamma ** (t / 4))


def topk_mask(scores: torch.Tensor, k) -> torch.Tensor:
    """bool mask of the k largest scores per row; k int or per-row ints (R,)."""
    n = scores.shape[-1]
    if isinstance(k, (int, np.integer)):
        k = min(max(int(k), 0), n)
        idx = torch.topk(scores, k, dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    k = torch.as_tensor(k, device=scores.device).clamp(0, n)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    keep = torch.arange(n, device=scores.device) < k.reshape(-1, 1)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, keep)


def cache_aware_select(scores, k, cached, gamma: float, n0=0, t=0):
    """DIP-CA mask: scores (R, n) (or (n,)), k and n0 int or per-row (R,), cached bool like
    scores, gamma in [0, 1], t = token index (scalar or per-row) for the warm-up."""
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    is_np = not isinstance(scores, torch.Tensor)
    s = torch.as_tensor(np.asarray(scores) if is_np else scores)
    squeeze = s.ndim == 1
    if squeeze:
        s = s.unsqueeze(0)
    if float(gamma) == 1.0:
        out = topk_mask(s, k)
    else:
        c = torch.as_tensor(np.asarray(cached) if is_np else cached, device=s.device).bool()
        c = c.reshape(s.shape)
        tt = torch.as_tensor(t, device=s.device)
        g = gamma_schedule(float(gamma), tt).to(s.dtype)
        g = g.reshape(-1, 1) if g.ndim else g
        protected = topk_mask(s, n0 if isinstance(n0, (int, np.integer)) else torch.as_tensor(n0))
        s2 = torch.where(c | protected, s, g * s)
        out = topk_mask(s2, k)
    out = out.squeeze(0) if squeeze else out
    return out.cpu().numpy() if is_np else out
