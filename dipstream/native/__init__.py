"""The native library at the bottom of the import graph: the engine's products and decode blocks,
the one top-k of the selection rule, and the read pool. Built from the C sources in ``csrc/``
(``gemv.c``: compute kernels and top-k, ``decode.c``: the engine's attention and MLP blocks,
``pread.c``: the read pool, ``simfill.c``: the cache simulator's random over-capacity fill,
``common.h``: what they share), shipped as package data, and loaded with ctypes (no torch).

The library is plain C11 + pthreads, compiled once with the system C compiler (``$DIPSTREAM_CC``,
``$CC``, ``gcc`` or ``cc``) into a per-user cache directory and loaded with :mod:`ctypes`, so it
needs no Python build dependency (no ninja, no numba).  Calls go through ctypes, which releases
the GIL.  Threading is a small caller-runs pool of its own (not OpenMP): the calling thread does
the work and helper threads that are awake share it, so a busy machine never makes a call wait
for a descheduled helper (an OpenMP barrier would).

Anything that goes wrong (no compiler, compile error, failed self-test) makes :func:`load` return
``None`` after one :class:`RuntimeWarning`; the engine then refuses in one line (`require`), the
Hugging Face front end's kernels (`dipstream.kernels`) use their pure-torch path, the cache
simulator's random over-capacity fill (`sim_random_drop`) its numpy path.

Environment:
    DIPSTREAM_NATIVE=0        never build or load the kernel (pure-torch path; the simulator: numpy)
    DIPSTREAM_BUILD_DIR=DIR   where compiled libraries are cached
                              (default: kernels/ in dipstream's cache, $DIPSTREAM_CACHE)
    DIPSTREAM_CC=PATH         C compiler to use
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from dipstream.paths import cache_root
from dipstream.validation import private_dir

__all__ = ["load", "require", "status", "sources", "sim_random_drop", "ACTIVATION_CODES"]

# the gated MLP's activations the kernels run (ds_glu's `act`), by the names configs give them
ACTIVATION_CODES = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_tanh": 1, "gelu_new": 1, "gelu": 2}

KERNEL_VERSION = 30
CSRC = Path(__file__).with_name("csrc")
SOURCES = ("gemv.c", "pread.c", "decode.c", "simfill.c")


def sources() -> dict[str, str]:
    """{file name: text} of the C sources and headers (what the build is keyed by)."""
    return {p.name: p.read_text() for p in sorted(CSRC.iterdir()) if p.suffix in (".c", ".h")}

# Tried in order; the first that compiles and passes the self-test wins.
_FLAG_SETS = (
    ("-O3", "-march=native"),
    ("-O3",),
)
_COMMON = ("-std=gnu11", "-shared", "-fPIC", "-pthread", "-fno-math-errno",
           "-fvisibility=hidden")

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "info": {}}


def _build_dir() -> Path:
    env = os.environ.get("DIPSTREAM_BUILD_DIR")
    if env:
        return Path(env)
    return cache_root() / "kernels"


def _private(path: Path) -> None:
    """A library is only loaded from a folder (and file) of this user that nobody else can write:
    a shared cache folder could otherwise hand us someone else's code."""
    private_dir(path)


def _find_cc(cc: str | None) -> str | None:
    for cand in (cc, os.environ.get("DIPSTREAM_CC"), os.environ.get("CC"), "gcc", "cc"):
        if cand:
            path = shutil.which(cand)
            if path:
                return path
            if cc is not None and cand == cc:
                return None  # an explicitly requested compiler that does not exist
    return None


