"""DIP-CA and `dipstream simulate` on a tiny local checkpoint."""

import json

import pytest
import torch

from dipstream.cli.main import main
from dipstream.experiments.simulate import SimConfig, SimulateConfig, run_simulate
from dipstream.experiments.evaluate import EvalConfig
from dipstream.sparsity import MethodOptions, attach, build_method
from tests.conftest import tiny_model
from tests.test_methods import _configure_dip_ca





def test_dip_ca_with_gamma_one_is_dip():
    tokens = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    outs = []
    for name, opts in (("dip", MethodOptions()), ("dip-ca", MethodOptions(gamma=1.0))):
        model = tiny_model("llama")
        sm = attach(model, build_method(name, 0.4, opts))
        if name == "dip-ca":
            _configure_dip_ca(sm, 0.3)
        with torch.inference_mode():
            outs.append(model(input_ids=tokens).logits)
    assert torch.equal(outs[0], outs[1])


def _sim(ckpt, text, method, **kw):
    # DRAM 0.9x of the tiny model: its static layers (untied 300-token embedding and head) take
    # 0.73x, so each cache holds part of a token's mask
    ev = EvalConfig(model=str(ckpt), method=method, density=0.5, text=str(text), seq_len=32, tokens=248,
                    options=MethodOptions(gamma=kw.pop("gamma", 0.1)))
    return run_simulate(SimulateConfig(ev, SimConfig(dram=kw.pop("dram", "0.9x"), **kw)))


def test_dip_ca_raises_hit_rate_at_equal_budget(tiny_checkpoint, text_file):
    dip = _sim(tiny_checkpoint, text_file, "dip")
    ca = _sim(tiny_checkpoint, text_file, "dip-ca", gamma=0.05)
    for policy in ("none", "lru", "lfu", "window"):  # DIP-CA within the budget, every policy
        r = _sim(tiny_checkpoint, text_file, "dip-ca", gamma=0.05, policy=policy)
        assert r["dram_used_bytes"] <= r["dram_bytes"] + 1e-6, policy
    assert ca["density_measured"] == pytest.approx(dip["density_measured"], abs=1e-9)
    assert ca["density_simulated"] == pytest.approx(ca["density_measured"], rel=1e-6)
    assert ca["hit_rate"] > dip["hit_rate"]
    assert ca["tokens_per_s"] > dip["tokens_per_s"]
    for row in (dip, ca):
        assert row["dense_streaming"]["density_measured"] == 1.0
        assert row["speedup_vs_dense_streaming"] == pytest.approx(
            row["tokens_per_s"] / row["dense_streaming"]["tokens_per_s"])


def test_trace_replay_matches_live_run(tiny_checkpoint, text_file, tmp_path, capsys):
    trace, out1, out2 = tmp_path / "t.npz", tmp_path / "a.json", tmp_path / "b.json"
    common = ["--model", str(tiny_checkpoint), "--dram", "0.6x", "--policy", "lfu"]
    assert main(["simulate", *common, "--method", "dip", "--text", str(text_file), "--seq-len", "32",
                 "--tokens", "124", "--save-trace", str(trace), "--json", str(out1)]) == 0
    assert main(["simulate", *common, "--trace", str(trace), "--json", str(out2)]) == 0
    a, b = json.loads(out1.read_text()), json.loads(out2.read_text())
    for k in ("tokens_per_s", "hit_rate", "flash_bytes_per_token", "dram_bytes_per_token"):
        assert a[k] == pytest.approx(b[k], rel=1e-12)
    assert "speed-up vs dense" in capsys.readouterr().out
    # by default (the reference) no cache exceeds its capacity; keep-mask (not the reference)
    # lets a cache hold a mask larger than its share: more DRAM used, hits at least as often
    assert a["dram_used_bytes"] <= a["dram_bytes"] + 1e-6
    assert main(["simulate", *common, "--trace", str(trace), "--json", str(out2),
                 "--over-capacity", "keep-mask"]) == 0
    loose = json.loads(out2.read_text())
    assert loose["dram_used_bytes"] > loose["dram_bytes"] and loose["hit_rate"] >= a["hit_rate"]
    # overlapped DRAM and Flash reads (max instead of sum) can only be faster
    assert main(["simulate", *common, "--trace", str(trace), "--json", str(out2),
                 "--hw-set", "overlap=true"]) == 0
    assert json.loads(out2.read_text())["tokens_per_s"] > a["tokens_per_s"]


