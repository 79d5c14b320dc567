"""Where a run executes: `--device` and `--dtype` parsed and checked, free memory, the predicted
footprint of a model checked before any weight is loaded, and what the process holds and reads
(resident and peak memory, bytes read from storage)."""

from __future__ import annotations

import re

from dipstream.errors import DipstreamError

DEVICE_HELP = "auto (cuda when present, else cpu), cpu, cuda or cuda:N"
DTYPES = ("float32", "float64", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def check_device_name(name: str) -> None:
    """One-line error for a --device that is not auto, cpu, cuda or cuda:N (no torch import)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(name)):
        raise DipstreamError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N; e.g. --device cuda:0")


def pick_device(name: str = "auto"):
    """The torch.device of `name`; a one-line error when CUDA (or that GPU) is absent."""
    import torch

    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DipstreamError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DipstreamError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                 f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    return torch.device(name)


def check_dtype(device, dtype: str) -> None:
    """One-line error for a dtype the device cannot run."""
    import torch

    if dtype not in DTYPES:
        raise DipstreamError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise DipstreamError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                             "use --dtype float16 or float32")


def available_bytes(device) -> int:
    """Free memory on `device`: GPU memory on CUDA, else the system's available RAM."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def available_ram() -> int:
    """RAM this process may still take: the system's available memory, or less where the process's
    memory cgroup (a container, a `systemd-run -p MemoryMax=`, a test's limit) leaves less."""
    import psutil

    free = int(psutil.virtual_memory().available)
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return free
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            files = ("/sys/fs/cgroup" + path + "/memory.max", "/sys/fs/cgroup" + path + "/memory.current")
        elif "memory" in controllers.split(","):
            base = "/sys/fs/cgroup/memory" + path
            files = (base + "/memory.limit_in_bytes", base + "/memory.usage_in_bytes")
        else:
            continue
        try:
            limit, used = (open(f).read().strip() for f in files)
            if limit.isdigit() and used.isdigit():
                free = min(free, max(int(limit) - int(used), 0))
        except OSError:
            pass
    return free


def check_memory(need: int, available: int, what: str, advice: str) -> None:
    """One-line error when a predicted peak does not fit in 90% of the free memory."""
    if need > 0.9 * available:
        raise DipstreamError(f"{what} is predicted to need {need / 2**30:.1f} GiB but only "
                             f"{available / 2**30:.1f} GiB is free; {advice}")


def model_bytes(shape, dtype: str) -> int:
    """Predicted bytes of a model's weights in `dtype`, from its shape (attention, MLP, head and an
    untied input embedding)."""
    return int(sum(shape.weights().values()) * DTYPE_BYTES[dtype])


def peak_memory(device) -> int:
    """The process's peak memory so far: allocated GPU memory on CUDA, else peak resident set."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def rss_bytes() -> int:
    """This process's resident memory now."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    """Hand this process's freed heap back to the system (garbage collection, then glibc's
    malloc_trim where there is one), so its RSS is what it holds."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def map_large_allocations(threshold: int = 1 << 17) -> None:
    """Have glibc serve every allocation above `threshold` bytes by its own mapping, returned to
    the system when freed (mallopt M_MMAP_THRESHOLD). By default glibc raises that threshold after
    the first large frees and then keeps such buffers in its heap: a pass that allocates and frees
    one 8 MB slice after another grows the RSS by several of them (the export: 20 MB more on SmolLM2)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux VmHWM: unlike ru_maxrss, not inherited from the
    parent that started it; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def disk_read_bytes() -> int:
    """Bytes this process has read from storage (the page cache excluded), or -1 where unknown."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1
