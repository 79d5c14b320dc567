"""Experiment runners: one configured run from model loading to a results row."""

from dipstream.experiments.evaluate import EvalConfig, run_eval

__all__ = ["EvalConfig", "run_eval"]