def _cpu_signature() -> str:
    """Something that changes when -march=native would produce different code."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    sig += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return sig


def _cc_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _compile(cc: str, flags: tuple[str, ...], out: Path) -> tuple[bool, str]:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_so = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, *_COMMON, f"-DKERNEL_VERSION={KERNEL_VERSION}", f"-I{CSRC}",
               *(str(CSRC / s) for s in SOURCES), "-o", tmp_so, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return False, f"{' '.join(cmd)}\n{proc.stderr[-2000:]}"
        digest = hashlib.sha256(Path(tmp_so).read_bytes()).hexdigest()
        with open(tmp_so + ".sha256", "w") as f:
            f.write(digest)
        os.replace(tmp_so + ".sha256", _digest_path(out))  # the hash first: a library never lacks its own
        os.replace(tmp_so, out)  # atomic: concurrent builders never see a partial file
        return True, ""
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{type(e).__name__}: {e}"
    finally:
        for leftover in (tmp_so, tmp_so + ".sha256"):
            try:
                os.unlink(leftover)
            except OSError:
                pass


def _digest_path(so: Path) -> Path:
    return so.with_name(so.name + ".sha256")


def _recorded_bytes(so: Path) -> bytes | None:
    """The bytes of `so` when their sha256 is the one its build recorded, else None (a library
    replaced after it was built, or without a record, is never loaded)."""
    try:
        data = so.read_bytes()
        want = _digest_path(so).read_text().strip()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == want else None


def _load_checked(so: Path, data: bytes) -> ctypes.CDLL:
    """Load exactly the checked bytes: from an anonymous in-memory file (Linux memfd), so the file
    cannot be swapped between the check and the load; elsewhere from its path, checked just before."""
    if not hasattr(os, "memfd_create"):
        return ctypes.CDLL(str(so))
    fd = os.memfd_create(so.name)
    os.write(fd, data)
    _state.setdefault("fds", []).append(fd)  # stays open while the library is loaded
    return ctypes.CDLL(f"/proc/self/fd/{fd}")


# ---------------------------------------------------------------- the decode blocks' arguments
# decode.c's ds_mat_t, ds_ctx_t, ds_attn_t and ds_mlp_t as ctypes structures: a layer's attention,
# or its RAM-resident MLP, is one native call per token. They hold raw pointers: the arrays they
# point into must outlive them (the engine's model and MLP backend own both).
_P, _I64, _I32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class DsMat(ctypes.Structure):
    """One matrix's records and headers (engine.qmatrix.QMatrix.native)."""
    _fields_ = [("rec", _P), ("hd", _P), ("hm", _P), ("rows", _I64), ("m", _I64), ("stride", _I64),
                ("group", _I64), ("gi", _I64), ("bits", _I32), ("act8", _I32), ("hk", _I32), ("zp", _I32)]


class DsCtx(ctypes.Structure):
    """What every block of a model shares: shapes, norm rule, threads and work buffers."""
    _fields_ = [("d", _I64), ("H", _I64), ("Hkv", _I64), ("hd", _I64), ("max_seq", _I64), ("eps", _F), ("scale", _F),
                ("gemma", _I32), ("f16", _I32), ("nthreads", _I32), ("act", _I32),
                ("h", _P), ("qkv", _P), ("att", _P), ("o", _P), ("idx", _P), ("coef", _P)]


class DsAttn(ctypes.Structure):
    """One layer's attention: matrices, norms, biases, RoPE tables, KV cache, window, soft-cap."""
    _fields_ = [("qkv", DsMat * 3), ("o", DsMat), ("norm", _P), ("post_norm", _P), ("q_bias", _P), ("k_bias", _P),
                ("v_bias", _P), ("q_norm", _P), ("k_norm", _P), ("cos", _P), ("sin", _P), ("K", _P), ("V", _P),
                ("window", _I64), ("rot", _I64), ("softcap", _F)]


class DsMlp(ctypes.Structure):
    """One layer's RAM-resident MLP: its two matrices, norms, k and work buffers."""
    _fields_ = [("in_", DsMat), ("out", DsMat), ("norm", _P), ("post_norm", _P), ("k_in", _I64), ("k_out", _I64),
                ("gu", _P), ("h", _P), ("y", _P), ("idx_in", _P), ("idx_out", _P), ("coef", _P)]


def ptr(a: np.ndarray | None) -> int | None:
    """The data address of a C-contiguous array (None for None)."""
    if a is None:
        return None
    if not a.flags.c_contiguous:
        raise ValueError("native blocks need contiguous arrays")
    return a.ctypes.data


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ds_gather_gemv.argtypes = [P, I64, I64, I64, P, P, I64, P, I]
    lib.ds_gather_gemv.restype = I
    lib.ds_topk_abs.argtypes = [P, I64, I64, P]
    lib.ds_topk_abs.restype = I64
    lib.ds_select_gemv.argtypes = [P, I64, I64, P, I64, I64, P, P, P, I]
    lib.ds_select_gemv.restype = I64
    lib.ds_select_gemv_qg.argtypes = [P, I64, I64, P, I64, I64, I, P, P, I64, I, I, I64, P, P, P, I, I]
    lib.ds_select_gemv_qg.restype = I64
    lib.ds_gather_gemv_qg.argtypes = [P, I64, I64, I64, I, P, P, I64, I, I, I64, I64, P, P, P, I64, P, I, I, P, I64]
    lib.ds_gather_gemv_qg.restype = I
    lib.ds_rmsnorm.argtypes = [P, I64, P, ctypes.c_float, I, P]
    lib.ds_rmsnorm.restype = I
    lib.ds_glu.argtypes = [P, I64, I, P]
    lib.ds_glu.restype = I
    lib.ds_attention_block.argtypes = [P, P, P, I64]  # structures: DsCtx, DsAttn above
    lib.ds_attention_block.restype = I
    lib.ds_mlp_block.argtypes = [P, P, P, P]
    lib.ds_mlp_block.restype = I
    lib.ds_pread_batch.argtypes = [I, I64, P, P, P, I]
    lib.ds_pread_batch.restype = I
    lib.ds_pread_submit.argtypes = [I, I64, P, P, P, I]
    lib.ds_pread_submit.restype = I
    lib.ds_pread_wait.argtypes = [P]
    lib.ds_pread_wait.restype = I
    lib.ds_sim_random_drop.argtypes = [P, I64, I64, I64, P, I64, P, I64, P, I64]
    lib.ds_sim_random_drop.restype = I
    lib.ds_threads.restype = I
    lib.ds_version.restype = I


