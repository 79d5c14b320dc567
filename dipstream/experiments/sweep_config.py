"""Sweep configs: a YAML file expanded into the resolved runs of a cross product.

The valid keys are the fields of the typed run configs (`EvalConfig`, its `MethodOptions` and
`SimConfig`, flattened exactly as the command line flattens them), so a field added to any of
them is a sweep key too. A scalar is fixed; a list is a sweep axis (every combination runs).
Three keys are the sweep's own: `grid` (a list of blocks, each expanded like the top level and
inheriting its keys: the union of the blocks runs, so e.g. gamma can vary for dip-ca only),
`results` (default results folder) and `description`.

    tokens: 4088
    hardware: a18
    dram: [0.6x, 0.8x]
    grid:
      - {method: dense}
      - {method: dip, density: [0.5, 0.7]}
      - {method: dip-ca, density: 0.7, gamma: [0.05, 0.2]}
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from dipstream import __version__
from dipstream.config import base_type, from_namespace
from dipstream.errors import DipstreamError, did_you_mean, user_errors
from dipstream.experiments.evaluate import EvalConfig
from dipstream.experiments.simulate import (
    SimulateConfig,
    closed_loop_cache,
    configure_closed_loop,
    hardware_of,
    is_closed_loop,
)
from dipstream.io import config_hash
from dipstream.models.adapters import lora_weights_in
from dipstream.models.loading import shape_of
from dipstream.simulator.simulate import resolve_dram
from dipstream.sparsity import build_method

SWEEP_KEYS = ("grid", "results", "description")
# fields that name one run's own output files: a sweep manages its outputs itself
OUTPUT_FIELDS = ("json", "save_thresholds", "save_trace", "trace")


@functools.cache
def leaf_fields(cls) -> typing.Mapping[str, tuple[type, bool, object]]:
    """{name: (type, optional?, default)} of every leaf field of dataclass `cls`, nested ones
    flattened as the command line flattens them (computed once per class, read-only)."""
    out = {}

    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, optional = base_type(hints[f.name])
            if dataclasses.is_dataclass(tp):
                walk(tp)
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = (tp, optional, default)

    walk(cls)
    return MappingProxyType(out)


def run_fields() -> typing.Mapping[str, tuple[type, bool, object]]:
    """The keys a sweep config may set: every leaf field of SimulateConfig."""
    return leaf_fields(SimulateConfig)


def _coerce(key: str, value, tp: type, optional: bool, where: str):
    if value is None:
        if optional:
            return None
        raise DipstreamError(f"{where}: `{key}` cannot be empty (null); give a value")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise DipstreamError(f"{where}: `{key}` must be {tp.__name__}{' or null' if optional else ''}, "
                         f"got {value!r}")


def _check_key(key: str, fields: dict, where: str) -> str:
    norm = key.replace("-", "_")
    if norm in OUTPUT_FIELDS:
        raise DipstreamError(f"{where}: `{key}` names one run's output file; a sweep writes its own "
                             "results folder, so remove it")
    if norm not in fields:
        valid = sorted(fields) + list(SWEEP_KEYS)
        hint = did_you_mean(norm, valid, quote="`", cutoff=0.5) or "valid keys are the options of " \
            "`dipstream simulate --help` (with _ for -) plus grid, results, description"
        raise DipstreamError(f"{where}: unknown key `{key}`; {hint}")
    return norm


def expand(block: dict, inherited: dict, fields: dict, where: str) -> list[dict]:
    """All combinations of one block (lists are axes), merged over `inherited`, recursing into grid."""
    if not isinstance(block, dict):
        raise DipstreamError(f"{where}: a block must be a mapping of keys to values, got {block!r}")
    axes = {}
    for key, value in block.items():
        if key in SWEEP_KEYS:
            continue
        norm = _check_key(str(key), fields, where)
        values = value if isinstance(value, list) else [value]
        tp, optional, _ = fields[norm]
        axes[norm] = [_coerce(norm, v, tp, optional, where) for v in values]
    names = list(axes)
    combos = [{**inherited, **dict(zip(names, c))} for c in itertools.product(*axes.values())]
    grid = block.get("grid")
    if grid is None:
        return combos
    if not isinstance(grid, list):
        raise DipstreamError(f"{where}: `grid` must be a list of blocks")
    return [run for c in combos for i, sub in enumerate(grid)
            for run in expand(sub, c, fields, f"{where} grid[{i}]")]


def load_sweep(path: str | Path) -> tuple[dict, list[dict]]:
    """(the config mapping, its runs as flat dicts of the given keys, duplicates removed)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DipstreamError(f"sweep config '{path}' does not exist; give a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise DipstreamError(f"sweep config '{path}' is not valid YAML{at}") from None
    if not isinstance(raw, dict):
        raise DipstreamError(f"sweep config '{path}' must be a mapping of keys to values")
    runs = expand(raw, {}, run_fields(), path.name)
    unique = list({json.dumps(r, sort_keys=True): r for r in runs}.values())
    if not unique:
        raise DipstreamError(f"sweep config '{path}' gives no runs (an empty list or grid somewhere "
                             "makes the cross product empty); give every axis at least one value")
    return raw, unique


def run_config(params: dict) -> SimulateConfig:
    """The SimulateConfig of a run's flat params."""
    return from_namespace(SimulateConfig, argparse.Namespace(**params))


class InvalidRun(DipstreamError):
    """A combination the method refuses (e.g. a density below its floor): skipped, not fatal."""


@dataclass
class Run:
    """One resolved run: every field's value, its identity and how it shares a model run."""

    params: dict                     # every SimulateConfig leaf field, flat
    key: str                         # hash of the resolved config + package version
    config_key: str                  # same without the version (to compare versions)
    model_run: str                   # hash of what the model run depends on
    closed_loop: bool                # masks depend on the live cache (dip-ca)
    hardware: dict = field(default_factory=dict)  # resolved Hardware fields
    shape: dict = field(default_factory=dict)     # ModelShape fields

    def label(self) -> str:
        p = self.params
        extra = f" gamma={p['gamma']}" if self.closed_loop else ""
        hw = f"{p['hardware']}[{p['hw_set']}]" if p.get("hw_set") else p["hardware"]
        return f"{p['model']} {p['method']}@{p['density']}{extra} {hw} dram={p['dram']} {p['policy']}"


def resolve(given: dict, shapes: dict, hardwares: dict) -> Run:
    """Fill defaults, validate the method, resolve the hardware and the model-run identity.
    `shapes` caches model shapes by model name, `hardwares` devices by (hardware, hw_set)."""
    from dataclasses import asdict


    fields = run_fields()
    params = {k: d for k, (_, _, d) in fields.items()}
    params.update(given)
    params = {k: v for k, v in params.items() if k not in OUTPUT_FIELDS}
    cfg = run_config(params)
    try:
        method = build_method(cfg.eval.method, cfg.eval.density, cfg.eval.options)
    except DipstreamError as exc:
        raise InvalidRun(str(exc)) from None
    cfg.sim.validate()  # every run's device and options are checked before any run starts
    cfg.eval.validate()
    params["density"] = float(method.density)  # e.g. dense ignores the density it was given
    cfg.eval.density = params["density"]
    hw_id = (cfg.sim.hardware, cfg.sim.hw_set)
    if hw_id not in hardwares:
        hardwares[hw_id] = hardware_of(cfg.sim)
    hw = hardwares[hw_id]
    if cfg.eval.model not in shapes:
        shapes[cfg.eval.model] = shape_of(cfg.eval.model)
    shape = shapes[cfg.eval.model]
    with user_errors():  # a DRAM size that does not resolve fails the plan
        resolve_dram(cfg.sim.dram, hw, shape)
    closed = is_closed_loop(method)

    eval_fields = leaf_fields(EvalConfig)
    model_keys = [k for k in params if k in eval_fields] + ["batch_size"]
    model_id = {"run": {k: params[k] for k in sorted(model_keys)}, "dipstream": __version__}
    if closed:  # the masks depend on the cache: its capacities and policy, not on bandwidths

        adapter_weights = lora_weights_in(cfg.eval.adapter) if cfg.eval.adapter else 0
        cache = closed_loop_cache(cfg.sim, hw, shape, cfg.eval.seq_len, adapter_weights)
        try:
            configure_closed_loop(method, shape, cache)
        except DipstreamError as exc:
            raise InvalidRun(str(exc)) from None
        model_id["cache"] = cache
    hw_dict = asdict(hw)
    ident = {"run": params, "hardware": hw_dict}
    return Run(params, config_hash({**ident, "dipstream": __version__}), config_hash(ident),
               config_hash(model_id),
               closed, hw_dict, shape.to_dict())

