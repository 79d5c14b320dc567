"""Perplexity vs MLP density for several methods on one model, compared at matched *measured*
density, with the float32 noise of the perplexity measured alongside.

Each cell is the perplexity at exactly the column's density: a method whose measured density
is off by more than --tolerance (calibrated thresholds, integer k) gets a second run at a
requested density moved by the offset (secant step), and log-perplexity is interpolated
linearly in measured density between the two runs (marked *). GRIFFIN's cells are the
perplexity of the tokens it sparsified (after its dense prompt half); the dense model over the
same tokens is printed below the table. The noise row: the spread (max - min) / min of DIP's
perplexity over batch sizes (float32) and float64, at each density: near-ties in top-k flip
with the rounding of the batched matmuls.

Every finished run is appended to a JSONL file (a re-run skips it):

    python scripts/method_table.py --model smollm2-135m --tokens 8176 --out results/table.jsonl
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from dipstream.errors import DipstreamError
from dipstream.experiments.evaluate import EvalConfig, evaluate
from dipstream.paths import machine
from dipstream.io import append_jsonl, read_jsonl
from dipstream.sparsity import MethodOptions

NOISE_RUNS = (("float32", 1), ("float32", 2), ("float32", 8), ("float64", 1))


def _key(method: str, density: float, dtype: str = "float32", batch: int = 1) -> str:
    return f"{method}|{density:.6f}|{dtype}|{batch}"


class Runner:
    def __init__(self, model: str, tokens: int, out: Path):
        self.model, self.tokens, self.out = model, tokens, out
        self.rows = {r["key"]: r for r in read_jsonl(out)}

    def run(self, method: str, density: float, dtype: str = "float32", batch: int = 1) -> dict | None:
        key = _key(method, density, dtype, batch)
        if key in self.rows:
            return self.rows[key]
        cfg = EvalConfig(model=self.model, method=method, density=density, tokens=self.tokens,
                         dtype=dtype, options=MethodOptions())
        try:
            row, _ = evaluate(cfg, progress=False, batch_size=batch)
        except DipstreamError as exc:
            print(f"skip {key}: {exc}", file=sys.stderr)
            return None
        row.pop("density_per_layer", None)
        row.update(key=key, batch_size=batch)
        append_jsonl(self.out, row)
        self.rows[key] = row
        print(f"{method:>8} d={density:<8.4f} {dtype} batch {batch}: ppl={row['perplexity']:.3f} "
              f"(sparsified {row['perplexity_sparsified']:.3f}) measured={row['density_measured']:.4f} "
              f"({row['seconds']:.0f} s)", flush=True)
        return row

    def matched(self, method: str, d: float, tol: float):
        """(perplexity at measured density d, the runs used, interpolated?)."""
        a = self.run(method, d)
        if a is None:
            return None, [], False
        if abs(a["density_measured"] - d) <= tol:
            return a["perplexity_sparsified"], [a], False
        b = self.run(method, round(min(1.0, max(1e-3, d + (d - a["density_measured"]))), 6))
        if b is None or abs(b["density_measured"] - a["density_measured"]) < 1e-9:
            return a["perplexity_sparsified"], [a], False
        if abs(b["density_measured"] - d) <= tol:
            return b["perplexity_sparsified"], [b], False
        (m0, p0), (m1, p1) = ((r["density_measured"], math.log(r["perplexity_sparsified"])) for r in (a, b))
        return math.exp(p0 + (p1 - p0) * (d - m0) / (m1 - m0)), [a, b], True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="dense,dip,teal,cats,up,glu,griffin,random")
    ap.add_argument("--densities", default="0.35,0.5,0.7,0.85")
    ap.add_argument("--tokens", type=int, default=8176)
    ap.add_argument("--tolerance", type=float, default=0.0005,
                    help="largest |measured - column density| used without interpolation")
    ap.add_argument("--no-noise", dest="noise", action="store_false", help="skip the noise runs")
    ap.add_argument("--out", default="results/method_table.jsonl")
    a = ap.parse_args()
    methods, densities = a.methods.split(","), [float(x) for x in a.densities.split(",")]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runner = Runner(a.model, a.tokens, out)
    cells = {}
    for m in methods:
        for d in ([1.0] if m == "dense" else densities):
            cells[(m, d)] = runner.matched(m, d, a.tolerance)
    griffin_dense = runner.run("griffin", 1.0) if "griffin" in methods else None
    noise = {}
    if a.noise:
        for d in densities:
            ppl = [r["perplexity"] for r in (runner.run("dip", d, t, b) for t, b in NOISE_RUNS) if r]
            noise[d] = (max(ppl) - min(ppl)) / min(ppl) if ppl else None

    first = next(iter(runner.rows.values()))
    print(f"\n{a.model}, {first['tokens']} tokens ({first['windows']} windows of {first['seq_len']}) of the "
          f"`{first['corpus']}` {first.get('split') or 'eval'} split; machine: {machine()}")
    print("| method | " + " | ".join(f"d={d:g}" for d in densities) + " |")
    print("|---" * (len(densities) + 1) + "|")
    for m in methods:
        row = []
        for d in densities:
            ppl, runs, interp = cells[(m, 1.0 if m == "dense" else d)]
            if ppl is None:
                row.append("n/a")
            elif interp:
                row.append(f"{ppl:.2f}* ({runs[0]['density_measured']:.3f}, {runs[1]['density_measured']:.3f})")
            else:
                row.append(f"{ppl:.2f} ({runs[0]['density_measured']:.3f})")
        print(f"| {m} | " + " | ".join(row) + " |")
    if noise:
        print("| noise: DIP spread over batch 1/2/8 and float64 | "
              + " | ".join("-" if noise[d] is None else f"{100 * noise[d]:.2f}%" for d in densities) + " |")
    if griffin_dense is not None:
        print(f"\nGRIFFIN cells: perplexity of the predictions after its dense prompt (positions >= "
              f"{griffin_dense['sparsified_from_position']}); the dense model over the same tokens: "
              f"{griffin_dense['perplexity_sparsified']:.2f} (over all tokens: {griffin_dense['perplexity']:.2f}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
