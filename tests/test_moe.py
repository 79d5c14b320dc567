"""Mixture-of-experts blocks: methods inside routed experts, proved on tiny random MoE models.

Every unread expert and every unread column is NaN-poisoned: the output must not change. The
dense method reproduces the transformers eager path bit for bit; density accounting is checked
against hand-worked byte counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dipstream.errors import DipstreamError
from dipstream.models.arch import mlp_parts
from dipstream.models.moe import moe_parts
from dipstream.sparsity.attach import attach
from dipstream.sparsity.base import METHODS
from dipstream.sparsity.methods import build_method
from tests.conftest import MOE_ARCHS, tiny_model, tiny_moe_config


@pytest.fixture(params=MOE_ARCHS)
def moe_arch(request):
    return request.param


def _ids(seed=1, T=12):
    return torch.randint(1, 96, (2, T), generator=torch.Generator().manual_seed(seed))


def _eager(arch, seed=0):
    m = tiny_model(arch, seed)
    m.set_experts_implementation("eager")
    return m


def test_dense_method_is_the_eager_moe_forward_bit_for_bit(moe_arch):
    m = _eager(moe_arch)
    ids = _ids()
    ref = m(ids).logits
    sm = attach(m, build_method("dense"))
    assert torch.equal(m(ids).logits, ref)
    with sm.dense():  # the switch runs the original blocks
        assert torch.equal(m(ids).logits, ref)
    sm.detach()
    assert torch.equal(m(ids).logits, ref)


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items()
                                        if c.on_experts and not getattr(c, "changes_activation", False)))
def test_density_one_reads_all_of_the_routed_experts(moe_arch, name):
    """At density 1 every method inside the experts gives the dense output (the fused gate/up of
    the experts computed as two products: rounding only, as for Phi-3) and reads all of each
    routed expert."""
    from dipstream.models.arch import describe
    from dipstream.simulator.trace import hook_specs

    m = _eager(moe_arch)
    ids = _ids()
    ref = m(ids).logits
    specs = hook_specs(describe(m).shape, "dip")
    sm = attach(m, build_method(name, 1.0))
    if name == "dip-ca":  # caches of half of each hook's units
        sm.method.configure_cache({h.name: h.n_units // 2 for h in specs})
    if sm.method.needs_calibration:
        from dipstream.sparsity.calibration import calibrate

        calibrate(sm, _ids(seed=9, T=32))
    out = m(ids).logits
    if name == "dense":
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # inside the routed experts nothing is skipped: FFN bytes read = those of the routed experts
    assert sm.stats.mean("mlp") == pytest.approx(sm.stats.mean("expert"), abs=1e-12)


@pytest.mark.parametrize("arch,expected", [("mixtral", 2 / 4), ("qwen3_moe", 2 / 4),
                                           ("qwen2_moe", (2 * 24 + 40) / (4 * 24 + 40))])
def test_expert_level_density_by_hand(arch, expected):
    """2 of 4 routed experts of intermediate size 24 per token (+ the shared expert of 40 for
    qwen2_moe), over all of the block's FFN weights."""
    m = tiny_model(arch)
    sm = attach(m, build_method("dense"))
    m(_ids())
    assert sm.stats.mean("expert") == pytest.approx(expected, abs=1e-12)
    assert sm.stats.mean("mlp") == pytest.approx(expected, abs=1e-12)


def test_dip_density_splits_into_expert_and_neuron_level():
    """DIP d=0.5 inside each routed expert: k_in = int(0.574 * 32) = 18 of 32 up/gate columns,
    k_out = int(0.352 * 24) = 8 of 24 down columns, so a routed expert reads (2*18/32 + 8/24)/3
    of its weights; 2 of 4 experts are routed: measured = 0.5 * that."""
    m = tiny_model("mixtral")
    sm = attach(m, build_method("dip", 0.5))
    m(_ids())
    from dipstream.budget import dip_split

    up, down = dip_split(0.5)
    inside = (2 * int(up * 32) / 32 + int(down * 24) / 24) / 3
    assert sm.stats.mean("expert") == pytest.approx(0.5, abs=1e-12)
    assert sm.stats.mean("mlp") == pytest.approx(0.5 * inside, abs=1e-7)  # float32 fractions


