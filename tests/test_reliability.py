"""Reliability and safety: nothing read from a user's folder runs code, processes do not outlive
a killed sweep, stale or damaged state is re-made, one writer per output folder, private caches,
and a small property-based fuzz of the option parsers and file readers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from dipstream.errors import DipstreamError
from tests.conftest import TEXT

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs `Path(marker).touch()`: a stand-in for any code an attacker wants run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ------------------------------------------------------------------------------------ pickles
def test_crafted_checkpoint_cannot_run_code(tmp_path, tiny_checkpoint, capsys):
    from dipstream.cli.main import main
    from dipstream.training.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    out = tmp_path / "ft"
    out.mkdir()
    torch.save({"run_key": Payload(marker), "step": 1}, out / "checkpoint.pt")
    with pytest.raises(DipstreamError, match="unreadable or not a dipstream checkpoint"):
        load_checkpoint(out, {"a": 1})
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    code = main(["finetune", "--model", str(tiny_checkpoint), "--text", str(text), "--train-text", str(text),
                 "--seq-len", "32", "--tokens", "62", "--steps", "2", "--out", str(out)])
    assert code == 2 and "checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_crafted_trace_cannot_run_code(tmp_path):
    from dipstream.simulator import load_trace

    marker = tmp_path / "pwned"
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(marker)
    with open(tmp_path / "t.npz", "wb") as f:
        np.savez(f, format=np.array("dipstream-mask-trace/1"), meta_json=arr, n_tokens=np.array(1),
                 seq_starts=np.array([0]), prompt_len=np.array([0]))
    with pytest.raises(ValueError, match="holds pickled objects, which are never loaded"):
        load_trace(tmp_path / "t.npz")
    assert not marker.exists()


# ------------------------------------------------------------------------------------ processes
def _sweep_config(tmp_path, ckpt) -> Path:
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 20)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"model: {ckpt}\ntext: {text}\nseq_len: 32\ntokens: 2000\nbatch_size: 1\n"
                   "method: dip-ca\ndensity: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]\ngamma: [0.1, 0.2, 0.3]\n")
    return cfg


def _start_sweep(tmp_path, ckpt):
    import psutil

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dipstream.cli.main", "sweep", str(_sweep_config(tmp_path, ckpt)),
                             "--results", str(tmp_path / "r"), "--jobs", "2", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    kids = []
    while time.time() < deadline:
        kids = [k for k in psutil.Process(proc.pid).children(recursive=True)
                if "multiprocessing" in " ".join(k.cmdline())]
        if len(kids) >= 2 and any(p.suffix == ".json" for p in (tmp_path / "r" / "model_runs").glob("*")):
            break
        if proc.poll() is not None:
            pytest.fail(f"sweep ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    assert len(kids) >= 2, "the pool's workers did not start"
    return proc, kids


def _gone(procs, seconds=20.0) -> bool:
    import psutil

    deadline = time.time() + seconds
    while time.time() < deadline:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.3)
    return False


def test_sweep_workers_die_with_a_killed_sweep(tmp_path, tiny_checkpoint):
    proc, kids = _start_sweep(tmp_path, tiny_checkpoint)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    try:
        assert _gone(kids), "pool workers outlived kill -9 of the sweep"
    finally:
        for k in kids:
            try:
                k.kill()
            except Exception:  # noqa: BLE001
                pass


def test_sigterm_stops_a_sweep_cleanly(tmp_path, tiny_checkpoint):
    proc, kids = _start_sweep(tmp_path, tiny_checkpoint)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert _gone(kids)
    # what finished is kept: a dry run sees it done
    rows = (tmp_path / "r" / "results.jsonl").read_text().splitlines() \
        if (tmp_path / "r" / "results.jsonl").exists() else []
    assert all(json.loads(r)["key"] for r in rows)


# ------------------------------------------------------------------------------------ stale state
def test_damaged_stored_trace_is_recorded_again(tmp_path, tiny_checkpoint, capsys):
    from dipstream.experiments.sweep import SweepOptions, run_sweep

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    cfg = tmp_path / "s.yaml"
    base = f"model: {tiny_checkpoint}\ntext: {text}\nseq_len: 32\ntokens: 62\nmethod: dip\n"
    cfg.write_text(base + "dram: 0.6x\n")
    opts = SweepOptions(results=str(tmp_path / "r"), executor="serial", progress=False)
    assert run_sweep(cfg, opts)["finished"] == 1
    (trace,) = (tmp_path / "r" / "traces").glob("*.npz")
    trace.write_bytes(trace.read_bytes()[:200])  # damaged
    cfg.write_text(base + "dram: [0.6x, 0.7x]\n")  # one more replay of the same model run
    s = run_sweep(cfg, opts)
    assert s["finished"] == 1 and s["failed"] == 0 and s["model_runs"] == 1
    assert "damaged; recording it again" in capsys.readouterr().err


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    from dipstream.experiments.results_store import ResultsStore

    root = tmp_path / "r"
    with ResultsStore(root):
        pass
    junk = [root / ".results.csv.abc", root / "traces" / ".k1.npz.xyz", root / "model_runs" / ".k1.json.q"]
    for j in junk:
        j.write_text("half written")
    keep = root / "notes.txt"
    keep.write_text("mine")
    with ResultsStore(root):
        pass
    assert not any(j.exists() for j in junk) and keep.exists()


def test_dry_run_writes_nothing(tmp_path, tiny_checkpoint):
    from dipstream.experiments.sweep import SweepOptions, run_sweep

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"model: {tiny_checkpoint}\ntext: {text}\nseq_len: 32\ntokens: 62\nmethod: dip\n")
    s = run_sweep(cfg, SweepOptions(results=str(tmp_path / "new"), dry_run=True, progress=False))
    assert s["dry_run"] and not (tmp_path / "new").exists()


def test_one_writer_per_folder(tmp_path):
    from dipstream.io import folder_lock

    with folder_lock(tmp_path / "out", "finetune"):
        with pytest.raises(DipstreamError, match="in use by dipstream finetune"):
            with folder_lock(tmp_path / "out", "finetune"):
                pass
    with folder_lock(tmp_path / "out", "finetune"):  # released
        pass


def test_killed_conversion_and_damaged_cache_are_remade(tmp_path, monkeypatch, tiny_checkpoint):
    """A built-in model's cache: leftovers of a killed conversion are removed, a damaged cache
    (a size, or same-size zeroed weights, or an edited config) is converted again, an unwritable
    cache is a one-line error."""
    import shutil

    from dipstream.models import loading

    calls = []

    def fake_convert(builtin, target):  # copies the tiny checkpoint as a "conversion"
        calls.append(target)
        tmp = target.parent / f".{builtin.name}-partial"
        shutil.copytree(tiny_checkpoint, tmp)
        loading.write_cache_marker(tmp, builtin.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)

    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_convert_builtin", fake_convert)
    stale = tmp_path / "cache" / "models" / ".smollm2-135m-abc123"
    stale.mkdir(parents=True)
    lm = loading.load_model("smollm2-135m")
    assert lm.name == "smollm2-135m" and len(calls) == 1 and not stale.exists()
    assert loading.load_model("smollm2-135m") and len(calls) == 1  # cached
    weights = next((tmp_path / "cache" / "models" / "smollm2-135m").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # damaged: sizes no longer match
    loading.load_model("smollm2-135m")
    assert len(calls) == 2
    weights = next((tmp_path / "cache" / "models" / "smollm2-135m").glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-4096:] = bytes(4096)  # same-size damage: zeroed weights
    weights.write_bytes(bytes(raw))
    loading.load_model("smollm2-135m")
    assert len(calls) == 3
    config = tmp_path / "cache" / "models" / "smollm2-135m" / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    loading.load_model("smollm2-135m")
    assert len(calls) == 4  # an edited config is not run: converted again
    assert loading.load_model("smollm2-135m") and len(calls) == 4
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(DipstreamError, match="not writable|not a folder|File exists|cache"):
        loading.load_model("smollm2-135m")


def test_caches_are_private(tmp_path):
    from dipstream import native as _native
    from dipstream.validation import private_dir

    p = private_dir(tmp_path / "a" / "b")
    assert (p.stat().st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(DipstreamError, match="writable by others"):
        private_dir(shared)
    lib, info = _native._try_load(None, shared)
    assert lib is None and "not private" in info["reason"]


# ------------------------------------------------------------------------------------ fuzz
TEXTS = st.one_of(st.text(max_size=30), st.sampled_from(["nan", "inf", "-1", "1e400", "0.5x", "nanx", "-0x",
                                                         "1e400x", "4GB", "1.5GiB", "60GB/s", "5%", "nan%"]))


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_option_parsers_accept_only_finite_values(s):
    from dipstream.reports.headline import Budget
    from dipstream.simulator.hardware import parse_bandwidth, parse_bytes, parse_dram

    for fn in (lambda: parse_dram(s, 1e9), lambda: parse_bytes(s), lambda: parse_bandwidth(s)):
        try:
            v = fn()
        except ValueError:
            continue
        assert math.isfinite(v) and v >= 0
    try:
        b = Budget.parse(s)
    except DipstreamError:
        return
    assert math.isfinite(b.value) and b.value >= 0


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=600), as_zip=st.booleans())
def test_trace_reader_refuses_garbage_with_value_errors(data, as_zip, tmp_path_factory):
    from dipstream.simulator import load_trace

    p = tmp_path_factory.mktemp("fuzz") / "t.npz"
    p.write_bytes((b"PK\x03\x04" + data) if as_zip else data)
    with pytest.raises(ValueError):
        load_trace(p)


JSONS = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                     lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=12), c, max_size=5)),
                     max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(doc=JSONS, fields=st.dictionaries(st.sampled_from(["method", "model", "density", "thresholds"]), JSONS))
def test_thresholds_and_manifests_refuse_garbage_with_one_line_errors(doc, fields, tmp_path_factory):
    from dipstream.engine.modelfile import FORMAT, MANIFEST, read_manifest
    from dipstream.sparsity import build_method
    from dipstream.sparsity.calibration import load_thresholds

    d = tmp_path_factory.mktemp("fuzz")
    (d / "model.bin").write_bytes(bytes(4096))
    for candidate in (doc, {**fields, "format": FORMAT} if isinstance(fields, dict) else fields):
        (d / "th.json").write_text(json.dumps(candidate))
        try:
            load_thresholds(d / "th.json", build_method("cats", 0.6), 2, "m")
        except DipstreamError as e:
            assert "\n" not in str(e)
        (d / MANIFEST).write_text(json.dumps(candidate))
        try:
            read_manifest(d)
        except DipstreamError as e:
            assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200))
def test_hardware_files_refuse_garbage_with_value_errors(text, tmp_path_factory):
    from dipstream.simulator import load_hardware

    p = tmp_path_factory.mktemp("fuzz") / "hw.yaml"
    p.write_text(text)
    try:
        load_hardware(p)
    except ValueError as e:
        assert str(e)


def test_a_replaced_kernel_library_is_rebuilt_not_loaded(tmp_path):
    """A same-owner, private library put in place of the built one (its constructor would run on
    load) does not match the hash its build recorded: it is rebuilt, and the constructor never runs
    (each load in a fresh process: a process does not load one path twice)."""
    import shutil

    build = tmp_path / "kernels"
    build.mkdir(mode=0o700)
    marker = tmp_path / "constructor-ran"
    env = {k: v for k, v in os.environ.items() if k != "DIPSTREAM_NATIVE"}
    load = [sys.executable, "-c", "import sys; from dipstream import native; "
            f"lib = native.load(force=True, build_dir={str(build)!r}); "
            "sys.exit(0 if lib is not None and lib.ds_version() == native.KERNEL_VERSION else 3)"]
    assert subprocess.run(load, env=env).returncode == 0
    so = next(build.glob("*.so"))
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                   f'{{ FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    cc = shutil.which("gcc") or shutil.which("cc")
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    so.chmod(0o700)
    assert subprocess.run(load, env=env).returncode == 0  # rebuilt and loaded
    assert not marker.exists()
    so.with_name(so.name + ".sha256").write_text("0" * 64)  # a record that matches nothing: rebuilt too
    assert subprocess.run(load, env=env).returncode == 0 and not marker.exists()


def test_writes_do_not_follow_links_out_of_their_folder(tmp_path, capsys):
    """A `.lock`, a log appended to, or any entry of a folder dipstream writes in that is a symbolic
    link is refused in one line, and the file it points to is left as it was; an export into a
    folder holding other files is refused too, nothing written."""
    from dipstream.cli.main import main
    from dipstream.io import append_jsonl, folder_lock

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / ".lock").symlink_to(outside)
    with pytest.raises(DipstreamError, match="symbolic link"):
        with folder_lock(locked, "test"):
            pass
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "log.jsonl").symlink_to(outside)
    with pytest.raises(DipstreamError, match="symbolic link"):
        with folder_lock(linked, "test"):
            pass
    with pytest.raises(DipstreamError, match="symbolic link"):
        append_jsonl(linked / "log.jsonl", {"step": 1})
    assert main(["export", "--model-dir", str(locked)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[0]
    assert outside.read_text() == "keep me\n"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    assert main(["export", "--model-dir", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.txt" in err[0] and "new or empty folder" in err[0]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine\n"


def test_sigterm_stops_an_export_cleanly(tmp_path):
    """SIGTERM during `export` (its tensors being written) stops it as Ctrl-C does: exit 130, one
    line, the temporary file removed; the next export of the folder finishes."""
    d = tmp_path / "m"
    cmd = [sys.executable, "-m", "dipstream.cli.main", "export", "--model-dir", str(d)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(d.glob(".model.bin.*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    if proc.returncode == 0:
        pytest.skip("the export finished before the signal landed")
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], lines
    assert not list(d.glob(".model.bin.*")) and not (d / "model.json").exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0 and (d / "model.json").is_file()


def test_concurrent_first_uses_of_one_folder_in_two_formats(tmp_path):
    """Two exports of one new folder in different formats at once: one writes it, the other, once
    the lock is its own, sees what is there now and refuses in one line (no silent reuse)."""
    d = tmp_path / "m"
    procs = [subprocess.Popen([sys.executable, "-m", "dipstream.cli.main", "export", "--model-dir", str(d),
                               "--weights", w], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for w in ("gguf", "int8")]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [e.decode()[-500:] for _, e in outs])
    err = outs[codes.index(2)][1].decode().strip().splitlines()
    assert len(err) == 1 and "use another --model-dir" in err[0]
    manifest = json.loads((d / "model.json").read_text())
    assert manifest["mlp_fmt"] == ("gguf", "int8")[codes.index(0)]


def test_a_damaged_generation_config_is_a_one_line_error(tmp_path):
    from dipstream.engine.text import eos_ids

    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    assert eos_ids(tmp_path, 1) == {1, 2, 7}
    for bad in ("{not json", '{"eos_token_id": "x"}', '{"eos_token_id": [1, -3]}', "[1, 2]"):
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(DipstreamError, match="generation_config.json"):
            eos_ids(tmp_path, 1)


def test_a_trace_hook_name_with_path_characters_is_refused():
    from dipstream.simulator.trace import Hook, MaskTrace

    masks = np.ones((2, 4), bool)
    for name in ("../../etc/passwd", "layers.0/in", "", "x" * 200):
        with pytest.raises(ValueError, match="trace hook name"):
            MaskTrace([Hook(name, "in", 4, 1, masks)])
    assert MaskTrace([Hook("layers.0.in", "in", 4, 1, masks)]).n_tokens == 2


def test_a_killed_exports_temporary_is_removed_by_the_next(tmp_path, capsys):
    """`kill -9` during an export leaves its temporary model file; the next export of the folder
    removes it (holding the folder's lock) and writes the model file."""
    from dipstream.cli.main import main

    d = tmp_path / "m"
    d.mkdir()
    left = d / ".model.bin.abc123"
    left.write_bytes(bytes(1 << 20))
    assert main(["export", "--model-dir", str(d)]) == 0
    assert not left.exists() and (d / "model.json").is_file()


def test_a_sweep_folder_with_links_is_refused(tmp_path):
    from dipstream.experiments.results_store import ResultsStore

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me\n")
    for entry in (".lock", "results.jsonl"):
        root = tmp_path / entry.strip(".")
        root.mkdir()
        (root / entry).symlink_to(outside)
        with pytest.raises(DipstreamError, match="symbolic link"):
            with ResultsStore(root):
                pass
    runs = tmp_path / "runs"
    with ResultsStore(runs):  # a results folder of its own, then a link put in it
        pass
    (runs / "model_runs" / "x.json").symlink_to(outside)
    with pytest.raises(DipstreamError, match="symbolic link"):
        with ResultsStore(runs):
            pass
    assert outside.read_text() == "keep me\n"


@pytest.mark.real
def test_sigterm_during_generate_keeps_the_tokens_made(tmp_path):
    """SIGTERM while `generate` decodes: exit 130, one line on stderr, and its --json row written
    with the tokens made so far, marked interrupted."""
    d, row_file = tmp_path / "m", tmp_path / "row.json"
    assert subprocess.run([sys.executable, "-m", "dipstream.cli.main", "export", "--model-dir", str(d)],
                          capture_output=True).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "dipstream.cli.main", "generate", "--model-dir", str(d),
                             "--max-new-tokens", "4000", "--no-stop-at-eos", "--prompt", "Once upon a time",
                             "--json", str(row_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    streamed = b""
    while len(streamed) < 60 and proc.poll() is None:  # the prompt, then a few tokens streamed
        streamed += proc.stdout.read1(64)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], lines
    row = json.loads(row_file.read_text())
    assert row["interrupted"] is True and 1 <= row["new_tokens"] < 4000 and row["text"]


ARRAYS = st.one_of(
    st.builds(lambda v, kind: np.asarray(v, np.int64).astype(kind), st.lists(st.integers(-5, 70000), max_size=12),
              st.sampled_from(["int64", "int32", "uint8", "bool"])),
    st.builds(lambda v, kind: np.asarray(v, kind), st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                                            max_size=12), st.sampled_from(["float32", "float64"])))


