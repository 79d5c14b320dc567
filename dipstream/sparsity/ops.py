"""Masked linear maps that touch only the weights their masks need (NaN-safe by construction).

A column mask (N, in) zeroes inputs: only the union of selected columns is read.
A row mask (N, out) computes only selected outputs: only the union of selected rows is read.
LoRA adapters (`LoraView`) get the same masked input as their host weight: a column mask reads
only the selected columns of A, a row mask only the selected rows of B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dipstream.models.arch import GatedMLPParts, LoraView


def _lora_out(x: torch.Tensor, lora: LoraView | None, a_cols=None, b_rows=None) -> torch.Tensor | None:
    """Sum of the adapters' terms s * B A x, A restricted to columns `a_cols`, B to rows `b_rows`."""
    if lora is None:
        return None
    out = None
    for A, B, s, drop in lora.terms():
        A = A if a_cols is None else A.index_select(1, a_cols)
        B = B if b_rows is None else B.index_select(0, b_rows)
        term = F.linear(F.linear(drop(x), A), B) * s
        out = term if out is None else out + term
    return out


def linear_cols(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                cols: torch.Tensor | None, lora: LoraView | None = None) -> torch.Tensor:
    """(x * cols) @ w.T + b (+ adapters) reading only the columns of w (and A) some token selects.
    Unselected inputs never reach the output, even when they are NaN."""
    if cols is None:
        xs, ws, idx = x, w, None
    else:
        xm = torch.where(cols, x, x.new_zeros(()))
        used = cols.any(0)
        if bool(used.all()):
            xs, ws, idx = xm, w, None
        else:
            idx = used.nonzero().squeeze(1)
            xs, ws = xm.index_select(1, idx), w.index_select(1, idx)
    y = F.linear(xs, ws, b)
    extra = _lora_out(xs, lora, a_cols=idx)
    return y if extra is None else y + extra


def linear_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                rows: torch.Tensor | None, lora: LoraView | None = None) -> torch.Tensor:
    """x @ w.T + b (+ adapters) for the selected output rows of each token (others 0), reading only
    used rows of w (and of the adapters' B)."""
    used = None if rows is None else rows.any(0)
    idx = None if used is None or bool(used.all()) else used.nonzero().squeeze(1)
    if idx is None:
        out = F.linear(x, w, b)
    else:
        out = F.linear(x, w.index_select(0, idx), None if b is None else b.index_select(0, idx))
    extra = _lora_out(x, lora, b_rows=idx)
    if extra is not None:
        out = out + extra
    if idx is not None:
        out = x.new_zeros(x.shape[0], w.shape[0]).index_copy(1, idx, out)
    return out if rows is None else torch.where(rows, out, out.new_zeros(()))


def part_linear(p: GatedMLPParts, name: str, x: torch.Tensor, cols: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Linear `name` ('gate', 'up' or 'down') of one MLP block on x (N, in), adapters included,
    reading only the columns a token selects (`cols`, N x in) or computing only its selected
    outputs (`rows`, N x out; the others are 0). Neither: dense."""
    w, b, lora = getattr(p, f"{name}_weight"), getattr(p, f"{name}_bias"), getattr(p, f"{name}_lora")
    if rows is not None:
        if cols is not None:
            raise ValueError("give a row mask or a column mask, not both")
        return linear_rows(x, w, b, rows, lora)
    return linear_cols(x, w, b, cols, lora)
