"""`dipstream generate`: on the engine (in RAM and offloaded) and on the Hugging Face front end,
dense at density 1.0 equals the model's own tokens on every family, DIP equals the masked DIP of
`dipstream eval`, LoRA adapters merged into the engine's file equal the adapted model, and bad
input gets one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from dipstream.budget import layer_keeps
from dipstream.cli.main import main
from dipstream.config import flat
from dipstream.engine.build import build
from dipstream.engine.config import EngineOptions, EngineSetup
from dipstream.engine.decode import DecodeOptions, generate
from dipstream.engine.export import export_checkpoint
from dipstream.models.arch import mlp_parts
from dipstream.options import CacheAwareOptions
from dipstream.runtime.generate import GenerateConfig, run_generate
from dipstream.runtime.hf_generate import HfDecoder, InMemoryRuntime
from dipstream.sparsity import attach, build_method
from dipstream.sparsity.decoding import decode_rule
from tests.conftest import shape_of, tiny_model

CFG = DecodeOptions(max_new_tokens=12, stop_at_eos=False)


def _ids(seed=1):
    return torch.randint(1, 96, (6,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_ids(model, ids) -> list[int]:
    """Greedy tokens of a Hugging Face model through the decode loop every front end shares."""
    return generate(HfDecoder(model, torch.device("cpu")), ids, CFG)["ids"]


def engine_ids(folder, method: str, density: float, ids, offload_bytes: int | None = None, gamma: float = 0.1,
               **setup) -> tuple[list[int], object]:
    """Greedy tokens of the engine on the model file in `folder` (its MLP in RAM, or offloaded
    behind `offload_bytes` of caches); also its MLP counters."""
    rule = decode_rule(method, CacheAwareOptions(gamma=gamma))
    lm, _ = build(folder, EngineSetup(rule, layer_keeps(density, 2), 32, EngineOptions(direct_io=False),
                                      offload=offload_bytes is not None, cache_bytes=offload_bytes, **setup))
    try:
        return generate(lm, ids, CFG)["ids"], lm.mlp
    finally:
        lm.close()


def exported(model, tmp_path, weights: str = "float32", adapter=None):
    model.save_pretrained(tmp_path / "hf")
    export_checkpoint(tmp_path / "hf", tmp_path / f"m-{weights}", "tiny", weights, adapter=adapter)
    return tmp_path / f"m-{weights}"


def test_density_one_equals_dense_token_for_token(arch, tmp_path):
    """The sparse kernel of the Hugging Face front end and the engine (in RAM; offloaded dense, dip
    and dip-ca with gamma 1 behind a partial cache) at full density generate exactly the dense
    model's tokens, on every family."""
    model = tiny_model(arch)
    ids = _ids()
    dense = hf_ids(model, ids)
    parts = mlp_parts(model)
    L, d, D = len(parts), parts[0].d_model, parts[0].d_ff
    rt = InMemoryRuntime(model, parts, shape_of(model), [d] * L, [D] * L)
    try:
        assert hf_ids(model, ids) == dense
    finally:
        rt.detach()
    folder = exported(model, tmp_path)
    assert engine_ids(folder, "dip", 1.0, ids)[0] == dense
    for method in ("dense", "dip", "dip-ca"):
        got, mlp = engine_ids(folder, method, 1.0, ids, offload_bytes=6_000, gamma=1.0)
        assert 0 < mlp.capacity["layers.0.in"] < d  # a partial cache: reads really happen
        assert got == dense, method
        assert mlp.counters.reads > 0