@settings(max_examples=120, deadline=None)
@given(freq=st.dictionaries(st.text(max_size=20), ARRAYS, max_size=3), meta=JSONS)
def test_hot_profiles_refuse_garbage_with_one_line_errors(freq, meta, tmp_path_factory):
    """A profile either loads as finite, non-negative count vectors of hooks' names with its model
    named, or is refused in one line (never a NaN or negative count running)."""
    from dipstream.simulator.policies import load_profile, save_profile
    from dipstream.simulator.trace import HOOK_NAME

    p = tmp_path_factory.mktemp("fuzz") / "p.npz"
    save_profile(p, freq, meta)
    try:
        got, m = load_profile(p)
    except DipstreamError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(m["model"], str) and got
    for name, c in got.items():
        assert HOOK_NAME.fullmatch(name) and c.ndim == 1 and np.isfinite(c).all() and (c >= 0).all()


@settings(max_examples=120, deadline=None)
@given(arrays=st.dictionaries(st.sampled_from(["offsets", "blob", "pair_keys", "pair_rank", "pair_merged",
                                               "sym_chars", "sym_ids"]), ARRAYS),
       meta=st.one_of(JSONS, st.fixed_dictionaries({
           "kind": st.sampled_from(["byte_level", "sentencepiece", "x"]), "vocab_size": st.integers(-1, 300),
           "prefix": st.lists(st.integers(-2, 300), max_size=2), "added": st.just([]),
           "byte_ids": st.none(), "split": st.one_of(st.none(), st.text(max_size=10))})))
