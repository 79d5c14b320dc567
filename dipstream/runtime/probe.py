"""`dipstream probe`: measure this machine and write a hardware file the simulator accepts.

Measured (each a median of repeats), with the engine's own kernels and reader (no torch):

* RAM read bandwidth: a sum over a large float32 array (``dram_bw``);
* CPU GEMV throughput: the engine's float32 product over every record of a RAM-resident matrix
  (FLOP/s -> ``compute_flops``; its bytes/s are reported too);
* disk: a test file written in ``--dir`` and read back with the engine's reader (direct I/O when
  the filesystem allows it): sequential reads of ``--seq-chunk`` bytes one at a time
  (``flash_bw``; the engine reads a run of consecutive missed units as one read), and random reads
  of each ``--chunks`` size (the sizes a model file is read in: one MLP record) once with one read
  in flight and once with ``--io-threads``.

The simulator charges n reads of b bytes ``n * flash_read_latency_s / flash_queue_depth +
b / flash_bw``; `simulator.hardware.fit_flash` derives those from the random reads. ``bundle``
and ``coalesce`` are set, since a model file is read in runs of whole unit records, and
``overlap``, since the engine computes with the cached units while the missed ones are read.
Precision: float32 everywhere. ``--lean-model DIR`` measures for an exported model file instead
(`engine.calibrate`).
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dipstream.engine.qmatrix import FORMATS, QMatrix, record_layout
from dipstream.engine.storage import BLOCK, FileReader, measure_reads
from dipstream.errors import DipstreamError
from dipstream.io import atomic_path, write_json_atomic, write_text_atomic
from dipstream.paths import cache_root, cpu
from dipstream.simulator import Hardware
from dipstream.simulator.hardware import KINDS, fit_flash, parse_bytes
from dipstream.simulator.model_shape import SHAPES
from dipstream.validation import at_least, input_file, output_dir, output_file


@dataclass
class ProbeConfig:
    """One hardware probe."""

    out: str = field(default="hardware-probe.yaml", metadata={
        "help": "hardware YAML to write (give it to `dipstream simulate --hardware`)",
        "metavar": "PATH"})
    dir: str | None = field(default=None, metadata={
        "help": "directory for the disk test file: put it on the disk the offload file lives "
                "on (default: dipstream's cache folder)", "metavar": "DIR"})
    size: str = field(default="1GB", metadata={"help": "disk test file size"})
    file: str | None = field(default=None, metadata={
        "help": "measure reads on this existing file instead (read only), e.g. a model folder's "
                "model.bin: the same file and disk region a run reads",
        "metavar": "PATH"})
    model: str | None = field(default=None, metadata={
        "help": "take the random-read chunk sizes from the MLP records of this model (a preset or built-in "
                "name: `dipstream simulate --shape`'s) in --weights' format"})
    weights: str = field(default="float32", metadata={
        "help": "with --model: the format its records are read in", "choices": FORMATS})
    chunks: str = field(default="4096,12288,65536", metadata={
        "help": "random-read sizes in bytes, comma-separated (used unless --model is given)"})
    seq_chunk: int = field(default=4 << 20, metadata={
        "help": "sequential read size in bytes (read one at a time, as a long run is)"})
    io_threads: int = field(default=8, metadata={
        "help": "reads in flight (as dipstream generate --io-threads)"})
    reads: int = field(default=2000, metadata={"help": "random reads per measurement"})
    ram_mb: int = field(default=512, metadata={"help": "RAM test tensor size in MiB"})
    gemv_shape: str = field(default="4096x14336", metadata={
        "help": "rows x columns of the float32 matrix the GEMV test streams (RAM-resident)"})
    repeats: int = field(default=5, metadata={"help": "repeats per measurement (median)"})
    direct_io: bool = field(default=True, metadata={
        "help": "read the test file with O_DIRECT (--no-direct-io: through the page cache)"})
    keep_file: bool = field(default=False, metadata={
        "help": "keep the disk test file (reused by the next probe of the same size)"})
    json: str | None = field(default=None, metadata={
        "help": "also write all raw measurements as JSON", "metavar": "PATH"})
    lean_model: str | None = field(default=None, metadata={
        "help": "measure for the lean engine on this exported model folder (`dipstream export`): its "
                "products' speed, reads of its file while the CPU computes, the per-token host time "
                "(the other disk and GEMV options do not apply)", "metavar": "DIR"})
    threads: int = field(default=1, metadata={"help": "with --lean-model: compute threads (as generate --threads)"})
    read_gap: str = field(default="32kB", metadata={
        "help": "with --lean-model: the read gap the runs will use (as generate --read-gap)"})


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure_ram(mb: int, repeats: int) -> float:
    """RAM read bandwidth, bytes/s (a sum over a float32 array of ``mb`` MiB)."""
    x = np.ones(mb * 2**20 // 4, np.float32)
    return x.nbytes / _median_time(lambda: float(x.sum()), repeats)


def measure_gemv(repeats: int, n: int = 4096, m: int = 14336) -> tuple[float, float]:
    """(FLOP/s, bytes/s) of the engine's float32 product over all n records of an (m x n) matrix."""
    rng = np.random.default_rng(0)
    q = QMatrix.from_dense(rng.standard_normal((m, n), dtype=np.float32), "float32")
    v = rng.standard_normal(n, dtype=np.float32)
    idx, coef, out = np.empty(n, np.int64), np.empty(n, np.float32), np.empty(m, np.float32)
    t = _median_time(lambda: q.select(v, n, idx, coef, out), repeats)
    return 2.0 * n * m / t, n * m * 4 / t


