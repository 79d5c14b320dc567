"""The report's figures, drawn from the tidy results table (matplotlib, Agg backend).

Every function takes the rows of the main device (see table.py) and a path, writes one PNG
with one column of panels per model, and returns a caption; or returns None when the table
lacks the runs that figure needs (the report then says so).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401

from dipstream.reports.table import (  # noqa: E402
    CA,
    DENSE,
    at_dram,
    dense_perplexity,
    dense_streaming,
    drams,
    gamma_of,
    median_value,
    models,
)

COLORS = {"dense": "black", "dip": "tab:blue", CA: "tab:red", "cats": "tab:orange", "glu": "tab:green",
          "teal": "tab:purple", "up": "tab:brown", "griffin": "tab:pink", "random": "tab:gray"}


def color(method: str, i: int = 0) -> str:
    return COLORS.get(method, f"C{i % 10}")


def _panels(n_rows: int, n_cols: int, w: float = 4.6, h: float = 3.6):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(w * n_cols, h * n_rows), squeeze=False)
    return fig, axes


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _one_per(rows: list[dict], key) -> list[dict]:
    out = {}
    for r in rows:
        out.setdefault(key(r), r)
    return list(out.values())


def ca_dram(rows: list[dict]) -> float | None:
    """DRAM fraction of the DIP-CA curves: the median of the sizes DIP-CA ran at."""
    fr = sorted({round(r["dram_fraction"], 6) for r in rows if r["method"] == CA})
    return median_value(fr) if fr else None


def _plain_log_ticks(axis, ticks=None) -> None:
    """Plain numbers (not 2x10^1) on a log axis; `ticks` pins the major ticks."""
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    if ticks is not None:
        axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        axis.set_minor_formatter(fmt)
    axis.set_major_formatter(fmt)


def _sparse_methods(rows):
    return [m for m in dict.fromkeys(r["method"] for r in rows) if m != DENSE]


def perplexity_vs_density(rows: list[dict], path) -> str | None:
    ms = models(rows)
    if not any(r["method"] != DENSE for r in rows):
        return None
    fig, axes = _panels(1, len(ms))
    for ax, model in zip(axes[0], ms):
        rs = [r for r in rows if r["model"] == model]
        ppl = dense_perplexity(rs)
        if ppl is not None:
            ax.axhline(ppl, color="black", ls="--", lw=1, label=f"dense ({ppl:.2f})")
        f_ca = ca_dram(rs)
        for i, m in enumerate(_sparse_methods(rs)):
            if m == CA:
                for j, g in enumerate(sorted({r["gamma"] for r in rs if r["method"] == CA})):
                    pts = _one_per([r for r in at_dram(rs, f_ca) if r["method"] == CA and r["gamma"] == g],
                                   lambda r: r["density_requested"])
                    pts.sort(key=lambda r: r["density_measured"])
                    ax.plot([r["density_measured"] for r in pts], [r["perplexity"] for r in pts], "--",
                            marker="x", color=_line_color((CA, g), j), label=f"dip-ca γ={g:g} @ {f_ca:g}x DRAM")
                continue
            pts = sorted(_one_per([r for r in rs if r["method"] == m], lambda r: r["density_requested"]),
                         key=lambda r: r["density_measured"])
            ax.plot([r["density_measured"] for r in pts], [r["perplexity"] for r in pts], "-o", ms=4,
                    color=color(m, i), label=m)
        ax.set_yscale("log")
        _plain_log_ticks(ax.yaxis)
        ax.set_xlabel("measured MLP density (share of MLP weights read)")
        ax.set_ylabel("perplexity")
        ax.set_title(model)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _save(fig, path)
    return ("Perplexity vs measured MLP density per method (log scale; dense dashed). DIP-CA's "
            "perplexity depends on its cache, so its curves are at one DRAM size (the median it ran at).")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both (lower perplexity, higher tokens/s), by perplexity."""
    front, best = [], float("-inf")
    for p, t in sorted(points, key=lambda x: (x[0], -x[1])):
        if t > best:
            front.append((p, t))
            best = t
    return front