def test_lean_tokenizer_files_refuse_garbage_with_one_line_errors(arrays, meta, tmp_path_factory):
    """A lean tokenizer file either loads and encodes to ids inside its vocabulary, or is refused in
    one line (no index error, no crash in the encoder)."""
    from dipstream.engine.text import ARRAYS as NAMES
    from dipstream.engine.text import LEAN_FILE, LeanTokenizer

    d = tmp_path_factory.mktemp("fuzz")
    full = {k: arrays.get(k, np.zeros(0, np.int64)) for k in NAMES}
    with open(d / LEAN_FILE, "wb") as fh:
        np.savez(fh, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **full)
    try:
        lean = LeanTokenizer.load(d)
    except DipstreamError as e:
        assert "\n" not in str(e)
        return
    ids = lean.encode("hello, world 42")
    assert all(0 <= i < lean.V for i in ids)
    lean.decode(ids)


@settings(max_examples=120, deadline=None)
@given(data=st.binary(min_size=0, max_size=400), tensors=st.integers(0, 3), kvs=st.integers(0, 4),
       head=st.sampled_from(["raw", "magic", "header"]))
def test_gguf_files_refuse_garbage_with_one_line_errors(data, tensors, kvs, head, tmp_path_factory):
    """Random bytes, or a GGUF magic / a whole header followed by random bytes: one line."""
    import struct

    from dipstream.engine.gguf_source import GGUFSource

    p = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    prefix = {"raw": b"", "magic": b"GGUF", "header": b"GGUF" + struct.pack("<IQQ", 3, tensors, kvs)}[head]
    p.write_bytes(prefix + data)
    with pytest.raises(DipstreamError) as e:
        GGUFSource(p)
    assert "\n" not in str(e.value)


