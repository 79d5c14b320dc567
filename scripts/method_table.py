"""Perplexity vs density for several methods on one model: runs `dipstream eval` configs in turn,
appends each finished row to a JSONL file (a re-run skips finished rows) and prints a Markdown table.

    python scripts/method_table.py --model smollm2-135m --tokens 8176 --out results/table.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dipstream.errors import DipstreamError
from dipstream.experiments import EvalConfig, run_eval
from dipstream.io import append_jsonl, read_jsonl


def _done(path: Path) -> dict:
    return {(r["method"], r["density_requested"]): r for r in read_jsonl(path)}


def markdown(rows: dict, methods: list[str], densities: list[float]) -> str:
    head = "| method | " + " | ".join(f"d={d:g}" for d in densities) + " |"
    lines = [head, "|---" * (len(densities) + 1) + "|"]
    for m in methods:
        cells = []
        for d in densities:
            r = rows.get((m, 1.0 if m == "dense" else d))
            cells.append("n/a" if r is None else f"{r['perplexity']:.2f} ({r['density_measured']:.3f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="dense,dip,teal,cats,up,glu,griffin,random")
    ap.add_argument("--densities", default="0.35,0.5,0.7,0.85")
    ap.add_argument("--tokens", type=int, default=8176)
    ap.add_argument("--out", default="results/method_table.jsonl")
    a = ap.parse_args()
    methods, densities = a.methods.split(","), [float(x) for x in a.densities.split(",")]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = _done(out)
    for m in methods:
        for d in ([1.0] if m == "dense" else densities):
            if (m, d) in rows:
                continue
            try:
                r = run_eval(EvalConfig(model=a.model, method=m, density=d, tokens=a.tokens), progress=False)
            except DipstreamError as exc:
                print(f"skip {m} @ {d}: {exc}", file=sys.stderr)
                continue
            r.pop("density_per_layer", None)
            append_jsonl(out, r)
            rows[(m, d)] = r
            print(f"{m:>8} d={d:<5} ppl={r['perplexity']:.3f} measured={r['density_measured']:.3f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    print(markdown(rows, methods, densities))
    return 0


if __name__ == "__main__":
    sys.exit(main())
