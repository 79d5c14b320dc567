"""Every subcommand's --help, and a table of bad inputs per subcommand: each must exit 2 with
exactly one `dipstream: error:` line on stderr, no traceback, and leave nothing it had already
computed damaged. Cases are grouped by the categories of the reliability review: non-finite or
out-of-range numbers, unreadable or wrong files, unwritable outputs (refused before any work),
artefacts made for other settings, and combinations that cannot work."""

from __future__ import annotations

import json
import struct

import numpy as np
import subprocess
import sys

import pytest

from dipstream.cli.main import build_parser, main
from tests.conftest import TEXT

COMMANDS = ["eval", "simulate", "finetune", "sweep", "lm-eval", "report", "generate", "export", "probe",
            "serve", "chat", "models", "methods"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: dipstream" in capsys.readouterr().out


HEAVY = ("torch", "transformers")


def _imports_after(argv: list[str]) -> tuple[int, list[str]]:
    """(exit code, the heavy modules imported) of `dipstream ARGV` in a fresh interpreter."""
    code = ("import sys\nfrom dipstream.cli.main import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True).stdout.split("\n")
    rc, mods = out[-2].split(" ", 1)
    return int(rc), eval(mods)


@pytest.mark.parametrize("argv", [[cmd, "--help"] for cmd in COMMANDS] + [
    ["eval", "--density", "1.5"], ["finetune", "--seq-len", "1"], ["simulate", "--dram", "abc"],
    ["generate", "--top-p", "2"], ["serve", "--port", "-5"], ["chat", "--context", "1"], ["eval", "--colour", "red"],
    ["lm-eval", "--limit", "x"], ["eval", "--method", "nope"], ["simulate", "--method", "dip", "--dram", "-1x"],
    ["methods"]], ids=" ".join)
def test_help_and_refusals_import_no_model_stack(argv):
    """Every subcommand's --help, and a refusal that needs no model, come before torch and
    transformers are imported (they take seconds to import)."""
    rc, heavy = _imports_after(argv)
    assert (rc, heavy) == (0 if "--help" in argv or argv[0] == "methods" else 2, [])


def test_every_subcommand_is_listed():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint):
    """Files the cases refer to: a text, a valid trace, an offload folder, bad files of all kinds."""
    d = tmp_path_factory.mktemp("bad")
    (d / "text.txt").write_text(TEXT)
    (d / "a_file").write_text("not a folder")
    # unwritable even for root: a path under a regular file
    files = {
        "ckpt": str(tiny_checkpoint), "text": str(d / "text.txt"), "dir": str(d),
        "ro": str(d / "a_file" / "out.json"), "ro_dir": str(d / "a_file" / "sub"),
        "missing": str(d / "missing.json"),
    }
    # hardware files: syntax error, a directory, a list
    (d / "syntax.yaml").write_text("dram_bw: [60GB/s\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "hwdir.yaml").mkdir()
    # traces: truncated, empty, random bytes, another model's
    trace = d / "t.npz"
    assert main(["simulate", "--model", files["ckpt"], "--text", files["text"], "--seq-len", "32",
                 "--tokens", "62", "--save-trace", str(trace)]) == 0
    (d / "trunc.npz").write_bytes(trace.read_bytes()[:300])
    (d / "empty.npz").write_bytes(b"")
    (d / "random.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    files.update(trace=str(trace), trunc=str(d / "trunc.npz"), empty=str(d / "empty.npz"),
                 random=str(d / "random.npz"))
    # thresholds: strings, nulls, another density
    th = d / "th.json"
    assert main(["eval", "--model", files["ckpt"], "--text", files["text"], "--seq-len", "32", "--tokens", "62",
                 "--method", "cats", "--density", "0.6", "--calib-tokens", "62", "--save-thresholds",
                 str(th)]) == 0
    doc = json.loads(th.read_text())
    for name, value in (("th_str", "high"), ("th_null", None)):
        bad = dict(doc, thresholds={"t": [value] * 2})
        (d / f"{name}.json").write_text(json.dumps(bad))
    files.update(th=str(th), th_str=str(d / "th_str.json"), th_null=str(d / "th_null.json"))
    # adapter folders: without its safetensors, truncated safetensors
    for name in ("noweights", "truncated"):
        a = d / name
        a.mkdir()
        (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
        (a / "dipstream_adapter.json").write_text(json.dumps({"model": "tiny"}))
    (d / "truncated" / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{")
    files.update(noweights=str(d / "noweights"), truncated=str(d / "truncated"))
    # sweep configs
    (d / "results_list.yaml").write_text(f"model: {files['ckpt']}\ntext: {files['text']}\nresults: [a, b]\n"
                                         "method: dense\n")
    (d / "policy.yaml").write_text(f"model: {files['ckpt']}\ntext: {files['text']}\nseq_len: 32\n"
                                   "tokens: 62\npolicy: nosuch\nmethod: dip\n")
    (d / "dram.yaml").write_text(f"model: {files['ckpt']}\ntext: {files['text']}\nseq_len: 32\n"
                                 "tokens: 62\ndram: nanx\nmethod: dip\n")
    (d / "ok.yaml").write_text(f"model: {files['ckpt']}\ntext: {files['text']}\nseq_len: 32\n"
                               "tokens: 62\nmethod: dense\n")
    return files


M = ["--model", "{ckpt}", "--text", "{text}", "--seq-len", "32", "--tokens", "62"]

CASES = [
    # ----------------------------------------------------------------- eval
    ("eval", [*M, "--density", "nan"], "--density nan"),
    ("eval", [*M, "--density", "inf"], "--density inf"),
    ("eval", [*M, "--tokens", "-5"], "--tokens"),
    ("eval", [*M, "--seq-len", "0"], "--seq-len"),
    ("eval", [*M, "--method", "cats", "--density", "0.6", "--calib-tokens", "0"], "--calib-tokens 0"),
    ("eval", [*M, "--json", "{ro}"], "--json"),
    ("eval", [*M, "--json", "{dir}"], "--json"),
    ("eval", [*M, "--method", "cats", "--density", "0.6", "--save-thresholds", "{ro}"], "--save-thresholds"),
    ("eval", [*M, "--method", "cats", "--density", "0.6", "--thresholds", "{th_str}"], "thresholds"),
    ("eval", [*M, "--method", "cats", "--density", "0.6", "--thresholds", "{th_null}"], "thresholds"),
    ("eval", [*M, "--method", "cats", "--density", "0.9", "--thresholds", "{th}"], "density 0.6"),
    ("eval", [*M, "--method", "cats", "--density", "0.6", "--thresholds", "{missing}"], "thresholds"),
    ("eval", [*M, "--adapter", "{noweights}"], "adapter_model.safetensors"),
    ("eval", [*M, "--adapter", "{truncated}"], "adapter"),
    ("eval", [*M, "--adapter", "{missing}"], "adapter"),
    ("eval", [*M, "--text", "{dir}"], "text"),
    ("eval", [*M, "--keep-file", "{dir}"], "keep file"),
    ("eval", [*M, "--up-keep", "nan"], "--up-keep"),
    ("eval", [*M, "--method", "dip-ca"], "dip-ca"),
    ("eval", [*M, "--method", "griffin", "--prompt-frac", "nan"], "--prompt-frac"),
    ("eval", [*M, "--method", "dip-ca", "--gamma", "nan"], "--gamma"),
    # ----------------------------------------------------------------- simulate
    ("simulate", [*M, "--dram", "nanx"], "--dram"),
    ("simulate", [*M, "--dram", "infx"], "--dram"),
    ("simulate", [*M, "--dram", "1e400"], "--dram"),
    ("simulate", [*M, "--dram=-1GB"], "--dram"),
    ("simulate", [*M, "--hardware", "{dir}/syntax.yaml"], "syntax.yaml"),
    ("simulate", [*M, "--hardware", "{dir}/list.yaml"], "list.yaml"),
    ("simulate", [*M, "--hardware", "{dir}/hwdir.yaml"], "hwdir.yaml"),
    ("simulate", [*M, "--policy", "nosuch"], "nosuch"),
    ("simulate", [*M, "--window-k", "0", "--policy", "window"], "window"),
    ("simulate", [*M, "--hot-fraction", "2", "--policy", "hot"], "hot"),
    ("simulate", [*M, "--batch-size", "0"], "--batch-size"),
    ("simulate", [*M, "--hw-set", "flash_bw=nan"], "flash_bw"),
    ("simulate", [*M, "--save-trace", "{ro}"], "--save-trace"),
    ("simulate", [*M, "--json", "{ro}"], "--json"),
    ("simulate", ["--model", "{ckpt}", "--trace", "{trunc}"], "trace"),
    ("simulate", ["--model", "{ckpt}", "--trace", "{empty}"], "trace"),
    ("simulate", ["--model", "{ckpt}", "--trace", "{random}"], "not a mask trace"),
    ("simulate", ["--model", "{ckpt}", "--trace", "{missing}"], "trace"),
    ("simulate", ["--model", "smollm2-135m", "--trace", "{trace}"], "recorded for"),
    # ----------------------------------------------------------------- finetune
    ("finetune", [*M, "--lr", "nan", "--out", "{dir}/ft1"], "--lr"),
    ("finetune", [*M, "--loss", "kd", "--kd-temperature", "nan", "--out", "{dir}/ft2"], "--kd-temperature"),
    ("finetune", [*M, "--grad-clip", "nan", "--out", "{dir}/ft3"], "--grad-clip"),
    ("finetune", [*M, "--steps", "-1", "--out", "{dir}/ft4"], "--steps"),
    ("finetune", [*M, "--out", "{ro_dir}"], "--out"),
    ("finetune", [*M, "--json", "{ro}", "--out", "{dir}/ft5"], "--json"),
    # ----------------------------------------------------------------- sweep
    ("sweep", ["{dir}/results_list.yaml"], "results"),
    ("sweep", ["{dir}/ok.yaml", "--results", "{dir}/a_file"], "--results"),
    ("sweep", ["{dir}/policy.yaml", "--results", "{dir}/sw1"], "nosuch"),
    ("sweep", ["{dir}/dram.yaml", "--results", "{dir}/sw2"], "nanx"),
    ("sweep", ["{dir}/ok.yaml", "--results", "{dir}/sw3", "--jobs", "0"], "--jobs"),
    ("sweep", ["{missing}"], "missing.json"),
    # ----------------------------------------------------------------- lm-eval
    ("lm-eval", [*M, "--tasks", "x", "--limit", "-1"], "--limit"),
    ("lm-eval", [*M, "--tasks", "x", "--limit", "nan"], "--limit"),
    # ----------------------------------------------------------------- report
    ("report", ["{dir}/sw_none"], "no results"),
    ("report", ["{dir}", "--ppl-budget", "nan"], "--ppl-budget"),
    # ----------------------------------------------------------------- generate
    ("generate", ["--model", "{ckpt}", "--threads", "-1"], "--threads"),
    ("generate", ["--model", "{ckpt}", "--max-new-tokens", "-1"], "--max-new-tokens"),
    ("generate", ["--model", "{ckpt}", "--sample", "--temperature", "nan"], "--temperature"),
    ("generate", ["--model", "{ckpt}", "--sample", "--top-k", "-1"], "--top-k"),
    ("generate", ["--model", "{ckpt}", "--density", "nan"], "--density"),
    ("generate", ["--model", "{ckpt}", "--method", "dense", "--trace", "{dir}/g.npz"], "--trace"),
    ("generate", ["--model", "{ckpt}", "--offload", "{dir}/off", "--dram", "nanx"], "--dram"),
    ("generate", ["--model", "{ckpt}", "--offload", "{dir}/off", "--io-threads", "0"], "--io-threads"),
    ("generate", ["--model", "{ckpt}", "--json", "{ro}"], "--json"),
    ("generate", ["--model", "{ckpt}", "--trace", "{ro}"], "--trace"),
    ("generate", ["--model", "{ckpt}", "--engine", "lean", "--adapter", "{noweights}"], "adapter_model.safetensors"),
    ("generate", ["--model", "{ckpt}", "--engine", "lean", "--device", "cuda"], "runs on the CPU"),
    ("generate", ["--model", "{ckpt}", "--memory", "100MB"], "add --offload DIR"),
    ("generate", ["--model", "{ckpt}", "--engine", "hf", "--memory", "100MB"], "--memory"),
    ("generate", ["--model", "{ckpt}", "--memory", "lots"], "--memory"),
    ("generate", ["--model", "{ckpt}", "--read-gap", "nan"], "--read-gap"),
    ("generate", ["--model", "{ckpt}", "--engine", "hf", "--offload", "{dir}/off", "--weights", "int4"],
     "does not offload"),
    ("generate", ["--model", "{ckpt}", "--engine", "hf", "--weights", "int8"], "runs float32"),
    ("generate", ["--model", "{ckpt}", "--offload", "{dir}/lean1", "--memory", "1MB"], "export it once where that much is free (`dipstream export --model"),
    ("generate", ["--model", "{ckpt}", "--offload", "{dir}/lean2", "--dram", "1KB"], "give more than"),
    ("generate", ["--model", "{ckpt}", "--offload", "{dir}/lean3", "--memory", "1e30B"], "--memory 1e30B is out of range"),
    ("generate", ["--model", "{ckpt}", "--offload", "{dir}/lean3", "--dram", "1e40"], "--dram 1e40 is out of range"),
    ("generate", ["--model", "{ckpt}", "--offload", "{dir}/lean3", "--read-gap", "1e30"], "--read-gap 1e30 is out of range"),
    ("generate", ["--model", "{ckpt}", "--sample-seed", "-1"], "--sample-seed -1 is out of range"),
    ("generate", ["--model", "{ckpt}", "--offload", "{dir}/lean3", "--model-dir", "{dir}/lean4"], "same folder as --model-dir"),
    ("generate", ["--model", "{ckpt}", "--model-dir", "{ro_dir}"], "--model-dir"),
    # ----------------------------------------------------------------- export
    ("export", ["--model", "{ckpt}", "--model-dir", "{ro_dir}"], "--model-dir"),
    ("export", ["--model", "{missing}"], "missing.json"),
    ("export", ["--model", "{ckpt}", "--model-dir", "{dir}/e1", "--memory", "lots"], "--memory: cannot parse"),
    ("export", ["--model", "{ckpt}", "--model-dir", "{dir}/e2", "--memory", "1MB"], "give --memory"),
    # ----------------------------------------------------------------- probe
    ("probe", ["--size", "0"], "--size"),
    ("probe", ["--chunks", "0"], "--chunks"),
    ("probe", ["--ram-mb", "0"], "--ram-mb"),
    ("probe", ["--gemv-shape", "0x0"], "--gemv-shape"),
    ("probe", ["--seq-chunk", "0"], "--seq-chunk"),
    ("probe", ["--out", "{ro}"], "--out"),
]


def _fmt(args, files):
    return [a.format(**files) for a in args]


@pytest.mark.parametrize("cmd,args,needle", CASES, ids=[f"{c[0]}:{' '.join(c[1][-2:])}" for c in CASES])
def test_bad_input_is_one_line_and_exit_2(env, capsys, cmd, args, needle):
    code = main([cmd, *_fmt(args, env)])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("dipstream: error: ")]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert needle.format(**env) in errors[0], errors[0]


def test_unexpected_errors_are_one_line_with_debug_hint(monkeypatch, capsys):
    import dipstream.cli.main as cli

    def boom(ns):
        raise RuntimeError("something internal\nsecond line")

    monkeypatch.setattr(cli, "cmd_models", boom)
    monkeypatch.delenv("DIPSTREAM_DEBUG", raising=False)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert "internal error" in err and "DIPSTREAM_DEBUG=1" in err
    monkeypatch.setenv("DIPSTREAM_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["models"])


def test_os_errors_are_one_line(monkeypatch, capsys):
    import dipstream.cli.main as cli

    def full(ns):
        raise OSError(28, "No space left on device", "/x/y")

    monkeypatch.setattr(cli, "cmd_models", full)
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err and "/x/y" in err