@settings(max_examples=80, deadline=None)
@given(doc=JSONS)
def test_adapter_descriptions_refuse_garbage_with_one_line_errors(doc, tmp_path_factory):
    from dipstream.models.adapter_folder import META_FILE, read_meta

    d = tmp_path_factory.mktemp("fuzz")
    (d / META_FILE).write_text(json.dumps(doc))
    try:
        meta = read_meta(d)
    except DipstreamError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(meta, dict) and "model" in meta


def test_chat_templates_render_in_a_sandbox(tmp_path):
    """A chat template is data: rendered in jinja2's immutable sandbox as transformers does it;
    reaching Python internals, or setting an underscore name on a namespace, is a one-line error."""
    from dipstream.engine.chat import render_chat

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    t = tmp_path / "chat_template.jinja"
    t.write_text("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | tojson }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}[assistant]{% generation %} {% endgeneration %}{% endif %}")
    assert render_chat(tmp_path, [{"role": "user", "content": "héllo"}]) == '<s>[user] "héllo"</s>[assistant] '
    for evil in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{% set ns = namespace(_x=1) %}",
                 "{{ raise_exception('no') }}", "{% for %}"):
        t.write_text(evil)
        with pytest.raises(DipstreamError) as e:
            render_chat(tmp_path, [{"role": "user", "content": "x"}])
        assert "chat template" in str(e.value) and "\n" not in str(e.value)
    t.unlink()
    with pytest.raises(DipstreamError, match="no chat template"):
        render_chat(tmp_path, [{"role": "user", "content": "x"}])