def _chunk_sizes(cfg: ProbeConfig) -> list[int]:
    if cfg.model:
        if cfg.model not in SHAPES:
            raise DipstreamError(f"--model {cfg.model}: give a preset or built-in name ({', '.join(SHAPES)})")
        shape = SHAPES[cfg.model]
        strides = (record_layout(cfg.weights, m)[2] for m in (2 * shape.d_ff, shape.d_model))
        return [st + (-st) % BLOCK for st in strides]
    try:
        sizes = [int(s) for s in cfg.chunks.split(",") if s.strip()]
    except ValueError:
        raise DipstreamError(f"--chunks {cfg.chunks!r}: give byte counts like 4096,12288") from None
    if not sizes or any(s <= 0 or s % BLOCK for s in sizes):
        raise DipstreamError(f"--chunks {cfg.chunks!r}: sizes must be positive multiples of {BLOCK} "
                             "(direct reads are block aligned)")
    return sizes


def _test_file(directory: Path, size: int) -> Path:
    """A file of ``size`` random bytes (reused when one of that size is there)."""
    path = directory / f"dipstream-probe-{size}.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    rng = np.random.default_rng(0)
    chunk = 64 << 20
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        left = size
        while left:
            n = min(chunk, left)
            fh.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    return path


def measure_disk(path: Path, cfg: ProbeConfig, chunks: list[int]) -> dict:
    """Sequential and random read figures of a file through the engine's reader."""
    reader = FileReader(path, cfg.io_threads, cfg.direct_io)
    try:
        size = reader.size - reader.size % BLOCK
        seq = cfg.seq_chunk
        regions = [(int(o), seq) for o in range(0, size - seq + 1, seq)]
        res = measure_reads(reader, regions, chunks, cfg.reads, rounds=1, random_regions=[(0, size)], seed=1)
    finally:
        reader.close()
    res.update(file_bytes=path.stat().st_size, seq_chunk=seq)
    return res