def pareto(rows: list[dict], path, max_ppl_ratio: float = 2.0, max_panels: int = 5) -> str | None:
    ms = models(rows)
    if not any(r["method"] != DENSE for r in rows):
        return None

    def pick(fr):
        return fr if len(fr) <= max_panels else [fr[i * (len(fr) - 1) // (max_panels - 1)]
                                                 for i in range(max_panels)]

    per_model = {m: pick(drams([r for r in rows if r["model"] == m])) for m in ms}
    fig, axes = _panels(len(ms), max(len(v) for v in per_model.values()), 3.8, 3.3)
    for row_ax, model in zip(axes, ms):
        rs = [r for r in rows if r["model"] == model]
        ppl = dense_perplexity(rs)
        for ax in row_ax[len(per_model[model]):]:
            ax.axis("off")
        for ax, f in zip(row_ax, per_model[model]):
            here = [r for r in at_dram(rs, f) if r["method"] != DENSE]
            if ppl is not None:
                here = [r for r in here if r["perplexity"] <= max_ppl_ratio * ppl]
            for i, m in enumerate(dict.fromkeys(r["method"] for r in here)):
                pts = [r for r in here if r["method"] == m]
                ax.scatter([r["perplexity"] for r in pts], [r["tokens_per_s"] for r in pts], s=14,
                           color=color(m, i), label=m, alpha=0.8)
            front = pareto_front([(r["perplexity"], r["tokens_per_s"]) for r in here])
            if front:
                ax.step([p for p, _ in front], [t for _, t in front], where="post", color="gray", lw=1,
                        label="Pareto front")
            base = dense_streaming(rs, f)
            if base and ppl is not None:
                ax.scatter([ppl], [base["tokens_per_s"]], marker="*", s=120, color="black",
                           label="dense, streamed", zorder=5)
            ax.set_title(f"{model}, DRAM {f:g}x", fontsize=9)
            ax.set_xlabel("perplexity")
            ax.set_ylabel("tokens/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    _save(fig, path)
    return (f"Throughput vs perplexity at several DRAM sizes (fractions of the model's fp16 weight bytes); "
            f"gray: the Pareto front of all sparse runs; star: the dense MLP streamed from Flash. Runs "
            f"above {max_ppl_ratio:g}x the dense perplexity are left out.")


def gamma_curves(rows: list[dict], path) -> str | None:
    ms = [m for m in models(rows) if any(r["method"] == CA and r["model"] == m for r in rows)]
    if not ms:
        return None
    fig, axes = _panels(2, len(ms))
    for j, model in enumerate(ms):
        rs = [r for r in rows if r["model"] == model]
        f = ca_dram(rs)
        here = [r for r in at_dram(rs, f) if gamma_of(r) is not None]
        dens = sorted({r["density_requested"] for r in here if r["method"] == CA})
        for k, d in enumerate(dens):
            pts = sorted([r for r in here if r["density_requested"] == d], key=gamma_of)
            for i, (metric, name) in enumerate((("hit_rate", "hit rate"), ("tokens_per_s", "tokens/s"))):
                ax = axes[i][j]
                ax.plot([gamma_of(r) for r in pts], [r[metric] for r in pts], "-o", ms=4,
                        color=plt.cm.viridis(k / max(1, len(dens) - 1) * 0.9), label=f"d={d:g}")
                ax.set_xscale("log")
                _plain_log_ticks(ax.xaxis, sorted({gamma_of(r) for r in here}))
                ax.set_xlabel("γ (1 = plain DIP)")
                ax.set_ylabel(name)
                ax.set_title(f"{model}, DRAM {f:g}x", fontsize=9)
                ax.grid(alpha=0.3, which="both")
        base = dense_streaming(rs, f)
        if base:
            axes[1][j].axhline(base["tokens_per_s"], color="black", ls="--", lw=1, label="dense, streamed")
        for i in range(2):
            axes[i][j].legend(fontsize=7)
    _save(fig, path)
    return ("DIP-CA: cache hit rate (top) and tokens/s (bottom) vs γ, one line per density, at one DRAM "
            "size; γ = 1 is plain DIP (the same masks). Smaller γ prefers cached units.")


def _ref_lines(rs: list[dict], ref_density: float):
    """{label: rows} of the per-method curves: each method at the reference density, DIP-CA per gamma."""
    lines = {}
    for r in rs:
        if r["method"] == DENSE or abs(r["density_requested"] - ref_density) > 1e-9:
            continue
        key = (r["method"], r["gamma"] if r["method"] == CA else None)
        lines.setdefault(key, []).append(r)
    return lines


def _line_color(key, i):
    """Method colour; DIP-CA lines darker for smaller gamma."""
    m, g = key
    return plt.cm.Reds(0.95 - 0.55 * min(1.0, g)) if g is not None else color(m, i)


def _line_label(key, ref_density):
    m, g = key
    return f"{m} d={ref_density:g}" + (f" γ={g:g}" if g is not None else "")


def vs_dram(rows: list[dict], path, ref_density: float, budget=None) -> str | None:
    from dipstream.reports.headline import best_within

    ms = models(rows)
    if not ms or len(drams(rows)) < 2:
        return None
    fig, axes = _panels(1, len(ms))
    for ax, model in zip(axes[0], ms):
        rs = [r for r in rows if r["model"] == model]
        fr = drams(rs)
        ax.plot(fr, [dense_streaming(rs, f)["tokens_per_s"] for f in fr], "--s", color="black", ms=4,
                label="dense, streamed")
        for i, (key, pts) in enumerate(sorted(_ref_lines(rs, ref_density).items(), key=str)):
            pts = sorted(pts, key=lambda r: r["dram_fraction"])
            ax.plot([r["dram_fraction"] for r in pts], [r["tokens_per_s"] for r in pts], "-o", ms=3,
                    color=_line_color(key, i), label=_line_label(key, ref_density))
        ppl = dense_perplexity(rs)
        if budget is not None and ppl is not None:
            best = [(f, best_within(at_dram(rs, f), budget.limit(ppl))) for f in fr]
            best = [(f, b) for f, b in best if b is not None]
            if best:
                ax.plot([f for f, _ in best], [b["tokens_per_s"] for _, b in best], "-D", color="crimson",
                        lw=2.2, ms=5, label=f"best DIP-CA within +{budget} ppl")
        ax.set_xlabel("DRAM (fraction of the model's fp16 weight bytes)")
        ax.set_ylabel("tokens/s")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    _save(fig, path)
    return (f"Tokens/s vs DRAM size: dense streaming, each method at density {ref_density:g} (DIP-CA per γ), "
            "and the fastest DIP-CA setting (any density and γ, DIP as γ = 1) within the first "
            "perplexity budget.")


def _same_but_flash(row: dict, base: dict) -> bool:
    keys = [k for k in row if k.startswith("hw.") and k not in ("hw.flash_bw", "hw.name")]
    return all(row.get(k) == base.get(k) for k in keys)


def vs_flash(all_rows: list[dict], device, path, ref_density: float) -> str | None:
    """Tokens/s vs Flash bandwidth: rows of the main device's hardware/policy/semantics whose
    hardware differs from the preset only in flash_bw (e.g. hw_set: flash_bw=2GB/s)."""
    swept = [r for r in all_rows if device.holds(r, overridden=True)]
    base_rows = [r for r in all_rows if device.holds(r)]
    if not swept or not base_rows:
        return None
    ms = models(swept)
    fig, axes = _panels(2, len(ms))
    for j, model in enumerate(ms):
        f = swept[[r["model"] for r in swept].index(model)]["dram_fraction"]
        base = [r for r in at_dram(base_rows, f) if r["model"] == model]
        rs = base + [r for r in at_dram(swept, f) if r["model"] == model and base
                     and _same_but_flash(r, base[0])]
        bws = sorted({r["hw.flash_bw"] for r in rs})
        dense = [next(r for r in rs if r["hw.flash_bw"] == b)["dense_streaming.tokens_per_s"] for b in bws]
        top, bottom = axes[0][j], axes[1][j]
        top.plot([b / 1e9 for b in bws], dense, "--s", color="black", ms=4, label="dense, streamed")
        bottom.axhline(1.0, color="black", ls="--", lw=1, label="dense, streamed")
        for i, (key, pts) in enumerate(sorted(_ref_lines(rs, ref_density).items(), key=str)):
            pts = sorted(pts, key=lambda r: r["hw.flash_bw"])
            style = dict(ms=3, color=_line_color(key, i), label=_line_label(key, ref_density))
            x = [r["hw.flash_bw"] / 1e9 for r in pts]
            top.plot(x, [r["tokens_per_s"] for r in pts], "-o", **style)
            bottom.plot(x, [r["speedup_vs_dense_streaming"] for r in pts], "-o", **style)
        for ax, name in ((top, "tokens/s"), (bottom, "x dense streaming")):
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis, [b / 1e9 for b in bws])
            ax.set_xlabel("Flash read bandwidth (GB/s)")
            ax.set_ylabel(name)
            ax.set_title(f"{model}, DRAM {f:g}x")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)
        top.set_yscale("log")
        _plain_log_ticks(top.yaxis)
    _save(fig, path)
    return (f"Tokens/s (top) and speed-up over dense streaming (bottom) vs Flash read bandwidth (other "
            f"hardware fields as the preset), each method at density {ref_density:g}; DIP-CA's masks do not "
            "depend on bandwidth, so these are replays of the same model runs.")