class _Keep:
    """Observer keeping every layer's MoeSelection."""

    def __init__(self):
        self.sel = {}

    def __call__(self, layer, sel, x):
        self.sel[layer] = sel


def _poison_unread(sm, seen: _Keep) -> tuple[int, int]:
    """NaN every expert no token was routed to and every up/gate/down column of a routed expert
    (and of the shared expert) that no token read. Returns (experts poisoned, columns poisoned)."""
    experts = cols = 0
    with torch.no_grad():
        for i, block in enumerate(sm.blocks):
            s = seen.sel[i]
            gu, dn = block.module.experts.gate_up_proj, block.module.experts.down_proj
            for e, p in enumerate(block.experts):
                if e not in s.picked:
                    gu[e].fill_(float("nan"))
                    dn[e].fill_(float("nan"))
                    experts += 1
                    continue
                sel = s.picked[e][1]
                cols += _poison_cols(p, sel)
            if block.shared is not None:
                cols += _poison_cols(block.shared, s.shared)
    return experts, cols


def _poison_cols(p, sel) -> int:
    n = 0
    if sel.up_cols is not None:
        unused = ~sel.up_cols.any(0)
        p.gate_weight[:, unused] = float("nan")
        p.up_weight[:, unused] = float("nan")
        n += int(unused.sum())
    if sel.down_cols is not None:
        unused = ~sel.down_cols.any(0)
        p.down_weight[:, unused] = float("nan")
        n += int(unused.sum())
    return n


@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("method,density", [("dip", 0.5), ("dip", 0.3), ("dense", 1.0), ("glu", 0.8)])
def test_unread_experts_and_columns_can_be_nan(moe_arch, method, density, T):
    m = tiny_model(moe_arch, seed=3)
    ids = _ids(T=1)[:1] if T == 1 else _ids(T=T)  # one token reads 2 of the 4 experts of a layer
    seen = _Keep()
    sm = attach(m, build_method(method, density))
    sm.observers.append(seen)
    ref = m(ids).logits
    experts, cols = _poison_unread(sm, seen)
    assert experts > 0 or T > 1, "no expert went unread: the test proves nothing about skipped experts"
    assert cols > 0 or method == "dense"
    out = m(ids).logits
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)


def test_poisoning_a_read_expert_does_change_the_output():
    """The check above can fail: NaN in an expert some token reads reaches the output."""
    m = tiny_model("mixtral", seed=3)
    ids = _ids(T=1)[:1]
    seen = _Keep()
    sm = attach(m, build_method("dip", 0.5))
    sm.observers.append(seen)
    m(ids)
    e = next(iter(seen.sel[0].picked))
    with torch.no_grad():
        sm.blocks[0].experts[e].down_weight.fill_(float("nan"))
    assert not torch.isfinite(m(ids).logits).all()


@pytest.mark.parametrize("method", ["griffin", "predictor", "drelu-predicted"])
def test_methods_with_per_layer_state_are_refused_in_one_line(method):
    m = tiny_model("mixtral")
    with pytest.raises(DipstreamError, match=f"method '{method}' does not run on mixture-of-experts"):
        attach(m, build_method(method, 0.5))


def test_dense_mlp_paths_refuse_moe_models_and_unsupported_variants():
    m = tiny_model("mixtral")
    with pytest.raises(DipstreamError, match="mixture-of-experts model"):
        mlp_parts(m)
    from transformers import AutoModelForCausalLM

    mixed = AutoModelForCausalLM.from_config(tiny_moe_config("qwen2_moe", mlp_only_layers=[0]))
    with pytest.raises(DipstreamError, match="dense-MLP layers"):
        attach(mixed, build_method("dip", 0.5))


