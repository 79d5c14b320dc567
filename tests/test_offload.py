"""Offloading runtime: the bundled file round-trips, bad files are refused, the RAM caches stay
within the budget and mirror the simulator's policy, and a run's trace replays to the same hits."""

from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dipstream.errors import DipstreamError
from dipstream.models.arch import mlp_parts
from dipstream.kernels import native as _native
from dipstream.runtime import offload_file as of
from dipstream.runtime.decode import DecodeOptions
from dipstream.sparsity import MethodOptions, build_method
from dipstream.runtime.offload import OffloadRuntime, offload_capacities, parse_budget
from dipstream.simulator import Hardware, ModelShape, simulate
from tests.conftest import decode_with_runtime, shape_of
from dipstream.simulator.hardware import KINDS


def small_llama(seed=0):
    """A small random Llama (d=64, D=256) whose MLP units are big enough for partial caches."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      hidden_act="silu")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture
def model():
    return small_llama()


@pytest.fixture
def offload_dir(tmp_path, model):
    d = tmp_path / "off"
    of.write_offload(d, mlp_parts(model), "small")
    return d


def test_layout_offsets_are_aligned():
    lay = of.Layout(30, 576, 1536)
    assert lay.in_stride == 12288 and lay.out_stride == 2560  # 2304 B padded to 512
    for i in (0, 1, 29):
        assert lay.in_offset(i) % 4096 == 0 and lay.out_offset(i) % 4096 == 0
        assert lay.out_offset(i) >= lay.in_offset(i) + 576 * 12288
    assert lay.size == 30 * lay.layer_bytes and lay.mlp_bytes == 30 * 3 * 576 * 1536 * 4


def test_file_round_trips(model, offload_dir):
    """Every record read back (runs, single units, whole regions) equals the model's weights."""
    parts = mlp_parts(model)
    f = of.open_offload(offload_dir, model="small", shape=(2, 64, 256),
                        fingerprint_=of.fingerprint(parts))
    try:
        lay = f.layout
        buf = of.aligned_bytes(f.layout.D * lay.out_stride)
        rng = np.random.default_rng(0)
        for layer, p in enumerate(parts):
            gu = torch.cat([p.gate_weight.t(), p.up_weight.t()], 1)  # (d, 2D)
            dn = p.down_weight.t()                                     # (D, d)
            for kind, ref in (("in", gu), ("out", dn)):
                n, ub, stride = lay.hook(kind)
                for units in (np.arange(n), np.sort(rng.choice(n, n // 3, replace=False)),
                              np.array([0, 1, 2, n - 1]), np.array([5])):
                    reads = f.read_runs(kind, layer, units, buf, max_read=3 * stride)
                    runs = 1 + int(np.sum(np.diff(units) != 1))
                    assert runs <= reads <= units.size
                    got = buf.view(torch.float32).as_strided((units.size, ub // 4), (stride // 4, 1))
                    assert torch.equal(got, ref[torch.from_numpy(units)])
        assert f.direct == bool(f.direct)
    finally:
        f.close()


def test_corrupt_truncated_and_mismatched_files(model, offload_dir, tmp_path):
    parts = mlp_parts(model)
    of.open_offload(offload_dir, model="small").close()
    data = offload_dir / of.DATA_NAME
    raw = bytearray(data.read_bytes())
    # one flipped byte: same size, wrong checksum
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(DipstreamError, match="corrupt: its sha256"):
        of.open_offload(offload_dir, model="small")
    # truncated
    data.write_bytes(bytes(raw[:-4096]))
    with pytest.raises(DipstreamError, match="truncated or corrupt"):
        of.open_offload(offload_dir, model="small")
    # other model / other weights / not an offload directory
    d2 = tmp_path / "off2"
    of.write_offload(d2, parts, "small")
    with pytest.raises(DipstreamError, match="not 'other'"):
        of.open_offload(d2, model="other")
    with pytest.raises(DipstreamError, match="different weights"):
        of.open_offload(d2, fingerprint_="0" * 16)
    with pytest.raises(DipstreamError, match="no mlp.json"):
        of.open_offload(tmp_path)
    (d2 / of.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DipstreamError, match="unreadable"):
        of.open_offload(d2)
    for e in (DipstreamError("x"),):  # errors are one line
        assert "\n" not in str(e)


def test_direct_io_fallback_warns(model, offload_dir, monkeypatch):
    """A filesystem without O_DIRECT: one warning that numbers include the page cache; reads
    still return the right bytes."""
    monkeypatch.setattr(of, "open_direct", lambda path, align: None)
    with pytest.warns(RuntimeWarning, match="page cache"):
        f = of.open_offload(offload_dir, model="small")
    try:
        assert not f.direct
        buf = of.aligned_bytes(64 * f.layout.in_stride)
        f.read_runs("in", 1, np.arange(64), buf)
        p = mlp_parts(model)[1]
        got = buf.view(torch.float32).view(64, -1)[:, :256]
        assert torch.equal(got, p.gate_weight.t())
    finally:
        f.close()
    with warnings.catch_warnings():  # asked for buffered reads: no warning
        warnings.simplefilter("error")
        of.open_offload(offload_dir, model="small", direct=False).close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or not hasattr(os, "O_DIRECT"),
                    reason="needs /dev/shm and O_DIRECT")
def test_tmpfs_direct_io_detection(model, tmp_path):
    """On tmpfs (which refuses O_DIRECT before Linux 6.6) support is detected for real: direct
    reads where the open and a trial read succeed, else the fallback with its warning."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        of.write_offload(d, mlp_parts(model), "small")
        try:
            fd = os.open(os.path.join(d, of.DATA_NAME), os.O_RDONLY | os.O_DIRECT)
            os.close(fd)
            supported = True
        except OSError:
            supported = False
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            f = of.open_offload(d, model="small")
        f.close()
        warned = any("page cache" in str(x.message) for x in w)
        assert f.direct == supported and warned == (not supported)


def _runtime(model, offload_dir, method, density_k, budget, policy="lru", gamma=0.1):
    parts = mlp_parts(model)
    L = len(parts)
    f = of.open_offload(offload_dir, model="small")
    kin, kout = density_k
    return OffloadRuntime(f, parts[0].act_name, build_method(method, 1.0, MethodOptions(gamma=gamma)),
                          [kin] * L, [kout] * L, budget, shape_of(model), 64, policy)


def _check_cache_state(rt, parts):
    assert rt.ram_bytes() <= rt.budget
    assert rt.cached_bytes() == sum(int(c.cached.sum()) * rt.lay.hook(kind)[1]
                                    for kind, cs in rt.caches.items() for c in cs)
    for kind in ("in", "out"):
        for layer, c in enumerate(rt.caches[kind]):
            assert c.cached.sum() <= c.capacity == rt.capacity[f"layers.{layer}.{kind}"]
            # physical == the simulated cache's set
            assert np.array_equal(c.cached, rt.cacheset.cached(f"layers.{layer}.{kind}")[0])
            units = np.flatnonzero(c.cached)
            p = parts[layer]
            ref = (torch.cat([p.gate_weight.t(), p.up_weight.t()], 1) if kind == "in"
                   else p.down_weight.t())[torch.from_numpy(units)]
            assert torch.equal(c.slab[torch.from_numpy(c.slot[units])], ref)  # right data


@pytest.mark.parametrize("method,policy", [("dip", "lru"), ("dip-ca", "lru"), ("dense", "lru"),
                                           ("dip", "lfu"), ("dip-ca", "window")])
def test_cache_never_exceeds_budget(model, offload_dir, method, policy):
    ref_parts = mlp_parts(model)
    lay = of.Layout(2, 64, 256)
    budget = max(lay.d * lay.in_stride, lay.D * lay.out_stride) + int(0.3 * lay.mlp_bytes)
    rt = _runtime(model, offload_dir, method, (38, 90), budget, policy)
    assert 0 < rt.capacity["layers.0.in"] < 64 and 0 < rt.capacity["layers.0.out"] < 256
    decode = rt.decode

    def checked(layer, x):
        y = decode(layer, x)
        _check_cache_state(rt, ref_parts)
        return y
    rt.decode = checked
    ids = torch.randint(1, 96, (1, 7), generator=torch.Generator().manual_seed(3))
    try:
        decode_with_runtime(model, rt, ids, DecodeOptions(max_new_tokens=12, stop_at_eos=False))
    finally:
        rt.file.close()
    _check_cache_state(rt, ref_parts)
    assert rt.counters.tokens == 11 and rt.counters.reads > 0 and 0 < rt.counters.hit_units


def test_budget_too_small_and_bad_budget(model, offload_dir):
    lay = of.Layout(2, 64, 256)
    need = max(lay.d * lay.in_stride, lay.D * lay.out_stride)
    with pytest.raises(DipstreamError, match="less than one token's working set"):
        _runtime(model, offload_dir, "dip", (32, 128), need - 1)
    rt = _runtime(model, offload_dir, "dip", (32, 128), need)  # exactly the buffer: no cache
    assert rt.cache_bytes == 0 and rt.capacity["layers.0.in"] == 0
    rt.file.close()
    assert parse_budget("0.5x", 1000) == 500 and parse_budget("2kB", 0) == 2000
    with pytest.raises(DipstreamError, match="--dram"):
        parse_budget("lots", 1000)


def test_capacities_match_the_simulator_split():
    shape = ModelShape(30, 576, 1536, 49152, 9, 3, True)
    hooks, cap, dram = offload_capacities(shape, 60 * 1_000_000, 512)
    # split per linear (the reference): 30 layers x 3 linears = 90 shares of 60 MB / 90;
    # an up/gate hook gets 2 shares (1.33 MB / 12288 B units), a down hook 1 (0.67 MB / 2304 B)
    share = 60_000_000 / 90
    assert cap[0] == int(2 * share // (2 * 1536 * 4)) == 108
    assert cap[1] == int(share // (576 * 4)) == 289
    assert [h.name for h in hooks[:2]] == ["layers.0.in", "layers.0.out"]


@pytest.mark.parametrize("method", ["dip", "dip-ca", "dense"])
def test_trace_replays_to_the_same_hits(model, offload_dir, method):
    """The run's masks through the simulator (same policy and capacities, the runtime's DRAM
    figure, the reference's random over-capacity fill) give exactly the runtime's RAM and disk
    unit bytes per decoded token."""
    lay = of.Layout(2, 64, 256)
    budget = max(lay.d * lay.in_stride, lay.D * lay.out_stride) + int(0.3 * lay.mlp_bytes)
    rt = _runtime(model, offload_dir, method, (38, 90), budget)
    ids = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    try:
        decode_with_runtime(model, rt, ids, DecodeOptions(max_new_tokens=10, stop_at_eos=False))
    finally:
        rt.file.close()
    trace = rt.trace(5, {"model": "small", "method": method, **shape_of(model).to_dict()})
    hw = Hardware(name="fp32", bits={k: 32 for k in KINDS})
    res = simulate(trace, hw, shape_of(model), policy="lru", dram_bytes=rt.sim_dram_bytes,
                   seq_len=rt.seq_len)
    n = rt.counters.tokens
    assert res.n_tokens == n == 9
    assert res.mlp_dram_bytes_per_token == pytest.approx(rt.counters.ram_bytes / n)
    assert res.mlp_flash_bytes_per_token == pytest.approx(
        (rt.counters.selected_bytes - rt.counters.ram_bytes) / n)
    assert res.capacity_units == [rt.capacity[h] for h in res.hook_names]


def test_async_reads_and_read_errors(model, offload_dir):
    """submit_runs/result reads the same bytes as read_runs; a read past the end of the file is
    a one-line error and leaves the reader usable."""
    f = of.open_offload(offload_dir, model="small")
    try:
        lay = f.layout
        a = of.aligned_bytes(64 * lay.in_stride)
        b = of.aligned_bytes(64 * lay.in_stride)
        units = np.array([0, 1, 2, 7, 9, 10, 40, 63])
        f.read_runs("in", 0, units, a)
        reads, secs = f.submit_runs("in", 0, units, b).result()
        assert reads == 5 and secs >= 0 and torch.equal(a[:8 * lay.in_stride],
                                                        b[:8 * lay.in_stride])
        with pytest.raises(DipstreamError, match="reading .* failed"):
            f.read_extents(np.array([lay.size]), np.array([512]), np.array([a.data_ptr()]), a)
        f.layout = of.Layout(4, 64, 256)  # pretend there are more layers than the file holds
        with pytest.raises(DipstreamError, match="reading .* failed"):
            f.submit_runs("in", 3, units, b).result()
        f.layout = lay
        f.read_runs("out", 1, np.arange(10), a)  # still works
        got = a.view(torch.float32).as_strided((10, 64), (lay.out_stride // 4, 1))
        assert torch.equal(got, mlp_parts(model)[1].down_weight.t()[:10])
    finally:
        f.close()


def _thread_cpu_ticks() -> dict:
    """{thread id: user + system CPU clock ticks} of this process's threads (Linux /proc)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_async_reads_use_at_most_io_threads(tmp_path):
    """ds_pread_submit lets ``nthreads`` I/O threads read even when an earlier call with more
    left a larger pool (it made the whole pool active, so --io-threads stopped being honoured):
    with nthreads=1 a single pool thread does the reads."""
    lib = _native.load()
    if lib is None:
        pytest.skip("native library unavailable")
    size, ext = 32 << 20, 256 << 10
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
    fd = os.open(path, os.O_RDONLY)
    buf = of.aligned_bytes(size)
    off = np.arange(size // ext, dtype=np.int64) * ext
    ln = np.full(off.size, ext, np.int64)
    dst = buf.data_ptr() + off

    def read_all(nthreads):
        assert lib.ds_pread_submit(fd, off.size, off.ctypes.data, ln.ctypes.data,
                                   dst.ctypes.data, nthreads) == 0
        time.sleep(0.05)  # the I/O threads read; the waiting caller would join in
        assert lib.ds_pread_wait(None) == 0

    try:
        read_all(8)  # a pool of at least 8 I/O threads
        before = _thread_cpu_ticks()
        for _ in range(40):
            read_all(1)
        after = _thread_cpu_ticks()
    finally:
        os.close(fd)
    main = threading.get_native_id()
    busy = [t for t, v in after.items() if t != main and v - before.get(t, 0) >= 2]
    assert len(busy) <= 1, busy
    assert torch.equal(buf[:4096], torch.from_numpy(np.fromfile(path, np.uint8, 4096)))


def test_hot_placement_pins_the_profiled_units(model, offload_dir):
    """PowerInfer's placement in the offloading runtime: with hot fraction 1 each cache holds the
    units of highest profiled count and nothing else (cold units are streamed); the tokens are
    those of an LRU-cached run (placement never changes the output)."""
    lay = of.Layout(2, 64, 256)
    budget = max(lay.d * lay.in_stride, lay.D * lay.out_stride) + int(0.3 * lay.mlp_bytes)
    rng = np.random.default_rng(0)
    freq = {f"layers.{i}.{k}": rng.permutation(n).astype(np.int64) for i in range(2) for k, n in (("in", 64), ("out", 256))}
    parts = mlp_parts(model)
    f = of.open_offload(offload_dir, model="small")
    rt = OffloadRuntime(f, parts[0].act_name, build_method("dip", 1.0), [38, 38], [90, 90], budget, shape_of(model),
                        64, "hot", fraction=1.0, frequency=freq)
    ids = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    try:
        out = decode_with_runtime(model, rt, ids, DecodeOptions(max_new_tokens=8, stop_at_eos=False))
        for kind in ("in", "out"):
            for layer, c in enumerate(rt.caches[kind]):
                cap = rt.capacity[f"layers.{layer}.{kind}"]
                assert 0 < cap < len(c.cached)
                hot = np.argsort(-freq[f"layers.{layer}.{kind}"], kind="stable")[:cap]
                assert set(np.flatnonzero(c.cached)) == set(hot.tolist())
        _check_cache_state(rt, parts)
    finally:
        rt.file.close()
    dense = OffloadRuntime(of.open_offload(offload_dir, model="small"), parts[0].act_name, build_method("dip", 1.0),
                           [38, 38], [90, 90], budget, shape_of(model), 64, "lru")
    try:
        assert out == decode_with_runtime(model, dense, ids, DecodeOptions(max_new_tokens=8, stop_at_eos=False))
    finally:
        dense.file.close()
    with pytest.raises(DipstreamError, match="calibration counts"):
        OffloadRuntime(of.open_offload(offload_dir, model="small"), parts[0].act_name, build_method("dip", 1.0),
                       [38, 38], [90, 90], budget, shape_of(model), 64, "hot")
