"""The `hot` policy pins units by frequencies profiled on the train split (an artefact made once
and reused), never by the evaluated text; `hot-same-trace` is the named upper bound."""

from __future__ import annotations

import numpy as np
import pytest

from dipstream.experiments.evaluate import EvalConfig
from dipstream.experiments.simulate import SimConfig, SimulateConfig, run_simulate
from tests.conftest import TEXT


def _run(ckpt, text, policy, monkeypatch=None, seen=None):
    if monkeypatch is not None:
        import dipstream.experiments.simulate as sim_mod

        real = sim_mod.simulate

        def spy(trace, *a, **kw):
            seen.append({k: np.array(v) for k, v in kw.get("frequency", {}).items()})
            return real(trace, *a, **kw)

        monkeypatch.setattr(sim_mod, "simulate", spy)
    ev = EvalConfig(model=str(ckpt), method="dip", density=0.5, text=str(text), seq_len=32, tokens=248,
                    calib_tokens=248, device="cpu")
    return run_simulate(SimulateConfig(ev, SimConfig(dram="0.9x", policy=policy, hot_fraction=1.0)))


@pytest.fixture
def two_texts(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT)
    b.write_text(" ".join(reversed(TEXT.split())) + "\n\nA different text about other things entirely. " * 20)
    return a, b


def test_hot_pins_the_same_units_whatever_text_is_evaluated(tiny_checkpoint, two_texts, monkeypatch, tmp_path):
    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path / "cache"))
    seen: list[dict] = []
    rows = [_run(tiny_checkpoint, t, "hot", monkeypatch, seen) for t in two_texts]
    assert rows[0]["hot_profile"] == rows[1]["hot_profile"]
    assert rows[0]["hot_profile_text"] == "wiki train split" and rows[0]["hot_profile_tokens"] == 256  # 8 windows x 32 positions
    assert seen[0].keys() == seen[1].keys() and all(np.array_equal(seen[0][k], seen[1][k]) for k in seen[0])
    # the evaluated texts do differ in what they select: the same-trace bound pins other units
    same = [_run(tiny_checkpoint, t, "hot-same-trace") for t in two_texts]
    assert "hot_profile" not in same[0]
    assert same[0]["hit_rate"] >= rows[0]["hit_rate"] - 1e-9  # the bound is never worse on its own text


def test_the_profile_is_made_once_from_the_train_split_and_reused(tiny_checkpoint, two_texts, monkeypatch, tmp_path):
    import dipstream.data.corpora as corpora
    from dipstream.experiments import hot_profile

    monkeypatch.setenv("DIPSTREAM_CACHE", str(tmp_path / "cache"))
    splits = []
    real = corpora.load_text

    def spy(corpus="wiki", split="eval", path=None):
        splits.append((corpus, split, path))
        return real(corpus, split, path)

    monkeypatch.setattr("dipstream.experiments.evaluate.load_text", spy)
    row = _run(tiny_checkpoint, two_texts[0], "hot")
    assert ("wiki", "train", None) in splits  # the profile's text
    assert not [s for s in splits if s[1] in ("val", "eval") and s[2] is None]  # never the corpus's eval text
    mtime = (path := tmp_path / "cache" / "profiles" / row["hot_profile"].split("/")[-1]).stat().st_mtime_ns
    monkeypatch.setattr(hot_profile, "save_profile", lambda *a: pytest.fail("profiled again"))
    assert _run(tiny_checkpoint, two_texts[1], "hot")["hot_profile"] == row["hot_profile"]
    assert path.stat().st_mtime_ns == mtime


def test_hot_without_a_profile_is_refused_by_the_simulator():
    from dipstream.simulator import simulate
    from dipstream.simulator.trace import Hook, MaskTrace

    masks = np.zeros((4, 8), bool)
    masks[:, :2] = True
    tr = MaskTrace([Hook("layers.0.in", "in", 8, 8, masks)], np.array([0]), np.array([0]),
                   {"n_layers": 1, "d_model": 8, "d_ff": 4, "vocab": 16, "n_heads": 1, "n_kv_heads": 1})
    with pytest.raises(ValueError, match="hot-same-trace"):
        simulate(tr, "a18", policy="hot", dram_bytes=1e9, seq_len=4)
    assert simulate(tr, "a18", policy="hot-same-trace", dram_bytes=1e9, seq_len=4).hit_rate >= 0