def test_expert_views_share_the_fused_weights():
    m = tiny_model("qwen2_moe")
    b = moe_parts(m)[1]
    ex = m.model.layers[1].mlp.experts
    assert b.n_experts == 4 and b.top_k == 2 and b.experts[0].d_ff == 24 and b.shared.d_ff == 40
    assert b.experts[2].gate_weight.data_ptr() == ex.gate_up_proj[2].data_ptr()
    assert b.experts[2].up_weight.data_ptr() == ex.gate_up_proj[2, 24:].data_ptr()
    assert b.experts[2].down_weight.data_ptr() == ex.down_proj[2].data_ptr()


# --------------------------------------------------------------------------- traces and the simulator

def _record(arch, method, density, T=16):
    from dipstream.models.arch import describe
    from dipstream.sparsity.recording import MaskRecorder

    m = tiny_model(arch, seed=2)
    shape = describe(m).shape
    rec, seen = MaskRecorder(shape.d_model, shape.d_ff), _Keep()
    sm = attach(m, build_method(method, density))
    sm.observers += [rec, seen]
    m(_ids(T=T))
    meta = {"model": arch, "method": method, "density": density, **shape.to_dict()}
    return rec.trace([0, T], [0, 0], meta), sm, seen, shape


def test_expert_hooks_follow_the_routing():
    """DIP: per routed expert an in and an out hook whose rows are empty for tokens not routed
    there and hold DIP's k_in / k_out units for those routed; dense: one hook over whole experts
    whose masks are the router's choices."""
    trace, sm, seen, shape = _record("mixtral", "dip", 0.5)
    names = [h.name for h in trace.hooks]
    assert names[:3] == ["layers.0.expert.0.in", "layers.0.expert.0.out", "layers.0.expert.1.in"]
    assert len(names) == 2 * 4 * 2
    routed = seen.sel[1].routed.numpy()  # the last call of each layer (one batch of 2 x 16 tokens)
    for e in range(4):
        h_in = trace.hooks[names.index(f"layers.1.expert.{e}.in")]
        counts = h_in.masks.sum(1)
        assert (counts[~routed[:, e]] == 0).all()
        assert (counts[routed[:, e]] == int(0.574 * 32)).all()  # k_in of DIP d 0.5 (up_keep 0.574)
    dense, _, seen, _ = _record("mixtral", "dense", 1.0)
    assert [(h.name, h.kind, h.n_units, h.unit_weights) for h in dense.hooks] == \
        [(f"layers.{i}.experts", "expert", 4, 3 * 32 * 24) for i in range(2)]
    assert np.array_equal(dense.hooks[1].masks, seen.sel[1].routed.numpy())


@pytest.mark.parametrize("arch,method,density", [("mixtral", "dip", 0.5), ("qwen2_moe", "dip", 0.6),
                                                 ("qwen2_moe", "glu", 0.8), ("mixtral", "dense", 1.0),
                                                 ("qwen3_moe", "drelu", 1.0), ("qwen2_moe", "up", 0.6)])
def test_simulated_density_equals_the_measured_one(arch, method, density):
    """The simulator, reading only the trace's hooks (unhooked MLP weights static: a dense shared
    expert), counts the same FFN bytes per token as the evaluation's MoeSelection."""
    from dipstream.simulator import simulate

    trace, sm, _, shape = _record(arch, method, density)
    res = simulate(trace, "a18", shape, policy="lru", dram_bytes="0.9x")
    assert res.density_measured == pytest.approx(sm.stats.mean("mlp"), abs=1e-6)
    assert 0 < res.tokens_per_s


# --------------------------------------------------------------------------- the command line

