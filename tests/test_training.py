"""`dipstream finetune` on a tiny local checkpoint: round trips, resume, predictors, bad input."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from dipstream.cli.main import main
from dipstream.errors import DipstreamError
from dipstream.experiments import EvalConfig, run_eval
from dipstream.training import FinetuneConfig, TrainOptions, run_finetune
from dipstream.training.predictor_train import threshold_scores, topk_recall

SEQ = 32


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = "the quick brown fox jumps over the lazy dog pack my box with five dozen jugs".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)))
    return path


def _cfg(ckpt, text, out, method="dip", density=0.5, **train):
    opts = dict(out=str(out), steps=6, val_every=2, train_text=str(text), val_tokens=2 * (SEQ - 1),
                lr=1e-2, warmup_steps=1, lora_rank=4)
    opts.update(train)
    return FinetuneConfig(EvalConfig(model=str(ckpt), method=method, density=density, text=str(text),
                                     seq_len=SEQ, tokens=4 * (SEQ - 1)), TrainOptions(**opts))


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


class Crash(Exception):
    pass


def _crash_at(n, exc=Crash):
    def hook(step):
        if step == n:
            raise exc()
    return hook


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "dip"
    return out, run_finetune(_cfg(tiny_checkpoint, text_file, out))


def test_finetune_trains_and_round_trips(finished, tiny_checkpoint, text_file):
    out, row = finished
    assert row["steps_done"] == 6 and row["adapter_weights"] > 0
    assert row["perplexity_before"] != row["perplexity_after"]
    assert any(abs(float(t.abs().sum())) > 0 for k, t in _weights(out).items() if "lora_B" in k)
    # the saved adapter, loaded by `eval --adapter`, gives exactly the trained model's perplexity
    ev = run_eval(EvalConfig(model=str(tiny_checkpoint), method="dip", density=0.5, text=str(text_file),
                             seq_len=SEQ, tokens=4 * (SEQ - 1), adapter=str(out)))
    assert ev["perplexity"] == row["perplexity_after"]
    assert ev["adapter_weights"] == row["adapter_weights"]
    # and without the adapter, the sparse model's perplexity from before training
    base = run_eval(EvalConfig(model=str(tiny_checkpoint), method="dip", density=0.5, text=str(text_file),
                               seq_len=SEQ, tokens=4 * (SEQ - 1)))
    assert base["perplexity"] == row["perplexity_before"]
    meta = json.loads((out / "dipstream_adapter.json").read_text())
    assert meta["method"] == "dip" and meta["result"]["perplexity_after"] == row["perplexity_after"]


def test_finished_run_is_reported_not_retrained(finished, tiny_checkpoint, text_file):
    out, row = finished
    again = run_finetune(_cfg(tiny_checkpoint, text_file, out))
    assert again["resumed"] == "already finished"
    assert again["perplexity_after"] == row["perplexity_after"]


def test_finished_run_that_lost_its_adapter_is_not_reported(finished, tiny_checkpoint, text_file, tmp_path):
    import shutil

    out, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(DipstreamError, match="has lost adapter_model.safetensors; pass --restart"):
        run_finetune(_cfg(tiny_checkpoint, text_file, copy))
    # and eval refuses the folder rather than running without the adapter
    with pytest.raises(DipstreamError, match="has no adapter_model.safetensors"):
        run_eval(EvalConfig(model=str(tiny_checkpoint), text=str(text_file), seq_len=SEQ, tokens=SEQ - 1,
                            adapter=str(copy)))


def test_two_finetunes_into_one_folder(tiny_checkpoint, text_file, tmp_path):
    from dipstream.io import folder_lock

    out = tmp_path / "busy"
    with folder_lock(out, "finetune"):  # another finetune holds the folder
        with pytest.raises(DipstreamError, match="in use by dipstream finetune"):
            run_finetune(_cfg(tiny_checkpoint, text_file, out))
    assert not (out / "log.jsonl").exists()


@pytest.mark.parametrize("crash, at", [(KeyboardInterrupt, 3), (Crash, 5)])
def test_interrupted_run_resumes_to_the_same_adapter(finished, tiny_checkpoint, text_file, tmp_path, crash, at):
    """Ctrl-C checkpoints the current step; a hard crash loses only the steps since the last
    validation. Either way the resumed run ends with bit-identical adapter weights."""
    ref, row = finished
    out = tmp_path / "resumed"
    with pytest.raises(crash):
        run_finetune(_cfg(tiny_checkpoint, text_file, out), on_step=_crash_at(at, crash))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == (at if crash is KeyboardInterrupt else 4)
    steps_seen = []
    resumed = run_finetune(_cfg(tiny_checkpoint, text_file, out), on_step=steps_seen.append)
    assert steps_seen == list(range(state["step"] + 1, 7))
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["perplexity_after"] == row["perplexity_after"]


def test_checkpoint_of_another_run_is_refused(finished, tiny_checkpoint, text_file, tmp_path):
    out = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt):
        run_finetune(_cfg(tiny_checkpoint, text_file, out), on_step=_crash_at(1, KeyboardInterrupt))
    with pytest.raises(DipstreamError, match="different run.*lora_rank"):
        run_finetune(_cfg(tiny_checkpoint, text_file, out, lora_rank=8))
    row = run_finetune(_cfg(tiny_checkpoint, text_file, out, lora_rank=8, restart=True))
    assert row["lora_rank"] == 8


def test_adapter_for_another_model_or_rank_is_refused(finished, tiny_checkpoint, text_file, tmp_path, capsys):
    out, _ = finished
    # another model: same architecture, other shape
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import TINY, _byte_tokenizer

    other = tmp_path / "wider"
    AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "vocab_size": 300, "intermediate_size": 64},
                                                 hidden_act="silu")).save_pretrained(other)
    _byte_tokenizer().save_pretrained(other)
    rc = main(["eval", "--model", str(other), "--method", "dip", "--text", str(text_file), "--seq-len",
               str(SEQ), "--tokens", str(SEQ - 1), "--adapter", str(out)])
    assert rc == 2 and "another shape" in capsys.readouterr().err
    # another rank: the adapter's config says rank 8, its weights are rank 4
    import shutil

    bad = tmp_path / "bad-rank"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    rc = main(["eval", "--model", str(tiny_checkpoint), "--method", "dip", "--text", str(text_file),
               "--seq-len", str(SEQ), "--tokens", str(SEQ - 1), "--adapter", str(bad)])
    assert rc == 2 and "another model or rank" in capsys.readouterr().err
    rc = main(["eval", "--model", str(tiny_checkpoint), "--text", str(text_file), "--seq-len", str(SEQ),
               "--tokens", str(SEQ - 1), "--adapter", str(tmp_path)])
    assert rc == 2 and "not an adapter folder" in capsys.readouterr().err
    # NaN weights (a diverged run): refused, not a perplexity of nan
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan"
    shutil.copytree(out, nan)
    weights = load_file(nan / "adapter_model.safetensors")
    first = next(iter(weights))
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, nan / "adapter_model.safetensors")
    rc = main(["eval", "--model", str(tiny_checkpoint), "--method", "dip", "--text", str(text_file),
               "--seq-len", str(SEQ), "--tokens", str(SEQ - 1), "--adapter", str(nan)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "non-finite weights" in err[0]


def test_bad_requests_fail_before_training(tiny_checkpoint, text_file, tmp_path, monkeypatch):
    with pytest.raises(DipstreamError, match="nothing to recover|no sparsity to recover"):
        run_finetune(_cfg(tiny_checkpoint, text_file, tmp_path / "a", method="dense", density=1.0))
    with pytest.raises(DipstreamError, match="lower --steps"):
        run_finetune(_cfg(tiny_checkpoint, text_file, tmp_path / "b", steps=100000))
    with pytest.raises(DipstreamError, match="applies to drelu"):
        run_finetune(_cfg(tiny_checkpoint, text_file, tmp_path / "c", act_l1=0.1))
    import dipstream.training.finetune as ft

    monkeypatch.setattr(ft, "available_bytes", lambda device: 100_000)
    with pytest.raises(DipstreamError, match="lower --batch-size"):
        run_finetune(_cfg(tiny_checkpoint, text_file, tmp_path / "d"))
    assert not (tmp_path / "d" / "checkpoint.pt").exists()
    with pytest.raises(DipstreamError, match="density"):  # checked before collecting and training
        run_finetune(_cfg(tiny_checkpoint, text_file, tmp_path / "e", method="predictor", density=1.5,
                          predictor_tokens=4 * (SEQ - 1), predictor_epochs=1, predictor_rank=2))
    assert not (tmp_path / "e" / "checkpoint.pt").exists()


def test_memory_estimate_grows_with_batch_and_distillation():
    from dipstream.models.arch import ModelInfo
    from dipstream.simulator import ModelShape
    from dipstream.training.memory import estimate_step_bytes

    info = ModelInfo("llama", ModelShape(30, 576, 1536, 49152, 9, 3, True), 8192, "silu")
    one = estimate_step_bytes(info, 0, 3_000_000, 1, 512, kd=False)
    assert estimate_step_bytes(info, 0, 3_000_000, 2, 512, kd=False) > 1.9 * (one - 36e6)
    assert estimate_step_bytes(info, 0, 3_000_000, 1, 512, kd=True) > one


def test_drelu_finetune_with_activation_penalty(tiny_checkpoint, text_file, tmp_path):
    row = run_finetune(_cfg(tiny_checkpoint, text_file, tmp_path / "drelu", method="drelu", density=1.0,
                            act_l1=0.5, loss="ce"))
    assert row["method"] == "drelu" and 0 < row["density_measured"] < 1
    ev = run_eval(EvalConfig(model=str(tiny_checkpoint), method="drelu", density=1.0, text=str(text_file),
                             seq_len=SEQ, tokens=4 * (SEQ - 1), adapter=str(tmp_path / "drelu")))
    assert ev["perplexity"] == row["perplexity_after"]


def test_predictor_training_and_reuse(tiny_checkpoint, text_file, tmp_path):
    out = tmp_path / "pred"
    row = run_finetune(_cfg(tiny_checkpoint, text_file, out, method="predictor", predictor_tokens=20 * (SEQ - 1),
                            predictor_epochs=3, predictor_rank=8))
    assert row["predictor_weights"] == 2 * (32 * 8 + 8 * 48 + 48)
    assert len(row["recall_at_k_per_layer"]) == 2 and 0 < row["recall_at_k"] <= 1
    assert row["density_measured"] == pytest.approx(0.5)
    ev = run_eval(EvalConfig(model=str(tiny_checkpoint), method="predictor", density=0.5, text=str(text_file),
                             seq_len=SEQ, tokens=4 * (SEQ - 1), adapter=str(out)))
    assert ev["perplexity"] == row["perplexity_after"] and ev["predictor_weights"] == row["predictor_weights"]
    # another method with the same folder neither reads the predictors nor is charged for them
    dip = run_eval(EvalConfig(model=str(tiny_checkpoint), method="dip", density=0.5, text=str(text_file),
                              seq_len=SEQ, tokens=4 * (SEQ - 1), adapter=str(out)))
    assert "predictor_weights" not in dip
    with pytest.raises(DipstreamError, match="needs trained predictors"):
        run_eval(EvalConfig(model=str(tiny_checkpoint), method="predictor", text=str(text_file), seq_len=SEQ,
                            tokens=SEQ - 1))


def test_recall_against_real_topk():
    targets = torch.tensor([[True, True, False, False], [False, True, True, False]])
    logits = torch.tensor([[0.9, -0.1, 0.8, -2.0], [0.0, 5.0, 4.0, -1.0]])
    # row 0 predicts {0, 2}: 1 of 2 right; row 1 predicts {1, 2}: 2 of 2
    assert topk_recall(logits, targets, 2) == pytest.approx(3 / 4)
    # logit > 0: row 0 predicts {0, 2} (1 right), row 1 predicts {1, 2} (2 right): 3 of 4 predicted
    assert threshold_scores(logits, targets) == pytest.approx((3 / 4, 3 / 4))
    h = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)).abs()
    from dipstream.selection import topk_mask

    assert topk_recall(h, topk_mask(h, 10), 10) == 1.0


def test_simulate_counts_adapter_weights_as_static_dram(finished, tiny_checkpoint, text_file):
    from dipstream.experiments.simulate import SimConfig, SimulateConfig, run_simulate

    out, row = finished
    rows = {}
    for adapter in (None, str(out)):
        for method in ("dip", "dip-ca"):
            ev = EvalConfig(model=str(tiny_checkpoint), method=method, density=0.5, text=str(text_file),
                            seq_len=SEQ, tokens=4 * (SEQ - 1), adapter=adapter)
            rows[adapter, method] = run_simulate(SimulateConfig(ev, SimConfig(dram="0.6x", policy="lru")))
    plain, adapted = rows[None, "dip"], rows[str(out), "dip"]
    assert adapted["perplexity"] == pytest.approx(row["perplexity_after"], rel=1e-5)  # batched: rounding
    # adapters (fp16 on the a18 preset) are read from DRAM every token: more bytes, fewer tokens/s
    extra = adapted["dram_bytes_per_token"] + adapted["flash_bytes_per_token"] \
        - plain["dram_bytes_per_token"] - plain["flash_bytes_per_token"]
    assert extra > 0 and adapted["tokens_per_s"] < plain["tokens_per_s"]
    assert rows[str(out), "dip-ca"]["adapter_weights"] == row["adapter_weights"]


def test_generate_with_a_finetuned_adapter(finished, tiny_checkpoint, tmp_path, capsys):
    from dipstream.config import flat
    from dipstream.runtime.generate import GenerateConfig, run_generate

    out, row = finished
    got = run_generate(flat(GenerateConfig, model=str(tiny_checkpoint), adapter=str(out), max_new_tokens=4,
                            stop_at_eos=False, stream=False, prompt="the quick"))
    assert got["adapter_weights"] == row["adapter_weights"] and got["new_tokens"] == 4 and got["engine"] == "lean"
    # the adapters merged into the engine's file run offloaded too, to the same tokens
    off = run_generate(flat(GenerateConfig, model=str(tiny_checkpoint), adapter=str(out), max_new_tokens=4,
                            stop_at_eos=False, stream=False, prompt="the quick", offload=str(tmp_path / "off"),
                            dram="1x"))
    assert off["ids"] == got["ids"] and off["adapter"] == got["adapter"]


@pytest.mark.parametrize("name", ["drelu-predicted", "relufied-predicted"])
def test_predictors_of_the_zeros_train_and_evaluate(tiny_checkpoint, text_file, tmp_path, name):
    out = tmp_path / name
    row = run_finetune(_cfg(tiny_checkpoint, text_file, out, method=name, density=1.0,
                            predictor_tokens=20 * (SEQ - 1), predictor_epochs=3, predictor_rank=8))
    assert row["method"] == name and 0 < row["recall"] <= 1 and 0 < row["precision"] <= 1
    assert row["density_with_predictor"] == pytest.approx(
        row["density_measured"] + row["predictor_weights"] / (3 * 2 * 32 * 48))
    ev = run_eval(EvalConfig(model=str(tiny_checkpoint), method=name, density=1.0, text=str(text_file),
                             seq_len=SEQ, tokens=4 * (SEQ - 1), adapter=str(out)))
    assert ev["perplexity"] == row["perplexity_after"] and ev["skipping"] == "predicted"
    assert ev["density_with_predictor"] == pytest.approx(row["density_with_predictor"])
    oracle = run_eval(EvalConfig(model=str(tiny_checkpoint), method=name.removesuffix("-predicted"), density=1.0,
                                 text=str(text_file), seq_len=SEQ, tokens=4 * (SEQ - 1)))
    assert "density_with_predictor" not in oracle


def test_predictors_train_on_a_lora_tuned_swap(tiny_checkpoint, text_file, tmp_path):
    """`finetune --method relufied-predicted --adapter LORA`: the predictors learn the zeros of the
    adapted model; the folder holds the LoRA files beside them and `eval --adapter` applies both
    (the same perplexity as at the end of training, and not the untuned model's)."""
    lora = tmp_path / "lora"
    run_finetune(_cfg(tiny_checkpoint, text_file, lora, method="relufied", density=1.0))
    cfg = _cfg(tiny_checkpoint, text_file, tmp_path / "pred", method="relufied-predicted", density=1.0,
               predictor_tokens=20 * (SEQ - 1), predictor_epochs=3, predictor_rank=8)
    cfg.eval.adapter = str(lora)
    row = run_finetune(cfg)
    assert row["base_adapter"] == str(lora) and row["adapter_weights"] > 0
    folder = tmp_path / "pred"
    assert {"adapter_model.safetensors", "adapter_config.json", "predictor.safetensors"} <= \
        {p.name for p in folder.iterdir()}
    ev = run_eval(EvalConfig(model=str(tiny_checkpoint), method="relufied-predicted", density=1.0, text=str(text_file),
                             seq_len=SEQ, tokens=4 * (SEQ - 1), adapter=str(folder)))
    assert ev["perplexity"] == row["perplexity_after"] and ev["adapter_weights"] == row["adapter_weights"]
    plain = run_finetune(_cfg(tiny_checkpoint, text_file, tmp_path / "plain", method="relufied-predicted",
                              density=1.0, predictor_tokens=20 * (SEQ - 1), predictor_epochs=3, predictor_rank=8))
    assert plain["perplexity_after"] != row["perplexity_after"]
    with pytest.raises(DipstreamError, match="--adapter is for eval and simulate"):
        bad = _cfg(tiny_checkpoint, text_file, tmp_path / "x", method="dip")
        bad.eval.adapter = str(lora)
        run_finetune(bad)
    with pytest.raises(DipstreamError, match="holds no LoRA adapters"):
        cfg2 = _cfg(tiny_checkpoint, text_file, tmp_path / "y", method="relufied-predicted", density=1.0,
                    predictor_tokens=20 * (SEQ - 1), predictor_epochs=1, predictor_rank=8)
        cfg2.eval.adapter = str(tmp_path / "plain")  # predictors only
        run_finetune(cfg2)
