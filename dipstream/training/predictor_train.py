"""Train DejaVu-style predictors: collect the dense model's MLP inputs x and top-k(|h|) targets on
training text, fit one low-rank MLP per layer with binary cross-entropy, report per-layer recall
and precision on validation text, then evaluate the `predictor` method."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dipstream.devices import available_bytes, pick_device
from dipstream.errors import DipstreamError
from dipstream.evaluation import perplexity
from dipstream.experiments.evaluate import eval_windows
from dipstream.io import append_jsonl, atomic_path
from dipstream.models import load_model
from dipstream.models.adapter_folder import inject_lora
from dipstream.models.adapters import (
    LORA_FILES,
    PREDICTOR_FILE,
)
from dipstream.selection import topk_mask
from dipstream.sparsity import attach, build_method
from dipstream.sparsity.base import Method, Selection
from dipstream.sparsity.ops import part_linear
from dipstream.sparsity.predictor import (
    build_predictors,
    density_with_predictor,
    save_predictors,
)
from dipstream.sparsity.relu import swapped_h
from dipstream.training.checkpoint import save_checkpoint
from dipstream.training.config import DEFAULT_EVAL_TOKENS
from dipstream.training.data import load_train_data
from dipstream.training.memory import check_memory
from dipstream.training.run_state import finish_run


class ActivationCapture(Method):
    """Runs each MLP densely and keeps its inputs x and targets: top-k(|h|) of the model's own
    activation, or, with `swap` (the swapped activation's `both_factors`: True for dReLU, False for
    ReLUfication), the exact non-zeros of that swapped activation (which then also feeds the layers
    above: the model predicted is the swapped one)."""

    name = "capture"

    def __init__(self, k: int, swap: bool | None = None):
        super().__init__(1.0)
        self.k, self.swap = k, swap
        self.x: dict[int, list[torch.Tensor]] = {}
        self.targets: dict[int, list[torch.Tensor]] = {}

    def mlp(self, layer, p, x, batch_shape):
        g, u = part_linear(p, "gate", x), part_linear(p, "up", x)
        if self.swap is not None:
            h = swapped_h(g, u, self.swap)
            target = h != 0
        else:
            h = p.act(g) * u
            target = topk_mask(h.abs(), self.k)
        self.x.setdefault(layer, []).append(x.detach().clone())
        self.targets.setdefault(layer, []).append(target)
        return part_linear(p, "down", h), Selection()

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers = sorted(self.x)
        return [torch.cat(self.x[i]) for i in layers], [torch.cat(self.targets[i]) for i in layers]


def collect(model, windows: torch.Tensor, k: int, swap: bool | None = None) -> tuple[list[torch.Tensor],
                                                                                   list[torch.Tensor]]:
    """Per layer: MLP inputs (N, d) and targets (N, D) on `windows` (see ActivationCapture)."""
    cap = ActivationCapture(k, swap)
    sm = attach(model, cap)
    try:
        with torch.inference_mode():
            for ids in windows:
                model(input_ids=ids[None].to(model.device))
    finally:
        sm.detach()
    return cap.tensors()


def topk_recall(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of the true top-k neurons (targets, N x D bool) that the top-k logits find; with the
    same k for both it is also the precision of that choice."""
    pred = topk_mask(logits, k)
    return float((pred & targets).sum() / targets.sum().clamp_min(1))


def threshold_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(precision, recall) of the classifier sigmoid(logit) > 0.5 against the targets."""
    pred = logits > 0
    tp = float((pred & targets).sum())
    return tp / max(1.0, float(pred.sum())), tp / max(1.0, float(targets.sum()))


def _load_base_adapter(lm, folder) -> dict:
    """Inject the LoRA adapters of a finetune folder (e.g. a tuned dReLU / ReLUfication swap) so
    that the predictors learn the adapted model's zeros; {} without one."""
    if not folder:
        return {}
    folder = Path(folder).expanduser()
    meta, n_lora = inject_lora(lm, folder)
    if not n_lora:
        raise DipstreamError(f"--adapter '{folder}' holds no LoRA adapters to train the predictors on; give the "
                             "--out folder of a LoRA finetune (e.g. --method relufied)")
    return {"base_adapter": str(folder), "base_adapter_method": meta.get("method"), "adapter_weights": n_lora}


