"""Sparsity methods for gated MLPs and the machinery to attach them to a model. The registry's
decode side (`decoding`: what the engine runs per token) needs no torch; the other names load
on first use, with every method registered."""

_LAZY = {"DensityStats": "attach", "SparseModel": "attach", "attach": "attach", "METHODS": "base", "Method": "base",
         "Selection": "base", "register": "base", "MethodOptions": "methods", "build_method": "methods",
         "dip_split": "dipstream.budget", "layer_keeps": "dipstream.budget"}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    for module in ("attach", "base", "methods", "cache_aware", "predictor", "relu"):  # every method registered
        importlib.import_module(f"dipstream.sparsity.{module}")
    names = {n: getattr(importlib.import_module(m if "." in m else f"dipstream.sparsity.{m}"), n)
             for n, m in _LAZY.items()}
    globals().update(names)  # the function `attach`, not the module of that name
    return names[name]


__all__ = sorted(_LAZY)