def test_sparse_decode_equals_masked_dip(tmp_path):
    """At density 0.5 the real kernels (the Hugging Face front end's, the engine's in RAM and
    offloaded) pick DIP's masks and generate the tokens of the masked DIP that `dipstream eval`
    measures."""
    model = tiny_model("llama", seed=3)
    ids = _ids(2)
    sm = attach(model, build_method("dip", 0.5))
    try:
        masked = hf_ids(model, ids)
        k_in = [sm.method.keeps.k_in(i, 32) for i in range(2)]
        k_out = [sm.method.keeps.k_out(i, 48) for i in range(2)]
    finally:
        sm.detach()
    assert masked != hf_ids(model, ids)
    rt = InMemoryRuntime(model, mlp_parts(model), shape_of(model), k_in, k_out)
    try:
        assert hf_ids(model, ids) == masked
    finally:
        rt.detach()
    folder = exported(model, tmp_path)
    assert engine_ids(folder, "dip", 0.5, ids)[0] == masked
    got, mlp = engine_ids(folder, "dip", 0.5, ids, offload_bytes=8_000)
    assert got == masked
    c = mlp.counters
    assert 0.3 < c.selected_bytes / c.tokens / (2 * 3 * 32 * 48 * 4) < 0.55


@pytest.mark.parametrize("weights,tol", [("int8", 0.05), ("int4", 0.35)])
def test_quantized_weights_generate(tmp_path, weights, tol):
    """Every matrix in int8 (int4 with an int8 head) at density 1.0 stays close to the float32
    model: logits of a sequence within `tol` relative error, and the same first token."""
    import numpy as np

    model = tiny_model("llama", seed=5)
    ids = _ids(4)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    lm, _ = build(exported(model, tmp_path, weights), EngineSetup(decode_rule("dense"), layer_keeps(1.0, 2), 16))
    got = np.stack([lm.forward(t, p) for p, t in enumerate(ids)])
    lm.close()
    assert 0 < np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol
    assert int(got[-1].argmax()) == hf_ids(model, ids)[0]


def _adapter_folder(model, path, seed=2):
    """LoRA adapters of rank 4 with random B (peft starts it at 0) on `model`'s MLP, saved as a
    `dipstream finetune` folder would hold them; the model keeps them injected."""
    from dipstream.models.adapter_folder import model_signature, write_meta
    from dipstream.models.adapters import LoraSettings, add_lora, save_lora
    from dipstream.models.arch import describe
    from tests.test_adapters import _randomize_lora

    info = describe(model)
    pm = add_lora(model, LoraSettings(rank=4))
    _randomize_lora(model, seed=seed)
    save_lora(pm, path)
    write_meta(path, {"model": "tiny", "model_signature": model_signature(info), "method": "dip"})
    return pm


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_lora_adapters_merged_into_the_engine_equal_the_adapted_model(arch, tmp_path):
    """`generate --adapter` on the engine: the LoRA adapters merged into the exported weights
    (peft's merge) give the adapted dense model's tokens at density 1.0 and the adapted masked DIP's
    (eval's path: each adapter fed its weight's selected inputs) at 0.5; the Hugging Face front end
    merges them the same way."""
    model = tiny_model(arch, seed=3)
    model.save_pretrained(tmp_path / "hf")
    _adapter_folder(model, tmp_path / "lora")
    ids = _ids(2)
    dense = hf_ids(model, ids)
    sm = attach(model, build_method("dip", 0.5))
    try:
        masked = hf_ids(model, ids)
    finally:
        sm.detach()
    assert masked != dense
    export_checkpoint(tmp_path / "hf", tmp_path / "m", "hf", adapter=tmp_path / "lora")
    assert engine_ids(tmp_path / "m", "dense", 1.0, ids)[0] == dense
    assert engine_ids(tmp_path / "m", "dip", 0.5, ids)[0] == masked
    assert engine_ids(tmp_path / "m", "dip", 0.5, ids, offload_bytes=8_000)[0] == masked