def layer_heatmap(rows: list[dict], path, ref_density: float) -> str | None:
    ms = [m for m in models(rows) if any(r["model"] == m and r.get("hit_rate_per_layer") for r in rows)]
    if not ms:
        return None
    panels = []
    for model in ms:
        rs = [r for r in rows if r["model"] == model]
        f = ca_dram(rs) or median_value(drams(rs))
        here = at_dram(rs, f)
        sel = [r for r in here if r["method"] == DENSE][:1]
        lines = _ref_lines(here, ref_density)
        sel += [pts[0] for _, pts in sorted(lines.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 0)))]
        sel = [r for r in sel if r.get("hit_rate_per_layer")]
        if sel:
            panels.append((model, f, sel))
    if not panels:
        return None
    n_layers = max(len(r["hit_rate_per_layer"]) for _, _, s in panels for r in s)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.28 * n_layers + 3), 0.42 * sum(
        len(s) for _, _, s in panels) + 1.2 * len(panels)), squeeze=False)
    for ax, (model, f, sel) in zip(axes[:, 0], panels):
        data = [[v if v is not None else float("nan") for v in r["hit_rate_per_layer"]] for r in sel]
        im = ax.imshow(data, aspect="auto", vmin=0, vmax=1, cmap="magma")
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels(["dense, streamed" if r["method"] == DENSE else
                            _line_label((r["method"], r["gamma"] if r["method"] == CA else None), ref_density)
                            for r in sel], fontsize=7)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(f"{model}, DRAM {f:g}x: DRAM hit rate per layer", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    _save(fig, path)
    return (f"Hit rate per layer (mean over tokens and the layer's masked units), density {ref_density:g}, "
            "at one DRAM size; dense streaming keeps a fixed share of each layer's neurons in DRAM.")
