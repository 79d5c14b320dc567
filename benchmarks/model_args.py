"""Command-line options shared by the benchmarks that run a whole model: a built-in (or local)
model, or a random-weight model of a preset shape, on a device in a dtype."""

from __future__ import annotations


def add_model_args(ap) -> None:
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-shape", help="a simulator shape preset, e.g. llama3-8b (random weights)")
    ap.add_argument("--layers", type=int, help="with --random-shape: fewer layers than the preset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
