"""DIP (dynamic input pruning) gated MLP for batch-1 decode, reading only the selected weights.

For one token x (length d) and a gated MLP ``y = W_down (act(W_gate x) * (W_up x))``::

    S_in  = top-k_in  of |x|                       (input units kept)
    h     = act(W_gate[:, S_in] x[S_in]) * (W_up[:, S_in] x[S_in])       (length D)
    S_out = top-k_out of |h|                       (hidden units kept)
    y     = W_down[:, S_out] h[S_out]

Gathering columns with torch indexing copies them and is slower than the dense product, so the
weights are stored transposed (:class:`SparseMLPWeights`): every selected input index is one
contiguous row ``[gate^T row | up^T row]`` of length 2D, and every selected hidden index one
contiguous row of ``W_down^T`` (length d).  A fused C kernel (:mod:`dipstream.native`)
streams exactly those rows once, accumulating in cache (no gathered copy).  Large products are
split into a grid of column slices x blocks of selected rows (partial sums added in a fixed
order) shared by the calling thread and a small helper pool (``num_threads``, default
``torch.get_num_threads()``).  The activation between the halves runs in torch, so h (and
hence S_out) is computed exactly like the references compute it.

Selection is deterministic and the same as everywhere else (:mod:`dipstream.selection`): the k
largest |v|, NaN counting as +inf, ties broken by the lower index.  Index sets are returned in ascending order.
If the kernel cannot be built, everything falls back to a pure-torch path (one warning).
"""

from __future__ import annotations

import ctypes
import operator
import sys
import threading

import torch
import torch.nn.functional as F

from dipstream import native as _native
from dipstream.selection import topk_indices, topk_indices_np

__all__ = [
    "SparseMLPWeights",
    "sparse_mlp",
    "gather_gemv",
    "select_topk_abs",
    "dense_mlp_reference",
    "masked_dense_reference",
    "native_status",
]

ACTIVATIONS = _native.ACTIVATION_CODES
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _act_code(act: str) -> int:
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(ACTIVATIONS)}") from None


def activation(g: torch.Tensor, act: str) -> torch.Tensor:
    code = _act_code(act)
    if code == 0:
        return F.silu(g)
    return F.gelu(g, approximate="tanh" if code == 1 else "none")


def _check_k(k, n: int, name: str) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(k).__name__}") from None
    if k < 0:
        raise ValueError(f"{name} must be >= 0, got {k}")
    return min(k, n)


def _use_native(backend: str):
    if backend == "torch":
        return None
    if backend not in ("auto", "native", "triton"):
        raise ValueError(f"backend must be 'auto', 'native', 'torch' or 'triton', got {backend!r}")
    lib = _native.load()
    if lib is None and backend == "native":
        raise RuntimeError(f"native kernel unavailable: {_native.status().get('reason')}")
    return lib


def native_status() -> dict:
    """Whether the compiled kernel is in use, and where it came from (or why not)."""
    return _native.status()


# --------------------------------------------------------------------------- layout

_madvise = None