def _error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("dipstream: error: ")
    return err


def test_simulate_bad_input(tiny_checkpoint, text_file, tmp_path, capsys):
    m = ["simulate", "--model", str(tiny_checkpoint), "--text", str(text_file), "--seq-len", "32",
         "--tokens", "62"]
    assert "nope" in _error([*m, "--hardware", "nope"], capsys)
    assert "unknown cache policy 'fifo'" in _error([*m, "--policy", "fifo"], capsys)
    assert "--gamma 1.5 must be <= 1" in _error([*m, "--method", "dip-ca", "--gamma", "1.5"], capsys)
    bad_hw = tmp_path / "hw.json"
    bad_hw.write_text(json.dumps({"name": "x", "dram_bw": 0, "flash_bw": 1e9}))
    assert "positive" in _error([*m, "--hardware", str(bad_hw)], capsys)
    assert "not KEY=VALUE" in _error([*m, "--hw-set", "overlap"], capsys)
    assert "smaller than the static layers" in _error(
        [*m, "--dram", "1KB", "--hw-set", "stream_static_overflow=false"], capsys)
    assert "dip-ca steers its masks" in _error([*m, "--method", "dip-ca", "--policy", "belady"], capsys)
    assert "unknown hardware field" in _error([*m, "--hw-set", "turbo=1"], capsys)
    trace = tmp_path / "t.npz"
    assert main([*m, "--save-trace", str(trace)]) == 0
    capsys.readouterr()
    err = _error(["simulate", "--model", "smollm2-135m", "--trace", str(trace)], capsys)
    assert "trace was recorded for" in err


def test_dense_run_is_the_streaming_baseline(tiny_checkpoint, text_file):
    row = _sim(tiny_checkpoint, text_file, "dense")
    assert row["speedup_vs_dense_streaming"] == 1.0
    assert row["tokens_per_s"] == row["dense_streaming"]["tokens_per_s"]


@pytest.mark.parametrize("method,density,kind,unit", [("cats", 0.6, "neuron", 2), ("up", 0.6, "neuron", 2),
                                                       ("glu", 0.8, "out", 1), ("griffin", 0.5, "neuron", 3),
                                                       ("teal", 0.5, "in", None)])
def test_every_method_records_a_trace(tiny_checkpoint, text_file, tmp_path, method, density, kind, unit,
                                      monkeypatch):
    from dipstream.simulator import load_trace

    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path / "cache"))  # policy hot's profiles: not the user's cache
    trace = tmp_path / "t.npz"
    ev = EvalConfig(model=str(tiny_checkpoint), method=method, density=density, text=str(text_file),
                    seq_len=32, tokens=62, calib_tokens=62)
    row = run_simulate(SimulateConfig(ev, SimConfig(dram="0.6x", save_trace=str(trace))))
    hooks = load_trace(trace).hooks
    assert {h.kind for h in hooks} == {kind} or (kind == "in" and {h.kind for h in hooks} == {"in", "out"})
    if unit is not None:
        assert hooks[0].unit_weights == unit * 32  # d_model of the tiny model
    assert row["tokens_per_s"] > 0
    # the simulator prices exactly the weights the evaluation counted
    assert row["density_simulated"] == pytest.approx(row["density_measured"], rel=1e-6)
    # with the defaults no policy uses more DRAM than the budget, at any size
    for policy in ("none", "lru", "lfu", "window", "hot", "belady"):
        for dram in ("0.3x", "0.6x", "0.9x"):
            r = run_simulate(SimulateConfig(ev, SimConfig(dram=dram, policy=policy, trace=str(trace))))
            assert r["dram_used_bytes"] <= r["dram_bytes"] + 1e-6, (policy, dram)
