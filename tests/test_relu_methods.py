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
