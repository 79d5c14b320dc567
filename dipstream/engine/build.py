"""Build an engine: the model file's static weights and KV cache (`LeanModel`) with its MLP in RAM
or offloaded behind caches, sized by the RAM plan before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from dipstream.devices import rss_bytes
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
        plan.settle(rss_bytes())  # --memory: what the loaded process leaves
        lm.mlp = OffloadMLP(lm, chooser, plan.cache_bytes, setup.policy, o.io_threads, o.direct_io,
                            setup.record_masks, int(parse_bytes(o.read_gap)), o.prefetch, **setup.policy_kwargs)
        return lm, plan
    except BaseException:
        lm.close()
        raise
