"""Small deterministic checks against values worked out by hand."""

import pytest
import torch

from dipstream.models.arch import GatedMLPParts
from dipstream.sparsity import Selection, build_method, dip_split, layer_keeps
from dipstream.sparsity.methods import threshold_for_keep
from dipstream.selection import topk_mask
from dipstream.sparsity.ops import linear_cols, linear_rows


def test_dip_split_reference_example():
    up, down = dip_split(0.5)
    # sigmoid(0.9849930711 * logit(0.5) + 0.2997647759) = sigmoid(0.29976) = 0.57439
    assert up == pytest.approx(0.574385, abs=1e-6)
    assert down == pytest.approx(3 * (0.5 - 2 / 3 * 0.574385), abs=1e-5)  # 0.35123
    assert (2 * up + down) / 3 == pytest.approx(0.5)
    assert dip_split(1.0) == (1.0, 1.0)
    up, down = dip_split(0.1)
    # logit(0.1) = -2.19722; z = 0.98499 * -2.19722 + 0.29976 = -1.86449; sigmoid(z) = 0.13419
    # down = 3 * (0.1 - 2/3 * 0.13419) = 0.03162
    assert up == pytest.approx(0.13419, abs=1e-4) and down == pytest.approx(0.03162, abs=1e-4)


def test_layer_keeps_overrides(tmp_path):
    keeps = layer_keeps(0.5, 3, up_keep=0.25)
    assert keeps.up == (0.25, 0.25, 0.25) and keeps.down[0] == pytest.approx(0.351230, abs=1e-6)
    f = tmp_path / "keeps.json"
    f.write_text('{"up_keep": [0.1, 0.2, 0.3]}')
    keeps = layer_keeps(0.5, 3, keep_file=str(f))
    assert keeps.up == (0.1, 0.2, 0.3) and keeps.k_in(2, 10) == 3


def test_topk_mask():
    s = torch.tensor([[0.1, 3.0, -5.0, 2.0], [4.0, 1.0, 0.0, 2.0]])
    assert topk_mask(s, 2).tolist() == [[False, True, False, True], [True, False, False, True]]
    assert topk_mask(s, 0).sum() == 0 and topk_mask(s, 9).all()


def test_threshold_for_keep():
    s = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert threshold_for_keep(s, 0.4) == 3.0     # 2 of 5 values (4, 5) are > 3
    assert threshold_for_keep(s, 1.0) == float("-inf")
    assert threshold_for_keep(s, 0.0) == float("inf")


def test_masked_linears():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x = torch.tensor([[1.0, 1.0, 1.0]])
    cols = torch.tensor([[True, False, True]])
    assert linear_cols(x, w, None, cols).tolist() == [[4.0, 10.0]]      # 1+3, 4+6
    rows = torch.tensor([[False, True]])
    assert linear_rows(x, w, torch.tensor([0.5, 0.5]), rows).tolist() == [[0.0, 15.5]]


def test_selection_fractions():
    sel = Selection(up_cols=torch.tensor([[1, 1, 0, 0]], dtype=torch.bool),
                    gate_cols=torch.tensor([[1, 1, 0, 0]], dtype=torch.bool),
                    down_cols=torch.tensor([[1, 0, 0, 0, 0, 0]], dtype=torch.bool))
    fr = sel.fractions()
    # up and gate read half their columns, down one sixth: (0.5 + 0.5 + 1/6) / 3 = 7/18
    assert float(fr["mlp"][0]) == pytest.approx(7 / 18)
    needed = sel.needed("up", (6, 4))
    assert needed[:, :2].all() and not needed[:, 2:].any()


def test_selection_fractions_stay_on_the_masks_device():
    """Linears without a mask (CATS/GLU read some densely) get their ones on the masks' device
    (meta stands in for CUDA here): no CPU tensor is mixed with device masks."""
    sel = Selection(down_cols=torch.ones(3, 6, dtype=torch.bool, device="meta"))
    fr = sel.fractions()
    assert {v.device.type for v in fr.values()} == {"meta"} and fr["up"].shape == (3,)


def test_dip_on_a_hand_built_mlp():
    """d = 4, D = 2, identity-like weights with relu so every number is easy to follow."""
    act = torch.nn.ReLU()
    gate = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    up = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0]])
    down = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    p = GatedMLPParts("mlp", None, gate, up, down, None, None, None, act, "relu")
    from dipstream.sparsity.methods import MethodOptions

    method = build_method("dip", 0.5, MethodOptions(up_keep=0.5, down_keep=0.5))
    method.prepare([p])
    x = torch.tensor([[3.0, 2.0, 0.5, -1.0]])
    y, sel = method.mlp(0, p, x, (1, 1))
    # top-2 |x| -> inputs 0 and 1; x~ = [3, 2, 0, 0]
    # g = [3, 2], u = [3, 4], h~ = relu(g) * u = [9, 8]; top-1 |h~| -> neuron 0
    # y = down[:, 0] * 9 = [9, 0, 9, 0]
    assert sel.up_cols.tolist() == [[True, True, False, False]]
    assert sel.down_cols.tolist() == [[True, False]]
    assert y.tolist() == [[9.0, 0.0, 9.0, 0.0]]
