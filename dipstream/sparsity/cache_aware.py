"""DIP-CA: DIP whose top-k choice is nudged toward units already cached in DRAM.

Per layer and hook (up/gate inputs, down inputs) a simulated DRAM cache is stepped token by token
(closed loop: the mask depends on the cache, the cache on earlier masks). In a teacher-forced
window a layer's scores for all tokens are known at once, so the layer scans its tokens in order,
picking each mask from the cache state and updating the cache, then applies all masks in
parallel. Several windows (batch rows) each get their own cache.
"""

from __future__ import annotations

import torch

from dipstream.errors import DipstreamError
from dipstream.names import layer_key
from dipstream.selection import ca_select, topk_mask
from dipstream.simulator.caches import CacheSet
from dipstream.simulator.policies import OFFLINE_POLICIES
from dipstream.simulator.trace import HookSpec
from dipstream.sparsity.base import register, sequence_dims
from dipstream.sparsity.methods import DIP


def _dip_hooks(p, layer: int, *where) -> list[HookSpec]:
    """DIP's two hooks of one gated MLP (its up/gate input columns, its down input columns) of layer
    `layer` (`where` inside it: ("expert", e) or ("shared",) in a mixture-of-experts block)."""
    return [HookSpec(layer_key(layer, *where, "in"), "in", p.d_model, 2 * p.d_ff),
            HookSpec(layer_key(layer, *where, "out"), "out", p.d_ff, p.d_model)]


@register
class DIPCA(DIP):
    """DIP with cache-aware masking: scores of uncached units (outside the protected top-n0) are
    multiplied by gamma_t before the same top-k; the byte budget is DIP's."""

    name = "dip-ca"

    def __init__(self, density=1.0, options=None):
        super().__init__(density, options)
        g = self.options.gamma
        if not 0.0 <= g <= 1.0:
            raise DipstreamError(f"--gamma {g} is outside [0, 1]; 1 is plain DIP, smaller prefers cached units")
        if not 0.0 <= self.options.n0_frac <= 1.0:
            raise DipstreamError(f"--n0-frac {self.options.n0_frac} is outside [0, 1]")
        self.capacity: dict[str, int] | None = None
        self.policy = "lru"
        self.policy_kwargs: dict = {}
        self.hooks: list[HookSpec] = []
        self._caches: CacheSet | None = None
        self._pos: dict[str, int] = {}
        self._bt = (1, 1)

    def prepare(self, parts):
        super().prepare(parts)
        self.hooks = [h for i, p in enumerate(parts) for h in _dip_hooks(p, i)]

    def prepare_experts(self, blocks):
        """A cache per hook of every routed expert (layers.i.expert.e.in / out) and of the shared
        expert (layers.i.shared.*), as the simulator's MoE hooks."""
        self.hooks = [h for i, b in enumerate(blocks)
                      for where, p in [(("expert", e), x) for e, x in enumerate(b.experts)]
                      + ([(("shared",), b.shared)] if b.shared is not None else [])
                      for h in _dip_hooks(p, i, *where)]

    def configure_cache(self, capacity: dict[str, int], policy: str = "lru", **policy_kwargs) -> None:
        """Cache capacity in units per hook name ('layers.i.in' / 'layers.i.out') and the policy."""
        if policy in OFFLINE_POLICIES:
            raise DipstreamError(f"dip-ca steers its masks by the live cache, which policy '{policy}' "
                                 "cannot provide here; use lru, lfu, window or none")
        self.capacity, self.policy, self.policy_kwargs = dict(capacity), policy, policy_kwargs
        self.reset()

    def reset(self):
        self._caches = None
        self._pos.clear()

    def mlp(self, layer, p, x, batch_shape):
        self._bt = sequence_dims(batch_shape, x.shape[0])
        return super().mlp(layer, p, x, batch_shape)

    def _cacheset(self, streams: int) -> CacheSet:
        """The caches of every hook, one per window of the batch (new at each reset)."""
        if self._caches is None:
            if self.capacity is None:
                raise DipstreamError("dip-ca needs a simulated DRAM cache: run it with `dipstream "
                                     "simulate` (or call configure_cache) ")
            self._caches = CacheSet(self.hooks, [self.capacity[h.name] for h in self.hooks], self.policy,
                                    n_streams=streams, grouping="hook", **self.policy_kwargs)
        return self._caches

    def _scan(self, hook: str, scores: torch.Tensor, k: int) -> torch.Tensor:
        if self.in_expert is not None:
            return self._scan_tokens(hook, scores, k)
        B, T = self._bt
        n = scores.shape[-1]
        caches = self._cacheset(B)
        # the cache lives on the host: on a GPU, one transfer of the layer's scores per batch and one
        # of its masks back, never one per token
        s = scores.detach().to("cpu").view(B, T, n)
        out = torch.empty(B, T, n, dtype=torch.bool)
        n0 = int(self.options.n0_frac * k)
        t0 = self._pos.get(hook, 0)
        protected = topk_mask(s.view(B * T, n), n0).view(B, T, n)  # scores only: all tokens at once
        for t in range(T):
            m = ca_select(s[:, t], k, torch.from_numpy(caches.cached(hook)), self.options.gamma, n0, t0 + t,
                          protected[:, t], self.options.warmup)
            caches.step(hook, m.numpy())
            out[:, t] = m
        self._pos[hook] = t0 + T
        return out.view(B * T, n).to(scores.device)

    def _scan_tokens(self, hook: str, scores: torch.Tensor, k: int) -> torch.Tensor:
        """`_scan` inside a MoE expert: its scores are those of the tokens routed to it (`in_expert`:
        their indices in the batch of B windows of T). At every position each window's cache steps,
        with the routed token's mask or with none (a token routed elsewhere reads nothing here, as
        the expert's hook in the simulator's trace)."""
        tok, (B, T) = self.in_expert.tokens, self.in_expert.bt
        n = scores.shape[-1]
        caches = self._cacheset(B)
        s = scores.detach().to("cpu")
        tok = tok.to("cpu")
        b_of, t_of = tok // T, tok % T
        out = torch.zeros(tok.shape[0], n, dtype=torch.bool)
        n0 = int(self.options.n0_frac * k)
        protected = topk_mask(s, n0)
        t0 = self._pos.get(hook, 0)
        for t in range(T):
            rows = (t_of == t).nonzero().flatten()
            step = torch.zeros(B, n, dtype=torch.bool)
            if rows.numel():
                b = b_of[rows]
                cached = torch.from_numpy(caches.cached(hook))[b]
                m = ca_select(s[rows], k, cached, self.options.gamma, n0, t0 + t, protected[rows],
                              self.options.warmup)
                step[b] = m
                out[rows] = m
            caches.step(hook, step.numpy())
        self._pos[hook] = t0 + T
        return out.to(scores.device)

    def _hook(self, layer: int, kind: str) -> str:
        return layer_key(layer, *(self.in_expert.where if self.in_expert is not None else ()), kind)

    def select_in(self, layer, scores):
        return self._scan(self._hook(layer, "in"), scores, self.keeps.k_in(layer, scores.shape[-1]))

    def select_out(self, layer, scores):
        return self._scan(self._hook(layer, "out"), scores, self.keeps.k_out(layer, scores.shape[-1]))

    def describe(self):
        return {**super().describe(), "gamma": self.options.gamma, "n0_frac": self.options.n0_frac,
                "warmup": self.options.warmup, "policy": self.policy}
