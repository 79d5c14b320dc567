"""A few checks on the real SmolLM2-135M (installed from its registry package). Marked `real`."""

import math

import pytest
import torch

from dipstream.data import load_text, make_windows
from dipstream.experiments import EvalConfig, run_eval
from dipstream.models import load_model
from dipstream.sparsity import attach, build_method
from tests.test_methods import _poison

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_dense_perplexity_matches_transformers_forward(smollm2):
    row = run_eval(EvalConfig(method="dense", tokens=2 * 511))
    win = make_windows(smollm2.tokenizer, load_text("wiki", "eval"), 512, 2 * 511)
    with torch.inference_mode():
        losses = [float(smollm2.model(input_ids=w[None], labels=w[None]).loss) for w in win.input_ids]
    assert row["perplexity"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-4)
    assert 5 < row["perplexity"] < 60


def test_dip_half_density_on_real_model(smollm2):
    dense = run_eval(EvalConfig(method="dense", tokens=511))
    dip = run_eval(EvalConfig(method="dip", density=0.5, tokens=511))
    assert dip["density_measured"] == pytest.approx(0.5, abs=0.01)
    assert dense["perplexity"] < dip["perplexity"] < 3 * dense["perplexity"]


def test_dip_skips_weights_on_real_model(smollm2):
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    model = smollm2.model
    sm = attach(model, build_method("dip", 0.5))
    sels = {}
    sm.observers.append(lambda layer, sel, x: sels.__setitem__(layer, sel))
    saved = [(p.up_weight.clone(), p.gate_weight.clone(), p.down_weight.clone()) for p in sm.parts]
    try:
        with torch.inference_mode():
            ref = model(input_ids=ids).logits
        poisoned = _poison(sm, sels)
        with torch.inference_mode():
            out = model(input_ids=ids).logits
        assert poisoned > 0.05 * sum(3 * p.d_model * p.d_ff for p in sm.parts)
        assert torch.isfinite(out).all() and torch.equal(out, ref)
    finally:
        with torch.no_grad():
            for p, (u, g, d) in zip(sm.parts, saved):
                p.up_weight.copy_(u), p.gate_weight.copy_(g), p.down_weight.copy_(d)
        sm.detach()


def test_lora_finetune_round_trip_on_real_model(tmp_path):
    """Two KD steps of DIP + LoRA on SmolLM2: the perplexity before training is plain DIP's, and the
    saved adapter reproduces the trained model's perplexity exactly when loaded by `eval`."""
    from dipstream.training import FinetuneConfig, TrainOptions, run_finetune

    ev = EvalConfig(method="dip", density=0.5, tokens=511)
    row = run_finetune(FinetuneConfig(ev, TrainOptions(out=str(tmp_path / "a"), steps=2, val_every=1,
                                                       val_tokens=511, warmup_steps=1)))
    assert row["perplexity_before"] == run_eval(ev)["perplexity"]
    again = run_eval(EvalConfig(method="dip", density=0.5, tokens=511, adapter=str(tmp_path / "a")))
    assert again["perplexity"] == row["perplexity_after"] != row["perplexity_before"]
    assert again["adapter_weights"] == row["adapter_weights"] == 30 * 16 * (2 * (576 + 1536) + 1536 + 576)
