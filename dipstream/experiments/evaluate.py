"""`dipstream eval`: perplexity and measured density of one model x method x density."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict

import torch

from dipstream import __version__
from dipstream.data import load_text, make_windows
from dipstream.errors import DipstreamError
from dipstream.experiments.configs import EvalConfig
from dipstream.evaluation import perplexity
from dipstream.io import write_json_atomic
from dipstream.models import load_model
from dipstream.models.loading import is_moe_checkpoint
from dipstream.models.adapter_folder import apply_adapter
from dipstream.paths import cache_root, machine
from dipstream.sparsity import METHODS, attach, build_method
from dipstream.sparsity.attach import check_runs_on_experts
from dipstream.sparsity.calibration import calibrate, load_thresholds, save_thresholds
from dipstream.sparsity.predictor import density_with_predictor
from dipstream.validation import (
    private_dir,
)


def eval_windows(cfg: EvalConfig, lm, tokens: int | None = None):
    """The evaluation windows of `cfg` (--text file, else the corpus's eval split); `tokens`
    overrides cfg.tokens."""
    text = load_text(path=cfg.text, split="all") if cfg.text else load_text(cfg.corpus, cfg.split)
    return make_windows(lm.tokenizer, text, cfg.seq_len, tokens if tokens is not None else cfg.tokens,
                        lm.info.max_positions)


def _adapter_identity(folder: str | None) -> list | None:
    """Path and modification times of an adapter folder's files: thresholds calibrated with one
    adapter are not reused with another (or a retrained one)."""
    if not folder:
        return None
    from pathlib import Path

    files = sorted(p for p in Path(folder).expanduser().iterdir() if p.is_file())
    return [str(Path(folder).expanduser().resolve())] + [[p.name, p.stat().st_mtime_ns] for p in files
                                                         if p.suffix == ".safetensors"]


def _calibration_key(cfg: EvalConfig, name: str) -> str:
    blob = json.dumps({"v": __version__, "model": name, "method": cfg.method, "density": cfg.density,
                       "corpus": cfg.corpus, "seq_len": cfg.seq_len, "calib": cfg.calib_tokens,
                       "dtype": cfg.dtype,
                       "opts": asdict(cfg.options), "adapter": _adapter_identity(cfg.adapter)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_thresholds(cfg: EvalConfig, lm, sm) -> dict:
    """Load, reuse from the cache, or calibrate the thresholds of a threshold method."""
    method = sm.method
    if cfg.thresholds:
        load_thresholds(cfg.thresholds, method, sm.n_units, lm.name)
        return {"thresholds_from": cfg.thresholds, "calibration_seconds": 0.0}

    cached = private_dir(cache_root() / "calibration") / \
        f"{lm.name}-{cfg.method}-{_calibration_key(cfg, lm.name)}.json"
    if cached.exists():
        load_thresholds(cached, method, sm.n_units, lm.name)
        info = {"thresholds_from": str(cached), "calibration_seconds": 0.0}
    else:
        start = time.perf_counter()
        calib = make_windows(lm.tokenizer, load_text(cfg.corpus, "train"), cfg.seq_len,
                             cfg.calib_tokens, lm.info.max_positions)
        calibrate(sm, calib.input_ids)
        meta = {"corpus": cfg.corpus, "calib_tokens": calib.n_predicted, "seq_len": cfg.seq_len}
        save_thresholds(cached, method, lm.name, meta)
        info = {"thresholds_from": "calibrated", "calibration_seconds": time.perf_counter() - start}
    if cfg.save_thresholds:
        save_thresholds(cfg.save_thresholds, method, lm.name, {"corpus": cfg.corpus})
    return info


def load_with_adapter(cfg: EvalConfig, method):
    """The model of `cfg`, with cfg.adapter applied. Returns (model, the adapter's row fields)."""
    lm = load_model(cfg.model, getattr(torch, cfg.dtype), cfg.device)
    adapter = {}
    if cfg.adapter:

        adapter = apply_adapter(lm, cfg.adapter, method)
    return lm, adapter


def attach_calibrated(cfg: EvalConfig, lm, method):
    """Attach `method` to the model, its thresholds loaded or calibrated when it needs them.
    Returns (SparseModel, the calibration's row fields); the caller detaches it."""
    sm = attach(lm.model, method)
    try:
        return sm, prepare_thresholds(cfg, lm, sm) if method.needs_calibration else {}
    except BaseException:
        sm.detach()
        raise


def evaluate(cfg: EvalConfig, progress: bool | None = None, batch_size: int = 1, on_attached=None):
    """Load, attach, calibrate if needed and evaluate; `on_attached(lm, sm, windows)` runs just
    before evaluation (to add observers or simulated caches). Returns (results row, SparseModel)."""
    cfg.validate()
    method = build_method(cfg.method, cfg.density, cfg.options)  # fail fast on bad input
    if not method.on_experts and is_moe_checkpoint(cfg.model):
        check_runs_on_experts(cfg.method)
    lm, adapter = load_with_adapter(cfg, method)
    windows = eval_windows(cfg, lm)
    sm, extra = attach_calibrated(cfg, lm, method)
    try:
        if on_attached is not None:
            on_attached(lm, sm, windows)
        sm.stats.reset()
        res = perplexity(lm.model, windows, on_window=method.reset, progress=progress,
                         batch_size=batch_size)
    finally:
        sm.detach()
    stats = sm.stats
    row = {
        "model": lm.name, **method.describe(),
        "density_measured": stats.mean("mlp"), "density_up": stats.mean("up"),
        "density_gate": stats.mean("gate"), "density_down": stats.mean("down"),
        "perplexity": res.perplexity, "bits_per_byte": res.bits_per_byte, "tokens": res.tokens,
        # the predictions made at sparsified positions only (GRIFFIN: after its dense prompt)
        "perplexity_sparsified": res.perplexity_from(method.dense_prefix(cfg.seq_len)),
        "sparsified_from_position": method.dense_prefix(cfg.seq_len),
        "windows": int(windows.input_ids.shape[0]), "seq_len": cfg.seq_len,
        "dense_prompt_tokens": stats.uncounted, "seconds": res.seconds,
        "corpus": cfg.text or cfg.corpus, "split": None if cfg.text else cfg.split, "dtype": cfg.dtype,
        "device": lm.device, "load_seconds": lm.load_seconds, "load_peak_mib": lm.load_peak_bytes / 2**20,
        "density_per_layer": stats.per_layer("mlp"),
        "dipstream": __version__,
        "machine": machine(), **adapter, **extra,
    }
    if "expert" in stats.sums:  # a mixture-of-experts model: the two levels of sparsity
        row["density_expert_level"] = stats.mean("expert")
        row["density_in_experts"] = stats.mean("mlp") / stats.mean("expert")
        row["experts"], row["experts_per_token"] = lm.info.n_experts, lm.info.experts_per_token
    if row.get("predictor_weights"):
        row["density_with_predictor"] = density_with_predictor(row["density_measured"], row["predictor_weights"],
                                                               lm.info)
    return row, sm


def run_eval(cfg: EvalConfig, progress: bool | None = None) -> dict:
    """Run one evaluation and return its results row (also written to cfg.json when set)."""

    cfg.validate()
    if hasattr(METHODS[cfg.method], "configure_cache"):
        raise DipstreamError(f"{cfg.method} chooses its masks from a simulated DRAM cache; run it with "
                             "`dipstream simulate` (which sets up that cache)")
    row, _ = evaluate(cfg, progress)
    if cfg.json:
        write_json_atomic(cfg.json, row)
    return row
