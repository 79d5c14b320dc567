"""Slow, obviously-correct reference cache (one hook, Python sets), for cross-checking the
vectorised policies. Same rule: evict n_evict = clip(min(|unused|, |m| + |unused| - cap), 0)
lowest-priority cached-but-unused units (ties: lowest index first), then insert the mask."""
from __future__ import annotations

import math


def naive_run(policy, masks, cap, k=5, hot=(), future_end=None):
    """masks: list of sets (one per token). Returns (list of cached sets before each token,
    list of hits, final cache)."""
    cache, last, count = set(), {}, {}
    hot = set(hot)
    cap_l = cap - len(hot) if policy == "hot" else cap
    before, hits = [], []
    T = len(masks)
    for t, m in enumerate(masks):
        m = set(m)
        vis = cache | hot if policy == "hot" else set(cache)
        if policy == "none":
            vis = set()
        before.append(vis)
        hits.append(len(m & vis))
        if policy == "none":
            continue
        mm = m - hot if policy == "hot" else m
        unused = cache - mm
        n_ev = max(0, min(len(unused), len(mm) + len(unused) - max(cap_l, 0)))

        def nxt(u):
            for s in range(t + 1, T):
                if u in masks[s]:
                    return s
            return math.inf

        if policy in ("lru", "window", "hot"):
            key = lambda u: (last[u], u)
        elif policy == "lfu":
            key = lambda u: (count[u], u)
        elif policy == "belady":
            key = lambda u: (-nxt(u), u)
        ev = sorted(unused, key=key)[:n_ev]
        cache = (cache - set(ev)) | mm
        for u in m:
            last[u] = t
            count[u] = count.get(u, 0) + 1
        if policy == "window":
            cache = {u for u in cache if last[u] > t - k}
    return before, hits, cache
