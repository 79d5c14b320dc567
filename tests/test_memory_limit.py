"""`--memory` under a real kernel limit (a memory cgroup of the budget's size, as a phone, a
container or a small laptop enforces one), each run time-bounded so a thrashing run fails instead
of hanging: a first use (the export included) and a decode run fit inside a limit equal to their
budget, an impossible budget is refused with exit 2 and one line before the process grows, and a
first use in a budget too small for the export is refused with the command to run first. Where no cgroup can be made, the reason is
printed and the weaker check runs: the process's own peak RSS against the budget."""

from __future__ import annotations

import json
import sys

import pytest

from dipstream.limits import cgroup_kind, run_limited, why_not

pytestmark = pytest.mark.real  # the real SmolLM2 (and Qwen 1.5B where installed)

MB = 1_000_000


def generate(args: list[str], limit: int | None, timeout: float = 300):
    cmd = [sys.executable, "-m", "dipstream.cli.main", "generate", "--no-stream", "--max-new-tokens", "8",
           "--prompt", "The three primary colours are", *args]
    if limit is not None and cgroup_kind() is None:
        print(f"no kernel limit: {why_not()}; checking the process's own peak RSS instead")
        limit = None
    return run_limited(cmd, limit, timeout), limit is not None


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    from dipstream.cli.main import main

    d = tmp_path_factory.mktemp("limit") / "smollm2"
    assert main(["export", "--model-dir", str(d)]) == 0
    return d


def test_decode_inside_a_limit_equal_to_its_budget(smollm2_dir, tmp_path):
    row_file = tmp_path / "row.json"
    r, limited = generate(["--offload", str(smollm2_dir), "--memory", "100MB", "--json", str(row_file)], 100 * MB)
    assert r.returncode == 0 and not r.timed_out and not r.oom_kills, r.stderr[-1500:]
    row = json.loads(row_file.read_text())
    assert row["new_tokens"] == 8 and row["cache_bytes"] > 0
    assert not limited or r.peak_bytes <= 100 * MB
    # the plan's breakdown sums to the budget, and is what the process reaches: its own peak RSS
    assert sum(row["budget_breakdown"].values()) == 100 * MB
    assert 95 * MB <= row["peak_rss_bytes"] <= 100 * MB


def test_a_budget_below_the_static_need_is_refused_inside_that_limit(smollm2_dir):
    r, _ = generate(["--offload", str(smollm2_dir), "--memory", "60MB"], 60 * MB)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and not r.timed_out and not r.oom_kills, r.stderr[-1500:]
    assert len(lines) == 1 and "give more than" in lines[0]


def test_first_use_exports_inside_a_limit_equal_to_its_budget(tmp_path):
    """A fresh model folder at --memory 150MB inside a 150 MB limit: the export (GGUF blocks moved
    through the file, no torch or transformers) and the run both fit."""
    fresh = tmp_path / "fresh"
    row_file = tmp_path / "row.json"
    r, limited = generate(["--offload", str(fresh), "--memory", "150MB", "--json", str(row_file)], 150 * MB, timeout=300)
    assert r.returncode == 0 and not r.timed_out and not r.oom_kills, r.stderr[-1500:]
    assert (fresh / "model.bin").is_file() and json.loads(row_file.read_text())["new_tokens"] == 8
    assert (r.peak_bytes if limited else json.loads(row_file.read_text())["peak_rss_bytes"]) <= 150 * MB


def test_first_use_in_a_budget_too_small_to_export_says_which_command_to_run(tmp_path):
    fresh = tmp_path / "fresh"
    r, _ = generate(["--offload", str(fresh), "--memory", "40MB"], 40 * MB, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and not r.timed_out and not r.oom_kills, r.stderr[-1500:]
    assert len(lines) == 1 and f"dipstream export --model smollm2-135m --model-dir {fresh}" in lines[0]
    assert not (fresh / "model.bin").exists()


def test_qwen_first_use_and_the_equal_bytes_half_cap_and_below_its_static_need(tmp_path):
    """Qwen 1.5B (optional): first use (the export included) at 800 MB inside an 800 MB limit, and
    at 601 MB (the larger baseline plus half its GGUF) inside a 601 MB limit; at 250 MB, below what
    it needs before any cache with its head streamed (about 285 MB: it runs at 300 MB, with 16 MB
    of caches), it is refused in one line inside a 250 MB limit."""
    from dipstream.errors import DipstreamError

    try:
        from dipstream.models.builtins import gguf_of

        gguf_of("qwen2.5-coder-1.5b")
    except DipstreamError as e:
        pytest.skip(f"qwen2.5-coder-1.5b is optional and not installed here ({e})")
    args = ["--model", "qwen2.5-coder-1.5b", "--activations", "int8", "--kv-cache", "float16"]
    for budget in (800, 601):  # each a fresh folder: the export inside the limit too
        r, limited = generate([*args, "--offload", str(tmp_path / f"q{budget}"), "--memory", f"{budget}MB"],
                              budget * MB, timeout=600)
        assert r.returncode == 0 and not r.timed_out and not r.oom_kills, (budget, r.stderr[-1500:])
        assert not limited or r.peak_bytes <= budget * MB
    r, _ = generate([*args, "--offload", str(tmp_path / "q601"), "--memory", "250MB"], 250 * MB)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and not r.oom_kills and len(lines) == 1 and "give more than" in lines[0]


def test_no_budget_given_chooses_one_that_fits_the_machine(smollm2_dir, tmp_path):
    """Without --offload and --memory, a model that does not fit what the process may still take (here
    a 110 MB limit; SmolLM2 in RAM peaks near 143 MB) streams its MLP under a budget that fits, and
    says so; with room (400 MB) it runs in RAM as before."""
    if cgroup_kind() is None:
        pytest.skip(why_not())
    row = tmp_path / "row.json"
    r, _ = generate(["--model-dir", str(smollm2_dir), "--json", str(row)], 110 * MB)
    assert r.returncode == 0 and not r.oom_kills, r.stderr[-500:]
    assert "do not fit" in r.stderr and "its MLP is streamed" in r.stderr
    doc = json.loads(row.read_text())
    assert doc["offload_dir"] and doc["budget_chosen"] and doc["peak_rss_bytes"] <= 110 * MB
    r, _ = generate(["--model-dir", str(smollm2_dir), "--json", str(row)], 400 * MB)
    assert r.returncode == 0 and "do not fit" not in r.stderr and "offload_dir" not in json.loads(row.read_text())