def train_predictors(cfg, out: Path, key: dict, state: dict | None, progress: bool, on_step) -> dict:

    ev, tr = cfg.eval, cfg.train
    start = time.perf_counter()
    device = pick_device(ev.device)
    method = build_method(ev.method, ev.density, ev.options)  # fail fast on bad input
    swap = method.both_factors if getattr(method, "predicts_zeros", False) else None
    lm = load_model(ev.model)
    base = _load_base_adapter(lm, ev.adapter)
    lm.model.to(device)
    info = lm.info
    k = int(ev.density * info.d_ff)
    seq = ev.seq_len
    n_windows = max(1, tr.predictor_tokens // (seq - 1))
    data = load_train_data(lm.tokenizer, ev.corpus, tr.train_text, seq, n_windows, 1, 1.0, tr.val_tokens,
                           tr.train_seed, info.max_positions)
    floats = n_windows * seq * info.n_layers * (info.d_model + info.d_ff / 4)
    check_memory(int(4 * floats), available_bytes(device), "collecting predictor data")
    torch.manual_seed(tr.train_seed)
    preds = build_predictors(info.n_layers, info.d_model, info.d_ff, tr.predictor_rank).to(device)
    opt = torch.optim.Adam(preds.parameters(), lr=1e-3)
    if state is None:
        state = {"run_key": key, "epoch": 0, "history": [], "train_seconds": 0.0}
    else:
        preds.load_state_dict(state["predictors"])
        opt.load_state_dict(state["optimizer"])
    t0 = time.perf_counter()
    xs, ts = collect(lm.model, data.batch(0, n_windows), k, swap)
    vx, vt = collect(lm.model, data.val, k, swap)
    n = xs[0].shape[0]
    batch = 128  # tokens per step: many small steps learned far better than few large ones
    bar = tqdm(total=tr.predictor_epochs, initial=state["epoch"], desc="predictors", disable=not progress,
               leave=False)
    try:
        while state["epoch"] < tr.predictor_epochs:
            epoch = state["epoch"]
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(tr.train_seed * 1009 + epoch))
            total = 0.0
            for s in range(0, n, batch):
                idx = perm[s:s + batch]
                loss = sum(F.binary_cross_entropy_with_logits(preds[i](xs[i][idx]), ts[i][idx].float())
                           for i in range(len(xs))) / len(xs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            state["epoch"] = epoch + 1
            state["history"].append({"epoch": epoch + 1, "loss": total / n})
            append_jsonl(out / "log.jsonl", state["history"][-1])
            state["train_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            state.update(predictors=preds.state_dict(), optimizer=opt.state_dict())
            save_checkpoint(out, state)
            bar.update(1)
            if on_step is not None:
                on_step(epoch + 1)
    finally:
        bar.close()
    preds.eval()
    with torch.no_grad():
        vlog = [preds[i](vx[i]) for i in range(len(vx))]
    recall = [topk_recall(lg, t, k) for lg, t in zip(vlog, vt)]
    thr = [threshold_scores(lg, t) for lg, t in zip(vlog, vt)]
    out.mkdir(parents=True, exist_ok=True)
    save_predictors(preds, out / PREDICTOR_FILE)
    for f in LORA_FILES if base else ():  # the folder applies the adapters and the predictors together
        with atomic_path(out / f) as tmp:
            shutil.copyfile(Path(ev.adapter).expanduser() / f, tmp)
    del xs, ts, vx, vt

    # evaluate the predictor method with these predictors
    method.predictors = preds.requires_grad_(False)
    windows = eval_windows(ev, lm, ev.tokens or DEFAULT_EVAL_TOKENS)

    sm = attach(lm.model, method)
    try:
        res = perplexity(lm.model, windows, progress=False)
    finally:
        sm.detach()
    result = {
        "model": lm.name, "method": ev.method, "density_requested": ev.density,
        "density_measured": sm.stats.mean("mlp"), "perplexity_after": res.perplexity,
        "density_with_predictor": density_with_predictor(sm.stats.mean("mlp"), method.predictor_weights(), info),
        "predictor_rank": tr.predictor_rank, "predictor_weights": method.predictor_weights(),
        "predictor_file_bytes": (out / PREDICTOR_FILE).stat().st_size,
        "predictor_train_tokens": n, "predictor_epochs": state["epoch"],
        "recall_at_k": sum(recall) / len(recall), "recall_at_k_per_layer": recall,
        "threshold_precision_per_layer": [p for p, _ in thr], "threshold_recall_per_layer": [r for _, r in thr],
        # predicted skipping: of the neurons really active on validation text, the share predicted
        "recall": sum(r for _, r in thr) / len(thr), "precision": sum(p for p, _ in thr) / len(thr),
        "final_train_loss": state["history"][-1]["loss"] if state["history"] else None,
        "eval_tokens": windows.n_predicted, "train_seconds": state["train_seconds"],
        **base,
    }
    state.pop("predictors", None)
    state.pop("optimizer", None)
    return finish_run(cfg, out, state, lm, result, start)
