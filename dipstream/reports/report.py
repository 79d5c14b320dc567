"""`dipstream report RESULTS`: PNG figures and a Markdown report that embeds them."""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dipstream.errors import DipstreamError
from dipstream.reports.headline import HeadlineRow, headline, parse_budgets, split_of
from dipstream.reports.table import (
    CA,
    DENSE,
    at_dram,
    dense_perplexity,
    dense_streaming,
    gamma_of,
    main_device,
    mb,
    models,
    most_common,
    reference_density,
)


@dataclass
class ReportConfig:
    """What to report from a results folder."""

    out: str | None = field(default=None, metadata={
        "help": "folder for report.md and the PNG figures (default: RESULTS/report)", "metavar": "DIR"})
    ppl_budget: str = field(default="0.1,5%", metadata={
        "help": "perplexity budgets of the headline, comma-separated: absolute (0.1) or relative (5%) "
                "increase over the dense model"})
    hardware: str | None = field(default=None, metadata={
        "help": "device of the figures and headline (default: the most common in the table)"})
    policy: str | None = field(default=None, metadata={
        "help": "cache policy of the figures and headline (default: the most common)"})
    over_capacity: str | None = field(default=None, metadata={
        "help": "runs with this over-capacity rule (default: random, the reference's)",
        "choices": ["random", "keep-mask", "highest-index"]})
    cache_split: str | None = field(default=None, metadata={
        "help": "runs with this cache split (default: linear, the reference's)",
        "choices": ["linear", "hook", "weights"]})
    ref_density: float = field(default=0.9, metadata={
        "help": "density of the per-method curves vs DRAM and Flash bandwidth and of the heat map "
                "(falls back to the density most methods share)"})
    title: str | None = field(default=None, metadata={"help": "report title"})


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.0f}%"


def _headline_table(rows_by_budget: list[list[HeadlineRow]]) -> list[str]:
    out = ["| model | ppl budget | DRAM | dense streamed tok/s | best DIP-CA within budget | tok/s | "
           "throughput vs dense | perplexity dense -> best | smallest DRAM reaching dense tok/s | memory vs "
           "dense | memory vs dense, interpolated | DRAM used by it |", "|" + "---|" * 12]
    for hrows in rows_by_budget:
        for h in hrows:
            b = h.best
            ppl = f"{h.dense_ppl:.3f} -> {b['perplexity']:.3f} ({h.ppl_change:+.3f})" if b else "-"
            if b and not h.within_budget:
                ppl += " **over budget on eval**"
            match = (f"{h.match_fraction:g}x = {mb(h.match_bytes):.1f} MB ({h.setting(h.match_row)})"
                     if h.match_row else "none in the table")
            used = f"{mb(h.match_row['dram_used_bytes']):.1f} MB" if h.match_row else "-"
            out.append(f"| {h.model} | +{h.budget} | {h.dram_fraction:g}x = {mb(h.dram_bytes):.1f} MB | "
                       f"{h.dense_tps:.2f} | {h.setting(b)} | {b['tokens_per_s']:.2f} | "
                       f"{_pct(h.throughput_change)} | {ppl} | {match} | {_pct(h.memory_change)} | "
                       f"{_pct(h.memory_change_interp)} | {used} |"
                       if b else
                       f"| {h.model} | +{h.budget} | {h.dram_fraction:g}x = {mb(h.dram_bytes):.1f} MB | "
                       f"{h.dense_tps:.2f} | none within budget | - | - | - | {match} | - | - | - |")
    return out


