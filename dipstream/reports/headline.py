"""The headline: DIP-CA vs streaming the dense model from Flash, within a perplexity budget.

For one model on one device, per DRAM size M of the table and perplexity budget B:

* candidates(M): DIP-CA rows at DRAM M whose perplexity is at most dense perplexity + B
  (B absolute, or a percentage of the dense perplexity); plain DIP counts as DIP-CA with
  gamma = 1 (identical masks, tested);
* best(M): the candidate with the highest tokens/s;
* throughput change at equal DRAM: tokens/s of best(M) / dense streaming's tokens/s at M - 1;
* memory: M* = the smallest DRAM size of the table at which best(M*) reaches at least dense
  streaming's tokens/s at M; memory change = M* / M - 1 (nominal DRAM budgets, read off the
  table's grid of DRAM sizes, so the saving is a lower bound at that grid's resolution);
* memory (interpolated): where best(M*) reaches it only at a grid point above the smallest, the
  DRAM at which the line between best() at the grid point below M* and at M* crosses dense
  streaming's tokens/s at M: an estimate between two measured sizes, labelled as such;
* DRAM used: the peak bytes the simulated caches and static layers actually occupy, reported
  next to it, so a claim can be checked against a budget that holds.

Selection without peeking: when the table has runs on the validation split (``split: val``), the
best setting at each DRAM size is chosen there (within the budget over the dense model's
validation perplexity) and reported by its run on the eval split (same settings); its eval
perplexity may then fall outside the budget, which the row says. Without validation runs the
choice is made on the reported text itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dipstream.errors import DipstreamError
from dipstream.reports.table import (
    CA,
    at_dram,
    dense_perplexity,
    dense_streaming,
    drams,
    gamma_of,
)


@dataclass(frozen=True)
class Budget:
    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> "Budget":
        import math

        t = text.strip()
        try:
            b = cls(float(t[:-1]) / 100, True) if t.endswith("%") else cls(float(t), False)
        except ValueError:
            b = cls(math.nan, False)
        if not (math.isfinite(b.value) and b.value >= 0):
            raise DipstreamError(f"--ppl-budget '{text}' is not a non-negative number or percentage; use "
                                 "e.g. 0.1 (absolute perplexity) or 5% (relative)")
        return b

    def limit(self, dense_ppl: float) -> float:
        return dense_ppl * (1 + self.value) if self.relative else dense_ppl + self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


def parse_budgets(text: str) -> list[Budget]:
    budgets = [Budget.parse(t) for t in text.split(",") if t.strip()]
    if not budgets:
        raise DipstreamError("--ppl-budget is empty; give e.g. 0.1 or 0.1,5%")
    return budgets


def split_of(row: dict) -> str:
    """The split a row was evaluated on (rows written before splits existed: eval)."""
    return row.get("split") or "eval"


def settings_identity(row: dict) -> str:
    """A run's settings without the evaluated split: a val run and its eval twin share it."""
    return json.dumps({k: v for k, v in row.items() if k.startswith("config.") and k != "config.split"},
                      sort_keys=True, default=str)


def best_within(rows: list[dict], limit: float) -> dict | None:
    """The fastest DIP-CA (or DIP, gamma 1) row whose perplexity is within `limit`."""
    cands = [r for r in rows if gamma_of(r) is not None and r["perplexity"] <= limit]
    return max(cands, key=lambda r: (r["tokens_per_s"], -r["perplexity"])) if cands else None


@dataclass
class HeadlineRow:
    model: str
    budget: Budget
    dram_fraction: float
    dram_bytes: float
    dense_tps: float
    dense_ppl: float
    best: dict | None
    match_fraction: float | None  # smallest DRAM where best() reaches dense_tps
    match_bytes: float | None
    match_row: dict | None
    interp_fraction: float | None = None  # linear estimate between the grid point below M* and M*
    selected_on: str = "eval"  # the split the best setting was chosen on
    chosen: dict | None = None  # the row it was chosen by (the val run, or best itself)

    @property
    def within_budget(self) -> bool | None:
        """Whether best's (eval) perplexity is within the budget over the dense eval perplexity."""
        return self.best["perplexity"] <= self.budget.limit(self.dense_ppl) if self.best else None

    @property
    def throughput_change(self) -> float | None:
        return self.best["tokens_per_s"] / self.dense_tps - 1 if self.best else None

    @property
    def ppl_change(self) -> float | None:
        return self.best["perplexity"] - self.dense_ppl if self.best else None

    @property
    def memory_change(self) -> float | None:
        return self.match_bytes / self.dram_bytes - 1 if self.match_bytes is not None else None

    @property
    def memory_change_interp(self) -> float | None:
        return self.interp_fraction / self.dram_fraction - 1 if self.interp_fraction is not None else None

    def setting(self, row: dict | None) -> str:
        if row is None:
            return "-"
        g = gamma_of(row)
        name = "DIP (γ=1)" if row["method"] != CA else f"DIP-CA γ={g:g}"
        return f"{name}, d={row['density_requested']:g}"


def headline(rows: list[dict], model: str, budget: Budget) -> list[HeadlineRow]:
    """One HeadlineRow per DRAM size of `rows` (one model, one device): chosen on the val runs
    when there are any, reported by the eval runs."""
    rows = [r for r in rows if r["model"] == model]
    report = [r for r in rows if split_of(r) == "eval"]
    select = [r for r in rows if split_of(r) == "val"]
    ppl = dense_perplexity(report)
    ppl_select = dense_perplexity(select)
    if ppl is None:
        return []
    if ppl_select is None:  # no validation runs: choose on the reported text
        select, ppl_select = report, ppl
    on = "val" if select is not report else "eval"
    fractions = drams(report)
    twin = {settings_identity(r): r for r in report}
    chosen = {f: best_within(at_dram(select, f), budget.limit(ppl_select)) for f in fractions}
    best = {f: (c if on == "eval" else twin.get(settings_identity(c))) if c else None
            for f, c in chosen.items()}
    rows = report
    out = []
    for f in fractions:
        base = dense_streaming(rows, f)
        match = next((g for g in fractions if best[g] is not None
                      and best[g]["tokens_per_s"] >= base["tokens_per_s"]), None)
        mrow = best[match] if match is not None else None
        interp = match
        i = fractions.index(match) if match is not None else 0
        if i > 0 and best[fractions[i - 1]] is not None:
            lo, hi = fractions[i - 1], match
            t_lo, t_hi = best[lo]["tokens_per_s"], best[hi]["tokens_per_s"]
            interp = lo + (hi - lo) * (base["tokens_per_s"] - t_lo) / (t_hi - t_lo)
        out.append(HeadlineRow(model, budget, f, at_dram(rows, f)[0]["dram_bytes"], base["tokens_per_s"],
                               ppl, best[f], match,
                               mrow["dram_bytes"] if mrow else None, mrow, interp, on, chosen[f]))
    return out
