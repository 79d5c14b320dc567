"""Build an engine: the model file's static weights and KV cache (`LeanModel`) with its MLP in RAM
or offloaded behind caches, sized by the RAM plan before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from dipstream.devices import release_memory, rss_bytes
from dipstream.engine.config import EngineSetup
from dipstream.engine.mlp import MaskChooser, OffloadMLP, RamMLP
from dipstream.engine.model import LeanModel
from dipstream.engine.modelfile import read_manifest
from dipstream.engine.plan import RamPlan, plan_ram
from dipstream.simulator.hardware import parse_bytes


def build(directory: str | Path, setup: EngineSetup) -> tuple[LeanModel, RamPlan]:
    """The model in `directory` with its MLP backend, and the RAM plan it was sized by."""
    baseline = rss_bytes()
    manifest = read_manifest(directory)
    plan = plan_ram(manifest, setup, baseline)  # refuses a budget before the weights are read
    o = setup.options
    lm = LeanModel(directory, manifest, setup.max_seq, setup.threads, kv_dtype=o.kv_cache, head=plan.head,
                   activations=o.activations, stream_embed=plan.stream_embed, io_threads=o.io_threads,
                   verify=o.verify)
    try:
        chooser = MaskChooser.from_keeps(setup.rule, setup.keeps, lm.d, lm.D)
        if not setup.offload:
            lm.mlp = RamMLP(lm, chooser, setup.record_masks)
            return lm, plan
        def offload_mlp(cache_bytes: int) -> OffloadMLP:
            return OffloadMLP(lm, chooser, cache_bytes, setup.policy, o.io_threads, o.direct_io, setup.record_masks,
                              int(parse_bytes(o.read_gap)), o.prefetch, **setup.policy_kwargs)

        plan.settle(rss_bytes())  # --memory: what the loaded process leaves (refuses before any token)
        if plan.budget_kind == "memory":  # one token through a cacheless MLP first: the scratch, read
            lm.mlp = offload_mlp(0)  # buffers and code pages a token touches are measured, not guessed
            lm.forward(0, 0)
            lm.mlp.close()
            lm.mlp = None
            release_memory()
            plan.settle(rss_bytes())
        lm.mlp = offload_mlp(plan.cache_bytes)
        return lm, plan
    except BaseException:
        lm.close()
        raise