def test_generate_adapter_on_both_front_ends(tiny_checkpoint, tmp_path):
    """`generate --adapter` merges the adapters on the engine (into the exported file, kept apart from
    the file without them) and on the Hugging Face front end: the same tokens either way."""
    from dipstream.models import load_model

    _adapter_folder(load_model(str(tiny_checkpoint)).model, tmp_path / "lora")
    cfg = dict(model=str(tiny_checkpoint), adapter=str(tmp_path / "lora"), method="dip", density=0.5,
               prompt="the quick brown", max_new_tokens=6, stop_at_eos=False, stream=False)
    lean = run_generate(flat(GenerateConfig, **cfg, model_dir=str(tmp_path / "m")))
    hf = run_generate(flat(GenerateConfig, **cfg, engine="hf"))
    plain = run_generate(flat(GenerateConfig, **{**cfg, "adapter": None}, model_dir=str(tmp_path / "plain")))
    assert hf["adapters_merged"] > 0 and lean["adapter"] is not None and plain["adapter"] is None
    assert lean["ids"] == hf["ids"] != plain["ids"]
    with pytest.raises(Exception, match="with adapters"):  # the folder of the plain file is not reused for them
        run_generate(flat(GenerateConfig, **cfg, model_dir=str(tmp_path / "plain")))


