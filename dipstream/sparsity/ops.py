"""Masked linear maps that touch only the weights their masks need (NaN-safe by construction).

A column mask (N, in) zeroes inputs: only the union of selected columns is read.
A row mask (N, out) computes only selected outputs: only the union of selected rows is read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of each row of `scores` (N, n); ties broken by topk."""
    n = scores.shape[-1]
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, scores.topk(k, dim=-1, sorted=False).indices, True)
    return mask


def linear_cols(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                cols: torch.Tensor | None) -> torch.Tensor:
    """(x * cols) @ w.T + b reading only the columns of w some token selects."""
    if cols is None:
        return F.linear(x, w, b)
    xm = x * cols
    used = cols.any(0)
    if bool(used.all()):
        return F.linear(xm, w, b)
    idx = used.nonzero().squeeze(1)
    return F.linear(xm.index_select(1, idx), w.index_select(1, idx), b)


def linear_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                rows: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b for the selected output rows of each token (others 0), reading only used rows."""
    if rows is None:
        return F.linear(x, w, b)
    used = rows.any(0)
    if bool(used.all()):
        out = F.linear(x, w, b)
    else:
        idx = used.nonzero().squeeze(1)
        out = x.new_zeros(x.shape[0], w.shape[0])
        out[:, idx] = F.linear(x, w.index_select(0, idx), None if b is None else b.index_select(0, idx))
    return out * rows
