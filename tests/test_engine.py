"""The lean engine: exact against the Hugging Face forward in float32 on every family of the
architecture table it runs, quantized records round-trip, the offloaded MLP equals the MLP in RAM,
reads only what it claims, never holds more than its caches, and its trace replays to the same
hits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from transformers import AutoModelForCausalLM

from dipstream.engine.decode import DecodeOptions, generate
from dipstream.engine.export import export_checkpoint
from dipstream.engine.mlp import MaskChooser, OffloadMLP, RamMLP
from dipstream.engine.model import LeanModel
from dipstream.engine.modelfile import manifest_digest, mlp_tensor, read_manifest
from dipstream.engine.qmatrix import QMatrix, dequantize_records, quantize_records
from dipstream.errors import DipstreamError
from dipstream.names import layer_key
from dipstream.options import CacheAwareOptions
from dipstream.sparsity.decoding import decode_rule

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
# every family of the architecture table the engine runs, with what sets it apart switched on
FAMILIES = {
    "llama-tied": lambda: T.LlamaConfig(**TINY, hidden_act="silu", tie_word_embeddings=True),
    "llama": lambda: T.LlamaConfig(**TINY, hidden_act="silu"),
    "llama3-rope": lambda: T.LlamaConfig(**TINY, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "linear-rope": lambda: T.LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                                                    "factor": 2.0}),
    "yarn-rope": lambda: T.Qwen2Config(**TINY, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                "factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": lambda: T.MistralConfig(**TINY, sliding_window=5, head_dim=24),
    "qwen2": lambda: T.Qwen2Config(**TINY, hidden_act="silu"),
    "qwen2-window": lambda: T.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": lambda: T.Qwen3Config(**TINY, head_dim=16),
    "smollm3": lambda: T.SmolLM3Config(**TINY, no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2),
    "phi3": lambda: T.Phi3Config(**TINY, pad_token_id=0, sliding_window=5, partial_rotary_factor=0.5),
    "phi3-longrope": lambda: T.Phi3Config(**TINY, pad_token_id=0, original_max_position_embeddings=32, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5, 2.0, 3.0],
        "long_factor": [2.0, 4.0, 8.0, 16.0], "partial_rotary_factor": 0.5}),
    "gemma": lambda: T.GemmaConfig(**TINY, head_dim=32),
    "gemma2": lambda: T.Gemma2Config(**TINY, head_dim=16, sliding_window=4, attn_logit_softcapping=5.0,
                                     final_logit_softcapping=3.0, query_pre_attn_scalar=24),
    "gemma3": lambda: T.Gemma3TextConfig(**TINY, head_dim=16, hidden_activation="gelu_pytorch_tanh", sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"]),
}
QUANTIZED = ("llama-tied", "llama", "qwen2", "gemma3")  # exported in every format too


def hf_model(name: str):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(FAMILIES[name](), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2 if p.dim() == 2 else 0.3)
    return m


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{(family, format): (hf model, model folder)}"""
    out = {}
    root = tmp_path_factory.mktemp("engine")
    for name in FAMILIES:
        m = hf_model(name)
        m.save_pretrained(root / f"{name}-hf")
        for fmt in ("float32", "int8", "int4") if name in QUANTIZED else ("float32",):
            export_checkpoint(root / f"{name}-hf", root / f"{name}-{fmt}", name, fmt)
            out[name, fmt] = (m, root / f"{name}-{fmt}")
    return out


IDS = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))


def model(d, max_seq: int = 16, **kw) -> LeanModel:
    """The engine's model of folder d (its MLP backend still to set)."""
    return LeanModel(d, read_manifest(d), max_seq, **kw)


def chooser(method: str, k_in, k_out, **ca) -> MaskChooser:
    return MaskChooser(decode_rule(method, CacheAwareOptions(**ca)), k_in, k_out)


def dense_model(d, **kw) -> LeanModel:
    """The model in folder d with its MLP dense in RAM."""
    lm = model(d, **kw)
    lm.mlp = RamMLP(lm, chooser("dense", [lm.d] * lm.L, [lm.D] * lm.L))
    return lm


def run_ids(lm: LeanModel) -> np.ndarray:
    """Logits (12, vocab) of the test sequence IDS, token by token."""
    return np.stack([lm.forward(int(t), i) for i, t in enumerate(IDS[0])])


def greedy(n: int) -> DecodeOptions:
    return DecodeOptions(max_new_tokens=n, stop_at_eos=False)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_float32_equals_the_hugging_face_forward(exported, name):
    m, d = exported[name, "float32"]
    lm = dense_model(d)
    with torch.no_grad():
        ref = m(input_ids=IDS).logits[0].numpy()
    got = run_ids(lm)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # greedy decoding: the same tokens as transformers' generate
    hf = m.generate(IDS[:, :5], max_new_tokens=8, do_sample=False)[0, 5:].tolist()
    assert generate(lm, IDS[0, :5].tolist(), greedy(8))["ids"] == hf
    lm.close()


def test_each_family_runs_what_sets_it_apart(exported):
    """The manifests carry what the families differ in: windows per layer, NoPE layers, partial
    rotary tables, soft-capping, q/k norms and biases where the checkpoint has them."""
    arch = {n: read_manifest(exported[n, "float32"][1])["arch"] for n in FAMILIES}
    assert [x["window"] for x in arch["mistral"]["layers"]] == [5, 5]
    assert [x["window"] for x in arch["qwen2-window"]["layers"]] == [0, 4]
    assert [x["rope"] for x in arch["smollm3"]["layers"]] == ["default", None]
    assert len(arch["phi3"]["rope"]["default"]["inv_freq"]) == 16 // 2 // 2  # head_dim 16, half of it rotated
    assert arch["gemma2"]["attn_softcap"] == 5.0 and arch["gemma2"]["final_softcap"] == 3.0
    assert arch["gemma2"]["query_scale"] == pytest.approx(24 ** -0.5)
    assert set(arch["gemma3"]["rope"]) == {"sliding_attention", "full_attention"}
    rope = {n: arch[n]["rope"]["default"] for n in ("llama", "linear-rope", "yarn-rope", "phi3-longrope")}
    assert rope["linear-rope"]["type"] == "linear" and rope["yarn-rope"]["scale"] > 1.0
    assert rope["phi3-longrope"]["limit"] == 32 and rope["llama"]["limit"] is None
    with pytest.raises(DipstreamError, match="exceed the 32 .* longrope RoPE holds"):  # the long factors: refused
        model(exported["phi3-longrope", "float32"][1], max_seq=33)
    infos = {n: read_manifest(exported[n, "float32"][1])["tensor_info"] for n in ("qwen2", "qwen3", "llama")}
    assert "layers.0.q_bias" in infos["qwen2"] and "layers.0.q_norm" in infos["qwen3"]
    assert not any(k.endswith(("_bias", "_norm")) and "q_" in k for k in infos["llama"])


