"""Synthetic mask traces of a mixture-of-experts model (for tests and simulated runs from reported
rates; the hook contract is in ``trace``'s docstring).

Per layer a router picks ``experts_per_token`` experts per token by score = static popularity
N(0, expert_skew) + an AR(1) process (correlation ``expert_rho`` between consecutive tokens), as
``synthetic_trace`` picks units. ``kind="neuron"``: inside each routed expert a
``layers.i.expert.e.neuron`` hook keeps round(neuron_density * d_ff) neurons by the same scheme
(``skew``, ``rho``; an expert's process advances by the tokens since it was last routed: after g
tokens its correlation is rho**g); unrouted tokens have all-False rows; a shared expert gets
``layers.i.shared.neuron`` hooks at the same density every token. ``kind="dense"``: one
``layers.i.experts`` hook per layer (whole experts; a shared expert is static, no hook).
"""
from __future__ import annotations

import numpy as np

from dipstream.names import layer_key

from .model_shape import ModelShape, get_shape
from .trace import Hook, MaskTrace

MOE_KINDS = ("neuron", "dense")


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices (rows, k) of the k highest scores of each row."""
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def synthetic_moe_trace(shape, neuron_density: float = 1.0, n_tokens: int = 256, rho: float = 0.9,
                        skew: float = 1.0, expert_rho: float = 0.9, expert_skew: float = 1.0,
                        seq_len: int = None, prompt_len: int = 0, seed: int = 0, kind: str = "neuron",
                        model: str = "synthetic-moe") -> MaskTrace:
    """Random MoE masks with temporal correlation (module docstring). Metadata: ``method``
    ("moe-neuron" or "moe-dense"), ``density`` (expected fraction of MLP weights read per token),
    ``neuron_density`` (kept fraction inside a routed expert), ``expert_density`` (k/E) and the
    shape's fields."""
    shape: ModelShape = get_shape(shape)
    if not shape.is_moe:
        raise ValueError("synthetic_moe_trace needs a mixture-of-experts shape (n_experts > 0); use "
                         "synthetic_trace for a dense model")
    if kind not in MOE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MOE_KINDS)}, got {kind!r}")
    if not 0 <= neuron_density <= 1:
        raise ValueError(f"neuron_density must be in [0, 1], got {neuron_density}")
    if not (0 <= rho < 1 and 0 <= expert_rho < 1):
        raise ValueError(f"rho and expert_rho must be in [0, 1), got {rho} and {expert_rho}")
    if int(n_tokens) < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    rng = np.random.default_rng(seed)
    L, E, k, D, d = shape.n_layers, shape.n_experts, shape.experts_per_token, shape.d_ff, shape.d_model
    T, seq_len = int(n_tokens), int(seq_len or n_tokens)
    f32 = np.float32

    # router: per layer, the top-k of popularity + AR(1)
    r_bias = rng.normal(0, expert_skew, (L, E)).astype(f32)
    routed = np.zeros((T, L, E), bool)
    x = None
    for t in range(T):
        if t % seq_len == 0:
            x = rng.standard_normal((L, E), dtype=f32)
        else:
            x = f32(expert_rho) * x + f32(np.sqrt(1 - expert_rho ** 2)) * rng.standard_normal((L, E), dtype=f32)
        np.put_along_axis(routed[t], _top_k(r_bias + x, k), True, axis=1)

    hooks = []
    if kind == "dense":
        for i in range(L):
            hooks.append(Hook(layer_key(i, "experts"), "expert", E, 3 * d * D, routed[:, i, :]))
        kn, ks = D, shape.shared_d_ff
    else:
        kn = int(round(neuron_density * D))
        masks = _routed_neurons(rng, routed, D, kn, rho, skew, seq_len)
        ks = int(round(neuron_density * shape.shared_d_ff))
        shared = (_routed_neurons(rng, np.ones((T, L, 1), bool), shape.shared_d_ff, ks, rho, skew, seq_len)
                  if shape.shared_d_ff else None)
        for i in range(L):
            hooks += [Hook(layer_key(i, "expert", e, "neuron"), "neuron", D, 3 * d, masks[i, e]) for e in range(E)]
            if shared is not None:
                hooks.append(Hook(layer_key(i, "shared", "neuron"), "neuron", shape.shared_d_ff, 3 * d, shared[i, 0]))
    used = 3 * d * L * (k * kn + ks)
    starts = np.arange(0, T, seq_len)
    lens = np.diff(np.append(starts, T))
    meta = {"model": model, "method": f"moe-{kind}", "density": used / shape.mlp_weights(),
            "neuron_density": kn / D, "expert_density": k / E, **shape.to_dict()}
    return MaskTrace(hooks, starts, np.minimum(prompt_len, lens), meta)


def _routed_neurons(rng, routed: np.ndarray, D: int, keep: int, rho: float, skew: float,
                    seq_len: int) -> np.ndarray:
    """bool (L, E, T, D): per token, the ``keep`` top neurons (popularity + AR(1)) of each expert
    ``routed`` (T, L, E) picks; the AR(1) of an expert advances by the tokens since its last use
    (correlation rho**gap), fresh at each sequence start."""
    T, L, E = routed.shape
    f32 = np.float32
    bias = rng.normal(0, skew, (L, E, D)).astype(f32)
    x = np.zeros((L, E, D), f32)
    last = np.full((L, E), -1, np.int64)  # token of the expert's last update in this sequence
    out = np.zeros((L, E, T, D), bool)
    if keep == 0:
        return out
    for t in range(T):
        if t % seq_len == 0:
            last[:] = -1
        li, ei = np.nonzero(routed[t])
        gap = t - last[li, ei]
        a = np.where(last[li, ei] < 0, 0.0, float(rho) ** gap).astype(f32)[:, None]
        b = np.sqrt(1 - a * a)
        xs = a * x[li, ei] + b * rng.standard_normal((len(li), D), dtype=f32)
        x[li, ei], last[li, ei] = xs, t
        idx = _top_k(bias[li, ei] + xs, keep)
        out[li[:, None], ei[:, None], t, idx] = True
    return out
