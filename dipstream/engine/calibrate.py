"""Measure this machine for the lean engine and describe it as simulator hardware, so that
`dipstream simulate` predicts the engine's tokens/s (`dipstream probe --lean-model DIR`).

* ``dram_bw``, ``dram_bw_static`` and ``host_s_per_token``: a token of the engine in RAM takes
  host + bytes / rate + head bytes / head rate, where bytes are the records it multiplies (on a
  CPU the kernels' rate, not the RAM's bandwidth, bounds a token) and host the time outside the
  products (interpreter, norms, attention over the KV cache, top-k). The head's rate (its format,
  often 8-bit, runs at its own speed) is measured on the head alone and given to the simulator as
  the rate of the `lm_head` / `embedding` bytes; the rate of the rest and the host time are
  fitted to two in-RAM decodes of the model that multiply different bytes (dense, and DIP at
  density 0.5). The MLP's product rate on isolated matrices (the first layer's) is used when the
  two decodes do not separate.
* Flash: reads of the model file with the engine's reader (direct I/O, ``io_threads`` in
  flight) **while a second thread runs those kernels**, as during decoding: long reads of a
  whole hook (``flash_bw``) and reads of single records at one and at ``io_threads`` in flight
  (latency and queue depth, ``simulator.hardware.fit_flash``).
* precision: bits per weight as the engine holds and reads them: an MLP unit is its record (int4:
  4 bits; its headers stay in RAM), the static weights include their headers (int4: a float16
  scale and offset per 32 weights: 5 bits), the KV cache in float32; ``overlap`` (the engine's prefetch overlaps reads with compute),
  ``bundle``, ``coalesce`` and ``read_gap_bytes`` as the engine reads. ``pipelined`` stays off:
  the engine reads only one hook ahead, and measured runs sit closer to the per-hook model
  (`scripts/lean_vs_simulator.py` prints both).
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import numpy as np

from dipstream.budget import layer_keeps
from dipstream.engine.mlp import MaskChooser, OffloadMLP, RamMLP
from dipstream.engine.model import LeanModel
from dipstream.engine.modelfile import (
    DATA,
    MLP_KINDS,
    is_mlp_tensor,
    mlp_tensor,
    read_manifest,
)
from dipstream.engine.storage import BLOCK, FileReader, measure_reads
from dipstream.names import layer_key
from dipstream.simulator.hardware import KINDS, Hardware, fit_flash
from dipstream.sparsity.decoding import decode_rule


def _product_rates(model: LeanModel, repeats: int, threads: int) -> dict:
    """Bytes of records per second of the dense product: over layer 0's MLP (the MLP's format,
    also the attention's) and over the head (its own format, often 8-bit beside 4-bit), and both
    together (`all`)."""
    infos = model.manifest["tensor_info"]
    groups = {"mlp": [model.load(infos[mlp_tensor(0, k)]) for k in MLP_KINDS], "head": [model.w["head"]]}
    rng = np.random.default_rng(0)
    sums = {}
    for key, mats in groups.items():
        total_b, total_t = 0, 0.0
        for q in mats:
            v = rng.standard_normal(q.rows).astype(np.float32)
            idx, coef, out = np.empty(q.rows, np.int64), np.empty(q.rows, np.float32), np.empty(q.m, np.float32)
            q.select(v, q.rows, idx, coef, out, threads)  # warm-up
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                q.select(v, q.rows, idx, coef, out, threads)
                ts.append(time.perf_counter() - t)
            total_b += q.nbytes
            total_t += statistics.median(ts)
        sums[key] = (total_b, total_t)
    out = {k: b / t for k, (b, t) in sums.items()}
    out["all"] = sum(b for b, _ in sums.values()) / sum(t for _, t in sums.values())
    return out


class _Busy:
    """A thread running the engine's product in a loop (ctypes releases the GIL)."""

    def __init__(self, model: LeanModel, threads: int):
        q = model.w["head"]
        self.args = (np.random.default_rng(1).standard_normal(q.rows).astype(np.float32), q.rows,
                     np.empty(q.rows, np.int64), np.empty(q.rows, np.float32), np.empty(q.m, np.float32), threads)
        self.q, self.stop = q, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.q.select(*self.args)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _disk(model: LeanModel, io_threads: int, reads: int, rounds: int) -> dict:
    """Reads of the model file's MLP records with the engine's reader, direct I/O: whole hooks, and
    single records (block aligned around one) at one and at `io_threads` in flight."""
    infos = model.manifest["tensor_info"]
    hooks = [infos[mlp_tensor(i, k)] for i in range(model.L) for k in MLP_KINDS]
    reader = FileReader(model.directory / DATA, io_threads)
    try:
        sizes = [t.stride + (-t.stride) % BLOCK + BLOCK for t in (infos[mlp_tensor(0, k)] for k in MLP_KINDS)]
        return measure_reads(reader, [(t.offset, t.nbytes) for t in hooks], sizes, reads, rounds)
    finally:
        reader.close()


def _mlp_record_bytes(model: LeanModel) -> int:
    """Bytes of every MLP record of the model file (both hooks of every layer, headers excluded)."""
    return sum(t.nbytes for n, t in model.manifest["tensor_info"].items() if is_mlp_tensor(n))


