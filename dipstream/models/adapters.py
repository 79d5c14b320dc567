"""LoRA adapters (built with `peft`): added to a model's masked linears, saved and loaded as files
(what the sparse MLP code sees of them is `dipstream.models.arch.LoraView`).

`LoraView` is a live, duck-typed view of one peft LoRA layer: the masked linears of
`dipstream.sparsity.ops` add each active adapter's term B A x to their output, feeding A the same
masked input as the host weight (column masks read only the selected columns of A, row masks only
the selected rows of B), so an adapter adds no dense reads. peft's own forward is used whenever the
original (dense) MLP runs, so dense and sparse paths see the same adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dipstream.errors import DipstreamError
from dipstream.models.families import arch_spec

# ---------------------------------------------------------------------------------------------
# Adapter folders: peft's LoRA files plus dipstream's own description (and predictor weights).

META_FILE = "dipstream_adapter.json"
PREDICTOR_FILE = "predictor.safetensors"
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class LoraSettings:
    """What LoRA adapters to add."""

    rank: int = 16
    alpha: float | None = None  # default: 2 x rank (peft init), rank (reference init)
    targets: str = "mlp"  # "mlp" or "mlp+attn"
    init: str = "peft"  # "peft" or "reference" (A ~ N(0, 1/r^2), B = 0, scaling 1)

    def resolved_alpha(self) -> float:
        if self.init not in ("peft", "reference"):
            raise DipstreamError(f"--lora-init '{self.init}' is not one of: peft, reference")
        if self.init == "reference":
            if self.alpha is not None and float(self.alpha) != float(self.rank):
                raise DipstreamError(f"--lora-init reference uses no scaling (alpha = rank = {self.rank}); "
                                     f"drop --lora-alpha {self.alpha:g} or use --lora-init peft")
            return float(self.rank)
        return 2.0 * self.rank if self.alpha is None else float(self.alpha)


def target_regex(model: nn.Module, targets: str) -> str:
    """peft `target_modules` regex of a model's MLP linears (and attention projections)."""
    import re

    spec = arch_spec(model.config)
    if targets not in ("mlp", "mlp+attn"):
        raise DipstreamError(f"--lora-targets '{targets}' is not one of: mlp, mlp+attn")
    mlp = [n for n in (spec.gate, spec.up, spec.fused_gate_up, spec.down) if n]
    names = [f"{spec.mlp}\\.({'|'.join(mlp)})"]
    if targets == "mlp+attn":
        names.append(f"{spec.attn}\\.({'|'.join(spec.attn_proj)})")
    return f"{re.escape(spec.layers)}\\.\\d+\\.({'|'.join(names)})"


def add_lora(model: nn.Module, settings: LoraSettings):
    """Wrap `model` (in place) with fresh LoRA adapters; returns the peft model. Only the adapters
    are trainable."""
    from peft import LoraConfig, get_peft_model

    if settings.rank < 1:
        raise DipstreamError(f"--lora-rank {settings.rank} must be at least 1")
    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.resolved_alpha(), lora_dropout=0.0,
                     target_modules=target_regex(model, settings.targets))
    pm = get_peft_model(model, cfg)
    if settings.init == "reference":  # A ~ N(0, 1/r^2), B = 0 (peft's B is zero already)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if ".lora_A." in n:
                    p.normal_(0.0, 1.0 / settings.rank)
                elif ".lora_B." in n:
                    p.zero_()
    return pm


def count_lora_weights(model: nn.Module) -> int:
    """Number of LoRA adapter weights in `model` (A and B matrices of every adapter)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)


def lora_weights_in(folder: str | Path) -> int:
    """The LoRA weights an adapter folder adds to a model (what `count_lora_weights` counts once it
    is loaded), read from the shapes in its safetensors header without loading anything; 0 for a
    folder without LoRA files."""
    import math

    from safetensors import safe_open

    folder = Path(folder).expanduser()
    if not all((folder / f).exists() for f in LORA_FILES):
        return 0
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()
                   if ".lora_A." in k or ".lora_B." in k)


def save_lora(peft_model, folder: Path) -> None:
    """Write peft's adapter files into `folder`, each replaced atomically."""
    import os
    import shutil
    import tempfile

    from peft import get_peft_model_state_dict

    if any(".inner." in k for k in get_peft_model_state_dict(peft_model)):
        raise RuntimeError("detach the sparse wrappers before saving adapters (their keys would not load)")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lora-", dir=folder))
    try:
        peft_model.save_pretrained(tmp)
        for name in LORA_FILES:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_lora(model: nn.Module, folder: Path):
    """Inject the LoRA adapters saved in `folder` into `model` (in place, frozen); returns the peft
    model. A rank or shape mismatch is a one-line error."""
    from peft import PeftModel

    try:
        pm = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DipstreamError(f"adapter '{folder}' does not fit this model ({first[:160]}); it was "
                             "made for another model or rank") from None
    return pm


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA adapter injected into `model` into its host weight (peft's merge: W += s B A)
    and put the host linears back in place of the adapter layers, so the model's state holds the
    merged weights under their own names. Exact for DIP's column masks (an adapter is fed the inputs
    its host weight is fed: W[:, S] x_S + s B A[:, S] x_S = (W + s B A)[:, S] x_S). Returns how many
    were merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
            merged += 1
    return merged
