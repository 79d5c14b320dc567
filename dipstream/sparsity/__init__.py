"""Sparsity methods for gated MLPs and the machinery to attach them to a model."""

from dipstream.sparsity.attach import DensityStats, SparseModel, attach
from dipstream.sparsity.base import METHODS, Method, Selection, register
from dipstream.budget import dip_split, layer_keeps
from dipstream.sparsity.methods import MethodOptions, build_method
from dipstream.sparsity import cache_aware, predictor, relu  # noqa: F401,E402  (register dip-ca, ...)

__all__ = ["METHODS", "DensityStats", "Method", "MethodOptions", "Selection", "SparseModel", "attach",
           "build_method", "dip_split", "layer_keeps", "register"]
