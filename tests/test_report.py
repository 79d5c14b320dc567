"""`dipstream report`: figures from a small synthetic results table; the headline by hand."""

import json

import pytest
from matplotlib.image import imread

from dipstream.cli.main import main
from dipstream.experiments.results_store import check_manifest
from dipstream.reports.figures import pareto_front
from dipstream.reports.headline import Budget, headline

MB = 1e6
LAYERS = 3


def _row(model, method, density, dram, ppl, tps, gamma=None, flash_bw=1e9, hw_set=None, dense_tps=None,
         split="eval"):
    """A results row with the columns the report reads (as `dipstream sweep` writes them)."""
    dense_tps = dense_tps if dense_tps is not None else {0.5: 10.0, 0.75: 15.0, 1.0: 30.0}[dram]
    key = f"{model}|{method}|{density}|{dram}|{gamma}|{flash_bw}|{split}"
    r = {"key": key, "config_key": key, "model_run": f"{model}|{method}|{density}|{gamma}|{dram}",
         "dipstream": "0.1.0", "model": model, "method": method, "density_requested": density,
         "density_measured": density - 0.001, "perplexity": ppl, "tokens_per_s": tps,
         "hit_rate": min(1.0, tps / 50), "hit_rate_per_layer": [min(1.0, tps / 50 + i / 10) for i in range(LAYERS)],
         "dram_fraction": dram, "dram_bytes": 100 * MB * dram, "dram_used_bytes": 100 * MB * dram * 0.99,
         "flash_bytes_per_token": 1e6 / tps, "speedup_vs_dense_streaming": tps / dense_tps,
         "dense_streaming.tokens_per_s": dense_tps, "dense_streaming.dram_used_bytes": 100 * MB * dram,
         "tokens": 2044, "windows": 4, "seq_len": 512, "corpus": "wiki", "machine": "test",
         "model_run_seconds": 10.0, "config.hardware": "a18", "config.policy": "lru",
         "config.over_capacity": "random", "config.cache_split": "linear", "config.hw_set": hw_set,
         "config.method": method, "config.density": density, "config.gamma": gamma,
         "config.dram": f"{dram}x", "config.split": split, "split": split, "hw.flash_bw": flash_bw, "hw.dram_bw": 6e10}
    if method == "dip-ca":
        r["gamma"] = gamma
    return r


def synthetic_rows():
    """Model m: dense perplexity 10; dense streaming 10 / 15 / 30 tok/s at DRAM 0.5x / 0.75x / 1x."""
    rows = []
    for dram in (0.5, 0.75, 1.0):
        dense_tps = {0.5: 10.0, 0.75: 15.0, 1.0: 30.0}[dram]
        rows.append(_row("m", "dense", 1.0, dram, 10.0, dense_tps))
        rows.append(_row("m", "dip", 0.9, dram, 10.02, dense_tps * 1.1))
        rows.append(_row("m", "dip", 0.5, dram, 14.0, dense_tps * 2.5))
        rows.append(_row("m", "cats", 0.9, dram, 10.3, dense_tps * 1.05))
    ca = {0.5: [(0.9, 0.3, 10.05, 16.0), (0.9, 0.1, 10.4, 25.0)],
          0.75: [(0.9, 0.3, 10.08, 20.0), (0.9, 0.1, 10.2, 35.0)],
          1.0: [(0.9, 0.3, 10.09, 40.0), (0.9, 0.1, 10.6, 45.0)]}
    for dram, runs in ca.items():
        rows += [_row("m", "dip-ca", d, dram, p, t, gamma=g) for d, g, p, t in runs]
    for bw in (0.5e9, 2e9):  # Flash bandwidth sweep at 0.75x
        scale = bw / 1e9
        rows.append(_row("m", "dense", 1.0, 0.75, 10.0, 15.0 * scale, flash_bw=bw, hw_set=f"flash_bw={bw:g}",
                         dense_tps=15.0 * scale))
        rows.append(_row("m", "dip", 0.9, 0.75, 10.02, 16.5 * scale, flash_bw=bw, hw_set=f"flash_bw={bw:g}",
                         dense_tps=15.0 * scale))
    return rows