def headline_sentence(hrows: list[HeadlineRow]) -> str | None:
    """Throughput range at equal DRAM, and the largest memory saving of the table, in one sentence."""
    cands = [h for h in hrows if h.best is not None]
    if not cands:
        return None
    lo = min(c.throughput_change for c in cands)
    hi = max(c.throughput_change for c in cands)
    h0 = cands[0]
    s = (f"**{h0.model}**, perplexity budget +{h0.budget} (dense {h0.dense_ppl:.3f}): at equal DRAM the best "
         f"DIP-CA setting within budget gives {_pct(lo)} to {_pct(hi)} throughput vs streaming the dense MLP "
         f"from Flash (DRAM {cands[0].dram_fraction:g}x to {cands[-1].dram_fraction:g}x); ")
    saving = [h for h in cands if h.memory_change is not None and h.memory_change < 0]
    if saving:
        h = min(saving, key=lambda h: (h.memory_change, -h.match_row["tokens_per_s"]))
        s += (f"the largest memory saving: dense streaming's {h.dense_tps:.2f} tok/s at {h.dram_fraction:g}x "
              f"({mb(h.dram_bytes):.1f} MB) is reached at {h.match_fraction:g}x ({mb(h.match_bytes):.1f} MB, "
              f"DRAM used {mb(h.match_row['dram_used_bytes']):.1f} MB) by {h.setting(h.match_row)} "
              f"({h.match_row['tokens_per_s']:.2f} tok/s, perplexity "
              f"{h.match_row['perplexity'] - h.dense_ppl:+.3f}): {_pct(h.memory_change)} memory.")
    else:
        s += "no smaller DRAM size of the table reaches dense streaming's throughput: no measured memory saving"
        est = [h for h in cands if h.memory_change_interp is not None and h.memory_change_interp < 0]
        if est:
            h = min(est, key=lambda h: h.memory_change_interp)
            s += (f" (interpolating between measured sizes, dense streaming's {h.dense_tps:.2f} tok/s at "
                  f"{h.dram_fraction:g}x would be reached at about {h.interp_fraction:.3g}x: "
                  f"{_pct(h.memory_change_interp)} memory, an estimate)")
        s += "."
    return s


def _runs_table(rows: list[dict], fraction: float) -> list[str]:
    rs = sorted(at_dram(rows, fraction), key=lambda r: (r["method"] != DENSE, r["method"],
                                                        r["density_requested"], -(gamma_of(r) or 0)))
    out = ["| method | density (measured) | γ | perplexity | tokens/s | hit rate | Flash MB/token | "
           "DRAM used MB | x dense streaming |", "|" + "---|" * 9]
    for r in rs:
        g = f"{r['gamma']:g}" if r["method"] == CA else "-"
        name = "dense, streamed" if r["method"] == DENSE else r["method"]
        out.append(f"| {name} | {r['density_measured']:.3f} | {g} | {r['perplexity']:.3f} | "
                   f"{r['tokens_per_s']:.2f} | {r['hit_rate']:.3f} | {mb(r['flash_bytes_per_token']):.2f} | "
                   f"{mb(r['dram_used_bytes']):.1f} | {r['speedup_vs_dense_streaming']:.2f} |")
    return out


