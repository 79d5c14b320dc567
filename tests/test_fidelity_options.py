"""Options added to follow (or name departures from) the reference: float64 evaluation, the
validation split, GRIFFIN's perplexity over its sparsified tokens, DIP-CA without warm-up, the
reference's LoRA initialisation, and k = int(keep * n)."""

import math

import pytest
import torch

from dipstream.errors import DipstreamError
from dipstream.experiments import EvalConfig, run_eval
from dipstream.models.adapters import LoraSettings, add_lora
from dipstream.sparsity import MethodOptions, attach, build_method
from dipstream.sparsity.cache_aware import ca_select
from tests.conftest import tiny_model





def _eval(ckpt, text, **kw):
    return run_eval(EvalConfig(model=str(ckpt), text=str(text), seq_len=32, tokens=124, **kw))


def test_float64_agrees_with_float32(tiny_checkpoint, text_file):
    # dense: the same model in two precisions, within float32 rounding
    a = _eval(tiny_checkpoint, text_file, method="dense")
    b = _eval(tiny_checkpoint, text_file, method="dense", dtype="float64")
    assert b["dtype"] == "float64" and a["dtype"] == "float32"
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
    # DIP at density 0.5: near-ties in top-k may flip, but the figures stay close
    a = _eval(tiny_checkpoint, text_file, method="dip", density=0.5)
    b = _eval(tiny_checkpoint, text_file, method="dip", density=0.5, dtype="float64")
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=2e-2)
    assert b["density_measured"] == pytest.approx(a["density_measured"], abs=1e-9)


def test_val_split_is_other_text(monkeypatch):
    from dipstream.experiments import evaluate as ev

    seen = []
    monkeypatch.setattr(ev, "load_text", lambda corpus, split: seen.append((corpus, split)) or "x")
    monkeypatch.setattr(ev, "make_windows", lambda *a, **k: a[1])

    class LM:
        tokenizer, info = None, type("I", (), {"max_positions": 128})

    assert ev.eval_windows(EvalConfig(split="val"), LM()) == "x"
    assert ev.eval_windows(EvalConfig(), LM()) == "x"
    assert seen == [("wiki", "val"), ("wiki", "eval")]


def test_griffin_perplexity_over_its_sparsified_tokens(tiny_checkpoint, text_file):
    r = _eval(tiny_checkpoint, text_file, method="griffin", density=0.5)
    assert r["sparsified_from_position"] == 16  # half of each 32-token window is its dense prompt
    assert r["perplexity_sparsified"] != r["perplexity"]
    # at density 1.0 GRIFFIN is the dense model: its sparsified perplexity is dense over the
    # same predictions, and other methods sparsify every token
    full = _eval(tiny_checkpoint, text_file, method="griffin", density=1.0)
    dense = _eval(tiny_checkpoint, text_file, method="dense")
    assert full["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6)
    dip = _eval(tiny_checkpoint, text_file, method="dip", density=0.5)
    assert dip["perplexity_sparsified"] == pytest.approx(dip["perplexity"], rel=1e-12)
    assert dip["sparsified_from_position"] == 0


def test_perplexity_from_position_by_hand():
    from dipstream.evaluation.perplexity import PerplexityResult

    r = PerplexityResult(0, 0, 0, 0, 0, 0, nll_by_position=[4.0, 2.0, 1.0], windows=2)
    assert r.perplexity_from(1) == pytest.approx(math.exp(3.0 / 4))
    assert r.perplexity_from(0) == pytest.approx(math.exp(7.0 / 6))


def test_dip_ca_without_warmup():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    cached = torch.tensor([[False, False, False, False, True]])
    # t = 0 with the warm-up: gamma_0 = 1, plain top-2 = {0, 1}
    assert ca_select(scores, 2, cached, 0.1, 1, 0).tolist() == [[True, True, False, False, False]]
    # without it: gamma = 0.1 at once; unit 0 is protected (n0 = 1), the rest scaled:
    # 0.4, 0.3, 0.2 vs the cached unit's 1.0 -> {0, 4}
    got = ca_select(scores, 2, cached, 0.1, 1, 0, warmup=False)
    assert got.tolist() == [[True, False, False, False, True]]
    sm = attach(tiny_model("llama"), build_method("dip-ca", 0.5, MethodOptions(warmup=False)))
    assert sm.method.describe()["warmup"] is False
    sm.detach()


def test_reference_lora_init():
    model = tiny_model("llama")
    pm = add_lora(model, LoraSettings(rank=4, init="reference"))
    A = [p for n, p in pm.named_parameters() if ".lora_A." in n]
    B = [p for n, p in pm.named_parameters() if ".lora_B." in n]
    a = torch.cat([p.flatten() for p in A])
    assert all((p == 0).all() for p in B)
    assert a.std().item() == pytest.approx(1 / 4, rel=0.1)  # N(0, 1/r^2)
    assert all(v == 1.0 for m in pm.modules() if isinstance(getattr(m, "scaling", None), dict)
               for v in m.scaling.values())
    assert LoraSettings(rank=8).resolved_alpha() == 16.0  # peft init: 2 x rank by default
    with pytest.raises(DipstreamError, match="uses no scaling"):
        LoraSettings(rank=4, alpha=32, init="reference").resolved_alpha()


@pytest.mark.parametrize("name,density,k", [("glu", 0.9, 0), ("up", 0.8, 0), ("griffin", 0.7, 0)])
def test_k_is_truncated_as_in_the_reference(name, density, k):
    # D = 48 in the tiny model: glu keeps 3*0.9 - 2 = 0.7 of the neurons -> int(33.6) = 33;
    # up keeps (3*0.8 - 1)/2 = 0.7 -> 33; griffin keeps 0.7 -> int(33.6) = 33 (round would give 34)
    sm = attach(tiny_model("llama"), build_method(name, density))
    assert (sm.method.k if name == "griffin" else sm.method.n_kept(48)) == 33
    sm.detach()
