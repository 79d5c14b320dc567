"""The engine's architecture of a GGUF model, read from its metadata by the rules llama.cpp runs it
with: no transformers, no torch (the export of a GGUF stays small in memory).

One table (`FAMILIES`) holds what each GGUF architecture the export reads means: the manifest's
model type, the MLP's activation, whether the converter permuted q / k rows for its rotary layout
(llama) and whether norms are stored as 1 + w (Gemma). The rotary tables are computed here in
float32 as transformers' default rotary embedding computes them (1 / theta^(2i/d), equal to within
one float32 ulp), divided by a
linear scaling factor or by the file's `rope_freqs` factors (Llama 3's) as llama.cpp divides them;
a GGUF asking for another scaling (YaRN, LongRoPE) is not read here (`Unsupported`), and the export
takes transformers' reader instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dipstream.simulator.model_shape import ModelShape


@dataclass(frozen=True)
class Family:
    model_type: str  # the manifest's (transformers') model type
    act: str  # the gated MLP's activation
    permuted: bool = False  # q / k rows permuted by the converter
    norm_plus_one: bool = False  # norms stored as 1 + w
    swa_period: int = 0  # every swa_period-th layer attends globally, the others in the sliding window
    swa_theta: float = 0.0  # the sliding layers' own RoPE base


FAMILIES = {
    "llama": Family("llama", "silu", permuted=True),
    "qwen2": Family("qwen2", "silu"),
    "qwen3": Family("qwen3", "silu"),
    "gemma3": Family("gemma3_text", "gelu_pytorch_tanh", norm_plus_one=True, swa_period=6, swa_theta=10000.0),
}
GEMMA3_27B_LAYERS = 62  # llama.cpp scales Gemma 3 27B's queries by 1/sqrt(d_model / heads), the others by 1/sqrt(head_dim)


class Unsupported(Exception):
    """A GGUF whose configuration this reader does not map (the caller falls back to transformers')."""


def rope_inv_freq(theta: float, dim: int, divisors=None) -> np.ndarray:
    """float32 inverse frequencies 1 / theta^(2i / dim), i < dim / 2, each divided by `divisors`
    (a linear factor, or per-frequency factors) where given."""
    exponent = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
    inv = np.float32(1) / (np.float64(theta) ** exponent).astype(np.float32)  # torch's float32 values, to 1 ulp
    if divisors is not None:
        inv = (inv / np.asarray(divisors, np.float32)).astype(np.float32)
    return inv


def _table(inv: np.ndarray) -> dict:
    return {"inv_freq": [float(v) for v in inv], "scale": 1.0, "limit": None, "type": "default"}


def gguf_arch(meta: dict, tensors: dict) -> dict:
    """The manifest's architecture of a GGUF of a `FAMILIES` architecture, from its metadata and
    tensor names (`rope_freqs.weight`: float32 values, read here). Unsupported for what this does
    not map; ValueError for metadata that does not add up."""
    arch = meta["general.architecture"]
    fam = FAMILIES[arch]

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"metadata {arch}.{key} missing")
        return v

    L, d, heads = int(get("block_count")), int(get("embedding_length")), int(get("attention.head_count"))
    kv = get("attention.head_count_kv", heads)
    if not isinstance(kv, (int, np.integer)):
        raise Unsupported("per-layer key / value head counts")
    head_dim = int(meta.get(f"{arch}.attention.key_length", d // heads))
    if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise Unsupported("keys and values of different widths")
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise Unsupported("partial rotary embeddings")
    if int(meta.get(f"{arch}.expert_count", 0)):
        raise Unsupported("mixture-of-experts layers")
    tokens = meta.get("tokenizer.ggml.tokens")
    embd = tensors.get("token_embd.weight")
    vocab = int(embd.shape[1]) if embd is not None else len(tokens)
    shape = ModelShape.from_hf_config({  # the config fields transformers' GGUF reader maps these keys to
        "num_hidden_layers": L, "hidden_size": d, "intermediate_size": int(get("feed_forward_length")),
        "vocab_size": vocab, "num_attention_heads": heads, "num_key_value_heads": int(kv),
        "tie_word_embeddings": "output.weight" not in tensors, "head_dim": head_dim})

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", "linear"):
        raise Unsupported(f"RoPE scaling '{scaling}'")
    divisors = factor if scaling == "linear" and factor != 1.0 else None
    if "rope_freqs.weight" in tensors:
        ff = np.asarray(tensors["rope_freqs.weight"].data, np.float32).reshape(-1)
        if ff.size != head_dim // 2:
            raise ValueError(f"rope_freqs has {ff.size} factors, not {head_dim // 2}")
        divisors = ff if divisors is None else ff * np.float32(divisors)
    theta = float(get("rope.freq_base", 10000.0))
    window = int(meta.get(f"{arch}.attention.sliding_window", 0) or 0) if fam.swa_period else 0
    if fam.swa_period and window:
        rope = {"full_attention": _table(rope_inv_freq(theta, head_dim, divisors)),
                "sliding_attention": _table(rope_inv_freq(fam.swa_theta, head_dim))}  # llama.cpp: no scaling there
        kinds = ["full_attention" if (i + 1) % fam.swa_period == 0 else "sliding_attention" for i in range(L)]
        layers = [{"window": 0 if k == "full_attention" else window, "rope": k} for k in kinds]
        rope = {k: t for k, t in rope.items() if k in kinds}
    else:
        rope = {"default": _table(rope_inv_freq(theta, head_dim, divisors))}
        layers = [{"window": 0, "rope": "default"} for _ in range(L)]
    scalar = d // heads if arch == "gemma3" and L == GEMMA3_27B_LAYERS else head_dim
    return {"model_type": fam.model_type, "shape": shape.to_dict(),
            "eps": float(get("attention.layer_norm_rms_epsilon")), "act": fam.act,
            "query_scale": float(scalar) ** -0.5, "attn_softcap": None, "final_softcap": None,
            "layers": layers, "rope": rope, "max_positions": int(get("context_length", 2048)),
            "bos": _token_id(meta, "bos", vocab), "eos": _token_id(meta, "eos", vocab)}


def _token_id(meta: dict, which: str, vocab: int) -> int | None:
    v = meta.get(f"tokenizer.ggml.{which}_token_id")
    if v is None:
        return None
    if not 0 <= int(v) < vocab:
        raise ValueError(f"{which} token id {v} outside the vocabulary of {vocab}")
    return int(v)
