"""Perplexity of dense and DIP on prose (wiki) and code (the `code` corpus) for built-in models:
one `dipstream eval` per cell, each row kept as JSON in --out (resumable), then a markdown table.

    python scripts/corpus_table.py --models qwen2.5-coder-0.5b,qwen2.5-coder-1.5b --out results/corpus
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from run_once import dipstream_json

SETTINGS = [("dense", 1.0), ("dip", 0.9), ("dip", 0.7), ("dip", 0.5)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--corpora", default="wiki,code")
    ap.add_argument("--tokens", type=int, default=1022)
    ap.add_argument("--out", default="results/corpus")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for model in a.models.split(","):
        for corpus in a.corpora.split(","):
            for method, d in SETTINGS:
                rows[model, corpus, method, d] = dipstream_json(
                    ["eval", "--model", model, "--corpus", corpus, "--method", method, "--density", str(d),
                     "--tokens", str(a.tokens)], out / f"{model}-{corpus}-{method}-{d:g}.json")
    print(f"\n{a.tokens} eval-split tokens per cell; {platform.machine()}, float32 on CPU\n")
    print("| model | corpus | dense | DIP d 0.9 | DIP d 0.7 | DIP d 0.5 |")
    print("|---|---|---|---|---|---|")
    for model in a.models.split(","):
        for corpus in a.corpora.split(","):
            cells = [rows[model, corpus, m, d]["perplexity"] for m, d in SETTINGS]
            print(f"| {model} | {corpus} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
