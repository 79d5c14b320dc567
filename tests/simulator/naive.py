"""Slow, obviously-correct reference cache (one hook, Python sets), for cross-checking the
vectorised policies. Same rule: evict n_evict = clip(min(|unused|, |m| + |unused| - cap), 0)
lowest-priority cached-but-unused units (ties: lowest index first), then insert the mask; when
the mask alone exceeds the capacity, keep its hits and the new units of highest random
priority up to capacity ("random", the reference), or the whole mask ("keep-mask"), or the
highest indices ("highest-index")."""
from __future__ import annotations

import math

from dipstream.simulator.policies import unit_priority


def naive_run(policy, masks, cap, k=5, hot=(), future_end=None, over="random", seed=0, hook_key=0):
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
        hits_mm = mm & cache
        cache = (cache - set(ev)) | mm
        extra = len(cache) - max(cap_l, 0)
        if extra > 0 and over == "random":
            new = sorted(mm - hits_mm)
            pr = unit_priority(seed, hook_key, t, new)
            cache -= {u for _, u in sorted(zip(pr.tolist(), new))[:extra]}
        elif extra > 0 and over == "highest-index":
            cache -= set(sorted(cache)[:extra])
        for u in m:
            last[u] = t
            count[u] = count.get(u, 0) + 1
        if policy == "window":
            cache = {u for u in cache if last[u] > t - k}
    return before, hits, cache
