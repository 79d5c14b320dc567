"""Quick-start job: dense vs DIP at 50% MLP density on smollm2-135m, printed as a small table."""

from dipstream.experiments import EvalConfig, run_eval

TOKENS = 4 * 511

rows = [run_eval(EvalConfig(model="smollm2-135m", method=m, density=d, tokens=TOKENS), progress=False)
        for m, d in (("dense", 1.0), ("dip", 0.5))]
print("| model | method | density (requested) | density (measured) | perplexity | bits/byte | tokens | s |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['model']} | {r['method']} | {r['density_requested']:.2f} | {r['density_measured']:.3f} | "
          f"{r['perplexity']:.2f} | {r['bits_per_byte']:.3f} | {r['tokens']} | {r['seconds']:.1f} |")
