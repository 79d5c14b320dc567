"""`dipstream generate`: the real sparse / offloaded decode equals dense at density 1.0, equals
the masked DIP of `dipstream eval` at lower density, and bad input gets one-line errors."""

from __future__ import annotations

import pytest
import torch

from dipstream.cli.main import main
from dipstream.models.arch import mlp_parts
from dipstream.config import flat
from dipstream.runtime.decode import DecodeOptions, decode_tokens
from dipstream.runtime.generate import GenerateConfig, run_generate
from dipstream.runtime.in_memory import InMemoryRuntime
from dipstream.runtime.offload import OffloadRuntime
from dipstream.runtime.offload_file import ensure_offload
from dipstream.sparsity import MethodOptions, attach, build_method
from tests.conftest import decode_with_runtime, shape_of, tiny_model

CFG = DecodeOptions(max_new_tokens=12, stop_at_eos=False)


def _ids(seed=1):
    return torch.randint(1, 96, (1, 6), generator=torch.Generator().manual_seed(seed))


def test_density_one_equals_dense_token_for_token(arch, tmp_path):
    """Sparse kernel (float32, int8-free) and the offloaded runtime (dense, dip, dip-ca with
    gamma 1) at full density generate exactly the dense model's tokens, on every architecture."""
    model = tiny_model(arch)
    ids = _ids()
    dense = decode_tokens(model, ids, CFG)["ids"]
    parts = mlp_parts(model)
    L, d, D = len(parts), parts[0].d_model, parts[0].d_ff
    assert decode_with_runtime(model, InMemoryRuntime(parts, [d] * L, [D] * L), ids, CFG) == dense
    f, written = ensure_offload(tmp_path / "off", parts, "tiny")
    assert written
    try:
        for method in ("dense", "dip", "dip-ca"):
            rt = OffloadRuntime(f, parts[0].act_name, build_method(method, 1.0, MethodOptions(gamma=1.0)),
                                [d] * L, [D] * L, 60_000, shape_of(model), 32)
            assert 0 < rt.capacity["layers.0.in"] < d  # a partial cache: reads really happen
            assert decode_with_runtime(model, rt, ids, CFG) == dense, method
            assert rt.counters.reads > 0
    finally:
        f.close()


def test_sparse_decode_equals_masked_dip(tmp_path):
    """At density 0.5 the real kernel (in RAM and offloaded) picks DIP's masks and generates
    the tokens of the masked DIP that `dipstream eval` measures."""
    model = tiny_model("llama", seed=3)
    ids = _ids(2)
    sm = attach(model, build_method("dip", 0.5))
    try:
        masked = decode_tokens(model, ids, CFG)["ids"]
        k_in = [sm.method.keeps.k_in(i, 32) for i in range(2)]
        k_out = [sm.method.keeps.k_out(i, 48) for i in range(2)]
    finally:
        sm.detach()
    parts = mlp_parts(model)
    assert decode_with_runtime(model, InMemoryRuntime(parts, k_in, k_out), ids, CFG) == masked
    f, _ = ensure_offload(tmp_path / "off", parts, "tiny")
    try:
        rt = OffloadRuntime(f, "silu", build_method("dip", 0.5), k_in, k_out, 50_000, shape_of(model), 32)
        assert decode_with_runtime(model, rt, ids, CFG) == masked
        assert 0.3 < rt.counters.selected_bytes / rt.counters.tokens / (2 * 3 * 32 * 48 * 4) < 0.55
    finally:
        f.close()


def test_quantized_weights_generate(tmp_path):
    """int8 at density 1.0 stays close to dense (same first tokens on a tiny model)."""
    model = tiny_model("llama", seed=5)
    ids = _ids(4)
    dense = decode_tokens(model, ids, CFG)["ids"]
    parts = mlp_parts(model)
    rt = InMemoryRuntime(parts, [32, 32], [48, 48], weights="int8")
    got = decode_with_runtime(model, rt, ids, CFG)
    assert got[:4] == dense[:4]


def test_generate_cli_end_to_end(tiny_checkpoint, tmp_path, capsys):
    """Streams text, reports tokens/s; offload writes the file once and reopens it; the run's
    JSON row and trace are written."""
    out = tmp_path / "row.json"
    trace = tmp_path / "t.npz"
    args = ["generate", "--engine", "hf", "--model", str(tiny_checkpoint), "--prompt", "the quick brown",
            "--max-new-tokens", "6", "--no-stop-at-eos", "--threads", "1"]
    assert main(args + ["--method", "dense"]) == 0
    dense_out = capsys.readouterr()
    assert dense_out.out.startswith("the quick brown") and "decode_tokens_per_s" in dense_out.err
    off = ["--offload", str(tmp_path / "off"), "--dram", "150kB"]
    assert main(args + ["--method", "dip-ca", "--density", "1.0", "--gamma", "1.0", *off,
                        "--json", str(out), "--trace", str(trace)]) == 0
    ca_out = capsys.readouterr()
    assert ca_out.out == dense_out.out  # density 1.0: the dense text
    import json

    row = json.loads(out.read_text())
    assert row["offload_written"] and row["new_tokens"] == 6 and row["reads_per_token"] >= 0
    assert row["ram_mlp_bytes"] <= row["dram_budget_bytes"] and trace.exists()
    assert main(args + ["--method", "dip", *off, "--json", str(out)]) == 0
    assert not json.loads(out.read_text())["offload_written"]  # reopened, checksum verified
    capsys.readouterr()


