"""Evaluation: perplexity of a (sparsified) model on token windows."""

from dipstream.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
