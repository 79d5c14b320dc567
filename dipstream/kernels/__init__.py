"""Kernels: the native library (`native`: C sources built and loaded once; the engine's products,
the decode blocks, top-k and the read pool) and the Hugging Face front end's sparse decode MLP
that reads only the selected weight rows (`sparse_mlp`: the same C gather-GEMV, Triton on GPUs).
The bottom of the import graph: nothing here imports models, methods or runs. The torch-based
names load on first use, so `dipstream.native` alone needs no torch."""

_LAZY = {
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