def _err(args, capsys):
    from dipstream.cli.main import main

    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_eval_and_simulate_a_moe_checkpoint(tiny_moe_checkpoint, text_file, tmp_path, capsys, monkeypatch):
    import json

    from dipstream.cli.main import main
    from dipstream.simulator import load_trace

    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path / "cache"))
    m = ["--model", str(tiny_moe_checkpoint), "--text", str(text_file), "--seq-len", "32", "--tokens", "124"]
    assert main(["eval", *m, "--method", "dip", "--density", "0.5", "--json", str(tmp_path / "e.json")]) == 0
    row = json.loads((tmp_path / "e.json").read_text())
    assert row["experts"] == 4 and row["experts_per_token"] == 2
    assert row["density_expert_level"] == pytest.approx((2 * 24 + 40) / (4 * 24 + 40))
    assert row["density_measured"] == pytest.approx(row["density_expert_level"] * row["density_in_experts"])
    assert "density_in_experts" in capsys.readouterr().out
    trace = tmp_path / "t.npz"
    assert main(["simulate", *m, "--method", "dense", "--dram", "0.9x", "--save-trace", str(trace),
                 "--json", str(tmp_path / "s.json")]) == 0
    sim = json.loads((tmp_path / "s.json").read_text())
    assert [h.kind for h in load_trace(trace).hooks] == ["expert", "expert"]
    assert 0 < sim["hit_rate"] < 1 and sim["density_simulated"] == pytest.approx(sim["density_measured"])
    # TEAL: thresholds per expert, calibrated on the train split, saved and loaded back
    th, t1, t2 = tmp_path / "th.json", tmp_path / "t1.json", tmp_path / "t2.json"
    teal = [*m, "--method", "teal", "--density", "0.6", "--calib-tokens", "248"]
    assert main(["eval", *teal, "--save-thresholds", str(th), "--json", str(t1)]) == 0
    assert len(json.loads(th.read_text())["thresholds"]["t_in"]) == 2 * (4 + 1)
    assert main(["eval", *teal, "--thresholds", str(th), "--json", str(t2)]) == 0
    a, b = json.loads(t1.read_text()), json.loads(t2.read_text())
    assert a["thresholds_from"] == "calibrated" and a["perplexity"] == b["perplexity"]
    capsys.readouterr()
    assert "does not run on mixture-of-experts models" in _err(["eval", *m, "--method", "griffin"], capsys)
    assert "does not run mixture-of-experts models yet" in _err(
        ["generate", "--model", str(tiny_moe_checkpoint), "--engine", "hf", "--no-stream"], capsys)
    assert "does not run mixture-of-experts models yet" in _err(
        ["finetune", "--model", str(tiny_moe_checkpoint), "--out", str(tmp_path / "ft")], capsys)


def test_moe_with_dense_layers_is_refused_before_loading(tmp_path, text_file, capsys):
    from transformers import AutoModelForCausalLM

    from tests.conftest import _byte_tokenizer

    AutoModelForCausalLM.from_config(tiny_moe_config("qwen2_moe", vocab_size=300, mlp_only_layers=[0])) \
        .save_pretrained(tmp_path / "mixed")
    _byte_tokenizer().save_pretrained(tmp_path / "mixed")
    m = ["--model", str(tmp_path / "mixed"), "--text", str(text_file), "--seq-len", "32", "--tokens", "62"]
    for cmd in ("eval", "simulate"):
        assert "with dense-MLP layers (mlp_only_layers=[0]" in _err([cmd, *m], capsys)


# --------------------------------------------------------------------------- DIP-CA inside experts