def _advise_huge(t: torch.Tensor) -> None:
    global _madvise
    try:
        if _madvise is None:
            libc = ctypes.CDLL(None, use_errno=True)
            _madvise = libc.madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise.restype = ctypes.c_int
        _madvise(t.data_ptr(), t.numel() * t.element_size(), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


def _alloc(rows: int, cols: int, huge_pages: bool) -> torch.Tensor:
    """An uninitialised (rows, cols) float32 matrix; large ones 2 MiB aligned and advised for
    transparent huge pages (fewer TLB misses when hopping between selected rows)."""
    n = rows * cols
    if not (huge_pages and sys.platform.startswith("linux") and n * 4 >= 4 * _HUGE_PAGE):
        return torch.empty(rows, cols, dtype=torch.float32)
    buf = torch.empty(n + _HUGE_PAGE // 4, dtype=torch.float32)
    off = ((-buf.data_ptr()) % _HUGE_PAGE) // 4
    t = buf[off:off + n].view(rows, cols)
    _advise_huge(t)  # before first touch, so the pages can be huge from the start
    return t


class SparseMLPWeights:
    """Gated-MLP weights laid out so each selected unit's weights are one contiguous row.

    Built from ``W_gate`` (D, d), ``W_up`` (D, d), ``W_down`` (d, D) (nn.Linear convention,
    any float dtype; stored as ``dtype``, default float32, on ``device``, default CPU; the CPU
    kernel needs float32 on the CPU, CUDA weights use the Triton kernel):

    * ``gate_up_t`` (d, 2D): row j is ``[W_gate[:, j] | W_up[:, j]]``; views ``gate_t``/``up_t``.
    * ``down_t`` (D, d): row i is ``W_down[:, i]``.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
                 huge_pages: bool = True, device=None, dtype: torch.dtype = torch.float32):
        for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
                raise ValueError(f"{name} must be a 2-D floating-point tensor")
        D, d = w_gate.shape
        if tuple(w_up.shape) != (D, d) or tuple(w_down.shape) != (d, D):
            raise ValueError(f"shape mismatch: w_gate {tuple(w_gate.shape)}, w_up "
                             f"{tuple(w_up.shape)}, w_down {tuple(w_down.shape)}; expected "
                             f"(D, d), (D, d), (d, D)")
        self.d, self.D = int(d), int(D)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cpu" and dtype == torch.float32:
            alloc = _alloc
        else:
            def alloc(r, c, _hp):
                return torch.empty(r, c, dtype=dtype, device=dev)
        with torch.no_grad():
            self.gate_up_t = alloc(d, 2 * D, huge_pages)
            self.gate_up_t[:, :D].copy_(w_gate.detach().t())
            self.gate_up_t[:, D:].copy_(w_up.detach().t())
            self.down_t = alloc(D, d, huge_pages)
            self.down_t.copy_(w_down.detach().t())
        self._scratch = threading.local()

    @classmethod
    def from_linears(cls, gate_proj: torch.nn.Linear, up_proj: torch.nn.Linear,
                     down_proj: torch.nn.Linear, **kw) -> "SparseMLPWeights":
        """From bias-free ``nn.Linear`` layers (e.g. a Llama/Qwen/Gemma MLP's projections)."""
        for lin in (gate_proj, up_proj, down_proj):
            if getattr(lin, "bias", None) is not None:
                raise ValueError("biased projections are not supported")
        return cls(gate_proj.weight, up_proj.weight, down_proj.weight, **kw)

    @property
    def gate_t(self) -> torch.Tensor:
        """(d, D) view: row j = W_gate[:, j]."""
        return self.gate_up_t[:, :self.D]

    @property
    def up_t(self) -> torch.Tensor:
        """(d, D) view: row j = W_up[:, j]."""
        return self.gate_up_t[:, self.D:]

    def dense_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_gate, W_up, W_down) as transposed views of the stored layout (no copy)."""
        return self.gate_t.t(), self.up_t.t(), self.down_t.t()

    @property
    def device(self) -> torch.device:
        return self.gate_up_t.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up_t.dtype

    @property
    def nbytes(self) -> int:
        return (self.gate_up_t.numel() + self.down_t.numel()) * self.gate_up_t.element_size()

    def bytes_read(self, k_in: int, k_out: int) -> int:
        """Weight bytes one token reads at these k (the memory traffic the kernel streams)."""
        return (min(k_in, self.d) * 2 * self.D + min(k_out, self.D) * self.d) * \
            self.gate_up_t.element_size()

    @property
    def rows_in(self) -> torch.Tensor:
        """The row matrix the input selection reads ((d, 2D): [gate | up] per input index)."""
        return self.gate_up_t

    @property
    def rows_out(self) -> torch.Tensor:
        """The row matrix the hidden selection reads ((D, d): W_down^T)."""
        return self.down_t

    def _buffers(self):
        s = self._scratch
        if getattr(s, "gu", None) is None:
            s.gu = torch.empty(2 * self.D, dtype=torch.float32)
            s.h = torch.empty(self.D, dtype=torch.float32)
            s.coef = torch.empty(max(self.d, self.D), dtype=torch.float32)
            s.idx_in = torch.empty(self.d, dtype=torch.int64)
            s.idx_out = torch.empty(self.D, dtype=torch.int64)
        return s

    def __repr__(self) -> str:
        return (f"SparseMLPWeights(d={self.d}, D={self.D}, {str(self.dtype)[6:]}, "
                f"{self.device}, {self.nbytes / 2**20:.1f} MiB)")


# --------------------------------------------------------------------------- selection

def _select_topk_abs_torch(v: torch.Tensor, k: int) -> torch.Tensor:
    v = v.reshape(-1)
    return topk_indices(v.abs(), _check_k(k, v.numel(), "k"))


def select_topk_abs(v: torch.Tensor, k: int, *, backend: str = "auto") -> torch.Tensor:
    """Ascending int64 indices of the k largest |v| (ties: lower index first; NaN as +inf), on
    v's device (the C kernel serves CPU tensors, torch the others)."""
    v = v.reshape(-1)
    n = v.numel()
    k = _check_k(k, n, "k")
    lib = _use_native(backend) if v.device.type == "cpu" else None
    if lib is None:
        return _select_topk_abs_torch(v, k)
    return torch.from_numpy(topk_indices_np(v.detach().to(torch.float32).abs().numpy(), k))


# --------------------------------------------------------------------------- kernels

def _threads(num_threads: int | None) -> int:
    return max(1, int(num_threads) if num_threads is not None else torch.get_num_threads())


def gather_gemv(Wt: torch.Tensor, idx: torch.Tensor, coeffs: torch.Tensor, *,
                out: torch.Tensor | None = None, backend: str = "auto",
                num_threads: int | None = None) -> torch.Tensor:
    """``sum_i coeffs[i] * Wt[idx[i], :]`` reading only the rows ``idx`` (no gathered copy).

    ``Wt`` is a float32 (n, m) matrix with contiguous rows (``Wt.stride(1) == 1``; any row
    stride).  ``idx`` are row indices (any order, repeats allowed; ascending is fastest),
    ``coeffs`` their weights.  Returns a float32 (m,) tensor (written into ``out`` if given).
    """
    if backend == "triton" or (backend == "auto" and Wt.is_cuda):
        from dipstream.kernels.triton_gemv import gather_gemv_triton

        res = gather_gemv_triton(Wt, idx, coeffs)
        return res if out is None else out.copy_(res)
    if Wt.dim() != 2 or Wt.dtype != torch.float32:
        raise ValueError("Wt must be a 2-D float32 tensor (CUDA tensors: any float dtype)")
    if Wt.stride(1) != 1 and Wt.shape[1] > 1:
        raise ValueError("Wt rows must be contiguous (Wt.stride(1) == 1); store the transpose")
    n, m = Wt.shape
    idx = idx.detach().reshape(-1).to(torch.int64).contiguous()
    coeffs = coeffs.detach().reshape(-1).to(torch.float32).contiguous()
    if idx.numel() != coeffs.numel():
        raise ValueError(f"idx has {idx.numel()} entries but coeffs has {coeffs.numel()}")
    if out is None:
        out = torch.empty(m, dtype=torch.float32)
    elif out.shape != (m,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape ({m},)")
    lib = _use_native(backend)
    if lib is None:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise IndexError(f"row index out of range for Wt with {n} rows")
        out.copy_(coeffs @ Wt.index_select(0, idx) if idx.numel() else torch.zeros(m))
        return out
    rc = lib.ds_gather_gemv(Wt.data_ptr(), n, max(Wt.stride(0), 1), m, idx.data_ptr(),
                            coeffs.data_ptr(), idx.numel(), out.data_ptr(),
                            _threads(num_threads))
    if rc != 0:
        raise IndexError(f"row index out of range for Wt with {n} rows")
    return out


def rows_gemv_torch(rows: torch.Tensor, idx: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``coeffs @ rows[idx]`` in plain torch."""
    if idx.numel() == 0:
        return torch.zeros(rows.shape[1], dtype=torch.float32)
    return coeffs @ rows.index_select(0, idx).float()


def rows_select_gemv(lib, rows, v: torch.Tensor, k: int, idx: torch.Tensor, coef: torch.Tensor,
                     out: torch.Tensor, nthreads: int) -> int:
    """Native top-k of |v| -> idx, then ``out = v[idx] @ rows[idx]``; returns the count."""
    got = lib.ds_select_gemv(v.data_ptr(), v.numel(), k, rows.data_ptr(), rows.stride(0), rows.shape[1],
                             idx.data_ptr(), coef.data_ptr(), out.data_ptr(), nthreads)
    if got != k:
        raise MemoryError("ds_select_gemv failed")
    return got


def _sparse_token_torch(w, x: torch.Tensor, k_in: int, k_out: int, act: str):
    s_in = _select_topk_abs_torch(x, k_in)
    gu = rows_gemv_torch(w.rows_in, s_in, x.index_select(0, s_in))
    h = activation(gu[:w.D], act) * gu[w.D:]
    s_out = _select_topk_abs_torch(h, k_out)
    y = rows_gemv_torch(w.rows_out, s_out, h.index_select(0, s_out))
    return y, s_in, s_out


def _sparse_token_native(lib, w, x: torch.Tensor, k_in: int, k_out: int,
                         act: str, want_idx: bool, nthreads: int):
    b = w._buffers()
    y = torch.empty(w.d, dtype=torch.float32)
    idx_in = torch.empty(k_in, dtype=torch.int64) if want_idx else b.idx_in
    idx_out = torch.empty(k_out, dtype=torch.int64) if want_idx else b.idx_out
    # [gate | up] pre-activations from the selected input rows only
    rows_select_gemv(lib, w.rows_in, x, k_in, idx_in, b.coef, b.gu, nthreads)
    # the activation runs in torch, bit-identical to the references (selection of S_out
    # depends on it, e.g. on which saturated GELU/SiLU values round to exactly 0)
    torch.mul(activation(b.gu[:w.D], act), b.gu[w.D:], out=b.h)
    rows_select_gemv(lib, w.rows_out, b.h, k_out, idx_out, b.coef, y, nthreads)
    return y, idx_in, idx_out


def sparse_mlp(weights: SparseMLPWeights, x: torch.Tensor, k_in: int, k_out: int,
               act: str = "silu", *, return_indices: bool = False, backend: str = "auto",
               num_threads: int | None = None):
    """DIP gated MLP on one token (``x`` of shape (d,) or (1, d)); rows of (T, d) one by one.

    ``k_in`` / ``k_out`` are clamped to d / D (``k = d, D`` is the dense MLP; ``k = 0`` gives 0).
    ``act``: "silu" (= "swish"), "gelu_tanh" (= "gelu_pytorch_tanh", "gelu_new") or "gelu" (erf).
    Returns ``y`` shaped like ``x`` (float32), or ``(y, S_in, S_out)`` with ascending int64
    index tensors (lists of them when T > 1) if ``return_indices``.
    ``backend``: "auto" (CUDA weights: Triton; CPU: the C kernel if it built, else torch),
    "native" (C kernel or error), "torch", "triton" (the Triton kernel, also on CPU tensors under
    ``TRITON_INTERPRET=1``; see :mod:`dipstream.kernels.triton_gemv`).
    ``num_threads``: kernel threads (default ``torch.get_num_threads()``).
    """
    if not isinstance(weights, SparseMLPWeights):
        raise TypeError("weights must be a SparseMLPWeights")
    _act_code(act)  # validate early
    if x.shape[-1] != weights.d or x.dim() not in (1, 2):
        raise ValueError(f"x must have shape ({weights.d},) or (T, {weights.d}), "
                         f"got {tuple(x.shape)}")
    k_in = _check_k(k_in, weights.d, "k_in")
    k_out = _check_k(k_out, weights.D, "k_out")
    dev = weights.device
    triton = backend == "triton" or (backend == "auto" and dev.type == "cuda")
    lib = None
    if triton:
        from dipstream.kernels import triton_gemv

        if not triton_gemv.available():
            raise RuntimeError("the Triton kernel needs triton and a CUDA device "
                               "(or TRITON_INTERPRET=1 for CPU tensors)")
    else:
        if weights.dtype != torch.float32 or dev.type != "cpu":
            if backend == "native":
                raise ValueError("the C kernel needs float32 weights on the CPU")
            backend = "torch"
        lib = _use_native(backend)
    xd = x.detach()
    if xd.dtype != torch.float32:
        xd = xd.to(torch.float32)
    if x.dim() == 1 or x.shape[0] == 1:  # the decode fast path: one token
        xt = xd.reshape(weights.d)
        if not xt.is_contiguous():
            xt = xt.contiguous()
        if triton:
            y, s_in, s_out = triton_gemv.sparse_mlp_triton(weights, xt.to(dev), k_in, k_out,
                                                           lambda g: activation(g, act))
        elif lib is None:
            y, s_in, s_out = _sparse_token_torch(weights, xt, k_in, k_out, act)
        else:
            y, s_in, s_out = _sparse_token_native(lib, weights, xt, k_in, k_out, act,
                                                  return_indices, _threads(num_threads))
        if x.dim() == 2:
            y = y.unsqueeze(0)
        return (y, s_in, s_out) if return_indices else y
    ys, s_ins, s_outs = [], [], []
    for t in range(xd.shape[0]):
        y, s_in, s_out = sparse_mlp(weights, xd[t], k_in, k_out, act, return_indices=True,
                                    backend=backend, num_threads=num_threads)
        ys.append(y)
        s_ins.append(s_in)
        s_outs.append(s_out)
    y = torch.stack(ys)
    return (y, s_ins, s_outs) if return_indices else y


# --------------------------------------------------------------------------- references

def dense_mlp_reference(W_gate: torch.Tensor, W_up: torch.Tensor, W_down: torch.Tensor,
                        x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """The unpruned gated MLP: ``W_down (act(W_gate x) * (W_up x))`` (plain torch)."""
    return F.linear(activation(F.linear(x, W_gate), act) * F.linear(x, W_up), W_down)


def masked_dense_reference(W_gate: torch.Tensor, W_up: torch.Tensor, W_down: torch.Tensor,
                           x: torch.Tensor, k_in: int, k_out: int, act: str = "silu", *,
                           return_indices: bool = False):
    """DIP by masking in plain dense torch: zero all but the top-k_in |x|, run the dense
    up/gate products, zero all but the top-k_out |h|, run the dense down product.

    Same selection rule as :func:`sparse_mlp` (ties -> lower index).  x: (d,) or (1, d)."""
    d = W_gate.shape[1]
    xv = x.reshape(-1)
    if xv.numel() != d:
        raise ValueError("masked_dense_reference takes a single token")
    s_in = _select_topk_abs_torch(xv, k_in)
    xm = torch.zeros_like(xv)
    xm[s_in] = xv[s_in]
    h = activation(F.linear(xm, W_gate), act) * F.linear(xm, W_up)
    s_out = _select_topk_abs_torch(h, k_out)
    hm = torch.zeros_like(h)
    hm[s_out] = h[s_out]
    y = F.linear(hm, W_down).reshape(x.shape[:-1] + (W_down.shape[0],))
    return (y, s_in, s_out) if return_indices else y
