"""Adapter folders written by `dipstream finetune` and applied by `eval`/`simulate --adapter`.

A folder holds dipstream_adapter.json (what it was trained for, how, and the measured results),
peft's LoRA files (adapter_config.json, adapter_model.safetensors) and/or predictor.safetensors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dipstream.errors import DipstreamError
from dipstream.io import write_json_atomic
from dipstream.models.adapters import (
    LORA_FILES,
    META_FILE,
    PREDICTOR_FILE,
    count_lora_weights,
    load_lora,
)
from dipstream.models.arch import ModelInfo

log = logging.getLogger(__name__)
SHAPE_KEYS = ("model_type", "n_layers", "d_model", "d_ff", "vocab")


def model_signature(info: ModelInfo) -> dict:
    """The shape fields an adapter must match."""
    return {k: getattr(info, k) for k in SHAPE_KEYS}


def write_meta(folder: Path, meta: dict) -> None:
    write_json_atomic(folder / META_FILE, meta)


def read_meta(folder: str | Path) -> dict:
    """dipstream_adapter.json of an adapter folder, or a one-line error."""
    folder = Path(folder).expanduser()
    path = folder / META_FILE
    if not path.exists():
        raise DipstreamError(f"'{folder}' is not an adapter folder written by `dipstream finetune` "
                             f"(no {META_FILE}); give the --out folder of a finished finetune run")
    try:
        meta = json.loads(path.read_text())
        assert isinstance(meta, dict) and "model" in meta
    except (ValueError, AssertionError):
        raise DipstreamError(f"'{path}' is corrupt; re-run the finetune that wrote it") from None
    return meta


def check_model(meta: dict, info: ModelInfo, folder) -> None:
    """Refuse an adapter made for a model of another shape."""
    sig = meta.get("model_signature", {})
    mine = model_signature(info)
    if sig != mine:
        diff = ", ".join(f"{k} {sig.get(k)} vs {mine[k]}" for k in SHAPE_KEYS if sig.get(k) != mine[k])
        raise DipstreamError(f"adapter '{folder}' was trained for model '{meta.get('model')}' of another "
                             f"shape ({diff}); use an adapter trained for this model")


def check_files(folder: Path, meta: dict) -> bool:
    """Whether the folder holds LoRA adapters; refuses a folder whose weights are missing (it would
    otherwise run without them) or whose safetensors are not readable."""
    from safetensors import safe_open

    config, weights = (folder / f for f in LORA_FILES)
    expects_lora = config.exists() or bool((meta.get("result") or {}).get("adapter_weights"))
    if expects_lora and not weights.exists():
        raise DipstreamError(f"adapter '{folder}' has no {weights.name}; copy the whole --out folder of "
                             "the finetune run, or re-run it")
    if not expects_lora and not (folder / PREDICTOR_FILE).exists():
        raise DipstreamError(f"adapter '{folder}' holds neither LoRA adapters nor predictors; give the "
                             "--out folder of a finished finetune run")
    for f in (weights, folder / PREDICTOR_FILE):
        if f.exists():
            bad = None
            try:
                with safe_open(f, framework="pt") as fh:
                    for k in fh.keys():
                        t = fh.get_tensor(k)  # small: adapters and predictors, read once here
                        if t.is_floating_point() and not t.isfinite().all():
                            bad = k
                            break
            except Exception as exc:  # noqa: BLE001 - any header or format error
                raise DipstreamError(f"adapter file '{f}' is not a readable safetensors file "
                                     f"({type(exc).__name__}); re-run the finetune that wrote it") from None
            if bad is not None:
                raise DipstreamError(f"adapter file '{f}' has non-finite weights ({bad}); the finetune that wrote "
                                     "it diverged: re-run it (e.g. with a lower --lr)")
    return expects_lora


def inject_lora(lm, folder: str | Path) -> tuple[dict, int]:
    """Read and check an adapter folder (its description, model shape and files) and inject its
    LoRA adapters, if it has any, into `lm.model` in place. Returns (its description, the LoRA
    weights now in the model: 0 without)."""
    folder = Path(folder).expanduser()
    meta = read_meta(folder)
    check_model(meta, lm.info, folder)
    if not check_files(folder, meta):
        return meta, 0
    load_lora(lm.model, folder)
    return meta, count_lora_weights(lm.model)


def apply_adapter(lm, folder: str | Path, method) -> dict:
    """Load an adapter folder into `lm.model` (LoRA injected in place) and hand the method the
    folder for what it trained there itself (`method.load_trained(folder, info)`: the predictor
    method's predictors; others have nothing to load). Returns the fields a results row reports."""
    folder = Path(folder).expanduser()
    meta, n_lora = inject_lora(lm, folder)
    method.load_trained(folder, lm.info)
    trained_for = meta.get("method")
    if trained_for not in (method.name, None) and {trained_for, method.name} != {"dip", "dip-ca"}:
        log.warning("adapter '%s' was trained for method '%s'; evaluating it with '%s'", folder,
                    trained_for, method.name)
    return {"adapter": str(folder), "adapter_method": trained_for, "adapter_weights": n_lora}
