"""What each sparsity method is, without torch: its summary, what a token reads, and what it needs
(calibration, trained predictors) and where it runs (inside mixture-of-experts experts). One home
for these: `register` gives each method class its entry, the CLI lists and checks names from it
before the model stack is imported."""

from __future__ import annotations

from dataclasses import dataclass

from dipstream.errors import DipstreamError


@dataclass(frozen=True)
class MethodInfo:
    summary: str
    reads: str  # which weight rows/columns a token needs, for `dipstream methods`
    needs_calibration: bool = False  # thresholds set on calibration text (TEAL, CATS)
    needs_predictors: bool = False  # trained by `dipstream finetune --method predictor` (or its dReLU kin)
    # whether it runs inside the routed experts of a mixture-of-experts block: its choice for a
    # token depends on that token and its layer only (no per-layer calibration, cache or prompt state)
    on_experts: bool = False


CATALOG: dict[str, MethodInfo] = {
    'dense': MethodInfo(
        "no sparsity (the model's own MLP)",
        'all of W_up, W_gate, W_down',
        on_experts=True),
    'dip': MethodInfo(
        'Dynamic Input Pruning: top-k |x| -> up/gate columns, top-k |h~| -> down columns',
        'up/gate columns of the top-k_in |x|; down columns of the top-k_out |h~|',
        on_experts=True),
    'random': MethodInfo(
        "control: random up/gate and down columns at DIP's budget",
        'random k_in up/gate columns; random k_out down columns',
        on_experts=True),
    'teal': MethodInfo(
        'TEAL (MLP only): calibrated thresholds on |x| and |h~|',
        'up/gate columns where |x| > t_in; down columns where |h~| > t_out',
        needs_calibration=True,
        on_experts=True),
    'cats': MethodInfo(
        'CATS: dense gate, calibrated threshold on |act(gate)| -> up rows + down columns',
        'all of W_gate; up rows and down columns of neurons with |act(g)| > t',
        needs_calibration=True,
        on_experts=True),
    'glu': MethodInfo(
        'GLU pruning: exact h (dense up+gate), top-k |h| -> down columns',
        'all of W_up and W_gate; down columns of the top-k |h|',
        on_experts=True),
    'up': MethodInfo(
        'up pruning: dense up, top-k |up(x)| -> gate rows + down columns',
        'all of W_up; gate rows and down columns of the top-k |W_up x|',
        on_experts=True),
    'griffin': MethodInfo(
        'GRIFFIN: neuron set fixed per sequence from dense-prompt statistics',
        'prompt: everything; later tokens: up rows, gate rows, down columns of the fixed set'),
    'dip-ca': MethodInfo(  # inside a MoE block: caches per routed expert (and the shared expert)
        'DIP with cache-aware masking (gamma re-weighting toward DRAM-cached units)',
        'as DIP, with the choice moved toward cached up/gate and down columns',
        on_experts=True),
    'predictor': MethodInfo(  # one predictor per layer, not per routed expert
        'trained low-rank predictor (DejaVu-style): top-k logits -> up/gate rows + down columns',
        'the predictor; up rows, gate rows and down columns of the top-k predicted neurons',
        needs_predictors=True),
    'drelu': MethodInfo(
        'dReLU (Turbo Sparse): ReLU(gate)*ReLU(up), exact zeros skipped (oracle accounting)',
        'up rows, gate rows, down columns of neurons with ReLU(g)*ReLU(u) != 0 (at most density*D; skipping up/gate rows needs a predictor of the zeros)',
        on_experts=True),
    'relufied': MethodInfo(
        'ReLUfication: ReLU(gate)*up, exact zeros skipped (oracle accounting)',
        'up rows, gate rows, down columns of neurons with ReLU(g)*u != 0 (at most density*D; skipping up/gate rows needs a predictor of the zeros)',
        on_experts=True),
    'drelu-predicted': MethodInfo(
        "dReLU with a trained predictor of its zeros (Turbo Sparse's deployed accounting)",
        'the predictor; up rows, gate rows, down columns of the neurons it predicts active',
        needs_predictors=True),
    'relufied-predicted': MethodInfo(
        'ReLUfication with a trained predictor of its zeros (deployed accounting)',
        'the predictor; up rows, gate rows, down columns of the neurons it predicts active',
        needs_predictors=True),
}


def method_info(name: str) -> MethodInfo:
    """The catalog's entry of `name`, or the one-line error listing the known names."""
    if name not in CATALOG:
        raise DipstreamError(f"unknown method '{name}'; use one of {', '.join(CATALOG)}")
    return CATALOG[name]
