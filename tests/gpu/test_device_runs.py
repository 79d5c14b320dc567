"""Runs on a CUDA device agree with the same runs on the CPU (skipped without CUDA; run by
scripts/gpu_check.sh where a GPU is lent)."""

from __future__ import annotations

import pytest
import torch

from dipstream.experiments.evaluate import EvalConfig, run_eval
from dipstream.experiments.simulate import SimConfig, SimulateConfig, run_simulate
from dipstream.sparsity import MethodOptions

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ev(ckpt, text, method, device, dtype="float32"):
    return EvalConfig(model=str(ckpt), method=method, density=0.5, text=str(text), seq_len=32, tokens=248,
                      device=device, dtype=dtype, options=MethodOptions(gamma=0.1))


@cuda
@pytest.mark.parametrize("method", ["dense", "dip", "teal", "cats"])
def test_eval_on_cuda_matches_cpu(tiny_checkpoint, text_file, method):
    cpu = run_eval(_ev(tiny_checkpoint, text_file, method, "cpu"))
    gpu = run_eval(_ev(tiny_checkpoint, text_file, method, "cuda"))
    assert gpu["device"].startswith("cuda")
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=2e-3)
    assert gpu["density_measured"] == pytest.approx(cpu["density_measured"], abs=1e-3)


@cuda
def test_closed_loop_dip_ca_on_cuda_matches_cpu(tiny_checkpoint, text_file):
    rows = [run_simulate(SimulateConfig(_ev(tiny_checkpoint, text_file, "dip-ca", d), SimConfig(dram="0.9x")))
            for d in ("cpu", "cuda")]
    assert rows[1]["hit_rate"] == pytest.approx(rows[0]["hit_rate"], abs=0.02)
    assert rows[1]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=5e-3)


@cuda
def test_bfloat16_load_on_cuda_allocates_the_bfloat16_model(tiny_checkpoint):
    from dipstream.models.loading import load_model

    torch.cuda.reset_peak_memory_stats()
    lm = load_model(str(tiny_checkpoint), torch.bfloat16, "cuda")
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    assert next(lm.model.parameters()).device.type == "cuda"
    assert lm.load_peak_bytes < 1.5 * weights + 2**20