def test_head_dim_is_the_configs_on_every_path(exported, tmp_path):
    """Gemma's heads are wider than d / heads: the shape from the config, the loaded model, the
    engine's manifest and a recorded trace all say the config's head_dim, and a trace recorded
    with another head_dim is refused."""
    from dipstream.models.arch import describe
    from dipstream.simulator import load_trace, save_trace
    from dipstream.simulator.model_shape import SHAPES, ModelShape
    from dipstream.simulator.trace import check_trace_matches

    m, d = exported["gemma", "float32"]
    assert m.config.head_dim == 32 != 64 // 4
    shapes = [ModelShape.from_hf_config(m.config), describe(m).shape,
              ModelShape.from_dict(read_manifest(d)["arch"]["shape"]), model(d).shape]
    assert all(s.head_dim == 32 for s in shapes) and len(set(shapes)) == 1
    assert SHAPES["gemma3-270m"].head_dim == 256  # Gemma 3 270M: 4 heads of 256 over d = 640
    lm = model(d)
    lm.mlp = RamMLP(lm, chooser("dip", [30, 30], [40, 40]), record_masks=True)
    generate(lm, IDS[0, :4].tolist(), greedy(3))
    trace = lm.mlp.rec.trace(4, {"model": "tiny", **lm.shape.to_dict()})
    save_trace(trace, tmp_path / "t.npz")
    check_trace_matches(load_trace(tmp_path / "t.npz"), shapes[0])
    other = ModelShape.from_dict({**shapes[0].to_dict(), "head_dim": 16})
    with pytest.raises(ValueError, match="head_dim=32"):
        check_trace_matches(load_trace(tmp_path / "t.npz"), other)


def test_sampling_with_a_seed_gives_the_same_tokens_in_ram_and_offloaded(exported):
    """One sampler on every path: the same seed gives the same sampled tokens from the MLP in RAM
    and from the file (dense: the same logits), and another seed other tokens."""
    _, d = exported["llama", "float32"]
    opts = DecodeOptions(max_new_tokens=10, stop_at_eos=False, sample=True, temperature=1.5, top_k=20,
                         sample_seed=7)
    runs = []
    for offload in (False, True, True):
        lm = model(d, 32)
        ch = chooser("dense", [64, 64], [96, 96])
        lm.mlp = OffloadMLP(lm, ch, 30_000, direct=False) if offload else RamMLP(lm, ch)
        runs.append(generate(lm, IDS[0, :4].tolist(), opts)["ids"])
        lm.close()
        opts = DecodeOptions(**{**opts.__dict__}) if len(runs) < 2 else DecodeOptions(**{**opts.__dict__, "sample_seed": 8})
    assert runs[0] == runs[1] != runs[2]
    assert len(set(runs[0])) > 1


@pytest.mark.parametrize("fmt,tol", [("int8", 0.01), ("int4", 0.15)])
def test_quantized_records_round_trip(fmt, tol):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 48)).astype(np.float32)  # 64 records (2 input groups) of 48 outputs
    rec, hd, hm = quantize_records(W, fmt)
    assert hd.shape == (2, 48) and (hm is None) == (fmt == "int8")
    back = dequantize_records(rec, fmt, 48, hd, hm)
    assert np.linalg.norm(back - W) / np.linalg.norm(W) < tol
    again = quantize_records(back, fmt)  # a fixed point: GGUF-grid weights are stored without loss
    np.testing.assert_array_equal(again[0], rec)
    np.testing.assert_array_equal(dequantize_records(*again[:1], fmt, 48, *again[1:]), back)
    q = QMatrix.from_dense(W.T, fmt)  # y = W^T-stored: the kernels read what dense() returns
    x = rng.standard_normal(64).astype(np.float32)
    out = np.empty(48, np.float32)
    q.select(x, 64, np.empty(64, np.int64), np.empty(64, np.float32), out)
    np.testing.assert_allclose(out, q.dense() @ x, rtol=1e-4, atol=1e-4)
    # records gathered from other slots (a cache) with their units given: the same sum
    units = np.array([3, 40, 41, 63, 5], np.int64)
    slots = np.array([4, 0, 2, 1, 3], np.int64)
    slab = np.zeros((5, q.stride), np.uint8)
    slab[slots] = q.rec[units]
    got = q.gather(slots, x[units], np.empty(48, np.float32), rec=slab, units=units)
    np.testing.assert_allclose(got, q.dense()[:, units] @ x[units], rtol=1e-4, atol=1e-4)
    for j in (0, 17, 47):
        np.testing.assert_allclose(q.column(j), q.dense()[j], rtol=1e-6)


def test_int4_int8_records_hand_worked():
    """One input group of 32 records, output 0: w_u = u / 10 (u = 0..31) and output 1 = -w.
    int4 (Q4_1): offset = min, scale = (max - min) / 15 in float16, nibble = round((w - o) / d);
    int8 (Q8_0): scale = max|w| / 127, q = round(w / d)."""
    w = np.stack([np.arange(32) / 10, -np.arange(32) / 10], 1).astype(np.float32)  # 32 records x 2
    w = np.pad(w, ((0, 0), (0, 30)))  # 32 outputs (int4 packs outputs in pairs within 32)
    rec, hd, hm = quantize_records(w, "int4")
    assert hd[0, 0] == np.float16(3.1 / 15) and hm[0, 0] == np.float16(0.0) and hm[0, 1] == np.float16(-3.1)
    nib = rec[:, 0] & 15  # output 0 in the low nibble of byte 0
    np.testing.assert_array_equal(nib, np.rint(np.arange(32) / 10 / np.float32(np.float16(3.1 / 15))))
    rec8, hd8, hm8 = quantize_records(w, "int8")
    assert hm8 is None and hd8[0, 0] == np.float16(3.1 / 127)
    assert rec8[31, 0].view(np.int8) == 127 and rec8[31, 1].view(np.int8) == -127


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_int8_activations_exact_when_representable_and_close_otherwise(exported, fmt):
    """int4 / int8 products with activations quantized to int8 per input group: exactly the float
    path's numbers when every group's activations are multiples of max/127 (hand-checkable:
    integer products summed exactly), and close on a real decode."""
    rng = np.random.default_rng(0)
    m = 96 if fmt == "int4" else 100  # int8: 3 vector blocks of 32 outputs and a tail of 4
    q = QMatrix.from_dense(rng.standard_normal((m, 64)).astype(np.float32), fmt)
    k = rng.integers(-127, 128, 64)
    k[0], k[32] = 127, -127  # each group's max |x| is 1: x = k / 127 is on the int8 grid
    x = (k / 127).astype(np.float32)
    outs = []
    for flag in (False, True):
        q.act8 = flag
        for n in (64, 20):  # dense and a top-20 selection
            o = np.empty(m, np.float32)
            q.select(x, n, np.empty(64, np.int64), np.empty(64, np.float32), o)
            outs.append(o)
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[3], outs[1], rtol=1e-5, atol=1e-5)
    _, d = exported["llama", fmt]
    logits = []
    for acts in ("float32", "int8"):
        logits.append(run_ids(dense_model(d, activations=acts)))
    err = np.linalg.norm(logits[1] - logits[0]) / np.linalg.norm(logits[0])
    assert 0 < err < 0.05, err


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_int8_activations_gathered_in_parts_equal_one_call(fmt):
    """An offloaded hook gathers its cached and its read units in two calls: with the whole
    vector's group maxima, int8 activations get one scale per group, as in one call (without,
    each part's own maximum: a different quantization, 0.4 off here)."""
    rng = np.random.default_rng(1)
    q = QMatrix.from_dense(rng.standard_normal((96, 128)).astype(np.float32), fmt)
    q.act8 = True
    v = rng.standard_normal(128).astype(np.float32)
    every = np.arange(128, dtype=np.int64)
    one = q.gather(every, v.copy(), np.empty(96, np.float32))
    part = rng.random(128) < 0.5
    gmax = q.group_max(v)
    np.testing.assert_array_equal(gmax, np.abs(v).reshape(4, 32).max(1))
    sums = {}
    for g in (gmax, None):
        a, b = every[part], every[~part]
        sums[g is None] = (q.gather(a, v[a].copy(), np.empty(96, np.float32), gmax=g)
                           + q.gather(b, v[b].copy(), np.empty(96, np.float32), gmax=g))
    np.testing.assert_allclose(sums[False], one, rtol=0, atol=1e-5 * np.abs(one).max())
    assert np.abs(sums[True] - one).max() > 1e-3 * np.abs(one).max()
    with pytest.raises(ValueError, match="group maxima"):
        q.gather(every, v.copy(), np.empty(96, np.float32), gmax=gmax[:2])


