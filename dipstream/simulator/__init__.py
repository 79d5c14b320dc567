"""Hardware simulator for DRAM-cached, Flash-streamed LLM decoding (docs/methods.md,
"Cache-aware masking" and "The simulator").

Offline::

    trace = load_trace("masks.npz")                       # or MaskTrace(...) / synthetic_trace
    res = simulate(trace, "a18", "llama3-8b", policy="lru", dram_bytes="0.5x")
    base = dense_streaming_baseline("llama3-8b", "a18", dram_bytes="0.5x", seq_len=2048)
    print(res.tokens_per_s / base.tokens_per_s, res.to_dict())

Closed loop (masks chosen from the cache state, e.g. DIP-CA)::

    loop = ClosedLoop(hook_specs(shape, "dip"), shape, "a18", "lru", dram_bytes="0.5x")
    loop.new_sequence(prompt_len=0)
    for t in range(T):
        cached = loop.cached()                            # per hook, bool (n_units,)
        loop.record([my_masks(hook, cached) ...])            # e.g. dipstream.selection.ca_select
    res = loop.result()                                   # == simulate() on the same masks

numpy only (no torch).
"""
from .hardware import (Hardware, available_presets, load_hardware, parse_bandwidth, parse_bytes,
                       parse_dram)
from .model_shape import SHAPES, ModelShape, get_shape
from .policies import POLICIES, CachePolicy, make_policy
from .simulate import (ClosedLoop, HookStepper, Placement, SimResult, dense_streaming_baseline,
                       plan_placement, simulate)
from .trace import (Hook, HookSpec, MaskTrace, TraceRecorder, check_trace_matches, hook_specs,
                    load_trace, save_trace, synthetic_trace)


__all__ = ["TraceRecorder", "Hardware", "available_presets", "load_hardware", "parse_bandwidth", "parse_bytes",
           "parse_dram", "SHAPES", "ModelShape", "get_shape", "POLICIES", "CachePolicy",
           "make_policy", "ClosedLoop", "HookStepper", "Placement", "SimResult",
           "dense_streaming_baseline", "plan_placement", "simulate", "Hook", "HookSpec",
           "MaskTrace", "check_trace_matches", "hook_specs", "load_trace",
           "save_trace", "synthetic_trace"]
