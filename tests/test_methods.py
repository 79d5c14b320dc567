"""Each method reads only what it claims: NaN-poison the rest and the output must not change."""

import pytest
import torch

from dipstream.errors import DipstreamError
from dipstream.sparsity import METHODS, MethodOptions, attach, build_method
from dipstream.sparsity.calibration import calibrate
from tests.conftest import tiny_model

SPARSE = {"dip": 0.5, "random": 0.5, "teal": 0.5, "cats": 0.5, "glu": 0.8, "up": 0.5, "dip-ca": 0.5,
          "drelu": 1.0, "relufied": 1.0, "predictor": 0.5}


def _method(name, density, model, options=None):
    """build_method, plus random (untrained) predictors for the predictor method."""
    method = build_method(name, density, options)
    if getattr(method, "needs_predictors", False):
        from dipstream.models import mlp_parts
        from dipstream.sparsity.predictor import build_predictors

        parts = mlp_parts(model)
        torch.manual_seed(11)
        method.predictors = build_predictors(len(parts), parts[0].d_model, parts[0].d_ff, 8).requires_grad_(False)
    return method


def _configure_dip_ca(sm, capacity_frac=0.5):
    caps = {}
    for i, p in enumerate(sm.parts):
        caps[f"layers.{i}.in"] = int(capacity_frac * p.d_model)
        caps[f"layers.{i}.out"] = int(capacity_frac * p.d_ff)
    sm.method.configure_cache(caps, "lru")


def _run(model, method, tokens, calib=None):
    sm = attach(model, method)
    if method.name == "dip-ca":
        _configure_dip_ca(sm)
    sels = {}
    sm.observers.append(lambda layer, sel, x: sels.__setitem__(layer, sel))
    if method.needs_calibration:
        calibrate(sm, calib)
    method.reset()
    with torch.inference_mode():
        out = model(input_ids=tokens).logits
    return sm, out, sels


def _poison(sm, sels) -> int:
    """Set every MLP weight no token needed to NaN; returns how many were poisoned."""
    n = 0
    with torch.no_grad():
        for layer, p in enumerate(sm.parts):
            for name, w in (("up", p.up_weight), ("gate", p.gate_weight), ("down", p.down_weight)):
                unneeded = ~sels[layer].needed(name, tuple(w.shape))
                w[unneeded] = float("nan")
                n += int(unneeded.sum())
    return n


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_method_reads_only_what_it_claims(arch, name, tokens):
    model = tiny_model(arch)
    calib = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    method = _method(name, SPARSE[name], model, MethodOptions(seed=7))
    sm, ref, sels = _run(model, method, tokens, calib)
    assert _poison(sm, sels) > 0, "nothing was pruned: the test would prove nothing"
    if name == "random":
        method.generator.manual_seed(7)  # replay the same random masks
    method.reset()
    with torch.inference_mode():
        out = model(input_ids=tokens).logits
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)


def test_griffin_decode_reads_only_its_neuron_set(arch):
    """GRIFFIN's prompt runs dense; each decoded token then reads only the prompt's neuron set."""
    import copy

    model = tiny_model(arch)
    sm = attach(model, build_method("griffin", 0.5))
    sels = {}
    sm.observers.append(lambda layer, sel, x: sels.__setitem__(layer, sel))
    prompt, nxt = torch.randint(1, 96, (1, 6)), torch.tensor([[5]])
    with torch.inference_mode():
        past = model(input_ids=prompt, use_cache=True).past_key_values
        ref = model(input_ids=nxt, past_key_values=copy.deepcopy(past)).logits
        assert _poison(sm, sels) > 0
        out = model(input_ids=nxt, past_key_values=copy.deepcopy(past)).logits
    assert torch.isfinite(out).all() and torch.equal(out, ref)


