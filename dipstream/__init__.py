"""dipstream: dynamic input pruning (DIP), cache-aware masking and baselines for gated-MLP LLMs."""

__version__ = "0.1.0"

from dipstream.errors import DipstreamError  # noqa: E402

__all__ = ["DipstreamError", "__version__"]
