"""The native decode blocks' arguments (decode.c's ds_mat_t, ds_ctx_t, ds_attn_t, ds_mlp_t) as
ctypes structures over the lean engine's arrays: a layer's attention, or its RAM-resident MLP,
is then one native call per token. The structures hold raw pointers: the arrays they point
into must outlive them (the model and its MLP backend own both)."""

from __future__ import annotations

import ctypes

import numpy as np

from dipstream.engine.qmatrix import QMatrix

P, I64, I32, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class DsMat(ctypes.Structure):
    _fields_ = [("rec", P), ("hd", P), ("hm", P), ("rows", I64), ("m", I64), ("stride", I64), ("group", I64),
                ("gi", I64), ("bits", I32), ("act8", I32)]


class DsCtx(ctypes.Structure):
    _fields_ = [("d", I64), ("H", I64), ("Hkv", I64), ("hd", I64), ("max_seq", I64), ("eps", F), ("scale", F),
                ("gemma", I32), ("f16", I32), ("nthreads", I32), ("act", I32),
                ("h", P), ("qkv", P), ("att", P), ("o", P), ("idx", P), ("coef", P)]


class DsAttn(ctypes.Structure):
    _fields_ = [("qkv", DsMat * 3), ("o", DsMat), ("norm", P), ("post_norm", P), ("q_bias", P), ("k_bias", P),
                ("v_bias", P), ("q_norm", P), ("k_norm", P), ("cos", P), ("sin", P), ("K", P), ("V", P),
                ("window", I64), ("rot", I64), ("softcap", F)]


class DsMlp(ctypes.Structure):
    _fields_ = [("in_", DsMat), ("out", DsMat), ("norm", P), ("post_norm", P), ("k_in", I64), ("k_out", I64),
                ("gu", P), ("h", P), ("y", P), ("idx_in", P), ("idx_out", P), ("coef", P)]


def ptr(a: np.ndarray | None) -> int | None:
    """The data address of a C-contiguous array (None for None)."""
    if a is None:
        return None
    if not a.flags.c_contiguous:
        raise ValueError("native blocks need contiguous arrays")
    return a.ctypes.data


def mat(q: QMatrix) -> DsMat:
    """A matrix's records and headers as ds_mat_t."""
    return DsMat(ptr(q.rec), ptr(q.hd), ptr(q.hm), q.rows, q.m, q.stride, q.group, q.gi, q.bits, int(q.act8))
