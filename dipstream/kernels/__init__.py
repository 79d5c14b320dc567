"""Kernels: the sparse decode MLP that reads only the selected weight rows (fused C gather-GEMV,
int8 / 4-bit rows, Triton on GPUs) and the native library they, the offload file's reads and the
lean engine use. The bottom of the import graph: nothing here imports models, methods or runs.
The torch-based names load on first use, so `dipstream.kernels.native` alone needs no torch
(the function `sparse_mlp` lives in, and is imported from, the module of that name)."""

_LAZY = {
    "QuantizedSparseMLPWeights": "quant",
    "SparseMLPWeights": "sparse_mlp",
    "gather_gemv": "sparse_mlp",
    "select_topk_abs": "sparse_mlp",
    "dense_mlp_reference": "sparse_mlp",
    "masked_dense_reference": "sparse_mlp",
    "native_status": "sparse_mlp",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dipstream.kernels.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = list(_LAZY)
