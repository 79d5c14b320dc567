"""Calibrate threshold methods on text and save/load their thresholds as a JSON artifact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dipstream import __version__
from dipstream.errors import DipstreamError
from dipstream.io import write_json_atomic
from dipstream.sparsity.attach import SparseModel


def calibrate(sm: SparseModel, input_ids: torch.Tensor, batch_size: int = 4) -> dict:
    """Set the method's per-layer thresholds from calibration windows (B, T).

    All windows of a batch reach each layer together, so a layer's threshold is a quantile over
    every calibration token of that batch; thresholds of several batches are averaged."""
    method = sm.method
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    batches = list(torch.split(input_ids, batch_size))
    method.calibrating = True
    try:
        base = getattr(sm.model, sm.model.base_model_prefix, sm.model)  # skip the LM head
        with torch.inference_mode():
            for batch in batches:
                method.reset()
                # a routed expert no token of this batch reached keeps NaN: it is left out of the mean
                method.thresholds = {k: [float("nan")] * len(v) for k, v in method.thresholds.items()}
                base(input_ids=batch.to(sm.model.device))
                for name, vals in method.thresholds.items():
                    v = torch.tensor(vals, dtype=torch.float64)
                    seen = ~torch.isnan(v)
                    sums[name] = sums.get(name, 0) + torch.where(seen, v, 0.0)
                    counts[name] = counts.get(name, 0) + seen
    finally:
        method.calibrating = False
        sm.stats.reset()
    method.thresholds = {k: (v / counts[k]).tolist() for k, v in sums.items()}
    unseen = [i for v in method.thresholds.values() for i, t in enumerate(v) if t != t]
    if unseen:
        raise DipstreamError(f"{len(set(unseen))} routed experts received no calibration token (first: unit "
                             f"{min(unseen)}); raise --calib-tokens")
    return method.thresholds


def save_thresholds(path: str | Path, method, model_name: str, meta: dict) -> Path:
    """Write thresholds atomically as JSON with what they were calibrated for."""
    doc = {"dipstream": __version__, "method": method.name, "model": model_name,
           "density": method.density, "thresholds": method.thresholds, **meta}
    return write_json_atomic(path, doc)


def load_thresholds(path: str | Path, method, n_units: int, model_name: str | None = None) -> dict:
    """Load thresholds into `method`, checking they were made for this model, method, density
    and count of layers (experts of a MoE model), and hold numbers only."""
    try:
        doc = json.loads(Path(path).read_text())
        th = doc["thresholds"]
        assert isinstance(th, dict)
    except (OSError, ValueError, KeyError, AssertionError, TypeError):
        raise DipstreamError(f"cannot read thresholds file '{path}': expected JSON written by "
                             "`dipstream eval --save-thresholds`; recalibrate without --thresholds") from None
    if doc.get("method") != method.name:
        raise DipstreamError(f"thresholds file '{path}' is for method '{doc.get('method')}', "
                             f"not '{method.name}'")
    if model_name is not None and doc.get("model") not in (None, model_name):
        raise DipstreamError(f"thresholds file '{path}' was calibrated on model '{doc.get('model')}', not "
                             f"'{model_name}'; recalibrate without --thresholds")
    density = doc.get("density")
    if not isinstance(density, (int, float)) or abs(float(density) - method.density) > 1e-9:
        raise DipstreamError(f"thresholds file '{path}' was calibrated for density {density}, not "
                             f"{method.density:g}; pass --density {density} or recalibrate without --thresholds")
    for name in method.threshold_names:
        vals = th.get(name)
        if not isinstance(vals, list) or len(vals) != n_units:
            raise DipstreamError(f"thresholds file '{path}' lacks {n_units} values of '{name}'; "
                                 "it was made for another model")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in vals):
            raise DipstreamError(f"thresholds file '{path}' holds values of '{name}' that are not numbers; "
                                 "recalibrate without --thresholds")
    method.thresholds = {k: [float(v) for v in th[k]] for k in method.threshold_names}
    return doc
