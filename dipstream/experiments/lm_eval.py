"""`dipstream lm-eval`: downstream accuracy of a sparse model with lm-evaluation-harness.

The model is loaded, wrapped and calibrated exactly as `dipstream eval` does it (so every
EvalConfig option, e.g. thresholds, applies), then the already-modified model object is handed
to lm-eval's Hugging Face wrapper (`HFLM(pretrained=model, tokenizer=...)`) and
`lm_eval.simple_evaluate`. Hub access is switched off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE):
tasks must read local data, e.g. a task YAML with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}` in a folder given by --include-path.
"""

from __future__ import annotations

import os
import time

from dipstream.errors import DipstreamError, did_you_mean
from dipstream.experiments.configs import LmEvalConfig
from dipstream.experiments.evaluate import (
    attach_calibrated,
    load_with_adapter,
)
from dipstream.experiments.simulate import is_closed_loop
from dipstream.io import write_json_atomic
from dipstream.sparsity import build_method
from dipstream.validation import at_least, finite, output_file

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _import_lm_eval():
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DipstreamError("dipstream lm-eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4.4' "
                             "(or pip install 'dipstream[lm-eval]')") from None
    return lm_eval, HFLM, TaskManager


def _scores(results: dict) -> dict:
    """{task: {metric: value}} without lm-eval's alias entries."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k.replace(",none", ""): v for k, v in metrics.items()
                     if k != "alias" and isinstance(v, (int, float))}
    return out


def run_lm_eval(cfg: LmEvalConfig, log_samples: bool = False) -> dict:
    """Evaluate cfg.eval's sparse model on cfg.tasks; returns a results row ({"scores": ...})."""


    finite("limit", cfg.limit, lo=0, lo_open=True, optional=True)
    at_least("num_fewshot", cfg.num_fewshot, 0, optional=True)
    at_least("lm_batch_size", cfg.lm_batch_size, 1)
    output_file("json", cfg.eval.json)
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    if not tasks:
        raise DipstreamError("give --tasks, e.g. --tasks arc_easy or a task of --include-path")
    if cfg.include_path and not os.path.isdir(cfg.include_path):
        raise DipstreamError(f"--include-path '{cfg.include_path}' is not a folder of task YAML files")
    method = build_method(cfg.eval.method, cfg.eval.density, cfg.eval.options)
    if is_closed_loop(method):
        raise DipstreamError(f"{cfg.eval.method} steers its masks by a simulated DRAM cache, which lm-eval "
                             "has no device for; use dip (its masks at gamma 1) or another open-loop method")
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    manager = TaskManager(include_path=cfg.include_path, include_defaults=cfg.builtin_tasks)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = did_you_mean(unknown[0], manager.all_tasks)
        raise DipstreamError(f"unknown lm-eval task '{unknown[0]}'{f' ({hint})' if hint else ''}; put local "
                             "task YAML files in a folder and pass it with --include-path")

    lm, _ = load_with_adapter(cfg.eval, method)
    sm, _ = attach_calibrated(cfg.eval, lm, method)
    sm.stats.reset()
    start = time.perf_counter()
    hook = lm.model.register_forward_pre_hook(lambda *_: method.reset())  # one sequence per call
    try:
        wrapped = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=cfg.lm_batch_size)
        res = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, num_fewshot=cfg.num_fewshot,
                                      limit=cfg.limit, task_manager=manager, log_samples=log_samples)
    finally:
        hook.remove()
        sm.detach()
    res = res or {}
    row = {"model": lm.name, **method.describe(), "density_measured": sm.stats.mean("mlp"),
           "tasks": tasks, "scores": _scores(res), "num_fewshot": cfg.num_fewshot, "limit": cfg.limit,
           "seconds": time.perf_counter() - start, "lm_eval": getattr(lm_eval, "__version__", "?")}
    if log_samples:
        row["samples"] = res.get("samples", {})
    if cfg.eval.json:
        write_json_atomic(cfg.eval.json, row)
    return row