def _decode(model: LeanModel, method: str, tokens: int, offload: dict | None = None) -> tuple[float, float]:
    """(median token time, record bytes multiplied per token) of a decode with `method`, its MLP
    in RAM, or with `offload` (OffloadMLP's keyword arguments) from the file."""
    chooser = MaskChooser.from_keeps(decode_rule(method), layer_keeps(0.5, model.L), model.d, model.D)
    model.mlp = RamMLP(model, chooser) if offload is None else OffloadMLP(model, chooser, **offload)
    model.reset()
    ts = []
    for pos in range(tokens):
        t = time.perf_counter()
        model.forward(pos % 97 + 3, pos)
        ts.append(time.perf_counter() - t)
    if offload is not None:
        model.mlp.close()
    c = model.mlp.counters
    weights = sum(t.nbytes for t in model.manifest["tensor_info"].values())
    return statistics.median(ts[2:]), weights - _mlp_record_bytes(model) + c.selected_bytes / max(c.tokens, 1)


def _fit_decode(model: LeanModel, rates: dict, tokens: int) -> dict:
    """The products' rate and the host time from two in-RAM decodes reading different bytes
    (dense and DIP at density 0.5): t = host + (bytes - head) / rate + head / head rate, the head's
    rate measured on its own (its format's speed differs; a model with a bigger head would
    otherwise carry this one's error in its host time). Falls back to the measured product rate
    when the two decodes do not separate (a noisy machine)."""
    t_dense, b_dense = _decode(model, "dense", tokens)
    t_dip, b_dip = _decode(model, "dip", tokens)
    head = model.manifest["tensor_info"]["head"].nbytes
    t_head = head / rates["head"]
    fit_rate = (b_dense - b_dip) / (t_dense - t_dip) if t_dense > t_dip else None
    if fit_rate is None or t_dense - t_head - (b_dense - head) / fit_rate < 0:
        fit_rate, how = rates["mlp"], "product rate"
    else:
        how = "two decodes"
    return {"dense_step_s": t_dense, "dip_step_s": t_dip, "dense_bytes": b_dense, "dip_bytes": b_dip,
            "rate": fit_rate, "head_rate": rates["head"],
            "host_s_per_token": max(t_dense - t_head - (b_dense - head) / fit_rate, 0.0), "fit": how}


def _fit_cache_hooks(model: LeanModel, t_dense: float, tokens: int, io_threads: int, read_gap: int) -> dict:
    """The offloaded engine's bookkeeping per hook and token (cache policy, read planning, the
    products split between cache slots and read buffers): a dense decode offloaded with caches that
    hold the whole MLP (the first token reads every unit, the median leaves it out; DIP would keep
    meeting units it never selected before), minus the same decode in RAM, over the 2 L hooks."""
    t_off, _ = _decode(model, "dense", tokens, offload={"cache_bytes": _mlp_record_bytes(model),
                                                         "io_threads": io_threads, "read_gap": read_gap,
                                                         "record_masks": False})
    return {"offload_cached_step_s": t_off, "host_s_per_cached_hook": max(t_off - t_dense, 0.0) / (2 * model.L)}


def bits_of(manifest: dict) -> dict:
    """Simulator bits per weight of the model file's formats (scales included)."""
    infos = manifest["tensor_info"]

    def per_weight(info, headers: bool = True) -> float:
        return 8.0 * (info.stride * info.rows + headers * info.header_bytes) / (info.rows * info.m)

    # an MLP unit's bytes (what its cache slot holds and a miss reads) are its record alone: the
    # headers stay in RAM beside the static weights
    mlp = per_weight(infos[mlp_tensor(0, "in")], headers=False)
    attn = per_weight(infos[layer_key(0, "q")])
    head = per_weight(infos["head"])
    return {"mlp": mlp, "attention": attn, "lm_head": head, "embedding": head, "kv_cache": 32.0,
            "predictors": 32.0, "adapters": 32.0}


def probe_lean(model_dir: str | Path, threads: int = 1, io_threads: int = 8, read_gap: int = 32768,
               repeats: int = 5, reads: int = 1024, tokens: int = 24, log=print) -> dict:
    """Measure the machine for the lean engine on the exported model in `model_dir`; returns the
    measurements and ``hardware`` (a dict `Hardware` accepts)."""
    model = LeanModel(Path(model_dir), read_manifest(model_dir), tokens + 2, threads)
    try:
        log("probe: the engine's products on RAM-resident records...")
        rates = _product_rates(model, repeats, threads)
        log("probe: reads of the model file while the CPU computes...")
        with _Busy(model, threads):
            disk = _disk(model, io_threads, reads, rounds=2)
        log("probe: per-token time outside the products (dense and DIP decodes in RAM)...")
        dec = _fit_decode(model, rates, tokens)
        log("probe: the offloaded engine's bookkeeping per hook (dense from the file, every unit cached)...")
        dec.update(_fit_cache_hooks(model, dec["dense_step_s"], tokens, io_threads, read_gap))
        man = read_manifest(model_dir)
    finally:
        model.close()
    fit = fit_flash(disk, io_threads)
    hw = Hardware(name="probe-lean", dram_bw=dec["rate"], flash_bw=fit["flash_bw"], overlap=True, bits=bits_of(man),
                  dram_bw_static={"lm_head": dec["head_rate"], "embedding": dec["head_rate"]},
                  flash_read_latency_s=fit["flash_read_latency_s"], flash_queue_depth=fit["flash_queue_depth"],
                  bundle=True, coalesce=True, read_gap_bytes=float(read_gap), host_s_per_token=dec["host_s_per_token"],
                  host_s_per_cached_hook=dec["host_s_per_cached_hook"], stream_static_overflow=True)
    d = hw.to_dict()
    d.pop("dram_bytes", None)
    assert set(d["bits"]) == set(KINDS)
    return {"product_rate": rates["all"], "product_rates": rates, "disk": disk, "fit": fit, "decode": dec, "host_s_per_token": dec["host_s_per_token"],
            "threads": threads, "model_dir": str(model_dir), "weights": man["mlp_fmt"], "hardware": d}
