"""Kernels: the sparse decode MLP that reads only the selected weight rows (fused C gather-GEMV,
int8 / 4-bit rows, Triton on GPUs) and the native library they and the offload file's reads use.
The bottom of the import graph: nothing here imports models, methods or runs."""

from dipstream.kernels.quant import QuantizedSparseMLPWeights
from dipstream.kernels.sparse_mlp import (
    SparseMLPWeights,
    dense_mlp_reference,
    gather_gemv,
    masked_dense_reference,
    native_status,
    select_topk_abs,
    sparse_mlp,
)

__all__ = ["SparseMLPWeights", "QuantizedSparseMLPWeights", "sparse_mlp", "gather_gemv",
           "select_topk_abs", "dense_mlp_reference", "masked_dense_reference", "native_status"]