def run_probe(cfg: ProbeConfig, log=print) -> dict:
    """Measure, write the hardware YAML (and JSON), return the measurements."""
    import yaml

    if cfg.lean_model is not None:
        return _run_probe_lean(cfg, log)


    try:
        size = int(parse_bytes(cfg.size))
    except ValueError as e:
        raise DipstreamError(f"--size: {e}") from None
    at_least("ram_mb", cfg.ram_mb, 1)
    if cfg.seq_chunk < 512 or cfg.seq_chunk % 512:
        raise DipstreamError(f"--seq-chunk {cfg.seq_chunk} must be a positive multiple of 512 "
                             "(direct reads are block aligned)")
    output_file("out", cfg.out)
    output_file("json", cfg.json)
    output_dir("dir", cfg.dir)
    input_file("file", cfg.file, "file to read")
    chunks = _chunk_sizes(cfg)
    try:
        gn, gm = (int(v) for v in cfg.gemv_shape.lower().split("x"))
        if gn < 1 or gm < 1:
            raise ValueError
    except ValueError:
        raise DipstreamError(f"--gemv-shape {cfg.gemv_shape!r}: give positive ROWSxCOLS, e.g. "
                             "4096x14336") from None
    need = max(64 * max(chunks), 4 * cfg.seq_chunk)
    if cfg.file is None and size < need:
        raise DipstreamError(f"--size {cfg.size} is too small for the reads it must hold; give "
                             f"at least {need} bytes (1GB or more gives steadier figures)")
    if cfg.io_threads < 1 or cfg.reads < 64 or cfg.repeats < 1:
        raise DipstreamError("--io-threads and --repeats must be >= 1 and --reads >= 64")
    directory = Path(cfg.dir) if cfg.dir else cache_root() / "probe"
    own_file = cfg.file is None
    if own_file:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = _test_file(directory, size)
        except OSError as e:
            raise DipstreamError(f"cannot write the disk test file in {directory}: {e.strerror}; "
                                 "give a writable --dir") from None
    else:
        path = Path(cfg.file)
        if not path.is_file():
            raise DipstreamError(f"--file {cfg.file} is not a file")
        directory = path.parent
        if path.stat().st_size < 64 * max(chunks) + 4096:
            raise DipstreamError(f"--file {cfg.file} is too small to probe random reads of "
                                 f"{max(chunks)} bytes")
    out = {"host": socket.gethostname(), "machine": platform.machine(),
           "cpu": cpu()[0], "cpus": os.cpu_count(),
           "dir": str(directory), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        log(f"probe: RAM read bandwidth ({cfg.ram_mb} MiB)...")
        out["ram_bw"] = measure_ram(cfg.ram_mb, cfg.repeats)
        log(f"probe: CPU GEMV (the engine's product, {gn} x {gm} float32)...")
        out["gemv_flops"], out["gemv_bw"] = measure_gemv(cfg.repeats, gn, gm)
        log(f"probe: disk reads of {path} ({path.stat().st_size / 1e9:.2f} GB)...")
        out["disk"] = measure_disk(path, cfg, chunks)
    finally:
        if own_file and not cfg.keep_file:
            path.unlink(missing_ok=True)
    fit = fit_flash(out["disk"], cfg.io_threads)
    out["fit"] = fit
    hw = Hardware(name=f"probe-{out['host']}", dram_bw=out["ram_bw"], flash_bw=fit["flash_bw"],
                  overlap=True, bits={k: 32 for k in KINDS}, compute_flops=out["gemv_flops"],
                  flash_read_latency_s=fit["flash_read_latency_s"],
                  flash_queue_depth=fit["flash_queue_depth"], bundle=True, coalesce=True,
                  stream_static_overflow=True)
    d = hw.to_dict()
    d.pop("dram_bytes")
    disk = out["disk"]
    lines = [f"# measured by `dipstream probe` on {out['host']} ({out['cpu']}, {out['cpus']} cpus, "
             f"one compute thread) at {out['date']}; load average "
             f"{', '.join(f'{v:.2f}' for v in out['load_avg'] or [])}",
             f"# RAM read (a sum, {cfg.ram_mb} MiB): {out['ram_bw'] / 1e9:.2f} GB/s; the engine's "
             f"float32 product {gn}x{gm}: {out['gemv_flops'] / 1e9:.2f} GFLOP/s "
             f"({out['gemv_bw'] / 1e9:.2f} GB/s)",
             f"# disk reads of {path}, direct I/O: {disk['direct_io']}; sequential "
             f"{disk['seq_chunk']} B reads, one in flight: "
             f"{disk['seq_bw'] / 1e9:.3f} GB/s"]
    for c, r in disk["random"].items():
        lines.append(f"# random {c} B reads: {r['s_per_read_qd1'] * 1e6:.1f} us/read with 1 in "
                     f"flight, {r[f's_per_read_qd{cfg.io_threads}'] * 1e6:.1f} us/read with "
                     f"{cfg.io_threads}")
    lines.append(f"# fit: latency {fit['latency_qd1_s'] * 1e6:.1f} us at one read in flight; "
                 f"{fit['per_read_s'] * 1e6:.1f} us per read beyond transfer with "
                 f"{cfg.io_threads} in flight -> latency / queue depth")
    text = "\n".join(lines) + "\n" + yaml.safe_dump(d, sort_keys=False)
    outp = write_text_atomic(cfg.out, text)
    out["hardware"] = d
    out["out"] = str(outp)
    if cfg.json:
        write_json_atomic(cfg.json, out)
    return out



def _run_probe_lean(cfg: ProbeConfig, log) -> dict:
    import yaml

    from dipstream.engine.calibrate import probe_lean
    from dipstream.engine.modelfile import read_manifest
    from dipstream.validation import input_dir

    input_dir("lean_model", cfg.lean_model, "exported model folder (dipstream export --model-dir)")
    read_manifest(cfg.lean_model)  # a one-line error unless it is a lean-engine model folder
    at_least("threads", cfg.threads, 1)
    at_least("io_threads", cfg.io_threads, 1)
    at_least("repeats", cfg.repeats, 1)
    try:
        gap = int(parse_bytes(cfg.read_gap))
    except ValueError as e:
        raise DipstreamError(f"--read-gap: {e}") from None
    output_file("out", cfg.out)
    output_file("json", cfg.json)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = probe_lean(cfg.lean_model, cfg.threads, cfg.io_threads, gap, cfg.repeats, max(cfg.reads, 64), log=log)
    out.update(host=socket.gethostname(), cpu=cpu()[0], cpus=os.cpu_count(), load_avg=load,
               date=time.strftime("%Y-%m-%d %H:%M:%S"))
    d, fit, disk = out["hardware"], out["fit"], out["disk"]
    d["name"] = f"probe-lean-{out['host']}"
    lines = [f"# measured by `dipstream probe --lean-model {cfg.lean_model}` on {out['host']} ({out['cpu']}, "
             f"{out['cpus']} cpus, {cfg.threads} compute threads) at {out['date']}; load average "
             f"{', '.join(f'{v:.2f}' for v in load or [])}",
             f"# the engine's products on isolated matrices: {out['weights']} MLP "
             f"{out['product_rates']['mlp'] / 1e9:.2f} GB/s, head {out['product_rates']['head'] / 1e9:.2f} GB/s "
             f"of records; decodes in RAM: dense {out['decode']['dense_step_s'] * 1e3:.1f} ms/token "
             f"({out['decode']['dense_bytes'] / 1e6:.1f} MB), DIP 0.5 {out['decode']['dip_step_s'] * 1e3:.1f} ms "
             f"({out['decode']['dip_bytes'] / 1e6:.1f} MB) -> dram_bw {out['decode']['rate'] / 1e9:.2f} GB/s, "
             f"host_s_per_token {out['host_s_per_token'] * 1e3:.2f} ms ({out['decode']['fit']}); offloaded with "
             f"every unit cached {out['decode']['offload_cached_step_s'] * 1e3:.1f} ms/token -> "
             f"host_s_per_cached_hook {out['decode']['host_s_per_cached_hook'] * 1e6:.0f} us",
             f"# reads of its file while the CPU computes, direct I/O {disk['direct_io']}: whole hooks "
             f"{disk['seq_bw'] / 1e9:.3f} GB/s; latency {fit['latency_qd1_s'] * 1e6:.1f} us at one read in "
             f"flight, {fit['per_read_s'] * 1e6:.1f} us per read with {cfg.io_threads} in flight"]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(d, sort_keys=False)
    out["out"] = str(write_text_atomic(cfg.out, text))
    if cfg.json:
        write_json_atomic(cfg.json, out)
    return out