def test_integer_products_portable_build_equals_the_simd_build(tmp_path):
    """The products of a build without -march=native (the portable loops) give the SIMD build's
    numbers, for int4 and int8 records and every GGUF block format (K-quant scale tables, 5- and
    6-bit planes), with int8 activations (the integer sums are exact, only the final scaling may
    round differently: an FMA against a multiply and an add) and float32 ones."""
    import ctypes
    import shutil

    from dipstream import native

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    so = tmp_path / "portable.so"
    ok, err = native._compile(cc, ("-O3",), so)
    assert ok, err
    portable = ctypes.CDLL(str(so))
    native._declare(portable)
    from gguf import GGMLQuantizationType as GT

    from dipstream.engine.gguf_blocks import move_matrices, record_format
    from tests.test_gguf_blocks import TYPES, random_blocks

    rng = np.random.default_rng(3)
    mats = [QMatrix.from_dense(rng.standard_normal((m, 256)).astype(np.float32), fmt)
            for fmt, m in (("int4", 96), ("int8", 100))]
    for name in TYPES:
        pieces = list(move_matrices([(random_blocks(name, 96, 256, rng), GT[name])]))
        heads = pieces[-1][1]
        rec = np.concatenate([p for kind, p in pieces if kind == "records"])
        mats.append(QMatrix(rec, record_format(GT[name]), 96, heads[0], heads[1] if len(heads) > 1 else None))
    for q in mats:
        for act8 in (True, False):
            q.act8 = act8
            x = rng.standard_normal(256).astype(np.float32)
            outs = []
            simd = q._lib
            for lib in (simd, portable):
                q._lib = lib
                o = np.empty(q.m, np.float32)
                q.select(x, 100, np.empty(256, np.int64), np.empty(256, np.float32), o)
                outs.append(o)
            q._lib = simd
            np.testing.assert_allclose(outs[1], outs[0], rtol=2e-6, atol=2e-6 * np.abs(outs[0]).max(),
                                       err_msg=f"{q.fmt} act8={act8}")


@pytest.mark.parametrize("method,gap", [("dense", 0), ("dip", 0), ("dip", 1 << 20)])
@pytest.mark.parametrize("fmt,acts", [("float32", "float32"), ("int4", "float32"), ("int4", "int8")])
def test_offloaded_mlp_equals_the_mlp_in_ram(exported, method, fmt, acts, gap):
    _, d = exported["llama", fmt]
    ks = ([40, 40], [50, 50])
    outs = []
    for off in (False, True):
        lm = model(d, activations=acts)
        ch = chooser(method, *ks)
        lm.mlp = OffloadMLP(lm, ch, 20_000, direct=False, read_gap=gap) if off else RamMLP(lm, ch)
        outs.append(run_ids(lm))
        if off:
            c = lm.mlp.counters
            assert c.disk_bytes > 0 and c.ram_bytes > 0  # a partial cache: both paths ran
            assert all(n <= lm.mlp.capacity[h] for h, n in zip(lm.mlp.caches.names,
                                                                [lm.mlp.caches.occupancy(h)[0]
                                                                 for h in lm.mlp.caches.names]))
        lm.close()
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fraction", [0.5, 1.0])
@pytest.mark.parametrize("fmt", ["float32", "int4"])
def test_hot_placement_equals_the_mlp_in_ram(exported, fmt, fraction):
    """Pinned units (preloaded at load, never evicted) plus an LRU part give the in-RAM output; the
    pinned ones are exactly the most frequent of the profile."""
    _, d = exported["llama", fmt]
    ks = ([40, 40], [50, 50])
    ram = model(d)
    ram.mlp = RamMLP(ram, chooser("dip", *ks))
    ref = run_ids(ram)
    lm = model(d)
    rng = np.random.default_rng(1)
    freq = {layer_key(i, k): rng.permutation(n) for i in range(lm.L) for k, n in (("in", lm.d), ("out", lm.D))}
    cache = 20_000 if fmt == "float32" else 4_000  # a part of the MLP either way
    lm.mlp = OffloadMLP(lm, chooser("dip", *ks), cache, "hot", direct=False, fraction=fraction, frequency=freq)
    assert lm.mlp.preload_bytes > 0
    out = run_ids(lm)
    c = lm.mlp.counters
    assert c.ram_bytes > 0 and c.disk_bytes > 0
    for name in lm.mlp.caches.names:
        cap = lm.mlp.capacity[name]
        pinned = np.argsort(-freq[name], kind="stable")[:int(fraction * cap)]
        assert lm.mlp.caches.cached(name)[0][pinned].all()
    lm.close()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("fmt", ["float32", "int8", "int4"])
def test_streamed_head_equals_the_head_in_ram(exported, name, fmt):
    """The head (and embedding) read from the file each token give the logits of the head in RAM,
    and its records no longer count as static RAM."""
    _, d = exported[name, fmt]
    outs, static = [], []
    for place in ("ram", "stream"):
        lm = dense_model(d, head=place)
        outs.append(run_ids(lm))
        static.append(lm.static_bytes)
        if place == "stream":
            infos = lm.manifest["tensor_info"]
            assert lm.streamed_bytes >= len(IDS[0]) * infos["head"].nbytes
            records = sum(infos[n].nbytes for n in ("head", "embed") if n in infos)
            buffers = lm.head.buf[0].nbytes + lm.head.buf[1].nbytes
        lm.close()
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())
    assert static[0] - static[1] >= records - buffers - 4096  # records leave RAM; buffers (+ alignment) come
    # the head in RAM, an untied embedding read from the file (what an offloaded run does)
    lm = dense_model(d, head="ram", stream_embed=True)
    np.testing.assert_array_equal(run_ids(lm), outs[0])
    embed = lm.manifest["tensor_info"].get("embed")
    if embed is None:  # tied: the head's records are the embedding, in RAM
        assert lm.embed_reader is None and lm.static_bytes == static[0]
    else:
        assert lm.streamed_bytes == len(IDS[0]) * embed.stride
        assert static[0] - lm.static_bytes == embed.nbytes
    lm.close()


