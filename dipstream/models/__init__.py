"""Models: architecture table, gated-MLP parts, loading of built-in and local checkpoints."""

from dipstream.models.arch import GatedMLPParts, ModelInfo, describe, mlp_parts
from dipstream.models.loading import BUILTIN_MODELS, LoadedModel, load_model

__all__ = ["BUILTIN_MODELS", "GatedMLPParts", "LoadedModel", "ModelInfo", "describe", "load_model",
           "mlp_parts"]
