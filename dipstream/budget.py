"""Weight budgets: a target MLP density -> keep fractions -> how many units a token keeps, and
DIP-CA's gamma schedule (docs/methods.md, "Methods" and "Cache-aware masking"). Pure Python:
the simulator, the sparsity methods and the runtime all count k here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dipstream.errors import DipstreamError

# Reference fit of the best up/down split for DIP (Federici et al. reference implementation).
_SLOPE, _OFFSET = 0.9849930711, 0.2997647759


def check_density(density: float) -> float:
    """`density` as a float in (0, 1], or a one-line error."""
    if not (isinstance(density, (int, float)) and not isinstance(density, bool) and 0.0 < density <= 1.0):
        raise DipstreamError(f"--density {density} is outside (0, 1]; give the fraction of MLP weight "
                             "bytes a token may read, e.g. 0.5")
    return float(density)


def dip_split(density: float) -> tuple[float, float]:
    """(up_keep, down_keep) for one target density: the reference's sigmoid-logit mapping,
    up_keep = sigmoid(0.985 * logit(keep) + 0.300); down_keep = 3 * (keep - 2/3 * up_keep),
    clipped to [0, 1], so that 2/3 up + 1/3 down = keep (up/gate are 2/3 of the MLP bytes)."""
    density = check_density(density)
    if density >= 1.0:
        return 1.0, 1.0
    z = _SLOPE * math.log(density / (1.0 - density)) + _OFFSET
    up = 1.0 / (1.0 + math.exp(-z))
    down = min(1.0, max(0.0, 3.0 * (density - 2.0 / 3.0 * up)))
    return up, down


def keep_to_k(keep: float, n: int) -> int:
    """Units kept out of n at fraction `keep`: int(keep * n), truncated as in the reference."""
    return max(0, min(int(n), int(keep * n)))


def gamma_at(gamma: float, t: float, warmup: bool = True) -> float:
    """DIP-CA's weight of uncached units at token t of a sequence: with the reference's warm-up
    gamma_t = 1 - (1 - gamma)(1 - gamma^(t/4)) (1 at t = 0, -> gamma), else gamma."""
    return 1.0 - (1.0 - gamma) * (1.0 - gamma ** (t / 4.0)) if warmup else float(gamma)


@dataclass(frozen=True)
class LayerKeeps:
    """Per-layer keep fractions for the up/gate inputs and the down inputs."""

    up: tuple[float, ...]
    down: tuple[float, ...]

    def k_in(self, layer: int, d: int) -> int:
        return keep_to_k(self.up[layer], d)

    def k_out(self, layer: int, D: int) -> int:
        return keep_to_k(self.down[layer], D)


def _per_layer(value, n_layers: int, what: str) -> tuple[float, ...]:
    vals = [value] * n_layers if isinstance(value, (int, float)) else list(value)
    if len(vals) != n_layers:
        raise DipstreamError(f"{what} lists {len(vals)} layers but the model has {n_layers}; "
                             "give one value per layer or a single number")
    for v in vals:
        if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise DipstreamError(f"{what} value {v} is outside [0, 1]")
    return tuple(float(v) for v in vals)


def layer_keeps(density: float, n_layers: int, up_keep: float | None = None,
                down_keep: float | None = None, keep_file: str | None = None) -> LayerKeeps:
    """Keeps from the reference split, overridden by --up-keep/--down-keep or a per-layer JSON file
    of the form {"up_keep": [..] or x, "down_keep": [..] or y}."""
    up, down = dip_split(density)
    if keep_file is not None:
        try:
            data = json.loads(Path(keep_file).read_text())
        except (OSError, ValueError) as exc:
            raise DipstreamError(f"cannot read keep file '{keep_file}' ({exc.__class__.__name__}); "
                                 'give JSON like {"up_keep": [...], "down_keep": [...]}') from None
        if not isinstance(data, dict) or not {"up_keep", "down_keep"} & set(data):
            raise DipstreamError(f"keep file '{keep_file}' needs keys up_keep and/or down_keep")
        up = data.get("up_keep", up)
        down = data.get("down_keep", down)
    if up_keep is not None:
        up = up_keep
    if down_keep is not None:
        down = down_keep
    return LayerKeeps(_per_layer(up, n_layers, "up_keep"), _per_layer(down, n_layers, "down_keep"))
