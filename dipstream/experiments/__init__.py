"""Experiment runners: one configured run from model loading to a results row. The configs
(`configs`) are light; the runners load torch when first used."""

from dipstream.experiments.configs import EvalConfig


def __getattr__(name):
    if name == "run_eval":
        from dipstream.experiments.evaluate import run_eval

        return run_eval
    raise AttributeError(f"module 'dipstream.experiments' has no attribute '{name}'")


__all__ = ["EvalConfig", "run_eval"]