def test_unread_records_are_never_used(exported, tmp_path):
    """NaN in every MLP record the masks do not select: outputs stay finite and unchanged."""
    import shutil

    _, d = exported["llama", "float32"]
    poisoned = tmp_path / "p"
    shutil.copytree(d, poisoned)
    m = read_manifest(poisoned)
    lm = model(d)
    rec = []
    lm.mlp = RamMLP(lm, chooser("dip", [20, 20], [30, 30]), record_masks=True)  # records which units the masks select
    ref = [lm.forward(int(t), i) for i, t in enumerate(IDS[0, :6])]
    used = {(h.kind, int(h.name.split(".")[1])): h.masks.any(0) for h in lm.mlp.rec.trace(6, {}).hooks}
    data = np.fromfile(poisoned / "model.bin", np.uint8)
    for (k, i), u in used.items():
        info = m["tensor_info"][mlp_tensor(i, k)]
        recs = data[info.offset:info.offset + info.rows * info.stride].reshape(info.rows, info.stride)
        recs[~u] = np.frombuffer(np.full(info.stride // 4, np.nan, np.float32).tobytes(), np.uint8)
        rec.append(int((~u).sum()))
    data.tofile(poisoned / "model.bin")
    assert sum(rec) > 0
    for off, gap in ((False, 0), (True, 0), (True, 4096)):  # a gap reads poisoned records, never uses them
        lm = model(poisoned, verify="never")  # the poison is deliberate: no sha256 check
        lm.mlp = OffloadMLP(lm, chooser("dip", [20, 20], [30, 30]), 8_000, direct=False, read_gap=gap) if off \
            else RamMLP(lm, chooser("dip", [20, 20], [30, 30]))
        got = [lm.forward(int(t), i) for i, t in enumerate(IDS[0, :6])]
        assert all(np.isfinite(g).all() for g in got)
        np.testing.assert_allclose(np.stack(got), np.stack(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,mode", [("dense", "auto"), ("dip", "predicted"), ("dip-ca", "predicted"),
                                         ("dip", "uncached"), ("dip-ca", "uncached")])
def test_prefetch_never_changes_the_output(exported, method, mode):
    """The same tokens with and without prefetching give identical logits and masks; dense
    streaming's prefetch is exact (every miss after the first layer's up/gate read ahead)."""
    _, d = exported["llama", "int4"]
    runs = []
    for pf in ("off", mode):
        lm = model(d)
        cache = 0 if method == "dense" else 30_000  # dense: no cache, every unit of every hook missed
        lm.mlp = OffloadMLP(lm, chooser(method, [30, 30], [40, 40], gamma=0.2), cache, direct=False, prefetch=pf)
        logits = run_ids(lm)
        runs.append((logits, lm.mlp.rec.trace(0, {}), lm.mlp.counters))
        lm.close()
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert all(np.array_equal(a.masks, b.masks) for a, b in zip(runs[0][1].hooks, runs[1][1].hooks))
    c = runs[1][2]
    assert runs[0][2].prefetch_bytes == 0 and c.prefetch_bytes > 0
    if method == "dense":  # 12 tokens x 2 layers x (64 + 96) units; layer 0's 64 inputs are not read ahead
        assert c.missed_units == 12 * 2 * (64 + 96) and c.prefetch_useful == c.prefetch_units
        assert c.prefetch_served == c.missed_units - 12 * 64


def test_read_plan_hand_worked():
    """Records of 48 bytes in 512-byte blocks: units 0, 1 (block 0) and 11 (bytes 528-575, block 1)
    touch, so one 1024-byte read; unit 40 (bytes 1920-1967, block 3) is a second read, or joins the
    first (one 2048-byte read) when a gap of 512 bytes (block 2) may be read through; the records
    wholly inside the reads are exactly the units asked for and their neighbours in those blocks."""
    from dipstream.engine.storage import BLOCK, covered, read_plan

    assert BLOCK == 512
    miss = np.array([0, 1, 11, 40])
    offs, lens = read_plan(miss, 48)
    assert offs.tolist() == [0, 1536] and lens.tolist() == [1024, 512]
    assert np.flatnonzero(covered(offs, lens, 64, 48)).tolist() == list(range(21)) + list(range(32, 42))
    offs, lens = read_plan(miss, 48, gap=512)
    assert offs.tolist() == [0] and lens.tolist() == [2048]


def test_dip_ca_trace_replays_to_the_same_hits(exported):
    """The offloaded DIP-CA run's masks through the simulator's caches give the run's hits."""
    from dipstream.simulator.caches import CacheSet

    _, d = exported["llama", "int8"]
    lm = model(d)
    lm.mlp = OffloadMLP(lm, chooser("dip-ca", [30, 30], [40, 40], gamma=0.2), 15_000, direct=False)
    generate(lm, IDS[0, :5].tolist(), greedy(6))
    tr = lm.mlp.rec.trace(5, {"model": "tiny", "method": "dip-ca", **lm.shape.to_dict()})
    caps = [lm.mlp.capacity[h.name] for h in tr.hooks]
    stride = {k: lm.mlp.stride[k] for k in ("in", "out")}
    # the run's RAM bytes are its hits times the record sizes
    per_kind = {k: 0 for k in stride}
    cs = CacheSet(tr.hooks, caps, "lru", grouping="hook")
    for t in range(tr.n_tokens):
        for h in tr.hooks:
            per_kind[h.kind] += int(cs.step(h.name, h.masks[t][None])[1][0])
    assert sum(per_kind.values()) > 0
    assert lm.mlp.counters.ram_bytes == sum(per_kind[k] * stride[k] for k in stride)


def test_float16_kv_cache_is_close(exported):
    """A float16 KV cache (half the bytes) changes the logits by float16 rounding only."""
    _, d = exported["llama", "float32"]
    out = []
    for kv in ("float32", "float16"):
        lm = dense_model(d, kv_dtype=kv)
        out.append(run_ids(lm))
        assert lm.kv_bytes == 2 * lm.K.nbytes and lm.K.dtype == np.dtype(kv)
    np.testing.assert_allclose(out[0], out[1], rtol=0, atol=5e-3 * np.abs(out[0]).max())


def test_perplexity_matches_the_forward(exported):
    """The engine's perplexity (one home: evaluation.perplexity, the engine scored token by token)
    equals the Hugging Face model's loss on the same window."""
    from dipstream.data.windows import Windows
    from dipstream.evaluation.perplexity import perplexity

    m, d = exported["llama", "float32"]
    w = Windows(IDS[:, :10], [1] * 9)
    res = perplexity(dense_model(d), w, progress=False)
    with torch.no_grad():
        loss = float(m(input_ids=IDS[:, :10], labels=IDS[:, :10]).loss)
    assert res.tokens == 9 and res.perplexity == pytest.approx(np.exp(loss), rel=1e-4)
    assert res.perplexity == pytest.approx(perplexity(m, w, progress=False).perplexity, rel=1e-4)


def test_unsupported_family_and_tampered_manifest(tmp_path, exported):
    import json
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "g")
    with pytest.raises(DipstreamError, match="no gated MLP"):
        export_checkpoint(tmp_path / "g", tmp_path / "g-out", "g")
    _, d = exported["llama", "int4"]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    man = json.loads((bad / "model.json").read_text())
    man["tensors"]["layers.0.mlp_in"]["stride"] += 4
    (bad / "model.json").write_text(json.dumps(man))
    with pytest.raises(DipstreamError, match="was edited after the export"):
        model(bad)
    man["manifest_sha256"] = manifest_digest(man)  # re-signed: the structural checks still refuse it
    (bad / "model.json").write_text(json.dumps(man))
    with pytest.raises(DipstreamError, match="inconsistent"):
        model(bad)


def _gen(args, tmp_path, name="row.json"):
    import json

    from dipstream.cli.main import main

    out = tmp_path / name
    assert main(["generate", "--no-stream", "--no-stop-at-eos", "--max-new-tokens", "6", "--prompt",
                 "the quick brown", "--threads", "1", "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("method", ["dense", "dip"])
def test_lean_cli_equals_the_hugging_face_engine(tiny_checkpoint, tmp_path, method):
    """Float32: `generate` on the lean engine gives the Hugging Face engine's tokens, in RAM and
    offloaded (density 1.0 / plain DIP reads change nothing)."""
    base = ["--model", str(tiny_checkpoint), "--method", method, "--model-dir", str(tmp_path / "m")]
    hf = _gen([*base, "--engine", "hf"], tmp_path)
    lean = _gen(base, tmp_path)
    off = _gen([*base, "--offload", str(tmp_path / "m"), "--dram", "300kB", "--policy", "lfu"], tmp_path)
    assert lean["engine"] == "lean" and hf["engine"] == "hf"
    assert lean["ids"] == hf["ids"] == off["ids"]
    assert off["cache_bytes"] > 0 and off["disk_bytes_per_token"] > 0


def test_lean_offload_cli_row_trace_and_errors(tiny_checkpoint, tmp_path, capsys):
    """DIP-CA offloaded on the lean engine: the row reports the budget it kept, the trace replays in
    the simulator, a --dram below the static weights and KV cache is one line giving the minimum,
    and an int4 export of a shape int4 cannot pack is refused with the fix."""
    from transformers import LlamaConfig

    from dipstream.cli.main import main
    from dipstream.simulator import load_trace

    trace = tmp_path / "t.npz"
    row = _gen(["--model", str(tiny_checkpoint), "--method", "dip-ca", "--weights", "int4", "--offload",
                str(tmp_path / "off"), "--dram", "150kB", "--trace", str(trace)], tmp_path)
    assert row["weights"] == "int4" and 0 < row["hit_rate"] <= 1 and row["new_tokens"] == 6
    assert 0.3 < row["density_measured"] < 0.6
    tr = load_trace(trace)
    assert tr.n_tokens == row["prompt_tokens"] + 5
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_checkpoint), "--weights", "int4", "--offload",
                 str(tmp_path / "off"), "--dram", "10kB", "--no-stream"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give more than" in err[0]
    odd = tmp_path / "odd"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "vocab_size": 95})).save_pretrained(odd)
    assert main(["export", "--model", str(odd), "--weights", "int4", "--head-weights", "int4", "--model-dir",
                 str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "95 outputs" in err[0] and "--head-weights int8" in err[0]
    # the default head beside int4 is int8 (as GGUF Q4 files keep token_embd in Q8_0)
    assert main(["export", "--model", str(odd), "--weights", "int4", "--model-dir", str(tmp_path / "o4")]) == 0


def test_whole_process_budget_holds_without_torch(tiny_checkpoint, tmp_path):
    """A lean offloaded run in its own process: no torch or transformers imported, and the peak
    resident memory of the whole process stays within --memory."""
    import json
    import subprocess
    import sys

    from dipstream.cli.main import main

    d = tmp_path / "m"
    assert main(["export", "--model", str(tiny_checkpoint), "--weights", "int8", "--model-dir", str(d)]) == 0
    row_file = tmp_path / "row.json"
    budget = 160 << 20
    code = ("import sys, json; from dipstream.cli.main import main; rc = main(sys.argv[1:]); "
            "json.dump(sorted(m for m in ('torch', 'transformers') if m in sys.modules), open(sys.argv[-1] + '.mods', 'w'));"
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "generate", "--model", str(tiny_checkpoint), "--weights", "int8",
                        "--offload", str(d), "--memory", str(budget), "--max-new-tokens", "8", "--no-stream",
                        "--prompt", "the lazy dog", "--json", str(row_file)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(row_file.read_text())
    assert json.loads((tmp_path / "row.json.mods").read_text()) == []
    assert row["peak_rss_bytes"] <= budget and row["cache_bytes"] > 0
    assert row["baseline_rss"] < row["peak_rss_bytes"]


def test_token_text_equals_the_tokenizer(tiny_checkpoint):
    """The lean engine's ids->text table decodes as `tokenizers` does (skipping special tokens);
    the real vocabularies are checked in tests/test_generate_real.py."""
    import tokenizers

    from dipstream.engine.text import TokenText, encode_and_release

    f = tiny_checkpoint / "tokenizer.json"
    tok = tokenizers.Tokenizer.from_file(str(f))
    table = TokenText.from_tokenizer(tok)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, tok.get_vocab_size(), 12).tolist()
        assert table.decode(ids) == tok.decode(ids, skip_special_tokens=True)
    ids, text = encode_and_release(f, "the quick brown fox, déjà vu")
    assert ids == tok.encode("the quick brown fox, déjà vu").ids and text.decode(ids) == tok.decode(ids)


def test_lean_tokenizer_is_written_only_when_it_matches(tiny_checkpoint, tmp_path):
    """Export writes the lean tokenizer when it reproduces `tokenizers` (the tiny byte-level BPE),
    and the engine then encodes with it; a tokenizer kind it does not encode gets none."""
    import json
    import shutil

    import tokenizers

    from dipstream.engine.text import LEAN_FILE, LeanTokenizer, encode_and_release, write_lean_tokenizer

    d = tmp_path / "t"
    d.mkdir()
    shutil.copy(tiny_checkpoint / "tokenizer.json", d)
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    kind = json.loads((d / "tokenizer.json").read_text())["model"]["type"]
    written = write_lean_tokenizer(d)
    assert written == (d / LEAN_FILE).exists()
    if written:
        lean = LeanTokenizer.load(d)
        for s in ("the quick brown fox", "naïve café 42", "a  b\tc\n\nd"):
            assert lean.encode(s) == tok.encode(s).ids
            assert encode_and_release(d / "tokenizer.json", s)[0] == tok.encode(s).ids
    else:
        assert kind != "BPE" or LeanTokenizer.from_json(json.loads((d / "tokenizer.json").read_text()), tok) is None
    bad = json.loads((d / "tokenizer.json").read_text())
    bad["model"]["type"] = "WordPiece"
    assert LeanTokenizer.from_json(bad, tok) is None


def test_probe_lean_writes_hardware_the_simulator_replays(tiny_checkpoint, tmp_path):
    """`dipstream probe --lean-model` on an exported model writes a hardware file with the engine's
    precision (an MLP unit is its 4-bit record; static int4 weights carry a float16 scale and offset per 32: 5 bits) and a host time; the
    simulator replays a lean run's trace with it."""
    from dipstream.cli.main import main
    from dipstream.simulator import load_hardware, load_trace, simulate

    _export = tmp_path / "m"
    hfdir = tiny_checkpoint
    export_checkpoint(hfdir, _export, str(hfdir), "int4")
    out = tmp_path / "hw.yaml"
    assert main(["probe", "--lean-model", str(_export), "--out", str(out), "--repeats", "1", "--reads", "64"]) == 0
    hw = load_hardware(out)
    assert hw.bits["mlp"] == 4.0 and hw.bits["attention"] == 5.0 and hw.bits["kv_cache"] == 32.0
    assert hw.dram_bw > 0 and hw.host_s_per_token >= 0 and hw.coalesce and hw.overlap and hw.read_gap_bytes == 32000
    assert hw.dram_bw_static["lm_head"] == hw.dram_bw_static["embedding"] > 0  # the head's own rate
    trace = tmp_path / "t.npz"
    assert main(["generate", "--model", str(hfdir), "--model-dir", str(_export), "--weights", "int4", "--trace",
                 str(trace), "--no-stream", "--max-new-tokens", "4", "--prompt", "abc"]) == 0
    tr = load_trace(trace)
    res = simulate(tr, hw, tr.shape(), policy="hot-same-trace", fraction=1.0, dram_bytes=1e15, seq_len=16)
    assert res.hit_rate == 1.0 and res.time_per_token_s >= hw.host_s_per_token


def test_generate_hot_placement_from_a_train_split_profile(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """`generate --offload --policy hot` profiles DIP on the train split once, pins by it, names the
    profile in the row and reuses it; bad combinations are one-line errors before any work."""
    from dipstream.cli.main import main
    from dipstream.simulator.policies import load_profile, save_profile

    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path / "cache"))
    base = ["--model", str(tiny_checkpoint), "--weights", "float32", "--offload", str(tmp_path / "off"), "--dram", "120kB"]
    row = _gen([*base, "--policy", "hot", "--hot-fraction", "1"], tmp_path)
    assert 0 < row["capacity_in"] < 32 and row["preload_bytes"] > 0  # part of the MLP pinned, read at load
    prof = row["hot_profile"]
    assert prof.startswith(str(tmp_path / "cache" / "profiles")) and row["policy"] == "hot"
    freq, meta = load_profile(prof)
    assert meta["split"] == "train" and meta["model"] == str(tiny_checkpoint)
    assert sorted(freq) == sorted(f"layers.{i}.{k}" for i in range(2) for k in ("in", "out"))
    lru = _gen([*base, "--policy", "lru"], tmp_path)
    assert row["ids"] == lru["ids"] and 0 < row["hit_rate"] < 1
    again = _gen([*base, "--policy", "hot", "--hot-fraction", "1", "--hot-profile", prof], tmp_path)
    assert again["hit_rate"] == row["hit_rate"] and again["hot_profile"] == prof
    capsys.readouterr()

    def err(args):
        assert main(["generate", "--no-stream", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    m = ["--model", str(tiny_checkpoint)]
    assert "add --offload DIR" in err([*m, "--policy", "hot"])
    assert "use --method dip" in err([*base, "--method", "dip-ca", "--policy", "hot"])
    assert "--hot-profile is for --policy hot" in err([*base, "--hot-profile", prof])
    assert "does not exist" in err([*base, "--policy", "hot", "--hot-profile", str(tmp_path / "none.npz")])
    assert "hot-same-trace" in err([*base, "--policy", "hot-same-trace"])
    other = tmp_path / "other.npz"
    save_profile(other, freq, {**meta, "model": "smollm2-135m"})
    assert "was made for model smollm2-135m" in err([*base, "--policy", "hot", "--hot-profile", str(other)])
    name = next(iter(freq))
    for bad_freq, bad_meta, why in (({**freq, name: np.full_like(freq[name], np.nan, float)}, meta, "finite"),
                                    ({**freq, name: -np.ones_like(freq[name])}, meta, "non-negative"),
                                    (freq, {k: v for k, v in meta.items() if k != "model"}, "names no model"),
                                    ({"../x": freq[name]}, meta, "not a hook's"),
                                    ({}, meta, "no hook counts")):
        save_profile(other, bad_freq, bad_meta)
        assert why in err([*base, "--policy", "hot", "--hot-profile", str(other)])


# ------------------------------------------------------------------ the model file and its reads
# (what the Hugging Face offload stack's tests proved, on the engine's one file format and reader)

def test_model_file_records_read_back_exactly(exported):
    """Every MLP record read back from the file with the engine's reader (exact reads of scattered
    units, runs, whole hooks, direct and buffered) equals the record loaded in RAM, and a float32
    file's records are the checkpoint's weights."""
    from dipstream.engine.modelfile import DATA
    from dipstream.engine.storage import FileReader, aligned_empty, covered, read_plan

    m, d = exported["llama", "float32"]
    lm = model(d)
    rng = np.random.default_rng(0)
    for direct in (True, False):
        reader = FileReader(d / DATA, 4, direct)
        for layer in range(lm.L):
            p = m.model.layers[layer].mlp
            want = {"in": torch.cat([p.gate_proj.weight.T, p.up_proj.weight.T], 1).detach().numpy(),
                    "out": p.down_proj.weight.T.detach().numpy()}
            for kind in ("in", "out"):
                info = lm.manifest["tensor_info"][mlp_tensor(layer, kind)]
                ram = lm.load(info)
                np.testing.assert_array_equal(ram.dense().T, want[kind])
                buf = aligned_empty(info.nbytes + 1024)
                for units in (np.arange(info.rows), np.sort(rng.choice(info.rows, info.rows // 3, replace=False)),
                              np.array([0, 1, 2, info.rows - 1]), np.array([5])):
                    offs, lens = read_plan(units, info.stride)
                    buf[:] = 0
                    reader.read(info.offset + offs, lens, buf.ctypes.data + offs)
                    got = buf[:info.nbytes].reshape(info.rows, info.stride)
                    ok = covered(offs, lens, info.rows, info.stride)
                    assert ok[units].all()
                    np.testing.assert_array_equal(got[units], ram.rec[units])
        assert reader.direct == (direct and reader.dfd is not None)
        reader.close()
    lm.close()


def test_corrupt_truncated_and_mismatched_files(exported, tmp_path):
    """A flipped byte fails its tensor's sha256 check (--verify auto: the folder's first open), a truncated file its size, a
    folder of another model or formats is refused, a folder without or with a broken manifest too;
    each a one-line error saying what to do."""
    import json
    import shutil

    from dipstream.engine.build import build
    from dipstream.engine.config import EngineOptions, EngineSetup
    from dipstream.engine.export import ensure_model_file
    from dipstream.budget import layer_keeps

    _, d = exported["llama", "float32"]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    raw = bytearray((bad / "model.bin").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (bad / "model.bin").write_bytes(bytes(raw))
    setup = EngineSetup(decode_rule("dense"), layer_keeps(1.0, 2), 16, EngineOptions())
    with pytest.raises(DipstreamError, match=r"corrupt \(tensor \S+ does not match its sha256\)") as e:
        build(bad, setup)
    assert "\n" not in str(e.value)
    lm, _ = build(bad, EngineSetup(decode_rule("dense"), layer_keeps(1.0, 2), 16, EngineOptions(verify="never")))
    lm.close()  # --verify never: the manifest and the size only
    (bad / "model.bin").write_bytes(bytes(raw[:-4096]))
    with pytest.raises(DipstreamError, match="has .* bytes, the manifest says"):
        build(bad, setup)
    with pytest.raises(DipstreamError, match="holds model 'llama', not 'other'"):
        ensure_model_file("other", "float32", directory=str(d))
    with pytest.raises(DipstreamError, match="holds float32 / float32 weights, not int4 / int8"):
        ensure_model_file("llama", "int4", directory=str(d))
    with pytest.raises(DipstreamError, match="not a lean-engine model folder"):
        read_manifest(tmp_path)
    (bad / "model.json").write_text("{not json")
    with pytest.raises(DipstreamError, match="unreadable"):
        read_manifest(bad)
    man = json.loads((d / "model.json").read_text())
    for field, value in (("arch.shape.head_dim", 32), ("arch.layers", []), ("tensors.layers.0.q.m", 8),
                         ("arch.rope.default.inv_freq", [1.0] * 40), ("arch.model_type", "gpt2")):
        tampered = json.loads(json.dumps(man))
        *path, last = field.split(".") if not field.startswith("tensors") else ["tensors", "layers.0.q", "m"]
        node = tampered
        for k in path:
            node = node[k]
        node[last] = value
        (bad / "model.json").write_text(json.dumps(tampered))
        with pytest.raises(DipstreamError, match="was edited after the export"):
            read_manifest(bad)
        tampered["manifest_sha256"] = manifest_digest(tampered)  # re-signed: the field checks refuse it
        (bad / "model.json").write_text(json.dumps(tampered))
        with pytest.raises(DipstreamError, match="inconsistent"):
            read_manifest(bad)


def test_direct_io_fallback_warns(exported, monkeypatch):
    """A filesystem without O_DIRECT: one warning that the numbers include the page cache; the
    reads still return the right bytes; asked for buffered reads, no warning."""
    import warnings

    from dipstream.engine import storage
    from dipstream.engine.modelfile import DATA

    _, d = exported["llama", "float32"]
    info = read_manifest(d)["tensor_info"][mlp_tensor(1, "in")]
    want = model(d).load(info).rec
    monkeypatch.setattr(storage, "_open_direct", lambda path: None)
    with pytest.warns(RuntimeWarning, match="page cache"):
        reader = storage.FileReader(d / DATA, 2, direct=True)
    assert not reader.direct
    got = reader.read_into(np.empty_like(want), info.offset)
    np.testing.assert_array_equal(got, want)
    reader.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        storage.FileReader(d / DATA, 2, direct=False).close()


@pytest.mark.skipif(not __import__("os").path.isdir("/dev/shm") or not hasattr(__import__("os"), "O_DIRECT"),
                    reason="needs /dev/shm and O_DIRECT")
def test_tmpfs_direct_io_detection(exported):
    """On tmpfs (which refuses O_DIRECT before Linux 6.6) support is detected for real: direct reads
    where the open and a trial read succeed, else the fallback with its warning."""
    import os
    import shutil
    import tempfile
    import warnings

    from dipstream.engine.modelfile import DATA
    from dipstream.engine.storage import FileReader

    _, d = exported["llama", "float32"]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as t:
        shutil.copy(d / DATA, t)
        try:
            fd = os.open(os.path.join(t, DATA), os.O_RDONLY | os.O_DIRECT)
            buf = __import__("mmap").mmap(-1, 4096)
            os.preadv(fd, [buf], 0)
            os.close(fd)
            supported = True
        except OSError:
            supported = False
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            reader = FileReader(os.path.join(t, DATA), 2, direct=True)
        reader.close()
        warned = any("page cache" in str(x.message) for x in w)
        assert reader.direct == supported and warned == (not supported)


@pytest.mark.parametrize("method,policy", [("dip", "lru"), ("dip-ca", "lru"), ("dense", "lru"), ("dip", "lfu"),
                                           ("dip-ca", "window")])
def test_caches_mirror_the_policy_and_never_exceed_their_capacity(exported, method, policy):
    """After every layer of every token: each hook's slots hold exactly the units its policy holds,
    never more than its capacity, each slot the unit's own record; the RAM stays the budget's."""
    _, d = exported["llama", "float32"]
    lm = model(d, 32)
    mlp = OffloadMLP(lm, chooser(method, [38, 38], [50, 50]), 25_000, policy, direct=False, record_masks=False)
    lm.mlp = mlp
    ram = {k: [lm.load(mlp.info[k][i]).rec for i in range(lm.L)] for k in ("in", "out")}
    assert 0 < mlp.capacity["layers.0.in"] < 64 and 0 < mlp.capacity["layers.0.out"] < 96
    assert mlp.cache_ram <= 25_000

    def check():
        for name, slots in mlp.slots.items():
            layer, kind = int(name.split(".")[1]), name.rsplit(".", 1)[1]
            cached = np.flatnonzero(slots.cached)
            assert cached.size <= slots.capacity == mlp.capacity[name]
            assert set(np.flatnonzero(slots.slot >= 0)) == set(cached)
            np.testing.assert_array_equal(slots.slab[slots.slot[cached]], ram[kind][layer][cached])

    block = mlp.block

    def checked(i, x):
        block(i, x)
        check()

    mlp.block = checked
    generate(lm, IDS[0, :7].tolist(), greedy(12))
    c = mlp.counters
    assert c.tokens == 7 + 11 and c.reads > 0 and c.ram_bytes > 0
    lm.close()


def test_budgets_too_small_are_refused_before_loading(exported):
    """--memory below what the process needs before any cache, or --dram below the static weights,
    KV cache and buffers: one line giving the minimum, from the model file alone."""
    from dipstream.budget import layer_keeps
    from dipstream.engine.config import EngineOptions, EngineSetup
    from dipstream.engine.plan import MARGIN, mlp_fixed_bytes, plan_ram, static_bytes

    _, d = exported["llama", "int4"]
    man = read_manifest(d)
    base = dict(rule=decode_rule("dip"), keeps=layer_keeps(0.5, 2), max_seq=16, offload=True)
    with pytest.raises(DipstreamError, match=r"--memory .* give more than") as e:
        plan_ram(man, EngineSetup(**base, options=EngineOptions(memory="1MB", head="ram")), 10 << 20)
    assert "\n" not in str(e.value)
    with pytest.raises(DipstreamError, match=r"--dram .* give more than"):
        plan_ram(man, EngineSetup(**base, dram="1kB"), 0)
    fixed, static = mlp_fixed_bytes(man), static_bytes(man, "ram", True)
    kv = 2 * 4 * 2 * 2 * 16 * 16  # 2 (K, V) x float32 x 2 layers x 2 KV heads x 16 positions x head_dim 16
    plan = plan_ram(man, EngineSetup(**base, options=EngineOptions(memory=str((10 << 20) + static + kv + fixed
                                                                             + MARGIN + 1000), head="ram")), 10 << 20)
    assert plan.kv_bytes == kv and plan.cache_bytes == 1000 and plan.budget_kind == "memory"


def test_capacities_hand_worked():
    """SmolLM2's shape, int4 records (an up/gate unit 2 x 1536 outputs at 4 bits: 1536 B; a down unit
    576 outputs: 288 B): 6 MB of caches split per masked linear, 30 layers x 3 linears = 90 shares
    of 66,667 B; an up/gate hook gets 2 shares (86 units), a down hook 1 (231 units)."""
    from dipstream.engine.plan import cache_capacities
    from dipstream.simulator.model_shape import SHAPES

    cap = cache_capacities(SHAPES["smollm2-135m"], 6_000_000, {"in": 1536, "out": 288})
    assert cap["layers.0.in"] == int(2 * 6_000_000 / 90 // 1536) == 86
    assert cap["layers.29.out"] == int(6_000_000 / 90 // 288) == 231
    assert cache_capacities(SHAPES["smollm2-135m"], 1e12, {"in": 1536, "out": 288})["layers.0.in"] == 576


@pytest.mark.parametrize("method", ["dense", "dip", "dip-ca"])
def test_trace_replays_in_the_simulator_to_the_same_bytes(exported, method):
    """An offloaded float32 run's masks through `simulate` (the same policy, the capacities its DRAM
    figure gives: the simulator's static placement plus the engine's cache bytes; the reference's
    random over-capacity fill) give exactly the run's RAM and disk unit bytes per token."""
    from dipstream.simulator import Hardware, plan_placement, simulate
    from dipstream.simulator.hardware import KINDS
    from dipstream.simulator.trace import hook_specs

    _, d = exported["llama", "float32"]
    lm = model(d, 32)
    lm.mlp = OffloadMLP(lm, chooser(method, [38, 38], [50, 50], gamma=0.2), 25_000, direct=False, read_gap=0)
    generate(lm, IDS[0, :5].tolist(), greedy(10))
    trace = lm.mlp.rec.trace(0, {"model": "tiny", "method": method, **lm.shape.to_dict()})  # every token counted
    hw = Hardware(name="fp32", bits={k: 32 for k in KINDS})
    static = plan_placement(lm.shape, hw, hook_specs(lm.shape, "dip"), 0.0, 32).static_bytes
    res = simulate(trace, hw, lm.shape, policy="lru", dram_bytes=static + 25_000, seq_len=32)
    c = lm.mlp.counters
    assert res.n_tokens == c.tokens == 14
    assert res.capacity_units == [lm.mlp.capacity[h] for h in res.hook_names]
    assert res.mlp_dram_bytes_per_token == pytest.approx(c.ram_bytes / c.tokens)
    assert res.mlp_flash_bytes_per_token == pytest.approx((c.selected_bytes - c.ram_bytes) / c.tokens)
    lm.close()


def test_async_reads_and_read_errors(exported):
    """Reads started and waited for bring the bytes a read now brings; a read past the end of the
    file is a one-line error and leaves the reader usable."""
    from dipstream.engine.modelfile import DATA
    from dipstream.engine.storage import FileReader, aligned_empty, read_plan

    _, d = exported["llama", "float32"]
    info = read_manifest(d)["tensor_info"][mlp_tensor(0, "in")]
    reader = FileReader(d / DATA, 4)
    a, b = aligned_empty(info.nbytes + 1024), aligned_empty(info.nbytes + 1024)
    offs, lens = read_plan(np.array([0, 1, 2, 7, 9, 10, 40, 63]), info.stride)
    reader.read(info.offset + offs, lens, a.ctypes.data + offs)
    reader.submit(info.offset + offs, lens, b.ctypes.data + offs)
    assert reader.wait() == int(lens.sum())
    np.testing.assert_array_equal(a, b)
    with pytest.raises(DipstreamError, match="reading .* failed") as e:
        reader.read(np.array([reader.size], np.int64), np.array([512], np.int64), np.array([a.ctypes.data]))
    assert "\n" not in str(e.value)
    reader.submit(np.array([reader.size + 4096], np.int64), np.array([512], np.int64), np.array([b.ctypes.data]))
    with pytest.raises(DipstreamError, match="reading .* failed"):
        reader.wait()
    reader.read(info.offset + offs, lens, b.ctypes.data + offs)  # still works
    np.testing.assert_array_equal(a, b)
    reader.close()
    reader.close()  # closing twice does nothing


def _thread_cpu_ticks() -> dict:
    """{thread id: user + system CPU clock ticks} of this process's threads (Linux /proc)."""
    import os

    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_async_reads_use_at_most_io_threads(tmp_path):
    """ds_pread_submit lets ``nthreads`` I/O threads read even when an earlier call with more left a
    larger pool (it made the whole pool active, so --io-threads stopped being honoured): with
    nthreads=1 a single pool thread does the reads."""
    import os
    import threading
    import time

    from dipstream.engine.storage import aligned_empty
    from dipstream import native

    lib = native.require()
    size, ext = 32 << 20, 256 << 10
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
    fd = os.open(path, os.O_RDONLY)
    buf = aligned_empty(size)
    off = np.arange(size // ext, dtype=np.int64) * ext
    ln = np.full(off.size, ext, np.int64)
    dst = buf.ctypes.data + off

    def read_all(nthreads):
        assert lib.ds_pread_submit(fd, off.size, off.ctypes.data, ln.ctypes.data, dst.ctypes.data, nthreads) == 0
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
    np.testing.assert_array_equal(buf[:4096], np.fromfile(path, np.uint8, 4096))


def test_hot_policy_needs_profiled_counts(exported):
    _, d = exported["llama", "float32"]
    lm = model(d)
    with pytest.raises((DipstreamError, ValueError), match="frequency|profile|counts"):
        OffloadMLP(lm, chooser("dip", [38, 38], [50, 50]), 25_000, "hot", direct=False)
    lm.close()
