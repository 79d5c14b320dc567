"""A method inside every routed (and shared) expert of a mixture-of-experts block.

The model's own router picks each token's experts and their weights; the method runs on each
routed expert for the tokens routed to it (an expert no token picked is never read), and on the
shared expert for every token. What was read is a `MoeSelection`: bytes of the FFN read per token
over the bytes of all its experts, split into the expert level (the routed experts and the shared
one, read in full) and the neuron level inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dipstream.models.moe import MoeLayerParts
from dipstream.sparsity.base import LINEARS, ExpertCall, Method, Selection, sequence_dims
from dipstream.names import layer_key
from dipstream.sparsity.recording import selection_hooks

_MASKS = ("up_rows", "up_cols", "gate_rows", "gate_cols", "down_cols")


@dataclass
class MoeSelection:
    """What one MoE block read for N tokens. `routed` (N, E): the experts each token was routed
    to; `picked[e]` = (indices of the tokens routed to expert e, the method's Selection over
    them); `shared`: the shared expert's Selection over all N tokens (None: no shared expert)."""

    routed: torch.Tensor
    picked: dict[int, tuple[torch.Tensor, Selection]]
    shared: Selection | None
    d_model: int
    d_ff: int          # one routed expert's intermediate size
    shared_d_ff: int = 0
    counted = None     # every token counts

    def fractions(self) -> dict[str, torch.Tensor]:
        """Per token (N,): the fraction of all the block's FFN weights read (`mlp`, and per linear
        `up`/`gate`/`down`), and `expert`: the fraction in the experts it was routed to (plus the
        shared expert), i.e. what a dense read of those experts would cost."""
        N, E = self.routed.shape
        bx, bs = self.d_ff, self.shared_d_ff  # weights per linear are d * these: d cancels
        total = E * bx + bs
        dev = self.routed.device
        out = {k: torch.zeros(N, dtype=torch.float64, device=dev) for k in (*LINEARS, "mlp")}
        for tok, sel in self.picked.values():
            fr = sel.fractions()
            for k in out:
                out[k].index_add_(0, tok, fr[k].to(dev, torch.float64).expand(tok.shape[0]) * bx)
        if self.shared is not None:
            fr = self.shared.fractions()
            for k in out:
                out[k] += fr[k].to(dev, torch.float64).expand(N) * bs
        out = {k: v / total for k, v in out.items()}
        out["expert"] = (self.routed.sum(1, dtype=torch.float64) * bx + bs) / total
        return out

    def trace_hooks(self, layer: int) -> list[tuple[str, str, int, int, torch.Tensor]]:
        """The simulator hooks of this block (dipstream/simulator/trace.py): one `expert` hook over
        whole experts when the method reads routed experts in full, else per routed expert its
        method's hooks (tokens not routed there select nothing) and an `expert` hook of one unit
        for each linear it reads in full; the shared expert's hooks (none when it is read in full)."""
        N, E = self.routed.shape
        d, D = self.d_model, self.d_ff
        hooks = []
        if all(_reads_all(sel) for _, sel in self.picked.values()):
            hooks.append((layer_key(layer, "experts"), "expert", E, 3 * d * D, self.routed))
        else:
            t_tok, t_sel = next(iter(self.picked.values()))  # every token is routed somewhere
            for e in range(E):  # an expert no token picked: the same hooks, all masks empty
                tok, sel = self.picked.get(e) or (t_tok[:0], t_sel)
                hooks += self._expert_hooks(layer, e, tok, sel, N)
        if self.shared is not None:
            hooks += selection_hooks(self.shared, d, self.shared_d_ff, layer, "shared")
        return hooks

    def _expert_hooks(self, layer, e, tok, sel, N):
        d, D = self.d_model, self.d_ff
        full = {}
        for name in _MASKS:  # scatter onto all N tokens, keeping shared masks shared
            m = getattr(sel, name)
            if m is not None and id(m) not in full:
                z = torch.zeros(N, m.shape[1], dtype=torch.bool, device=m.device)
                if tok.numel():  # (no token: the mask's shape only, another expert's selection)
                    z[tok.to(m.device)] = m
                full[id(m)] = z
        wide = Selection(**{n: full[id(getattr(sel, n))] if getattr(sel, n) is not None else None for n in _MASKS})
        hooks = selection_hooks(wide, d, D, layer, "expert", e)
        routed_e = self.routed[:, e:e + 1]
        for lin in LINEARS:  # linears the method reads in full inside this expert
            if getattr(sel, f"{lin}_cols", None) is None and getattr(sel, f"{lin}_rows", None) is None:
                hooks.append((layer_key(layer, "expert", e, lin), "expert", 1, d * D, routed_e))
        return hooks


def _reads_all(sel: Selection) -> bool:
    return all(getattr(sel, n) is None for n in _MASKS)


def moe_mlp(method: Method, layer: int, p: MoeLayerParts, x: torch.Tensor, batch_shape: tuple[int, ...]
            ) -> tuple[torch.Tensor, MoeSelection]:
    """The block's output for tokens x (N, d) with `method` inside each routed expert (the same
    operations, in the same order, as the transformers eager path) and the shared expert."""
    _, weights, idx = p.router(x)
    N = x.shape[0]
    bt = sequence_dims(batch_shape, N)
    routed = torch.zeros(N, p.n_experts, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
    y = torch.zeros_like(x)
    picked = {}
    try:
        for e in routed.any(0).nonzero().flatten().tolist():
            pos, tok = torch.where(idx.T == e)
            method.in_expert = ExpertCall(("expert", e), tok, bt, layer * p.n_units + e)
            ye, sel = method.mlp(layer, p.experts[e], x[tok], (tok.shape[0],))
            y.index_add_(0, tok, (ye * weights[tok, pos, None]).to(y.dtype))
            picked[e] = (tok, sel)
        shared = None
        if p.shared is not None:
            method.in_expert = ExpertCall(("shared",), torch.arange(N, device=x.device), bt,
                                          layer * p.n_units + p.n_experts)
            ys, shared = method.mlp(layer, p.shared, x, batch_shape)
            y = y + torch.sigmoid(p.shared_gate(x)) * ys
    finally:
        method.in_expert = None
    return y, MoeSelection(routed, picked, shared, p.d_model, p.experts[0].d_ff,
                           p.shared.d_ff if p.shared is not None else 0)
