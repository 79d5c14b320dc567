"""`dipstream lm-eval`: lm-evaluation-harness scores the sparse model, offline, on a local task."""

import json
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from dipstream.cli.main import main  # noqa: E402
from dipstream.experiments.lm_eval import LmEvalConfig, run_lm_eval  # noqa: E402
from dipstream.experiments.evaluate import EvalConfig  # noqa: E402
from dipstream.models import load_model  # noqa: E402
from dipstream.sparsity import attach, build_method  # noqa: E402
from tests.conftest import TEXT  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval"


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection is recorded and refused."""
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.chdir(TASKS)  # the task's data_files path is relative
    return attempts


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as lm-eval's HF wrapper does (pair split of the whole)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_lm_eval_scores_the_sparse_model_offline(tiny_checkpoint, tmp_path, offline):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    ev = EvalConfig(model=str(tiny_checkpoint), method="dip", density=0.5, text=str(text), seq_len=32)
    row = run_lm_eval(LmEvalConfig(tasks="dipstream_tiny_mc", include_path=str(TASKS), builtin_tasks=False,
                                   eval=ev), log_samples=True)
    assert offline == []
    assert row["method"] == "dip" and 0.4 < row["density_measured"] < 0.55
    samples = row["samples"]["dipstream_tiny_mc"]
    assert len(samples) == 6
    # lm-eval's loglikelihoods are those of the DIP model (recomputed here), not the dense model's
    lm = load_model(str(tiny_checkpoint))
    dense = [[_loglikelihood(lm.model, lm.tokenizer, *a) for a in s["arguments"]] for s in samples]
    sm = attach(lm.model, build_method("dip", 0.5))
    sparse = [[_loglikelihood(lm.model, lm.tokenizer, *a) for a in s["arguments"]] for s in samples]
    sm.detach()
    got = [r[0][0] for s in samples for r in s["resps"]]
    assert got == pytest.approx([x for s in sparse for x in s], abs=1e-4)
    assert max(abs(a - b) for a, b in zip(got, [x for d in dense for x in d])) > 1e-3
    acc = sum(max(range(len(s)), key=s.__getitem__) == smp["target"] for s, smp in zip(sparse, samples)) / 6
    assert row["scores"]["dipstream_tiny_mc"]["acc"] == pytest.approx(acc)


def test_lm_eval_cli(tiny_checkpoint, tmp_path, offline, capsys):
    text, out = tmp_path / "t.txt", tmp_path / "out.json"
    text.write_text(TEXT)
    common = ["lm-eval", "--model", str(tiny_checkpoint), "--text", str(text), "--seq-len", "32",
              "--include-path", str(TASKS), "--no-builtin-tasks"]
    assert main([*common, "--method", "dense", "--tasks", "dipstream_tiny_mc", "--json", str(out)]) == 0
    assert "dipstream_tiny_mc" in capsys.readouterr().out
    assert json.loads(out.read_text())["scores"]["dipstream_tiny_mc"]["sample_len"] == 6
    assert main([*common, "--method", "dip", "--tasks", "dipstream_tiny"]) == 2
    assert "did you mean 'dipstream_tiny_mc'?" in capsys.readouterr().err
    assert main([*common, "--method", "dip-ca", "--tasks", "dipstream_tiny_mc"]) == 2
    assert "simulated DRAM cache" in capsys.readouterr().err
    assert offline == []
