"""`dipstream generate`: the run, on the lean engine (:mod:`dipstream.runtime.engine_generate`),
or on the Hugging Face model where the engine does not go (CUDA, `--engine hf`;
:mod:`dipstream.runtime.hf_generate`). This module and the options stay light (no torch) so an
engine run's process holds only what it needs."""

from __future__ import annotations

from dipstream.engine.export import default_model_dir, engine_runs
from dipstream.engine.modelfile import default_head
from dipstream.errors import DipstreamError
from dipstream.runtime.options import GenerateConfig

__all__ = ["GenerateConfig", "run_generate"]


def use_engine(cfg: GenerateConfig) -> bool:
    """The lean engine when asked, or (auto) on the CPU for the families it runs; CUDA and `--engine
    hf` take the Hugging Face model."""
    if cfg.engine == "hf" or (cfg.engine == "auto" and cfg.device == "cuda"):
        return False
    folder = cfg.offload or cfg.model_dir or default_model_dir(cfg.model, cfg.weights,
                                                               cfg.head_weights or default_head(cfg.weights), cfg.adapter)
    model_type, ok = engine_runs(cfg.model, folder)
    if not ok:
        raise DipstreamError(f"the lean engine does not run '{model_type}' models (a mixture-of-experts model: "
                             "`eval`, `simulate` and `sweep` run it)")
    return True


def run_generate(cfg: GenerateConfig, out=None) -> dict:
    """Generate (streaming to ``out``, default stdout, when cfg.stream); returns a results row."""
    cfg.validate()
    if use_engine(cfg):
        cfg.validate_lean()
        from dipstream.runtime.engine_generate import run_engine

        return run_engine(cfg, out)
    cfg.validate_hf()
    from dipstream.runtime.hf_generate import run_hf

    return run_hf(cfg, out)
