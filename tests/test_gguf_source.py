"""A GGUF given by path: another architecture, a damaged or truncated file, a missing file and an
unsupported block type are each refused in one line naming what is wrong (files written here with
gguf's own writer)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from dipstream.engine.gguf_source import GGUFSource
from dipstream.errors import DipstreamError


def write_gguf(path, arch: str, qtype=GGMLQuantizationType.F32):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    data = np.zeros((4, 256), np.float32)
    if qtype != GGMLQuantizationType.F32:
        from gguf.quants import quantize

        data = quantize(data, qtype)
    w.add_tensor("blk.0.ffn_up.weight", data, raw_dtype=None if qtype == GGMLQuantizationType.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_refusals_name_what_is_wrong(tmp_path):
    with pytest.raises(DipstreamError) as e:
        GGUFSource(write_gguf(tmp_path / "g.gguf", "gpt2"))
    assert "architecture 'gpt2'" in one_line(e) and "qwen2" in str(e.value)
    ok = write_gguf(tmp_path / "q.gguf", "qwen2")
    assert GGUFSource(ok).arch == "qwen2"
    raw = ok.read_bytes()
    (tmp_path / "t.gguf").write_bytes(raw[:len(raw) - 1024])
    with pytest.raises(DipstreamError) as e:
        GGUFSource(tmp_path / "t.gguf")
    assert "truncated" in one_line(e) or "not a readable GGUF" in str(e.value)
    (tmp_path / "r.gguf").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DipstreamError) as e:
        GGUFSource(tmp_path / "r.gguf")
    assert "not a readable GGUF" in one_line(e)
    with pytest.raises(DipstreamError) as e:
        GGUFSource(tmp_path / "missing.gguf")
    assert "does not exist" in one_line(e)


def test_cli_refuses_a_gguf_of_another_family(tmp_path, capsys):
    from dipstream.cli.main import main

    path = write_gguf(tmp_path / "g.gguf", "gpt2")
    assert main(["generate", "--model", str(path), "--model-dir", str(tmp_path / "m"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "architecture 'gpt2'" in err[0]


def test_two_ggufs_of_one_name_get_their_own_model_files(tmp_path):
    from dipstream.engine.export import default_model_dir

    a, b = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    assert default_model_dir(str(a), "gguf", "gguf") != default_model_dir(str(b), "gguf", "gguf")
    assert default_model_dir(str(a), "gguf", "gguf") == default_model_dir(str(tmp_path / "a" / ".." / "a" / "model.gguf"),
                                                                          "gguf", "gguf")
