"""`dipstream sweep`: model runs shared across devices, resume after crashes, bad configs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dipstream.cli.main import main
from dipstream.experiments import simulate as simulate_mod
from dipstream.experiments import sweep_tasks
from dipstream.experiments.evaluate import EvalConfig
from dipstream.experiments.simulate import SimConfig, SimulateConfig, run_simulate
from dipstream.experiments.sweep import SweepOptions, plan, run_sweep
from dipstream.io import read_jsonl
from dipstream.sparsity import MethodOptions
from tests.conftest import TEXT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def text_file(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    return f


def write_config(path, ckpt, text, body: str) -> Path:
    path.write_text(f"model: {ckpt}\ntext: {text}\nseq_len: 32\ntokens: 124\nbatch_size: 2\n{body}")
    return path


@pytest.fixture
def count_model_runs(monkeypatch):
    calls = []
    real = simulate_mod.evaluate_and_record

    def counting(ev, sim, shape, progress):
        calls.append((ev.method, ev.density, ev.options.gamma, sim.dram))
        return real(ev, sim, shape, progress)

    monkeypatch.setattr(sweep_tasks, "evaluate_and_record", counting)
    return calls


def rows_of(results):
    return read_jsonl(Path(results) / "results.jsonl")


def test_two_hardware_settings_run_the_model_once(tiny_checkpoint, text_file, tmp_path, count_model_runs):
    cfg = write_config(tmp_path / "s.yaml", tiny_checkpoint, text_file,
                       "method: dip\ndensity: 0.5\ndram: 0.6x\nhardware: [a18, laptop]\n")
    s = run_sweep(cfg, SweepOptions(results=str(tmp_path / "r"), executor="serial", progress=False))
    assert len(count_model_runs) == 1 and s["model_runs"] == 1 and s["finished"] == 2
    a18, laptop = sorted(rows_of(tmp_path / "r"), key=lambda r: r["hardware"])
    assert (a18["hardware"], laptop["hardware"]) == ("a18", "laptop")
    assert a18["perplexity"] == laptop["perplexity"] and a18["model_run"] == laptop["model_run"]
    assert laptop["tokens_per_s"] > a18["tokens_per_s"]  # 7 GB/s Flash vs 1 GB/s
    assert a18["trace_shared"] and laptop["hw.flash_bw"] == 7e9
    assert len(list((tmp_path / "r" / "traces").glob("*.npz"))) == 1
    # finished runs are skipped on re-run
    again = run_sweep(cfg, SweepOptions(results=str(tmp_path / "r"), executor="serial", progress=False))
    assert again["done_before"] == 2 and again["finished"] == 0 and len(count_model_runs) == 1
    assert len(rows_of(tmp_path / "r")) == 2
    # the replayed figures are those of a direct `simulate` run of the same configuration
    direct = run_simulate(SimulateConfig(
        EvalConfig(model=str(tiny_checkpoint), method="dip", density=0.5, text=str(text_file), seq_len=32,
                   tokens=124), SimConfig(hardware="laptop", dram="0.6x", batch_size=2)))
    for k in ("perplexity", "tokens_per_s", "hit_rate", "flash_bytes_per_token", "dram_used_bytes"):
        assert laptop[k] == pytest.approx(direct[k], rel=1e-12)


def test_dip_ca_reuses_masks_only_when_the_cache_is_the_same(tiny_checkpoint, text_file, tmp_path,
                                                               count_model_runs):
    """Closed loop: a new DRAM size changes the cache capacities, hence the masks (new model run);
    a new Flash bandwidth changes no mask (replayed). Replays equal direct closed-loop runs."""
    cfg = write_config(tmp_path / "s.yaml", tiny_checkpoint, text_file,
                       "method: dip-ca\ndensity: 0.5\ngamma: 0.05\ndram: [0.6x, 0.8x]\n"
                       "hw_set: [null, flash_bw=3GB/s]\n")
    s = run_sweep(cfg, SweepOptions(results=str(tmp_path / "r"), executor="serial", progress=False))
    assert s["finished"] == 4 and len(count_model_runs) == 2
    assert sorted(c[3] for c in count_model_runs) == ["0.6x", "0.8x"]
    rows = rows_of(tmp_path / "r")
    for row in rows:
        direct = run_simulate(SimulateConfig(
            EvalConfig(model=str(tiny_checkpoint), method="dip-ca", density=0.5, text=str(text_file),
                       seq_len=32, tokens=124, options=MethodOptions(gamma=0.05)),
            SimConfig(dram=row["config.dram"], hw_set=row["config.hw_set"], batch_size=2)))
        for k in ("perplexity", "tokens_per_s", "hit_rate", "flash_bytes_per_token"):
            assert row[k] == pytest.approx(direct[k], rel=1e-12), k


def test_dip_ca_with_an_adapter_is_keyed_by_the_caches_its_model_run_uses(tiny_checkpoint, text_file, tmp_path,
                                                                         monkeypatch):
    """A LoRA adapter's weights sit in DRAM and shrink the caches: the sweep keys the model run by
    the capacities that run then gives DIP-CA (with the adapter's weights), not those without."""
    from dipstream.experiments.sweep_tasks import record_task
    from dipstream.models import load_model
    from dipstream.models.adapters import LoraSettings, add_lora, count_lora_weights, lora_weights_in, save_lora
    from dipstream.sparsity.cache_aware import DIPCA
    from dipstream.models.adapter_folder import model_signature, write_meta

    lm = load_model(str(tiny_checkpoint))
    peft = add_lora(lm.model, LoraSettings(rank=8))
    adapter = tmp_path / "adapter"
    save_lora(peft, adapter)
    write_meta(adapter, {"model": lm.name, "model_signature": model_signature(lm.info), "method": "dip-ca"})
    assert lora_weights_in(adapter) == count_lora_weights(peft.model) > 0
    capacities = []
    real = DIPCA.configure_cache

    def recording(self, capacity, *args, **kwargs):
        capacities.append(dict(capacity))
        return real(self, capacity, *args, **kwargs)

    monkeypatch.setattr(DIPCA, "configure_cache", recording)
    cfg = write_config(tmp_path / "s.yaml", tiny_checkpoint, text_file,
                       f"method: dip-ca\ndensity: 0.5\ndram: 0.8x\nadapter: {adapter}\n")
    _, [run], _ = plan(cfg)
    record_task(run.params, 0)
    planned, used = capacities
    assert planned == used


def _sweep_cmd(cfg, results, *extra):
    return [sys.executable, "-m", "dipstream.cli.main", "sweep", str(cfg), "--results", str(results),
            "--no-progress", *extra]


def _env(kill_task: int | None = None):
    env = {k: v for k, v in os.environ.items() if k != "DIPSTREAM_SWEEP_KILL_TASK"}
    env["PYTHONPATH"] = str(ROOT)
    if kill_task is not None:
        env["DIPSTREAM_SWEEP_KILL_TASK"] = str(kill_task)
    return env


@pytest.mark.parametrize("executor", ["local", "serial"])
def test_resume_after_a_killed_process(tiny_checkpoint, text_file, tmp_path, executor):
    """kill -9 of a pool worker (local) or of the sweep process itself (serial) mid-sweep: the
    re-run completes and every run is in the table exactly once."""
    cfg = write_config(tmp_path / "s.yaml", tiny_checkpoint, text_file,
                       "dram: [0.6x, 0.8x]\nhardware: [a18, laptop]\n"
                       "grid:\n  - {method: dense}\n  - {method: dip, density: [0.5, 0.7]}\n"
                       "  - {method: dip-ca, density: 0.5, gamma: 0.1}\n")
    _, runs, _ = plan(cfg)
    results = tmp_path / "r"
    p = subprocess.run(_sweep_cmd(cfg, results, "--executor", executor, "--jobs", "2"),
                       env=_env(kill_task=6), capture_output=True, text=True, timeout=300)
    before = rows_of(results)
    if executor == "local":
        assert p.returncode == 2, p.stderr
        assert "worker process died" in p.stderr and "resume" in p.stderr
    else:
        assert p.returncode == -signal.SIGKILL, p.stderr
    assert 0 < len(before) < len(runs)
    p = subprocess.run(_sweep_cmd(cfg, results, "--executor", executor, "--jobs", "2"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    keys = [r["key"] for r in rows_of(results)]
    assert sorted(keys) == sorted(r.key for r in runs)  # every run exactly once
    assert (results / "results.csv").read_text().count("\n") == len(runs) + 1


def test_a_pool_broken_before_submit_reports_a_dead_worker():
    """The race behind a flaky exit code 1: a worker dies, another task's result is handled
    first, and the next submit finds the pool broken. That must be WorkerDied (the sweep turns it
    into its resume message, exit 2), not an uncaught BrokenProcessPool."""
    from dipstream.experiments.executors import LocalExecutor, WorkerDied

    ex = LocalExecutor(1)
    try:
        h = ex.submit(os._exit, 1)
        with pytest.raises(WorkerDied):
            ex.result(h)
        with pytest.raises(WorkerDied):
            ex.submit(abs, -1)
    finally:
        ex.close()


def test_torn_last_line_is_cut_and_that_run_redone(tiny_checkpoint, text_file, tmp_path):
    cfg = write_config(tmp_path / "s.yaml", tiny_checkpoint, text_file,
                       "method: dip\ndensity: [0.5, 0.7]\ndram: 0.6x\n")
    opts = SweepOptions(results=str(tmp_path / "r"), executor="serial", progress=False)
    run_sweep(cfg, opts)
    path = tmp_path / "r" / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn_key = json.loads(lines[-1])["key"]
    path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # a crash mid-append
    assert [r["key"] for r in read_jsonl(path)] == [json.loads(lines[0])["key"]]
    s = run_sweep(cfg, opts)
    assert s["finished"] == 1 and s["model_runs"] == 0  # its model run was stored: replay only
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    assert sorted(r["key"] for r in rows) == sorted([json.loads(lines[0])["key"], torn_key])


def _error(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    return err[-1]


def test_bad_sweep_configs(tiny_checkpoint, text_file, tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    write_config(cfg, tiny_checkpoint, text_file, "method: dip\ndensty: [0.5]\n")
    msg = _error(["sweep", str(cfg), "--results", str(tmp_path / "r")], capsys)
    assert "unknown key `densty`" in msg and "did you mean `density`?" in msg
    write_config(cfg, tiny_checkpoint, text_file, "method: dip\ngrid:\n  - {density: []}\n")
    msg = _error(["sweep", str(cfg), "--results", str(tmp_path / "r")], capsys)
    assert "gives no runs" in msg and "empty" in msg
    write_config(cfg, tiny_checkpoint, text_file, "method: dipp\n")
    assert "did you mean 'dip'?" in _error(["sweep", str(cfg), "--results", str(tmp_path / "r")], capsys)
    write_config(cfg, tiny_checkpoint, text_file, "method: dip\njson: out.json\n")
    assert "output file" in _error(["sweep", str(cfg)], capsys)
    write_config(cfg, tiny_checkpoint, text_file, "method: glu\ndensity: [0.3, 0.5]\n")
    assert "none of its 2 runs is valid" in _error(["sweep", str(cfg)], capsys)
    assert "does not exist" in _error(["sweep", str(tmp_path / "missing.yaml")], capsys)
    assert not (tmp_path / "r").exists()


def test_results_folder_of_an_incompatible_version(tiny_checkpoint, text_file, tmp_path, capsys):
    cfg = write_config(tmp_path / "s.yaml", tiny_checkpoint, text_file, "method: dense\n")
    results = tmp_path / "r"
    results.mkdir()
    (results / "sweep.json").write_text(json.dumps({"format": "dipstream-results/0", "dipstream": "0.0.1"}))
    (results / "results.jsonl").write_text('{"key": "old"}\n')
    msg = _error(["sweep", str(cfg), "--results", str(results)], capsys)
    assert "written by dipstream 0.0.1" in msg and "new --results folder" in msg
    assert (results / "results.jsonl").read_text() == '{"key": "old"}\n'  # nothing lost
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not a dipstream results folder" in _error(["sweep", str(cfg), "--results", str(other)], capsys)


def test_ray_executor_gives_the_serial_results(tiny_checkpoint, text_file, tmp_path):
    pytest.importorskip("ray")
    cfg = write_config(tmp_path / "s.yaml", tiny_checkpoint, text_file,
                       "dram: 0.6x\nhardware: [a18, laptop]\n"
                       "grid:\n  - {method: dip, density: 0.5}\n  - {method: dip-ca, density: 0.5}\n")
    ray_run = run_sweep(cfg, SweepOptions(results=str(tmp_path / "ray"), executor="ray", jobs=2,
                                          progress=False))
    serial = run_sweep(cfg, SweepOptions(results=str(tmp_path / "serial"), executor="serial", progress=False))
    assert ray_run["finished"] == serial["finished"] == 4 and ray_run["model_runs"] == 2
    a = {r["key"]: r for r in rows_of(tmp_path / "ray")}
    b = {r["key"]: r for r in rows_of(tmp_path / "serial")}
    assert a.keys() == b.keys()
    for k in a:
        for col in ("perplexity", "tokens_per_s", "hit_rate", "density_measured"):
            assert a[k][col] == b[k][col]


def test_ray_missing_is_a_clear_error(monkeypatch, tiny_checkpoint, text_file, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    cfg = write_config(tmp_path / "s.yaml", tiny_checkpoint, text_file, "method: dense\n")
    assert main(["sweep", str(cfg), "--results", str(tmp_path / "r"), "--executor", "ray"]) == 2
    assert "pip install" in capsys.readouterr().err
