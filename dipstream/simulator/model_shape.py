"""Model shapes and weight footprints (docs/methods.md "The simulator"), counted in weights.

lm_head or embedding: d*V each (once when tied); mlp: d*D*3*L (gated); attention:
d*hd*(2*n_heads + 2*n_kv_heads)*L with hd = ``head_dim`` (the reference's d^2*(2+2g)*L, g =
n_kv_heads/n_heads, when hd = d/n_heads); kv_cache(seq) = seq*2*n_kv_heads*hd*L (= seq*d*2*L*g).
Gemma's heads are wider than d/n_heads (Gemma 3 270M: 4 heads of 256 over d = 640).

Mixture of experts (``n_experts`` > 0): ``d_ff`` is one routed expert's intermediate size; mlp
= 3*d*L*(D*n_experts + shared_d_ff) (every routed expert, plus an always-on shared expert of
intermediate size ``shared_d_ff``, Qwen2-MoE); router = L*d*(n_experts + 1 if a shared expert,
its gate). Bytes = weights * bits/8 for the module kind's precision (``Hardware.bits``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

MOE_FIELDS = ("n_experts", "experts_per_token", "shared_d_ff", "head_dim")


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    d_ff: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    tied_embeddings: bool = False
    n_experts: int = 0            # routed experts per layer; 0 = dense MLP
    experts_per_token: int = 0    # routed experts each token uses (top-k)
    shared_d_ff: int = 0          # intermediate size of an always-on shared expert; 0 = none
    head_dim: int = 0             # width of one attention head (0 when built: d_model // n_heads)

    def __post_init__(self):
        if not self.head_dim and int(self.n_heads) > 0:  # the width transformers gives such a config
            object.__setattr__(self, "head_dim", int(self.d_model) // int(self.n_heads))
        for f in ("n_layers", "d_model", "d_ff", "vocab", "n_heads", "n_kv_heads"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"ModelShape.{f} must be positive, got {getattr(self, f)}")
        for f in MOE_FIELDS:
            if int(getattr(self, f)) < 0:
                raise ValueError(f"ModelShape.{f} must be >= 0, got {getattr(self, f)}")
        E, k = int(self.n_experts), int(self.experts_per_token)
        if E > 0 and not 0 < k <= E:
            raise ValueError(f"ModelShape.experts_per_token must be in 1..n_experts={E} for a "
                             f"mixture of experts, got {k}")
        if E == 0 and (k or self.shared_d_ff):
            raise ValueError("ModelShape.experts_per_token and shared_d_ff need n_experts > 0; "
                             "set n_experts or leave them 0 for a dense MLP")

    @property
    def g(self) -> float:
        """KV group ratio n_kv_heads / n_heads."""
        return self.n_kv_heads / self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def expert_weights(self) -> int:
        """Weights of one routed expert (up, gate, down): 3*d*D."""
        return 3 * self.d_model * self.d_ff

    def router_weights(self) -> int:
        """Router (and shared-expert gate) weights: L*d*(n_experts + 1 if shared_d_ff); 0 when dense."""
        return self.n_layers * self.d_model * (self.n_experts + (1 if self.shared_d_ff else 0))

    def embedding_weights(self) -> int:
        return self.d_model * self.vocab

    def lm_head_weights(self) -> int:
        return self.d_model * self.vocab

    def mlp_weights(self) -> int:
        if self.is_moe:
            return 3 * self.d_model * self.n_layers * (self.d_ff * self.n_experts + self.shared_d_ff)
        return self.d_model * self.d_ff * 3 * self.n_layers

    def attention_weights(self) -> float:
        """d * hd * (2 n_heads + 2 n_kv_heads) * L: q and o, k and v (d^2 (2 + 2g) L when hd = d / n_heads)."""
        return self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads) * self.n_layers

    def kv_cache_weights(self, seq_len: float) -> float:
        """seq * 2 * n_kv_heads * hd * L (seq * d * 2 * L * g when hd = d / n_heads)."""
        return seq_len * 2 * self.n_kv_heads * self.head_dim * self.n_layers

    def weights(self) -> dict:
        """Weight counts per module kind, no KV cache ("router" too for a mixture of experts). Tied
        embeddings are one matrix, counted once under "lm_head" (read in full every token as the
        output layer)."""
        out = {"attention": self.attention_weights(), "mlp": self.mlp_weights(),
               "lm_head": self.lm_head_weights()}
        if not self.tied_embeddings:
            out["embedding"] = self.embedding_weights()
        if self.is_moe:
            out["router"] = self.router_weights()
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
        """The shape of a Hugging Face model config (a transformers config object, or the fields of
        a config.json as a dict; a multimodal config's text part), read from its fields only:
        nothing is loaded. The one reader of configs: the presets and the engine's model file take
        their shapes from here. Mixture of experts: Mixtral (``num_local_experts``,
        ``intermediate_size`` = one expert's), Qwen2-MoE / Qwen3-MoE (``num_experts``,
        ``moe_intermediate_size``, ``shared_expert_intermediate_size``); ``head_dim`` as the config
        gives it (Gemma: 256 whatever hidden_size / heads is), else hidden_size // heads."""
        if isinstance(config, dict):
            config = SimpleNamespace(**{k: SimpleNamespace(**v) if k == "text_config" and isinstance(v, dict) else v
                                        for k, v in config.items()})
        cfg = getattr(config, "text_config", None) or config
        heads = cfg.num_attention_heads
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        E = int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)
        moe = {}
        D = cfg.intermediate_size
        if E:
            mixed = dense_layers_of_moe(cfg)
            if mixed:
                raise ValueError(f"config mixes dense and MoE layers ({mixed}); ModelShape describes all-MoE "
                                 "models only")
            D = getattr(cfg, "moe_intermediate_size", None) or D
            moe = dict(n_experts=E, experts_per_token=int(getattr(cfg, "num_experts_per_tok", 0) or 0),
                       shared_d_ff=int(getattr(cfg, "shared_expert_intermediate_size", None) or 0))
        return cls(cfg.num_hidden_layers, cfg.hidden_size, D, cfg.vocab_size, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads,
                   bool(getattr(config, "tie_word_embeddings", False)), head_dim=hd, **moe)


def dense_layers_of_moe(cfg) -> str | None:
    """How a mixture-of-experts config (its text part) puts dense-MLP layers among its MoE ones, in
    its own fields ("mlp_only_layers=[0], decoder_sparse_step=1"), or None when every layer is MoE."""
    dense_layers = list(getattr(cfg, "mlp_only_layers", None) or [])
    step = getattr(cfg, "decoder_sparse_step", None) or 1
    first_dense = getattr(cfg, "first_k_dense_replace", None) or 0
    if not (dense_layers or step != 1 or first_dense):
        return None
    return (f"mlp_only_layers={dense_layers}, decoder_sparse_step={step}"
            + (f", first_k_dense_replace={first_dense}" if first_dense else ""))


def _load_presets() -> dict[str, ModelShape]:
    """The preset shapes: each model's config.json fields (presets/shapes.yaml) read by the one
    reader of HF configs, `ModelShape.from_hf_config`."""
    import yaml

    text = (Path(__file__).with_name("presets") / "shapes.yaml").read_text()
    return {name: ModelShape.from_hf_config(cfg) for name, cfg in yaml.safe_load(text).items()}


SHAPES = _load_presets()


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
