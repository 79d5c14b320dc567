"""The method interface: a per-token selection of which MLP weights a token needs.

A method computes one block's MLP output for a batch of tokens and returns a `Selection` saying,
per token, which rows and columns of W_up, W_gate and W_down it read. Everything downstream
(measured density, NaN-poisoning proofs, mask traces, the simulator) reads the `Selection`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dipstream.models.arch import GatedMLPParts
from dipstream.sparsity.catalog import CATALOG
from dipstream.sparsity.decoding import DECODERS
from dipstream.sparsity.ops import part_linear

LINEARS = ("up", "gate", "down")


@dataclass
class Selection:
    """Per-token masks (N, ...) of what each linear needs; None means "all of that dimension".

    Weight W[j, i] of a linear is needed by token t iff rows[t, j] and cols[t, i].
    `counted` marks tokens whose reads count toward measured density (None: all); GRIFFIN's dense
    prompt tokens are not counted.
    """

    up_rows: torch.Tensor | None = None
    up_cols: torch.Tensor | None = None
    gate_rows: torch.Tensor | None = None
    gate_cols: torch.Tensor | None = None
    down_cols: torch.Tensor | None = None
    counted: torch.Tensor | None = None

    def fractions(self) -> dict[str, torch.Tensor]:
        """Fraction of each linear's weights needed per token, (N,) each, plus `mlp` (their mean)."""
        def frac(m):
            return None if m is None else m.float().mean(-1)

        out = {}
        for name in LINEARS:
            f = None
            for m in (getattr(self, f"{name}_rows", None), getattr(self, f"{name}_cols", None)):
                fm = frac(m)
                if fm is not None:
                    f = fm if f is None else f * fm
            out[name] = f
        ref = next((v for v in out.values() if v is not None), None)
        if ref is None:
            return {k: torch.ones(()) for k in (*LINEARS, "mlp")}
        for k in LINEARS:
            if out[k] is None:
                out[k] = torch.ones(ref.shape[0], device=ref.device)
        out["mlp"] = (out["up"] + out["gate"] + out["down"]) / 3.0
        return out

    def needed(self, linear: str, shape: tuple[int, int]) -> torch.Tensor:
        """Union over tokens of the weights of `linear` (shape out x in) any token needs."""
        rows = getattr(self, f"{linear}_rows", None)
        cols = getattr(self, f"{linear}_cols", None)
        n = next((m.shape[0] for m in (rows, cols) if m is not None), 1)
        rows = torch.ones(n, shape[0], dtype=torch.bool) if rows is None else rows
        cols = torch.ones(n, shape[1], dtype=torch.bool) if cols is None else cols
        return torch.einsum("tj,ti->ji", rows.float(), cols.float()) > 0


@dataclass(frozen=True)
class ExpertCall:
    """Which expert a method is running inside: where its hooks are in the layer (("expert", 5) for
    layers.<i>.expert.5.*, or ("shared",)), the indices of its tokens in the batch, the batch's
    (windows B, tokens per window T), and its unit index over the model's experts (layer * experts
    per layer + e; the shared expert last in its layer)."""

    where: tuple
    tokens: torch.Tensor
    bt: tuple[int, int]
    unit: int


class Method:
    """Base class. Subclasses implement `mlp`; `prepare` receives the model's MLP parts once."""

    name = "base"
    # what it is, reads and needs: set by `register` from its entry in `sparsity.catalog`
    summary = reads = ""
    needs_calibration = needs_predictors = on_experts = False

    def __init__(self, density: float = 1.0):
        self.density = density

    def prepare(self, parts: list[GatedMLPParts]) -> None:
        """Called once when attached, with every block's MLP parts (layer order)."""

    # set by a mixture-of-experts block around each expert's call (None otherwise), for methods
    # that keep state per expert (DIP-CA's caches, TEAL's and CATS's thresholds)
    in_expert: "ExpertCall | None" = None

    def prepare_experts(self, blocks) -> None:
        """Called after `prepare` on a mixture-of-experts model, with every layer's MoeLayerParts."""

    def mlp(self, layer: int, p: GatedMLPParts, x: torch.Tensor, batch_shape: tuple[int, ...]
            ) -> tuple[torch.Tensor, Selection]:
        """MLP output for tokens x (N, d) of layer `layer`; batch_shape is x's leading shape (B, T)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-sequence state (caches, prompt statistics) before a new sequence."""

    def load_trained(self, folder, info) -> None:
        """Take what `dipstream finetune` trained for this method from an adapter folder (the
        LoRA adapters are loaded into the model separately); most methods have nothing."""

    decodes = False  # whether the engine runs it: set by `register` from the decode side (sparsity.decoding)

    def dense_prefix(self, seq_len: int) -> int:
        """Leading positions of a teacher-forced window computed densely (GRIFFIN's prompt); the
        predictions made there are left out of `perplexity_sparsified`."""
        return 0

    def describe(self) -> dict:
        return {"method": self.name, "density_requested": self.density}


def sequence_dims(batch_shape: tuple[int, ...], n_tokens: int) -> tuple[int, int]:
    """(sequences B, tokens per sequence T) of a method call's flattened tokens."""
    return (batch_shape[0], batch_shape[1]) if len(batch_shape) == 2 else (1, n_tokens)


def down_from_h(p: GatedMLPParts, h: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """The down projection of h (adapters included) reading only the selected columns of W_down."""
    return part_linear(p, "down", h, cols=cols)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under `cls.name`, with what the catalog says
    of it (`sparsity.catalog`: summary, reads, needs, experts); it ``decodes`` (runs in the engine)
    when the registry's decode side has a rule of that name."""
    info = CATALOG[cls.name]  # a method without an entry is a programming error
    for key in ("summary", "reads", "needs_calibration", "needs_predictors", "on_experts"):
        setattr(cls, key, getattr(info, key))
    METHODS[cls.name] = cls
    cls.decodes = cls.name in DECODERS
    return cls
