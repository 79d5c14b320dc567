"""Model shapes and weight footprints (docs/methods.md "The simulator"), counted in weights.

lm_head or embedding: d*V each (once when tied); mlp: d*D*3*L (gated); attention:
d^2*(2+2g)*L with g = n_kv_heads/n_heads; kv_cache(seq) = seq*d*2*L*g.
Bytes = weights * bits/8 for the module kind's precision (``Hardware.bits``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    d_ff: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    tied_embeddings: bool = False

    def __post_init__(self):
        for f in ("n_layers", "d_model", "d_ff", "vocab", "n_heads", "n_kv_heads"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"ModelShape.{f} must be positive, got {getattr(self, f)}")

    @property
    def g(self) -> float:
        """KV group ratio n_kv_heads / n_heads."""
        return self.n_kv_heads / self.n_heads

    def embedding_weights(self) -> int:
        return self.d_model * self.vocab

    def lm_head_weights(self) -> int:
        return self.d_model * self.vocab

    def mlp_weights(self) -> int:
        return self.d_model * self.d_ff * 3 * self.n_layers

    def attention_weights(self) -> float:
        return self.d_model ** 2 * (2 + 2 * self.g) * self.n_layers

    def kv_cache_weights(self, seq_len: float) -> float:
        return seq_len * self.d_model * 2 * self.n_layers * self.g

    def weights(self) -> dict:
        """Weight counts per module kind, no KV cache. Tied embeddings are one matrix, counted
        once under "lm_head" (it is read in full every token as the output layer)."""
        out = {"attention": self.attention_weights(), "mlp": self.mlp_weights(),
               "lm_head": self.lm_head_weights()}
        if not self.tied_embeddings:
            out["embedding"] = self.embedding_weights()
        return out

    def weight_bytes(self, bits: dict) -> float:
        """Total weight bytes (the "model size" that ``parse_dram('0.5x')`` is relative to)."""
        return sum(n * bits[k] / 8 for k, n in self.weights().items())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        """The shape of a Hugging Face model config (a multimodal config's text part), read from
        its fields only: nothing is loaded."""
        cfg = getattr(config, "text_config", None) or config
        heads = cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads,
                   bool(getattr(config, "tie_word_embeddings", False)))


SHAPES = {
    "phi3-medium": ModelShape(40, 5120, 17920, 32064, 40, 10),
    "phi3-mini": ModelShape(32, 3072, 8192, 32064, 32, 32),
    "llama3-8b": ModelShape(32, 4096, 14336, 128256, 32, 8),
    "mistral-7b": ModelShape(32, 4096, 14336, 32000, 32, 8),
    "smollm2-135m": ModelShape(30, 576, 1536, 49152, 9, 3, tied_embeddings=True),
    "gemma3-270m": ModelShape(18, 640, 2048, 262144, 4, 1, tied_embeddings=True),
    "qwen2.5-coder-1.5b": ModelShape(28, 1536, 8960, 151936, 12, 2),
    "qwen2.5-coder-0.5b": ModelShape(24, 896, 4864, 151936, 14, 2),
}


def get_shape(name_or_shape) -> ModelShape:
    """A preset ``ModelShape`` by name (or pass a ModelShape / dict through)."""
    if isinstance(name_or_shape, ModelShape):
        return name_or_shape
    if isinstance(name_or_shape, dict):
        return ModelShape.from_dict(name_or_shape)
    try:
        return SHAPES[name_or_shape]
    except KeyError:
        raise ValueError(f"unknown model shape {name_or_shape!r}; available: "
                         f"{', '.join(SHAPES)}") from None