def make_report(results: str | Path, cfg: ReportConfig, command: str | None = None) -> Path:
    """Write report.md and its figures; returns the path of report.md."""
    from dipstream.experiments.results_store import load_results, results_folder
    from dipstream.reports import (
        figures as F,  # matplotlib: loaded only when a report is made
    )
    from dipstream.validation import output_dir

    budgets = parse_budgets(cfg.ppl_budget)
    output_dir("out", cfg.out)
    all_rows, manifest = load_results(results)
    dev = main_device(all_rows, cfg.hardware, cfg.policy, cfg.over_capacity, cfg.cache_split)
    device_rows = [r for r in all_rows if dev.holds(r)]
    rows = [r for r in device_rows if split_of(r) == "eval"]  # figures: the eval split only
    selected_on_val = any(split_of(r) == "val" for r in device_rows)
    all_rows_eval = [r for r in all_rows if split_of(r) == "eval"]
    if not rows:
        raise DipstreamError(f"no runs of {dev.describe()} in '{results}'; pick --hardware, --policy, "
                             "--over-capacity or --cache-split that the table has")
    out = Path(cfg.out) if cfg.out else results_folder(results) / "report"
    out.mkdir(parents=True, exist_ok=True)
    ref = reference_density(rows, cfg.ref_density)
    ms = models(rows)
    lines = [f"# {cfg.title or 'dipstream report'}", ""]
    versions = Counter(r.get("dipstream") for r in all_rows)
    n_model_runs = {r["model_run"]: r.get("model_run_seconds") or 0 for r in all_rows}
    machine = most_common(all_rows, "machine")
    cmd = command or f"dipstream report {shlex.quote(str(results))}"
    sweeps = manifest.get("configs", [])
    if sweeps:
        lines += ["Runs made by " + ", ".join(f"`dipstream sweep {c['config']}`" + (f" ({c['description']})"
                                                if c.get("description") else "") for c in sweeps) + ".", ""]
    lines += [f"Report generated by `{cmd}` from {len(all_rows)} runs "
              f"({len(n_model_runs)} model runs, {sum(n_model_runs.values()) / 60:.1f} min of model-run "
              f"wall time; dipstream {', '.join(str(v) for v in versions)}; machine: {machine}).", "",
              f"Figures and headline: {dev.describe()}; {len(rows)} runs. "
              f"Models: {', '.join(ms)}; "
              f"{most_common(rows, 'tokens')} evaluated tokens per run "
              f"({most_common(rows, 'windows')} windows of {most_common(rows, 'seq_len')} tokens, corpus "
              f"`{most_common(rows, 'corpus')}`, every token sparsified). "
              "DRAM sizes are fractions of the model's fp16 weight bytes.", ""]
    lines += ["## Headline: DIP-CA vs the dense MLP streamed from Flash", "",
              "Definitions (per model, per DRAM size M of the table, per perplexity budget B):", "",
              "- *best DIP-CA within budget*: the fastest DIP-CA run (any density and γ; plain DIP counts as "
              "γ = 1, which gives the same masks) at DRAM M whose perplexity is at most the dense "
              "model's plus B (B absolute, or a percentage). "
              + ("It is **chosen on the validation split** (perplexity within B of the dense model's "
                 "validation perplexity) and **reported by its run on the eval split**, with the same "
                 "settings; an eval perplexity that falls outside the budget is marked *over budget on "
                 "eval*;" if selected_on_val else
                 "It is chosen on the same text it is reported on (the table has no validation runs);"),
              "- *throughput vs dense*: its tokens/s over dense streaming's at the same DRAM M, minus 1;",
              "- *memory vs dense*: M*/M - 1, where M* is the smallest DRAM size of the table at which the "
              "best DIP-CA within budget reaches at least dense streaming's tokens/s at M (nominal budgets "
              "on the table's grid of DRAM sizes: a finer grid can only find a smaller M*);",
              "- *memory vs dense, interpolated*: an estimate between measured sizes: where M* is not the "
              "smallest DRAM size of the table, the DRAM at which the straight line between the best "
              "DIP-CA within budget at the next smaller size and at M* reaches dense streaming's tokens/s "
              "at M;",
              "- *DRAM used*: the peak bytes the static layers and caches of that run occupy. "
              + ("No cache ever exceeds its share, so it never exceeds the nominal budget and the "
                 "memory figures are budgets that hold." if dev.within_budget else
                 "With keep-mask a cache keeps a whole mask even when that mask alone exceeds its "
                 "share, so DRAM used can exceed the nominal budget: check this column before reading "
                 "the memory figures as budgets that hold."), ""]
    sentences = []
    tables = []
    for b in budgets:
        hrows = [headline(device_rows, m, b) for m in ms]
        tables.append([h for hr in hrows for h in hr])
        sentences += [s for s in (headline_sentence(hr) for hr in hrows) if s]
    if sentences:
        lines += ["In one sentence per model and budget:", ""]
        lines += [f"- {s}" for s in sentences] + [""]
    lines += _headline_table(tables) + [""]
    figs = [("Perplexity vs density", "perplexity_vs_density.png", lambda p: F.perplexity_vs_density(rows, p)),
            ("Throughput vs perplexity: Pareto fronts at several DRAM sizes", "pareto_dram.png",
             lambda p: F.pareto(rows, p)),
            ("DIP-CA: hit rate and throughput vs γ", "gamma.png", lambda p: F.gamma_curves(rows, p)),
            ("Throughput vs DRAM size", "throughput_vs_dram.png",
             lambda p: F.vs_dram(rows, p, ref, budgets[0])),
            ("Throughput vs Flash bandwidth", "throughput_vs_flash.png",
             lambda p: F.vs_flash(all_rows_eval, dev, p, ref)),
            ("Hit rate per layer", "hit_rate_per_layer.png", lambda p: F.layer_heatmap(rows, p, ref))]
    lines += ["## Figures", ""]
    for title, name, draw in figs:
        path = out / name
        caption = draw(path) if ref is not None or name == "perplexity_vs_density.png" else None
        lines += [f"### {title}", ""]
        if caption:
            lines += [f"![{title}]({name})", "", caption, ""]
        else:
            path.unlink(missing_ok=True)
            lines += ["Not drawn: the table has no runs this figure needs.", ""]
    lines += ["## Runs at one DRAM size", ""]
    for m in ms:
        rs = [r for r in rows if r["model"] == m]
        f = F.ca_dram(rs) or sorted({r["dram_fraction"] for r in rs})[0]
        base = dense_streaming(rs, f)
        lines += [f"### {m}, DRAM {f:g}x = {mb(at_dram(rs, f)[0]['dram_bytes']):.1f} MB", "",
                  f"Dense perplexity {dense_perplexity(rs) or float('nan'):.3f}; dense streaming "
                  f"{base['tokens_per_s']:.2f} tok/s.", ""]
        lines += _runs_table(rs, f) + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
