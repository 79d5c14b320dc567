"""The registry's decode side (no torch): how each method that runs in the engine picks one decoded
token's units of a hook from their scores. The engine asks `decode_rule(method)`; the torch
methods of the same names (`sparsity.methods`, `sparsity.cache_aware`) are the accuracy lab's,
and `register` marks exactly these as ``decodes`` (tests/test_architecture.py checks the two)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dipstream.errors import DipstreamError
from dipstream.selection import ca_select, topk_mask


@dataclass(frozen=True)
class AllUnits:
    """Dense: every unit, whatever the budget."""

    needs_cache = False
    reads_all = True

    def k(self, budget: int, n: int) -> int:
        return n

    def mask(self, scores: np.ndarray, k: int, t: int, cached: np.ndarray | None = None) -> np.ndarray:
        return np.ones(scores.size, bool)


@dataclass(frozen=True)
class TopK:
    """DIP: the k units of largest score (|x| for up/gate inputs, |h| for down inputs)."""

    needs_cache = False
    reads_all = False

    def k(self, budget: int, n: int) -> int:
        return min(n, budget)

    def mask(self, scores: np.ndarray, k: int, t: int, cached: np.ndarray | None = None) -> np.ndarray:
        return topk_mask(scores, k)


@dataclass(frozen=True)
class CacheAware(TopK):
    """DIP-CA: DIP's k, the choice moved toward the units the cache holds (`selection.ca_select`)."""

    gamma: float = 0.1
    n0_frac: float = 0.5
    warmup: bool = True
    needs_cache = True

    def mask(self, scores: np.ndarray, k: int, t: int, cached: np.ndarray | None = None) -> np.ndarray:
        if cached is None:
            return topk_mask(scores, k)
        return ca_select(scores, k, cached, self.gamma, int(self.n0_frac * k), t, warmup=self.warmup)


# method name -> its rule from the method options (gamma, n0_frac, warmup for dip-ca)
DECODERS = {
    "dense": lambda o: AllUnits(),
    "dip": lambda o: TopK(),
    "dip-ca": lambda o: CacheAware(o.gamma, o.n0_frac, o.warmup),
}


def decode_rule(method: str, options=None):
    """The rule method `method` decodes by (`options`: a CacheAwareOptions-like object for dip-ca),
    or a one-line error naming the methods that decode."""
    if method not in DECODERS:
        raise DipstreamError(f"the engine runs {', '.join(DECODERS)}, not '{method}'")
    if options is None:
        from dipstream.options import CacheAwareOptions

        options = CacheAwareOptions()
    return DECODERS[method](options)
