"""The results table as plain rows, and the slices the report draws from.

A *main device* is one simulated device setting: hardware preset, policy, cache semantics
(what a cache keeps when a mask exceeds it, and how DRAM is split between the caches; the
reference's by default), with no `hw_set` override. Figures and the headline compare methods on
it; rows with `hw_set` overrides feed the Flash-bandwidth figure.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

DENSE = "dense"
CA = "dip-ca"


def get(row: dict, key: str, default=None):
    v = row.get(key, default)
    return default if v is None else v


def gamma_of(row: dict) -> float | None:
    """DIP-CA's gamma; plain DIP is DIP-CA with gamma 1 exactly (tested), so it counts as 1."""
    if row["method"] == CA:
        return float(row["gamma"])
    return 1.0 if row["method"] == "dip" else None


def mb(x: float) -> float:
    return x / 1e6


REFERENCE_OVER_CAPACITY, REFERENCE_SPLIT = "random", "linear"


@dataclass
class Device:
    hardware: str
    policy: str
    over_capacity: str = REFERENCE_OVER_CAPACITY
    cache_split: str = REFERENCE_SPLIT

    def holds(self, row: dict, overridden: bool = False) -> bool:
        """Whether `row` ran on this device; with `overridden`, on this device with `hw_set`
        overrides of its hardware fields (e.g. another Flash bandwidth)."""
        return (get(row, "config.hardware") == self.hardware and get(row, "config.policy") == self.policy
                and get(row, "config.over_capacity", REFERENCE_OVER_CAPACITY) == self.over_capacity
                and get(row, "config.cache_split", REFERENCE_SPLIT) == self.cache_split
                and bool(get(row, "config.hw_set")) == overridden)

    @property
    def within_budget(self) -> bool:
        """Whether no cache can exceed its DRAM share (every over-capacity rule but keep-mask)."""
        return self.over_capacity != "keep-mask"

    def describe(self) -> str:
        if (self.over_capacity, self.cache_split) == (REFERENCE_OVER_CAPACITY, REFERENCE_SPLIT):
            sem = ("the reference's cache semantics (DRAM split per masked linear; a cache never "
                   "exceeds its share: a mask larger than its cache keeps its hits and a random subset)")
        else:
            sem = (f"cache semantics not the reference's: over-capacity `{self.over_capacity}`, cache "
                   f"split `{self.cache_split}`")
        return f"hardware `{self.hardware}`, policy `{self.policy}`, {sem}"


def most_common(rows: list[dict], key: str):
    """The most common value of `key` in `rows` (the first seen of a tie)."""
    return Counter(r.get(key) for r in rows).most_common(1)[0][0]


def main_device(rows: list[dict], hardware: str | None = None, policy: str | None = None,
                over_capacity: str | None = None, cache_split: str | None = None) -> Device:
    """The given device, else the most common hardware and policy, with the reference's cache
    semantics unless given."""
    base = [r for r in rows if not get(r, "config.hw_set")] or rows
    hw = hardware or most_common(base, "config.hardware")
    pol = policy or most_common(base, "config.policy")
    return Device(hw, pol, over_capacity or REFERENCE_OVER_CAPACITY, cache_split or REFERENCE_SPLIT)


def models(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def drams(rows: list[dict]) -> list[float]:
    """Distinct DRAM fractions (of the model's weight bytes), ascending."""
    return sorted({round(r["dram_fraction"], 6) for r in rows})


def at_dram(rows: list[dict], fraction: float) -> list[dict]:
    return [r for r in rows if abs(r["dram_fraction"] - fraction) < 1e-6]


def dense_perplexity(rows: list[dict]) -> float | None:
    """Perplexity of the dense model run (the same windows as every other run of the model)."""
    vals = [r["perplexity"] for r in rows if r["method"] == DENSE]
    return vals[0] if vals else None


def dense_streaming(rows: list[dict], fraction: float) -> dict | None:
    """Dense-MLP streaming figures at one DRAM fraction (every row carries them)."""
    rs = at_dram(rows, fraction)
    if not rs:
        return None
    return {k[len("dense_streaming."):]: v for k, v in rs[0].items() if k.startswith("dense_streaming.")}


def median_value(values: list[float]) -> float:
    v = sorted(values)
    return v[(len(v) - 1) // 2]


def reference_density(rows: list[dict], preferred: float | None = 0.9) -> float | None:
    """The density used for per-method curves: `preferred` when DIP-CA or DIP has it, else the
    density most methods share."""
    sparse = [r for r in rows if r["method"] != DENSE]
    if not sparse:
        return None
    dens = {round(float(r["density_requested"]), 6) for r in sparse if r["method"] in (CA, "dip")}
    if preferred is not None and round(preferred, 6) in dens:
        return preferred
    by = Counter()
    for d, m in {(round(float(r["density_requested"]), 6), r["method"]) for r in sparse}:
        by[d] += 1
    return max(by, key=lambda d: (by[d], d))
