"""dReLU and ReLUfication: the masks are exactly the non-zeros of h (capped at density * D)."""

import pytest
import torch

from dipstream.models import mlp_parts
from dipstream.sparsity import attach, build_method
from tests.conftest import tiny_model


def _inputs_and_selections(method_name, density):
    model = tiny_model("llama", seed=4)
    parts = mlp_parts(model)
    seen = {}
    sm = attach(model, build_method(method_name, density))
    sm.observers.append(lambda layer, sel, x: seen.__setitem__(layer, (sel, x.clone())))
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids)
    return parts, seen, sm


@pytest.mark.parametrize("name", ["drelu", "relufied"])
def test_masks_are_the_exact_nonzeros(name):
    parts, seen, sm = _inputs_and_selections(name, 1.0)
    for layer, (sel, x) in seen.items():
        p = parts[layer]
        g, u = x @ p.gate_weight.T, x @ p.up_weight.T
        h = torch.relu(g) * (torch.relu(u) if name == "drelu" else u)
        assert torch.equal(sel.down_cols, h != 0)
        assert sel.up_rows is sel.gate_rows is sel.down_cols  # one neuron mask
        assert 0 < sel.down_cols.float().mean() < (0.5 if name == "drelu" else 0.8)
    assert sm.stats.mean() == pytest.approx(
        sum(float(s.down_cols.float().mean()) for s, _ in seen.values()) / len(seen))


def test_density_caps_the_active_neurons_at_the_largest():
    parts, seen, _ = _inputs_and_selections("drelu", 0.1)
    k = round(0.1 * parts[0].d_ff)
    for layer, (sel, x) in seen.items():
        p = parts[layer]
        h = torch.relu(x @ p.gate_weight.T) * torch.relu(x @ p.up_weight.T)
        m = sel.down_cols
        assert (m.sum(1) <= k).all() and not (m & (h == 0)).any()
        # every kept neuron's |h| is at least every dropped non-zero neuron's
        for t in range(h.shape[0]):
            kept, dropped = h[t][m[t]], h[t][~m[t] & (h[t] != 0)]
            if len(kept) and len(dropped):
                assert kept.min() >= dropped.max()


class OraclePredictor(torch.nn.Module):
    """A 'predictor' that knows the answer: logit +1 where the swapped activation is non-zero,
    -1 elsewhere (from copies of the weights, so poisoning the model's rows does not reach it)."""

    def __init__(self, p, both: bool, flip: float = 0.0):
        super().__init__()
        self.g, self.u, self.both, self.flip = p.gate_weight.clone(), p.up_weight.clone(), both, flip

    def forward(self, x):
        g, u = x @ self.g.T, x @ self.u.T
        on = (g > 0) & (u > 0) if self.both else g > 0
        if self.flip:  # forget a fixed share of the active neurons: misses
            on &= torch.rand(on.shape, generator=torch.Generator().manual_seed(1)) >= self.flip
        return on.float() * 2 - 1


def _logits(name, density, flip=0.0, poison=False):
    model = tiny_model("llama", seed=4)
    parts = mlp_parts(model)
    method = build_method(name, density)
    if name.endswith("-predicted"):
        method.predictors = torch.nn.ModuleList(
            OraclePredictor(p, name.startswith("drelu"), flip) for p in parts)
    sm = attach(model, method)
    seen = {}
    sm.observers.append(lambda layer, sel, x: seen.__setitem__(layer, sel))
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    if poison:  # rows / columns the method says it does not read become NaN after the first pass
        with torch.inference_mode():
            model(input_ids=ids)
        sels = dict(seen)
        with torch.no_grad():
            for layer, p in enumerate(parts):
                unread = ~sels[layer].up_rows.any(0)
                p.gate_weight[unread] = float("nan")
                p.up_weight[unread] = float("nan")
                p.down_weight[:, ~sels[layer].down_cols.any(0)] = float("nan")
    with torch.inference_mode():
        out = model(input_ids=ids).logits
    return out, seen, sm


@pytest.mark.parametrize("name", ["drelu", "relufied"])
def test_a_perfect_predictor_gives_the_oracle(name):
    oracle, o_sel, _ = _logits(name, 1.0)
    pred, p_sel, sm = _logits(f"{name}-predicted", 1.0)
    assert torch.allclose(pred, oracle, atol=1e-5)
    for layer in o_sel:
        assert torch.equal(p_sel[layer].up_rows, o_sel[layer].up_rows)
    assert sm.method.describe()["skipping"] == "predicted"


@pytest.mark.parametrize("name", ["drelu-predicted", "relufied-predicted"])
def test_predicted_skipping_never_reads_what_it_skips(name):
    """Predictors that miss 30% of the active neurons: the rows and columns outside the predicted
    set are NaN, yet the output is finite and the same as before poisoning."""
    clean, sel, _ = _logits(name, 1.0, flip=0.3)
    poisoned, _, _ = _logits(name, 1.0, flip=0.3, poison=True)
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)
    oracle, o_sel, _ = _logits(name.removesuffix("-predicted"), 1.0)
    assert not torch.allclose(clean, oracle, atol=1e-3)  # misses lose those neurons' contributions
    # layer 0 sees the same input in both runs: its predicted set lies within the truly active one
    assert not (sel[0].up_rows & ~o_sel[0].up_rows).any() and (sel[0].up_rows != o_sel[0].up_rows).any()


def test_predicted_skipping_needs_predictors():
    from dipstream.errors import DipstreamError

    with pytest.raises(DipstreamError, match="finetune --method drelu-predicted"):
        attach(tiny_model("llama"), build_method("drelu-predicted", 1.0))