def _self_test(lib: ctypes.CDLL) -> bool:
    """A tiny known-answer check, so a miscompiled library is never used (numpy only: the lean
    engine loads the library without torch)."""
    rng = np.random.default_rng(1234)
    W = rng.standard_normal((37, 300)).astype(np.float32)
    idx = np.array([0, 3, 4, 9, 17, 36], np.int64)
    c = rng.standard_normal(idx.size).astype(np.float32)
    out = np.empty(300, np.float32)
    if lib.ds_gather_gemv(W.ctypes.data, 37, 300, 300, idx.ctypes.data, c.ctypes.data, idx.size,
                          out.ctypes.data, 1) != 0:
        return False
    ref = (c.astype(np.float64) @ W.astype(np.float64)[idx]).astype(np.float32)
    if not np.allclose(out, ref, rtol=1e-5, atol=1e-5):
        return False
    v = np.array([1.0, -3.0, 2.0, 3.0, -2.0, 0.5], np.float32)
    sel = np.empty(3, np.int64)
    n = lib.ds_topk_abs(v.ctypes.data, 6, 3, sel.ctypes.data)
    if not (n == 3 and sel.tolist() == [1, 2, 3]):
        return False
    # the simulator's random fill: units 0..69 but 5, the 7 of lowest priority (unit_priority of
    # dipstream.simulator.policies, pinned by its tests); 70 units: a partial last word
    units = np.array([u for u in range(70) if u != 5], np.uint64)
    new = np.zeros(2, np.uint64)
    np.bitwise_or.at(new, (units // 64).astype(np.intp), np.uint64(1) << (units % 64))
    base = np.uint64(0x0123456789ABCDEF)
    with np.errstate(over="ignore"):
        p = base + (units + np.uint64(1)) * np.uint64(0xD6E8FEB86659FD93)
        for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
            p ^= p >> np.uint64(shift)
            if mul is not None:
                p *= np.uint64(mul)
    want = np.zeros(2, np.uint64)
    low = units[np.argsort(p)[:7]]
    np.bitwise_or.at(want, (low // 64).astype(np.intp), np.uint64(1) << (low % 64))
    try:
        got = sim_random_drop(new[None], np.array([7]), np.array([base]), 70, lib=lib)
    except ValueError:
        return False
    return got.ravel().tolist() == want.tolist()


_SIM_ERRORS = {-1: "array lengths that do not match the shapes", -2: "a row's over count negative or above its set "
               "units", -3: "out of memory"}


def sim_random_drop(new: np.ndarray, over: np.ndarray, base: np.ndarray, n_units: int, *,
                    lib: ctypes.CDLL | None = None) -> np.ndarray | None:
    """The cache simulator's random over-capacity fill (``simfill.c``): per row of ``new``
    (uint64 (rows, ceil(n_units / 64)), bit-packed as dipstream.simulator.bits), its ``over[row]``
    set units of lowest priority ``splitmix64(base[row] + (unit + 1) * G2)``, bit-packed the same
    way (rows with ``over`` 0: none). ``None`` when the library is unavailable (the caller's numpy
    path); ValueError for shapes that do not match or an ``over`` outside [0, set units]."""
    lib = lib if lib is not None else load()
    if lib is None:
        return None
    words = np.ascontiguousarray(new, np.uint64)
    if words.ndim != 2:
        raise ValueError(f"sim_random_drop: new must be (rows, words), got shape {words.shape}")
    over = np.ascontiguousarray(over, np.int64)
    base = np.ascontiguousarray(base, np.uint64)
    out = np.empty_like(words)
    rc = lib.ds_sim_random_drop(words.ctypes.data, words.size, words.shape[0], int(n_units), over.ctypes.data,
                                over.size, base.ctypes.data, base.size, out.ctypes.data, out.size)
    if rc != 0:
        raise ValueError(f"sim_random_drop: {_SIM_ERRORS.get(rc, f'error {rc}')} (new {words.shape}, "
                         f"over {over.shape}, base {base.shape}, {n_units} units)")
    return out


def load(*, force: bool = False, cc: str | None = None, build_dir: str | os.PathLike | None = None,
         quiet: bool = False) -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; ``None`` (plus one warning) if that fails.

    ``force`` rebuilds the load decision (not the cache); ``cc`` / ``build_dir`` override the
    environment (used by tests to exercise the fallback).
    """
    with _lock:
        if _state["tried"] and not force:
            return _state["lib"]
        _state["tried"] = True
        _state["lib"] = None
        lib, info = _try_load(cc, Path(build_dir) if build_dir is not None else None)
        _state["lib"], _state["info"] = lib, info
        if lib is None and not quiet and info.get("reason") != "disabled":
            warnings.warn(f"dipstream.native: the native kernel library is unavailable "
                          f"({info.get('reason')}): the engine cannot run, the Hugging Face front end's "
                          f"kernels use their slower pure-torch path, the simulator's random fill its numpy one.",
                          RuntimeWarning, stacklevel=3)
        return lib


def _try_load(cc: str | None, build_dir: Path | None) -> tuple[ctypes.CDLL | None, dict]:
    if os.environ.get("DIPSTREAM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, {"reason": "disabled"}
    if not sys.platform.startswith(("linux", "darwin", "freebsd")):
        return None, {"reason": f"unsupported platform {sys.platform}"}
    compiler = _find_cc(cc)
    if compiler is None:
        return None, {"reason": f"no C compiler found (tried {cc or '$DIPSTREAM_CC, $CC, gcc, cc'})"}
    bdir = build_dir or _build_dir()
    try:
        _private(bdir)
    except Exception as e:  # noqa: BLE001 - DipstreamError or OSError: do not load from there
        return None, {"reason": f"build folder not private: {e}"}
    try:
        code = "\0".join(f"{name}\0{text}" for name, text in sources().items())
    except OSError as e:
        return None, {"reason": f"C sources unreadable: {e}"}
    base_key = "\0".join((code, str(KERNEL_VERSION), compiler, _cc_version(compiler), _cpu_signature(),
                          " ".join(_COMMON), sys.platform))
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256((base_key + " ".join(flags)).encode()).hexdigest()[:16]
        so = bdir / f"dipstream_sparse_mlp_v{KERNEL_VERSION}_{key}.so"
        try:
            data = _recorded_bytes(so) if so.exists() else None
            if data is None:  # none yet, or not the bytes its build recorded: built (again)
                if so.exists():
                    errors.append(f"{so}: its bytes differ from the build's record; rebuilt")
                    so.unlink()
                ok, err = _compile(compiler, flags, so)
                if not ok:
                    errors.append(err)
                    continue
                data = _recorded_bytes(so)
                if data is None:
                    errors.append(f"{so}: its bytes differ from the build's record; not loaded")
                    continue
            st = so.stat()
            if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
                errors.append(f"{so}: owned by another user or writable by others; not loaded")
                continue
            lib = _load_checked(so, data)
            _declare(lib)
            if lib.ds_version() != KERNEL_VERSION or not _self_test(lib):
                errors.append(f"{so}: self-test failed")
                continue
        except OSError as e:  # unreadable build dir, bad library, ...
            errors.append(f"{type(e).__name__}: {e}")
            continue
        return lib, {"reason": None, "path": str(so), "compiler": compiler, "flags": flags}
    short = errors[0].strip().splitlines()[-1] if errors else "unknown error"
    return None, {"reason": f"build failed: {short}", "errors": errors}


def require(what: str = "the lean engine"):
    """The library, or a one-line error saying that `what` needs it and how to get it."""
    lib = load(quiet=True)
    if lib is None:
        from dipstream.errors import DipstreamError

        raise DipstreamError(f"{what} needs the native kernel library, which is unavailable ({status().get('reason')}); "
                             "install a C compiler (gcc)")
    return lib


def status() -> dict:
    """How the kernel was (or was not) loaded: path, compiler, flags, or reason."""
    load()
    return dict(_state["info"], available=_state["lib"] is not None)
