"""`dipstream finetune`: recover a sparse model's accuracy with LoRA (cross-entropy or distillation
from the dense model), fine-tune a dReLU / ReLUfied model, or train DejaVu-style predictors.

Every run writes an adapter folder (see `artifacts.py`), logs each step to OUT/log.jsonl,
checkpoints itself atomically at each validation (and on Ctrl-C), and resumes from the last
checkpoint when run again with the same --out (steps after that checkpoint are re-run and logged
again); a finished run just reports its results.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dipstream.devices import available_bytes, pick_device
from dipstream.errors import DipstreamError
from dipstream.evaluation import perplexity
from dipstream.experiments.evaluate import eval_windows, prepare_thresholds
from dipstream.io import append_jsonl, clean_temps, folder_lock
from dipstream.models import load_model
from dipstream.models.loading import refuse_moe
from dipstream.models.adapters import (
    LoraSettings,
    add_lora,
    count_lora_weights,
    save_lora,
)
from dipstream.sparsity import METHODS, attach, build_method
from dipstream.training.checkpoint import load_checkpoint, save_checkpoint
from dipstream.training.config import DEFAULT_EVAL_TOKENS, FinetuneConfig
from dipstream.training.data import load_train_data
from dipstream.training.memory import check_memory, estimate_step_bytes
from dipstream.training.predictor_train import train_predictors
from dipstream.training.run_state import default_out, finish_run, run_key
from dipstream.validation import at_least, finite, input_file, output_dir

NOTHING_TO_TRAIN = {"dense": "dense has no sparsity to recover; fine-tune a sparse method (e.g. --method dip)"}


def _validate(cfg: FinetuneConfig) -> None:

    ev, tr = cfg.eval, cfg.train
    if ev.method in NOTHING_TO_TRAIN:
        raise DipstreamError(NOTHING_TO_TRAIN[ev.method])
    if ev.adapter and not _trains_predictors(cfg):
        raise DipstreamError("finetune trains a new adapter; --adapter is for eval and simulate (and, with a "
                             "method that reads predictors, the LoRA adapters to train them on)")
    ev.validate()
    refuse_moe(ev.model, "finetune")
    for name, lo, lo_open in (("lr", 0, True), ("kd_temperature", 0, True), ("grad_clip", 0, False),
                              ("weight_decay", 0, False), ("act_l1", 0, False), ("max_epochs", 0, True)):
        finite(name, getattr(tr, name), lo=lo, lo_open=lo_open)
    finite("lora_alpha", tr.lora_alpha, lo=0, lo_open=True, optional=True)
    for name in ("steps", "batch_size", "predictor_tokens"):
        at_least(name, getattr(tr, name), 1)
    at_least("warmup_steps", tr.warmup_steps, 0)
    input_file("train_text", tr.train_text, "UTF-8 text file")
    output_dir("out", tr.out)
    if ev.dtype != "float32":
        raise DipstreamError(f"finetune trains in float32; --dtype {ev.dtype} applies to eval and simulate")
    LoraSettings(tr.lora_rank, tr.lora_alpha, tr.lora_targets, tr.lora_init).resolved_alpha()
    for name in ("lora_rank", "val_every", "patience", "predictor_rank", "predictor_epochs", "val_tokens"):
        if getattr(tr, name) < 1:
            raise DipstreamError(f"--{name.replace('_', '-')} {getattr(tr, name)} must be at least 1")
    if tr.lr <= 0 or tr.kd_temperature <= 0 or tr.act_l1 < 0 or tr.warmup_steps < 0:
        raise DipstreamError("--lr and --kd-temperature must be positive, --act-l1 and --warmup-steps >= 0")
    if tr.act_l1 > 0 and ev.method not in ("drelu", "relufied"):
        raise DipstreamError(f"--act-l1 penalises ReLU activations; it applies to drelu and relufied, "
                             f"not '{ev.method}'")


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10% of it at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at `temperature` (scaled by T^2)."""
    s = F.log_softmax(student.float() / temperature, -1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, -1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def ce_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class _Run:
    """State of one LoRA fine-tuning run (model, adapters, method, optimizer, progress)."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        ev, tr = cfg.eval, cfg.train
        self.device = pick_device(ev.device)
        self.lm = load_model(ev.model)
        self.data = load_train_data(self.lm.tokenizer, ev.corpus, tr.train_text, ev.seq_len, tr.steps,
                                    tr.batch_size, tr.max_epochs, tr.val_tokens, tr.train_seed,
                                    self.lm.info.max_positions)
        self.eval_windows = eval_windows(ev, self.lm, ev.tokens or DEFAULT_EVAL_TOKENS)
        torch.manual_seed(tr.train_seed)
        self.peft = add_lora(self.lm.model, LoraSettings(tr.lora_rank, tr.lora_alpha, tr.lora_targets,
                                                         tr.lora_init))
        n_trainable = sum(p.numel() for p in self.lm.model.parameters() if p.requires_grad)
        need = estimate_step_bytes(self.lm.info, sum(p.numel() for p in self.lm.model.parameters()),
                                   n_trainable, tr.batch_size, ev.seq_len, tr.loss == "kd")
        # before the move: the estimate counts the weights, which a GPU's free memory would
        # already exclude once they are on it
        check_memory(need, available_bytes(self.device))
        self.lm.model.to(self.device)
        train_method = "dip" if ev.method == "dip-ca" else ev.method  # dip-ca adapters are DIP adapters
        self.method = build_method(train_method, ev.density, ev.options)
        self.sm = attach(self.lm.model, self.method)
        self.params = [p for p in self.lm.model.parameters() if p.requires_grad]
        self.calibration = (prepare_thresholds(dataclasses.replace(ev, method=train_method), self.lm, self.sm)
                            if self.method.needs_calibration else {})
        self.opt = torch.optim.AdamW(self.params, lr=tr.lr, weight_decay=tr.weight_decay)

    # -- evaluation -----------------------------------------------------------------------------
    def val_loss(self) -> float:
        """Mean next-token CE of the sparse model with its adapters on the validation windows."""
        total, n = 0.0, 0
        with torch.inference_mode():
            for ids in torch.split(self.data.val, max(1, self.cfg.train.batch_size)):
                ids = ids.to(self.device)
                self.method.reset()
                total += float(ce_loss(self.lm.model(input_ids=ids).logits, ids)) * ids.shape[0]
                n += ids.shape[0]
        return total / n

    def ppl(self, sparse: bool = True, adapters: bool = True) -> dict:
        import contextlib

        ctx = contextlib.ExitStack()
        if not sparse:
            ctx.enter_context(self.sm.dense())
        if not adapters:
            ctx.enter_context(self.peft.disable_adapter())
        with ctx:
            self.sm.stats.reset()
            res = perplexity(self.lm.model, self.eval_windows, on_window=self.method.reset,
                             progress=False, batch_size=1)
        return {"perplexity": res.perplexity, "density_measured": self.sm.stats.mean("mlp") if sparse else 1.0,
                "density_per_layer": self.sm.stats.per_layer("mlp") if sparse else None,
                "seconds": res.seconds}

    # -- training -------------------------------------------------------------------------------
    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        tr, model = self.cfg.train, self.lm.model
        self.method.reset()
        teacher = None
        if tr.loss == "kd":
            with torch.no_grad(), self.sm.dense(), self.peft.disable_adapter():
                teacher = model(input_ids=ids).logits
        penalise = tr.act_l1 > 0
        if penalise:
            self.method.penalty_terms = []
        logits = model(input_ids=ids).logits
        loss = ce_loss(logits, ids) if teacher is None else kd_loss(logits, teacher, tr.kd_temperature)
        if penalise:
            loss = loss + tr.act_l1 * torch.stack(self.method.penalty_terms).mean()
            self.method.penalty_terms = None
        return loss

    def trainable_state(self) -> list[torch.Tensor]:
        return [p.detach().cpu().clone() for p in self.params]

    def load_trainable(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, t in zip(self.params, tensors):
                p.copy_(t.to(p.device))


def _train_lora(cfg: FinetuneConfig, out: Path, key: dict, state: dict | None, progress, on_step) -> dict:
    tr = cfg.train
    start = time.perf_counter()
    run = _Run(cfg)
    if state is None:
        before = run.ppl()
        state = {"run_key": key, "step": 0, "best_val": math.inf, "bad_evals": 0, "history": [],
                 "before": before, "train_seconds": 0.0, "best": None, "stopped_early": False}
        state["val_before"] = run.val_loss()
    else:
        run.load_trainable(state["params"])
        run.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])

    clock = [time.perf_counter()]

    def checkpoint():
        now = time.perf_counter()
        state["train_seconds"] += now - clock[0]
        clock[0] = now
        state.update(params=run.trainable_state(), optimizer=run.opt.state_dict(), rng=torch.get_rng_state())
        save_checkpoint(out, state)

    bar = tqdm(total=tr.steps, initial=state["step"], desc="finetune", disable=not progress, leave=False)
    try:
        while state["step"] < tr.steps and not state["stopped_early"]:
            step, t_step = state["step"], time.perf_counter()
            for g in run.opt.param_groups:
                g["lr"] = lr_at(step, tr.steps, tr.lr, tr.warmup_steps)
            loss = run.loss(run.data.batch(step, tr.batch_size).to(run.device))
            loss.backward()
            loss = loss.item()
            if tr.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.params, tr.grad_clip)
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)
            state["step"] = step + 1
            state["history"].append({"step": step + 1, "loss": loss, "seconds": time.perf_counter() - t_step})
            append_jsonl(out / "log.jsonl", state["history"][-1])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if on_step is not None:
                on_step(step + 1)
            if state["step"] % tr.val_every == 0 or state["step"] == tr.steps:
                val = run.val_loss()
                state["history"][-1]["val_loss"] = val
                append_jsonl(out / "log.jsonl", {"step": state["step"], "val_loss": val})
                if val < state["best_val"]:
                    state.update(best_val=val, bad_evals=0, best=run.trainable_state(), best_step=state["step"])
                else:
                    state["bad_evals"] += 1
                    state["stopped_early"] = state["bad_evals"] >= tr.patience
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()  # nothing finished is lost
        raise
    finally:
        bar.close()
    if state.get("best") is not None:
        run.load_trainable(state["best"])
    after = run.ppl()
    dense = run.ppl(sparse=False, adapters=False)
    dense_adapted = run.ppl(sparse=False, adapters=True)
    run.sm.detach()  # the sparse wrappers add ".inner" to module paths: save under the model's own
    save_lora(run.peft, out)
    n_lora = count_lora_weights(run.lm.model)
    gap = state["before"]["perplexity"] - dense["perplexity"]
    result = {
        "model": run.lm.name, "method": cfg.eval.method, "trained_with": run.method.name,
        "density_requested": cfg.eval.density, "density_measured": after["density_measured"],
        "density_per_layer": after["density_per_layer"],
        "loss": tr.loss, "lora_rank": tr.lora_rank,
        "lora_alpha": LoraSettings(tr.lora_rank, tr.lora_alpha, tr.lora_targets, tr.lora_init).resolved_alpha(),
        "lora_init": tr.lora_init, "lora_targets": tr.lora_targets,
        "lr": tr.lr, "steps_done": state["step"], "steps": tr.steps, "batch_size": tr.batch_size,
        "seq_len": cfg.eval.seq_len, "train_tokens": state["step"] * tr.batch_size * (cfg.eval.seq_len - 1),
        "stopped_early": state["stopped_early"], "best_step": state.get("best_step"),
        "val_loss_before": state["val_before"], "best_val_loss": state["best_val"],
        "perplexity_before": state["before"]["perplexity"], "perplexity_after": after["perplexity"],
        "perplexity_dense": dense["perplexity"], "perplexity_dense_with_adapter": dense_adapted["perplexity"],
        "gap_recovered": (state["before"]["perplexity"] - after["perplexity"]) / gap if gap > 0 else None,
        "adapter_weights": n_lora, "adapter_file_bytes": (out / "adapter_model.safetensors").stat().st_size,
        "eval_tokens": run.eval_windows.n_predicted, "train_seconds": state["train_seconds"],
        **run.calibration,
    }
    return finish_run(cfg, out, state, run.lm, result, start)


def run_finetune(cfg: FinetuneConfig, progress: bool | None = None, on_step=None) -> dict:
    """Train (or resume, or report a finished run) and return its results row. `on_step(step)` is
    called after every optimizer step (tests use it to simulate a crash)."""
    import sys

    _validate(cfg)
    if progress is None:
        progress = sys.stderr.isatty()
    out = Path(cfg.train.out).expanduser() if cfg.train.out else default_out(cfg)
    key = run_key(cfg)
    with folder_lock(out, "finetune"):
        clean_temps(out, ("checkpoint.pt", "dipstream_adapter.json", "predictor.safetensors"), (".lora-*",))
        state = None if cfg.train.restart else load_checkpoint(out, key)
        if state is not None and state.get("finished"):
            lost = [f for f in _weight_files(cfg) if not (out / f).is_file()]
            if lost:
                raise DipstreamError(f"the finished run in '{out}' has lost {', '.join(lost)}; pass "
                                     "--restart to train it again")
            return {**state["result"], "resumed": "already finished"}
        if _trains_predictors(cfg):

            return train_predictors(cfg, out, key, state, progress, on_step)
        return _train_lora(cfg, out, key, state, progress, on_step)


def _trains_predictors(cfg: FinetuneConfig) -> bool:
    """predictor, drelu-predicted, relufied-predicted: train predictors, not LoRA adapters."""
    return bool(getattr(METHODS.get(cfg.eval.method), "needs_predictors", False))


def _weight_files(cfg: FinetuneConfig) -> list[str]:
    """The files a finished run of `cfg` leaves in its folder besides its description."""
    lora = ["adapter_config.json", "adapter_model.safetensors"]
    if _trains_predictors(cfg):  # with --adapter, its LoRA files are copied beside the predictors
        return ["predictor.safetensors"] + (lora if cfg.eval.adapter else [])
    return lora