@pytest.mark.parametrize("policy", ["lru", "lfu", "window"])
def test_dip_ca_caches_per_expert_are_those_of_the_replay(policy):
    """DIP-CA keeps one simulated cache per hook of every routed expert and of the shared expert.
    Its live caches, stepped at every position (with an empty mask where the token went to other
    experts), end exactly where the recorded trace replayed through the same caches ends."""
    from dipstream.models.arch import describe
    from dipstream.simulator.caches import CacheSet
    from dipstream.simulator.trace import hook_specs
    from dipstream.sparsity.methods import MethodOptions
    from dipstream.sparsity.recording import MaskRecorder

    m = tiny_model("qwen2_moe", seed=4)
    shape = describe(m).shape
    specs = hook_specs(shape, "dip")
    caps = {h.name: h.n_units // 3 for h in specs}
    sm = attach(m, build_method("dip-ca", 0.5, MethodOptions(gamma=0.1)))
    sm.method.configure_cache(caps, policy)
    rec = MaskRecorder(shape.d_model, shape.d_ff)
    sm.observers.append(rec)
    B, T = 2, 16
    m(_ids(seed=7, T=T))
    trace = rec.trace([0, T], [0, 0], {"model": "x", "method": "dip-ca", "density": 0.5, **shape.to_dict()})
    assert sorted(h.name for h in trace.hooks) == sorted(caps)
    replay = CacheSet(specs, [caps[h.name] for h in specs], policy, n_streams=B, grouping="hook")
    for h in trace.hooks:
        masks = h.masks.reshape(B, T, -1)
        for t in range(T):
            replay.step(h.name, masks[:, t])
        assert np.array_equal(replay.cached(h.name), sm.method._caches.cached(h.name)), h.name
    # the expert hooks do have positions where the token went elsewhere (the empty steps are exercised)
    assert all((~h.masks.any(1)).any() for h in trace.hooks if ".expert." in h.name)


def test_dip_ca_inside_experts_at_gamma_one_is_dip_and_steers_to_cached_units(tiny_moe_checkpoint, text_file):
    from dipstream.experiments import EvalConfig
    from dipstream.experiments.simulate import SimConfig, SimulateConfig, run_simulate
    from dipstream.sparsity.methods import MethodOptions

    def sim(method, gamma):
        ev = EvalConfig(model=str(tiny_moe_checkpoint), method=method, density=0.5, text=str(text_file), seq_len=32,
                        tokens=248, options=MethodOptions(gamma=gamma))
        return run_simulate(SimulateConfig(ev, SimConfig(dram="0.9x")))

    dip, same, ca = sim("dip", 1.0), sim("dip-ca", 1.0), sim("dip-ca", 0.05)
    assert same["perplexity"] == dip["perplexity"] and same["hit_rate"] == dip["hit_rate"]
    assert ca["density_measured"] == pytest.approx(dip["density_measured"], abs=1e-9)
    assert ca["hit_rate"] > dip["hit_rate"] and ca["tokens_per_s"] > dip["tokens_per_s"]


# --------------------------------------------------------------------------- thresholds per expert

@pytest.mark.parametrize("name", ["teal", "cats"])
def test_threshold_methods_calibrate_one_threshold_per_expert(name):
    """TEAL and CATS keep a threshold per routed expert and per shared expert (2 layers x (4 + 1)),
    each calibrated on the tokens that reach it; inside the experts they keep about their target."""
    from dipstream.sparsity.calibration import calibrate

    m = tiny_model("qwen2_moe", seed=5)
    sm = attach(m, build_method(name, 0.6))
    calibrate(sm, _ids(seed=9, T=32))
    for vals in sm.method.thresholds.values():
        assert len(vals) == 2 * 5 and all(t == t for t in vals)
        assert len({round(t, 7) for t in vals}) == 10  # one per expert, each its own
    m(_ids(seed=11, T=32))
    inside = sm.stats.mean("mlp") / sm.stats.mean("expert")
    assert 0.45 < inside < 0.75


def test_threshold_calibration_refuses_experts_it_never_reached():
    from dipstream.sparsity.calibration import calibrate

    m = tiny_model("mixtral", seed=5)
    sm = attach(m, build_method("teal", 0.6))
    with pytest.raises(DipstreamError, match="received no calibration token.*raise --calib-tokens"):
        calibrate(sm, _ids(seed=9, T=1)[:1])  # one token reaches 2 of the 4 experts


def test_teal_inside_experts_never_reads_what_it_skips():
    from dipstream.sparsity.calibration import calibrate

    m = tiny_model("qwen3_moe", seed=3)
    sm = attach(m, build_method("teal", 0.5))
    calibrate(sm, _ids(seed=9, T=32))
    seen = _Keep()
    sm.observers.append(seen)
    ids = _ids(T=1)[:1]
    ref = m(ids).logits
    experts, cols = _poison_unread(sm, seen)
    assert experts > 0 and cols > 0
    out = m(ids).logits
    assert torch.isfinite(out).all() and torch.equal(out, ref)