@pytest.mark.parametrize("extra,message", [
    (["--method", "dip-ca"], "dip-ca picks its masks"),
    (["--offload", "OFF", "--dram", "1kB"], "smaller than the static layers and KV cache"),
    (["--offload", "OFF", "--dram", "115kB"], "less than one token's working set"),
    (["--offload", "OFF", "--weights", "int8"], "--engine lean"),
    (["--density", "1.5"], "outside (0, 1]"),
    (["--method", "dense", "--weights", "int4"], "use it with --method dip"),
    (["--offload", "OFF", "--dram", "lots"], "--dram"),
])
def test_generate_cli_errors(tiny_checkpoint, tmp_path, capsys, extra, message):
    extra = [str(tmp_path / "off") if a == "OFF" else a for a in extra]
    rc = main(["generate", "--engine", "hf", "--model", str(tiny_checkpoint), "--max-new-tokens", "2",
               "--no-stream", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dipstream: error:")
    assert message in err[0]


def test_generate_cli_corrupt_offload(tiny_checkpoint, tmp_path, capsys):
    off = tmp_path / "off"
    base = ["generate", "--engine", "hf", "--model", str(tiny_checkpoint), "--max-new-tokens", "2", "--no-stream",
            "--offload", str(off), "--dram", "150kB"]
    assert main(base) == 0
    data = off / "mlp.bin"
    data.write_bytes(data.read_bytes()[:-512])
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or corrupt" in err[0]


def test_generate_trace_in_memory_replays(tiny_checkpoint, tmp_path, capsys):
    """--trace without --offload: the in-RAM sparse run records its masks (prompt included) as a
    simulator trace whose measured density is the run's."""
    from dipstream.simulator import load_trace, simulate

    trace = tmp_path / "t.npz"
    assert main(["generate", "--engine", "hf", "--model", str(tiny_checkpoint), "--prompt", "the quick brown",
                 "--method", "dip", "--density", "0.5", "--max-new-tokens", "5", "--no-stop-at-eos", "--no-stream",
                 "--trace", str(trace)]) == 0
    capsys.readouterr()
    tr = load_trace(trace)
    P = int(tr.prompt_len[0])
    assert tr.n_tokens == P + 5 - 1 and P > 0  # the last new token is not run through the model
    assert all(h.masks.sum(1).min() > 0 for h in tr.hooks)
    res = simulate(tr, "a18", tr.shape(), dram_bytes="0.8x")
    assert 0.45 < res.density_measured < 0.5


@pytest.mark.parametrize("key,value", [("record_align", 1024), ("in_stride", 123), ("size", None),
                                       ("d", "32")])
def test_tampered_offload_manifest_is_refused(tiny_checkpoint, tmp_path, capsys, key, value):
    import json

    off = tmp_path / "off"
    base = ["generate", "--engine", "hf", "--model", str(tiny_checkpoint), "--max-new-tokens", "2", "--no-stream",
            "--offload", str(off), "--dram", "150kB"]
    assert main(base) == 0
    m = json.loads((off / "mlp.json").read_text())
    if value is None:
        del m[key]
    else:
        m[key] = value
    (off / "mlp.json").write_text(json.dumps(m))  # size and sha256 still those of the data
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dipstream: error:") and "rebuild" in err[0]


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_generate_adapter_dip_on_cuda_is_refused(tiny_checkpoint, tmp_path, capsys,
                                                 monkeypatch, device):
    """DIP with LoRA adapters runs its MLP on the CPU (the adapter terms stay there): a CUDA
    device, named or picked by 'auto', is a one-line error before the model is loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rc = main(["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "2",
               "--no-stream", "--adapter", str(tmp_path), "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--adapter with --method dip" in err[0]


def test_sampling_is_seeded(tiny_checkpoint):
    cfg = dict(model=str(tiny_checkpoint), method="dense", prompt="the lazy", max_new_tokens=8,
               stop_at_eos=False, sample=True, temperature=1.5, stream=False)
    a = run_generate(flat(GenerateConfig, **cfg, sample_seed=1))["ids"]
    b = run_generate(flat(GenerateConfig, **cfg, sample_seed=1))["ids"]
    greedy = run_generate(flat(GenerateConfig, **{**cfg, "sample": False}))["ids"]
    others = [run_generate(flat(GenerateConfig, **cfg, sample_seed=s))["ids"] for s in (2, 3)]
    assert a == b and any(o != a for o in others + [greedy])


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_generate_with_lora_adapters_equals_masked_dip(arch):
    """With LoRA adapters on the MLP linears, the real kernel path generates the tokens of the
    adapted dense model at density 1.0 and of the adapted masked DIP (eval's path) at 0.5."""
    from dipstream.models.adapters import LoraSettings, add_lora
    from tests.test_adapters import _randomize_lora

    model = tiny_model(arch, seed=3)
    add_lora(model, LoraSettings(rank=4))
    _randomize_lora(model, seed=2)
    ids = _ids(2)
    parts = mlp_parts(model)
    L, d, D = len(parts), parts[0].d_model, parts[0].d_ff
    dense = decode_tokens(model, ids, CFG)["ids"]
    assert decode_with_runtime(model, InMemoryRuntime(parts, [d] * L, [D] * L), ids, CFG) == dense
    sm = attach(model, build_method("dip", 0.5))
    try:
        masked = decode_tokens(model, ids, CFG)["ids"]
        k_in = [sm.method.keeps.k_in(i, d) for i in range(L)]
        k_out = [sm.method.keeps.k_out(i, D) for i in range(L)]
    finally:
        sm.detach()
    assert masked != dense
    assert decode_with_runtime(model, InMemoryRuntime(parts, k_in, k_out), ids, CFG) == masked
    with pytest.raises(Exception, match="float32 only"):
        InMemoryRuntime(parts, k_in, k_out, weights="int8")
