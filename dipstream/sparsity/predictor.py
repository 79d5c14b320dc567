"""DejaVu-style trained predictors: a low-rank MLP per layer maps x to neuron logits; the top-k
neurons keep their up row, gate row and down column. Train them with
`dipstream finetune --method predictor`; they count as DRAM-resident weights in the simulator."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dipstream.budget import check_density
from dipstream.errors import DipstreamError
from dipstream.io import atomic_path
from dipstream.models.adapters import PREDICTOR_FILE
from dipstream.selection import topk_mask
from dipstream.sparsity.base import Method, Selection, down_from_h, register
from dipstream.sparsity.ops import part_linear


class LowRankPredictor(nn.Module):
    """logits = W2 ReLU(W1 x) + b2: d -> rank -> D."""

    def __init__(self, d_model: int, d_ff: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)))


def build_predictors(n_layers: int, d_model: int, d_ff: int, rank: int) -> nn.ModuleList:
    """One fresh predictor per layer."""
    if rank < 1:
        raise DipstreamError(f"--predictor-rank {rank} must be at least 1")
    return nn.ModuleList(LowRankPredictor(d_model, d_ff, rank) for _ in range(n_layers))


def save_predictors(predictors: nn.ModuleList, path: Path) -> None:
    """Write the predictors' weights as safetensors, atomically."""
    from safetensors.torch import save_file


    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in predictors.state_dict().items()},
                  tmp)


def load_predictors(path: Path, n_layers: int, d_model: int, d_ff: int) -> nn.ModuleList:
    """Predictors saved by `save_predictors`; their rank is read from the file, their shapes checked."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        rank = state["0.down.weight"].shape[0]
    except Exception:  # noqa: BLE001 - any unreadable file gets the same message
        raise DipstreamError(f"cannot read predictor weights '{path}'; retrain them with "
                             "`dipstream finetune --method predictor`") from None
    preds = build_predictors(n_layers, d_model, d_ff, rank)
    try:
        preds.load_state_dict(state)
    except RuntimeError:
        raise DipstreamError(f"predictor weights '{path}' were made for another model "
                             f"(expected {n_layers} layers, d={d_model}, D={d_ff})") from None
    return preds.eval().requires_grad_(False)


def density_with_predictor(density: float, predictor_weights: int, info) -> float:
    """A measured MLP density plus the predictor, which is read in full every token: its weights
    over the MLP's (`info`: a ModelInfo or ModelShape), at one precision."""
    return density + predictor_weights / info.mlp_weights()


class TrainedPredictors:
    """Mixin of the methods that read per-layer predictors trained by `dipstream finetune --method
    NAME` (`self.predictors`, loaded from an adapter folder), and are charged for them."""

    predictors: nn.ModuleList | None = None

    def load_trained(self, folder, info) -> None:
        path = Path(folder) / PREDICTOR_FILE
        if path.exists():
            self.predictors = load_predictors(path, info.n_layers, info.d_model, info.d_ff)

    def check_predictors(self, parts, what: str = "trained predictors") -> None:
        """One-line errors: no predictors, or predictors of another model."""
        if self.predictors is None:
            raise DipstreamError(f"method '{self.name}' needs {what}: run `dipstream finetune --method "
                                 f"{self.name} --out DIR`, then pass --adapter DIR")
        if len(self.predictors) != len(parts):
            raise DipstreamError(f"the predictors cover {len(self.predictors)} layers, the model has "
                                 f"{len(parts)}; they were trained for another model")

    def predictor_weights(self) -> int:
        return 0 if self.predictors is None else sum(t.numel() for t in self.predictors.parameters())

    def describe(self):
        return {**super().describe(), "predictor_weights": self.predictor_weights()}


@register
class PredictorMethod(TrainedPredictors, Method):
    """DejaVu-style: per token, the top-k of a trained predictor's logits pick the neurons whose
    up row, gate row and down column are read; k = density * D."""

    name = "predictor"

    def __init__(self, density: float = 1.0, options=None):
        super().__init__(check_density(density))
        self.predictors = None

    def prepare(self, parts):
        self.check_predictors(parts)
        self.k = int(self.density * parts[0].d_ff)

    def logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.predictors[layer](x)

    def mlp(self, layer, p, x, batch_shape):
        m = topk_mask(self.logits(layer, x), self.k)
        h = p.act(part_linear(p, "gate", x, rows=m)) * part_linear(p, "up", x, rows=m)
        return down_from_h(p, h, m), Selection(up_rows=m, gate_rows=m, down_cols=m)
