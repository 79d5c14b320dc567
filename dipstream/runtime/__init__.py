"""Runtime kernels: executing sparsified layers so that a token reads only the weights it uses."""

from dipstream.runtime.sparse_mlp import (
    SparseMLPWeights,
    dense_mlp_reference,
    dip_keep_split,
    gather_gemv,
    keep_to_k,
    masked_dense_reference,
    native_status,
    select_topk_abs,
    sparse_mlp,
)
from dipstream.runtime.quant import QuantizedSparseMLPWeights

__all__ = [
    "SparseMLPWeights",
    "QuantizedSparseMLPWeights",
    "sparse_mlp",
    "gather_gemv",
    "select_topk_abs",
    "dense_mlp_reference",
    "masked_dense_reference",
    "dip_keep_split",
    "keep_to_k",
    "native_status",
]