def test_poisoning_a_needed_weight_is_detected(tokens):
    """Control for the test above: a NaN in a weight that IS needed must reach the output."""
    model = tiny_model("llama")
    sm, ref, sels = _run(model, build_method("dip", 0.5), tokens)
    needed = sels[0].needed("down", tuple(sm.parts[0].down_weight.shape))
    j, i = needed.nonzero()[0].tolist()
    with torch.no_grad():
        sm.parts[0].down_weight[j, i] = float("nan")
    with torch.inference_mode():
        assert not torch.isfinite(model(input_ids=tokens).logits).all()


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if not getattr(c, "changes_activation", False)))
def test_density_one_equals_dense(arch, name, tokens):
    model = tiny_model(arch)
    with torch.inference_mode():
        dense = model(input_ids=tokens).logits
    calib = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    sm, out, _ = _run(model, _method(name, 1.0, model), tokens, calib)
    if arch == "phi3" and name != "dense":  # fused gate_up computed as two GEMMs: rounding only
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, dense)
    assert sm.stats.mean() == pytest.approx(1.0)
    sm.detach()
    with torch.inference_mode():
        assert torch.equal(model(input_ids=tokens).logits, dense)


def test_dense_switch_and_detach(tokens):
    model = tiny_model("llama")
    with torch.inference_mode():
        dense = model(input_ids=tokens).logits
        sm = attach(model, build_method("dip", 0.3))
        sparse = model(input_ids=tokens).logits
        with sm.dense():
            assert torch.equal(model(input_ids=tokens).logits, dense)
        assert not torch.equal(sparse, dense)
        assert torch.equal(sm.detach()(input_ids=tokens).logits, dense)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_measured_density_of_dip_matches_k():
    model = tiny_model("llama")  # d=32, D=48
    method = build_method("dip", 0.5, MethodOptions(up_keep=0.25, down_keep=0.5))
    sm, _, _ = _run(model, method, torch.randint(1, 96, (1, 5)))
    # k_in = 8 of 32, k_out = 24 of 48 -> (2 * 8/32 + 24/48) / 3 = 1/3
    assert sm.stats.mean() == pytest.approx(1 / 3)
    assert sm.stats.mean("up") == pytest.approx(0.25)
    assert sm.stats.mean("down") == pytest.approx(0.5)


def test_cats_density_and_floor():
    model = tiny_model("gemma3")
    calib = torch.randint(1, 96, (4, 32), generator=torch.Generator().manual_seed(5))
    sm, _, _ = _run(model, build_method("cats", 0.6), calib, calib)
    # gate dense (1/3) + up rows and down cols at keep (3*0.6-1)/2 = 0.4 -> 0.6 on calibration text
    assert sm.stats.mean() == pytest.approx(0.6, abs=0.01)
    with pytest.raises(DipstreamError, match="at least 0.333"):
        build_method("cats", 0.3)
    with pytest.raises(DipstreamError, match="at least 0.667"):
        build_method("glu", 0.5)


def test_griffin_counts_only_generated_tokens():
    model = tiny_model("llama")
    sm, _, sels = _run(model, build_method("griffin", 0.25), torch.randint(1, 96, (2, 8)))
    assert sm.stats.uncounted == 8          # half of each of the 2 windows is prompt
    assert sm.stats.mean() == pytest.approx(12 / 48)  # k = 0.25 * 48 neurons, all three matrices
    assert sels[0].counted.tolist() == ([False] * 4 + [True] * 4) * 2


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_density_outside_range(bad):
    with pytest.raises(DipstreamError, match="outside \\(0, 1\\]"):
        build_method("dip", bad)


def test_unknown_method():
    with pytest.raises(DipstreamError, match="unknown method 'foo'; use one of dense, dip"):
        build_method("foo", 0.5)


def test_uncalibrated_method_refuses():
    model = tiny_model("llama")
    attach(model, build_method("teal", 0.5))
    with pytest.raises(DipstreamError, match="no calibrated thresholds"):
        model(input_ids=torch.randint(1, 96, (1, 4)))
