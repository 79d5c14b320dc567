import json
from dataclasses import fields

import pytest

from dipstream.simulator import (SHAPES, Hardware, available_presets, get_shape, load_hardware,
                                 parse_dram)


def test_presets():
    assert {"a18", "android-ufs4", "laptop"} <= set(available_presets())
    a18 = load_hardware("a18")
    assert (a18.dram_bw, a18.flash_bw, a18.dram_bytes) == (60e9, 1e9, 8e9)
    assert a18.bits["mlp"] == 16 and a18.compute_flops is None and not a18.bundle
    u = load_hardware("android-ufs4")
    assert (u.dram_bw, u.flash_bw, u.dram_bytes) == (77e9, 4.2e9, 12e9)
    lt = load_hardware("laptop")
    assert (lt.dram_bw, lt.flash_bw, lt.dram_bytes) == (100e9, 7e9, 16e9)
    assert load_hardware("a18", dram_bytes=4e9).dram_bytes == 4e9


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match="unknown hardware 'nope'; available presets: a18, "):
        load_hardware("nope")


def test_load_from_files(tmp_path):
    p = tmp_path / "hw.yaml"
    p.write_text("dram_bw: 50GB/s\nflash_bw: 2e9\noverlap: true\nbits: {mlp: 4}\n")
    h = load_hardware(p)
    assert h.name == "hw" and h.dram_bw == 50e9 and h.overlap and h.bits["mlp"] == 4
    assert h.bits["attention"] == 16
    j = tmp_path / "hw.json"
    j.write_text(json.dumps({"name": "j", "dram_bw": 1e9, "flash_bw": 1e8}))
    assert load_hardware(str(j)).flash_bw == 1e8
    j.write_text(json.dumps({"dram_bw": 1e9, "flash_bw": 1e8, "typo": 1}))
    with pytest.raises(ValueError, match="unknown hardware field"):
        load_hardware(j)


@pytest.mark.parametrize("kw", [{"dram_bw": 0}, {"flash_bw": -1}, {"dram_bw": "0GB/s"}])
def test_bandwidth_must_be_positive(kw):
    with pytest.raises(ValueError, match="must be positive"):
        Hardware(**kw)


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in fields(Hardware))
    assert "overlap" in Hardware.help()


@pytest.mark.parametrize("spec,expected", [
    ("0.5x", 500.0), ("2x", 2000.0), ("2GB", 2e9), ("512MB", 512e6),
    ("1.5GiB", 1.5 * 2 ** 30), ("1234", 1234), (1234, 1234), ("64 KiB", 65536)])
def test_parse_dram(spec, expected):
    assert parse_dram(spec, model_bytes=1000) == expected


@pytest.mark.parametrize("spec", ["abc", "x", "-1x", "2 parsecs", "", "-5GB"])
def test_parse_dram_errors(spec):
    with pytest.raises(ValueError, match="DRAM size"):
        parse_dram(spec, model_bytes=1000)


def test_footprints():
    s = get_shape("llama3-8b")
    d, D, V, L = 4096, 14336, 128256, 32
    assert s.mlp_weights() == d * D * 3 * L
    assert s.attention_weights() == d * d * (2 + 2 * 8 / 32) * L
    assert s.kv_cache_weights(2048) == 2048 * d * 2 * L * 0.25
    assert s.weights() == {"attention": d * d * 2.5 * L, "mlp": d * D * 3 * L,
                           "lm_head": d * V, "embedding": d * V}
    # tied: the one matrix counted once
    t = get_shape("smollm2-135m")
    assert t.tied_embeddings and set(t.weights()) == {"attention", "mlp", "lm_head"}
    bits = {k: 16 for k in ("mlp", "attention", "lm_head", "embedding")}
    assert s.weight_bytes(bits) == 2 * (d * d * 2.5 * L + d * D * 3 * L + 2 * d * V)
    assert set(SHAPES) >= {"phi3-medium", "phi3-mini", "mistral-7b", "gemma3-270m"}
    assert get_shape("phi3-medium").g == 0.25
    with pytest.raises(ValueError, match="available: phi3-medium"):
        get_shape("gpt-5")
