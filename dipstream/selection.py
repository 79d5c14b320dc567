"""Which units a token keeps: one top-k rule for every path, and DIP-CA's cache-aware choice,
for torch tensors (the accuracy lab, on any device) and numpy arrays (the engine). No torch is
imported here: a tensor's own module does its work.

The rule: the k largest scores; NaN counts as +inf; among equal scores the lower index first
(what a stable descending sort gives). Tensors: `torch.topk` plus a pass that settles ties at the
k-th value, so it costs little more than topk. Arrays: the native kernel's radix select
(``ds_topk_abs``, the same rule over magnitudes: numpy scores are |x|-like, never negative).
"""

from __future__ import annotations

import sys

import numpy as np

from dipstream import native
from dipstream.budget import gamma_at
from dipstream.errors import DipstreamError


def _is_tensor(x) -> bool:
    return type(x).__module__.startswith("torch")


def topk_indices_np(scores: np.ndarray, k: int, out: np.ndarray | None = None) -> np.ndarray:
    """Ascending int64 indices of the k largest of the magnitudes `scores` (a float32 vector),
    written to out[:k] (a new array when not given)."""
    lib = native.load(quiet=True)
    if lib is None:
        raise DipstreamError(f"top-k over arrays needs the native kernel library, which is unavailable "
                             f"({native.status().get('reason')}); install a C compiler (gcc)")
    v = np.ascontiguousarray(scores, np.float32)
    k = max(0, min(int(k), v.size))
    out = np.empty(k, np.int64) if out is None else out
    got = lib.ds_topk_abs(v.ctypes.data, v.size, k, out.ctypes.data)
    if got < 0:
        raise MemoryError("ds_topk_abs failed")
    return out[:got]


def topk_mask(scores, k):
    """bool mask of the k largest entries of each row of `scores` (..., n) by the rule above;
    `k` an int, or (tensors) a tensor of one k per row. An array: one row of magnitudes."""
    if not _is_tensor(scores):
        m = np.zeros(scores.shape[-1], bool)
        m[topk_indices_np(scores, k)] = True
        return m
    torch = sys.modules["torch"]
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


def topk_indices(v, k: int):
    """Ascending int64 indices of the k largest entries of a vector, by the rule above."""
    if not _is_tensor(v):
        return topk_indices_np(np.reshape(v, -1), k)
    v = v.reshape(-1)
    k = max(0, min(int(k), v.numel()))
    m = topk_mask(v, k).float()  # exactly k ones: their positions, sorted
    return m.topk(k).indices.sort().values


def ca_select(scores, k: int, cached, gamma: float, n0: int, t: int, protected=None, warmup: bool = True):
    """DIP-CA's mask for one token of each row (docs/methods.md, "Cache-aware masking"): the
    top-n0 scores (`protected`, computed here when not given) keep their value, the scores of
    uncached units are multiplied by gamma_t, then the same top-k as DIP. When gamma_t is 1 this
    is DIP's top-k exactly. Tensors or arrays (one row), the same body for both."""
    g = gamma_at(gamma, t, warmup)
    if g >= 1.0:
        return topk_mask(scores, k)
    keep = cached | (topk_mask(scores, n0) if protected is None else protected)
    if _is_tensor(scores):
        weighted = sys.modules["torch"].where(keep, scores, scores * g)
    else:
        weighted = np.where(keep, scores, scores * np.float32(g)).astype(np.float32, copy=False)
    return topk_mask(weighted, k)