def _gen(args, tmp_path, name="row.json"):
    out = tmp_path / name
    assert main(["generate", "--no-stream", "--no-stop-at-eos", "--max-new-tokens", "6", "--prompt",
                 "the quick brown", "--threads", "1", "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_generate_cli_end_to_end(tiny_checkpoint, tmp_path, capsys):
    """Streams text and reports tokens/s on both front ends; offloaded, the model file is exported
    once and reused, DIP-CA at density 1.0 gives the dense text, the row keeps its budget and the
    trace is written."""
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "the quick brown", "--max-new-tokens", "6",
            "--no-stop-at-eos", "--threads", "1"]
    assert main(args + ["--method", "dense", "--engine", "hf"]) == 0
    dense_out = capsys.readouterr()
    assert dense_out.out.startswith("the quick brown") and "decode_tokens_per_s" in dense_out.err
    out, trace = tmp_path / "row.json", tmp_path / "t.npz"
    off = ["--offload", str(tmp_path / "off"), "--dram", "150kB"]
    assert main(args + ["--method", "dip-ca", "--density", "1.0", "--gamma", "1.0", *off, "--json", str(out),
                        "--trace", str(trace)]) == 0
    ca_out = capsys.readouterr()
    assert ca_out.out == dense_out.out  # density 1.0: the dense text
    row = json.loads(out.read_text())
    assert row["engine"] == "lean" and row["new_tokens"] == 6 and row["reads_per_token"] >= 0
    assert row["mlp_ram_bytes"] + row["static_bytes"] + row["kv_bytes"] <= row["dram_budget_bytes"] and trace.exists()
    mtime = (tmp_path / "off" / "model.bin").stat().st_mtime_ns
    assert main(args + ["--method", "dip", *off, "--json", str(out)]) == 0
    assert (tmp_path / "off" / "model.bin").stat().st_mtime_ns == mtime  # reused, its sha256 verified
    capsys.readouterr()


@pytest.mark.parametrize("extra,message", [
    (["--method", "dip-ca"], "dip-ca picks its masks"),
    (["--offload", "OFF", "--dram", "1kB"], "is below the static weights, KV cache and read buffers"),
    (["--offload", "OFF", "--memory", "1MB"], "has no model file yet, and exporting it takes about"),
    (["--engine", "hf", "--offload", "OFF"], "the Hugging Face engine does not offload"),
    (["--engine", "hf", "--weights", "int4"], "the Hugging Face engine runs float32"),
    (["--engine", "lean", "--device", "cuda"], "the lean engine runs on the CPU"),
    (["--memory", "100MB"], "add --offload DIR"),
    (["--density", "1.5"], "outside (0, 1]"),
    (["--offload", "OFF", "--dram", "lots"], "--dram"),
    (["--method", "teal"], "invalid choice"),
])
def test_generate_cli_errors(tiny_checkpoint, tmp_path, capsys, extra, message):
    extra = [str(tmp_path / "off") if a == "OFF" else a for a in extra]
    with pytest.raises(SystemExit) if message == "invalid choice" else _no_exit():
        rc = main(["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "2", "--no-stream", *extra])
        assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    if message != "invalid choice":
        assert len(err) == 1 and err[0].startswith("dipstream: error:")


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_generate_cli_corrupt_model_file(tiny_checkpoint, tmp_path, capsys):
    off = tmp_path / "off"
    base = ["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "2", "--no-stream", "--offload",
            str(off), "--dram", "150kB"]
    assert main(base) == 0
    data = off / "model.bin"
    data.write_bytes(data.read_bytes()[:-512])
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the manifest says" in err[0] and "export the model again" in err[0]


@pytest.mark.parametrize("engine", ["hf", "lean"])
def test_generate_trace_in_memory_replays(tiny_checkpoint, tmp_path, capsys, engine):
    """--trace without --offload: the in-RAM sparse run records its masks (prompt included) as a
    simulator trace whose measured density is the run's; both front ends record the same masks."""
    from dipstream.simulator import load_trace, simulate

    trace = tmp_path / f"t-{engine}.npz"
    assert main(["generate", "--engine", engine, "--model", str(tiny_checkpoint), "--prompt", "the quick brown",
                 "--method", "dip", "--density", "0.5", "--max-new-tokens", "5", "--no-stop-at-eos", "--no-stream",
                 "--trace", str(trace), "--model-dir", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    tr = load_trace(trace)
    P = int(tr.prompt_len[0])
    assert tr.n_tokens == P + 5 - 1 and P > 0  # the last new token is not run through the model
    assert all(h.masks.sum(1).min() > 0 for h in tr.hooks)
    res = simulate(tr, "a18", tr.shape(), dram_bytes="0.8x")
    assert 0.45 < res.density_measured < 0.5


@pytest.mark.parametrize("field,value", [("arch.shape.n_kv_heads", 3), ("arch.layers.0.window", -1),
                                         ("tensors.layers.1.mlp_out.rows", 47), ("size", None)])
def test_tampered_manifest_is_refused(tiny_checkpoint, tmp_path, capsys, field, value):
    off = tmp_path / "off"
    base = ["generate", "--model", str(tiny_checkpoint), "--max-new-tokens", "2", "--no-stream", "--offload", str(off),
            "--dram", "150kB"]
    assert main(base) == 0
    m = json.loads((off / "model.json").read_text())
    keys = field.split(".") if not field.startswith("tensors") else ["tensors", "layers.1.mlp_out", "rows"]
    node = m
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is None:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    (off / "model.json").write_text(json.dumps(m))  # size and sha256 still those of the data
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dipstream: error:") and "export the model again" in err[0]


def test_sampling_is_seeded(tiny_checkpoint, tmp_path):
    """The same seed gives the same sampled tokens, on the engine and on the Hugging Face front end
    alike (one sampler, the same float32 logits); other seeds other tokens."""
    cfg = dict(model=str(tiny_checkpoint), method="dense", prompt="the lazy", max_new_tokens=8,
               stop_at_eos=False, sample=True, temperature=1.5, stream=False, model_dir=str(tmp_path / "m"))
    a = run_generate(flat(GenerateConfig, **cfg, sample_seed=1))["ids"]
    b = run_generate(flat(GenerateConfig, **cfg, sample_seed=1))["ids"]
    hf = run_generate(flat(GenerateConfig, **cfg, sample_seed=1, engine="hf"))["ids"]
    greedy = run_generate(flat(GenerateConfig, **{**cfg, "sample": False}))["ids"]
    others = [run_generate(flat(GenerateConfig, **cfg, sample_seed=s))["ids"] for s in (2, 3)]
    assert a == b == hf and any(o != a for o in others + [greedy])
