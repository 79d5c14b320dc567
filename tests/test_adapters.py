"""LoRA adapters see exactly the masked inputs of their host layers (NaN-poisoning proofs)."""

import pytest
import torch

from dipstream.models.adapters import LoraSettings, add_lora, count_lora_weights
from dipstream.models.arch import LoraView
from dipstream.sparsity import MethodOptions, attach, build_method
from dipstream.sparsity.calibration import calibrate
from dipstream.sparsity.ops import linear_cols, linear_rows
from tests.conftest import tiny_model
from tests.test_methods import _poison


class _FakeLora(torch.nn.Module):
    """The attributes LoraView reads from a peft LoRA layer."""

    def __init__(self, A, B, s):
        super().__init__()
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(A.shape[1], A.shape[0], bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(B.shape[1], B.shape[0], bias=False)})
        self.lora_A["default"].weight.data = A
        self.lora_B["default"].weight.data = B
        self.scaling = {"default": s}
        self.lora_dropout = torch.nn.ModuleDict({"default": torch.nn.Identity()})
        self.active_adapters = ["default"]


def _setup(seed=0, n=5, d_in=12, d_out=7, r=3):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, d_in, generator=g), torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g)
    A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    return x, w, b, A, B


def test_column_mask_adapter_reads_only_selected_inputs():
    x, w, b, A, B = _setup()
    cols = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    cols[:, 0] = False  # a column no token selects
    xm = x * cols
    ref = xm @ w.T + b + 0.5 * (xm @ A.T) @ B.T
    xp, wp, Ap = x.clone(), w.clone(), A.clone()
    xp[~cols] = float("nan")              # unselected inputs
    wp[:, ~cols.any(0)] = float("nan")    # columns nobody needs
    Ap[:, ~cols.any(0)] = float("nan")
    out = linear_cols(xp, wp, b, cols, LoraView(_FakeLora(Ap, B, 0.5)))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_row_mask_adapter_computes_only_selected_outputs():
    x, w, b, A, B = _setup(2)
    rows = torch.rand(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(3)) < 0.5
    rows[:, 1] = False
    ref = (x @ w.T + b + 2.0 * (x @ A.T) @ B.T) * rows
    wp, Bp = w.clone(), B.clone()
    wp[~rows.any(0)] = float("nan")
    Bp[~rows.any(0)] = float("nan")
    out = linear_rows(x, wp, b, rows, LoraView(_FakeLora(A, Bp, 2.0)))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_disabled_adapter_adds_nothing():
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    pm = add_lora(model, LoraSettings(rank=4))
    _randomize_lora(model)
    sm = attach(model, build_method("dip", 1.0))
    with torch.no_grad(), pm.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, ref)
        with sm.dense():
            assert torch.equal(model(input_ids=ids).logits, ref)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, ref)


def _randomize_lora(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:  # peft starts B at zero: make the adapters matter
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _poison_adapters(sm, sels) -> int:
    """NaN the adapter columns of A / rows of B that no token needed (per the Selection)."""
    n = 0
    a_needed: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for layer, p in enumerate(sm.parts):
            for name in ("gate", "up", "down"):
                view = getattr(p, f"{name}_lora")
                w = getattr(p, f"{name}_weight")
                need = sels[layer].needed(name, tuple(w.shape))
                m = view.module
                A = m.lora_A["default"].weight
                a_needed[id(A)] = a_needed.get(id(A), torch.zeros(A.shape[1], dtype=torch.bool)) | need.any(0)
                B = m.lora_B["default"].weight
                rows = B[view.out] if view.out is not None else B
                unused = ~need.any(1)
                rows[unused] = float("nan")
                n += int(unused.sum())
            for name in ("gate", "up", "down"):
                A = getattr(p, f"{name}_lora").module.lora_A["default"].weight
                if id(A) in a_needed:
                    unused = ~a_needed.pop(id(A))
                    A[:, unused] = float("nan")
                    n += int(unused.sum())
    return n


LORA_METHODS = {"dip": 0.5, "cats": 0.5, "glu": 0.8, "up": 0.5, "teal": 0.5, "drelu": 1.0,
                "relufied": 1.0, "drelu-capped": 0.3, "relufied-capped": 0.3}


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
@pytest.mark.parametrize("name", sorted(LORA_METHODS))
def test_adapters_receive_masked_inputs(arch, name, tokens):
    """With adapters on every MLP linear, NaN in every weight and adapter entry no token needs
    leaves the output finite and unchanged."""
    model = tiny_model(arch)
    add_lora(model, LoraSettings(rank=4))
    _randomize_lora(model)
    method = build_method(name.removesuffix("-capped"), LORA_METHODS[name], MethodOptions())
    sm = attach(model, method)
    sels = {}
    sm.observers.append(lambda layer, sel, x: sels.__setitem__(layer, sel))
    if method.needs_calibration:
        calibrate(sm, torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(3)))
    with torch.inference_mode():
        ref = model(input_ids=tokens).logits
    assert _poison(sm, sels) > 0 and _poison_adapters(sm, sels) > 0
    with torch.inference_mode():
        out = model(input_ids=tokens).logits
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)


def test_lora_targets_and_counts():
    model = tiny_model("llama")
    add_lora(model, LoraSettings(rank=2, targets="mlp"))
    # per layer: gate/up A (2 x 32) + B (48 x 2), down A (2 x 48) + B (32 x 2); 2 layers
    assert count_lora_weights(model) == 2 * (2 * (64 + 96) + (96 + 64))
    model2 = tiny_model("llama")
    add_lora(model2, LoraSettings(rank=2, targets="mlp+attn"))
    assert count_lora_weights(model2) > count_lora_weights(model)
