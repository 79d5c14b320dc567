"""`dipstream generate` on the real SmolLM2-135M. Marked `real`."""

import pytest

from dipstream.config import flat
from dipstream.runtime.generate import GenerateConfig, run_generate

pytestmark = pytest.mark.real


def test_smollm2_sparse_density_one_equals_dense_and_offload(tmp_path):
    """Greedy, 16 tokens: the fused sparse kernel at density 1.0 and the offloaded runtime
    (weights in a file, --dram half the model, dense streaming) both give the dense tokens; DIP at
    0.5 from the file gives the in-RAM DIP's tokens."""
    base = dict(prompt="The three primary colours are", max_new_tokens=16, stop_at_eos=False,
                stream=False, threads=1)
    dense = run_generate(flat(GenerateConfig, method="dense", **base))
    sparse = run_generate(flat(GenerateConfig, method="dip", density=1.0, **base))
    assert sparse["ids"] == dense["ids"]
    off = dict(offload=str(tmp_path / "off"), dram="0.5x", **base)
    streamed = run_generate(flat(GenerateConfig, method="dense", **off))
    assert streamed["ids"] == dense["ids"]
    assert streamed["ram_mlp_bytes"] <= streamed["dram_budget_bytes"]
    # --dram 0.5x of the whole model: the static layers and KV cache take most of it; dense
    # streaming then reads every MLP unit the caches do not hold, each token
    cached = streamed["peak_cached_bytes"] / streamed["mlp_bytes"]
    assert 0.02 < cached < 0.5
    assert streamed["disk_bytes_per_token"] / streamed["mlp_bytes"] == pytest.approx(1 - cached, abs=0.05)
    dip_ram = run_generate(flat(GenerateConfig, method="dip", density=0.5, **base))
    dip_file = run_generate(flat(GenerateConfig, method="dip", density=0.5, **off))
    assert dip_file["ids"][:8] == dip_ram["ids"][:8]
    assert dip_file["density_measured"] == pytest.approx(0.5, abs=0.01)
    assert dip_file["reads_per_token"] > 0 and 0 < dip_file["hit_rate"] < 1
