"""Recovery and trained sparsity: LoRA fine-tuning of sparse models (CE or distillation), dReLU /
ReLUfication fine-tunes, and DejaVu-style predictors; resumable, written as adapter folders."""

from dipstream.training.config import FinetuneConfig, TrainOptions
from dipstream.training.finetune import run_finetune

__all__ = ["FinetuneConfig", "TrainOptions", "run_finetune"]
