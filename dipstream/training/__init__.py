"""Recovery and trained sparsity: LoRA fine-tuning of sparse models (CE or distillation), dReLU /
ReLUfication fine-tunes, and DejaVu-style predictors; resumable, written as adapter folders. The
configs are light; the training loads torch when first used."""

from dipstream.training.config import FinetuneConfig, TrainOptions


def __getattr__(name):
    if name == "run_finetune":
        from dipstream.training.finetune import run_finetune

        return run_finetune
    raise AttributeError(f"module 'dipstream.training' has no attribute '{name}'")


__all__ = ["FinetuneConfig", "TrainOptions", "run_finetune"]
