"""`dipstream simulate`: accuracy and simulated speed of the same masks on a described device."""

from __future__ import annotations

import dataclasses

import numpy as np

from dipstream.errors import DipstreamError, user_errors
from dipstream.experiments.configs import EvalConfig, SimConfig, SimulateConfig, hardware_of
from dipstream.experiments.evaluate import evaluate
from dipstream.io import write_json_atomic
from dipstream.models.adapters import count_lora_weights
from dipstream.models.loading import shape_of
from dipstream.names import key_layer
from dipstream.simulator import (
    check_trace_matches,
    dense_streaming_baseline,
    hook_specs,
    load_trace,
    plan_placement,
    save_trace,
    simulate,
)
from dipstream.simulator.policies import OFFLINE_POLICIES
from dipstream.simulator.simulate import resolve_dram
from dipstream.sparsity.recording import MaskRecorder
from dipstream.validation import output_file


def simulate_trace(trace, shape, sim: SimConfig, seq_len: int = 512, ev: EvalConfig | None = None) -> dict:
    """Simulate a trace and the dense-streaming baseline on the same device; figures and ratios.
    `trace=None` (a dense run) reports the baseline for both. Policy `hot` pins units by the
    profile of `ev`'s method on the train split (`hot_profile.hot_frequencies`)."""

    hw = hardware_of(sim)
    kw, profiled = sim.policy_kwargs(), {}
    if trace is not None and sim.policy == "hot":
        from dipstream.experiments.hot_profile import hot_frequencies

        if ev is None:
            raise DipstreamError("policy hot needs the run's model and method to profile them on the train split")
        kw["frequency"], profiled = hot_frequencies(ev, sim, shape, evaluate_and_record)
    with user_errors():
        if trace is None:  # a dense run has no masks: it is the dense-streaming baseline itself
            b = dense_streaming_baseline(shape, hw, sim.dram, seq_len=seq_len).to_dict()
            r = b
        else:
            res = simulate(trace, hw, shape, policy=sim.policy, dram_bytes=sim.dram,
                           cache_split=sim.cache_split, **kw)
            lens = [b - a for a, b in trace.sequences()]
            b = dense_streaming_baseline(shape, hw, sim.dram, seq_len=res.seq_len,
                                         sequences=list(zip(trace.prompt_len.tolist(), lens))).to_dict()
            r = res.to_dict()
    keys = ("tokens_per_s", "ttft_s", "hit_rate", "dram_bytes_per_token", "flash_bytes_per_token",
            "dram_used_bytes", "density_measured")
    out = {k: r[k] for k in keys if k != "density_measured"}
    out["density_simulated"] = r["density_measured"]
    out["hit_rate_per_layer"] = _per_layer(r["hook_names"], r["hit_rate_per_hook"])
    out["hardware"], out["dram_bytes"] = hw.name, r["dram_bytes"]
    out["policy"] = sim.policy if trace is not None else r["policy"]
    out["dense_streaming"] = {k: b[k] for k in keys}
    out["speedup_vs_dense_streaming"] = r["tokens_per_s"] / b["tokens_per_s"]
    out["flash_bytes_ratio_vs_dense_streaming"] = r["flash_bytes_per_token"] / b["flash_bytes_per_token"] \
        if b["flash_bytes_per_token"] else None
    return {**out, **profiled}


def _per_layer(names: list[str], rates: list[float]) -> list[float]:
    layers: dict[int, list[float]] = {}
    for n, h in zip(names, rates):
        layers.setdefault(key_layer(n), []).append(h)
    return [float(np.mean(layers[i])) for i in sorted(layers)]


def is_closed_loop(method) -> bool:
    """Whether `method` chooses its masks from a live simulated cache (DIP-CA)."""
    return hasattr(method, "configure_cache")


def closed_loop_cache(sim: SimConfig, hw, shape, seq_len: int, adapter_weights: float = 0) -> dict:
    """The simulated DRAM caches a closed-loop method steers its masks by, as the simulator places
    them on `sim`'s device (hardware `hw`): {capacity: units per hook of hook_specs(shape, "dip"),
    policy, policy_kwargs}. Its masks depend on exactly this (a model run's identity)."""

    with user_errors():
        plan = plan_placement(shape, hw, hook_specs(shape, "dip"), resolve_dram(sim.dram, hw, shape), seq_len,
                              cache_split=sim.cache_split, adapter_weights=adapter_weights)
    return {"capacity": plan.capacity.tolist(), "policy": sim.policy, "policy_kwargs": sim.policy_kwargs()}


def configure_closed_loop(method, shape, cache: dict) -> None:
    """Give a closed-loop method the caches of `closed_loop_cache` (refuses policies that cannot
    steer masks, e.g. belady, hot)."""

    method.configure_cache({h.name: int(c) for h, c in zip(hook_specs(shape, "dip"), cache["capacity"])},
                           cache["policy"], **cache["policy_kwargs"])


def evaluate_and_record(ev: EvalConfig, sim: SimConfig, shape, progress):
    """Evaluate with a mask recorder attached (and, for dip-ca, the live simulated caches)."""

    recorder = MaskRecorder(shape.d_model, shape.d_ff)

    def on_attached(lm, sm, windows):
        if is_closed_loop(sm.method):

            cache = closed_loop_cache(sim, hardware_of(sim), shape, windows.input_ids.shape[1],
                                      count_lora_weights(lm.model))
            configure_closed_loop(sm.method, shape, cache)
        sm.observers.append(recorder)

    row, sm = evaluate(ev, progress, batch_size=sim.batch_size, on_attached=on_attached)
    n, T = row["windows"], ev.seq_len
    prompt = sm.stats.uncounted // n
    meta = {"model": row["model"], "method": row["method"], "density": row["density_requested"],
            "predictor_weights": row.get("predictor_weights", 0),
            "adapter_weights": row.get("adapter_weights", 0), **shape.to_dict()}
    if not recorder.specs:  # dense: nothing masked
        return row, None
    return row, recorder.trace(np.arange(n) * T, np.full(n, prompt), meta)


def run_simulate(cfg: SimulateConfig, progress: bool | None = None) -> dict:
    """Evaluate (or replay a trace) and simulate it; returns one results row."""
    sim, ev = cfg.sim, cfg.eval
    sim.validate()
    if not sim.trace and ev.method == "dip-ca" and sim.policy in OFFLINE_POLICIES:
        raise DipstreamError(f"dip-ca steers its masks by the live cache, which policy '{sim.policy}' "
                             "cannot provide here; use lru, lfu, window or none")
    if sim.trace:

        output_file("json", ev.json)
    else:
        ev.validate()
    shape = shape_of(ev.model)
    if sim.trace:


        with user_errors():
            trace = load_trace(sim.trace)
            check_trace_matches(trace, shape, ev.model)
        row = {"model": ev.model, "method": trace.metadata.get("method"),
               "density_requested": trace.metadata.get("density"), "trace": sim.trace}
        if sim.policy == "hot":  # profile the trace's own method and density
            ev = dataclasses.replace(ev, method=row["method"] or ev.method, density=row["density_requested"] or ev.density)
    else:
        row, trace = evaluate_and_record(ev, sim, shape, progress)
        if sim.save_trace and trace is not None:

            save_trace(trace, sim.save_trace)
    row = {**row, **simulate_trace(trace, shape, sim, ev.seq_len, ev)}
    if ev.json:
        write_json_atomic(ev.json, row)
    return row
