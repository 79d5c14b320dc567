"""A GGUF's architecture read from its metadata without transformers (`engine.gguf_arch`) equals
what transformers' GGUF reader gives (its config through `export.engine_arch`) on tiny files of
each family, the RoPE tables within one float32 ulp; Llama 3's `rope_freqs` factors and linear
scaling divide the frequencies as llama.cpp divides them (hand-worked); what it does not map falls
back to transformers; the container reader refuses damaged headers with ValueError only."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from dipstream.engine.gguf_arch import Unsupported, gguf_arch, rope_inv_freq
from dipstream.engine.gguf_file import GGUFFile, read_metadata

VOCAB = [f"t{i}" for i in range(64)]


def write(path, arch: str, extra: dict | None = None, tensors: dict | None = None, tied: bool = True, L: int = 2):
    w = GGUFWriter(str(path), arch)
    d, heads, kv, hd, ff = 32, 4, 2, 8, 64
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if arch in ("gemma3", "qwen3"):
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_sliding_window(16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(VOCAB)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for k, v in (extra or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_float32(k, v)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(VOCAB), d)).astype(np.float32))
    if not tied:
        w.add_tensor("output.weight", rng.standard_normal((len(VOCAB), d)).astype(np.float32))
    for name, t in (tensors or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def arch_of(path):
    g = GGUFFile(path)
    return gguf_arch(g.meta, g.tensors)


def transformers_arch(path):
    from dipstream.engine.gguf_source import GGUFSource
    from dipstream.engine.export import engine_arch

    return engine_arch(GGUFSource(path).transformers_config())


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("gemma3", True)])
def test_the_metadata_reader_equals_transformers(tmp_path, arch, tied):
    path = write(tmp_path / f"{arch}.gguf", arch, tied=tied)
    mine, ref = arch_of(path), transformers_arch(path)
    for table in ref["rope"]:
        a, b = (np.array(x["rope"][table]["inv_freq"], np.float32) for x in (mine, ref))
        assert np.abs(a.view(np.int32) - b.view(np.int32)).max() <= 1  # one float32 ulp
        mine["rope"][table]["inv_freq"] = ref["rope"][table]["inv_freq"]
    if arch == "gemma3":  # llama.cpp scales queries by 1/sqrt(head_dim); transformers' GGUF config by its
        assert mine["query_scale"] == 8 ** -0.5 and ref["query_scale"] == 256 ** -0.5  # default 256: equal on
        mine["query_scale"] = ref["query_scale"]  # the real models, whose heads are 256 wide
    assert mine == ref


def test_qwen3_takes_its_head_width_from_the_key_length(tmp_path):
    """transformers' reader leaves Qwen3's head_dim at its config default (128, right for the real
    models by chance); llama.cpp reads attention.key_length, and so does this reader."""
    a = arch_of(write(tmp_path / "q3.gguf", "qwen3"))
    assert a["shape"]["head_dim"] == 8 and a["model_type"] == "qwen3" and a["query_scale"] == 8 ** -0.5
    assert len(a["rope"]["default"]["inv_freq"]) == 4 and a["shape"]["tied_embeddings"]


def test_rope_freqs_and_linear_scaling_divide_the_frequencies(tmp_path):
    hd = 8
    base = 1 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    assert np.allclose(rope_inv_freq(10000.0, hd), base, rtol=1e-7)
    factors = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
    path = write(tmp_path / "l3.gguf", "llama", tensors={"rope_freqs.weight": factors})
    assert np.allclose(arch_of(path)["rope"]["default"]["inv_freq"], base / factors, rtol=1e-6)
    path = write(tmp_path / "lin.gguf", "llama", {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert np.allclose(arch_of(path)["rope"]["default"]["inv_freq"], base / 4, rtol=1e-6)
    path = write(tmp_path / "g.gguf", "gemma3", {"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0},
                 L=6)
    a = arch_of(path)
    assert [x["window"] for x in a["layers"]] == [16] * 5 + [0]  # every sixth layer global
    rope = a["rope"]  # llama.cpp scales the global layers only; the sliding ones keep base 10000
    assert np.allclose(rope["full_attention"]["inv_freq"], base / 8, rtol=1e-6)
    assert np.allclose(rope["sliding_attention"]["inv_freq"], base, rtol=1e-6)
    path = write(tmp_path / "y.gguf", "qwen2", {"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0})
    with pytest.raises(Unsupported):
        arch_of(path)


def test_a_damaged_header_is_a_value_error(tmp_path):
    raw = write(tmp_path / "ok.gguf", "llama").read_bytes()
    meta = read_metadata(tmp_path / "ok.gguf")
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.tokens"] == VOCAB
    rng = np.random.default_rng(1)
    cuts = sorted(set(rng.integers(1, len(raw), 60).tolist()) | {1, 8, 23, 24, 100})
    for i, cut in enumerate(cuts):
        bad = bytearray(raw[:cut])
        if i % 2:  # a flipped byte inside the header, the rest intact
            bad = bytearray(raw)
            bad[min(cut, 2000)] ^= 0xFF
        p = tmp_path / f"bad{i}.gguf"
        p.write_bytes(bytes(bad))
        try:
            GGUFFile(p)
        except ValueError:
            pass


def test_the_tensor_views_equal_ggufs_reader(tmp_path):
    from gguf import GGUFReader
    from gguf.quants import quantize

    q = quantize(np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    w = GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    mine, ref = GGUFFile(tmp_path / "t.gguf"), GGUFReader(str(tmp_path / "t.gguf"))
    for t in ref.tensors:
        m = mine.tensors[t.name]
        assert (m.data_offset, m.n_bytes, m.tensor_type) == (t.data_offset, t.n_bytes, t.tensor_type)
        assert np.array_equal(m.data, np.asarray(t.data).reshape(m.data.shape))
    assert np.array_equal(mine.rows("b")[2:7], np.asarray(ref.tensors[1].data)[2:7])