@settings(max_examples=120, deadline=None)
@given(doc=JSONS)
def test_keep_files_refuse_garbage_with_one_line_errors(doc, tmp_path_factory):
    from dipstream.budget import layer_keeps

    p = tmp_path_factory.mktemp("fuzz") / "keep.json"
    p.write_text(json.dumps(doc))
    try:
        keeps = layer_keeps(0.5, 3, keep_file=str(p))
    except DipstreamError as e:
        assert "\n" not in str(e)
        return
    for i in range(3):
        assert 1 <= keeps.k_in(i, 64) <= 64 and 1 <= keeps.k_out(i, 96) <= 96


@settings(max_examples=150, deadline=None)
@given(doc=st.one_of(JSONS, st.text(max_size=80)))
@example(doc={"ab\ncd": 1})  # a key with a newline, quoted in the refusal (found by CI's fuzz)
def test_sweep_files_refuse_garbage_with_one_line_errors(doc, tmp_path_factory):
    """A sweep config (YAML), and a results folder's manifest (sweep.json): one-line refusals or a
    config / manifest of the expected shape."""
    import yaml

    from dipstream.experiments.results_store import MANIFEST, check_manifest
    from dipstream.experiments.sweep_config import load_sweep

    d = tmp_path_factory.mktemp("fuzz")
    (d / "s.yaml").write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    try:
        cfg, runs = load_sweep(d / "s.yaml")
        assert isinstance(cfg, dict) and isinstance(runs, list)
    except DipstreamError as e:
        assert "\n" not in str(e)
    (d / MANIFEST).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    try:
        assert isinstance(check_manifest(d, create=False), dict)
    except DipstreamError as e:
        assert "\n" not in str(e)


def test_one_sweep_per_results_folder(tmp_path):
    from dipstream.experiments.results_store import ResultsStore

    with ResultsStore(tmp_path / "r"):
        with pytest.raises(DipstreamError, match="in use by dipstream sweep"):
            with ResultsStore(tmp_path / "r"):
                pass
    with ResultsStore(tmp_path / "r"):  # released
        pass