def write_results(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    check_manifest(path, create=True)
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_headline_worked_by_hand():
    rows = synthetic_rows()
    rows = [r for r in rows if not r["config.hw_set"]]
    h = {x.dram_fraction: x for x in headline(rows, "m", Budget(0.1, False))}  # perplexity <= 10.1
    # best within budget: 16 / 20 / 40 tok/s (DIP-CA gamma 0.3); DIP (gamma 1) is slower everywhere
    assert [h[f].best["tokens_per_s"] for f in (0.5, 0.75, 1.0)] == [16.0, 20.0, 40.0]
    assert h[0.5].throughput_change == pytest.approx(16 / 10 - 1)
    assert h[0.75].throughput_change == pytest.approx(20 / 15 - 1)
    assert h[1.0].ppl_change == pytest.approx(0.09)
    # dense at 0.75x (15 tok/s) is matched at 0.5x (16 tok/s): -33% memory; at 1x (30) only by 1x
    assert h[0.75].match_fraction == 0.5 and h[0.75].memory_change == pytest.approx(50 / 75 - 1)
    assert h[1.0].match_fraction == 1.0 and h[1.0].memory_change == pytest.approx(0.0)
    # interpolated: 20 tok/s at 0.75x, 40 at 1x -> 30 tok/s at 0.875x: -12.5% (an estimate)
    assert h[1.0].interp_fraction == pytest.approx(0.875)
    assert h[1.0].memory_change_interp == pytest.approx(-0.125)
    assert h[0.75].interp_fraction == 0.5  # reached at the smallest size: nothing to interpolate
    h5 = {x.dram_fraction: x for x in headline(rows, "m", Budget(0.05, True))}  # perplexity <= 10.5
    assert h5[1.0].best["tokens_per_s"] == 40.0  # 45 tok/s is at perplexity 10.6, outside
    assert h5[1.0].match_fraction == 0.75 and h5[1.0].memory_change == pytest.approx(-0.25)
    assert h5[0.5].best["gamma"] == 0.1 and h5[0.5].throughput_change == pytest.approx(1.5)


def test_pareto_front_by_hand():
    pts = [(10, 5), (11, 7), (10.5, 4), (12, 6), (13, 9), (10, 3)]
    assert pareto_front(pts) == [(10, 5), (11, 7), (13, 9)]


def test_report_from_a_synthetic_table(tmp_path, capsys):
    results = write_results(tmp_path / "r", synthetic_rows())
    out = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(out), "--ppl-budget", "0.1,5%"]) == 0
    md = (out / "report.md").read_text()
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"perplexity_vs_density.png", "pareto_dram.png", "gamma.png",
                                       "throughput_vs_dram.png", "throughput_vs_flash.png",
                                       "hit_rate_per_layer.png"}
    for p in pngs:
        assert p.stat().st_size > 5000
        img = imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert img[..., :3].std() > 0.01  # not a blank canvas
        assert f"]({p.name})" in md
    assert "the reference's cache semantics" in md and "Not drawn" not in md
    # the headline table carries the hand-worked figures
    assert "| m | +0.1 | 0.75x = 75.0 MB | 15.00 | DIP-CA γ=0.3, d=0.9 | 20.00 | +33% |" in md
    assert "0.5x = 50.0 MB (DIP-CA γ=0.3, d=0.9) | -33% | -33% |" in md
    assert "1x = 100.0 MB (DIP-CA γ=0.3, d=0.9) | +0% | -12% |" in md
    assert "| m | +5% | 1x = 100.0 MB | 30.00 | DIP-CA γ=0.3, d=0.9 | 40.00 | +33% |" in md


def test_headline_chosen_on_val_reported_on_eval(tmp_path):
    """With validation runs, the setting is chosen there and reported by its eval twin: on val
    (dense 10.0) gamma 0.1 is within +0.1 (10.05) and faster, so it is chosen at every DRAM size,
    although its eval perplexity (10.4 at 0.5x) is over the budget; the row says so."""
    rows = synthetic_rows()
    for dram in (0.5, 0.75, 1.0):
        dense_tps = {0.5: 10.0, 0.75: 15.0, 1.0: 30.0}[dram]
        rows.append(_row("m", "dense", 1.0, dram, 10.0, dense_tps, split="val"))
        rows.append(_row("m", "dip-ca", 0.9, dram, 10.2, 99.0, gamma=0.3, split="val"))
        rows.append(_row("m", "dip-ca", 0.9, dram, 10.05, 98.0, gamma=0.1, split="val"))
    h = {r.dram_fraction: r for r in headline(rows, "m", Budget(0.1, False))}
    assert all(r.selected_on == "val" for r in h.values())
    assert h[0.5].chosen["split"] == "val" and h[0.5].best["split"] == "eval"
    assert h[0.5].best["gamma"] == 0.1 and h[0.5].best["tokens_per_s"] == 25.0  # the eval figures
    assert h[0.5].within_budget is False  # eval 10.4 > 10.0 + 0.1
    results = write_results(tmp_path / "r", rows)
    assert main(["report", str(results), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "chosen on the validation split" in md
    assert "| m | +0.1 | 0.5x = 50.0 MB | 10.00 | DIP-CA γ=0.1, d=0.9 | 25.00 | +150% | 10.000 -> 10.400 " \
           "(+0.400) **over budget on eval** |" in md


def test_report_given_the_results_jsonl_of_a_folder(tmp_path, capsys):
    """The results.jsonl of a results folder reports as the folder does: its sweep configs are
    listed and the report goes to RESULTS/report (not under the file)."""
    results = write_results(tmp_path / "r", synthetic_rows())
    man = json.loads((results / "sweep.json").read_text())
    man["configs"] = [{"config": "experiments/s.yaml", "description": "a study"}]
    (results / "sweep.json").write_text(json.dumps(man))
    assert main(["report", str(results / "results.jsonl")]) == 0
    md = (results / "report" / "report.md").read_text()
    assert "Runs made by `dipstream sweep experiments/s.yaml` (a study)." in md


def test_report_errors(tmp_path, capsys):
    def error(args):
        assert main(args) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    empty = write_results(tmp_path / "empty", [])
    assert "holds no finished runs" in error(["report", str(empty)])
    assert "not a dipstream results folder" in error(["report", str(tmp_path)])
    assert "no results at" in error(["report", str(tmp_path / "missing.jsonl")])
    results = write_results(tmp_path / "r", synthetic_rows())
    assert "is not a non-negative number or percentage" in error(["report", str(results), "--ppl-budget", "lots"])
    assert "no runs of hardware `laptop`" in error(["report", str(results), "--hardware", "laptop"])
