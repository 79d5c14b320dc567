"""dipstream: dynamic input pruning (DIP), cache-aware masking and baselines for gated-MLP LLMs.

From Python: `dipstream.load(model, method=..., density=...)` gives an `Engine` (generate, stream,
chat, stats); `dipstream.attach(hf_model, "dip", 0.5)` sparsifies your own transformers model and
`dipstream.perplexity(model, tokenizer, text)` measures it (`dipstream.api`)."""

__version__ = "0.1.0"

from dipstream.errors import DipstreamError  # noqa: E402

_API = ("load", "open_engine", "Engine", "Completion", "SessionConfig", "attach", "perplexity")


def __getattr__(name):  # the API loads on first use: `import dipstream` stays light for the CLI
    if name not in _API:
        raise AttributeError(f"module 'dipstream' has no attribute '{name}'")
    from dipstream import api

    return getattr(api, name)


__all__ = ["DipstreamError", "__version__", *_API]
