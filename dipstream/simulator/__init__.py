"""Hardware simulator for DRAM-cached, Flash-streamed LLM decoding (methods.md sections 4-5).

numpy only, except ``cache_aware`` (torch), which is imported lazily.
"""
from .hardware import Hardware, available_presets, load_hardware, parse_bandwidth, parse_bytes, parse_dram
from .model_shape import SHAPES, ModelShape, get_shape
from .policies import POLICIES, CachePolicy, make_policy
from .simulate import (ClosedLoop, HookStepper, Placement, SimResult, dense_streaming_baseline,
                       plan_placement, simulate)
from .trace import (Hook, HookSpec, MaskTrace, check_trace_matches, dip_split, hook_specs,
                    load_trace, save_trace, synthetic_trace)


def __getattr__(name):
    if name in ("cache_aware_select", "topk_mask", "gamma_schedule"):
        from . import cache_aware
        return getattr(cache_aware, name)
    raise AttributeError(name)


__all__ = ["Hardware", "available_presets", "load_hardware", "parse_bandwidth", "parse_bytes",
           "parse_dram", "SHAPES", "ModelShape", "get_shape", "POLICIES", "CachePolicy",
           "make_policy", "ClosedLoop", "HookStepper", "Placement", "SimResult",
           "dense_streaming_baseline", "plan_placement", "simulate", "Hook", "HookSpec",
           "MaskTrace", "check_trace_matches", "dip_split", "hook_specs", "load_trace",
           "save_trace", "synthetic_trace", "cache_aware_select", "topk_mask", "gamma_schedule"]
