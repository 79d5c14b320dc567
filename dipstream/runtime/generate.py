"""`dipstream generate`: the run, on the lean engine (:mod:`dipstream.runtime.lean_generate`) for
the families it runs, else on the Hugging Face model (:mod:`dipstream.runtime.hf_generate`). This
module and the options stay light (no torch) so a lean run's process holds only what it needs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from dipstream.engine.modelfile import MANIFEST, arch_of, default_head
from dipstream.engine.run import default_model_dir
from dipstream.errors import DipstreamError
from dipstream.runtime.options import DECODE_METHODS, DecodeOptions, GenerateConfig

__all__ = ["GenerateConfig", "DecodeOptions", "DECODE_METHODS", "run_generate"]


def _model_type(cfg: GenerateConfig) -> tuple[str | None, bool]:
    """(model_type, runs on the lean engine): from an exported model file when there is one (no
    heavy imports), else from the checkpoint's config."""
    o = cfg.lean
    for d in (cfg.offload, o.model_dir, default_model_dir(cfg.model, cfg.weights, o.head_weights or default_head(cfg.weights))):
        if d and (Path(d) / MANIFEST).exists():
            return json.loads((Path(d) / MANIFEST).read_text())["arch"]["model_type"], True
    from dipstream.models.loading import resolve_checkpoint

    config = json.loads((resolve_checkpoint(cfg.model)[1] / "config.json").read_text())
    try:
        return config.get("model_type"), bool(arch_of(config))
    except DipstreamError:
        return config.get("model_type"), False


def use_lean(cfg: GenerateConfig) -> bool:
    """The lean engine when asked, or (auto) when the run needs nothing it lacks (LoRA adapters,
    CUDA) and it runs the model's family; an unsupported family falls back with one warning."""
    if cfg.lean.engine == "hf" or (cfg.lean.engine == "auto" and (cfg.adapter or cfg.device == "cuda")):
        return False
    model_type, ok = _model_type(cfg)
    if ok:
        return True
    if cfg.lean.engine == "lean":
        raise DipstreamError(f"the lean engine does not run '{model_type}' models; use --engine hf")
    warnings.warn(f"the lean engine does not run '{model_type}' models: using the Hugging Face model",
                  RuntimeWarning, stacklevel=2)
    return False


def run_generate(cfg: GenerateConfig, out=None) -> dict:
    """Generate (streaming to ``out``, default stdout, when cfg.stream); returns a results row."""
    cfg.validate()
    if use_lean(cfg):
        cfg.validate_lean()
        from dipstream.runtime.lean_generate import run_lean

        return run_lean(cfg, out)
    cfg.validate_hf()
    from dipstream.runtime.hf_generate import run_hf

    return run_hf(cfg, out)
