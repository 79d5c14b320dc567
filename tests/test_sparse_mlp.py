"""dipstream.kernels.sparse_mlp: the fused DIP MLP equals the masked dense computation."""

from __future__ import annotations

import os
import sys
import threading
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dipstream.kernels import (
    SparseMLPWeights,
    dense_mlp_reference,
    gather_gemv,
    masked_dense_reference,
    select_topk_abs,
)
from dipstream import native as _native
from dipstream.kernels.sparse_mlp import activation, sparse_mlp

BACKENDS = ["native", "torch"]


def _kernel_or_skip():
    """The compiled kernel.  Where it cannot exist (disabled, no C compiler) the native tests
    skip; where a C compiler is present a failed build is a test failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = _native.load()
    if lib is None:
        info = _native.status()
        if info.get("reason") == "disabled" or str(info.get("reason", "")).startswith("no C compiler"):
            pytest.skip(f"native kernel unavailable: {info.get('reason')}")
        pytest.fail(f"native kernel failed to build: {info}")
    return lib


@pytest.fixture(autouse=True)
def _need_kernel(request):
    params = getattr(request.node, "callspec", None)
    if params is not None and params.params.get("backend") == "native":
        _kernel_or_skip()


@pytest.fixture
def native_lib():
    return _kernel_or_skip()


def make_mlp(d, D, seed=0, scaled=True):
    g = torch.Generator().manual_seed(seed)
    sg, sd = (d ** -0.5, D ** -0.5) if scaled else (1.0, 1.0)
    Wg = torch.randn(D, d, generator=g) * sg
    Wu = torch.randn(D, d, generator=g) * sg
    Wd = torch.randn(d, D, generator=g) * sd
    x = torch.randn(d, generator=g)
    return Wg, Wu, Wd, x


def hidden(Wg, Wu, x, s_in, act):
    xm = torch.zeros_like(x)
    xm[s_in] = x[s_in]
    return activation(xm @ Wg.T, act) * (xm @ Wu.T)


def assert_close_y(y, y_ref, Wd, h, s_out):
    """Equal to float rounding: rtol 1e-5 plus an atol on the scale of the summed terms."""
    hm = torch.zeros_like(h)
    hm[s_out] = h[s_out]
    scale = float((hm.abs() @ Wd.abs().T).max()) if s_out.numel() else 0.0
    torch.testing.assert_close(y.reshape(-1), y_ref.reshape(-1), rtol=1e-5,
                               atol=1e-5 * scale + 1e-30)


def assert_same_selection(got, want, values, k):
    """Same indices; a difference is only tolerated between entries tied to rounding at the
    k-th largest |value| (used for the randomized property test)."""
    if torch.equal(got, want):
        return
    a = values.abs()
    kth = a.sort(descending=True).values[k - 1]
    diff = set(got.tolist()) ^ set(want.tolist())
    for i in diff:
        assert abs(float(a[i]) - float(kth)) <= 1e-5 * float(kth) + 1e-30, (i, a[i], kth)


def run_both(w, Wg, Wu, Wd, x, k_in, k_out, act, backend):
    y, s_in, s_out = sparse_mlp(w, x, k_in, k_out, act, return_indices=True, backend=backend)
    y_ref, r_in, r_out = masked_dense_reference(Wg, Wu, Wd, x, k_in, k_out, act,
                                                return_indices=True)
    return y, s_in, s_out, y_ref, r_in, r_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("d,D,scaled", [(8, 12, True), (64, 96, True), (576, 1536, True),
                                        (300, 2100, False), (130, 5000, True)])
def test_matches_masked_dense(d, D, scaled, act, backend):
    Wg, Wu, Wd, x = make_mlp(d, D, seed=d + D, scaled=scaled)
    w = SparseMLPWeights(Wg, Wu, Wd)
    for fin, fout in [(0.25, 0.25), (0.5, 0.5), (0.75, 0.3), (0.1, 0.9), (1.0, 0.5), (0.5, 1.0)]:
        k_in, k_out = max(1, int(fin * d)), max(1, int(fout * D))
        y, s_in, s_out, y_ref, r_in, r_out = run_both(w, Wg, Wu, Wd, x, k_in, k_out, act, backend)
        assert torch.equal(s_in, r_in)
        assert torch.equal(s_out, r_out)
        assert s_in.numel() == k_in and s_out.numel() == k_out
        assert_close_y(y, y_ref, Wd, hidden(Wg, Wu, x, r_in, act), r_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_empty_and_full_masks(act, backend):
    d, D = 48, 80
    Wg, Wu, Wd, x = make_mlp(d, D, seed=3)
    w = SparseMLPWeights(Wg, Wu, Wd)
    for k_in, k_out in [(0, 0), (0, D), (d, 0), (5, 0), (0, 7)]:
        y, s_in, s_out = sparse_mlp(w, x, k_in, k_out, act, return_indices=True, backend=backend)
        assert torch.equal(y, torch.zeros(d)), (k_in, k_out)
        assert s_in.numel() == min(k_in, d) and s_out.numel() == min(k_out, D)
    dense = dense_mlp_reference(Wg, Wu, Wd, x, act)
    for k_in, k_out in [(d, D), (d + 10, D + 100)]:  # k beyond the size clamps to full
        y, s_in, s_out = sparse_mlp(w, x, k_in, k_out, act, return_indices=True, backend=backend)
        assert torch.equal(s_in, torch.arange(d)) and torch.equal(s_out, torch.arange(D))
        assert_close_y(y, dense, Wd, hidden(Wg, Wu, x, s_in, act), s_out)
    # batch-1 (1, d) keeps its shape
    y1 = sparse_mlp(w, x[None], d, D, act, backend=backend)
    assert y1.shape == (1, d)
    torch.testing.assert_close(y1[0], sparse_mlp(w, x, d, D, act, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_nan_poison_unselected_weights(act, backend):
    """Only the selected rows of the stored layout may be read."""
    d, D = 200, 600
    Wg, Wu, Wd, x = make_mlp(d, D, seed=11)
    w = SparseMLPWeights(Wg, Wu, Wd)
    k_in, k_out = 70, 150
    y, s_in, s_out = sparse_mlp(w, x, k_in, k_out, act, return_indices=True, backend=backend)
    keep_in = torch.zeros(d, dtype=torch.bool)
    keep_in[s_in] = True
    keep_out = torch.zeros(D, dtype=torch.bool)
    keep_out[s_out] = True
    w.gate_up_t[~keep_in] = float("nan")
    w.down_t[~keep_out] = float("nan")
    y2, s_in2, s_out2 = sparse_mlp(w, x, k_in, k_out, act, return_indices=True, backend=backend)
    assert torch.isfinite(y2).all()
    assert torch.equal(s_in2, s_in) and torch.equal(s_out2, s_out)
    assert torch.equal(y2, y)
    y_ref = masked_dense_reference(Wg, Wu, Wd, x, k_in, k_out, act)
    assert_close_y(y2, y_ref, Wd, hidden(Wg, Wu, x, s_in, act), s_out)


def test_layout():
    d, D = 10, 14
    Wg, Wu, Wd, _ = make_mlp(d, D)
    w = SparseMLPWeights(Wg, Wu, Wd)
    assert w.gate_up_t.shape == (d, 2 * D) and w.down_t.shape == (D, d)
    assert w.gate_up_t.is_contiguous() and w.down_t.is_contiguous()
    g, u, dn = w.dense_weights()
    assert torch.equal(g, Wg) and torch.equal(u, Wu) and torch.equal(dn, Wd)
    assert w.bytes_read(3, 5) == (3 * 2 * D + 5 * d) * 4
    big = SparseMLPWeights(torch.randn(2048, 512), torch.randn(2048, 512), torch.randn(512, 2048))
    assert big.gate_up_t.data_ptr() % (2 << 20) == 0  # huge-page aligned
    with pytest.raises(ValueError):
        SparseMLPWeights(Wg, Wu, Wd.T)
    lin = [torch.nn.Linear(d, D, bias=False), torch.nn.Linear(d, D, bias=False),
           torch.nn.Linear(D, d, bias=False)]
    w2 = SparseMLPWeights.from_linears(*lin)
    assert torch.equal(w2.down_t, lin[2].weight.T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_gemv(backend):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(300, 1000, generator=g)
    idx = torch.tensor([7, 3, 3, 299, 0, 150, 42], dtype=torch.int64)  # unsorted, repeats
    c = torch.randn(idx.numel(), generator=g)
    ref = c.double() @ W.double()[idx]
    torch.testing.assert_close(gather_gemv(W, idx, c, backend=backend), ref.float(),
                               rtol=1e-5, atol=1e-4)
    # rows with a stride larger than the width (a column slice of a wider matrix)
    big = torch.randn(300, 1200, generator=g)
    Wv = big[:, 100:1100]
    torch.testing.assert_close(gather_gemv(Wv, idx, c, backend=backend),
                               (c.double() @ Wv.double()[idx]).float(), rtol=1e-5, atol=1e-4)
    empty = gather_gemv(W, torch.empty(0, dtype=torch.int64), torch.empty(0), backend=backend)
    assert torch.equal(empty, torch.zeros(1000))
    out = torch.full((1000,), 7.0)
    gather_gemv(W, idx, c, out=out, backend=backend)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-4)
    with pytest.raises(IndexError):
        gather_gemv(W, torch.tensor([0, 300]), torch.ones(2), backend=backend)
    with pytest.raises(IndexError):
        gather_gemv(W, torch.tensor([-1]), torch.ones(1), backend=backend)
    with pytest.raises(ValueError):
        gather_gemv(W.T, idx, c, backend=backend)  # columns not contiguous


def test_gather_gemv_threaded_deterministic_and_concurrent(native_lib):
    """Big enough for the thread pool (column chunks x row blocks with partial sums)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(9)
        W = torch.randn(500, 20000, generator=g)
        idx = torch.randperm(500, generator=g)[:400].sort().values
        c = torch.randn(400, generator=g)
        ref = (c.double() @ W.double()[idx]).float()
        a = gather_gemv(W, idx, c)
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-3)
        assert torch.equal(gather_gemv(W, idx, c), a)  # same grid, same summation order
        results = [None] * 4

        def work(i):
            results[i] = gather_gemv(W, idx, c)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            torch.testing.assert_close(r, ref, rtol=1e-5, atol=1e-3)
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs fork")
def test_pool_survives_fork(native_lib):
    W = torch.randn(300, 20000)
    idx = torch.arange(0, 300, 2)
    c = torch.randn(idx.numel())
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref = gather_gemv(W, idx, c)
        pid = os.fork()
        if pid == 0:  # child: the helper threads are gone; calls must still complete
            ok = torch.equal(gather_gemv(W, idx, c), ref)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        torch.set_num_threads(old)


