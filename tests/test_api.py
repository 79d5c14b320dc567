"""The Python API (`dipstream.api`): an engine loaded once answers many prompts with the same tokens
as `dipstream generate`; streaming, stop strings, the context and bad values; attaching a method to
one's own transformers model and measuring it; the chat loop of `dipstream chat`."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dipstream
from dipstream import DipstreamError
from dipstream.chat_session import ChatConfig, fit_history, run_chat
from dipstream.config import flat
from dipstream.runtime.generate import GenerateConfig, run_generate

PROMPT = "abc def"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api-engine")
    with dipstream.load(str(tiny_checkpoint), method="dip", density=0.5, context=64, model_dir=str(folder)) as e:
        yield e


def _generate_ids(tiny_checkpoint, engine, **kw):
    cfg = flat(GenerateConfig, model=str(tiny_checkpoint), method="dip", density=0.5, prompt=PROMPT, stream=False,
               model_dir=engine.config.file.model_dir, **kw)
    return run_generate(cfg, out=io.StringIO())["ids"]


@pytest.mark.parametrize("sampled", [False, True])
def test_the_engine_gives_generates_tokens(engine, tiny_checkpoint, sampled):
    kw = {"sample": True, "temperature": 0.8, "top_k": 50, "sample_seed": 7} if sampled else {}
    want = _generate_ids(tiny_checkpoint, engine, max_new_tokens=12, stop_at_eos=False, **kw)
    api_kw = {"temperature": 0.8, "top_k": 50, "seed": 7} if sampled else {}
    c = engine.generate(PROMPT, max_tokens=12, ignore_eos=True, **api_kw)
    assert c.ids == want
    assert c.finish_reason == "length" and c.prompt_tokens == engine.count_tokens(PROMPT)
    again = engine.generate(PROMPT, max_tokens=12, ignore_eos=True, **api_kw)  # a second run: a fresh sequence
    assert again.ids == want and again.text == c.text


def test_streamed_pieces_make_the_whole_text(engine):
    pieces = list(engine.stream(PROMPT, max_tokens=16, ignore_eos=True))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.generate(PROMPT, max_tokens=16, ignore_eos=True).text


def test_a_stop_string_ends_the_answer_and_is_left_out(engine):
    full = engine.generate(PROMPT, max_tokens=24, ignore_eos=True).text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2
    pieces = list(engine.stream(PROMPT, max_tokens=24, ignore_eos=True, stop=[stop, "\x00never"]))
    c = engine.last
    assert c.text == full[:full.find(stop)] == "".join(pieces)
    assert c.finish_reason == "stop" and stop not in c.text


def test_top_p_keeps_the_most_likely_tokens():
    import numpy as np

    from dipstream.engine.decode import DecodeOptions, Sampler

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = {Sampler(DecodeOptions(sample=True, top_p=0.7, sample_seed=s))(logits) for s in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the first two
    assert {Sampler(DecodeOptions(sample=True, top_p=0.4, sample_seed=s))(logits) for s in range(50)} == {0}


def test_the_context_bounds_prompt_and_answer(engine):
    c = engine.generate(PROMPT, max_tokens=1000, ignore_eos=True)
    assert c.prompt_tokens + len(c.ids) == engine.context and c.finish_reason == "length"
    with pytest.raises(DipstreamError, match="context holds 64"):
        engine.generate("x" * 200)


@pytest.mark.parametrize("kw,match", [
    ({"max_tokens": 0}, "max-new-tokens 0 must be at least 1"),
    ({"max_tokens": "5"}, "is not an integer"),
    ({"temperature": float("nan")}, "not a finite number"),
    ({"temperature": 0.5, "top_p": 0}, "top-p 0 must be > 0"),
    ({"top_p": 1.5}, "top-p 1.5 must be <= 1"),
    ({"seed": -1}, "out of range"),
    ({"top_k": -2}, "top-k -2 must be at least 0"),
    ({"stop": [""]}, "non-empty strings"),
    ({"prompt": None}, "give a prompt or chat messages"),
    ({"messages": []}, "give a prompt or chat messages"),
])
def test_bad_decoding_values_are_refused_in_one_line(engine, kw, match):
    with pytest.raises(DipstreamError, match=match) as e:
        list(engine.stream(**{"prompt": PROMPT, **kw}))
    assert "\n" not in str(e.value)


def test_load_refuses_bad_options_before_loading():
    with pytest.raises(DipstreamError, match="no field.*'colour'"):
        dipstream.load("smollm2-135m", colour="red")
    with pytest.raises(DipstreamError, match="density"):
        dipstream.load("smollm2-135m", density=1.5)
    with pytest.raises(DipstreamError, match="context"):
        dipstream.load("smollm2-135m", context=1)


def test_import_dipstream_and_the_engine_load_no_torch(tiny_checkpoint, tmp_path):
    code = ("import sys, dipstream\n"
            f"e = dipstream.load({str(tiny_checkpoint)!r}, context=32, model_dir={str(tmp_path)!r})\n"
            "e.generate('ab', max_tokens=2); e.close()\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    subprocess.run([sys.executable, "-c", f"import dipstream; dipstream.load({str(tiny_checkpoint)!r}, "
                    f"model_dir={str(tmp_path)!r}).close()"], check=True)  # the export (uses transformers)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_attach_and_detach_on_ones_own_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = "the quick brown fox jumps over the lazy dog " * 8
    dense = dipstream.perplexity(model, tok, text, seq_len=32)
    ids = torch.tensor([tok(text)["input_ids"][:24]])
    before = model(ids).logits
    sm = dipstream.attach(model, "dip", 0.5)
    try:
        sparse = dipstream.perplexity(model, tok, text, seq_len=32, on_window=sm.method.reset)
        assert 0.3 < sm.stats.mean() < 0.7  # the measured density near the asked one
    finally:
        sm.detach()
    assert sparse != dense
    assert torch.equal(model(ids).logits, before)  # detached: the model is its own again
    with pytest.raises(DipstreamError, match="calibration_ids"):
        dipstream.attach(model, "teal", 0.5)
    with pytest.raises(DipstreamError, match="unknown method"):
        dipstream.attach(model, "nope", 0.5)


# ------------------------------------------------------------------ dipstream chat

class FakeEngine:
    """Counts a chat's tokens as 10 per message (the history's arithmetic by hand)."""

    context = 50

    def count_tokens(self, messages):
        return 10 * len(messages)


def test_history_drops_the_oldest_exchanges_and_keeps_the_system_message():
    sys_msg = {"role": "system", "content": "s"}
    turns = [{"role": r, "content": str(i)} for i in range(3) for r in ("user", "assistant")]
    msgs = [sys_msg, *turns, {"role": "user", "content": "new"}]  # 8 messages: 80 tokens
    kept = fit_history(FakeEngine(), msgs, answer_room=10)  # room for 4 messages
    assert kept == [sys_msg, *turns[4:], msgs[-1]]
    with pytest.raises(DipstreamError, match="does not fit the context of 50"):
        fit_history(FakeEngine(), msgs, answer_room=45)


class Interrupting(io.StringIO):
    """A terminal whose user presses Ctrl-C after the answer's `after`-th piece, once."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.pieces = after, 0

    def write(self, s):
        if s not in ("> ", "\n"):
            self.pieces += 1
            if self.pieces == self.after:
                raise KeyboardInterrupt
        return super().write(s)


TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


def test_chat_keeps_the_session_through_ctrl_c(tiny_checkpoint, engine, tmp_path):
    cfg = flat(ChatConfig, model=str(tiny_checkpoint), model_dir=engine.config.file.model_dir)
    with pytest.raises(DipstreamError, match="no chat template"):
        run_chat(cfg, io.StringIO("hello\n"), io.StringIO(), io.StringIO())
    (Path(engine.config.file.model_dir) / "chat_template.jinja").write_text(TEMPLATE)
    cfg = flat(ChatConfig, model=str(tiny_checkpoint), context=64, max_new_tokens=6,
               model_dir=engine.config.file.model_dir, stop_at_eos=False)
    out, err = Interrupting(after=3), io.StringIO()
    assert run_chat(cfg, io.StringIO("hello\nagain\n/reset\n\n/exit\nnot read\n"), out, err) == 0
    log = err.getvalue()
    assert log.count("[answer stopped]") == 1 and log.count("tokens,") == 1  # the second answer finished
    assert "(conversation forgotten)" in log
    assert out.getvalue().count("> ") == 5


def test_chat_help_and_bad_options():
    r = subprocess.run([sys.executable, "-m", "dipstream.cli.main", "chat", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--system" in r.stdout and "--prompt" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "dipstream.cli.main", "chat", "--context", "1"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "dipstream: error: --context 1" in r.stderr


def test_models_shows_each_models_size_and_needs_without_assembling(tmp_path, monkeypatch, capsys):
    from dipstream.cli.main import main

    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path / "cache"))
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    smol = lines[[i for i, line in enumerate(lines) if line.startswith("smollm2-135m")][0] + 1]
    size = int(re.search(r"file (\d+) MB \(MLP (\d+)%\)", smol).group(1))
    in_ram, least = map(int, re.search(r"about (\d+) MB in RAM, or from about (\d+) MB", smol).groups())
    assert least < size < in_ram
    assert not (tmp_path / "cache" / "gguf").exists()  # a listing assembles no chunked GGUF
