"""Models: the architecture table (`families`, no torch), gated-MLP parts (`arch`), loading of
built-in and local checkpoints (`loading`). The torch-based names load on first use, so the
lean engine can read the table without torch."""

_LAZY = {"GatedMLPParts": "arch", "ModelInfo": "arch", "describe": "arch", "mlp_parts": "arch",
         "BUILTIN_MODELS": "loading", "LoadedModel": "loading", "load_model": "loading"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dipstream.models.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = sorted(_LAZY)
