"""What identifies a fine-tuning run and what a finished run leaves in its folder (shared by the
LoRA and the predictor trainers)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from dipstream import __version__
from dipstream.io import write_json_atomic
from dipstream.models.adapter_folder import model_signature, write_meta
from dipstream.paths import machine
from dipstream.training.checkpoint import save_checkpoint
from dipstream.training.config import FinetuneConfig


def default_out(cfg: FinetuneConfig) -> Path:
    ev = cfg.eval
    return Path("runs") / "finetune" / f"{Path(ev.model).name}-{ev.method}-{ev.density:g}"


def run_key(cfg: FinetuneConfig) -> dict:
    """Everything that changes what a run trains (a checkpoint is resumed only under the same key)."""
    ev, tr = cfg.eval, cfg.train
    train = {k: v for k, v in dataclasses.asdict(tr).items() if k not in ("out", "restart")}
    return {"dipstream": __version__, "model": ev.model, "method": ev.method, "density": ev.density,
            "options": dataclasses.asdict(ev.options), "corpus": ev.corpus, "seq_len": ev.seq_len,
            "calib_tokens": ev.calib_tokens, "train": train, "base_adapter": ev.adapter}


def finish_run(cfg: FinetuneConfig, out: Path, state: dict, lm, result: dict, start: float) -> dict:
    """Record a finished run in its folder (description, results, JSON row, the final checkpoint
    without the weights the adapter files now hold) and return its results row."""
    result.update(seconds_this_run=time.perf_counter() - start, machine=machine(), dipstream=__version__,
                  out=str(out))
    write_meta(out, {"model": lm.name, "model_signature": model_signature(lm.info), "method": cfg.eval.method,
                     "density": cfg.eval.density, "config": run_key(cfg), "result": result})
    if cfg.eval.json:
        write_json_atomic(cfg.eval.json, result)
    state.update(finished=True, result=result)
    for k in ("params", "optimizer", "best"):
        state.pop(k, None)  # the adapter files hold the weights now
    save_checkpoint(out, state)
    return result
