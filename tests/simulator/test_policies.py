"""Cache policies: hand-worked sequences and properties against a naive reference."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dipstream.simulator import make_policy
from dipstream.simulator.bits import pack, popcount, unpack
from dipstream.simulator.policies import unit_priority
from naive import naive_run

N = 6
# Shared hand example: capacity 3, masks per token
SEQ = [{0, 1}, {1, 2}, {3}, {0, 4}, {2}]


def as_mask(s, n=N):
    m = np.zeros((1, n), bool)
    m[0, list(s)] = True
    return m


def run(pol, seq, n=N):
    """(cached set after each step, hits per step)."""
    after, hits = [], []
    for s in seq:
        _, h = pol.step(as_mask(s, n))
        hits.append(int(h[0]))
        after.append(set(np.nonzero(pol.cached()[0])[0].tolist()))
    return after, hits


def test_lru_hand():
    # t0 {0,1}: empty cache, no eviction -> {0,1}
    # t1 {1,2}: hit 1; unused {0}; n_ev = min(1, 2+1-3) = 0 -> {0,1,2}
    # t2 {3}: unused {0,1,2}; n_ev = min(3, 1+3-3) = 1; stamps 0:0 1:1 2:1 -> evict 0 -> {1,2,3}
    # t3 {0,4}: unused {1,2,3}; n_ev = min(3, 2+3-3) = 2; stamps 1:1 2:1 3:2 -> evict 1,2
    # t4 {2}: unused {0,3,4}; n_ev = 1; stamps 0:3 3:2 4:3 -> evict 3 -> {0,2,4}
    after, hits = run(make_policy("lru").init(1, N, 3), SEQ)
    assert after == [{0, 1}, {0, 1, 2}, {1, 2, 3}, {0, 3, 4}, {0, 2, 4}]
    assert hits == [0, 1, 0, 0, 0]


def test_lfu_hand():
    # counts after t1: 0:1 1:2 2:1
    # t2 {3}: evict 1 of {0,1,2}; lowest counts 0 and 2 tie at 1 -> lowest index 0 -> {1,2,3}
    # t3 {0,4}: evict 2 of {1,2,3}; counts 1:2 2:1 3:1 -> evict 2,3 -> {0,1,4}
    # t4 {2}: evict 1 of {0,1,4}; counts 0:2 1:2 4:1 -> evict 4 -> {0,1,2}
    after, hits = run(make_policy("lfu").init(1, N, 3), SEQ)
    assert after == [{0, 1}, {0, 1, 2}, {1, 2, 3}, {0, 1, 4}, {0, 1, 2}]
    assert hits == [0, 1, 0, 0, 0]


def test_belady_hand():
    # t2 {3}: evict 1 of {0,1,2}; next uses 0:t3 1:never 2:t4 -> evict 1 -> {0,2,3}
    # t3 {0,4}: hit 0; unused {2,3}; n_ev = min(2, 2+2-3) = 1; next 2:t4 3:never -> evict 3
    # t4 {2}: hit 2; unused {0,4}; n_ev = min(2, 1+2-3) = 0
    masks = np.stack([as_mask(s) for s in SEQ])
    after, hits = run(make_policy("belady").init(1, N, 3, future=masks), SEQ)
    assert after == [{0, 1}, {0, 1, 2}, {0, 2, 3}, {0, 2, 4}, {0, 2, 4}]
    assert hits == [0, 1, 0, 1, 1]


def test_window_hand():
    # capacity 5 never binds; k=2 keeps the units of the last 2 tokens only
    # t2: LRU keeps {0,1,2,3}; window {1,2} | {3} -> {1,2,3}
    # t3: {1,2,3} | {0,4}; window {3} | {0,4} -> {0,3,4}
    # t4: window {0,4} | {2} -> {0,2,4}
    after, hits = run(make_policy("window", k=2).init(1, N, 5), SEQ)
    assert after == [{0, 1}, {0, 1, 2}, {1, 2, 3}, {0, 3, 4}, {0, 2, 4}]
    assert hits == [0, 1, 0, 0, 0]


def test_hot_hand():
    # capacity 3, fraction 0.5 -> floor(1.5) = 1 hot unit: the most frequent, unit 2;
    # LRU over the other units with capacity 3 - 1 = 2
    # t0 {0,1}: hit 0 -> lru {0,1}           cached {0,1,2}
    # t1 {1,2}: hit 1 (lru) + 1 (hot) -> lru part {1}: no eviction -> {0,1}
    # t2 {3}: lru unused {0,1}; n_ev = min(2, 1+2-2) = 1 -> evict 0 -> {1,3}
    # t3 {0,4}: n_ev = min(2, 2+2-2) = 2 -> {0,4}
    # t4 {2}: hot hit; lru mask empty, n_ev = 0
    pol = make_policy("hot", fraction=0.5).init(1, N, 3, frequency=[[5, 1, 9, 0, 0, 0]])
    assert set(np.nonzero(pol.cached()[0])[0]) == {2}
    after, hits = run(pol, SEQ)
    assert after == [{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {0, 2, 4}, {0, 2, 4}]
    assert hits == [0, 2, 0, 0, 1]


def test_none_caches_nothing():
    after, hits = run(make_policy("none").init(1, N, 3), SEQ)
    assert after == [set()] * 5 and hits == [0] * 5


def test_mask_larger_than_capacity():
    # cap 1, the reference: t0 {0,1,2} (3 new units) -> one of them, at random, stays
    # t1 {0,1,2} again: hits the one cached unit; the other two are new and dropped
    pol = make_policy("lru").init(1, N, 1)
    after, hits = run(pol, [{0, 1, 2}, {0, 1, 2}])
    assert len(after[0]) == 1 and after[0] <= {0, 1, 2} and after[1] == after[0] and hits == [0, 1]
    # keep-mask (not the reference): t0 inserted whole, above capacity
    # t1 {1,5}: hit 1; unused {0,2}; n_ev = min(2, 2+2-1) = 2 -> cache = the mask {1,5}
    after, hits = run(make_policy("lru", over_capacity="keep-mask").init(1, N, 1), [{0, 1, 2}, {1, 5}])
    assert after == [{0, 1, 2}, {1, 5}] and hits == [0, 1]


def test_random_fill_keeps_hits_and_is_uniform_over_new_units():
    # cache {0,2}; mask {0,1,3} (cap 2): hit 0 stays, unit 2 is evicted, and one of the new units
    # 1, 3 at random; highest-index (not the reference) drops the lowest index, the hit 0
    seq = [{0, 2}, {0, 1, 3}, {0}]
    kept = {1: 0, 3: 0}
    for seed in range(400):
        after, hits = run(make_policy("lru", seed=seed).init(1, N, 2), seq)
        assert 0 in after[1] and len(after[1]) == 2 and hits[2] == 1
        kept[(after[1] - {0}).pop()] += 1
    assert 150 < kept[1] < 250  # binomial(400, 1/2): 5 standard deviations either side
    after, hits = run(make_policy("lru", over_capacity="highest-index").init(1, N, 2), seq)
    assert after[1] == {1, 3} and hits[2] == 0


def test_random_fill_is_seeded_and_keyed():
    m = np.ones((1, 64), bool)
    a = make_policy("lru", seed=3).init(1, 64, 8, keys=[5])
    b = make_policy("lru", seed=3).init(1, 64, 8, keys=[5])
    c = make_policy("lru", seed=4).init(1, 64, 8, keys=[5])
    a.step(m), b.step(m), c.step(m)
    assert (a.cached() == b.cached()).all() and not (a.cached() == c.cached()).all()
    with pytest.raises(ValueError, match="over_capacity must be one of"):
        make_policy("lru", over_capacity="strict")


def test_unit_priority_is_pinned():
    # the random fill's results depend on these exact values: a faster implementation must keep them
    assert unit_priority(0, 0, 0, [0, 1, 4095]).tolist() == [
        0xB55A8FA067537A73, 0x5E8ECDE7A3C2DDA7, 0x248A3C39E9EE7C60]
    assert unit_priority(3, 2 ** 32 - 1, 255, [7, 14335]).tolist() == [
        0x2CC4B28F3C8930B7, 0x6A835DC2ADD8B994]


def per_row_drop(new, over, seed, keys, ts):
    """The slow reference of the random fill: per row, its `over` new units of lowest priority."""
    drop = np.zeros_like(new)
    for r in range(len(new)):
        units = np.flatnonzero(new[r])
        pr = unit_priority(seed, int(keys[r]), int(ts[r]), units)
        drop[r, units[np.argsort(pr)[:over[r]]]] = True
    return drop


@pytest.mark.parametrize("seed", [0, 1, 7, 2 ** 40 + 3])
def test_random_fill_vectorised_matches_per_row_reference(seed):
    rng = np.random.default_rng(seed)
    for n in (1, 6, 64, 300, 4096):
        H = 7
        new = rng.random((H, n)) < rng.random((H, 1))
        k = new.sum(1)
        over = rng.integers(0, k + 1)
        over[0], over[1], over[2] = 0, k[1], max(k[2] - 1, 0)  # none, all new units, all but one
        pol = make_policy("lru", seed=seed).init(H, n, 1, keys=rng.integers(0, 2 ** 32, H))
        pol.t = rng.integers(0, 5000, H)
        want = per_row_drop(new, over, seed, pol.key, pol.t)
        if over.any():
            assert (unpack(pol._random_new(pack(new), over), n) == want).all(), n
        over[:] = k  # every row drops all its new units
        if over.any():
            assert (unpack(pol._random_new(pack(new), over), n) == new).all(), n


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_random_fill_steps_match_per_row_reference(seed):
    # rows of different capacities (0, small, ample) stepped together through correlated masks:
    # a row whose mask exceeds its capacity keeps its hits and the new units the reference keeps
    rng = np.random.default_rng(seed)
    H, n, T = 6, 700, 12
    caps = np.array([0, 40, 150, 300, 700, 90])
    keys = rng.integers(0, 2 ** 32, H)
    pol = make_policy("lru", seed=seed).init(H, n, caps, keys=keys)
    masks = np.logical_xor.accumulate(rng.random((T, H, n)) < rng.random((1, H, 1)) / 3, axis=0)
    overflowed = 0
    for t in range(T):
        before = pol.cached()
        pol.step(masks[t])
        after = pol.cached()
        m = masks[t]
        new = m & ~before
        over = np.maximum(m.sum(1) - caps, 0)
        want = (m & before) | (new & ~per_row_drop(new, over, seed, keys, np.full(H, t)))
        big = over > 0
        assert (after[big] == want[big]).all(), t
        assert (after.sum(1) <= caps).all()
        overflowed += int(big.sum())
    assert overflowed > T  # the rule was exercised, on several rows


def test_first_token_all_misses_and_repeat_all_hits():
    pol = make_policy("lru").init(2, 100, 60)
    m = np.zeros((2, 100), bool)
    m[0, :30], m[1, 50:90] = True, True
    sel, hit = pol.step(m)
    assert sel.tolist() == [30, 40] and hit.tolist() == [0, 0]
    sel, hit = pol.step(m)
    assert hit.tolist() == [30, 40]


def test_reset_and_rows():
    pol = make_policy("lru").init(2, N, 3)
    pol.step(np.stack([as_mask({0})[0], as_mask({1})[0]]))
    pol.reset(rows=[0])
    assert pol.cached()[0].sum() == 0 and pol.cached()[1, 1]
    pol.reset()
    assert not pol.cached().any()


def test_unknown_policy():
    with pytest.raises(ValueError, match="available: none, lru"):
        make_policy("fifo")


POLS = ["none", "lru", "lfu", "window", "belady", "hot"]


@st.composite
def cases(draw):
    H = draw(st.integers(1, 3))
    n = draw(st.integers(1, 150))
    T = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2 ** 31))
    rng = np.random.default_rng(seed)
    dens = rng.random(H)[None, :, None]
    masks = rng.random((T, H, n)) < dens
    if draw(st.booleans()):  # temporally correlated variant
        masks = np.logical_xor.accumulate(rng.random((T, H, n)) < dens / 3, axis=0)
    caps = rng.integers(0, n + 3, H)
    freq = rng.integers(0, 4, (H, n))
    return masks, caps, freq


def make(pol, H, n, caps, masks, freq, over="random"):
    kw = {"k": 3} if pol == "window" else {}
    return make_policy(pol, over_capacity=over, **kw).init(H, n, caps, keys=np.arange(H) * 7,
                                                          future=masks, frequency=freq)


@settings(max_examples=150, deadline=None)
@given(cases(), st.sampled_from(["random", "keep-mask", "highest-index"]))
def test_matches_naive_and_invariants(case, over):
    masks, caps, freq = case
    T, H, n = masks.shape
    for pol in POLS:
        p = make(pol, H, n, caps, masks, freq, over)
        got = []
        for t in range(T):
            before = p.cached()
            sel, hit = p.step(masks[t])
            # hits + misses = selected units
            assert (sel == masks[t].sum(1)).all()
            assert (hit == (masks[t] & before).sum(1)).all()
            after = p.cached()
            if pol != "none":
                fits = masks[t].sum(1) <= np.maximum(caps, 0)
                if over == "keep-mask":
                    assert after[masks[t]].all()  # the whole mask is inserted
                elif pol != "hot":
                    assert after[masks[t] & fits[:, None]].all()  # a mask that fits is inserted
                if over == "random":  # the hits are kept
                    assert after[masks[t] & before].all()
            size = after.sum(1)
            big = size > np.maximum(caps, 0)
            if over == "keep-mask":
                # only a token whose mask alone exceeds capacity overfills (then cache == mask)
                # (hot: the cache is hot units + an LRU part sized for the rest)
                if pol != "hot":
                    assert (after[big] == masks[t][big]).all()
            else:
                assert not big.any()  # never above capacity
            got.append(before)
        for h in range(H):
            hot = ()
            if pol == "hot":
                nh = min(int(np.floor(0.5 * caps[h])), n)
                hot = set(np.argsort(-freq[h], kind="stable")[:nh].tolist())
            ref, _, _ = naive_run(pol, [set(np.nonzero(masks[t, h])[0].tolist())
                                        for t in range(T)], int(caps[h]), k=3, hot=hot, over=over,
                                  hook_key=7 * h)
            for t in range(T):
                assert set(np.nonzero(got[t][h])[0].tolist()) == ref[t], (pol, h, t)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_belady_dominates(case):
    # with keep-mask: with the random fill, an oversized mask keeps units whatever their next use
    masks, caps, freq = case
    T, H, n = masks.shape
    total = {}
    for pol in ("lru", "lfu", "belady", "window"):
        p = make(pol, H, n, caps, masks, freq, "keep-mask")
        total[pol] = sum(p.step(masks[t])[1] for t in range(T))
    assert (total["belady"] >= total["lru"]).all()
    assert (total["belady"] >= total["lfu"]).all()
    assert (total["belady"] >= total["window"]).all()


@settings(max_examples=30, deadline=None)
@given(cases())
def test_row_subset_stepping_equals_batched(case):
    masks, caps, freq = case
    T, H, n = masks.shape
    for pol in ("lru", "lfu", "window", "hot"):
        a, b = make(pol, H, n, caps, masks, freq), make(pol, H, n, caps, masks, freq)
        for t in range(T):
            a.step(masks[t])
        for h in reversed(range(H)):  # hook-major: one row through all tokens
            for t in range(T):
                b.step(masks[t, h], rows=[h])
        assert (a.cached() == b.cached()).all(), pol


def test_belady_ignores_the_next_sequence():
    # sequence A = tokens 0-1, sequence B = token 2; capacity 2
    # t1 {2}: unused {0,1}; n_ev = min(2, 1+2-2) = 1. Within A neither 0 nor 1 is used again
    # (both "never") -> evict the lowest index, 0 -> {1,2}. Unit 0's use at t2 (sequence B)
    # must not count.
    seq = [{0, 1}, {2}, {0}]
    masks = np.stack([as_mask(s) for s in seq])
    pol = make_policy("belady").init(1, N, 2, future=masks, seq_starts=[0, 2])
    after, _ = run(pol, seq[:2])
    assert after[1] == {1, 2}
    pol.reset()  # sequence B starts
    assert not pol.cached().any()
    _, hits = run(pol, seq[2:])
    assert hits == [0]


# ------------------------------------------------------------------ the native random fill
# CachePolicy._random_new runs the native kernel (dipstream/native/csrc/simfill.c) where the library
# loads, its numpy path otherwise (DIPSTREAM_NATIVE=0): both must drop the same units, bit for bit.

def _native_lib():
    from dipstream import native

    lib = native.load(quiet=True)
    if lib is None:
        pytest.skip("the native library is unavailable")
    return lib


def _builds(tmp_path_factory):
    """The loaded build, a portable one (no -march=native: the plain loops, not AVX-512), and one
    whose candidate window is narrowed so that it often misses (its fallback: the whole row)."""
    import ctypes
    import shutil

    from dipstream import native

    libs = {"loaded": _native_lib()}
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return libs
    d = tmp_path_factory.mktemp("simfill")
    for name, flags in (("portable", ("-O3",)), ("narrow", ("-O3", "-march=native", "-DSIM_WINDOW_SD=0"))):
        ok, err = native._compile(cc, flags, d / f"{name}.so")
        assert ok, err
        libs[name] = ctypes.CDLL(str(d / f"{name}.so"))
        native._declare(libs[name])
    return libs


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    return _builds(tmp_path_factory)


def _fill_cases(seed):
    """(new, over, policy) for widths 1..4096 (with non-multiples of 64) and rows with no new
    units, over 0, all new units, all but one, one, and random counts."""
    rng = np.random.default_rng(seed)
    for n in (1, 2, 6, 63, 64, 65, 127, 300, 1000, 4095, 4096):
        H = 9
        new = rng.random((H, n)) < rng.random((H, 1))
        new[8] = False
        k = new.sum(1)
        over = rng.integers(0, k + 1)
        over[0], over[1], over[2], over[3] = 0, k[1], max(k[2] - 1, 0), min(k[3], 1)
        pol = make_policy("lru", seed=seed).init(H, n, 1, keys=rng.integers(0, 2 ** 32, H))
        pol.t = rng.integers(0, 5000, H)
        yield new, over, pol


@pytest.mark.parametrize("seed", [0, 1, 5, 2 ** 40 + 3])
def test_native_random_fill_equals_numpy(seed, builds):
    from dipstream import native
    from dipstream.simulator.policies import _streams

    for new, over, pol in _fill_cases(seed):
        n = new.shape[1]
        want = pol._random_new_numpy(pack(new), over) if over.any() else np.zeros_like(pack(new))
        assert (unpack(want, n) == per_row_drop(new, over, seed, pol.key, pol.t)).all(), n
        base = _streams(pol.seed, pol.key, pol.t)
        for name, lib in builds.items():
            got = native.sim_random_drop(pack(new), over, base, n, lib=lib)
            assert got.dtype == np.uint64 and got.shape == want.shape
            assert (got == want).all(), (name, n)
        if over.any():
            assert (pol._random_new(pack(new), over) == want).all(), n  # the dispatch: native here


def test_native_random_fill_large_rows(builds):
    # rows as wide as a Llama-3-8B up projection's, with over from 1 to all but one: the window
    # of candidates, and (narrow build) its fallback, over many rows
    from dipstream import native
    from dipstream.simulator.policies import _streams

    rng = np.random.default_rng(9)
    H, n = 40, 14336
    new = rng.random((H, n)) < rng.uniform(0.02, 0.9, (H, 1))
    k = new.sum(1)
    over = np.clip((k * rng.random(H)).astype(np.int64), 1, k - 1)
    pol = make_policy("lfu", seed=4).init(H, n, 1, keys=rng.integers(0, 2 ** 32, H))
    pol.t = rng.integers(0, 100000, H)
    want = pol._random_new_numpy(pack(new), over)
    assert (popcount(want) == over).all() and not (want & ~pack(new)).any()
    base = _streams(pol.seed, pol.key, pol.t)
    for name, lib in builds.items():
        assert (native.sim_random_drop(pack(new), over, base, n, lib=lib) == want).all(), name


def test_native_random_fill_checks_its_arguments():
    from dipstream import native

    lib = _native_lib()
    words = pack(np.ones((2, 70), bool))
    over, base = np.array([3, 0]), np.array([1, 2], np.uint64)
    assert native.sim_random_drop(words, over, base, 70, lib=lib).shape == (2, 2)
    for bad in ((words, over, base, 129), (words, over[:1], base, 70), (words, over, base[:1], 70),
                (words[:, :1], over, base, 70), (words, np.array([71, 0]), base, 70),
                (words, np.array([-1, 0]), base, 70), (words.ravel(), over, base, 70)):
        with pytest.raises(ValueError, match="sim_random_drop"):
            native.sim_random_drop(*bad[:3], bad[3], lib=lib)
    # padding bits past n_units are ignored (never dropped, not counted)
    padded = words.copy()
    padded[:, 1] |= np.uint64(1) << np.uint64(63)
    assert (native.sim_random_drop(padded, over, base, 70, lib=lib) ==
            native.sim_random_drop(words, over, base, 70, lib=lib)).all()
    assert native.sim_random_drop(np.zeros((0, 1), np.uint64), np.zeros(0), np.zeros(0), 5, lib=lib).shape == (0, 1)


@pytest.fixture
def numpy_fill(monkeypatch):
    """A function that runs its argument with DIPSTREAM_NATIVE=0 (the numpy fill), then loads
    the library again."""
    from dipstream import native

    _native_lib()

    def run(fn):
        with monkeypatch.context() as m:
            m.setenv("DIPSTREAM_NATIVE", "0")
            assert native.load(force=True) is None
            try:
                return fn()
            finally:
                m.delenv("DIPSTREAM_NATIVE")
                assert native.load(force=True, quiet=True) is not None
    return run


@pytest.mark.parametrize("policy", ["lru", "lfu", "window", "hot", "belady"])
def test_simulate_native_equals_numpy(policy, numpy_fill, monkeypatch):
    # a trace whose masks overfill the caches on most tokens (60 and 190 units: partial words)
    from dipstream import native
    from dipstream.simulator import ModelShape, simulate, synthetic_trace

    shape = ModelShape(2, 60, 190, 50, 4, 2)
    tr = synthetic_trace(shape, "dip", 0.5, n_tokens=40, seq_len=20, seed=2)
    kw = {"frequency": tr.frequencies()} if policy == "hot" else {}
    calls = []
    real = native.sim_random_drop
    monkeypatch.setattr(native, "sim_random_drop", lambda *a, **k: calls.append(1) or real(*a, **k))
    on = simulate(tr, "a18", shape, policy, dram_bytes="0.3x", **kw).to_dict()
    assert calls  # the native kernel ran
    off = numpy_fill(lambda: simulate(tr, "a18", shape, policy, dram_bytes="0.3x", **kw).to_dict())
    assert on == off
    # and step by step, the caches themselves
    H = [h for h in tr.hooks if h.n_units == 190]
    masks = np.stack([h.masks for h in H], axis=1)  # (T, H, n)
    freq = np.stack([np.asarray(tr.frequencies()[h.name]) for h in H])

    def states():
        p = make(policy, len(H), 190, np.full(len(H), 40), masks, freq)
        return [(p.step(masks[t]), p.cached())[1] for t in range(len(masks))]
    on, off = states(), numpy_fill(states)
    assert all((a == b).all() for a, b in zip(on, off))