def test_select_topk_abs_rule(native_lib):
    v = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 0.5, -0.0, 0.0])
    assert select_topk_abs(v, 3).tolist() == [1, 2, 3]  # |-3| = |3| > |2| = |-2|: lower index
    assert select_topk_abs(v, 0).tolist() == []
    assert select_topk_abs(v, 8).tolist() == list(range(8))
    assert select_topk_abs(v, 20).tolist() == list(range(8))
    assert select_topk_abs(v, 7).tolist() == [0, 1, 2, 3, 4, 5, 6]
    nan = torch.tensor([1.0, float("nan"), float("inf"), -5.0])
    assert select_topk_abs(nan, 2).tolist() == [1, 2]
    with pytest.raises(ValueError):
        select_topk_abs(v, -1)
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 100, 5000):
        ties = torch.randint(-3, 4, (n,), generator=g).float() * 0.5  # heavy ties and zeros
        rnd = torch.randn(n, generator=g)
        for vec in (ties, rnd):
            for k in {0, 1, n // 3, n // 2, n - 1, n}:
                assert torch.equal(select_topk_abs(vec, k, backend="native"),
                                   select_topk_abs(vec, k, backend="torch")), (n, k)


def test_select_topk_abs_stays_on_the_tensors_device(native_lib):
    """A tensor off the CPU never reaches the C kernel (its pointer is not host memory; before,
    'auto' passed it and crashed): the torch rule runs on its device ('meta' stands in for
    CUDA here)."""
    v = torch.empty(10, device="meta")
    for k in (0, 3, 10):
        s = select_topk_abs(v, k)
        assert s.device.type == "meta" and s.shape == (k,) and s.dtype == torch.int64


def test_batch_rows_and_validation():
    d, D = 16, 24
    Wg, Wu, Wd, _ = make_mlp(d, D, seed=2)
    w = SparseMLPWeights(Wg, Wu, Wd)
    X = torch.randn(3, d)
    y, s_ins, s_outs = sparse_mlp(w, X, 5, 9, return_indices=True)
    assert y.shape == (3, d) and len(s_ins) == 3
    for t in range(3):
        y_ref, r_in, r_out = masked_dense_reference(Wg, Wu, Wd, X[t], 5, 9, return_indices=True)
        assert torch.equal(s_ins[t], r_in) and torch.equal(s_outs[t], r_out)
        torch.testing.assert_close(y[t], y_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        sparse_mlp(w, X, -1, 3)
    with pytest.raises(ValueError):
        sparse_mlp(w, X, 1, 3, act="relu")
    with pytest.raises(ValueError):
        sparse_mlp(w, torch.randn(d + 1), 1, 3)
    with pytest.raises(TypeError):
        sparse_mlp(w, X[0], 0.5, 3)


def test_fallback_when_compilation_fails(tmp_path, monkeypatch):
    """No compiler / a failing compiler: one RuntimeWarning, then the pure-torch path."""
    d, D = 12, 20
    Wg, Wu, Wd, x = make_mlp(d, D, seed=4)
    w = SparseMLPWeights(Wg, Wu, Wd)
    bad_cc = tmp_path / "bad-cc"
    bad_cc.write_text("#!/bin/sh\necho 'error: broken compiler' >&2\nexit 1\n")
    bad_cc.chmod(0o755)
    monkeypatch.delenv("DIPSTREAM_NATIVE", raising=False)
    try:
        for cc in ("/nonexistent/dir/cc", str(bad_cc)):
            with pytest.warns(RuntimeWarning, match="pure-torch"):
                assert _native.load(force=True, cc=cc, build_dir=tmp_path) is None
            assert not _native.status()["available"]
            y, s_in, s_out = sparse_mlp(w, x, 5, 8, return_indices=True)
            y_ref, r_in, r_out = masked_dense_reference(Wg, Wu, Wd, x, 5, 8, return_indices=True)
            assert torch.equal(s_in, r_in) and torch.equal(s_out, r_out)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(select_topk_abs(x, 4), select_topk_abs(x, 4, backend="torch"))
            with pytest.raises(RuntimeError):
                sparse_mlp(w, x, 5, 8, backend="native")
        monkeypatch.setenv("DIPSTREAM_NATIVE", "0")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # disabled on purpose: no warning
            assert _native.load(force=True) is None
    finally:
        monkeypatch.undo()  # the environment as it was, then the kernel state it implies
        _native.load(force=True, quiet=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=st.integers(1, 24), D=st.integers(1, 40), fin=st.floats(0, 1.2), fout=st.floats(0, 1.2),
       act=st.sampled_from(["silu", "gelu_tanh"]), seed=st.integers(0, 2**31 - 1),
       scaled=st.booleans(), backend=st.sampled_from(BACKENDS))
def test_property_small_shapes(d, D, fin, fout, act, seed, scaled, backend):
    if backend == "native":
        _kernel_or_skip()
    Wg, Wu, Wd, x = make_mlp(d, D, seed=seed, scaled=scaled)
    k_in, k_out = int(fin * d), int(fout * D)
    w = SparseMLPWeights(Wg, Wu, Wd)
    y, s_in, s_out, y_ref, r_in, r_out = run_both(w, Wg, Wu, Wd, x, k_in, k_out, act, backend)
    assert torch.equal(s_in, r_in)  # same x, same rule: always identical
    assert s_out.numel() == r_out.numel() == min(k_out, D)
    h = hidden(Wg, Wu, x, r_in, act)
    if r_out.numel():
        assert_same_selection(s_out, r_out, h, r_out.numel())
    if torch.equal(s_out, r_out):
        assert_close_y(y, y_ref, Wd, h, r_out)
    assert torch.isfinite(y).all()
